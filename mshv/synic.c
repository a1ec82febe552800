// SPDX-License-Identifier: GPL-2.0
/*
 * The root's SynIC: messages from the hypervisor on SINT0 of each CPU.
 */
#include "mshv_root.h"

#include <linux/bitops.h>
#include <linux/minmax.h>

#include "seam.h"

/* Hard-IRQ context, on behalf of root CPU @cpu (see seam.h). */
void mshvr_synic_isr(unsigned int cpu, void *simp, void *siefp)
{
	struct mshvr_hv_message *msg = (struct mshvr_hv_message *)simp +
				       MSHVR_HV_SYNIC_INTERCEPTION_SINT_INDEX;
	u32 type = READ_ONCE(msg->header.message_type);

	if (type == MSHVR_HVMSG_NONE)
		return;
	switch (type) {
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
	case MSHVR_HVMSG_SCHEDULER_VP_SIGNAL_BITSET: {
		const struct mshvr_hv_vp_signal_bitset_scheduler_message *m = (const void *)msg->payload;
		unsigned int bank = 0, b;

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
		break;
	}
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
