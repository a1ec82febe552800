// SPDX-License-Identifier: GPL-2.0
/*
 * Virtual processors: creation, the VP fd, its mmap of the state pages, and
 * the run loop in both scheduler modes.
 */
#include "mshv_root.h"

#include <linux/anon_inodes.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/io.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"

int mshvr_set_vp_register(struct mshvr_partition *pt, u32 vp_index, u32 name, u64 value)
{
	struct mshvr_hv_register_assoc a = { .name = name, .value.low = value };

	return mshvr_hvcall_set_vp_registers(pt->id, vp_index, 0, &a, 1, NULL, NULL);
}

int mshvr_get_vp_register(struct mshvr_partition *pt, u32 vp_index, u32 name, u64 *value)
{
	struct mshvr_hv_register_value v;
	int ret;

	ret = mshvr_hvcall_get_vp_registers(pt->id, vp_index, 0, &name, &v, 1, NULL, NULL);
	if (!ret)
		*value = v.low;
	return ret;
}

static int mshvr_map_state_page(struct mshvr_partition *pt, u32 index, u16 type,
				u64 *pfn, void **page)
{
	struct mshvr_hv_output_map_location out;
	int ret;

	ret = mshvr_hvcall_map_vp_state_page(pt->id, index, type, 0, 0, 0, &out, NULL);
	if (ret)
		return ret;
	*pfn = out.map_location;
	*page = memremap(*pfn << PAGE_SHIFT, PAGE_SIZE, MEMREMAP_WB);
	if (!*page) {
		mshvr_hvcall_unmap_vp_state_page(pt->id, index, type, 0, NULL);
		return -ENOMEM;
	}
	return 0;
}

static void mshvr_unmap_state_page(struct mshvr_partition *pt, u32 index, u16 type, void *page)
{
	if (!page)
		return;
	memunmap(page);
	if (mshvr_hvcall_unmap_vp_state_page(pt->id, index, type, 0, NULL))
		pr_err("partition %llu vp %u: state page %u not unmapped\n", pt->id, index, type);
}

/* Release the VP's hypervisor pages and free it; the hypervisor VP itself
 * goes away with FinalizePartition, or with DeleteVp when @delete is set.
 */
static void mshvr_vp_free(struct mshvr_vp *vp, bool delete)
{
	struct mshvr_partition *pt = vp->partition;

	mshvr_unmap_state_page(pt, vp->index, MSHVR_HV_VP_STATE_PAGE_REGISTERS, vp->reg_page);
	mshvr_unmap_state_page(pt, vp->index, MSHVR_HV_VP_STATE_PAGE_INTERCEPT_MESSAGE,
			       vp->msg_page);
	if (delete && mshvr_hvcall_delete_vp(pt->id, vp->index, NULL))
		pr_err("partition %llu vp %u: delete failed\n", pt->id, vp->index);
	mutex_destroy(&vp->lock);
	kmem_cache_free(mshvr_vp_cache, vp);
}

void mshvr_vp_destroy(struct mshvr_vp *vp)
{
	mshvr_vp_free(vp, false);
}

void mshvr_vp_kick(u64 partition_id, u32 vp_index)
{
	struct mshvr_partition *pt;
	struct mshvr_vp *vp;

	rcu_read_lock();
	pt = xa_load(&mshvr_partitions, partition_id);
	vp = pt ? xa_load(&pt->vps, vp_index) : NULL;
	if (vp) {
		atomic_set(&vp->kicked, 1);
		wake_up(&vp->wq);
	} else {
		pr_warn_ratelimited("kick for unknown vp %llu/%u\n", partition_id, vp_index);
	}
	rcu_read_unlock();
}

static long mshvr_vp_unlocked_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct mshvr_vp *vp = filp->private_data;
	long ret;

	if (mutex_lock_killable(&vp->lock))
		return -EINTR;
	ret = mshvr_ioctl_dispatch_vp(vp, cmd, arg);
	mutex_unlock(&vp->lock);
	return ret;
}

static int mshvr_vp_mmap(struct file *filp, struct vm_area_struct *vma)
{
	struct mshvr_vp *vp = filp->private_data;
	u64 pfn;

	switch (vma->vm_pgoff) {
	case MSHV_VP_MMAP_OFFSET_REGISTERS:
		pfn = vp->reg_pfn;
		break;
	case MSHV_VP_MMAP_OFFSET_INTERCEPT_MESSAGE:
		pfn = vp->msg_pfn;
		break;
	default:
		return -EINVAL;
	}
	if (vma->vm_end - vma->vm_start != PAGE_SIZE)
		return -EINVAL;
	return remap_pfn_range(vma, vma->vm_start, pfn, PAGE_SIZE, vma->vm_page_prot);
}

static int mshvr_vp_release(struct inode *inode, struct file *filp)
{
	struct mshvr_vp *vp = filp->private_data;

	mshvr_partition_put(vp->partition);
	return 0;
}

static const struct file_operations mshvr_vp_fops = {
	.owner = THIS_MODULE,
	.release = mshvr_vp_release,
	.unlocked_ioctl = mshvr_vp_unlocked_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = mshvr_vp_mmap,
	.llseek = noop_llseek,
};

int mshvr_vp_create(struct mshvr_partition *pt, u32 index)
{
	struct mshvr_vp *vp;
	struct file *file;
	int fd, ret;

	if (index >= MSHVR_MAX_VPS)
		return -EINVAL;
	if (xa_load(&pt->vps, index))
		return -EEXIST;
	vp = kmem_cache_zalloc(mshvr_vp_cache, GFP_KERNEL);
	if (!vp)
		return -ENOMEM;
	vp->partition = pt;
	vp->index = index;
	mutex_init(&vp->lock);
	init_waitqueue_head(&vp->wq);

	ret = mshvr_hvcall_create_vp(pt->id, index, 0, 0, 0, 0, 0, NULL);
	if (ret) {
		kmem_cache_free(mshvr_vp_cache, vp);
		return ret;
	}
	ret = mshvr_map_state_page(pt, index, MSHVR_HV_VP_STATE_PAGE_INTERCEPT_MESSAGE,
				   &vp->msg_pfn, (void **)&vp->msg_page);
	if (ret)
		goto free;
	ret = mshvr_map_state_page(pt, index, MSHVR_HV_VP_STATE_PAGE_REGISTERS,
				   &vp->reg_pfn, (void **)&vp->reg_page);
	if (ret)
		goto free;
	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		ret = fd;
		goto free;
	}
	ret = xa_insert(&pt->vps, index, vp, GFP_KERNEL_ACCOUNT);
	if (ret)
		goto put_fd;
	refcount_inc(&pt->ref);		/* for the VP fd */
	file = anon_inode_getfile("mshv_vp", &mshvr_vp_fops, vp, O_RDWR);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		refcount_dec(&pt->ref);
		xa_erase(&pt->vps, index);
		synchronize_rcu();
		goto put_fd;
	}
	fd_install(fd, file);
	return fd;

put_fd:
	put_unused_fd(fd);
free:
	mshvr_vp_free(vp, true);
	return ret;
}

/* Root scheduler: this thread dispatches the VP until it intercepts. */
static long mshvr_run_root(struct mshvr_vp *vp)
{
	struct mshvr_partition *pt = vp->partition;
	struct mshvr_hv_output_dispatch_vp out;
	u32 flags;
	int ret;

	if (!vp->started) {
		ret = mshvr_set_vp_register(pt, vp->index, MSHVR_HV_REGISTER_EXPLICIT_SUSPEND, 0);
		if (ret)
			return ret;
		vp->started = true;
	}
	for (;;) {
		if (signal_pending(current))
			return -EINTR;
		cond_resched();
		flags = vp->intercept_pending ? MSHVR_HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND : 0;
		atomic_set(&vp->kicked, 0);
		ret = mshvr_hvcall_dispatch_vp(pt->id, vp->index, flags, 0, 0, &out, NULL);
		if (ret)
			return ret;
		vp->intercept_pending = false;
		if (out.dispatch_state == MSHVR_HV_VP_DISPATCH_STATE_READY &&
		    out.dispatch_event == MSHVR_HV_VP_DISPATCH_EVENT_INTERCEPT) {
			vp->intercept_pending = true;
			return 0;
		}
		if (out.dispatch_state == MSHVR_HV_VP_DISPATCH_STATE_BLOCKED) {
			/* halted or waiting: sleep until the hypervisor signals the VP */
			if (wait_event_interruptible(vp->wq, atomic_read(&vp->kicked)))
				return -EINTR;
		}
		/* READY without an intercept: the time slice ended, go again */
	}
}

/*
 * Hypervisor scheduler: release the VP (intercept suspend first, so a new
 * intercept cannot be lost) and sleep until the SynIC handler kicks it.
 */
static long mshvr_run_core(struct mshvr_vp *vp)
{
	struct mshvr_partition *pt = vp->partition;
	struct mshvr_hv_register_assoc regs[2] = {
		{ .name = MSHVR_HV_REGISTER_INTERCEPT_SUSPEND },
		{ .name = MSHVR_HV_REGISTER_EXPLICIT_SUSPEND },
	};
	u64 intercept;
	int ret;

	atomic_set(&vp->kicked, 0);
	ret = mshvr_hvcall_set_vp_registers(pt->id, vp->index, 0, regs, 2, NULL, NULL);
	if (ret)
		return ret;
	if (!wait_event_interruptible(vp->wq, atomic_read(&vp->kicked)))
		return 0;
	/* a signal: stop the VP, then see whether an intercept beat us */
	ret = mshvr_set_vp_register(pt, vp->index, MSHVR_HV_REGISTER_EXPLICIT_SUSPEND, 1);
	if (!ret)
		ret = mshvr_get_vp_register(pt, vp->index, MSHVR_HV_REGISTER_INTERCEPT_SUSPEND,
					    &intercept);
	if (ret)
		return ret;
	if (!intercept)
		return -EINTR;
	/* the message is on its way: it is the answer to this run */
	wait_event(vp->wq, atomic_read(&vp->kicked));
	return 0;
}

long mshv_vp_ioctl_run_vp(struct mshvr_vp *vp, struct mshv_run_vp *arg)
{
	long ret;

	if (mshvr_scheduler == MSHVR_HV_SCHEDULER_TYPE_ROOT)
		ret = mshvr_run_root(vp);
	else
		ret = mshvr_run_core(vp);
	if (ret)
		return ret;
	BUILD_BUG_ON(sizeof(arg->msg_buf) != sizeof(*vp->msg_page));
	memcpy(arg->msg_buf, vp->msg_page, sizeof(arg->msg_buf));
	return 0;
}

static int mshvr_get_partition_property(struct mshvr_partition *pt, u32 code, u64 *value)
{
	struct mshvr_hv_output_get_partition_property out;
	int ret;

	ret = mshvr_hvcall_get_partition_property(pt->id, code, &out, NULL);
	if (!ret)
		*value = out.property_value;
	return ret;
}

/* Largest state that goes to the hypervisor as a page list in one call */
#define MSHVR_VP_STATE_MAX_PAGES \
	((MSHVR_HV_PAGE_SIZE - sizeof(struct mshvr_hv_input_get_vp_state)) / sizeof(u64))

/*
 * MSHV_GET/SET_VP_STATE. buf_sz is overwritten with the state's size before
 * the buffer is checked, so a too-small buffer fails with -EINVAL and tells
 * the caller what it needs (the dispatch copies the argument back always).
 */
static long mshvr_vp_state(struct mshvr_vp *vp, struct mshv_get_set_vp_state *a, bool set)
{
	struct mshvr_partition *pt = vp->partition;
	struct mshvr_hv_synthetic_timers_state timers;
	u32 type = (u32)mshvr_map_mshv_vp_state(a->type);
	u64 size = PAGE_SIZE, xsave_states = 0, *pfns = NULL;
	u32 given = a->buf_sz, npages, i;
	struct page **pages = NULL;
	long ret;
	int pinned;

	if (a->type == MSHV_VP_STATE_SYNTHETIC_TIMERS) {
		size = sizeof(timers);
	} else if (a->type == MSHV_VP_STATE_XSAVE) {
		ret = mshvr_get_partition_property(pt, MSHVR_HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE,
						   &size);
		if (!ret)
			ret = mshvr_get_partition_property(pt, MSHVR_HV_PARTITION_PROPERTY_XSAVE_STATES,
							   &xsave_states);
		if (ret)
			return ret;
	}
	npages = DIV_ROUND_UP(size, PAGE_SIZE);
	a->buf_sz = size;
	if (!a->buf_ptr || !PAGE_ALIGNED(a->buf_ptr) || !PAGE_ALIGNED(given) ||
	    given < (u64)npages * PAGE_SIZE)
		return -EINVAL;

	if (a->type == MSHV_VP_STATE_SYNTHETIC_TIMERS) {
		if (set) {
			if (copy_from_user(&timers, u64_to_user_ptr(a->buf_ptr), sizeof(timers)))
				return -EFAULT;
			return mshvr_hvcall_set_vp_state(pt->id, vp->index, 0, type, 0, 0,
							 (u64 *)&timers,
							 DIV_ROUND_UP(sizeof(timers), sizeof(u64)), NULL);
		}
		ret = mshvr_hvcall_get_vp_state(pt->id, vp->index, 0, type, 0, 0, &timers,
						NULL, 0, NULL);
		if (!ret && copy_to_user(u64_to_user_ptr(a->buf_ptr), &timers, sizeof(timers)))
			ret = -EFAULT;
		return ret;
	}

	if (npages > MSHVR_VP_STATE_MAX_PAGES)
		return -E2BIG;
	pages = kcalloc(npages, sizeof(*pages), GFP_KERNEL);
	pfns = kcalloc(npages, sizeof(*pfns), GFP_KERNEL);
	if (!pages || !pfns) {
		ret = -ENOMEM;
		goto out;
	}
	/* the hypervisor reads (set) or writes (get) the user's pages directly */
	pinned = pin_user_pages_fast(a->buf_ptr, npages, set ? 0 : FOLL_WRITE, pages);
	if (pinned != npages) {
		ret = pinned < 0 ? pinned : -EFAULT;
		if (pinned > 0)
			unpin_user_pages(pages, pinned);
		goto out;
	}
	for (i = 0; i < npages; i++)
		pfns[i] = page_to_pfn(pages[i]);
	if (set) {
		ret = mshvr_hvcall_set_vp_state(pt->id, vp->index, 0, type, 0, xsave_states,
						pfns, npages, NULL);
	} else {
		ret = mshvr_hvcall_get_vp_state(pt->id, vp->index, 0, type, 0, xsave_states,
						&timers, pfns, npages, NULL);
	}
	unpin_user_pages_dirty_lock(pages, npages, !set);
out:
	kfree(pages);
	kfree(pfns);
	return ret;
}

long mshv_vp_ioctl_get_vp_state(struct mshvr_vp *vp, struct mshv_get_set_vp_state *arg)
{
	return mshvr_vp_state(vp, arg, false);
}

long mshv_vp_ioctl_set_vp_state(struct mshvr_vp *vp, struct mshv_get_set_vp_state *arg)
{
	return mshvr_vp_state(vp, arg, true);
}
