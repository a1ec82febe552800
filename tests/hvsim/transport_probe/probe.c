// SPDX-License-Identifier: GPL-2.0
/*
 * hvsim transport probe.
 *
 * Exercises the guest side of the hvsim transport (docs/hvsim-transport.md):
 *
 *  - doorbell: the 32-bit word (page-aligned GPA of a request page | cpu),
 *    written as 4 outb's to an isa-debugcon port; QEMU forwards the bytes
 *    to the host simulator over a unix socket.  The host writes the response
 *    into the request page (guest RAM is a shared file) and finally sets the
 *    header's state word to HVSIM_STATE_DONE; the guest spins on that word.
 *  - interrupt: a 16550 UART at a non-standard port/IRQ (not claimed by the
 *    8250 driver because the guest boots with pnpacpi=off).  Every byte the
 *    host writes to the UART's socket raises an RX interrupt handled here.
 *
 * At load it rings the doorbell nreq times from every online CPU at the same
 * time (one bound kthread per CPU), checks each answer, then asks the host
 * for nirq interrupts per CPU with the IRQ affined to that CPU, and prints
 *   hvsim-probe: RESULT PASS|FAIL ...
 */

#define pr_fmt(fmt) "hvsim-probe: " fmt

#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/cpumask.h>
#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/irq.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/slab.h>
#include <linux/wait.h>

static ushort doorbell_port = 0x4f0;
module_param(doorbell_port, ushort, 0444);
MODULE_PARM_DESC(doorbell_port, "isa-debugcon iobase used as doorbell");
static ushort irq_port = 0x2a0;
module_param(irq_port, ushort, 0444);
MODULE_PARM_DESC(irq_port, "16550 UART iobase used for host interrupts");
static int irq = 5;
module_param(irq, int, 0444);
MODULE_PARM_DESC(irq, "ISA IRQ of the UART");
static uint nreq = 1000;
module_param(nreq, uint, 0444);
MODULE_PARM_DESC(nreq, "doorbell requests per CPU");
static uint nirq = 16;
module_param(nirq, uint, 0444);
MODULE_PARM_DESC(nirq, "host interrupts requested per CPU");

/* ---- transport: shared definitions (mirrored in tests/hvsim/transport.py) */

#define HVSIM_DEBUGCON_READBACK	0xe9	/* what inb() on isa-debugcon returns */
#define HVSIM_STATE_PENDING	1	/* guest: request posted */
#define HVSIM_STATE_DONE	2	/* host: response written */
#define HVSIM_CPU_MASK		0xfffu	/* low 12 bits of the doorbell word */
#define HVSIM_TIMEOUT_NS	(10ULL * NSEC_PER_SEC)

/* Header at offset 0 of every request page; the payload follows. */
struct hvsim_hdr {
	u32 state;		/* HVSIM_STATE_*; the host writes DONE last */
	u32 cpu;		/* cpu that rang (also in the doorbell word) */
	u64 seq;		/* free for the caller (debugging) */
};

/* UART registers (offsets from irq_port) */
#define HVSIM_UART_RBR 0
#define HVSIM_UART_IER 1
#define HVSIM_UART_IIR 2
#define HVSIM_UART_FCR 2
#define HVSIM_UART_LCR 3
#define HVSIM_UART_MCR 4
#define HVSIM_UART_LSR 5
#define HVSIM_UART_LSR_DR	0x01
#define HVSIM_UART_IER_RDI	0x01
#define HVSIM_UART_MCR_DTR_RTS_OUT2	0x0b

/*
 * isa-debugcon only accepts 1-byte accesses (an outl is dropped), so the
 * 32-bit doorbell word goes out as 4 outb's, little endian.  The lock keeps
 * the 4 bytes of two CPUs from interleaving in the byte stream.
 */
static DEFINE_RAW_SPINLOCK(hvsim_ring_lock);

static void hvsim_ring(u32 word)
{
	unsigned long flags;

	raw_spin_lock_irqsave(&hvsim_ring_lock, flags);
	outb(word, doorbell_port);
	outb(word >> 8, doorbell_port);
	outb(word >> 16, doorbell_port);
	outb(word >> 24, doorbell_port);
	raw_spin_unlock_irqrestore(&hvsim_ring_lock, flags);
}

/*
 * Ring the doorbell for the request page starting with @hdr (page aligned,
 * below 4 GiB, payload already filled) and spin until the host marks it
 * done.  Must be called with interrupts off (the page is per-CPU).
 * Returns 0, -EINVAL (bad page) or -ETIMEDOUT.
 */
static int hvsim_doorbell(struct hvsim_hdr *hdr, unsigned int cpu)
{
	phys_addr_t pa = virt_to_phys(hdr);
	u64 start = ktime_get_ns();

	if (WARN_ON_ONCE(offset_in_page(hdr) || upper_32_bits(pa)))
		return -EINVAL;
	WRITE_ONCE(hdr->cpu, cpu);
	WRITE_ONCE(hdr->state, HVSIM_STATE_PENDING);
	/* Request stores must reach RAM before the host is told. */
	wmb();
	hvsim_ring((u32)pa | (cpu & HVSIM_CPU_MASK));
	while (READ_ONCE(hdr->state) != HVSIM_STATE_DONE) {
		cpu_relax();
		if (ktime_get_ns() - start > HVSIM_TIMEOUT_NS)
			return -ETIMEDOUT;
	}
	/* Response reads must not pass the state read. */
	rmb();
	return 0;
}

/* Drain the host->guest UART; returns the number of bytes read. */
static unsigned int hvsim_irq_drain(u32 *sum)
{
	unsigned int n = 0;

	while (inb(irq_port + HVSIM_UART_LSR) & HVSIM_UART_LSR_DR) {
		u8 v = inb(irq_port + HVSIM_UART_RBR);

		if (sum)
			*sum += v;
		n++;
	}
	return n;
}

/* 8N1, no FIFO (one byte = one RX interrupt, back-pressure in QEMU). */
static void hvsim_irq_hw_init(void)
{
	outb(0x03, irq_port + HVSIM_UART_LCR);
	outb(0x00, irq_port + HVSIM_UART_FCR);
	outb(HVSIM_UART_MCR_DTR_RTS_OUT2, irq_port + HVSIM_UART_MCR);
	hvsim_irq_drain(NULL);
	inb(irq_port + HVSIM_UART_IIR);
	outb(HVSIM_UART_IER_RDI, irq_port + HVSIM_UART_IER);
}

static void hvsim_irq_hw_fini(void)
{
	outb(0, irq_port + HVSIM_UART_IER);
	outb(0, irq_port + HVSIM_UART_MCR);
}

/* ---- probe protocol (payload after the header) ----------------------- */

enum probe_op {
	PROBE_OP_ECHO = 1,	/* result = arg * 3 + cpu */
	PROBE_OP_IRQS = 2,	/* host raises arg interrupts after replying */
};

struct probe_req {
	struct hvsim_hdr hdr;
	u32 op;
	u32 pad;
	u64 arg;
	u64 result;
};

static struct probe_req *__percpu *req_pages;

static atomic_t irq_count = ATOMIC_INIT(0);	/* bytes received */
static atomic_t irq_calls = ATOMIC_INIT(0);	/* handler invocations */
static atomic_t irq_sum = ATOMIC_INIT(0);
static DEFINE_PER_CPU(unsigned int, irq_on_cpu);
static DECLARE_WAIT_QUEUE_HEAD(irq_wq);

static irqreturn_t probe_irq_handler(int this_irq, void *dev)
{
	u32 sum = 0;
	unsigned int n = hvsim_irq_drain(&sum);

	if (!n)
		return IRQ_NONE;
	this_cpu_inc(irq_on_cpu);
	atomic_inc(&irq_calls);
	atomic_add(sum, &irq_sum);
	atomic_add(n, &irq_count);
	wake_up(&irq_wq);
	return IRQ_HANDLED;
}

/* One request on the current CPU's page; returns 0 or -errno. */
static int probe_call(u32 op, u64 arg, u64 *result)
{
	struct probe_req *r;
	unsigned long flags;
	unsigned int cpu;
	int ret;

	local_irq_save(flags);
	cpu = smp_processor_id();
	r = *per_cpu_ptr(req_pages, cpu);
	r->op = op;
	r->arg = arg;
	r->result = 0;
	r->hdr.seq++;
	ret = hvsim_doorbell(&r->hdr, cpu);
	*result = r->result;
	local_irq_restore(flags);
	return ret;
}

struct cpu_work {
	struct completion done;
	unsigned int ok, bad;
	u64 ns;
	int err;
};

static struct cpu_work *works;
static struct completion go;

static int probe_thread(void *data)
{
	struct cpu_work *w = data;
	unsigned int i, cpu = smp_processor_id();
	u64 t0, res;

	wait_for_completion(&go);	/* start all CPUs together */
	t0 = ktime_get_ns();
	for (i = 0; i < nreq; i++) {
		u64 arg = ((u64)cpu << 32) | i;

		w->err = probe_call(PROBE_OP_ECHO, arg, &res);
		if (w->err)
			break;
		if (res == arg * 3 + cpu)
			w->ok++;
		else
			w->bad++;
	}
	w->ns = ktime_get_ns() - t0;
	complete(&w->done);
	return 0;
}

static int irq_requested;

static int __init probe_init(void)
{
	unsigned int cpu, ok = 0, bad = 0, ncpu = 0, irq_cpus = 0;
	unsigned int want_irqs = 0, got;
	u64 sum_ns = 0, res;
	bool pass = true;
	int ret;

	if (inb(doorbell_port) != HVSIM_DEBUGCON_READBACK) {
		pr_err("no isa-debugcon at %#x\n", doorbell_port);
		return -ENODEV;
	}
	if (!request_region(irq_port, 8, "hvsim-irq")) {
		pr_err("port %#x busy (8250 driver bound? boot with pnpacpi=off)\n",
		       irq_port);
		return -EBUSY;
	}

	req_pages = alloc_percpu(struct probe_req *);
	works = kcalloc(nr_cpu_ids, sizeof(*works), GFP_KERNEL);
	if (!req_pages || !works) {
		ret = -ENOMEM;
		goto out;
	}
	for_each_online_cpu(cpu) {
		/* A whole page: the doorbell word carries only bits 12..31. */
		unsigned long p = get_zeroed_page(GFP_KERNEL | GFP_DMA32);

		if (!p) {
			ret = -ENOMEM;
			goto out;
		}
		*per_cpu_ptr(req_pages, cpu) = (struct probe_req *)p;
	}

	hvsim_irq_hw_init();
	ret = request_irq(irq, probe_irq_handler, 0, "hvsim-probe", &irq_wq);
	if (ret) {
		pr_err("request_irq(%d) failed: %d\n", irq, ret);
		goto out;
	}
	irq_requested = 1;

	/* 1. doorbells from every online CPU concurrently */
	init_completion(&go);
	for_each_online_cpu(cpu) {
		struct task_struct *t;

		init_completion(&works[cpu].done);
		t = kthread_create_on_cpu(probe_thread, &works[cpu], cpu,
					  "hvsim-probe/%u");
		if (IS_ERR(t)) {
			/* let the threads already started run to the end */
			complete_all(&go);
			for (; ncpu; ncpu--)
				wait_for_completion(&works[cpumask_nth(ncpu - 1, cpu_online_mask)].done);
			ret = PTR_ERR(t);
			goto out;
		}
		wake_up_process(t);
		ncpu++;
	}
	complete_all(&go);
	for_each_online_cpu(cpu) {
		struct cpu_work *w = &works[cpu];

		wait_for_completion(&w->done);
		ok += w->ok;
		bad += w->bad;
		sum_ns += w->ns;
		pr_info("cpu%u: %u ok %u bad err=%d avg_rtt_ns=%llu\n", cpu,
			w->ok, w->bad, w->err, w->ok ? w->ns / w->ok : 0);
		if (w->err)
			pass = false;
	}
	if (ok != ncpu * nreq || bad)
		pass = false;

	/* 2. host interrupts, routed to each CPU in turn */
	for_each_online_cpu(cpu) {
		unsigned int before = atomic_read(&irq_count);

		ret = irq_set_affinity(irq, cpumask_of(cpu));
		if (ret)
			pr_warn("irq_set_affinity(cpu%u): %d\n", cpu, ret);
		want_irqs += nirq;
		ret = probe_call(PROBE_OP_IRQS, nirq, &res);
		if (ret || res != nirq) {
			pr_err("IRQS request failed: %d res=%llu\n", ret, res);
			pass = false;
			break;
		}
		wait_event_timeout(irq_wq,
				   atomic_read(&irq_count) - before >= nirq,
				   10 * HZ);
	}
	got = atomic_read(&irq_count);
	for_each_online_cpu(cpu) {
		pr_info("cpu%u: %u interrupt handler calls\n", cpu,
			per_cpu(irq_on_cpu, cpu));
		if (per_cpu(irq_on_cpu, cpu))
			irq_cpus++;
	}
	/* host sends bytes 1..nirq for each batch */
	if (got != want_irqs ||
	    atomic_read(&irq_sum) != ncpu * (nirq * (nirq + 1) / 2))
		pass = false;

	pr_info("RESULT %s cpus=%u doorbells=%u/%u bad=%u avg_rtt_ns=%llu "
		"irqs=%u/%u irq_sum=%d irq_calls=%d irq_cpus=%u\n",
		pass ? "PASS" : "FAIL", ncpu, ok, ncpu * nreq, bad,
		ok ? sum_ns / ok : 0, got, want_irqs,
		atomic_read(&irq_sum), atomic_read(&irq_calls), irq_cpus);
	return 0;	/* stay loaded; rmmod exercises the teardown */
out:
	if (irq_requested)
		free_irq(irq, &irq_wq);
	irq_requested = 0;
	hvsim_irq_hw_fini();
	release_region(irq_port, 8);
	if (req_pages)
		for_each_possible_cpu(cpu)
			free_page((unsigned long)*per_cpu_ptr(req_pages, cpu));
	free_percpu(req_pages);
	kfree(works);
	return ret;
}

static void __exit probe_exit(void)
{
	unsigned int cpu;

	hvsim_irq_hw_fini();
	if (irq_requested)
		free_irq(irq, &irq_wq);
	release_region(irq_port, 8);
	for_each_possible_cpu(cpu)
		free_page((unsigned long)*per_cpu_ptr(req_pages, cpu));
	free_percpu(req_pages);
	kfree(works);
	pr_info("unloaded\n");
}

module_init(probe_init);
module_exit(probe_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("hvsim transport probe (doorbell + host interrupt)");
