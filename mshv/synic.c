// SPDX-License-Identifier: GPL-2.0
/*
 * The root's SynIC: messages from the hypervisor on SINT0 of each CPU.
 */
#include "mshv_root.h"

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
