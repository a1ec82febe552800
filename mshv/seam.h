/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The seam: the one narrow interface between the driver and the hypervisor
 * transport. Two implementations exist, chosen at build time:
 *
 *   seam_hyperv.c  production: the kernel's Hyper-V hypercall page and MSRs
 *   seam_hvsim.c   tests only (make HVSIM=1): the hvsim simulator
 *
 * Everything above this interface (generated wrappers, deposits, ioctls,
 * memory, VPs, the run loop) is the same code in both builds.
 */
#ifndef _MSHVR_SEAM_H
#define _MSHVR_SEAM_H

#include <linux/types.h>

/*
 * Probe for a root partition. Returns 0 when the driver may run, -ENODEV
 * (after one clear log line) anywhere else.
 */
int mshvr_seam_init(void);
void mshvr_seam_exit(void);

/* Human-readable name of the implementation, for the load message. */
const char *mshvr_seam_name(void);

/*
 * Issue a memory-based hypercall. input and output are this CPU's hypercall
 * pages (physically contiguous, page aligned, from the driver's per-CPU
 * pages); the caller has interrupts disabled. Returns the raw result value.
 */
u64 mshvr_seam_hypercall(u64 control, void *input, void *output);

/*
 * Issue a memory-based hypercall that may keep the CPU for long (DispatchVp)
 * with interrupts enabled: the root takes its interrupts while the call
 * runs, and the hypervisor ends the call early when the root has one
 * pending. input and output are this CPU's dispatch pages, which only such
 * calls use; the caller is a task with preemption disabled and interrupts
 * enabled. Returns the raw result value.
 */
u64 mshvr_seam_hypercall_irqs_on(u64 control, void *input, void *output);

/* Issue a register-based (fast) hypercall with up to 16 bytes of input. */
u64 mshvr_seam_hypercall_fast(u64 control, u64 in0, u64 in1);

/*
 * SynIC notifications. The seam calls @handler in hard-IRQ context when the
 * SynIC message page of root CPU @cpu may hold a new message; @simp is that
 * page (16 slots of struct mshvr_hv_message, one per SINT), @siefp its
 * event-flags page and @sirbp its event ring page (16 struct
 * mshvr_hv_synic_event_ring). The handler consumes the SINT0 slot and calls
 * mshvr_seam_synic_eom(@cpu) when the hypervisor has more queued. Calls for
 * one @cpu never run concurrently. SINT HV_SYNIC_DOORBELL_SINT_INDEX is
 * set up "as intercept": its event ring entries are announced with
 * HVMSG_SYNIC_SINT_INTERCEPT on SINT0.
 */
typedef void (*mshvr_synic_handler_t)(unsigned int cpu, void *simp, void *siefp, void *sirbp);

int mshvr_seam_synic_init(mshvr_synic_handler_t handler);
void mshvr_seam_synic_exit(void);
void mshvr_seam_synic_eom(unsigned int cpu);

#endif /* _MSHVR_SEAM_H */
