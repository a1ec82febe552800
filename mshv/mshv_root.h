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

#include <linux/refcount.h>
#include <linux/types.h>

/*
 * A child partition. Lifetime: refcount_t, one reference for the partition
 * fd and one per VP fd; the partition is torn down when the last goes.
 */
struct mshvr_partition {
	refcount_t ref;
	u64 id;			/* hypervisor partition id; immutable */
};

/* A virtual processor; holds a reference on its partition. */
struct mshvr_vp {
	struct mshvr_partition *partition;	/* immutable */
	u32 index;				/* immutable */
};

int mshvr_hv_call_init(void);
void mshvr_hv_call_exit(void);

#endif /* _MSHVR_ROOT_H */
