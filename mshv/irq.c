// SPDX-License-Identifier: GPL-2.0
/*
 * Interrupts into a child partition: the MSI routing table and irqfds.
 *
 * MSI routing: an array indexed by GSI (struct mshvr_msi_table), replaced
 * whole by MSHV_SET_MSI_ROUTING under partition->lock and published with
 * rcu_assign_pointer(); readers (an irqfd firing, the SynIC handler taking
 * an APIC EOI) hold partition->irq_srcu. The old table is freed after
 * synchronize_srcu(), so a reader sees the old table or the new one whole.
 *
 * irqfd: an eventfd whose wake-up asserts the interrupt routed at its GSI
 * with HvCallAssertVirtualInterrupt, from the eventfd's wake-up callback
 * (atomic context: the eventfd's wait-queue lock is held). The route is
 * looked up at every injection, so routing changes apply to irqfds that
 * already exist.
 *
 *   partition->irqfds      list of active irqfds, under partition->irqfds_lock
 *                          (a spinlock taken with interrupts off: the
 *                          wake-up callback takes it on EPOLLHUP)
 *   irqfd->node            empty once the irqfd is deactivated; whoever
 *                          empties it queues the shutdown work, exactly once
 *   shutdown work          (mshvr_irqfd_wq) removes the wait-queue entry,
 *                          leaves the resampler, drops the eventfds, frees
 *
 * Lock order: eventfd wait-queue lock -> partition->irqfds_lock. Nothing
 * takes a wait-queue lock while holding irqfds_lock.
 *
 * Resample: an irqfd with a resamplefd models a level-triggered line. Its
 * interrupt is always asserted level-triggered, so the guest's EOI of that
 * vector comes back as HVMSG_X64_APIC_EOI (vp index, vector). The handler
 * finds the GSIs whose current route has that vector and signals the
 * resamplefd of every irqfd on them. One resampler per GSI, shared:
 *
 *   partition->resamplers  list of resamplers; writers hold
 *                          partition->resampler_lock, readers (the SynIC
 *                          handler) hold partition->irq_srcu
 *   resampler->irqfds      the irqfds on that GSI, same rules
 */
#include "mshv_root.h"

#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/poll.h>
#include <linux/rculist.h>
#include <linux/slab.h>
#include <linux/srcu.h>
#include <linux/version.h>
#include <linux/workqueue.h>

#include <asm/msi.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"

/* One route; address_hi is always 0 (checked at MSHV_SET_MSI_ROUTING). */
struct mshvr_msi_route {
	u32 address_lo;
	u32 data;
	bool valid;
};

struct mshvr_msi_table {
	u32 nr;				/* routes[] entries: highest GSI + 1 */
	struct mshvr_msi_route routes[];
};

struct mshvr_resampler {
	struct mshvr_partition *pt;
	u32 gsi;
	struct list_head irqfds;	/* mshvr_irqfd.resampler_node */
	struct list_head node;		/* on partition->resamplers */
};

struct kmem_cache *mshvr_irqfd_cache;

struct mshvr_irqfd {
	struct mshvr_partition *pt;
	struct eventfd_ctx *eventfd;
	u32 gsi;
	struct list_head node;		/* on partition->irqfds */
	wait_queue_entry_t wait;
	poll_table ptable;
	struct work_struct shutdown;
	/* resample only */
	struct eventfd_ctx *resamplefd;
	struct mshvr_resampler *resampler;
	struct list_head resampler_node;
};

static struct workqueue_struct *mshvr_irqfd_wq;

void mshvr_eventfd_signal(struct eventfd_ctx *ctx)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
	eventfd_signal(ctx);
#else
	eventfd_signal(ctx, 1);
#endif
}

/* An x86 MSI as the hypervisor's AssertVirtualInterrupt wants it. */
struct mshvr_msi {
	u32 vector;
	u32 type;		/* HV_INTERRUPT_TYPE_*: the APIC delivery mode */
	u32 dest;		/* destination APIC id */
	bool level;
	bool logical;
};

static bool mshvr_msi_route(struct mshvr_partition *pt, u32 gsi, struct mshvr_msi *msi)
{
	struct mshvr_msi_table *t;
	bool ok = false;
	int idx;

	idx = srcu_read_lock(&pt->irq_srcu);
	t = srcu_dereference(pt->msi_table, &pt->irq_srcu);
	if (t && gsi < t->nr && t->routes[gsi].valid) {
		struct x86_msi_data d = { .dmar_subhandle = t->routes[gsi].data };
		struct x86_msi_addr_lo a;

		BUILD_BUG_ON(sizeof(a) != sizeof(u32));
		memcpy(&a, &t->routes[gsi].address_lo, sizeof(a));

		msi->vector = d.vector;
		msi->type = d.delivery_mode;
		msi->level = d.is_level;
		msi->logical = a.dest_mode_logical;
		msi->dest = a.destid_0_7;
		ok = true;
	}
	srcu_read_unlock(&pt->irq_srcu, idx);
	return ok;
}

#define AVI_CTL(f)	MSHVR_HV_INPUT_ASSERT_VIRTUAL_INTERRUPT_CONTROL_##f

static void mshvr_irqfd_inject(struct mshvr_irqfd *irqfd)
{
	struct mshvr_partition *pt = irqfd->pt;
	struct mshvr_msi msi;
	u64 control;

	if (!mshvr_msi_route(pt, irqfd->gsi, &msi)) {
		/* no route: the interrupt goes nowhere, as on a real bus */
		pr_debug("partition %llu: gsi %u has no route\n", pt->id, irqfd->gsi);
		return;
	}
	control = (u64)msi.type << AVI_CTL(INTERRUPT_TYPE_SHIFT);
	if (msi.level || irqfd->resamplefd)
		control |= AVI_CTL(LEVEL_TRIGGERED_MASK);
	if (msi.logical)
		control |= AVI_CTL(LOGICAL_DEST_MODE_MASK);
	/* a failure is logged by the wrapper; there is no one to return it to */
	mshvr_hvcall_assert_virtual_interrupt(pt->id, control, msi.dest, msi.vector, 0, NULL);
}

/* Called with irqfds_lock held. */
static bool mshvr_irqfd_deactivate(struct mshvr_irqfd *irqfd)
{
	if (list_empty(&irqfd->node))
		return false;
	list_del_init(&irqfd->node);
	queue_work(mshvr_irqfd_wq, &irqfd->shutdown);
	return true;
}

static void mshvr_resampler_leave(struct mshvr_irqfd *irqfd)
{
	struct mshvr_partition *pt = irqfd->pt;
	struct mshvr_resampler *r = irqfd->resampler;

	mutex_lock(&pt->resampler_lock);
	list_del_rcu(&irqfd->resampler_node);
	if (list_empty(&r->irqfds))
		list_del_rcu(&r->node);
	else
		r = NULL;
	mutex_unlock(&pt->resampler_lock);
	/* no SynIC handler can still see the irqfd (or the resampler) after this */
	synchronize_srcu(&pt->irq_srcu);
	kfree(r);
}

static void mshvr_irqfd_shutdown(struct work_struct *work)
{
	struct mshvr_irqfd *irqfd = container_of(work, struct mshvr_irqfd, shutdown);
	u64 cnt;

	/* after this the wake-up callback cannot run for this irqfd */
	eventfd_ctx_remove_wait_queue(irqfd->eventfd, &irqfd->wait, &cnt);
	if (irqfd->resampler) {
		mshvr_resampler_leave(irqfd);
		eventfd_ctx_put(irqfd->resamplefd);
	}
	eventfd_ctx_put(irqfd->eventfd);
	kmem_cache_free(mshvr_irqfd_cache, irqfd);
}

/* The eventfd's wake-up: its wait-queue lock is held, interrupts are off. */
static int mshvr_irqfd_wakeup(wait_queue_entry_t *wait, unsigned int mode, int sync, void *key)
{
	struct mshvr_irqfd *irqfd = container_of(wait, struct mshvr_irqfd, wait);
	__poll_t flags = key_to_poll(key);
	struct mshvr_partition *pt = irqfd->pt;

	if (flags & EPOLLIN) {
		u64 cnt;

		eventfd_ctx_do_read(irqfd->eventfd, &cnt);
		mshvr_irqfd_inject(irqfd);
	}
	if (flags & EPOLLHUP) {
		/* the eventfd is going away: so does the irqfd */
		unsigned long iflags;

		spin_lock_irqsave(&pt->irqfds_lock, iflags);
		mshvr_irqfd_deactivate(irqfd);
		spin_unlock_irqrestore(&pt->irqfds_lock, iflags);
	}
	return 0;
}

static void mshvr_irqfd_ptable_queue(struct file *file, wait_queue_head_t *wqh, poll_table *pt)
{
	struct mshvr_irqfd *irqfd = container_of(pt, struct mshvr_irqfd, ptable);

	add_wait_queue_priority(wqh, &irqfd->wait);
}

/* Join (or create) the resampler of @irqfd's GSI. */
static int mshvr_resampler_join(struct mshvr_irqfd *irqfd)
{
	struct mshvr_partition *pt = irqfd->pt;
	struct mshvr_resampler *r;

	mutex_lock(&pt->resampler_lock);
	list_for_each_entry(r, &pt->resamplers, node)
		if (r->gsi == irqfd->gsi)
			goto found;
	r = kzalloc(sizeof(*r), GFP_KERNEL_ACCOUNT);
	if (!r) {
		mutex_unlock(&pt->resampler_lock);
		return -ENOMEM;
	}
	r->pt = pt;
	r->gsi = irqfd->gsi;
	INIT_LIST_HEAD(&r->irqfds);
	list_add_rcu(&r->node, &pt->resamplers);
found:
	irqfd->resampler = r;
	list_add_rcu(&irqfd->resampler_node, &r->irqfds);
	mutex_unlock(&pt->resampler_lock);
	return 0;
}

static int mshvr_irqfd_assign(struct mshvr_partition *pt, const struct mshv_user_irqfd *arg)
{
	struct mshvr_irqfd *irqfd, *tmp;
	struct eventfd_ctx *eventfd;
	struct file *file;
	__poll_t events;
	int ret;

	irqfd = kmem_cache_zalloc(mshvr_irqfd_cache, GFP_KERNEL);
	if (!irqfd)
		return -ENOMEM;
	irqfd->pt = pt;
	irqfd->gsi = arg->gsi;
	INIT_LIST_HEAD(&irqfd->node);
	INIT_LIST_HEAD(&irqfd->resampler_node);
	INIT_WORK(&irqfd->shutdown, mshvr_irqfd_shutdown);

	file = fget(arg->fd);
	if (!file) {
		ret = -EBADF;
		goto free;
	}
	eventfd = eventfd_ctx_fileget(file);
	if (IS_ERR(eventfd)) {
		ret = PTR_ERR(eventfd);
		goto put_file;
	}
	irqfd->eventfd = eventfd;

	if (arg->flags & BIT(MSHV_IRQFD_BIT_RESAMPLE)) {
		irqfd->resamplefd = eventfd_ctx_fdget(arg->resamplefd);
		if (IS_ERR(irqfd->resamplefd)) {
			ret = PTR_ERR(irqfd->resamplefd);
			irqfd->resamplefd = NULL;
			goto put_eventfd;
		}
		ret = mshvr_resampler_join(irqfd);
		if (ret)
			goto put_resamplefd;
	}

	init_waitqueue_func_entry(&irqfd->wait, mshvr_irqfd_wakeup);
	init_poll_funcptr(&irqfd->ptable, mshvr_irqfd_ptable_queue);

	spin_lock_irq(&pt->irqfds_lock);
	list_for_each_entry(tmp, &pt->irqfds, node) {
		if (tmp->eventfd == eventfd) {
			spin_unlock_irq(&pt->irqfds_lock);
			ret = -EBUSY;
			goto leave;
		}
	}
	list_add_tail(&irqfd->node, &pt->irqfds);
	spin_unlock_irq(&pt->irqfds_lock);

	/* from here on, signals inject; one already pending is injected now */
	events = vfs_poll(file, &irqfd->ptable);
	if (events & EPOLLIN)
		mshvr_irqfd_inject(irqfd);
	fput(file);
	return 0;

leave:
	if (irqfd->resampler)
		mshvr_resampler_leave(irqfd);
put_resamplefd:
	if (irqfd->resamplefd)
		eventfd_ctx_put(irqfd->resamplefd);
put_eventfd:
	eventfd_ctx_put(eventfd);
put_file:
	fput(file);
free:
	kmem_cache_free(mshvr_irqfd_cache, irqfd);
	return ret;
}

static int mshvr_irqfd_deassign(struct mshvr_partition *pt, const struct mshv_user_irqfd *arg)
{
	struct mshvr_irqfd *irqfd;
	struct eventfd_ctx *eventfd;
	bool found = false;

	eventfd = eventfd_ctx_fdget(arg->fd);
	if (IS_ERR(eventfd))
		return PTR_ERR(eventfd);
	spin_lock_irq(&pt->irqfds_lock);
	list_for_each_entry(irqfd, &pt->irqfds, node) {
		if (irqfd->eventfd == eventfd && irqfd->gsi == arg->gsi) {
			found = mshvr_irqfd_deactivate(irqfd);
			break;
		}
	}
	spin_unlock_irq(&pt->irqfds_lock);
	eventfd_ctx_put(eventfd);
	if (!found)
		return -ENOENT;
	/* the eventfd no longer injects when this returns */
	flush_workqueue(mshvr_irqfd_wq);
	return 0;
}

long mshv_partition_ioctl_irqfd(struct mshvr_partition *pt, const struct mshv_user_irqfd *arg)
{
	bool resample = arg->flags & BIT(MSHV_IRQFD_BIT_RESAMPLE);

	if (arg->gsi >= MSHVR_MAX_GSI)
		return -EINVAL;
	if (arg->flags & BIT(MSHV_IRQFD_BIT_DEASSIGN)) {
		if (resample)
			return -EINVAL;
		return mshvr_irqfd_deassign(pt, arg);
	}
	return mshvr_irqfd_assign(pt, arg);
}

/* Partition fd release: every irqfd goes, and is gone when this returns. */
void mshvr_irqfd_release(struct mshvr_partition *pt)
{
	struct mshvr_irqfd *irqfd, *tmp;

	spin_lock_irq(&pt->irqfds_lock);
	list_for_each_entry_safe(irqfd, tmp, &pt->irqfds, node)
		mshvr_irqfd_deactivate(irqfd);
	spin_unlock_irq(&pt->irqfds_lock);
	flush_workqueue(mshvr_irqfd_wq);
}

/*
 * SynIC handler (hard IRQ, RCU read lock held by the caller for @pt): the
 * guest EOIed level-triggered @vector on VP @vp_index. Signal the
 * resamplefds of the GSIs routed to that vector.
 */
void mshvr_irqfd_eoi(struct mshvr_partition *pt, u32 vp_index, u32 vector)
{
	struct mshvr_resampler *r;
	struct mshvr_irqfd *irqfd;
	struct mshvr_msi msi;
	int idx;

	idx = srcu_read_lock(&pt->irq_srcu);
	list_for_each_entry_srcu(r, &pt->resamplers, node, srcu_read_lock_held(&pt->irq_srcu)) {
		if (!mshvr_msi_route(pt, r->gsi, &msi) || msi.vector != vector)
			continue;
		list_for_each_entry_srcu(irqfd, &r->irqfds, resampler_node,
					 srcu_read_lock_held(&pt->irq_srcu))
			mshvr_eventfd_signal(irqfd->resamplefd);
	}
	srcu_read_unlock(&pt->irq_srcu, idx);
}

long mshv_partition_ioctl_set_msi_routing(struct mshvr_partition *pt,
					  const struct mshv_user_irq_table *arg)
{
	struct mshvr_msi_table *t = NULL, *old;
	u32 i, nr = 0;

	/* check everything before anything changes */
	for (i = 0; i < arg->nr; i++) {
		const struct mshv_user_irq_entry *e = &arg->entries[i];

		if (e->gsi >= MSHVR_MAX_GSI || e->address_hi)
			return -EINVAL;
		nr = max(nr, e->gsi + 1);
	}
	if (nr) {
		t = kvzalloc(struct_size(t, routes, nr), GFP_KERNEL_ACCOUNT);
		if (!t)
			return -ENOMEM;
		t->nr = nr;
		for (i = 0; i < arg->nr; i++) {
			const struct mshv_user_irq_entry *e = &arg->entries[i];

			if (t->routes[e->gsi].valid) {
				kvfree(t);
				return -EINVAL;		/* a GSI twice */
			}
			t->routes[e->gsi].address_lo = e->address_lo;
			t->routes[e->gsi].data = e->data;
			t->routes[e->gsi].valid = true;
		}
	}
	old = rcu_replace_pointer(pt->msi_table, t, lockdep_is_held(&pt->lock));
	synchronize_srcu(&pt->irq_srcu);
	kvfree(old);
	return 0;
}

/* Partition teardown: no reader is left (every irqfd and fd is gone). */
void mshvr_msi_table_free(struct mshvr_partition *pt)
{
	kvfree(rcu_dereference_protected(pt->msi_table, true));
	RCU_INIT_POINTER(pt->msi_table, NULL);
}

int mshvr_irq_init(void)
{
	mshvr_irqfd_cache = KMEM_CACHE(mshvr_irqfd, SLAB_ACCOUNT);
	if (!mshvr_irqfd_cache)
		return -ENOMEM;
	mshvr_irqfd_wq = alloc_workqueue("mshv-irqfd-cleanup", 0, 0);
	if (!mshvr_irqfd_wq) {
		kmem_cache_destroy(mshvr_irqfd_cache);
		return -ENOMEM;
	}
	return 0;
}

void mshvr_irq_exit(void)
{
	destroy_workqueue(mshvr_irqfd_wq);
	kmem_cache_destroy(mshvr_irqfd_cache);
}
