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
#include <linux/slab.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"
#include "seam.h"

/* HV_SCHEDULER_TYPE_* of the hypervisor; set once at load */
u32 mshvr_scheduler;

struct kmem_cache *mshvr_partition_cache;
struct kmem_cache *mshvr_vp_cache;
struct kmem_cache *mshvr_region_cache;
struct kmem_cache *mshvr_ioeventfd_cache;

static void mshvr_caches_exit(void)
{
	kmem_cache_destroy(mshvr_ioeventfd_cache);
	kmem_cache_destroy(mshvr_region_cache);
	kmem_cache_destroy(mshvr_vp_cache);
	kmem_cache_destroy(mshvr_partition_cache);
}

static int mshvr_caches_init(void)
{
	mshvr_partition_cache = KMEM_CACHE(mshvr_partition, SLAB_ACCOUNT);
	mshvr_vp_cache = KMEM_CACHE(mshvr_vp, SLAB_ACCOUNT);
	mshvr_region_cache = KMEM_CACHE(mshvr_region, SLAB_ACCOUNT);
	mshvr_ioeventfd_cache = mshvr_ioeventfd_cache_create();
	if (!mshvr_partition_cache || !mshvr_vp_cache || !mshvr_region_cache ||
	    !mshvr_ioeventfd_cache) {
		mshvr_caches_exit();
		return -ENOMEM;
	}
	return 0;
}

/* /dev/mshv handlers */

long mshv_dev_ioctl_create_partition(struct file *ctx,
				     const struct mshv_create_partition_v2 *arg)
{
	return mshvr_partition_create(arg);
}

static int mshvr_query_scheduler(void)
{
	struct mshvr_hv_output_get_system_property out;
	int ret;

	ret = mshvr_hvcall_get_system_property(MSHVR_HV_SYSTEM_PROPERTY_SCHEDULER_TYPE, 0,
					       &out, NULL);
	if (ret)
		return ret;
	mshvr_scheduler = (u32)out.value;
	switch (mshvr_scheduler) {
	case MSHVR_HV_SCHEDULER_TYPE_LP:
	case MSHVR_HV_SCHEDULER_TYPE_LP_SMT:
	case MSHVR_HV_SCHEDULER_TYPE_CORE_SMT:
	case MSHVR_HV_SCHEDULER_TYPE_ROOT:
		return 0;
	default:
		pr_err("unknown hypervisor scheduler type %u\n", mshvr_scheduler);
		return -ENODEV;
	}
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
	ret = mshvr_caches_init();
	if (ret)
		goto seam_exit;
	ret = mshvr_irq_init();
	if (ret)
		goto caches_exit;
	ret = mshvr_hv_call_init();
	if (ret)
		goto irq_exit;
	ret = mshvr_query_scheduler();
	if (ret)
		goto hv_call_exit;
	ret = mshvr_seam_synic_init(mshvr_synic_isr);
	if (ret)
		goto hv_call_exit;
	ret = misc_register(&mshvr_dev);
	if (ret)
		goto synic_exit;
	pr_info("ready (%s, %s scheduler), root partition id %llu\n", mshvr_seam_name(),
		mshvr_scheduler == MSHVR_HV_SCHEDULER_TYPE_ROOT ? "root" : "hypervisor",
		mshvr_root_partition_id());
	return 0;

synic_exit:
	mshvr_seam_synic_exit();
hv_call_exit:
	mshvr_hv_call_exit();
irq_exit:
	mshvr_irq_exit();
caches_exit:
	mshvr_caches_exit();
seam_exit:
	mshvr_seam_exit();
	return ret;
}

static void __exit mshvr_exit(void)
{
	misc_deregister(&mshvr_dev);
	mshvr_seam_synic_exit();
	mshvr_hv_call_exit();
	mshvr_irq_exit();
	mshvr_caches_exit();
	mshvr_seam_exit();
}

module_init(mshvr_init);
module_exit(mshvr_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Microsoft Hyper-V root partition VMM interface (/dev/mshv)");
