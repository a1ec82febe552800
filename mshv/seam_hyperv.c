// SPDX-License-Identifier: GPL-2.0
/*
 * Production seam: a real Hyper-V root partition. Hypercalls go through the
 * kernel's hypercall page (hv_do_hypercall and the fast variant). SynIC:
 * the hypervisor provides each CPU's message and event-flags pages to the
 * root; this file enables them and SINT0 on HYPERVISOR_CALLBACK_VECTOR, per
 * CPU through cpuhp.
 *
 * Limitation: kernels before 6.15 have no hook of their own for the mshv
 * driver in the Hyper-V callback vector, so the vmbus hook is used; the
 * module cannot share a root with hv_vmbus on those kernels.
 */
#include "mshv_root.h"

#include <linux/cpuhotplug.h>
#include <linux/errno.h>
#include <linux/io.h>
#include <linux/percpu.h>
#include <linux/printk.h>
#include <asm/hypervisor.h>
#include <asm/mshyperv.h>
#include <asm/processor.h>

#include "mshvr_hv_types.h"
#include "seam.h"

/* CPUID 0x40000003 EBX holds bits 63:32 of the partition privilege mask. */
#define MSHVR_PRIV_HIGH(m)	((u32)((m) >> 32))

static bool mshvr_cpuid_is_root(void)
{
	u32 eax, ebx, ecx, edx;
	u32 need = MSHVR_PRIV_HIGH(MSHVR_HV_PARTITION_PRIVILEGE_CREATE_PARTITIONS |
				   MSHVR_HV_PARTITION_PRIVILEGE_CPU_MANAGEMENT);
	u32 isolated = MSHVR_PRIV_HIGH(MSHVR_HV_PARTITION_PRIVILEGE_ISOLATION);

	if (!boot_cpu_has(X86_FEATURE_HYPERVISOR))
		return false;
	cpuid(MSHVR_HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS, &eax, &ebx, &ecx, &edx);
	if (eax < MSHVR_HYPERV_CPUID_FEATURES)
		return false;
	cpuid(MSHVR_HYPERV_CPUID_INTERFACE, &eax, &ebx, &ecx, &edx);
	if (eax != MSHVR_HV_CPUID_INTERFACE_SIGNATURE_HV1)
		return false;
	cpuid(MSHVR_HYPERV_CPUID_FEATURES, &eax, &ebx, &ecx, &edx);
	return (ebx & need) == need && !(ebx & isolated);
}

int mshvr_seam_init(void)
{
	if (!mshvr_cpuid_is_root()) {
		pr_info("not running as a Hyper-V root partition (no CreatePartitions and CpuManagement privilege)\n");
		return -ENODEV;
	}
	if (!hv_hypercall_pg) {
		pr_info("Hyper-V root partition without a hypercall page\n");
		return -ENODEV;
	}
	return 0;
}

void mshvr_seam_exit(void)
{
}

const char *mshvr_seam_name(void)
{
	return "hyperv";
}

u64 mshvr_seam_hypercall(u64 control, void *input, void *output)
{
	return hv_do_hypercall(control, input, output);
}

u64 mshvr_seam_hypercall_irqs_on(u64 control, void *input, void *output)
{
	/* the hypervisor returns to the root for each of its interrupts */
	return hv_do_hypercall(control, input, output);
}

u64 mshvr_seam_hypercall_fast(u64 control, u64 in0, u64 in1)
{
	/* hv_do_fast_hypercall16 sets the fast bit itself */
	return hv_do_fast_hypercall16((u16)(control & MSHVR_HV_CONTROL_CALL_CODE_MASK),
				      in0, in1);
}

/* Per-CPU SynIC state; written by the cpuhp callbacks of that CPU only. */
struct hyperv_synic {
	void *simp;
	void *siefp;
	void *sirbp;
};
static DEFINE_PER_CPU(struct hyperv_synic, hyperv_synic);
static mshvr_synic_handler_t hyperv_handler;
static int hyperv_cpuhp_state = -1;

#define SINT_F(f)	MSHVR_HV_SYNIC_SINT_VALUE_##f##_MASK
#define PAGE_F(f)	MSHVR_HV_SYNIC_PAGE_MSR_VALUE_##f##_MASK

static void *hyperv_map_synic_page(u32 msr)
{
	u64 v;
	void *page;

	rdmsrl(msr, v);
	page = memremap((v & PAGE_F(BASE_GPFN)), PAGE_SIZE, MEMREMAP_WB);
	if (page)
		wrmsrl(msr, v | PAGE_F(ENABLE));
	return page;
}

static void hyperv_unmap_synic_page(u32 msr, void *page)
{
	u64 v;

	if (!page)
		return;
	rdmsrl(msr, v);
	wrmsrl(msr, v & ~PAGE_F(ENABLE));
	memunmap(page);
}

static void hyperv_setup_sint(u32 msr, bool as_intercept)
{
	u64 v;

	rdmsrl(msr, v);
	v &= ~(SINT_F(VECTOR) | SINT_F(MASKED) | SINT_F(AUTO_EOI) | SINT_F(AS_INTERCEPT));
	v |= HYPERVISOR_CALLBACK_VECTOR;
	if (!(ms_hyperv.hints & MSHVR_HV_DEPRECATING_AEOI_RECOMMENDED))
		v |= SINT_F(AUTO_EOI);
	if (as_intercept)
		v |= SINT_F(AS_INTERCEPT);
	wrmsrl(msr, v);
}

static int hyperv_synic_cpu_up(unsigned int cpu)
{
	struct hyperv_synic *s = this_cpu_ptr(&hyperv_synic);
	u64 v;

	s->simp = hyperv_map_synic_page(MSHVR_HV_X64_MSR_SIMP);
	s->siefp = hyperv_map_synic_page(MSHVR_HV_X64_MSR_SIEFP);
	/* the root's event ring page is supplied by the hypervisor, like SIMP */
	s->sirbp = hyperv_map_synic_page(MSHVR_HV_X64_MSR_SIRBP);
	if (!s->simp || !s->siefp || !s->sirbp) {
		hyperv_unmap_synic_page(MSHVR_HV_X64_MSR_SIMP, s->simp);
		hyperv_unmap_synic_page(MSHVR_HV_X64_MSR_SIEFP, s->siefp);
		hyperv_unmap_synic_page(MSHVR_HV_X64_MSR_SIRBP, s->sirbp);
		s->simp = s->siefp = s->sirbp = NULL;
		return -EFAULT;
	}
	hyperv_setup_sint(MSHVR_HV_X64_MSR_SINT0, false);
	/* doorbells: event ring entries announced as SINT0 messages */
	hyperv_setup_sint(MSHVR_HV_X64_MSR_SINT0 + MSHVR_HV_SYNIC_DOORBELL_SINT_INDEX, true);
	rdmsrl(MSHVR_HV_X64_MSR_SCONTROL, v);
	wrmsrl(MSHVR_HV_X64_MSR_SCONTROL, v | MSHVR_HV_SYNIC_SCONTROL_VALUE_ENABLE_MASK);
	return 0;
}

static int hyperv_synic_cpu_down(unsigned int cpu)
{
	struct hyperv_synic *s = this_cpu_ptr(&hyperv_synic);
	u64 v;

	rdmsrl(MSHVR_HV_X64_MSR_SINT0, v);
	wrmsrl(MSHVR_HV_X64_MSR_SINT0, v | SINT_F(MASKED));
	rdmsrl(MSHVR_HV_X64_MSR_SINT0 + MSHVR_HV_SYNIC_DOORBELL_SINT_INDEX, v);
	wrmsrl(MSHVR_HV_X64_MSR_SINT0 + MSHVR_HV_SYNIC_DOORBELL_SINT_INDEX, v | SINT_F(MASKED));
	hyperv_unmap_synic_page(MSHVR_HV_X64_MSR_SIMP, s->simp);
	hyperv_unmap_synic_page(MSHVR_HV_X64_MSR_SIEFP, s->siefp);
	hyperv_unmap_synic_page(MSHVR_HV_X64_MSR_SIRBP, s->sirbp);
	s->simp = s->siefp = s->sirbp = NULL;
	return 0;
}

/* Runs in the Hyper-V callback vector, on the CPU that took it. */
static void hyperv_synic_isr(void)
{
	struct hyperv_synic *s = this_cpu_ptr(&hyperv_synic);

	if (s->simp)
		hyperv_handler(smp_processor_id(), s->simp, s->siefp, s->sirbp);
}

int mshvr_seam_synic_init(mshvr_synic_handler_t handler)
{
	int ret;

	hyperv_handler = handler;
	ret = cpuhp_setup_state(CPUHP_AP_ONLINE_DYN, "mshv_root/synic:online",
				hyperv_synic_cpu_up, hyperv_synic_cpu_down);
	if (ret < 0)
		return ret;
	hyperv_cpuhp_state = ret;
	hv_setup_vmbus_handler(hyperv_synic_isr);
	return 0;
}

void mshvr_seam_synic_exit(void)
{
	if (hyperv_cpuhp_state < 0)
		return;
	hv_remove_vmbus_handler();
	cpuhp_remove_state(hyperv_cpuhp_state);
	hyperv_cpuhp_state = -1;
}

void mshvr_seam_synic_eom(unsigned int cpu)
{
	/* the hypervisor delivers the next message to this CPU's page */
	wrmsrl(MSHVR_HV_X64_MSR_EOM, 0);
}
