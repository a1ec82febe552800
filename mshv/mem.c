// SPDX-License-Identifier: GPL-2.0
/*
 * Guest memory: user memory pinned and mapped into a partition's GPA space.
 *
 * A region is mapped in runs: a run of 2 MiB pages (GFN, PFN and length
 * 2 MiB aligned, physically contiguous, partition created with GPA super
 * pages) goes to the hypervisor with HV_MAP_GPA_LARGE_PAGE and one frame
 * number per 2 MiB; anything else in 4 KiB pages. All under partition->lock.
 *
 * A VM_IO/VM_PFNMAP mapping (a device BAR mmapped through sysfs or VFIO) is
 * MMIO: mapped uncached, never pinned. Its host frame is taken from
 * vma->vm_pgoff, the convention those mmap implementations follow; a range
 * that contains RAM is refused.
 */
#include "mshv_root.h"

#include <linux/ioport.h>
#include <linux/mm.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"

static bool mshvr_region_large_at(const struct mshvr_partition *pt,
				  const struct mshvr_region *r, u64 i)
{
	unsigned long pfn;
	u64 k;

	if (!r->pages ||
	    !(pt->hv_flags & MSHVR_HV_PARTITION_CREATION_FLAG_GPA_SUPER_PAGES_ENABLED))
		return false;
	if ((r->start_gfn + i) % MSHVR_LARGE_PAGES || i + MSHVR_LARGE_PAGES > r->nr_pages)
		return false;
	pfn = page_to_pfn(r->pages[i]);
	if (pfn % MSHVR_LARGE_PAGES)
		return false;
	for (k = 1; k < MSHVR_LARGE_PAGES; k++)
		if (page_to_pfn(r->pages[i + k]) != pfn + k)
			return false;
	return true;
}

/* End (exclusive, in pages) of the run of same-sized pages starting at @i. */
static u64 mshvr_region_run(const struct mshvr_partition *pt, const struct mshvr_region *r,
			    u64 i, u64 limit, bool *large)
{
	u64 j = i;

	*large = mshvr_region_large_at(pt, r, i);
	while (j < limit && mshvr_region_large_at(pt, r, j) == *large)
		j += *large ? MSHVR_LARGE_PAGES : 1;
	return min(j, limit);
}

/* Unmap the first @limit pages of @r from the hypervisor. */
static int mshvr_region_hv_unmap(struct mshvr_partition *pt, struct mshvr_region *r, u64 limit)
{
	u64 i = 0, j;
	bool large;
	int ret, err = 0;

	while (i < limit) {
		j = mshvr_region_run(pt, r, i, limit, &large);
		if (large)
			ret = mshvr_hvcall_unmap_gpa_pages(pt->id, r->start_gfn + i,
							   MSHVR_HV_UNMAP_GPA_LARGE_PAGE,
							   (j - i) / MSHVR_LARGE_PAGES, NULL, NULL);
		else
			ret = mshvr_hvcall_unmap_gpa_pages(pt->id, r->start_gfn + i, 0,
							   j - i, NULL, NULL);
		if (ret && !err)
			err = ret;
		i = j;
	}
	return err;
}

/* Frame numbers per MapGpaPages call: exactly one hypercall's worth, so the
 * buffer is one page whatever the size of the region.
 */
#define MSHVR_MAP_BATCH		MSHVR_HVCALL_MAP_GPA_PAGES_REP_BATCH

/* Map @r into the hypervisor; on failure unmap what was mapped. */
static int mshvr_region_hv_map(struct mshvr_partition *pt, struct mshvr_region *r)
{
	u64 *pfns, i = 0, j, k, step;
	u32 n, done;
	bool large;
	int ret = 0;

	pfns = kmalloc_array(MSHVR_MAP_BATCH, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	while (i < r->nr_pages) {
		/* the next run of same-sized pages, at most one batch of it */
		j = mshvr_region_run(pt, r, i, r->nr_pages, &large);
		step = large ? MSHVR_LARGE_PAGES : 1;
		j = min(j, i + MSHVR_MAP_BATCH * step);
		n = 0;
		for (k = i; k < j; k += step)
			pfns[n++] = r->pages ? page_to_pfn(r->pages[k]) : r->mmio_pfn + k;
		done = 0;
		ret = mshvr_hvcall_map_gpa_pages(pt->id, r->start_gfn + i,
						 r->hv_flags | (large ? MSHVR_HV_MAP_GPA_LARGE_PAGE : 0),
						 pfns, n, &done, NULL);
		if (ret) {
			/* undo exactly what is mapped: the batches before, and part of this one */
			if (mshvr_region_hv_unmap(pt, r, i + (u64)done * step))
				pr_err("partition %llu: unmap after failed map failed\n", pt->id);
			break;
		}
		i = j;
		cond_resched();
	}
	kfree(pfns);
	return ret;
}

/*
 * The array of pinned pages of an @nr-page region, zeroed. kvmalloc refuses
 * (with a WARN) anything above INT_MAX bytes, a region of 1 TiB: larger
 * arrays come from vmalloc. Failure is -ENOMEM for the caller, never a
 * splat: the size is the VMM's to choose.
 */
static struct page **mshvr_alloc_page_array(u64 nr)
{
	size_t bytes;

	if (nr > SIZE_MAX / sizeof(struct page *))
		return NULL;
	bytes = nr * sizeof(struct page *);
	if (bytes <= INT_MAX)
		return kvzalloc(bytes, GFP_KERNEL_ACCOUNT | __GFP_NOWARN);
	return __vmalloc(bytes, GFP_KERNEL_ACCOUNT | __GFP_ZERO | __GFP_NOWARN);
}

static void mshvr_region_free(struct mshvr_region *r, u64 pinned)
{
	if (pinned && r->pages)
		unpin_user_pages_dirty_lock(r->pages, pinned,
					    r->hv_flags & MSHVR_HV_MAP_GPA_WRITABLE);
	kvfree(r->pages);
	kmem_cache_free(mshvr_region_cache, r);
}

void mshvr_region_destroy(struct mshvr_partition *pt, struct mshvr_region *r, bool hv_unmap)
{
	list_del(&r->node);
	if (hv_unmap && mshvr_region_hv_unmap(pt, r, r->nr_pages)) {
		/* the hypervisor may still map these pages: never unpin them */
		pr_err("partition %llu: LEAK: %llu pinned pages at gfn %#llx stay pinned\n",
		       pt->id, r->nr_pages, r->start_gfn);
		kvfree(r->pages);
		kmem_cache_free(mshvr_region_cache, r);
		return;
	}
	mshvr_region_free(r, r->nr_pages);
}

static int mshvr_region_pin(struct mshvr_region *r, u64 *pinned)
{
	u64 done = 0;
	int n;

	while (done < r->nr_pages) {
		unsigned long want = min_t(u64, r->nr_pages - done, MSHVR_PIN_BATCH);

		n = pin_user_pages_fast(r->uaddr + done * PAGE_SIZE, want,
					FOLL_WRITE | FOLL_LONGTERM, r->pages + done);
		if (n < 0) {
			*pinned = done;
			return n;
		}
		done += n;
		if ((unsigned long)n < want) {
			*pinned = done;
			return -EFAULT;
		}
		cond_resched();
	}
	*pinned = done;
	return 0;
}

int mshvr_region_map(struct mshvr_partition *pt, const struct mshv_user_mem_region *arg)
{
	u64 nr = arg->size >> PAGE_SHIFT, pinned = 0, mmio_pfn = 0, i;
	struct mshvr_region *r;
	struct vm_area_struct *vma;
	bool io;
	int ret;

	if (arg->guest_pfn + nr < arg->guest_pfn || arg->userspace_addr + arg->size < arg->userspace_addr)
		return -EINVAL;
	list_for_each_entry(r, &pt->regions, node)
		if (arg->guest_pfn < r->start_gfn + r->nr_pages &&
		    r->start_gfn < arg->guest_pfn + nr)
			return -EEXIST;

	mmap_read_lock(current->mm);
	vma = vma_lookup(current->mm, arg->userspace_addr);
	io = vma && (vma->vm_flags & (VM_IO | VM_PFNMAP));
	if (io) {
		/* the whole range must lie in this one device mapping */
		if (arg->userspace_addr + arg->size > vma->vm_end)
			vma = NULL;
		else
			mmio_pfn = vma->vm_pgoff + ((arg->userspace_addr - vma->vm_start) >> PAGE_SHIFT);
	}
	mmap_read_unlock(current->mm);
	if (!vma)
		return -EINVAL;
	if (io) {
		for (i = 0; i < nr; i++)
			if (page_is_ram(mmio_pfn + i))
				return -EINVAL;
	}

	r = kmem_cache_zalloc(mshvr_region_cache, GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->start_gfn = arg->guest_pfn;
	r->nr_pages = nr;
	r->uaddr = arg->userspace_addr;
	if (io) {
		r->mmio_pfn = mmio_pfn;
		r->hv_flags = MSHVR_HV_MAP_GPA_READABLE | MSHVR_HV_MAP_GPA_WRITABLE |
			      MSHVR_HV_MAP_GPA_NOT_CACHED;
		ret = mshvr_region_hv_map(pt, r);
		if (ret) {
			kmem_cache_free(mshvr_region_cache, r);
			return ret;
		}
		list_add_tail(&r->node, &pt->regions);
		return 0;
	}
	r->hv_flags = (u32)mshvr_map_mshv_set_mem_bit(arg->flags);
	r->pages = mshvr_alloc_page_array(nr);
	if (!r->pages) {
		kmem_cache_free(mshvr_region_cache, r);
		return -ENOMEM;
	}
	ret = mshvr_region_pin(r, &pinned);
	if (!ret)
		ret = mshvr_region_hv_map(pt, r);
	if (ret) {
		mshvr_region_free(r, pinned);
		return ret;
	}
	list_add_tail(&r->node, &pt->regions);
	return 0;
}

int mshvr_region_unmap(struct mshvr_partition *pt, const struct mshv_user_mem_region *arg)
{
	struct mshvr_region *r;

	list_for_each_entry(r, &pt->regions, node) {
		if (r->start_gfn == arg->guest_pfn && r->uaddr == arg->userspace_addr &&
		    r->nr_pages == arg->size >> PAGE_SHIFT) {
			mshvr_region_destroy(pt, r, true);
			return 0;
		}
	}
	return -EINVAL;
}

/* Pages whose states one chunk of MSHV_GET_GPAP_ACCESS_BITMAP handles */
#define MSHVR_GPAP_CHUNK	(8 * PAGE_SIZE)

#define GPAP_F(f)	MSHVR_HV_INPUT_GET_GPA_PAGES_ACCESS_STATE_FLAGS_##f##_MASK

/*
 * MSHV_GET_GPAP_ACCESS_BITMAP: one bit per page (accessed or dirty), read
 * in chunks, then optionally cleared or set. NOOP leaves the states alone
 * (upstream set them). Clearing "accessed" clears "dirty" too and setting
 * "dirty" sets "accessed", as a page cannot be dirty without being accessed.
 */
long mshv_partition_ioctl_get_gpap_access_bitmap(struct mshvr_partition *pt,
						 struct mshv_gpap_access_bitmap *a)
{
	bool dirty = a->access_type == MSHV_GPAP_ACCESS_TYPE_DIRTY;
	u8 bit = dirty ? MSHVR_HV_GPA_PAGE_ACCESS_STATE_DIRTY : MSHVR_HV_GPA_PAGE_ACCESS_STATE_ACCESSED;
	u8 __user *ubitmap = u64_to_user_ptr(a->bitmap_ptr);
	u64 flags = 0, done = 0;
	u8 *states, *bitmap;
	long ret = 0;

	if (a->gpap_base + a->page_count < a->gpap_base)
		return -EINVAL;
	if (a->access_op == MSHV_GPAP_ACCESS_OP_CLEAR)
		flags = dirty ? GPAP_F(CLEAR_DIRTY) : GPAP_F(CLEAR_ACCESSED) | GPAP_F(CLEAR_DIRTY);
	else if (a->access_op == MSHV_GPAP_ACCESS_OP_SET)
		flags = dirty ? GPAP_F(SET_DIRTY) | GPAP_F(SET_ACCESSED) : GPAP_F(SET_ACCESSED);

	states = kvmalloc(MSHVR_GPAP_CHUNK, GFP_KERNEL);
	bitmap = kmalloc(MSHVR_GPAP_CHUNK / 8, GFP_KERNEL);
	if (!states || !bitmap) {
		ret = -ENOMEM;
		goto out;
	}
	while (done < a->page_count) {
		u32 n = min_t(u64, a->page_count - done, MSHVR_GPAP_CHUNK), i;

		ret = mshvr_hvcall_get_gpa_pages_access_states(pt->id, flags, a->gpap_base + done,
							       states, n, NULL, NULL);
		if (ret)
			break;
		memset(bitmap, 0, DIV_ROUND_UP(n, 8));
		for (i = 0; i < n; i++)
			if (states[i] & bit)
				bitmap[i / 8] |= 1 << (i % 8);
		if (copy_to_user(ubitmap + done / 8, bitmap, DIV_ROUND_UP(n, 8))) {
			ret = -EFAULT;
			break;
		}
		done += n;
	}
out:
	kvfree(states);
	kfree(bitmap);
	return ret;
}
