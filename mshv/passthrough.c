// SPDX-License-Identifier: GPL-2.0
/*
 * MSHV_ROOT_HVCALL: hypercalls a VMM issues through the driver. Only the
 * spec's allowlist passes; the kernel owns the partition id; buffers are
 * zeroed so no stale kernel data reaches user space; INSUFFICIENT_MEMORY is
 * handled here (deposit and retry) rather than handed to the VMM.
 */
#include "mshv_root.h"

#include <linux/slab.h>
#include <linux/uaccess.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"

/*
 * @pt is the fd's partition (NULL on /dev/mshv: the root); @locked says the
 * caller holds pt->lock (the partition fd), which asynchronous calls need.
 */
static long mshvr_passthrough(struct mshvr_partition *pt, bool locked, struct mshv_root_hvcall *a)
{
	u64 partition_id = pt ? pt->id : mshvr_root_partition_id();
	bool root_fd = !pt;
	const struct mshvr_hvcall_info *info = mshvr_hvcall_info(a->code);
	u32 reps = a->reps, comp = 0, rep_max;
	unsigned int attempt = 0;
	void *in = NULL, *out = NULL, *hin, *hout;
	unsigned long flags;
	u16 status;
	u64 result;
	long ret = 0;

	if (!info || info->passthrough == MSHVR_PASSTHROUGH_NONE ||
	    (root_fd && info->passthrough != MSHVR_PASSTHROUGH_ROOT_AND_PARTITION))
		return -EINVAL;
	rep_max = (MSHVR_HV_CONTROL_REP_COUNT_MASK >> MSHVR_HV_CONTROL_REP_COUNT_SHIFT);
	if (a->in_sz < sizeof(u64) || (a->out_ptr && !a->out_sz) || (!a->out_ptr && a->out_sz) ||
	    (info->rep ? (!reps || reps > rep_max) : reps))
		return -EINVAL;
	/* a completion message is matched to its partition: one at a time */
	if (info->async && !locked)
		return -EINVAL;
	/* the rep output must fit the one output page the call gets */
	if (info->rep && (u64)reps * info->rep_out_size > PAGE_SIZE)
		return -EINVAL;

	in = kzalloc(PAGE_SIZE, GFP_KERNEL);
	out = kzalloc(PAGE_SIZE, GFP_KERNEL);
	if (!in || !out) {
		ret = -ENOMEM;
		goto free;
	}
	if (copy_from_user(in, u64_to_user_ptr(a->in_ptr), a->in_sz)) {
		ret = -EFAULT;
		goto free;
	}
	/* every allowed call starts with the partition id: the fd decides it */
	*(u64 *)in = partition_id;

	if (info->async)
		reinit_completion(&pt->async_done);
	for (;;) {
		hin = mshvr_hvcall_begin(&flags, &hout);
		memcpy(hin, in, PAGE_SIZE);
		memset(hout, 0, PAGE_SIZE);
		result = mshvr_seam_hypercall(a->code |
					      ((u64)reps << MSHVR_HV_CONTROL_REP_COUNT_SHIFT) |
					      ((u64)comp << MSHVR_HV_CONTROL_REP_START_SHIFT),
					      hin, hout);
		status = mshvr_hv_result_status(result);
		/* output for the reps done so far (rep calls) or the whole output */
		if (info->rep) {
			u32 now = mshvr_hv_result_reps(result);

			if (now > comp && now <= reps)
				memcpy((u8 *)out + comp * info->rep_out_size,
				       (u8 *)hout + comp * info->rep_out_size,
				       (now - comp) * info->rep_out_size);
		} else if (status == MSHVR_HV_STATUS_SUCCESS) {
			memcpy(out, hout, PAGE_SIZE);
		}
		mshvr_hvcall_end(flags);
		if (info->rep && mshvr_hv_result_reps(result) > comp &&
		    mshvr_hv_result_reps(result) <= reps)
			comp = mshvr_hv_result_reps(result);
		if (status == MSHVR_HV_STATUS_SUCCESS) {
			if (!info->rep || comp == reps)
				break;
			continue;	/* partial completion: resume */
		}
		if (!mshvr_hv_status_needs_memory(status))
			break;
		ret = mshvr_hv_deposit_on_status(status, partition_id, false,
						 info->deposit ? info->deposit_retry : 1, &attempt);
		if (ret)
			break;
	}
	if (status == MSHVR_HV_STATUS_CALL_PENDING) {
		if (!info->async) {
			pr_warn_ratelimited("hypercall %s: unexpected CALL_PENDING\n", info->name);
			ret = -EBADFD;
		} else if (wait_for_completion_killable(&pt->async_done)) {
			ret = -EINTR;
		} else {
			status = READ_ONCE(pt->async_status);
		}
	}
	a->status = status;
	a->reps = info->rep ? comp : 0;
	if (a->out_sz &&
	    copy_to_user(u64_to_user_ptr(a->out_ptr), out, min_t(u32, a->out_sz, PAGE_SIZE)))
		ret = -EFAULT;
	if (!ret && status != MSHVR_HV_STATUS_SUCCESS)
		ret = mshvr_hv_status_to_errno(status);
free:
	kfree(in);
	kfree(out);
	return ret;
}

long mshv_dev_ioctl_root_hvcall(struct file *ctx, struct mshv_root_hvcall *arg)
{
	return mshvr_passthrough(NULL, false, arg);
}

long mshv_partition_ioctl_root_hvcall(struct mshvr_partition *pt, struct mshv_root_hvcall *arg)
{
	return mshvr_passthrough(pt, true, arg);
}

long mshv_vp_ioctl_root_hvcall(struct mshvr_vp *vp, struct mshv_root_hvcall *arg)
{
	return mshvr_passthrough(vp->partition, false, arg);
}
