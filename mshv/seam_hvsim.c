// SPDX-License-Identifier: GPL-2.0
/*
 * hvsim seam (test builds only: make HVSIM=1). The "hypervisor" is a Python
 * simulator on the host running QEMU; see docs/hvsim-transport.md.
 *
 * Transport: each CPU owns two request pages (struct mshvr_hvsim_request,
 * below 4 GiB). To issue a request the CPU fills a page, sets state to
 * PENDING and rings the doorbell: the 32-bit word (page GPA | cpu) written
 * as four outb() to an isa-debugcon port that QEMU forwards to the
 * simulator. The simulator reads and writes guest RAM directly (a shared
 * file) and sets state to DONE last; the CPU spins on it. Notifications
 * from the simulator arrive as RX interrupts of a 16550 UART at a
 * non-standard port; each received byte names the CPU whose SynIC message
 * page has news.
 *
 * Locking and context, per CPU:
 *  - req: used only with interrupts disabled on its own CPU (hypercalls,
 *    fast hypercalls, the simulator's own ops), from any context, so it
 *    never has two users.
 *  - dispatch: used only by mshvr_seam_hypercall_irqs_on() (DispatchVp), in
 *    a task with preemption disabled, never from an interrupt handler: one
 *    user. The CPU waits on it with interrupts enabled, so the handlers that
 *    run meanwhile (timer, IPIs, the SynIC handler through its csd) issue
 *    their own requests on req. When the waiting CPU has taken an
 *    interrupt, it sets root_irq in the dispatch page and sends
 *    HVSIM_OP_ROOT_IRQ on req, and the simulator ends the dispatch (as
 *    Hyper-V returns to the root for its interrupts).
 * hvsim_ring_lock keeps the four doorbell bytes of two CPUs (or of a CPU
 * and an interrupt handler on it) from interleaving.
 */
#include "mshv_root.h"

#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/kernel_stat.h>
#include <linux/smp.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/percpu.h>
#include <linux/seq_file.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "mshvr_hv_types.h"
#include "seam.h"

#define HVSIM_TIMEOUT_NS	(30ULL * NSEC_PER_SEC)
#define HVSIM_CPU_MASK		0xfffu

/* 16550 registers, offsets from MSHVR_HVSIM_IRQ_PORT */
#define UART_RBR	0
#define UART_IER	1
#define UART_IIR_FCR	2
#define UART_LCR	3
#define UART_MCR	4
#define UART_LSR	5
#define UART_LSR_DR	0x01
#define UART_IER_RDI	0x01
#define UART_MCR_DTR_RTS_OUT2	0x0b

/* A CPU's request pages; the rules are at the top of this file. */
struct hvsim_cpu {
	struct mshvr_hvsim_request *req;
	struct mshvr_hvsim_request *dispatch;
};
static struct hvsim_cpu __percpu *hvsim_cpus;
static DEFINE_RAW_SPINLOCK(hvsim_ring_lock);
static bool hvsim_region;

/*
 * Per possible CPU: its SynIC pages, mapped once at synic init, and the
 * cross-CPU call that runs the handler for that CPU on that CPU, as the
 * real SynIC interrupt would (a hypercall the handler makes, such as
 * NotifyPortRingEmpty, then comes from the right CPU). @pending is set for
 * each notification and taken by the call, so none is lost while a call
 * is queued or running.
 */
struct hvsim_synic {
	void *simp;
	void *siefp;
	void *sirbp;
	call_single_data_t csd;
	atomic_t pending;
};
static struct hvsim_synic *hvsim_synic;
static mshvr_synic_handler_t hvsim_handler;
static bool hvsim_irq_requested;

static void hvsim_ring(u32 word)
{
	unsigned long flags;

	raw_spin_lock_irqsave(&hvsim_ring_lock, flags);
	outb(word, MSHVR_HVSIM_DOORBELL_PORT);
	outb(word >> 8, MSHVR_HVSIM_DOORBELL_PORT);
	outb(word >> 16, MSHVR_HVSIM_DOORBELL_PORT);
	outb(word >> 24, MSHVR_HVSIM_DOORBELL_PORT);
	raw_spin_unlock_irqrestore(&hvsim_ring_lock, flags);
}

static struct mshvr_hvsim_request *hvsim_this_req(void)
{
	return this_cpu_ptr(hvsim_cpus)->req;
}

static int hvsim_op(u32 op, u64 *arg0, u64 *arg1, u64 *arg2);

/*
 * Interrupts this CPU has taken so far: device interrupts (the hvsim UART
 * among them) and the system vectors a root takes while it waits: the
 * local timer, reschedule and function-call IPIs (the SynIC handler's
 * csd), TLB shootdowns, irq_work and platform IPIs. Only compared for a
 * change.
 */
static unsigned long hvsim_irqs_taken(void)
{
	return this_cpu_read(kstat.irqs_sum) +
	       this_cpu_read(irq_stat.apic_timer_irqs) +
	       this_cpu_read(irq_stat.irq_resched_count) +
	       this_cpu_read(irq_stat.irq_call_count) +
	       this_cpu_read(irq_stat.irq_tlb_count) +
	       this_cpu_read(irq_stat.apic_irq_work_irqs) +
	       this_cpu_read(irq_stat.x86_platform_ipis);
}

/*
 * The CPU took an interrupt while waiting on its dispatch page: flag it in
 * the page (the simulator polls it) and say so on the CPU's other page, so
 * that the simulator can stop the VP at once. Runs in the waiting task
 * with interrupts on, where req is free: its users run with interrupts off
 * on this CPU, so none is between its start and its end here.
 */
static void hvsim_root_irq(struct mshvr_hvsim_request *dispatch)
{
	u64 gpa = virt_to_phys(dispatch), seq = dispatch->seq;

	WRITE_ONCE(dispatch->root_irq, 1);
	hvsim_op(MSHVR_HVSIM_OP_ROOT_IRQ, &gpa, &seq, NULL);
}

/*
 * Send a request page of this CPU (op and arguments filled in) and wait for
 * the answer. req: interrupts must be off. dispatch (@irqs_on): a task with
 * preemption off and interrupts on, which the waiting CPU keeps taking.
 */
static int hvsim_call(struct mshvr_hvsim_request *req, bool irqs_on)
{
	unsigned int cpu = smp_processor_id();
	phys_addr_t pa = virt_to_phys(req);
	u64 start = ktime_get_ns();
	unsigned long irqs = 0;
	bool told = false;

	if (irqs_on) {
		lockdep_assert_irqs_enabled();
		lockdep_assert_preemption_disabled();
		irqs = hvsim_irqs_taken();
	} else {
		lockdep_assert_irqs_disabled();
	}
	req->flags = irqs_on ? MSHVR_HVSIM_REQUEST_CALLER_IRQS_ENABLED : 0;
	req->root_irq = 0;
	req->rsvd1 = 0;
	req->seq++;
	WRITE_ONCE(req->cpu, cpu);
	WRITE_ONCE(req->state, MSHVR_HVSIM_STATE_PENDING);
	/* the request must be in RAM before the simulator is told */
	wmb();
	hvsim_ring((u32)pa | (cpu & HVSIM_CPU_MASK));
	while (READ_ONCE(req->state) != MSHVR_HVSIM_STATE_DONE) {
		cpu_relax();
		/* an interrupt since the snapshot: the dispatch must end */
		if (irqs_on && !told && hvsim_irqs_taken() != irqs) {
			told = true;
			hvsim_root_irq(req);
		}
		if (ktime_get_ns() - start > HVSIM_TIMEOUT_NS) {
			pr_err("hvsim: no answer to op %u on cpu %u\n", req->op, cpu);
			return -ETIMEDOUT;
		}
	}
	/* the answer must not be read before the state */
	rmb();
	return 0;
}

static u64 hvsim_hypercall(struct mshvr_hvsim_request *req, u64 control, void *input,
			   void *output, bool irqs_on)
{
	req->op = MSHVR_HVSIM_OP_HYPERCALL;
	req->control = control;
	req->input_gpa = virt_to_phys(input);
	req->output_gpa = virt_to_phys(output);
	req->result = MSHVR_HV_STATUS_TIME_OUT;
	if (hvsim_call(req, irqs_on))
		return MSHVR_HV_STATUS_TIME_OUT;
	return req->result;
}

u64 mshvr_seam_hypercall(u64 control, void *input, void *output)
{
	return hvsim_hypercall(hvsim_this_req(), control, input, output, false);
}

u64 mshvr_seam_hypercall_irqs_on(u64 control, void *input, void *output)
{
	return hvsim_hypercall(this_cpu_ptr(hvsim_cpus)->dispatch, control, input, output, true);
}

u64 mshvr_seam_hypercall_fast(u64 control, u64 in0, u64 in1)
{
	struct mshvr_hvsim_request *req;
	unsigned long flags;
	u64 result = MSHVR_HV_STATUS_TIME_OUT;

	local_irq_save(flags);
	req = hvsim_this_req();
	req->op = MSHVR_HVSIM_OP_HYPERCALL_FAST;
	req->control = control | MSHVR_HV_CONTROL_FAST_MASK;
	req->in0 = in0;
	req->in1 = in1;
	if (!hvsim_call(req, false))
		result = req->result;
	local_irq_restore(flags);
	return result;
}

/* A non-hypercall request from process or IRQ context. */
static int hvsim_op(u32 op, u64 *arg0, u64 *arg1, u64 *arg2)
{
	struct mshvr_hvsim_request *req;
	unsigned long flags;
	int ret;

	local_irq_save(flags);
	req = hvsim_this_req();
	req->op = op;
	req->arg0 = arg0 ? *arg0 : 0;
	req->arg1 = arg1 ? *arg1 : 0;
	req->arg2 = arg2 ? *arg2 : 0;
	ret = hvsim_call(req, false);
	if (!ret) {
		if (arg0)
			*arg0 = req->arg0;
		if (arg1)
			*arg1 = req->arg1;
		if (arg2)
			*arg2 = req->arg2;
	}
	local_irq_restore(flags);
	return ret;
}

/*
 * debugfs mshv_hvsim/query: the simulator's own report of what it holds
 * (partitions, deposited pages, mappings, hypercall counts), as JSON, so
 * tests inside the root can check that teardown left nothing behind.
 */
#define HVSIM_QUERY_ORDER	2
static struct dentry *hvsim_debugfs;

static int hvsim_query_show(struct seq_file *m, void *v)
{
	struct page *pg = alloc_pages(GFP_KERNEL | GFP_DMA32 | __GFP_ZERO, HVSIM_QUERY_ORDER);
	u64 gpa, size = PAGE_SIZE << HVSIM_QUERY_ORDER, len = 0;
	int ret;

	if (!pg)
		return -ENOMEM;
	gpa = page_to_phys(pg);
	ret = hvsim_op(MSHVR_HVSIM_OP_QUERY, &gpa, &size, &len);
	if (!ret)
		seq_write(m, page_address(pg), min(len, size));
	__free_pages(pg, HVSIM_QUERY_ORDER);
	return ret;
}
DEFINE_SHOW_ATTRIBUTE(hvsim_query);

/*
 * debugfs mshv_hvsim/control: a write is one command for the simulator's
 * fault injection (e.g. "fail_next map_gpa_pages HV_STATUS_INVALID_PARAMETER 2").
 */
static ssize_t hvsim_control_write(struct file *f, const char __user *ubuf, size_t len,
				   loff_t *ppos)
{
	unsigned long page;
	u64 gpa, size = len, err = 0;
	int ret;

	if (len == 0 || len >= PAGE_SIZE)
		return -EINVAL;
	page = get_zeroed_page(GFP_KERNEL | GFP_DMA32);
	if (!page)
		return -ENOMEM;
	if (copy_from_user((void *)page, ubuf, len)) {
		free_page(page);
		return -EFAULT;
	}
	gpa = virt_to_phys((void *)page);
	ret = hvsim_op(MSHVR_HVSIM_OP_CONTROL, &gpa, &size, &err);
	free_page(page);
	if (ret)
		return ret;
	return err ? -EINVAL : len;
}

static const struct file_operations hvsim_control_fops = {
	.owner = THIS_MODULE,
	.write = hvsim_control_write,
};

static void hvsim_free_pages(void)
{
	unsigned int cpu;

	if (!hvsim_cpus)
		return;
	for_each_possible_cpu(cpu) {
		struct hvsim_cpu *c = per_cpu_ptr(hvsim_cpus, cpu);

		if (c->req)
			free_page((unsigned long)c->req);
		if (c->dispatch)
			free_page((unsigned long)c->dispatch);
	}
	free_percpu(hvsim_cpus);
	hvsim_cpus = NULL;
}

int mshvr_seam_init(void)
{
	u64 magic = 0, version = 0, base = 0;
	unsigned int cpu;
	int ret;

	if (!request_region(MSHVR_HVSIM_IRQ_PORT, 8, "mshv-hvsim")) {
		pr_info("hvsim: notification port %#llx busy\n", MSHVR_HVSIM_IRQ_PORT);
		return -ENODEV;
	}
	hvsim_region = true;
	if (inb(MSHVR_HVSIM_DOORBELL_PORT) != MSHVR_HVSIM_DOORBELL_READBACK) {
		pr_info("not running under the hvsim simulator (no doorbell at %#llx)\n",
			MSHVR_HVSIM_DOORBELL_PORT);
		ret = -ENODEV;
		goto err;
	}
	hvsim_cpus = alloc_percpu(struct hvsim_cpu);
	if (!hvsim_cpus) {
		ret = -ENOMEM;
		goto err;
	}
	for_each_possible_cpu(cpu) {
		struct hvsim_cpu *c = per_cpu_ptr(hvsim_cpus, cpu);

		/* the doorbell word carries GPA bits 12..31: stay below 4 GiB */
		c->req = (void *)get_zeroed_page(GFP_KERNEL | GFP_DMA32);
		c->dispatch = (void *)get_zeroed_page(GFP_KERNEL | GFP_DMA32);
		if (!c->req || !c->dispatch) {
			ret = -ENOMEM;
			goto err;
		}
	}
	ret = hvsim_op(MSHVR_HVSIM_OP_HELLO, &magic, &version, &base);
	if (ret || magic != MSHVR_HVSIM_MAGIC || version != MSHVR_HVSIM_VERSION) {
		pr_info("hvsim: no simulator handshake (ret %d, magic %#llx, version %llu)\n",
			ret, magic, version);
		ret = -ENODEV;
		goto err;
	}
	hvsim_debugfs = debugfs_create_dir("mshv_hvsim", NULL);
	debugfs_create_file("query", 0400, hvsim_debugfs, NULL, &hvsim_query_fops);
	debugfs_create_file("control", 0200, hvsim_debugfs, NULL, &hvsim_control_fops);
	return 0;
err:
	mshvr_seam_exit();
	return ret;
}

void mshvr_seam_exit(void)
{
	debugfs_remove_recursive(hvsim_debugfs);
	hvsim_debugfs = NULL;
	hvsim_free_pages();
	if (hvsim_region)
		release_region(MSHVR_HVSIM_IRQ_PORT, 8);
	hvsim_region = false;
}

const char *mshvr_seam_name(void)
{
	return "hvsim";
}

/* Hard-IRQ context (IPI or our own interrupt), on the CPU of @info. */
static void hvsim_synic_call(void *info)
{
	struct hvsim_synic *s = info;

	while (atomic_xchg(&s->pending, 0))
		hvsim_handler(s - hvsim_synic, s->simp, s->siefp, s->sirbp);
}

/*
 * The UART interrupt names the CPU whose SynIC has news; its handler runs
 * there, one call at a time per CPU. An asynchronous call that is still
 * queued (-EBUSY) will see @pending; an offline CPU's messages are
 * handled here.
 */
static irqreturn_t hvsim_isr(int irq, void *dev)
{
	unsigned int n = 0;
	int ret;

	while (inb(MSHVR_HVSIM_IRQ_PORT + UART_LSR) & UART_LSR_DR) {
		unsigned int cpu = inb(MSHVR_HVSIM_IRQ_PORT + UART_RBR);

		n++;
		if (cpu >= nr_cpu_ids || !hvsim_synic[cpu].simp) {
			pr_warn_ratelimited("hvsim: notification for unknown cpu %u\n", cpu);
			continue;
		}
		atomic_set(&hvsim_synic[cpu].pending, 1);
		ret = smp_call_function_single_async(cpu, &hvsim_synic[cpu].csd);
		if (ret && ret != -EBUSY)
			hvsim_synic_call(&hvsim_synic[cpu]);
	}
	return n ? IRQ_HANDLED : IRQ_NONE;
}

static void hvsim_unmap_synic(void)
{
	unsigned int cpu;

	if (!hvsim_synic)
		return;
	/*
	 * No new call can be queued (the interrupt is gone). A queued call
	 * unlocks its csd when it starts; one that started has finished after
	 * a grace period (it runs with interrupts off).
	 */
	for_each_possible_cpu(cpu)
		while (smp_load_acquire(&hvsim_synic[cpu].csd.node.u_flags) & CSD_FLAG_LOCK)
			cpu_relax();
	synchronize_rcu();
	for_each_possible_cpu(cpu) {
		if (hvsim_synic[cpu].simp)
			memunmap(hvsim_synic[cpu].simp);
		if (hvsim_synic[cpu].siefp)
			memunmap(hvsim_synic[cpu].siefp);
		if (hvsim_synic[cpu].sirbp)
			memunmap(hvsim_synic[cpu].sirbp);
	}
	kfree(hvsim_synic);
	hvsim_synic = NULL;
}

int mshvr_seam_synic_init(mshvr_synic_handler_t handler)
{
	unsigned int cpu;
	int ret;

	hvsim_synic = kcalloc(nr_cpu_ids, sizeof(*hvsim_synic), GFP_KERNEL);
	if (!hvsim_synic)
		return -ENOMEM;
	for_each_possible_cpu(cpu) {
		u64 simp = cpu, siefp = 0, sirbp = 0;

		INIT_CSD(&hvsim_synic[cpu].csd, hvsim_synic_call, &hvsim_synic[cpu]);
		ret = hvsim_op(MSHVR_HVSIM_OP_SYNIC_PAGES, &simp, &siefp, &sirbp);
		if (ret)
			goto err;
		if (!simp || !siefp || !sirbp) {
			pr_err("hvsim: the simulator gave no SynIC pages for cpu %u\n", cpu);
			ret = -ENODEV;
			goto err;
		}
		hvsim_synic[cpu].simp = memremap(simp, PAGE_SIZE, MEMREMAP_WB);
		hvsim_synic[cpu].siefp = memremap(siefp, PAGE_SIZE, MEMREMAP_WB);
		hvsim_synic[cpu].sirbp = memremap(sirbp, PAGE_SIZE, MEMREMAP_WB);
		if (!hvsim_synic[cpu].simp || !hvsim_synic[cpu].siefp || !hvsim_synic[cpu].sirbp) {
			ret = -ENOMEM;
			goto err;
		}
	}
	hvsim_handler = handler;
	/* 8N1, no FIFO: one byte per interrupt, back-pressure in QEMU */
	outb(0x03, MSHVR_HVSIM_IRQ_PORT + UART_LCR);
	outb(0x00, MSHVR_HVSIM_IRQ_PORT + UART_IIR_FCR);
	outb(UART_MCR_DTR_RTS_OUT2, MSHVR_HVSIM_IRQ_PORT + UART_MCR);
	while (inb(MSHVR_HVSIM_IRQ_PORT + UART_LSR) & UART_LSR_DR)
		inb(MSHVR_HVSIM_IRQ_PORT + UART_RBR);
	inb(MSHVR_HVSIM_IRQ_PORT + UART_IIR_FCR);
	ret = request_irq(MSHVR_HVSIM_IRQ, hvsim_isr, 0, "mshv-hvsim", &hvsim_synic);
	if (ret)
		goto err;
	hvsim_irq_requested = true;
	outb(UART_IER_RDI, MSHVR_HVSIM_IRQ_PORT + UART_IER);
	return 0;
err:
	hvsim_unmap_synic();
	return ret;
}

void mshvr_seam_synic_exit(void)
{
	if (hvsim_irq_requested) {
		outb(0, MSHVR_HVSIM_IRQ_PORT + UART_IER);
		outb(0, MSHVR_HVSIM_IRQ_PORT + UART_MCR);
		free_irq(MSHVR_HVSIM_IRQ, &hvsim_synic);
		hvsim_irq_requested = false;
	}
	hvsim_unmap_synic();
}

void mshvr_seam_synic_eom(unsigned int cpu)
{
	u64 arg0 = cpu;

	hvsim_op(MSHVR_HVSIM_OP_EOM, &arg0, NULL, NULL);
}
