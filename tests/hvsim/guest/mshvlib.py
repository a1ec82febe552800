"""In-guest test library: runs inside the simulated root partition.

A small library in the spirit of KVM's selftests: thin wrappers over the
/dev/mshv ioctls built on the generated bindings (mshv_spec), a TAP runner
with one behaviour per test function, and a teardown check after every test
(the simulator holds no partitions, deposited pages or mappings, and the
kernel's pinned-page count is back where it started).
"""

import ctypes
import errno
import fcntl
import json
import mmap
import os
import re
import sys
import traceback

import mshv_spec as S

PAGE = 4096


def ioctl(fd, req, arg=None):
    """ioctl with a ctypes struct (mutated in place) or none; returns the result."""
    if arg is None:
        return fcntl.ioctl(fd, req, 0)
    buf = bytearray(bytes(arg))
    try:
        return fcntl.ioctl(fd, req, buf, True)
    finally:
        # the kernel may write the argument back on failure too (status, sizes)
        ctypes.memmove(ctypes.addressof(arg), bytes(buf), len(buf))


def expect_errno(err, fn, *args):
    try:
        fn(*args)
    except OSError as e:
        assert e.errno == err, f"expected {errno.errorcode[err]}, got {errno.errorcode.get(e.errno)}"
        return
    raise AssertionError(f"expected {errno.errorcode[err]}, call succeeded")


def open_mshv():
    return os.open("/dev/mshv", os.O_RDWR | os.O_CLOEXEC)


class GuestMemory:
    """Anonymous user memory to back guest RAM."""

    def __init__(self, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS):
        self.size = size
        self.mm = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def write(self, off, data):
        self.mm[off:off + len(data)] = data

    def read(self, off, n):
        return self.mm[off:off + n]


class Vp:
    def __init__(self, pt, index):
        self.pt = pt
        self.index = index
        self.fd = ioctl(pt.fd, S.MSHV_CREATE_VP, S.mshv_create_vp(vp_index=index))
        self.regmap = mmap.mmap(self.fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=S.MSHV_VP_MMAP_OFFSET_REGISTERS * PAGE)
        self.regs = S.hv_x64_register_page.from_buffer(self.regmap)

    def start_real_mode(self, rip, **gprs):
        """Point the VP at real-mode code at CS=0:rip through the register
        page; gprs sets general registers by name (rax=..., rcx=...)."""
        r = self.regs
        r.rip = rip
        r.segments[1].base = 0          # segments[]: es cs ss ds fs gs
        r.segments[1].selector = 0
        r.dirty |= S.HV_X64_REGISTER_PAGE_DIRTY_IP | S.HV_X64_REGISTER_PAGE_DIRTY_SEGMENT
        order = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
        for name, value in gprs.items():
            r.gp_registers[order.index(name)] = value
            r.dirty |= S.HV_X64_REGISTER_PAGE_DIRTY_GENERAL

    def run(self):
        buf = S.mshv_run_vp()
        ioctl(self.fd, S.MSHV_RUN_VP, buf)
        return S.hv_message.from_buffer_copy(bytes(buf))

    def hvcall(self, code, inp, out_size=0, reps=0):
        return self.pt.hvcall(code, inp, out_size, reps, fd=self.fd)

    def set_regs(self, pairs):
        """SET_VP_REGISTERS passthrough: pairs of (name, low[, high])."""
        hdr = S.hv_input_set_vp_registers(vp_index=self.index)
        body = bytes(hdr)
        for p in pairs:
            a = S.hv_register_assoc(name=p[0])
            a.value.low = p[1]
            a.value.high = p[2] if len(p) > 2 else 0
            body += bytes(a)
        status, reps, _ = self.hvcall(S.HVCALL_SET_VP_REGISTERS, body, reps=len(pairs))
        return status, reps

    def get_regs(self, names):
        hdr = S.hv_input_get_vp_registers(vp_index=self.index)
        body = bytes(hdr) + b"".join(n.to_bytes(4, "little") for n in names)
        status, reps, out = self.hvcall(S.HVCALL_GET_VP_REGISTERS, body, out_size=16 * len(names),
                                        reps=len(names))
        vals = [S.hv_register_value.from_buffer_copy(out[16 * i:16 * i + 16]) for i in range(reps)]
        return status, vals

    def close(self):
        del self.regs
        self.regmap.close()
        os.close(self.fd)


class Partition:
    def __init__(self, mshv_fd, flags=0, initialize=True):
        self.fd = ioctl(mshv_fd, S.MSHV_CREATE_PARTITION,
                        S.mshv_create_partition(pt_flags=flags, pt_isolation=0))
        if initialize:
            ioctl(self.fd, S.MSHV_INITIALIZE_PARTITION)
        self.vps = []

    def map(self, mem, gpa, size=None, flags=None, uaddr=None):
        if flags is None:
            flags = (1 << S.MSHV_SET_MEM_BIT_WRITABLE) | (1 << S.MSHV_SET_MEM_BIT_EXECUTABLE)
        r = S.mshv_user_mem_region(size=size or mem.size, guest_pfn=gpa // PAGE,
                                   userspace_addr=uaddr or mem.addr, flags=flags)
        return ioctl(self.fd, S.MSHV_SET_GUEST_MEMORY, r)

    def unmap(self, mem, gpa, size=None, uaddr=None):
        r = S.mshv_user_mem_region(size=size or mem.size, guest_pfn=gpa // PAGE,
                                   userspace_addr=uaddr or mem.addr,
                                   flags=1 << S.MSHV_SET_MEM_BIT_UNMAP)
        return ioctl(self.fd, S.MSHV_SET_GUEST_MEMORY, r)

    def vp(self, index=0):
        v = Vp(self, index)
        self.vps.append(v)
        return v

    def hvcall(self, code, inp, out_size=0, reps=0, fd=None):
        """MSHV_ROOT_HVCALL; returns (status, reps completed, output bytes)."""
        inbuf = ctypes.create_string_buffer(bytes(inp), max(len(inp), 8))
        outbuf = ctypes.create_string_buffer(out_size) if out_size else None
        a = S.mshv_root_hvcall(code=code, reps=reps, in_sz=len(inp), out_sz=out_size,
                               in_ptr=ctypes.addressof(inbuf),
                               out_ptr=ctypes.addressof(outbuf) if outbuf else 0)
        try:
            ioctl(self.fd if fd is None else fd, S.MSHV_ROOT_HVCALL, a)
        except OSError as e:
            e.hv_status = a.status
            raise
        return a.status, a.reps, (outbuf.raw if outbuf else b"")

    def close(self):
        for v in self.vps:
            v.close()
        self.vps = []
        os.close(self.fd)


# -- introspection --------------------------------------------------------

def sim_query():
    """The simulator's report (JSON from debugfs mshv_hvsim/query)."""
    with open("/sys/kernel/debug/mshv_hvsim/query") as f:
        return json.loads(f.read())


def sim_control(command):
    """Fault injection in the simulator (debugfs mshv_hvsim/control)."""
    with open("/sys/kernel/debug/mshv_hvsim/control", "w") as f:
        f.write(command)


def pinned_pages():
    """Pages pinned with FOLL_PIN and not yet released (from /proc/vmstat).
    The counters are per-CPU with lazy folding: refresh them first."""
    with open("/proc/sys/vm/stat_refresh", "w") as f:
        f.write("1")
    v = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, n = line.split()
            v[k] = int(n)
    return v.get("nr_foll_pin_acquired", 0) - v.get("nr_foll_pin_released", 0)


def free_pages():
    """Free pages in the kernel: the buddy allocator's count plus the pages
    sitting on per-CPU lists (not counted as free in /proc/vmstat)."""
    with open("/proc/sys/vm/stat_refresh", "w") as f:
        f.write("1")
    total = 0
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("nr_free_pages "):
                total += int(line.split()[1])
    with open("/proc/zoneinfo") as f:
        for line in f:
            w = line.split()
            if len(w) == 2 and w[0] == "count:":
                total += int(w[1])
    return total


def slabinfo():
    """/proc/slabinfo as {cache: (active objects, object size)}. The root
    boots with slub_debug and slab_nomerge, which makes the counts exact
    (debug caches keep no per-CPU slabs) and gives every cache its own
    line."""
    caches = {}
    with open("/proc/slabinfo") as f:
        for line in f:
            w = line.split()
            if len(w) > 3 and not line.startswith(("#", "slabinfo")):
                caches[w[0]] = (int(w[1]), int(w[3]))
    return caches


def kmalloc_bytes(caches):
    """Bytes in use in the kmalloc caches (kmalloc-*, the cgroup-accounted
    and DMA variants; not the reclaimable ones)."""
    return sum(n * size for name, (n, size) in caches.items()
               if name.startswith(("kmalloc-", "kmalloc-cg-", "dma-kmalloc-"))
               and not name.startswith("kmalloc-rcl-"))


# The driver's own object caches (mshv/main.c): none may outlive a test.
MODULE_CACHES = ("mshvr_partition", "mshvr_vp", "mshvr_region", "mshvr_irqfd", "mshvr_ioeventfd")


def own_pages():
    """Pages this process holds itself: anonymous memory and page tables
    (thread stacks that glibc keeps for reuse, on 6.1 sometimes a whole
    transparent huge page each, land here)."""
    kb = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "VmPTE"):
                kb[k] = int(v.split()[0])
    return (kb.get("RssAnon", 0) + kb.get("VmPTE", 0)) // 4


def module_refcount():
    with open("/sys/module/mshv_root/refcnt") as f:
        return int(f.read())


# kmalloc bytes a test may leave allocated: the runner's own file opens and
# debugfs reads leave 128 to 2304 bytes (measured on 6.1 and 6.12, the most
# in tests that start threads). A leaked transient buffer of the driver (a
# 4 KiB PFN list or bounce page, 4096 bytes) is above it.
KMALLOC_TOLERANCE = 3072
# kmalloc bytes that come with each kernel task started during a test
# (measured: 992 per task for a workqueue worker on 6.12)
KMALLOC_PER_TASK = 1024

# Pages a test may leave allocated without being called a leak: the test
# process's own heap, page tables and slab growth. Measured at most about
# 40 pages per test in every suite (docs/hvsim-model.md, "Leak checks"); the
# smallest driver leak that matters, the 208 pages deposited to initialize a
# partition, is well above it.
FREE_PAGES_TOLERANCE = 128


class Baseline:
    """What the teardown check compares against, taken before each test."""

    def __init__(self):
        q = sim_query()
        self.violations = len(q["contract_violations"])
        self.pins = pinned_pages()
        self.own = own_pages()
        self.free = free_pages()
        self.slabs = slabinfo()
        self.kmalloc = kmalloc_bytes(self.slabs)


def assert_clean(base):
    """After a test: nothing the test made is left anywhere. The simulator
    holds no child partitions, deposited pages, mappings or root pool
    charges, and saw no teardown-order violation; Linux has no extra pinned
    pages, no module reference, no driver object (MODULE_CACHES), and within
    stated tolerances no fewer free pages and no more kmalloc memory."""
    q = sim_query()
    assert q["partitions"] == [], f"simulator still holds partitions {q['partitions']}"
    assert q["deposited_pages"] == 0, f"{q['deposited_pages']} pages still deposited"
    assert q["mappings"] == 0, f"{q['mappings']} GPA mappings left"
    assert q["root_pool_used"] == 0, f"{q['root_pool_used']} root pool pages still charged"
    assert q["ports"] == 0 and q["connections"] == 0, \
        f"{q['ports']} ports and {q['connections']} connections left in the hypervisor"
    new = q["contract_violations"][base.violations:]
    assert not new, "teardown order: " + "; ".join(new)
    pins = pinned_pages()
    assert pins == base.pins, f"pinned pages {pins}, started with {base.pins}"
    refs = module_refcount()
    assert refs == 0, f"mshv_root has {refs} references with every fd closed"
    # pages the test process itself kept (its heap, thread stacks, page
    # tables) are not the kernel's to give back
    lost = base.free - free_pages() - max(0, own_pages() - base.own)
    if lost > FREE_PAGES_TOLERANCE:
        # a freshly freed page can take a moment to reach a free list
        # (RCU-deferred frees): look once more before calling it a leak
        import time
        time.sleep(0.2)
        lost = base.free - free_pages() - max(0, own_pages() - base.own)
    assert lost <= FREE_PAGES_TOLERANCE, \
        f"{lost} pages fewer free than before the test (tolerance {FREE_PAGES_TOLERANCE})"
    caches = slabinfo()
    for name in MODULE_CACHES:
        assert name in caches, f"no slab cache {name} (is the module loaded?)"
        assert caches[name][0] == 0, f"{caches[name][0]} {name} objects still allocated"
    grown = kmalloc_bytes(caches) - base.kmalloc
    if grown > KMALLOC_TOLERANCE:
        # objects freed after an RCU grace period may still be on their way
        import time
        time.sleep(0.2)
        caches = slabinfo()
        grown = kmalloc_bytes(caches) - base.kmalloc
    deltas = {n: c[0] - base.slabs.get(n, (0, 0))[0] for n, c in caches.items()
              if c[0] != base.slabs.get(n, (0, 0))[0]}
    # a kernel thread the kernel started meanwhile (a workqueue worker, for
    # one) brings its own kmalloc objects: allowed per new task
    tasks = max(0, deltas.get("task_struct", 0))
    tolerance = KMALLOC_TOLERANCE + KMALLOC_PER_TASK * tasks
    assert grown <= tolerance, \
        f"kmalloc caches hold {grown} bytes more than before (tolerance {tolerance}); " \
        f"objects per cache: {deltas}"
    return lost, grown


# -- TAP runner -----------------------------------------------------------

class KernelLog:
    """New kernel log records since the last look (/dev/kmsg, opened once)."""

    # What a driver bug looks like in the kernel log: warnings, BUGs
    # (including slab debug reports), oopses, lock and RCU trouble, and the
    # module's own LEAK lines.
    SPLAT = re.compile(r"WARNING:|\bBUG[: ]|Oops|general protection fault|"
                       r"rcu: INFO|rcu_\w+ (self-)?detected stall|soft lockup|hard LOCKUP|"
                       r"blocked for more than|circular locking|recursive locking|"
                       r"UBSAN:|KASAN:|Poison overwritten|Redzone|\bLEAK:")

    def __init__(self):
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def read(self):
        lines = []
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:        # overwritten records: go on
                continue
            if not rec:
                break
            lines.append(rec.decode(errors="replace").split(";", 1)[-1].strip())
        return lines

    @staticmethod
    def mark(text):
        """A line in the kernel log, so a splat on the console can be traced
        to the test that was running."""
        with open("/dev/kmsg", "w") as f:
            f.write(f"<5>{text}\n")


def open_fds():
    """The fds open now (without the one os.listdir used for the listing:
    it is closed again, and the next open may reuse its number)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(name)
    return fds


def _close_new_fds(before):
    """After a failed test: close what it left open, so the next test starts clean."""
    import gc
    gc.collect()
    for fd in open_fds() - before:
        try:
            os.close(int(fd))
        except OSError:
            pass


def expects_kernel_log(*patterns):
    """Decorator: the test provokes these kernel log lines on purpose (regular
    expressions); they do not fail it. Anything else that looks like a splat
    still does. A WARN panics the root unless the suite is booted with
    expect_warnings (see tests/hvsim/sim.py)."""
    def wrap(fn):
        fn.expected_kernel_log = [re.compile(p) for p in patterns]
        return fn
    return wrap


def run_tests(namespace, only=None):
    tests = sorted((n, f) for n, f in namespace.items() if n.startswith("test_") and callable(f))
    if only:
        tests = [(n, f) for n, f in tests if n in only]
    print("TAP version 13")
    print(f"1..{len(tests)}")
    # THP only where asked for (MADV_HUGEPAGE): with "always", 6.1 backs
    # thread stacks with huge pages that sit on the deferred-split list
    # after the thread exits, neither free nor ours, and the free-page check
    # would count 510 pages per test that starts threads
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", "w") as f:
            f.write("madvise")
    except OSError:
        pass
    klog = KernelLog()
    failed = 0
    for i, (name, fn) in enumerate(tests, 1):
        print(f"# hvsim-test: start {name}")
        sys.stdout.flush()
        KernelLog.mark(f"hvsim-test: start {name}")
        klog.read()
        base = Baseline()
        fds = open_fds()
        diag = []
        try:
            fn()
            lost, kgrow = assert_clean(base)
            diag.append(f"free pages lost: {lost}, kmalloc bytes grown: {kgrow}")
            allowed = getattr(fn, "expected_kernel_log", [])
            splats = [ln for ln in klog.read() if KernelLog.SPLAT.search(ln)
                      and not any(p.search(ln) for p in allowed)]
            assert not splats, "the kernel reported:\n" + "\n".join(splats[:20])
            print(f"ok {i} - {name}")
        except Exception:   # noqa: BLE001 - report every failure as TAP
            failed += 1
            print(f"not ok {i} - {name}")
            for line in traceback.format_exc().splitlines():
                print(f"# {line}")
            _close_new_fds(fds)
            for line in [ln for ln in klog.read() if "mshv" in ln or "hvsim" in ln][-15:]:
                print(f"# dmesg: {line}")
        for line in diag:
            print(f"# {line}")
        sys.stdout.flush()
        KernelLog.mark(f"hvsim-test: end {name}")
    print(f"# {len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0
