// SPDX-License-Identifier: GPL-2.0
/*
 * Partitions: creation, initialization, the partition fd and teardown.
 */
#include "mshv_root.h"

#include <linux/anon_inodes.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/slab.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"

/* hypervisor partition id -> struct mshvr_partition; RCU readers (ISR) */
DEFINE_XARRAY(mshvr_partitions);

/* Pages taken back per WithdrawMemory call: what one hypercall returns */
#define MSHVR_WITHDRAW_BATCH	MSHVR_HVCALL_WITHDRAW_MEMORY_REP_BATCH

/*
 * Take back every page deposited into @id's pool and free it. Returns 0 when
 * the pool is empty; on error the remaining pages stay with the hypervisor.
 */
static int mshvr_withdraw_all(u64 id)
{
	u64 *pfns;
	u32 done, i;
	u16 status;
	int ret;

	pfns = kmalloc_array(MSHVR_WITHDRAW_BATCH, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	do {
		done = 0;
		ret = mshvr_hvcall_withdraw_memory(id, 0, 0, pfns, MSHVR_WITHDRAW_BATCH,
						   &done, &status);
		for (i = 0; i < done; i++)
			__free_page(pfn_to_page(pfns[i]));
		if (ret && status == MSHVR_HV_STATUS_NO_RESOURCES)
			ret = 0;	/* the pool is empty */
	} while (!ret && done == MSHVR_WITHDRAW_BATCH);
	kfree(pfns);
	return ret;
}

/*
 * Tear a partition down: stop using its VPs' pages, unmap and unpin its
 * memory, finalize, withdraw and delete it. Every step is attempted; a step
 * whose failure would make freeing unsafe leaks that resource and says so.
 */
static void mshvr_partition_destroy(struct mshvr_partition *pt)
{
	struct mshvr_region *r, *tmp;
	struct mshvr_vp *vp;
	unsigned long idx;
	int ret;

	xa_erase(&mshvr_partitions, pt->id);
	/* no SynIC handler can see the partition or its VPs after this */
	synchronize_rcu();

	xa_for_each(&pt->vps, idx, vp) {
		/* hypervisor scheduler: make sure the VP is stopped before its pages go */
		if (mshvr_scheduler != MSHVR_HV_SCHEDULER_TYPE_ROOT &&
		    mshvr_set_vp_register(pt, vp->index, MSHVR_HV_REGISTER_EXPLICIT_SUSPEND, 1))
			pr_err("partition %llu vp %u: could not suspend for teardown\n",
			       pt->id, vp->index);
		xa_erase(&pt->vps, idx);
		mshvr_vp_destroy(vp);
	}
	list_for_each_entry_safe(r, tmp, &pt->regions, node)
		mshvr_region_destroy(pt, r, true);

	if (pt->initialized) {
		ret = mshvr_hvcall_finalize_partition(pt->id, NULL);
		if (ret)
			pr_err("partition %llu: finalize failed (%d)\n", pt->id, ret);
	}
	ret = mshvr_withdraw_all(pt->id);
	if (ret)
		pr_err("partition %llu: LEAK: deposited pages not withdrawn (%d)\n", pt->id, ret);
	ret = mshvr_hvcall_delete_partition(pt->id, NULL);
	if (ret)
		pr_err("partition %llu: LEAK: delete failed (%d)\n", pt->id, ret);
	xa_destroy(&pt->vps);
	mshvr_msi_table_free(pt);
	cleanup_srcu_struct(&pt->irq_srcu);
	mutex_destroy(&pt->resampler_lock);
	mutex_destroy(&pt->lock);
	kmem_cache_free(mshvr_partition_cache, pt);
}

/* SynIC handler: an asynchronous hypercall of @partition_id finished. */
void mshvr_partition_async_done(u64 partition_id, u16 status)
{
	struct mshvr_partition *pt;

	rcu_read_lock();
	pt = xa_load(&mshvr_partitions, partition_id);
	if (pt) {
		WRITE_ONCE(pt->async_status, status);
		complete(&pt->async_done);
	} else {
		pr_warn_ratelimited("async completion for unknown partition %llu\n", partition_id);
	}
	rcu_read_unlock();
}

void mshvr_partition_put(struct mshvr_partition *pt)
{
	if (refcount_dec_and_test(&pt->ref))
		mshvr_partition_destroy(pt);
}

static long mshvr_partition_unlocked_ioctl(struct file *filp, unsigned int cmd,
					   unsigned long arg)
{
	struct mshvr_partition *pt = filp->private_data;
	long ret;

	if (mutex_lock_killable(&pt->lock))
		return -EINTR;
	ret = mshvr_ioctl_dispatch_partition(pt, cmd, arg);
	mutex_unlock(&pt->lock);
	return ret;
}

static int mshvr_partition_release(struct inode *inode, struct file *filp)
{
	struct mshvr_partition *pt = filp->private_data;

	/* nothing can configure them any more: irqfds and doorbells go now */
	mshvr_irqfd_release(pt);
	mshvr_ioeventfd_release(pt);
	mshvr_partition_put(pt);
	return 0;
}

static const struct file_operations mshvr_partition_fops = {
	.owner = THIS_MODULE,
	.release = mshvr_partition_release,
	.unlocked_ioctl = mshvr_partition_unlocked_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

long mshvr_partition_create(const struct mshv_create_partition_v2 *arg)
{
	struct mshvr_hv_output_partition_id out;
	struct mshvr_partition *pt;
	u64 banks[MSHV_NUM_CPU_FEATURES_BANKS] = { 0 };
	u64 xsave = 0;
	struct file *file;
	int fd, ret;

	if (arg->pt_flags & (1ULL << MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES)) {
		banks[0] = arg->pt_cpu_fbanks[0];
		banks[1] = arg->pt_cpu_fbanks[1];
		xsave = arg->pt_disabled_xsave;
	}
	pt = kmem_cache_zalloc(mshvr_partition_cache, GFP_KERNEL);
	if (!pt)
		return -ENOMEM;
	refcount_set(&pt->ref, 1);
	mutex_init(&pt->lock);
	init_completion(&pt->async_done);
	INIT_LIST_HEAD(&pt->regions);
	xa_init(&pt->vps);
	spin_lock_init(&pt->irqfds_lock);
	INIT_LIST_HEAD(&pt->irqfds);
	mutex_init(&pt->resampler_lock);
	INIT_LIST_HEAD(&pt->resamplers);
	INIT_LIST_HEAD(&pt->ioeventfds);
	if (init_srcu_struct(&pt->irq_srcu)) {
		kmem_cache_free(mshvr_partition_cache, pt);
		return -ENOMEM;
	}
	pt->hv_flags = mshvr_map_mshv_pt_bit(arg->pt_flags);

	ret = mshvr_hvcall_create_partition(pt->hv_flags, 0, 0, MSHVR_HV_COMPATIBILITY_21_H2,
					    banks, xsave, 0, &out, NULL);
	if (ret) {
		cleanup_srcu_struct(&pt->irq_srcu);
		kmem_cache_free(mshvr_partition_cache, pt);
		return ret;
	}
	pt->id = out.partition_id;

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		ret = fd;
		goto delete;
	}
	ret = xa_insert(&mshvr_partitions, pt->id, pt, GFP_KERNEL);
	if (ret)
		goto put_fd;
	file = anon_inode_getfile("mshv_partition", &mshvr_partition_fops, pt, O_RDWR);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		goto erase;
	}
	fd_install(fd, file);
	return fd;

erase:
	xa_erase(&mshvr_partitions, pt->id);
	synchronize_rcu();
put_fd:
	put_unused_fd(fd);
delete:
	mshvr_hvcall_delete_partition(pt->id, NULL);
	cleanup_srcu_struct(&pt->irq_srcu);
	kmem_cache_free(mshvr_partition_cache, pt);
	return ret;
}

/* partition fd ioctl handlers; called with pt->lock held */

long mshv_partition_ioctl_initialize(struct mshvr_partition *pt)
{
	int ret;

	if (pt->initialized)
		return 0;
	ret = mshvr_hvcall_initialize_partition(pt->id, NULL);
	if (ret) {
		/* give back what the attempt deposited */
		if (mshvr_withdraw_all(pt->id))
			pr_err("partition %llu: LEAK: pages deposited for initialize not withdrawn\n",
			       pt->id);
		return ret;
	}
	pt->initialized = true;
	return 0;
}

long mshv_partition_ioctl_create_vp(struct mshvr_partition *pt, const struct mshv_create_vp *arg)
{
	return mshvr_vp_create(pt, arg->vp_index);
}

long mshv_partition_ioctl_set_guest_memory(struct mshvr_partition *pt,
					   const struct mshv_user_mem_region *arg)
{
	if (arg->flags & (1U << MSHV_SET_MEM_BIT_UNMAP))
		return mshvr_region_unmap(pt, arg);
	return mshvr_region_map(pt, arg);
}
