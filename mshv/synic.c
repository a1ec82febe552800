// SPDX-License-Identifier: GPL-2.0
/*
 * The root's SynIC: messages from the hypervisor on SINT0 of each CPU, and
 * the doorbell event ring.
 *
 * One message at a time sits in a CPU's SINT0 slot; its type picks the
 * handler:
 *   HVMSG_SYNIC_SINT_INTERCEPT   doorbells: drain the doorbell SINT's event
 *                                ring of that CPU, signal each port
 *   HVMSG_SCHEDULER_VP_SIGNAL_*  kick the VPs' run loops (root scheduler);
 *                                a BITSET with overflow kicks them all
 *   HVMSG_ASYNC_CALL_COMPLETION  wake the partition's waiting hypercall
 *   HVMSG_OPAQUE_INTERCEPT       kick the VP's run loop (core scheduler)
 *   HVMSG_X64_APIC_EOI           resample the irqfds of the EOIed vector
 * then the slot is freed (type NONE), and if the hypervisor marked more
 * pending, the end-of-message write asks for the next one. Partitions are
 * looked up under RCU (the handler runs in hard-IRQ context).
 */
#include "mshv_root.h"

#include <linux/bitops.h>
#include <linux/minmax.h>
#include <linux/percpu.h>

#include "mshvr_hvcall.h"
#include "seam.h"

/*
 * Our tail of each CPU's doorbell event ring: the next slot to take. Only
 * the handler for that CPU touches it, and those calls do not overlap.
 */
static DEFINE_PER_CPU(u8, mshvr_ring_tail);

#define MSHVR_RING_SLOTS	ARRAY_SIZE(((struct mshvr_hv_synic_event_ring *)0)->data)

/*
 * The next port id on @ring, 0 when it is empty. The hypervisor writes a
 * slot, we zero it; a full ring (ring_full) waits for NotifyPortRingEmpty
 * after we drained it. While we drain, signal_masked stops the hypervisor
 * from announcing each new entry; it is cleared, with one more look, when
 * the ring is empty.
 */
static u32 mshvr_ring_next(struct mshvr_hv_synic_event_ring *ring, u8 *tail)
{
	u32 port = READ_ONCE(ring->data[*tail]);

	if (!port) {
		if (READ_ONCE(ring->ring_full)) {
			WRITE_ONCE(ring->ring_full, 0);
			mshvr_hvcall_notify_port_ring_empty(MSHVR_HV_SYNIC_DOORBELL_SINT_INDEX, NULL);
			port = READ_ONCE(ring->data[*tail]);
		}
		if (!port) {
			WRITE_ONCE(ring->signal_masked, 0);
			mb();
			port = READ_ONCE(ring->data[*tail]);
			if (!port)
				return 0;
		}
		WRITE_ONCE(ring->signal_masked, 1);
	}
	WRITE_ONCE(ring->data[*tail], 0);
	*tail = (*tail + 1) % MSHVR_RING_SLOTS;
	return port;
}

static void mshvr_doorbells(unsigned int cpu, void *sirbp, u32 sint)
{
	struct mshvr_hv_synic_event_ring *ring;
	u8 *tail = per_cpu_ptr(&mshvr_ring_tail, cpu);
	u32 port;

	if (sint != MSHVR_HV_SYNIC_DOORBELL_SINT_INDEX || !sirbp) {
		pr_warn_ratelimited("SINT intercept for SINT %u on cpu %u\n", sint, cpu);
		return;
	}
	ring = (struct mshvr_hv_synic_event_ring *)sirbp + sint;
	while ((port = mshvr_ring_next(ring, tail)))
		mshvr_doorbell(port);
}

static void mshvr_apic_eoi(u64 partition_id, const struct mshvr_hv_x64_apic_eoi_message *m)
{
	struct mshvr_partition *pt;

	rcu_read_lock();
	pt = xa_load(&mshvr_partitions, partition_id);
	if (pt)
		mshvr_irqfd_eoi(pt, m->vp_index, m->interrupt_vector);
	rcu_read_unlock();
}

/*
 * Kick every VP of @partition_id: a scheduler message that cannot name its
 * VPs (signals lost to overflow, or a set format other than sparse 4K) means
 * any of them may have been signalled.
 */
static void mshvr_kick_all(u64 partition_id)
{
	struct mshvr_partition *pt;
	unsigned long index;
	void *vp;

	rcu_read_lock();
	pt = xa_load(&mshvr_partitions, partition_id);
	if (pt) {
		xa_for_each(&pt->vps, index, vp)
			mshvr_vp_kick(partition_id, index);
	}
	rcu_read_unlock();
}

static void mshvr_kick_bitset(const struct mshvr_hv_vp_signal_bitset_scheduler_message *m)
{
	unsigned int bank = 0, b;

	if (m->vpset_format != MSHVR_HV_GENERIC_SET_SPARSE_4K || m->overflow_count) {
		mshvr_kick_all(m->partition_id);
		return;
	}
	/* sparse 4K format: each set bit of the mask names a 64-VP bank */
	for (b = 0; b < 64 && bank < ARRAY_SIZE(m->bank_contents); b++) {
		u64 bits;

		if (!(m->valid_bank_mask & BIT_ULL(b)))
			continue;
		bits = m->bank_contents[bank++];
		while (bits) {
			unsigned int v = __ffs64(bits);

			bits &= bits - 1;
			mshvr_vp_kick(m->partition_id, b * 64 + v);
		}
	}
}

/* Hard-IRQ context, on behalf of root CPU @cpu (see seam.h). */
void mshvr_synic_isr(unsigned int cpu, void *simp, void *siefp, void *sirbp)
{
	struct mshvr_hv_message *msg = (struct mshvr_hv_message *)simp +
				       MSHVR_HV_SYNIC_INTERCEPTION_SINT_INDEX;
	u32 type = READ_ONCE(msg->header.message_type);

	if (type == MSHVR_HVMSG_NONE)
		return;
	switch (type) {
	case MSHVR_HVMSG_SYNIC_SINT_INTERCEPT: {
		const struct mshvr_hv_notification_message_payload *m = (const void *)msg->payload;

		mshvr_doorbells(cpu, sirbp, m->sint_index);
		break;
	}
	case MSHVR_HVMSG_X64_APIC_EOI:
		mshvr_apic_eoi(msg->header.sender, (const void *)msg->payload);
		break;
	case MSHVR_HVMSG_OPAQUE_INTERCEPT: {
		const struct mshvr_hv_opaque_intercept_message *m = (const void *)msg->payload;

		mshvr_vp_kick(msg->header.sender, m->vp_index);
		break;
	}
	case MSHVR_HVMSG_ASYNC_CALL_COMPLETION: {
		const struct mshvr_hv_async_completion_message *m = (const void *)msg->payload;

		mshvr_partition_async_done(m->partition_id, (u16)m->status);
		break;
	}
	case MSHVR_HVMSG_SCHEDULER_VP_SIGNAL_PAIR: {
		const struct mshvr_hv_vp_signal_pair_scheduler_message *m = (const void *)msg->payload;
		unsigned int i, n = min_t(unsigned int, m->vp_count, ARRAY_SIZE(m->vp_indexes));

		for (i = 0; i < n; i++)
			mshvr_vp_kick(m->partition_ids[i], m->vp_indexes[i]);
		break;
	}
	case MSHVR_HVMSG_SCHEDULER_VP_SIGNAL_BITSET:
		mshvr_kick_bitset((const void *)msg->payload);
		break;
	default:
		pr_warn_ratelimited("unexpected SynIC message %#x on cpu %u\n", type, cpu);
		break;
	}
	/* free the slot, then ask for the next queued message if any */
	WRITE_ONCE(msg->header.message_type, MSHVR_HVMSG_NONE);
	mb();
	if (READ_ONCE(msg->header.message_flags) &
	    MSHVR_HV_MESSAGE_HEADER_MESSAGE_FLAGS_MSG_PENDING_MASK)
		mshvr_seam_synic_eom(cpu);
}
