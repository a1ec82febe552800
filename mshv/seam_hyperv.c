// SPDX-License-Identifier: GPL-2.0
/*
 * Production seam: a real Hyper-V root partition. Hypercalls go through the
 * kernel's hypercall page (hv_do_hypercall and the fast variant).
 */
#include <linux/errno.h>
#include <linux/printk.h>
#include <asm/hypervisor.h>
#include <asm/mshyperv.h>
#include <asm/processor.h>

#include "mshv_root.h"
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

u64 mshvr_seam_hypercall_fast(u64 control, u64 in0, u64 in1)
{
	/* hv_do_fast_hypercall16 sets the fast bit itself */
	return hv_do_fast_hypercall16((u16)(control & MSHVR_HV_CONTROL_CALL_CODE_MASK),
				      in0, in1);
}
