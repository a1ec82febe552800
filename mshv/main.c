// SPDX-License-Identifier: GPL-2.0
/*
 * mshv_root: /dev/mshv for Linux as the Microsoft Hyper-V root partition.
 *
 * Module entry, the /dev/mshv misc device and the fd plumbing. The ioctl
 * dispatch and argument checks are generated (gen/mshvr_ioctl.c); the
 * handlers below implement them.
 */
#include "mshv_root.h"

#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"
#include "seam.h"

/* /dev/mshv handlers */

long mshv_dev_ioctl_create_partition(struct file *ctx,
				     const struct mshv_create_partition_v2 *arg)
{
	return -EOPNOTSUPP;	/* partitions arrive with the driver issue */
}

long mshv_dev_ioctl_root_hvcall(struct file *ctx, struct mshv_root_hvcall *arg)
{
	return -EOPNOTSUPP;
}

/* partition fd handlers */

long mshv_partition_ioctl_initialize(struct mshvr_partition *ctx)
{
	return -EOPNOTSUPP;
}

long mshv_partition_ioctl_create_vp(struct mshvr_partition *ctx,
				    const struct mshv_create_vp *arg)
{
	return -EOPNOTSUPP;
}

long mshv_partition_ioctl_set_guest_memory(struct mshvr_partition *ctx,
					   const struct mshv_user_mem_region *arg)
{
	return -EOPNOTSUPP;
}

long mshv_partition_ioctl_irqfd(struct mshvr_partition *ctx, const struct mshv_user_irqfd *arg)
{
	return -EOPNOTSUPP;
}

long mshv_partition_ioctl_ioeventfd(struct mshvr_partition *ctx,
				    const struct mshv_user_ioeventfd *arg)
{
	return -EOPNOTSUPP;
}

long mshv_partition_ioctl_set_msi_routing(struct mshvr_partition *ctx,
					  const struct mshv_user_irq_table *arg)
{
	return -EOPNOTSUPP;
}

long mshv_partition_ioctl_get_gpap_access_bitmap(struct mshvr_partition *ctx,
						 struct mshv_gpap_access_bitmap *arg)
{
	return -EOPNOTSUPP;
}

long mshv_partition_ioctl_root_hvcall(struct mshvr_partition *ctx, struct mshv_root_hvcall *arg)
{
	return -EOPNOTSUPP;
}

/* VP fd handlers */

long mshv_vp_ioctl_run_vp(struct mshvr_vp *ctx, struct mshv_run_vp *arg)
{
	return -EOPNOTSUPP;
}

long mshv_vp_ioctl_get_vp_state(struct mshvr_vp *ctx, struct mshv_get_set_vp_state *arg)
{
	return -EOPNOTSUPP;
}

long mshv_vp_ioctl_set_vp_state(struct mshvr_vp *ctx, struct mshv_get_set_vp_state *arg)
{
	return -EOPNOTSUPP;
}

long mshv_vp_ioctl_root_hvcall(struct mshvr_vp *ctx, struct mshv_root_hvcall *arg)
{
	return -EOPNOTSUPP;
}

static long mshvr_dev_unlocked_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	return mshvr_ioctl_dispatch_dev(filp, cmd, arg);
}

static const struct file_operations mshvr_dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = mshvr_dev_unlocked_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice mshvr_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "mshv",
	.fops = &mshvr_dev_fops,
	.mode = 0600,
};

static int __init mshvr_init(void)
{
	int ret;

	ret = mshvr_seam_init();
	if (ret)
		return ret;
	ret = mshvr_hv_call_init();
	if (ret)
		goto seam_exit;
	ret = misc_register(&mshvr_dev);
	if (ret)
		goto hv_call_exit;
	pr_info("ready (%s), root partition id %llu\n", mshvr_seam_name(),
		mshvr_root_partition_id());
	return 0;

hv_call_exit:
	mshvr_hv_call_exit();
seam_exit:
	mshvr_seam_exit();
	return ret;
}

static void __exit mshvr_exit(void)
{
	misc_deregister(&mshvr_dev);
	mshvr_hv_call_exit();
	mshvr_seam_exit();
}

module_init(mshvr_init);
module_exit(mshvr_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Microsoft Hyper-V root partition VMM interface (/dev/mshv)");
