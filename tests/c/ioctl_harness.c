// SPDX-License-Identifier: GPL-2.0
/*
 * Unit tests of the generated ioctl dispatch (gen/mshvr_ioctl.c), compiled in
 * user space against tests/cshim/. Handlers here only record what reached
 * them. The expected rules are written from Linux's UAPI documentation, not
 * from the spec, so a spec mistake shows up as a failure. Prints TAP.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mshvr_ioctl.h"
#include "tap.h"

struct file { int dummy; };
struct mshvr_partition { int dummy; };
struct mshvr_vp { int dummy; };

size_t shim_user_limit = (size_t)-1;
int shim_user_copies_in, shim_user_copies_out, shim_allocs;


/* ---- recording handlers --------------------------------------------------- */

static const char *called;
static unsigned char seen[4096];
static long handler_ret;

static long record(const char *name, const void *arg, size_t size)
{
	called = name;
	if (arg)
		memcpy(seen, arg, size);
	return handler_ret;
}

long mshv_dev_ioctl_create_partition(struct file *c, const struct mshv_create_partition_v2 *a)
{
	return record("create_partition", a, sizeof(*a));
}

long mshv_dev_ioctl_root_hvcall(struct file *c, struct mshv_root_hvcall *a)
{
	a->status = 5;
	a->reps = 3;
	return record("dev_root_hvcall", a, sizeof(*a));
}

long mshv_partition_ioctl_initialize(struct mshvr_partition *c)
{
	return record("initialize", NULL, 0);
}

long mshv_partition_ioctl_create_vp(struct mshvr_partition *c, const struct mshv_create_vp *a)
{
	return record("create_vp", a, sizeof(*a));
}

long mshv_partition_ioctl_set_guest_memory(struct mshvr_partition *c,
					   const struct mshv_user_mem_region *a)
{
	return record("set_guest_memory", a, sizeof(*a));
}

long mshv_partition_ioctl_irqfd(struct mshvr_partition *c, const struct mshv_user_irqfd *a)
{
	return record("irqfd", a, sizeof(*a));
}

long mshv_partition_ioctl_ioeventfd(struct mshvr_partition *c, const struct mshv_user_ioeventfd *a)
{
	return record("ioeventfd", a, sizeof(*a));
}

long mshv_partition_ioctl_set_msi_routing(struct mshvr_partition *c,
					  const struct mshv_user_irq_table *a)
{
	return record("set_msi_routing", a, sizeof(*a) + a->nr * sizeof(a->entries[0]));
}

long mshv_partition_ioctl_get_gpap_access_bitmap(struct mshvr_partition *c,
						 struct mshv_gpap_access_bitmap *a)
{
	return record("gpap", a, sizeof(*a));
}

long mshv_partition_ioctl_root_hvcall(struct mshvr_partition *c, struct mshv_root_hvcall *a)
{
	a->status = 0x0b;
	return record("pt_root_hvcall", a, sizeof(*a));
}

long mshv_vp_ioctl_run_vp(struct mshvr_vp *c, struct mshv_run_vp *a)
{
	a->msg_buf[0] = 0x42;
	return record("run_vp", a, sizeof(*a));
}

long mshv_vp_ioctl_get_vp_state(struct mshvr_vp *c, struct mshv_get_set_vp_state *a)
{
	a->buf_sz = 8192;
	return record("get_vp_state", a, sizeof(*a));
}

long mshv_vp_ioctl_set_vp_state(struct mshvr_vp *c, struct mshv_get_set_vp_state *a)
{
	return record("set_vp_state", a, sizeof(*a));
}

long mshv_vp_ioctl_root_hvcall(struct mshvr_vp *c, struct mshv_root_hvcall *a)
{
	return record("vp_root_hvcall", a, sizeof(*a));
}

static struct file dev;
static struct mshvr_partition pt;
static struct mshvr_vp vp;

static long dev_ioctl(unsigned int cmd, void *arg)
{
	called = NULL;
	return mshvr_ioctl_dispatch_dev(&dev, cmd, (unsigned long)arg);
}

static long pt_ioctl(unsigned int cmd, void *arg)
{
	called = NULL;
	return mshvr_ioctl_dispatch_partition(&pt, cmd, (unsigned long)arg);
}

static long vp_ioctl(unsigned int cmd, void *arg)
{
	called = NULL;
	return mshvr_ioctl_dispatch_vp(&vp, cmd, (unsigned long)arg);
}

/* ---- tests --------------------------------------------------------------- */

static void test_numbers(void)
{
	ok(MSHV_CREATE_PARTITION == 0x4010B800 && MSHV_INITIALIZE_PARTITION == 0xB800 &&
	   MSHV_CREATE_VP == 0x4004B801 && MSHV_SET_GUEST_MEMORY == 0x4020B802 &&
	   MSHV_IRQFD == 0x4010B803 && MSHV_IOEVENTFD == 0x4020B804 &&
	   MSHV_SET_MSI_ROUTING == 0x4008B805 && MSHV_GET_GPAP_ACCESS_BITMAP == 0xC020B806 &&
	   MSHV_ROOT_HVCALL == 0xC020B807 && MSHV_RUN_VP == 0x8100B800 &&
	   MSHV_GET_VP_STATE == 0xC010B801 && MSHV_SET_VP_STATE == 0xC010B802,
	   "ioctl numbers match Linux 6.19");
}

static void test_unknown(void)
{
	ok(dev_ioctl(MSHV_CREATE_PARTITION + 1, NULL) == -ENOTTY && !called,
	   "unknown command on /dev/mshv is -ENOTTY");
	ok(dev_ioctl(MSHV_CREATE_VP, NULL) == -ENOTTY, "a partition ioctl on /dev/mshv is -ENOTTY");
	ok(pt_ioctl(MSHV_RUN_VP, NULL) == -ENOTTY, "a VP ioctl on a partition fd is -ENOTTY");
	ok(vp_ioctl(MSHV_CREATE_VP, NULL) == -ENOTTY, "a partition ioctl on a VP fd is -ENOTTY");
	ok(vp_ioctl(MSHV_INITIALIZE_PARTITION, NULL) == -ENOTTY,
	   "nr 0 without argument on a VP fd is -ENOTTY");
	/* same nr and type, different size: a different command */
	ok(pt_ioctl(_IOW(0xB8, 0x01, __u64), NULL) == -ENOTTY, "wrong argument size is -ENOTTY");
}

static void test_create_partition(void)
{
	struct mshv_create_partition_v2 v2;
	struct mshv_create_partition_v2 *got = (void *)seen;

	memset(&v2, 0xee, sizeof(v2));
	v2.pt_flags = 1 << MSHV_PT_BIT_LAPIC;
	v2.pt_isolation = MSHV_PT_ISOLATION_NONE;
	handler_ret = 3;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == 3 && called &&
	   got->pt_flags == 1 && got->pt_num_cpu_fbanks == 0 && got->pt_cpu_fbanks[0] == 0 &&
	   got->pt_disabled_xsave == 0,
	   "v1: only 16 bytes are read; the handler sees zeroed v2 fields");
	v2.pt_flags = 1 << MSHV_PT_BIT_COUNT;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == -EINVAL && !called, "unknown pt_flags bit");
	v2.pt_flags = 0;
	v2.pt_isolation = 1;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == -EINVAL && !called, "pt_isolation 1 refused");

	memset(&v2, 0, sizeof(v2));
	v2.pt_flags = (1 << MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES) | (1 << MSHV_PT_BIT_X2APIC);
	v2.pt_num_cpu_fbanks = MSHV_NUM_CPU_FEATURES_BANKS;
	v2.pt_cpu_fbanks[1] = 0x1234;
	v2.pt_disabled_xsave = 0x99;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == 3 && got->pt_cpu_fbanks[1] == 0x1234 &&
	   got->pt_disabled_xsave == 0x99, "v2: the 64-byte argument reaches the handler");
	v2.pt_num_cpu_fbanks = 1;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == -EINVAL && !called,
	   "v2: pt_num_cpu_fbanks must be MSHV_NUM_CPU_FEATURES_BANKS");
	v2.pt_num_cpu_fbanks = 2;
	v2.pt_rsvd[5] = 1;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == -EINVAL && !called, "v2: pt_rsvd MBZ");
	v2.pt_rsvd[5] = 0;
	v2.pt_rsvd1[1] = 1;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == -EINVAL && !called, "v2: pt_rsvd1 MBZ");
	v2.pt_rsvd1[1] = 0;
	shim_user_limit = 16;
	ok(dev_ioctl(MSHV_CREATE_PARTITION, &v2) == -EFAULT && !called,
	   "v2 flag with only 16 readable bytes is -EFAULT");
	shim_user_limit = (size_t)-1;
	handler_ret = 0;
}

static void test_set_guest_memory(void)
{
	struct mshv_user_mem_region r = {
		.size = 0x2000, .guest_pfn = 1, .userspace_addr = 0x10000,
		.flags = 1 << MSHV_SET_MEM_BIT_WRITABLE,
	};

	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == 0 && called, "valid region accepted");
	r.flags = 1 << 3;
	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == -EINVAL && !called, "unknown flag bit");
	r.flags = 1 << MSHV_SET_MEM_BIT_UNMAP;
	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == 0 && called, "unmap flag accepted");
	r.size = 0;
	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == -EINVAL && !called, "zero size");
	r.size = 0x1800;
	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == -EINVAL && !called, "unaligned size");
	r.size = 0x1000;
	r.userspace_addr = 0x10010;
	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == -EINVAL && !called, "unaligned user address");
	r.userspace_addr = 0x10000;
	r.rsvd[6] = 1;
	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == -EINVAL && !called, "rsvd MBZ");
	r.rsvd[6] = 0;
	shim_user_limit = 8;
	ok(pt_ioctl(MSHV_SET_GUEST_MEMORY, &r) == -EFAULT && !called, "unreadable argument");
	shim_user_limit = (size_t)-1;
}

static void test_small_partition_ioctls(void)
{
	struct mshv_create_vp cv = { .vp_index = 7 };
	struct mshv_user_irqfd irqfd = { .fd = 3, .gsi = 1, .flags = 3 };
	struct mshv_user_ioeventfd io = { .addr = 0x1000, .len = 4, .fd = 4, .flags = 7 };
	struct mshv_gpap_access_bitmap g = { .page_count = 1, .bitmap_ptr = 8 };

	ok(pt_ioctl(MSHV_INITIALIZE_PARTITION, NULL) == 0 && called &&
	   !strcmp(called, "initialize"), "initialize takes no argument");
	ok(pt_ioctl(MSHV_CREATE_VP, &cv) == 0 && ((struct mshv_create_vp *)seen)->vp_index == 7,
	   "create_vp passes vp_index");
	ok(pt_ioctl(MSHV_IRQFD, &irqfd) == 0 && called, "irqfd with both flags");
	irqfd.flags = 4;
	ok(pt_ioctl(MSHV_IRQFD, &irqfd) == -EINVAL && !called, "irqfd unknown flag");
	ok(pt_ioctl(MSHV_IOEVENTFD, &io) == 0 && called, "ioeventfd with all flags");
	io.flags = 8;
	ok(pt_ioctl(MSHV_IOEVENTFD, &io) == -EINVAL && !called, "ioeventfd unknown flag");
	io.flags = 0;
	io.rsvd[0] = 1;
	ok(pt_ioctl(MSHV_IOEVENTFD, &io) == -EINVAL && !called, "ioeventfd rsvd MBZ");
	ok(pt_ioctl(MSHV_GET_GPAP_ACCESS_BITMAP, &g) == 0 && called, "gpap valid");
	g.access_type = MSHV_GPAP_ACCESS_TYPE_COUNT;
	ok(pt_ioctl(MSHV_GET_GPAP_ACCESS_BITMAP, &g) == -EINVAL && !called, "gpap access_type");
	g.access_type = 0;
	g.access_op = MSHV_GPAP_ACCESS_OP_COUNT;
	ok(pt_ioctl(MSHV_GET_GPAP_ACCESS_BITMAP, &g) == -EINVAL && !called, "gpap access_op");
	g.access_op = 0;
	g.page_count = 0;
	ok(pt_ioctl(MSHV_GET_GPAP_ACCESS_BITMAP, &g) == -EINVAL && !called, "gpap page_count 0");
	g.page_count = 1;
	g.bitmap_ptr = 0;
	ok(pt_ioctl(MSHV_GET_GPAP_ACCESS_BITMAP, &g) == -EINVAL && !called, "gpap bitmap_ptr 0");
	g.bitmap_ptr = 8;
	g.rsvd[2] = 1;
	ok(pt_ioctl(MSHV_GET_GPAP_ACCESS_BITMAP, &g) == -EINVAL && !called, "gpap rsvd MBZ");
}

static void test_msi_routing(void)
{
	size_t n = 3;
	struct mshv_user_irq_table *t = calloc(1, sizeof(*t) + n * sizeof(t->entries[0]));
	struct mshv_user_irq_table *got = (void *)seen;

	t->nr = n;
	t->entries[2].gsi = 9;
	t->entries[2].data = 0x41;
	ok(pt_ioctl(MSHV_SET_MSI_ROUTING, t) == 0 && got->nr == 3 && got->entries[2].gsi == 9 &&
	   got->entries[2].data == 0x41 && shim_allocs == 0,
	   "the table with its entries reaches the handler; the copy is freed");
	t->rsvd = 1;
	ok(pt_ioctl(MSHV_SET_MSI_ROUTING, t) == -EINVAL && !called, "rsvd MBZ");
	t->rsvd = 0;
	t->nr = 4097;
	ok(pt_ioctl(MSHV_SET_MSI_ROUTING, t) == -EINVAL && !called, "more than 4096 entries");
	t->nr = 0;
	ok(pt_ioctl(MSHV_SET_MSI_ROUTING, t) == 0 && called, "an empty table clears routing");
	t->nr = 3;
	shim_user_limit = 8 + 16;
	ok(pt_ioctl(MSHV_SET_MSI_ROUTING, t) == -EFAULT && !called && shim_allocs == 0,
	   "unreadable entries: -EFAULT and nothing leaked");
	shim_user_limit = (size_t)-1;
	free(t);
}

static void test_root_hvcall(void)
{
	struct mshv_root_hvcall h = { .code = 0x44, .in_sz = 16, .out_sz = 8, .in_ptr = 64,
				      .out_ptr = 128 };

	handler_ret = -EIO;
	ok(pt_ioctl(MSHV_ROOT_HVCALL, &h) == -EIO && h.status == 0x0b,
	   "status is written back even when the call fails");
	h.status = 0;
	ok(dev_ioctl(MSHV_ROOT_HVCALL, &h) == -EIO && h.status == 5 && h.reps == 3 &&
	   !strcmp(called, "dev_root_hvcall"), "/dev/mshv has its own passthrough handler");
	handler_ret = 0;
	h.status = 1;
	ok(vp_ioctl(MSHV_ROOT_HVCALL, &h) == -EINVAL && !called, "status must be zero on input");
	h.status = 0;
	h.rsvd[0] = 1;
	ok(vp_ioctl(MSHV_ROOT_HVCALL, &h) == -EINVAL && !called, "rsvd MBZ");
	h.rsvd[0] = 0;
	h.in_ptr = 0;
	ok(vp_ioctl(MSHV_ROOT_HVCALL, &h) == -EINVAL && !called, "in_ptr required");
	h.in_ptr = 64;
	h.in_sz = 4097;
	ok(vp_ioctl(MSHV_ROOT_HVCALL, &h) == -EINVAL && !called, "in_sz above a page");
	h.in_sz = 16;
	h.out_sz = 4097;
	ok(vp_ioctl(MSHV_ROOT_HVCALL, &h) == -EINVAL && !called, "out_sz above a page");
	h.out_sz = 8;
	ok(vp_ioctl(MSHV_ROOT_HVCALL, &h) == 0 && !strcmp(called, "vp_root_hvcall"),
	   "VP fd passthrough");
}

static void test_vp(void)
{
	struct mshv_run_vp run;
	struct mshv_get_set_vp_state st = { .type = MSHV_VP_STATE_XSAVE, .buf_sz = 4096,
					    .buf_ptr = 0x1000 };

	memset(&run, 0, sizeof(run));
	handler_ret = 0;
	ok(vp_ioctl(MSHV_RUN_VP, &run) == 0 && run.msg_buf[0] == 0x42,
	   "run_vp copies the message out on success");
	run.msg_buf[0] = 0;
	handler_ret = -EINTR;
	ok(vp_ioctl(MSHV_RUN_VP, &run) == -EINTR && run.msg_buf[0] == 0,
	   "run_vp copies nothing out on -EINTR");
	shim_user_limit = 100;
	handler_ret = 0;
	ok(vp_ioctl(MSHV_RUN_VP, &run) == -EFAULT, "run_vp -EFAULT when the buffer is not writable");
	shim_user_limit = (size_t)-1;

	handler_ret = -EINVAL;
	ok(vp_ioctl(MSHV_GET_VP_STATE, &st) == -EINVAL && st.buf_sz == 8192,
	   "get_vp_state writes the needed size back on -EINVAL");
	handler_ret = 0;
	st.type = MSHV_VP_STATE_COUNT;
	ok(vp_ioctl(MSHV_GET_VP_STATE, &st) == -EINVAL && !called, "unknown state type");
	ok(vp_ioctl(MSHV_SET_VP_STATE, &st) == -EINVAL && !called, "unknown state type (set)");
	st.type = 0;
	st.rsvd[1] = 1;
	ok(vp_ioctl(MSHV_SET_VP_STATE, &st) == -EINVAL && !called, "rsvd MBZ");
}

static void test_flag_maps(void)
{
	ok(mshvr_map_mshv_pt_bit(0) == (MSHVR_HV_PARTITION_CREATION_FLAG_EXO_PARTITION |
					 MSHVR_HV_PARTITION_CREATION_FLAG_INTERCEPT_MESSAGE_PAGE_ENABLED),
	   "a partition always gets EXO and the intercept message page");
	ok(mshvr_map_mshv_pt_bit(1 << MSHV_PT_BIT_LAPIC | 1 << MSHV_PT_BIT_X2APIC |
				 1 << MSHV_PT_BIT_GPA_SUPER_PAGES) ==
	   (0x100ULL | 0x80000ULL | 0x2000ULL | 0x400000ULL | 0x10ULL),
	   "LAPIC bit 13, X2APIC bit 22, GPA super pages bit 4");
	ok(mshvr_map_mshv_pt_bit(1 << MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES) ==
	   mshvr_map_mshv_pt_bit(0), "the v2 selector bit maps to nothing");
	ok(mshvr_map_mshv_set_mem_bit(0) == 0x8001 &&
	   mshvr_map_mshv_set_mem_bit(1 << MSHV_SET_MEM_BIT_WRITABLE) == 0x8003 &&
	   mshvr_map_mshv_set_mem_bit(1 << MSHV_SET_MEM_BIT_EXECUTABLE) == 0x800d,
	   "memory flags: readable and adjustable always, then writable, executable");
	ok(mshvr_map_mshv_vp_state(MSHV_VP_STATE_LAPIC) == 0x80000000 &&
	   mshvr_map_mshv_vp_state(MSHV_VP_STATE_SYNTHETIC_TIMERS) == 4 &&
	   mshvr_map_mshv_vp_state(MSHV_VP_STATE_COUNT) == (__u64)-1,
	   "VP state types map to the hypervisor's; unknown gives U64_MAX");
}

int main(void)
{
	test_flag_maps();
	test_numbers();
	test_unknown();
	test_create_partition();
	test_set_guest_memory();
	test_small_partition_ioctls();
	test_msi_routing();
	test_root_hvcall();
	test_vp();
	return tap_done();
}
