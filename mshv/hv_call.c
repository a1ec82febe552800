// SPDX-License-Identifier: GPL-2.0
/*
 * Hand-written support for the generated hypercall wrappers: per-CPU
 * hypercall pages, memory deposits and failure logging.
 */
#include "mshv_root.h"

#include <linux/cpumask.h>
#include <linux/gfp.h>
#include <linux/irqflags.h>
#include <linux/log2.h>
#include <linux/mm.h>
#include <linux/percpu.h>
#include <linux/preempt.h>
#include <linux/printk.h>
#include <linux/sched.h>
#include <linux/slab.h>

#include "mshvr_hvcall.h"
#include "seam.h"

/*
 * Per-CPU hypercall pages, four contiguous pages per CPU.
 *
 * input/output: used only with interrupts disabled on their own CPU
 * (mshvr_hvcall_begin/end), from any context. Nothing else can run on that
 * CPU meanwhile, so no two users ever share them.
 *
 * dispatch_input/dispatch_output: used only by calls the spec issues with
 * interrupts enabled (DispatchVp), between mshvr_hvcall_begin_irqs_on() and
 * mshvr_hvcall_end_irqs_on(): in task context with preemption disabled, so
 * no other task on the CPU can take them, and never from an interrupt
 * handler, so the handlers that run on the CPU while the call is in the
 * hypervisor (timer, IPIs, the SynIC handler, which makes hypercalls of its
 * own) use input/output and cannot clobber them.
 */
struct mshvr_hvcall_pages {
	void *input;
	void *output;
	void *dispatch_input;
	void *dispatch_output;
};

#define MSHVR_HVCALL_PAGES_ORDER	2

static struct mshvr_hvcall_pages __percpu *mshvr_pages;

/* The root partition's own id, from HvCallGetPartitionId at load. */
static u64 mshvr_self_id;

/* Upper bound on deposit-and-retry rounds for one hypercall. */
#define MSHVR_DEPOSIT_ATTEMPTS_MAX	4096

void *mshvr_hvcall_begin(unsigned long *flags, void **out)
{
	struct mshvr_hvcall_pages *p;

	local_irq_save(*flags);
	p = this_cpu_ptr(mshvr_pages);
	*out = p->output;
	return p->input;
}

void mshvr_hvcall_end(unsigned long flags)
{
	local_irq_restore(flags);
}

void *mshvr_hvcall_begin_irqs_on(void **out)
{
	struct mshvr_hvcall_pages *p;

	/* a task with interrupts on: the hypervisor may run the call for long */
	WARN_ON_ONCE(!in_task() || irqs_disabled());
	preempt_disable();
	p = this_cpu_ptr(mshvr_pages);
	*out = p->dispatch_output;
	return p->dispatch_input;
}

void mshvr_hvcall_end_irqs_on(void)
{
	preempt_enable();
}

u64 mshvr_root_partition_id(void)
{
	return mshvr_self_id;
}

void mshvr_hvcall_log_failure(const char *name, u16 code, u16 status)
{
	pr_err_ratelimited("hypercall %s (0x%04x) failed: %s (0x%04x)\n",
			   name, code, mshvr_hv_status_name(status), status);
}

/*
 * Give @pages freshly allocated pages to @partition_id's hypervisor pool.
 * On failure every page allocated here is freed again; a page the hypervisor
 * accepted belongs to it until withdrawn.
 */
/* The hypervisor broke the rep protocol: no progress on SUCCESS, or too much. */
void mshvr_hvcall_log_protocol(const char *name, u64 result, u32 start, u32 count)
{
	pr_err_ratelimited("hypercall %s: result 0x%llx completes %u reps from %u of %u\n",
			   name, result, mshvr_hv_result_reps(result), start, count);
}

int mshvr_hv_deposit(u64 partition_id, unsigned int pages)
{
	u64 *pfns;
	u32 done = 0;
	unsigned int i;
	int ret = -ENOMEM;

	might_sleep();
	if (!pages)
		return 0;
	pfns = kcalloc(pages, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	for (i = 0; i < pages; i++) {
		struct page *pg = alloc_page(GFP_KERNEL_ACCOUNT);

		if (!pg)
			goto free;
		pfns[i] = page_to_pfn(pg);
	}
	ret = mshvr_hvcall_deposit_memory(partition_id, pfns, pages, &done, NULL);
free:
	/* pages the hypervisor did not take are still ours */
	for (; done < pages && done < i; done++)
		__free_page(pfn_to_page(pfns[done]));
	kfree(pfns);
	return ret;
}

/*
 * Give @partition_id one physically contiguous, naturally aligned chunk of
 * MSHVR_HV_MAX_CONTIGUOUS_ALLOCATION_PAGES pages, for a call that failed with
 * INSUFFICIENT_CONTIGUOUS_(ROOT_)MEMORY: single pages never satisfy it. The
 * chunk is split so that each page is withdrawn and freed on its own.
 */
static int mshvr_hv_deposit_contiguous(u64 partition_id)
{
	const unsigned int n = MSHVR_HV_MAX_CONTIGUOUS_ALLOCATION_PAGES;
	const unsigned int order = ilog2(n);
	struct page *pg;
	u64 *pfns;
	u32 done = 0;
	unsigned int i;
	int ret;

	BUILD_BUG_ON(!is_power_of_2(MSHVR_HV_MAX_CONTIGUOUS_ALLOCATION_PAGES));
	pfns = kcalloc(n, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	pg = alloc_pages(GFP_KERNEL_ACCOUNT, order);
	if (!pg) {
		kfree(pfns);
		return -ENOMEM;
	}
	split_page(pg, order);
	for (i = 0; i < n; i++)
		pfns[i] = page_to_pfn(pg) + i;
	ret = mshvr_hvcall_deposit_memory(partition_id, pfns, n, &done, NULL);
	/* pages the hypervisor did not take are still ours */
	for (; done < n; done++)
		__free_page(pfn_to_page(pfns[done]));
	kfree(pfns);
	return ret;
}

int mshvr_hv_deposit_on_status(u16 status, u64 target_partition_id, bool into_root,
			       unsigned int pages, unsigned int *attempt)
{
	u64 id = into_root ? mshvr_self_id : target_partition_id;
	bool contiguous = status == MSHVR_HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY ||
			  status == MSHVR_HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY;

	if (status == MSHVR_HV_STATUS_INSUFFICIENT_ROOT_MEMORY ||
	    status == MSHVR_HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY)
		id = mshvr_self_id;
	if (++*attempt > MSHVR_DEPOSIT_ATTEMPTS_MAX) {
		pr_err("giving up after %u deposits into partition %llu\n",
		       MSHVR_DEPOSIT_ATTEMPTS_MAX, id);
		return -ENOMEM;
	}
	if (fatal_signal_pending(current))
		return -EINTR;
	if (contiguous)
		return mshvr_hv_deposit_contiguous(id);
	return mshvr_hv_deposit(id, pages);
}

int mshvr_hv_call_init(void)
{
	struct mshvr_hv_output_partition_id out;
	unsigned int cpu;
	int ret;

	mshvr_pages = alloc_percpu(struct mshvr_hvcall_pages);
	if (!mshvr_pages)
		return -ENOMEM;
	for_each_possible_cpu(cpu) {
		struct mshvr_hvcall_pages *p = per_cpu_ptr(mshvr_pages, cpu);
		/* input, output, dispatch input, dispatch output */
		struct page *pg = alloc_pages_node(cpu_to_node(cpu), GFP_KERNEL | __GFP_ZERO,
						   MSHVR_HVCALL_PAGES_ORDER);

		if (!pg) {
			mshvr_hv_call_exit();
			return -ENOMEM;
		}
		p->input = page_address(pg);
		p->output = (u8 *)p->input + PAGE_SIZE;
		p->dispatch_input = (u8 *)p->input + 2 * PAGE_SIZE;
		p->dispatch_output = (u8 *)p->input + 3 * PAGE_SIZE;
	}
	ret = mshvr_hvcall_get_partition_id(&out, NULL);
	if (ret) {
		mshvr_hv_call_exit();
		return ret;
	}
	mshvr_self_id = out.partition_id;
	return 0;
}

void mshvr_hv_call_exit(void)
{
	unsigned int cpu;

	if (!mshvr_pages)
		return;
	for_each_possible_cpu(cpu) {
		struct mshvr_hvcall_pages *p = per_cpu_ptr(mshvr_pages, cpu);

		if (p->input)
			free_pages((unsigned long)p->input, MSHVR_HVCALL_PAGES_ORDER);
	}
	free_percpu(mshvr_pages);
	mshvr_pages = NULL;
}
