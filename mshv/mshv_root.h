/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mshv_root: Linux as the Microsoft Hyper-V root partition.
 * Private definitions shared by the driver's hand-written files.
 */
#ifndef _MSHVR_ROOT_H
#define _MSHVR_ROOT_H

#ifndef pr_fmt
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt
#endif

#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/refcount.h>
#include <linux/spinlock.h>
#include <linux/srcu.h>
#include <linux/types.h>
#include <linux/wait.h>
#include <linux/xarray.h>

#include "mshvr_hv_types.h"
#include "uapi/linux/mshv.h"

#define MSHVR_MAX_VPS		256

/* Pages pinned per pin_user_pages_fast() call (bounds its temporary use). */
#define MSHVR_PIN_BATCH		(1UL << 16)

/* 2 MiB in 4 KiB pages */
#define MSHVR_LARGE_PAGES	512

/* GSIs of the MSI routing table: 0 .. MSHVR_MAX_GSI - 1 */
#define MSHVR_MAX_GSI		4096

struct eventfd_ctx;
struct mshvr_msi_table;

/*
 * A range of user memory mapped into a partition's GPA space.
 * Immutable after creation; lives on partition->regions under
 * partition->lock.
 */
struct mshvr_region {
	struct list_head node;
	u64 start_gfn;
	u64 nr_pages;
	u64 uaddr;
	u32 hv_flags;		/* HV_MAP_GPA_* of the mapping (without LARGE_PAGE) */
	struct page **pages;	/* nr_pages pinned pages; NULL for MMIO */
	u64 mmio_pfn;		/* MMIO: first host frame (VM_IO/VM_PFNMAP, not pinned) */
};

/*
 * A child partition.
 *
 * Lifetime: @ref counts the partition fd and every VP fd; the last put
 * tears the partition down (mshvr_partition_put). The global table
 * mshvr_partitions maps the hypervisor id to the partition for the SynIC
 * interrupt handler, which looks it up under RCU; the structure is freed
 * after an RCU grace period.
 */
struct mshvr_partition {
	refcount_t ref;
	u64 id;			/* hypervisor partition id; immutable */
	u64 hv_flags;		/* creation flags given to the hypervisor; immutable */

	/*
	 * @lock serializes the partition ioctls and protects @initialized,
	 * @regions and VP creation (inserts into @vps).
	 */
	struct mutex lock;
	bool initialized;
	struct list_head regions;

	/* vp_index -> struct mshvr_vp; stores under @lock, RCU lookups */
	struct xarray vps;

	/*
	 * An asynchronous hypercall (CALL_PENDING) in flight: at most one, as
	 * it is issued under @lock; the SynIC handler stores the status and
	 * completes @async_done.
	 */
	struct completion async_done;
	u16 async_status;
	struct rcu_head rcu;

	/*
	 * Interrupts (irq.c has the full rules). @msi_table is replaced
	 * under @lock and read under @irq_srcu. @irqfds is under
	 * @irqfds_lock (interrupts off). @resamplers: writers hold
	 * @resampler_lock, readers (the SynIC handler) @irq_srcu.
	 */
	struct mshvr_msi_table __rcu *msi_table;
	struct srcu_struct irq_srcu;
	spinlock_t irqfds_lock;
	struct list_head irqfds;
	struct mutex resampler_lock;
	struct list_head resamplers;

	/* doorbells (ioeventfd.c), under @lock */
	struct list_head ioeventfds;
};

/*
 * A virtual processor. Created by MSHV_CREATE_VP, destroyed with its
 * partition (a VP fd holds a partition reference, not a VP reference).
 */
struct mshvr_vp {
	struct mshvr_partition *partition;	/* immutable */
	u32 index;				/* immutable */

	/* hypervisor state pages: pfn and kernel mapping; immutable */
	u64 reg_pfn;
	struct mshvr_hv_x64_register_page *reg_page;
	u64 msg_pfn;
	struct mshvr_hv_message *msg_page;

	/*
	 * @lock is held across every VP ioctl, so a VP runs in one thread at
	 * a time; it protects @started and @intercept_pending.
	 */
	struct mutex lock;
	bool started;		/* explicit suspend cleared (root scheduler) */
	bool intercept_pending;	/* last dispatch ended in an intercept */

	/* set by the SynIC interrupt handler, consumed by the run loop */
	atomic_t kicked;
	wait_queue_head_t wq;
};

/*
 * One slab cache per kind of driver object (created at load, destroyed at
 * unload, charged to the creating task's memory cgroup): /proc/slabinfo
 * shows how many exist, and an object still allocated at unload is reported
 * by the slab allocator.
 */
extern struct kmem_cache *mshvr_partition_cache;
extern struct kmem_cache *mshvr_vp_cache;
extern struct kmem_cache *mshvr_region_cache;
extern struct kmem_cache *mshvr_irqfd_cache;		/* irq.c */
extern struct kmem_cache *mshvr_ioeventfd_cache;
struct kmem_cache *mshvr_ioeventfd_cache_create(void);	/* ioeventfd.c */

extern struct xarray mshvr_partitions;
extern u32 mshvr_scheduler;	/* HV_SCHEDULER_TYPE_*, from the hypervisor */

int mshvr_hv_call_init(void);
void mshvr_hv_call_exit(void);

long mshvr_partition_create(const struct mshv_create_partition_v2 *arg);
void mshvr_partition_put(struct mshvr_partition *pt);

int mshvr_vp_create(struct mshvr_partition *pt, u32 index);
void mshvr_vp_destroy(struct mshvr_vp *vp);
void mshvr_vp_kick(u64 partition_id, u32 vp_index);
void mshvr_partition_async_done(u64 partition_id, u16 status);

int mshvr_region_map(struct mshvr_partition *pt, const struct mshv_user_mem_region *arg);
int mshvr_region_unmap(struct mshvr_partition *pt, const struct mshv_user_mem_region *arg);
void mshvr_region_destroy(struct mshvr_partition *pt, struct mshvr_region *r, bool hv_unmap);

int mshvr_set_vp_register(struct mshvr_partition *pt, u32 vp_index, u32 name, u64 value);
int mshvr_get_vp_register(struct mshvr_partition *pt, u32 vp_index, u32 name, u64 *value);

void mshvr_synic_isr(unsigned int cpu, void *simp, void *siefp, void *sirbp);

/* irq.c: MSI routing, irqfds */
int mshvr_irq_init(void);
void mshvr_irq_exit(void);
void mshvr_irqfd_release(struct mshvr_partition *pt);
void mshvr_irqfd_eoi(struct mshvr_partition *pt, u32 vp_index, u32 vector);
void mshvr_msi_table_free(struct mshvr_partition *pt);
void mshvr_eventfd_signal(struct eventfd_ctx *ctx);

/* ioeventfd.c: doorbells */
void mshvr_ioeventfd_release(struct mshvr_partition *pt);
void mshvr_doorbell(u32 port_id);

#endif /* _MSHVR_ROOT_H */
