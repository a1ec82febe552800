// SPDX-License-Identifier: GPL-2.0
/*
 * Unit tests of the generated hypercall wrappers (gen/mshvr_hvcall.c),
 * compiled in user space against tests/cshim/ with a scripted fake
 * hypervisor behind the seam. Prints TAP.
 *
 * Offsets checked here are written independently of the spec (from the TLFS
 * and Linux's headers), so a spec or generator mistake shows up as a failure.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mshvr_hvcall.h"
#include "tap.h"

int shim_warnings;
int shim_might_sleep;


/* ---- the driver side the wrappers expect -------------------------------- */

static unsigned char in_page[4096] __attribute__((aligned(4096)));
static unsigned char out_page[4096] __attribute__((aligned(4096)));
static int irq_depth;

void *mshvr_hvcall_begin(unsigned long *flags, void **out)
{
	*flags = 0x5a;
	irq_depth++;
	/* dirty the pages: the wrapper must zero what it sends */
	memset(in_page, 0xAA, sizeof(in_page));
	memset(out_page, 0xBB, sizeof(out_page));
	*out = out_page;
	return in_page;
}

void mshvr_hvcall_end(unsigned long flags)
{
	if (flags == 0x5a)
		irq_depth--;
}

/* the dispatch pages: preemption off, interrupts left on */
static unsigned char din_page[4096] __attribute__((aligned(4096)));
static unsigned char dout_page[4096] __attribute__((aligned(4096)));
static int preempt_depth;

void *mshvr_hvcall_begin_irqs_on(void **out)
{
	preempt_depth++;
	memset(din_page, 0xAA, sizeof(din_page));
	memset(dout_page, 0xBB, sizeof(dout_page));
	*out = dout_page;
	return din_page;
}

void mshvr_hvcall_end_irqs_on(void)
{
	preempt_depth--;
}

#define ROOT_ID 0x7777ULL
u64 mshvr_root_partition_id(void)
{
	return ROOT_ID;
}

struct deposit { u64 id; unsigned int pages; };
static struct deposit deposits[64];
static int ndeposits;

int mshvr_hv_deposit(u64 partition_id, unsigned int pages)
{
	deposits[ndeposits].id = partition_id;
	deposits[ndeposits].pages = pages;
	ndeposits++;
	return 0;
}

int mshvr_hv_deposit_on_status(u16 status, u64 target, bool into_root,
			       unsigned int pages, unsigned int *attempt)
{
	(*attempt)++;
	if (status == MSHVR_HV_STATUS_INSUFFICIENT_ROOT_MEMORY)
		into_root = true;
	return mshvr_hv_deposit(into_root ? ROOT_ID : target, pages);
}

static char last_failure[128];
static int nfailures, nprotocol;

void mshvr_hvcall_log_failure(const char *name, u16 code, u16 status)
{
	nfailures++;
	snprintf(last_failure, sizeof(last_failure), "%s 0x%04x %s", name, code,
		 mshvr_hv_status_name(status));
}

void mshvr_hvcall_log_protocol(const char *name, u64 result, u32 start, u32 count)
{
	(void)name; (void)result; (void)start; (void)count;
	nprotocol++;
}

/* ---- the fake hypervisor ---------------------------------------------- */

struct call {
	u64 control;
	unsigned char in[4096];
	u64 in0, in1;
	int fast;
};

static struct call calls[64];
static int ncalls;
typedef u64 (*behaviour_t)(struct call *c, void *out);
static behaviour_t behaviour;

static u64 result(u16 status, u32 reps)
{
	return (u64)status | ((u64)reps << 32);
}

static u32 rep_count(u64 control)
{
	return (control >> 32) & 0xfff;
}

static u32 rep_start(u64 control)
{
	return (control >> 48) & 0xfff;
}

u64 mshvr_seam_hypercall(u64 control, void *input, void *output)
{
	struct call *c = &calls[ncalls < 63 ? ncalls++ : 63];

	if (irq_depth != 1)
		printf("# seam called outside begin/end\n");
	c->control = control;
	memcpy(c->in, input, 4096);
	c->fast = 0;
	return behaviour(c, output);
}

static int nirqs_on;

u64 mshvr_seam_hypercall_irqs_on(u64 control, void *input, void *output)
{
	struct call *c = &calls[ncalls < 63 ? ncalls++ : 63];

	if (preempt_depth != 1 || irq_depth != 0 || input != din_page || output != dout_page)
		printf("# irqs-on seam called outside begin/end_irqs_on or on other pages\n");
	else
		nirqs_on++;
	c->control = control;
	memcpy(c->in, input, 4096);
	c->fast = 0;
	return behaviour(c, output);
}

u64 mshvr_seam_hypercall_fast(u64 control, u64 in0, u64 in1)
{
	struct call *c = &calls[ncalls < 63 ? ncalls++ : 63];

	c->control = control;
	c->in0 = in0;
	c->in1 = in1;
	c->fast = 1;
	memset(c->in, 0, sizeof(c->in));
	memcpy(c->in, &in0, 8);
	memcpy(c->in + 8, &in1, 8);
	return behaviour(c, NULL);
}

static void reset(behaviour_t b)
{
	behaviour = b;
	ncalls = ndeposits = nfailures = nprotocol = 0;
	shim_warnings = 0;
	last_failure[0] = 0;
}

static u64 rd64(const unsigned char *p, unsigned int off)
{
	u64 v;

	memcpy(&v, p + off, 8);
	return v;
}

static u32 rd32(const unsigned char *p, unsigned int off)
{
	u32 v;

	memcpy(&v, p + off, 4);
	return v;
}

static int all_zero(const unsigned char *p, unsigned int from, unsigned int to)
{
	for (; from < to; from++)
		if (p[from])
			return 0;
	return 1;
}

/* behaviours */
static u64 succeed_all(struct call *c, void *out)
{
	(void)out;
	return result(0, rep_count(c->control));
}

static int oom_left;
static u64 oom_then_succeed(struct call *c, void *out)
{
	if (out)
		memset(out, 0, 8);
	if (oom_left > 0) {
		oom_left--;
		return result(MSHVR_HV_STATUS_INSUFFICIENT_MEMORY, 0);
	}
	if (out)
		memcpy(out, "\x2a\0\0\0\0\0\0\0", 8);
	return result(0, rep_count(c->control));
}

/* completes at most 100 reps per call, like a hypervisor out of time */
static u64 slow_reps(struct call *c, void *out)
{
	u32 end = rep_start(c->control) + 100;

	(void)out;
	if (end > rep_count(c->control))
		end = rep_count(c->control);
	return result(0, end);
}

static u64 fail_at_50(struct call *c, void *out)
{
	(void)out;
	return result(MSHVR_HV_STATUS_INVALID_PARAMETER, 50);
}

static u64 no_progress(struct call *c, void *out)
{
	(void)out;
	return result(0, rep_start(c->control));
}

/* register values: value.low = register name + 1000 * call number */
static u64 regs_out(struct call *c, void *out)
{
	u32 i, n = rep_count(c->control);
	struct mshvr_hv_register_value *v = out;

	for (i = rep_start(c->control); i < n; i++) {
		v[i].low = rd32(c->in, 16 + 4 * i) + 1000ULL * ncalls;
		v[i].high = ~0ULL;
	}
	return result(0, n);
}

static u64 withdraw_out(struct call *c, void *out)
{
	u32 i, n = rep_count(c->control);
	u64 *pfn = out;

	for (i = rep_start(c->control); i < n; i++)
		pfn[i] = 0x1000 + i;
	return result(0, n);
}

/* ---- tests ------------------------------------------------------------ */

static void test_simple_fields_and_zeroing(void)
{
	int r;

	reset(succeed_all);
	r = mshvr_hvcall_create_vp(0x1234, 7, 3, 0x55, 9, 1, 0, NULL);
	ok(r == 0 && ncalls == 1, "create_vp succeeds with one hypercall");
	ok((calls[0].control & 0xffff) == 0x4e && !(calls[0].control >> 16),
	   "create_vp control word is code 0x4e, memory form, no reps");
	ok(rd64(calls[0].in, 0) == 0x1234 && rd32(calls[0].in, 8) == 7 &&
	   calls[0].in[15] == 3 && rd64(calls[0].in, 16) == 0x55 &&
	   rd32(calls[0].in, 24) == 9 && rd32(calls[0].in, 28) == 1,
	   "create_vp fields land at TLFS offsets 0, 8, 15, 16, 24, 28");
	ok(all_zero(calls[0].in, 12, 15) && all_zero(calls[0].in, 40, 4096),
	   "reserved bytes and the rest of the input page are zero");
	ok(ndeposits == 1 && deposits[0].id == 0x1234 && deposits[0].pages == 90,
	   "create_vp deposits 90 pages into the target partition first");
	ok(irq_depth == 0, "hypercall pages released");
}

static void test_fast_call(void)
{
	int r;

	reset(succeed_all);
	r = mshvr_hvcall_delete_vp(0x99, 4, NULL);
	ok(r == 0 && ncalls == 1 && calls[0].fast, "delete_vp is issued fast");
	ok((calls[0].control & 0xffff) == 0x4f && (calls[0].control & (1ULL << 16)),
	   "fast control word has code 0x4f and the fast bit");
	ok(calls[0].in0 == 0x99 && calls[0].in1 == 4, "fast input in two registers");
}

static void test_deposit_retry(void)
{
	struct mshvr_hv_output_partition_id out = { 0 };
	u64 banks[2] = { 1, 2 };
	u16 st = 0xffff;
	int r;

	reset(oom_then_succeed);
	oom_left = 2;
	r = mshvr_hvcall_create_vp(0x1234, 0, 0, 0, 0, 0, 0, &st);
	ok(r == 0 && ncalls == 3 && st == 0, "create_vp retried after two INSUFFICIENT_MEMORY");
	ok(ndeposits == 3 && deposits[1].pages == 1 && deposits[2].pages == 1 &&
	   deposits[1].id == 0x1234, "one page per retry into the target");

	reset(oom_then_succeed);
	oom_left = 1;
	r = mshvr_hvcall_create_partition(0, 0, 0, 0x609, banks, 0, 0, &out, NULL);
	ok(r == 0 && ndeposits == 1 && deposits[0].id == ROOT_ID && deposits[0].pages == 1,
	   "create_partition deposits into the root");
	ok(out.partition_id == 42, "output copied from the output page");
	ok(rd64(calls[1].in, 24) == 1 && rd64(calls[1].in, 32) == 2 &&
	   rd32(calls[1].in, 16) == 0x609, "create_partition arrays and compat version at 24/32/16");

	reset(oom_then_succeed);
	oom_left = 1;
	r = mshvr_hvcall_delete_vp(1, 1, &st);
	ok(r == -ENOMEM && st == MSHVR_HV_STATUS_INSUFFICIENT_MEMORY && ndeposits == 0,
	   "a call without a deposit policy returns -ENOMEM and does not deposit");
	ok(nfailures == 1 && strstr(last_failure, "HV_STATUS_INSUFFICIENT_MEMORY"),
	   "the failure is logged with the status name");
}

static u64 pfns[1500];

static void test_rep_batches(void)
{
	u32 done = 0;
	int r, i, good = 1;

	for (i = 0; i < 1500; i++)
		pfns[i] = 0x100000 + i;
	reset(succeed_all);
	r = mshvr_hvcall_map_gpa_pages(5, 0x10, 0x3, pfns, 1200, &done, NULL);
	ok(r == 0 && done == 1200 && ncalls == 3, "1200 pages map in 3 calls");
	ok(rep_count(calls[0].control) == 509 && rep_count(calls[1].control) == 509 &&
	   rep_count(calls[2].control) == 182, "batches of 509, 509, 182 (one page each)");
	ok(rd64(calls[0].in, 8) == 0x10 && rd64(calls[1].in, 8) == 0x10 + 509 &&
	   rd64(calls[2].in, 8) == 0x10 + 1018, "target_gpa_base advances by the pages mapped");
	for (i = 0; i < 182; i++)
		good &= rd64(calls[2].in, 24 + 8 * i) == 0x100000ULL + 1018 + (u64)i;
	ok(good, "the third batch carries pfns 1018..1199 after the 24-byte header");

	reset(succeed_all);
	r = mshvr_hvcall_map_gpa_pages(5, 0, 0x80000003, pfns, 600, &done, NULL);
	ok(r == 0 && rd64(calls[1].in, 8) == 509ULL * 512,
	   "with LARGE_PAGE the base advances 512 pages per rep");

	reset(succeed_all);
	r = mshvr_hvcall_unmap_gpa_pages(5, 0x20, 0, 5000, &done, NULL);
	ok(r == 0 && ncalls == 2 && rep_count(calls[0].control) == 4095 &&
	   rep_count(calls[1].control) == 905 && rd64(calls[1].in, 8) == 0x20 + 4095 &&
	   done == 5000, "unmap (no element list) is bound by the 12-bit rep count only");
}

static void test_rep_resume(void)
{
	u32 done = 0;
	int r, i, starts_ok = 1;

	reset(slow_reps);
	r = mshvr_hvcall_map_gpa_pages(5, 0, 0, pfns, 350, &done, NULL);
	ok(r == 0 && done == 350 && ncalls == 4, "partial completion resumes: 4 calls for 350 reps");
	for (i = 0; i < 4; i++)
		starts_ok &= rep_start(calls[i].control) == (u32)(100 * i) &&
			     rep_count(calls[i].control) == 350;
	ok(starts_ok, "rep start index 0, 100, 200, 300 with the same rep count");
}

static void test_rep_failure(void)
{
	u32 done = 99;
	u16 st;
	int r;

	reset(fail_at_50);
	r = mshvr_hvcall_map_gpa_pages(5, 0, 0, pfns, 300, &done, &st);
	ok(r == -EINVAL && done == 50 && st == MSHVR_HV_STATUS_INVALID_PARAMETER,
	   "a failing rep call reports reps done (50) and the status");
	ok(strstr(last_failure, "map_gpa_pages 0x004b HV_STATUS_INVALID_PARAMETER") != NULL,
	   "failure logged: %s", last_failure);

	reset(no_progress);
	r = mshvr_hvcall_map_gpa_pages(5, 0, 0, pfns, 10, &done, &st);
	ok(r == -EIO && nprotocol == 1 && ncalls == 1,
	   "SUCCESS without progress is a protocol error, not a loop");
}

static void test_rep_output(void)
{
	static u32 names[300];
	static struct mshvr_hv_register_value vals[300];
	u64 out[20];
	u32 done;
	int r, i, good = 1;

	for (i = 0; i < 300; i++)
		names[i] = 0x20000 + i;
	reset(regs_out);
	r = mshvr_hvcall_get_vp_registers(3, 1, 0, names, vals, 300, &done, NULL);
	ok(r == 0 && ncalls == 2 && rep_count(calls[0].control) == 256,
	   "300 registers read in batches of 256 (output page bound)");
	for (i = 0; i < 300; i++)
		good &= vals[i].low == 0x20000 + (u64)i + (i < 256 ? 1000 : 2000) &&
			vals[i].high == ~0ULL;
	ok(good, "every output element copied back in order");

	reset(withdraw_out);
	r = mshvr_hvcall_withdraw_memory(8, 0, 0, out, 20, &done, NULL);
	ok(r == 0 && done == 20 && out[0] == 0x1000 && out[19] == 0x1013,
	   "withdraw returns the pfns from the output page");
}

static void test_varhead(void)
{
	u64 list[3] = { 0x11, 0x22, 0x33 };
	struct mshvr_hv_synthetic_timers_state st;
	int r;

	reset(succeed_all);
	r = mshvr_hvcall_get_vp_state(4, 2, 0, 0x80000000U, 0, 0, &st, list, 3, NULL);
	ok(r == 0 && ((calls[0].control >> 17) & 0x3ff) == 3,
	   "get_vp_state sets the variable header size to the pfn count");
	ok(rd64(calls[0].in, 40) == 0x11 && rd64(calls[0].in, 56) == 0x33 &&
	   rd32(calls[0].in, 16) == 0x80000000U, "pfns follow the 40-byte header");
	r = mshvr_hvcall_get_vp_state(4, 2, 0, 0, 0, 0, &st, list, 600, NULL);
	ok(r == -EINVAL, "a variable header larger than the page is refused");
}

static void test_mbz_guard(void)
{
	int r;

	reset(succeed_all);
	r = mshvr_hvcall_assert_virtual_interrupt(1, 1ULL << 40, 0, 0x30, 0, NULL);
	ok(r == -EINVAL && ncalls == 0 && shim_warnings == 1,
	   "a reserved control bit is refused before the hypercall");
	r = mshvr_hvcall_assert_virtual_interrupt(1, 1ULL << 32, 0, 0x30, 0, NULL);
	ok(r == 0 && ncalls == 1 && rd64(calls[0].in, 8) == 1ULL << 32 &&
	   rd32(calls[0].in, 24) == 0x30, "level-triggered bit 32 and vector at 24 accepted");
}

static u64 dispatch_ready(struct call *c, void *out)
{
	(void)c;
	memcpy(out, "\x02\0\0\0\x01\0\0\0", 8);
	return result(0, 0);
}

static void test_dispatch_irqs_on(void)
{
	struct mshvr_hv_output_dispatch_vp out = { 0 };
	int r;

	reset(dispatch_ready);
	nirqs_on = 0;
	r = mshvr_hvcall_dispatch_vp(0x11, 3, 0x41, 1000, 0, &out, NULL);
	ok(r == 0 && ncalls == 1 && nirqs_on == 1 && preempt_depth == 0 && irq_depth == 0,
	   "dispatch_vp goes through the irqs-on seam on the dispatch pages");
	ok(rd64(calls[0].in, 0) == 0x11 && rd32(calls[0].in, 8) == 3 &&
	   rd32(calls[0].in, 12) == 0x41 && rd64(calls[0].in, 16) == 1000 &&
	   rd64(calls[0].in, 24) == 0 && all_zero(calls[0].in, 32, 4096),
	   "dispatch_vp input: partition, vp, flags, time slice, spec_ctrl, rest zero");
	ok(out.dispatch_state == 2 && out.dispatch_event == 1, "dispatch_vp output copied");
	reset(succeed_all);
	nirqs_on = 0;
	r = mshvr_hvcall_get_vp_registers(1, 0, 0, (const u32[]){ 1 },
					  (struct mshvr_hv_register_value[1]){ 0 }, 1, NULL, NULL);
	ok(r == 0 && nirqs_on == 0, "other calls keep the interrupts-off pages");
}

static void test_tables(void)
{
	const struct mshvr_hvcall_info *i;

	ok(mshvr_hv_status_to_errno(MSHVR_HV_STATUS_INSUFFICIENT_MEMORY) == -ENOMEM &&
	   mshvr_hv_status_to_errno(MSHVR_HV_STATUS_INVALID_PARAMETER) == -EINVAL &&
	   mshvr_hv_status_to_errno(MSHVR_HV_STATUS_ACCESS_DENIED) == -EIO &&
	   mshvr_hv_status_to_errno(0) == 0 && mshvr_hv_status_to_errno(0x7fff) == -EIO,
	   "status to errno");
	ok(!strcmp(mshvr_hv_status_name(0x0b), "HV_STATUS_INSUFFICIENT_MEMORY") &&
	   !strcmp(mshvr_hv_status_name(0x7fff), "HV_STATUS_UNKNOWN"), "status names");
	i = mshvr_hvcall_info(0x50);
	ok(i && i->rep && i->passthrough == MSHVR_PASSTHROUGH_PARTITION &&
	   i->rep_in_size == 4 && i->rep_out_size == 16 && i->rep_batch == 256,
	   "info for get_vp_registers");
	i = mshvr_hvcall_info(0x101);
	ok(i && i->passthrough == MSHVR_PASSTHROUGH_ROOT_AND_PARTITION, "info for 0x101");
	i = mshvr_hvcall_info(0xc2);
	ok(i && i->passthrough == MSHVR_PASSTHROUGH_NONE, "dispatch_vp is not passthrough");
	ok(mshvr_hvcall_info(0x47) == NULL && mshvr_hvcall_info(0xffff) == NULL,
	   "unknown codes have no info");
}

int main(void)
{
	test_simple_fields_and_zeroing();
	test_fast_call();
	test_deposit_retry();
	test_rep_batches();
	test_rep_resume();
	test_rep_failure();
	test_rep_output();
	test_varhead();
	test_mbz_guard();
	test_dispatch_irqs_on();
	test_tables();
	return tap_done();
}
