// SPDX-License-Identifier: GPL-2.0
/*
 * ioeventfds: guest MMIO writes that signal an eventfd without an exit to
 * user space, through hypervisor doorbells.
 *
 * Each ioeventfd is a doorbell port in the root (HvCallCreatePort, target
 * SINT HV_SYNIC_DOORBELL_SINT_INDEX, any root VP) and the child's
 * connection to it (HvCallConnectPort) on the guest physical address. A
 * matching guest write makes the hypervisor queue the port id on a root
 * CPU's event ring for that SINT and post HVMSG_SYNIC_SINT_INTERCEPT to
 * the CPU's SINT0; the SynIC handler drains the ring (synic.c) and calls
 * mshvr_doorbell() for each port id.
 *
 *   mshvr_ports            port id -> ioeventfd, for the SynIC handler:
 *                          stores under the xarray's lock, lookups under
 *                          RCU; an ioeventfd (and its eventfd reference)
 *                          is released only after a grace period that
 *                          follows its erasure
 *   partition->ioeventfds  the partition's ioeventfds, under partition->lock
 *
 * The port id doubles as the connection id in the child. Ids are 24 bits
 * (hv_port_id) and never 0.
 */
#include "mshv_root.h"

#include <linux/eventfd.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <linux/xarray.h>

#include "mshvr_hvcall.h"
#include "mshvr_ioctl.h"

#define MSHVR_PORT_ID_MAX	((1U << 24) - 1)

struct mshvr_ioeventfd {
	struct list_head node;		/* on partition->ioeventfds */
	struct eventfd_ctx *eventfd;
	u64 addr;
	u64 datamatch;
	u32 len;
	bool wildcard;			/* no datamatch: any value */
	u32 port_id;
};

static DEFINE_XARRAY_ALLOC1(mshvr_ports);

struct kmem_cache *mshvr_ioeventfd_cache_create(void)
{
	return KMEM_CACHE(mshvr_ioeventfd, SLAB_ACCOUNT);
}

static bool mshvr_ioeventfd_overlap(const struct mshvr_ioeventfd *a,
				    const struct mshvr_ioeventfd *b)
{
	return a->addr == b->addr &&
	       (!a->len || !b->len || a->len == b->len) &&
	       (a->wildcard || b->wildcard || a->datamatch == b->datamatch);
}

static u64 mshvr_doorbell_flags(const struct mshvr_ioeventfd *p)
{
	u64 flags;

	switch (p->len) {
	case 1:
		flags = MSHVR_HV_DOORBELL_FLAG_TRIGGER_SIZE_BYTE;
		break;
	case 2:
		flags = MSHVR_HV_DOORBELL_FLAG_TRIGGER_SIZE_WORD;
		break;
	case 4:
		flags = MSHVR_HV_DOORBELL_FLAG_TRIGGER_SIZE_DWORD;
		break;
	case 8:
		flags = MSHVR_HV_DOORBELL_FLAG_TRIGGER_SIZE_QWORD;
		break;
	default:
		flags = MSHVR_HV_DOORBELL_FLAG_TRIGGER_SIZE_ANY;
		break;
	}
	if (p->wildcard)
		flags |= MSHVR_HV_DOORBELL_FLAG_TRIGGER_ANY_VALUE;
	return flags;
}

/* Take the doorbell down in the hypervisor; true when nothing is left there. */
static bool mshvr_doorbell_unregister(struct mshvr_partition *pt, struct mshvr_ioeventfd *p)
{
	bool clean = true;

	if (mshvr_hvcall_disconnect_port(pt->id, p->port_id,
					 MSHVR_HV_INPUT_DISCONNECT_PORT_FLAGS_IS_DOORBELL_MASK, NULL))
		clean = false;
	if (mshvr_hvcall_delete_port(mshvr_root_partition_id(), p->port_id, NULL))
		clean = false;
	return clean;
}

/*
 * Take @p out of the hypervisor and the port table. The caller frees it
 * (mshvr_ioeventfd_put) after synchronize_rcu().
 */
static void mshvr_ioeventfd_unlink(struct mshvr_partition *pt, struct mshvr_ioeventfd *p)
{
	list_del(&p->node);
	if (!mshvr_doorbell_unregister(pt, p)) {
		/* the hypervisor may still signal this id: keep it reserved */
		pr_err("partition %llu: LEAK: doorbell port %u not removed\n", pt->id, p->port_id);
		xa_store(&mshvr_ports, p->port_id, NULL, GFP_KERNEL);
	} else {
		xa_erase(&mshvr_ports, p->port_id);
	}
}

static void mshvr_ioeventfd_put(struct mshvr_ioeventfd *p)
{
	eventfd_ctx_put(p->eventfd);
	kmem_cache_free(mshvr_ioeventfd_cache, p);
}

static int mshvr_ioeventfd_assign(struct mshvr_partition *pt, const struct mshv_user_ioeventfd *arg)
{
	struct mshvr_ioeventfd *p, *q;
	u32 id;
	int ret;

	p = kmem_cache_zalloc(mshvr_ioeventfd_cache, GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	p->addr = arg->addr;
	p->len = arg->len;
	p->wildcard = !(arg->flags & BIT(MSHV_IOEVENTFD_BIT_DATAMATCH));
	p->datamatch = p->wildcard ? 0 : arg->datamatch;
	p->eventfd = eventfd_ctx_fdget(arg->fd);
	if (IS_ERR(p->eventfd)) {
		ret = PTR_ERR(p->eventfd);
		kmem_cache_free(mshvr_ioeventfd_cache, p);
		return ret;
	}
	list_for_each_entry(q, &pt->ioeventfds, node) {
		if (mshvr_ioeventfd_overlap(p, q)) {
			ret = -EEXIST;
			goto put;
		}
	}
	/* reserve an id; the entry is published once the doorbell exists */
	ret = xa_alloc(&mshvr_ports, &id, NULL, XA_LIMIT(1, MSHVR_PORT_ID_MAX), GFP_KERNEL);
	if (ret) {
		ret = ret == -EBUSY ? -ENOSPC : ret;
		goto put;
	}
	p->port_id = id;
	/* published before the guest can ring it: no early signal is lost */
	xa_store(&mshvr_ports, id, p, GFP_KERNEL);
	ret = mshvr_hvcall_create_port(mshvr_root_partition_id(), id, 0, 0, pt->id,
				       MSHVR_HV_PORT_TYPE_DOORBELL,
				       MSHVR_HV_SYNIC_DOORBELL_SINT_INDEX, MSHVR_HV_ANY_VP,
				       0, 0, 0, NULL);
	if (ret)
		goto release_id;
	ret = mshvr_hvcall_connect_port(pt->id, id, 0, mshvr_root_partition_id(), id,
					MSHVR_HV_PORT_TYPE_DOORBELL, p->addr, p->datamatch,
					mshvr_doorbell_flags(p), 0, 0, NULL);
	if (ret)
		goto delete_port;
	list_add_tail(&p->node, &pt->ioeventfds);
	return 0;

delete_port:
	if (mshvr_hvcall_delete_port(mshvr_root_partition_id(), id, NULL)) {
		pr_err("partition %llu: LEAK: doorbell port %u not deleted\n", pt->id, id);
		xa_store(&mshvr_ports, id, NULL, GFP_KERNEL);	/* the id stays reserved */
		goto sync;
	}
release_id:
	xa_erase(&mshvr_ports, id);
sync:
	synchronize_rcu();
put:
	mshvr_ioeventfd_put(p);
	return ret;
}

static int mshvr_ioeventfd_deassign(struct mshvr_partition *pt,
				    const struct mshv_user_ioeventfd *arg)
{
	bool wildcard = !(arg->flags & BIT(MSHV_IOEVENTFD_BIT_DATAMATCH));
	struct mshvr_ioeventfd *p;
	struct eventfd_ctx *eventfd;
	int ret = -ENOENT;

	eventfd = eventfd_ctx_fdget(arg->fd);
	if (IS_ERR(eventfd))
		return PTR_ERR(eventfd);
	list_for_each_entry(p, &pt->ioeventfds, node) {
		if (p->eventfd != eventfd || p->addr != arg->addr || p->len != arg->len ||
		    p->wildcard != wildcard || (!wildcard && p->datamatch != arg->datamatch))
			continue;
		mshvr_ioeventfd_unlink(pt, p);
		synchronize_rcu();
		mshvr_ioeventfd_put(p);
		ret = 0;
		break;
	}
	eventfd_ctx_put(eventfd);
	return ret;
}

long mshv_partition_ioctl_ioeventfd(struct mshvr_partition *pt,
				    const struct mshv_user_ioeventfd *arg)
{
	if (arg->flags & BIT(MSHV_IOEVENTFD_BIT_PIO))
		return -EOPNOTSUPP;
	switch (arg->len) {
	case 0: case 1: case 2: case 4: case 8:
		break;
	default:
		return -EINVAL;
	}
	if (arg->addr + arg->len < arg->addr)
		return -EINVAL;
	if (arg->flags & BIT(MSHV_IOEVENTFD_BIT_DEASSIGN))
		return mshvr_ioeventfd_deassign(pt, arg);
	return mshvr_ioeventfd_assign(pt, arg);
}

/* Partition fd release (partition->lock not needed: no ioctl can run). */
void mshvr_ioeventfd_release(struct mshvr_partition *pt)
{
	struct mshvr_ioeventfd *p, *tmp;
	LIST_HEAD(gone);

	if (list_empty(&pt->ioeventfds))
		return;
	list_for_each_entry_safe(p, tmp, &pt->ioeventfds, node) {
		mshvr_ioeventfd_unlink(pt, p);
		list_add(&p->node, &gone);
	}
	synchronize_rcu();
	list_for_each_entry_safe(p, tmp, &gone, node)
		mshvr_ioeventfd_put(p);
}

/* SynIC handler (hard IRQ): the hypervisor signalled doorbell @port_id. */
void mshvr_doorbell(u32 port_id)
{
	struct mshvr_ioeventfd *p;

	rcu_read_lock();
	p = xa_load(&mshvr_ports, port_id);
	if (p)
		mshvr_eventfd_signal(p->eventfd);
	else
		pr_warn_ratelimited("doorbell for unknown port %u\n", port_id);
	rcu_read_unlock();
}
