"""The Hyper-V platform a child partition's guest sees (docs/hvsim-model.md,
"What the guest sees").

- hypervisor CPUID leaves 0x40000000-0x4000000A, derived from the
  partition's SYNTHETIC_PROC_FEATURES property (what the VMM assigns) and
  PRIVILEGE_FLAGS, restricted to what this model implements;
- synthetic MSRs: guest OS id, hypercall page, VP index, VP runtime,
  reference counter, reference TSC page, TSC/APIC frequency, the APIC MSRs
  (hv.py), the VP assist page, the guest SynIC (SCONTROL, SVERSION, SIEFP,
  SIMP, EOM, SINT0-15) and synthetic timers 0-3 (one-shot and periodic,
  direct and message mode);
- IA32_TSC_DEADLINE for the local APIC timer (apic.py);
- guest hypercalls through VMCALL;
- one time base (Clock) and one timer thread per Hypervisor (TimerThread).

A synthetic MSR or hypercall that is not advertised is absent: the MSR
access raises #GP, the hypercall returns HV_STATUS_ACCESS_DENIED.

Every Hyper-V constant comes from the bindings (S.*). x86 architectural
numbers (CPUID.1 bits, the IA32_TSC_DEADLINE index, VMCALL/RET encodings,
exception vectors) are written here.
"""

import heapq
import itertools
import struct
import threading
import time

from . import apic as A
from . import spec
from .spec import S

U64 = (1 << 64) - 1
# x86 architectural numbers
MSR_IA32_TSC_DEADLINE = 0x6E0
CPUID1_ECX_TSC_DEADLINE = 1 << 24
CPUID1_ECX_HYPERVISOR = 1 << 31
VEC_UD, VEC_GP = 6, 13
VMCALL, VMMCALL, RET, INT3 = b"\x0F\x01\xC1", b"\x0F\x01\xD9", b"\xC3", b"\xCC"
CR0_PE = 1

SYNTHETIC_MSR_FIRST, SYNTHETIC_MSR_LAST = 0x40000000, 0x400001FF
HV_CPUID_MAX_LEAF = S.HYPERV_CPUID_NESTED_FEATURES       # 0x40000007-0x4000000A read as 0
HV_VENDOR = struct.unpack("<3I", b"Microsoft Hv")
# what 0x40000002 reports: build, major.minor (10.0), service pack 0, branch/number 0
HV_BUILD, HV_VERSION = 26100, (10 << 16) | 0

SINT_COUNT = S.HV_SYNIC_SINT_COUNT
STIMER_COUNT = S.HV_SYNIC_STIMER_COUNT
MSG_SIZE = S.hv_message.SIZE

F = spec.enum("hv_partition_synthetic_proc_feature")


def _f(name):
    return F["HV_SYNTHETIC_PROC_FEATURE_" + name]


# What a child gets when its VMM never sets SYNTHETIC_PROC_FEATURES: the set
# mshv-ioctls (Cloud Hypervisor) assigns.
DEFAULT_SYNTHETIC_FEATURES = 0
for _n in ("HYPERVISOR_PRESENT", "HV1", "ACCESS_PARTITION_REFERENCE_COUNTER", "ACCESS_SYNIC_REGS",
           "ACCESS_SYNTHETIC_TIMER_REGS", "ACCESS_INTR_CTRL_REGS", "ACCESS_HYPERCALL_REGS", "ACCESS_VP_INDEX",
           "ACCESS_PARTITION_REFERENCE_TSC", "ACCESS_GUEST_IDLE_REG", "ACCESS_FREQUENCY_REGS",
           "TB_FLUSH_HYPERCALLS", "SYNTHETIC_CLUSTER_IPI", "DIRECT_SYNTHETIC_TIMERS"):
    DEFAULT_SYNTHETIC_FEATURES |= _f(_n)

# The features this model implements; anything else the VMM sets is not offered.
IMPLEMENTED_FEATURES = 0
for _n in ("HYPERVISOR_PRESENT", "HV1", "ACCESS_VP_RUN_TIME_REG", "ACCESS_PARTITION_REFERENCE_COUNTER",
           "ACCESS_SYNIC_REGS", "ACCESS_SYNTHETIC_TIMER_REGS", "ACCESS_INTR_CTRL_REGS", "ACCESS_HYPERCALL_REGS",
           "ACCESS_VP_INDEX", "ACCESS_PARTITION_REFERENCE_TSC", "ACCESS_FREQUENCY_REGS",
           "DIRECT_SYNTHETIC_TIMERS", "EXTENDED_PROCESSOR_MASKS", "TB_FLUSH_HYPERCALLS",
           "SYNTHETIC_CLUSTER_IPI", "NOTIFY_LONG_SPIN_WAIT"):
    IMPLEMENTED_FEATURES |= _f(_n)

# synthetic feature -> partition privilege bit (CPUID 0x40000003 EAX/EBX)
_PRIV = {
    "ACCESS_VP_RUN_TIME_REG": S.HV_PARTITION_PRIVILEGE_ACCESS_VP_RUNTIME_REG,
    "ACCESS_PARTITION_REFERENCE_COUNTER": S.HV_PARTITION_PRIVILEGE_ACCESS_PARTITION_REFERENCE_COUNTER,
    "ACCESS_SYNIC_REGS": S.HV_PARTITION_PRIVILEGE_ACCESS_SYNIC_REGS,
    "ACCESS_SYNTHETIC_TIMER_REGS": S.HV_PARTITION_PRIVILEGE_ACCESS_SYNTHETIC_TIMER_REGS,
    "ACCESS_INTR_CTRL_REGS": S.HV_PARTITION_PRIVILEGE_ACCESS_INTR_CTRL_REGS,
    "ACCESS_HYPERCALL_REGS": S.HV_PARTITION_PRIVILEGE_ACCESS_HYPERCALL_MSRS,
    "ACCESS_VP_INDEX": S.HV_PARTITION_PRIVILEGE_ACCESS_VP_INDEX,
    "ACCESS_PARTITION_REFERENCE_TSC": S.HV_PARTITION_PRIVILEGE_ACCESS_PARTITION_REFERENCE_TSC,
    "ACCESS_GUEST_IDLE_REG": S.HV_PARTITION_PRIVILEGE_ACCESS_GUEST_IDLE_REG,
    "ACCESS_FREQUENCY_REGS": S.HV_PARTITION_PRIVILEGE_ACCESS_FREQUENCY_REGS,
    "SIGNAL_EVENTS": S.HV_PARTITION_PRIVILEGE_SIGNAL_EVENTS,
}


def fault(vector, error_code=None):
    """The 'exception' verdict of decide()."""
    return "exception", {"vector": vector, "error_code": error_code}


GP = fault(VEC_GP, 0)
UD = fault(VEC_UD)


# ====================================================================== time
class Clock:
    """The guest's time base. Model time is time.monotonic_ns(); the guest
    TSC is linear in it, exactly as the engine's virtual TSC (cpu.py,
    Engine.tsc(); the patched Unicorn's RDTSC):

        tsc(ns) = ns * hz // 10**9 - hz * base_ns // 10**9

    where base_ns is the partition's `tsc_base_ns` (0 unless set)."""

    def __init__(self, hz):
        self.hz = int(hz)

    @staticmethod
    def now_ns():
        return time.monotonic_ns()

    def tsc(self, ns=None, base_ns=0):
        ns = self.now_ns() if ns is None else ns
        return (ns * self.hz // 1_000_000_000 - self.hz * base_ns // 1_000_000_000) & U64

    def ns_at_tsc(self, tsc, base_ns=0):
        """The first monotonic ns at which tsc(ns) >= `tsc`."""
        t = tsc + self.hz * base_ns // 1_000_000_000
        return -((-t * 1_000_000_000) // self.hz)


class TimerThread:
    """One thread per Hypervisor firing callbacks at monotonic deadlines.
    arm() returns a handle; cancel(handle) makes it a no-op. Callbacks run on
    this thread without its lock held (they take the model lock)."""

    def __init__(self, name="hvsim-timers"):
        self._cond = threading.Condition()
        self._heap = []
        self._seq = itertools.count()
        self._thread = None
        self._closed = False
        self._name = name

    def arm(self, deadline_ns, fn):
        h = [deadline_ns, next(self._seq), fn, False]
        with self._cond:
            if self._closed:
                return h
            heapq.heappush(self._heap, h)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()
            self._cond.notify()
        return h

    @staticmethod
    def cancel(h):
        if h is not None:
            h[3] = True

    def pending(self):
        with self._cond:
            return sum(1 for h in self._heap if not h[3])

    def close(self):
        with self._cond:
            self._closed = True
            self._heap = []
            self._cond.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)

    def _run(self):
        while True:
            with self._cond:
                fire = None
                while fire is None:
                    if self._closed:
                        return
                    while self._heap and self._heap[0][3]:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic_ns()
                    if delay > 0:
                        self._cond.wait(delay / 1e9)
                        continue
                    fire = heapq.heappop(self._heap)
            if not fire[3]:
                try:
                    fire[2]()
                except Exception as e:          # a broken callback must not stop the clock
                    import sys
                    print("hvsim timer callback failed: %r" % (e,), file=sys.stderr)


# ====================================================================== per-object state
class PartState:
    """Partition-wide guest-visible state."""

    def __init__(self, ref_ns0):
        self.ref_ns0 = ref_ns0           # reference counter = 0 here
        self.guest_os_id = 0
        self.hypercall = 0               # HV_X64_MSR_HYPERCALL
        self.hypercall_saved = None      # (gfn, original bytes) under the hypercall page
        self.ref_tsc = 0                 # HV_X64_MSR_REFERENCE_TSC
        self.tsc_seq = 0
        self.guest_calls = {}            # guest hypercall code -> count


class Stimer:
    def __init__(self, index):
        self.index = index
        self.config = 0
        self.count = 0
        self.due = None                  # reference time (100 ns) of the next expiration
        self.handle = None
        self.fired = 0                   # expirations signalled (for tests and reports)
        self.msg_pending = False         # an expiration message waits for its SINT slot


class VpState:
    """Per-VP guest-visible state: SynIC, synthetic timers, LAPIC timer handle."""

    def __init__(self, vp, now_ns):
        self.vp = vp
        self.created_ns = now_ns
        self.scontrol = 0
        self.simp = 0
        self.siefp = 0
        self.sint = [spec.set_bits(S.hv_synic_sint, "value", "masked", 1)] * SINT_COUNT
        self.queues = [[] for _ in range(SINT_COUNT)]   # messages waiting for their slot
        self.stimers = [Stimer(i) for i in range(STIMER_COUNT)]
        self.lapic_handle = None
        self.assist = 0                  # HV_X64_MSR_VP_ASSIST_PAGE


def _bits(cls, field, name, value):
    lsb, width, _ = cls.BITS[field][name]
    return (value >> lsb) & ((1 << width) - 1)


# ====================================================================== the platform
class GuestPlatform:
    """Attached to a Hypervisor (hv.platform). Methods named *_locked run with
    the model lock held; timer callbacks take it themselves."""

    def __init__(self, hv, clock=None, apic_hz=200_000_000):
        self.hv = hv
        # the TSC runs at the processor clock frequency the root reports
        self.clock = clock or Clock(hv.props_root[S.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY])
        self.apic_hz = apic_hz
        self.timers = TimerThread()
        self.tsc_deadline = True         # CPUID.1:ECX[24] and IA32_TSC_DEADLINE
        self._implemented = None

    def close(self):
        self.timers.close()

    # ------------------------------------------------------------ state
    def part(self, p):
        st = getattr(p, "plat", None)
        if st is None:
            st = p.plat = PartState(self.clock.now_ns())
        return st

    def vps(self, vp):
        st = getattr(vp, "plat", None)
        if st is None:
            st = vp.plat = VpState(vp, self.clock.now_ns())
        return st

    def attach_vp(self, vp):
        """CreateVp: the VP's platform state and its LAPIC timer host."""
        self.part(vp.part)
        self.vps(vp)
        vp.apic.timer_host = _LapicTimerHost(self, vp)

    def detach_vp(self, vp):
        """DeleteVp / finalize: stop its timers."""
        st = getattr(vp, "plat", None)
        if st is not None:
            for t in st.stimers:
                self.timers.cancel(t.handle)
                t.handle = None
            self.timers.cancel(st.lapic_handle)
            st.lapic_handle = None
        vp.apic.timer_host = None

    # ------------------------------------------------------------ features
    def implemented(self):
        """IMPLEMENTED_FEATURES, less the TLB-flush hypercalls when the engine
        cannot flush another VP's TLB (Engine.flush_tlb(), thread-safe): a
        guest told to use them would stop sending flush IPIs and keep stale
        translations on the other VPs."""
        if self._implemented is None:
            from .cpu import Engine
            m = IMPLEMENTED_FEATURES
            if not callable(getattr(Engine, "flush_tlb", None)):
                m &= ~_f("TB_FLUSH_HYPERCALLS")
            self._implemented = m
        return self._implemented

    def features(self, p):
        """The synthetic processor features the guest is offered."""
        req = p.props.get(S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES, DEFAULT_SYNTHETIC_FEATURES)
        return req & self.implemented()

    def privileges(self, p):
        """The partition privilege mask (CPUID 0x40000003 EAX | EBX << 32)."""
        f = self.features(p)
        m = 0
        for name, bit in _PRIV.items():
            if f & _f(name):
                m |= bit
        return m & p.props.get(S.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS, U64)

    def has(self, p, priv):
        return bool(self.privileges(p) & priv)

    def has_feature(self, p, name):
        return bool(self.features(p) & _f(name))

    def ref_time(self, p, ns=None):
        """Partition reference time in 100 ns units."""
        ns = self.clock.now_ns() if ns is None else ns
        return max(0, (ns - self.part(p).ref_ns0) // 100)

    def ref_to_ns(self, p, ref):
        return self.part(p).ref_ns0 + ref * 100

    # ------------------------------------------------------------ CPUID
    def cpuid1_ecx(self, p, ecx):
        """CPUID.1:ECX with the hypervisor and TSC-deadline bits set as advertised."""
        ecx &= ~(CPUID1_ECX_HYPERVISOR | CPUID1_ECX_TSC_DEADLINE)
        if self.has_feature(p, "HYPERVISOR_PRESENT"):
            ecx |= CPUID1_ECX_HYPERVISOR
        if self.tsc_deadline:
            ecx |= CPUID1_ECX_TSC_DEADLINE
        return ecx

    def cpuid(self, vp, leaf):
        """Leaves 0x40000000-0x400000FF (absent ones are zero)."""
        p = vp.part
        f = self.features(p)
        if not f & _f("HYPERVISOR_PRESENT"):
            return (0, 0, 0, 0)
        hv1 = bool(f & _f("HV1"))
        top = HV_CPUID_MAX_LEAF if hv1 else S.HYPERV_CPUID_INTERFACE
        if leaf == S.HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS:
            return (top,) + HV_VENDOR
        if leaf == S.HYPERV_CPUID_INTERFACE:
            return (S.HV_CPUID_INTERFACE_SIGNATURE_HV1 if hv1 else 0, 0, 0, 0)
        if not hv1 or leaf > top:
            return (0, 0, 0, 0)
        if leaf == S.HYPERV_CPUID_VERSION:
            return (HV_BUILD, HV_VERSION, 0, 0)
        if leaf == S.HYPERV_CPUID_FEATURES:
            priv = self.privileges(p)
            edx = 0
            if f & _f("ACCESS_FREQUENCY_REGS"):
                edx |= S.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE
            if f & _f("DIRECT_SYNTHETIC_TIMERS") and f & _f("ACCESS_SYNTHETIC_TIMER_REGS"):
                edx |= S.HV_STIMER_DIRECT_MODE_AVAILABLE
            return (priv & 0xFFFFFFFF, priv >> 32, 0, edx)
        if leaf == S.HYPERV_CPUID_ENLIGHTMENT_INFO:
            eax = S.HV_X64_RELAXED_TIMING_RECOMMENDED | S.HV_DEPRECATING_AEOI_RECOMMENDED
            if f & _f("TB_FLUSH_HYPERCALLS"):
                eax |= S.HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED
            if f & _f("ACCESS_INTR_CTRL_REGS"):
                eax |= S.HV_X64_APIC_ACCESS_RECOMMENDED
            if f & _f("SYNTHETIC_CLUSTER_IPI"):
                eax |= S.HV_X64_CLUSTER_IPI_RECOMMENDED
            if f & _f("EXTENDED_PROCESSOR_MASKS"):
                eax |= S.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED
            spin = 0x1000 if f & _f("NOTIFY_LONG_SPIN_WAIT") else 0xFFFFFFFF
            return (eax, spin, 0, 0)
        if leaf == S.HYPERV_CPUID_IMPLEMENT_LIMITS:
            from .hv import MAX_VPS
            return (MAX_VPS, self.hv.ncpus, 0, 0)
        if leaf == S.HYPERV_CPUID_HARDWARE_FEATURES:
            return (S.HV_X64_MSR_BITMAPS_IN_USE | S.HV_X64_SLAT_IN_USE, 0, 0, 0)
        return (0, 0, 0, 0)

    # ------------------------------------------------------------ MSRs
    def handles_msr(self, msr):
        return SYNTHETIC_MSR_FIRST <= msr <= SYNTHETIC_MSR_LAST or \
            (msr == MSR_IA32_TSC_DEADLINE and self.tsc_deadline)

    # hv register names that are these MSRs (Get/SetVpRegisters by the VMM)
    REGISTER_MSRS = {
        S.HV_REGISTER_GUEST_OS_ID: S.HV_X64_MSR_GUEST_OS_ID, S.HV_X64_REGISTER_HYPERCALL: S.HV_X64_MSR_HYPERCALL,
        S.HV_REGISTER_REFERENCE_TSC: S.HV_X64_MSR_REFERENCE_TSC,
        S.HV_REGISTER_VP_ASSIST_PAGE: S.HV_X64_MSR_VP_ASSIST_PAGE,
        S.HV_REGISTER_TIME_REF_COUNT: S.HV_X64_MSR_TIME_REF_COUNT, S.HV_REGISTER_VP_RUNTIME: S.HV_X64_MSR_VP_RUNTIME,
        S.HV_REGISTER_SCONTROL: S.HV_X64_MSR_SCONTROL, S.HV_REGISTER_SVERSION: S.HV_X64_MSR_SVERSION,
        S.HV_REGISTER_SIEFP: S.HV_X64_MSR_SIEFP, S.HV_REGISTER_SIMP: S.HV_X64_MSR_SIMP,
        S.HV_REGISTER_EOM: S.HV_X64_MSR_EOM,
    }
    REGISTER_MSRS.update({S.HV_REGISTER_SINT0 + k: S.HV_X64_MSR_SINT0 + k for k in range(SINT_COUNT)})
    REGISTER_MSRS.update({S.HV_REGISTER_STIMER0_CONFIG + k: S.HV_X64_MSR_STIMER0_CONFIG + k
                          for k in range(2 * STIMER_COUNT)})

    def get_register(self, vp, name):
        """GetVpRegisters of a synthetic-MSR register (lock held): its value,
        or None when `name` is not one."""
        msr = self.REGISTER_MSRS.get(name)
        if msr is None:
            return None
        verdict, v = self.msr_locked(vp, msr, False, 0, vmm=True)
        return v if verdict == "emulate" else 0

    def set_register(self, vp, name, value):
        """SetVpRegisters of a synthetic-MSR register (lock held): True when
        handled. A value the guest's WRMSR would fault on, or a read-only
        register, raises HvError(INVALID_PARAMETER)."""
        msr = self.REGISTER_MSRS.get(name)
        if msr is None:
            return False
        verdict, _ = self.msr_locked(vp, msr, True, value & U64, vmm=True)
        if verdict != "emulate":
            from .hv import HvError
            raise HvError(S.HV_STATUS_INVALID_PARAMETER)
        return True

    def msr_locked(self, vp, msr, write, value, vmm=False):
        """A guest RDMSR/WRMSR of a synthetic MSR (or IA32_TSC_DEADLINE).
        Returns ("emulate", value or None) or the #GP verdict. `vmm`: the
        VMM's Get/SetVpRegisters, which needs no guest privilege."""
        p = vp.part
        ps, vs = self.part(p), self.vps(vp)
        priv = U64 if vmm else self.privileges(p)

        def need(bit):
            return bool(priv & bit)

        if msr == MSR_IA32_TSC_DEADLINE:
            if not self.hv.cpuid_value(vp, 1, 0)[2] & CPUID1_ECX_TSC_DEADLINE:
                return GP                               # not advertised (e.g. the VMM's CPUID.1 override)
            if write:
                vp.apic.timer_write_tsc_deadline(value)
                return "emulate", None
            return "emulate", vp.apic.tsc_deadline
        if msr in (S.HV_X64_MSR_GUEST_OS_ID, S.HV_X64_MSR_HYPERCALL):
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_HYPERCALL_MSRS):
                return GP
            if msr == S.HV_X64_MSR_GUEST_OS_ID:
                if not write:
                    return "emulate", ps.guest_os_id
                ps.guest_os_id = value
                if value == 0 and ps.hypercall & 1:
                    self._set_hypercall(vp, ps, ps.hypercall & ~1)    # zero OS id disables the page
                return "emulate", None
            if not write:
                return "emulate", ps.hypercall
            return self._write_hypercall(vp, ps, value)
        if msr == S.HV_X64_MSR_VP_INDEX:
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_VP_INDEX) or write:
                return GP
            return "emulate", vp.index
        if msr == S.HV_X64_MSR_VP_RUNTIME:
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_VP_RUNTIME_REG) or write:
                return GP
            return "emulate", max(0, (self.clock.now_ns() - vs.created_ns) // 100)
        if msr == S.HV_X64_MSR_TIME_REF_COUNT:
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_PARTITION_REFERENCE_COUNTER) or write:
                return GP
            return "emulate", self.ref_time(p)
        if msr == S.HV_X64_MSR_REFERENCE_TSC:
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_PARTITION_REFERENCE_TSC):
                return GP
            if not write:
                return "emulate", ps.ref_tsc
            return self._write_ref_tsc(vp, ps, value)
        if msr in (S.HV_X64_MSR_TSC_FREQUENCY, S.HV_X64_MSR_APIC_FREQUENCY):
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_FREQUENCY_REGS) or write:
                return GP
            return "emulate", self.clock.hz if msr == S.HV_X64_MSR_TSC_FREQUENCY else self.apic_hz
        if msr == S.HV_X64_MSR_VP_ASSIST_PAGE:
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_INTR_CTRL_REGS):
                return GP
            if not write:
                return "emulate", vs.assist
            return self._write_assist(vp, vs, value)
        if S.HV_X64_MSR_SCONTROL <= msr <= S.HV_X64_MSR_SINT15 and msr != S.HV_X64_MSR_SIRBP:
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_SYNIC_REGS):
                return GP
            return self._synic_msr(vp, vs, msr, write, value)
        if S.HV_X64_MSR_STIMER0_CONFIG <= msr <= S.HV_X64_MSR_STIMER3_COUNT:
            if not need(S.HV_PARTITION_PRIVILEGE_ACCESS_SYNTHETIC_TIMER_REGS):
                return GP
            return self._stimer_msr(vp, vs, msr, write, value)
        return GP       # not advertised (RESET, GUEST_IDLE, CRASH, SIRBP, ...) or not a synthetic MSR

    # ---- guest pages (written into the guest's RAM at the GPA; see docs)
    def _gpa_max(self, p):
        bits = p.props.get(S.HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH, 46)
        return 1 << bits

    def _ram(self, p, gfn):
        """Root address of guest page `gfn`, or None when it is not RAM."""
        ent = p.gpa.get(gfn)
        if ent is None or not self.hv.mem.contains(ent[0] << 12, S.PAGE_SIZE):
            return None
        return ent[0] << 12

    def gpa_read(self, p, gpa, n):
        out = b""
        while n > 0:
            a = self._ram(p, gpa >> 12)
            if a is None:
                return None
            k = min(n, S.PAGE_SIZE - (gpa & 0xFFF))
            out += self.hv.mem.read(a + (gpa & 0xFFF), k)
            gpa, n = gpa + k, n - k
        return out

    def gpa_write(self, p, gpa, data):
        a = self._ram(p, gpa >> 12)
        if a is None or (gpa & 0xFFF) + len(data) > S.PAGE_SIZE:
            return False
        self.hv.mem.write(a + (gpa & 0xFFF), bytes(data))
        return True

    def _write_hypercall(self, vp, ps, value):
        H = S.hv_x64_msr_hypercall_contents
        if _bits(H, "value", "locked", ps.hypercall):
            return "emulate", None                      # locked until reset: writes are dropped
        gfn = _bits(H, "value", "guest_physical_address", value)
        if (gfn << 12) >= self._gpa_max(vp.part):
            return GP
        if not ps.guest_os_id:
            value &= ~spec.field_mask(H, "value", "enable")   # stays 0 while the OS id is 0
        self._set_hypercall(vp, ps, value)
        return "emulate", None

    def _set_hypercall(self, vp, ps, value):
        H = S.hv_x64_msr_hypercall_contents
        p = vp.part
        if ps.hypercall_saved is not None:              # take the old page away
            gfn, data = ps.hypercall_saved
            self.gpa_write(p, gfn << 12, data)
            ps.hypercall_saved = None
        ps.hypercall = value
        if _bits(H, "value", "enable", value):
            gfn = _bits(H, "value", "guest_physical_address", value)
            old = self.gpa_read(p, gfn << 12, S.PAGE_SIZE)
            if old is not None:
                ps.hypercall_saved = (gfn, old)
                self.gpa_write(p, gfn << 12, self.hypercall_page())
        self._flush_code(p, vp)

    def hypercall_page(self):
        """The hypercall page: VMCALL (Intel, as CPUID leaf 0 says); RET; int3 fill."""
        code = VMCALL + RET
        return code + INT3 * (S.PAGE_SIZE - len(code))

    def _flush_code(self, p, caller=None):
        """Guest code bytes changed under Unicorn: drop its translations. The
        calling VP is stopped at its WRMSR exit (its own thread): flushed now;
        a VP that is not running re-syncs its maps (and flushes) at its next
        run; a VP running on another thread is kicked and flushes before
        its next instruction (Engine.flush_code)."""
        for vp in p.vps.values():
            if vp.engine is not None:
                vp.engine.flush_code()      # before its next guest instruction

    def _write_ref_tsc(self, vp, ps, value):
        R = S.hv_x64_msr_reference_tsc_contents
        gfn = _bits(R, "value", "guest_physical_address", value)
        if (gfn << 12) >= self._gpa_max(vp.part):
            return GP
        ps.ref_tsc = value
        if _bits(R, "value", "enable", value):
            self.fill_tsc_page(vp.part, gfn)
        return "emulate", None

    def tsc_base(self, p):
        """The partition's TSC base (cpu.py: RDTSC counts from it)."""
        return getattr(p, "tsc_base_ns", 0)

    def guest_tsc(self, p, ns=None):
        """What RDTSC returns in partition `p` at monotonic `ns`."""
        return self.clock.tsc(ns, self.tsc_base(p))

    def tsc_page(self, p):
        """(scale, offset) with ref time = ((tsc * scale) >> 64) + offset."""
        scale = (10_000_000 << 64) // self.clock.hz
        tsc_at_zero = self.guest_tsc(p, self.part(p).ref_ns0)
        offset = -((tsc_at_zero * scale) >> 64)
        return scale, offset

    def fill_tsc_page(self, p, gfn):
        ps = self.part(p)
        ps.tsc_seq = (ps.tsc_seq % 0xFFFFFFFE) + 1       # never 0: 0 means "use the MSR"
        scale, offset = self.tsc_page(p)
        page = S.hv_reference_tsc_page(tsc_sequence=ps.tsc_seq, tsc_scale=scale, tsc_offset=offset)
        self.gpa_write(p, gfn << 12, page.to_bytes())

    def _write_assist(self, vp, vs, value):
        gfn = value >> 12
        if (gfn << 12) >= self._gpa_max(vp.part):
            return GP
        vs.assist = value
        if value & 1:
            self.gpa_write(vp.part, gfn << 12, bytes(S.PAGE_SIZE))   # nothing is assisted: all zero
        return "emulate", None

    # ---- guest SynIC
    def _synic_msr(self, vp, vs, msr, write, value):
        if msr == S.HV_X64_MSR_SVERSION:
            return GP if write else ("emulate", S.HV_SYNIC_VERSION_1)
        if msr == S.HV_X64_MSR_EOM:
            if write:
                self.deliver_all_locked(vp)
                return "emulate", None
            return "emulate", 0
        if msr == S.HV_X64_MSR_SCONTROL:
            if not write:
                return "emulate", vs.scontrol
            vs.scontrol = value
        elif msr in (S.HV_X64_MSR_SIMP, S.HV_X64_MSR_SIEFP):
            if not write:
                return "emulate", vs.simp if msr == S.HV_X64_MSR_SIMP else vs.siefp
            gfn = _bits(S.hv_synic_page_msr, "value", "base_gpfn", value)
            if (gfn << 12) >= self._gpa_max(vp.part):
                return GP
            if msr == S.HV_X64_MSR_SIMP:
                vs.simp = value
            else:
                vs.siefp = value
        else:
            k = msr - S.HV_X64_MSR_SINT0
            if not write:
                return "emulate", vs.sint[k]
            Sn = S.hv_synic_sint
            vec = _bits(Sn, "value", "vector", value)
            if not _bits(Sn, "value", "masked", value) and vec < A.MIN_VECTOR:
                return GP                               # vectors 0-15 cannot be SINT vectors
            if _bits(Sn, "value", "as_intercept", value) or _bits(Sn, "value", "proxy", value):
                return GP                               # root-only bits
            vs.sint[k] = value
            self._auto_eoi(vp, vs)
        self.deliver_all_locked(vp)
        return "emulate", None

    def _auto_eoi(self, vp, vs):
        """The vectors of unmasked AutoEOI SINTs skip the ISR (apic.take)."""
        Sn = S.hv_synic_sint
        m = 0
        for v in vs.sint:
            if _bits(Sn, "value", "auto_eoi", v) and not _bits(Sn, "value", "masked", v):
                m |= 1 << _bits(Sn, "value", "vector", v)
        vp.apic.auto_eoi = m

    def _synic_on(self, vs):
        return bool(_bits(S.hv_synic_scontrol, "value", "enable", vs.scontrol)) and \
            bool(_bits(S.hv_synic_page_msr, "value", "enable", vs.simp))

    def post_locked(self, vp, sint, msg):
        """Queue a message for the guest's SINT `sint` and try to deliver it."""
        vs = self.vps(vp)
        vs.queues[sint].append(msg)
        self._deliver_locked(vp, sint)

    def deliver_all_locked(self, vp):
        for k in range(SINT_COUNT):
            if self.vps(vp).queues[k]:
                self._deliver_locked(vp, k)

    def _deliver_locked(self, vp, sint):
        """Write the first queued message into the SIMP slot if it is free
        (else set msg_pending there, the guest EOMs); assert the SINT vector."""
        vs = self.vps(vp)
        q = vs.queues[sint]
        if not q or not self._synic_on(vs):
            return
        Sn = S.hv_synic_sint
        sv = vs.sint[sint]
        if _bits(Sn, "value", "masked", sv):
            return
        p = vp.part
        slot = (_bits(S.hv_synic_page_msr, "value", "base_gpfn", vs.simp) << 12) + sint * MSG_SIZE
        hdr = self.gpa_read(p, slot, S.hv_message_header.SIZE)
        if hdr is None:
            return
        H = S.hv_message_header
        h = H.from_bytes(hdr)
        pend = spec.field_mask(H, "message_flags", "msg_pending")
        if h.message_type != S.HVMSG_NONE:
            if not h.message_flags & pend:
                h.message_flags |= pend
                self.gpa_write(p, slot, h.to_bytes())
            return
        msg = bytearray(q.pop(0))
        if q:
            msg[H.OFFSETS["message_flags"]] |= pend
        self.gpa_write(p, slot, bytes(msg))
        self._message_delivered(vp, msg)
        if not _bits(Sn, "value", "polling", sv):
            self.hv._apic_message(vp, A.DM_FIXED, _bits(Sn, "value", "vector", sv), False, self.hv._vp_cpu(vp))
            self._kick(vp)

    def _message_delivered(self, vp, msg):
        if struct.unpack_from("<I", msg)[0] == S.HVMSG_TIMER_EXPIRED:
            pl = S.hv_timer_message_payload.from_bytes(bytes(msg[S.hv_message_header.SIZE:]))
            self.vps(vp).stimers[pl.timer_index].msg_pending = False

    def _kick(self, vp):
        eng = vp.engine
        if vp.running and eng is not None:
            eng.kick()

    # ---- synthetic timers
    def _stimer_msr(self, vp, vs, msr, write, value):
        k = (msr - S.HV_X64_MSR_STIMER0_CONFIG) // 2
        is_count = (msr - S.HV_X64_MSR_STIMER0_CONFIG) & 1
        t = vs.stimers[k]
        C = S.hv_stimer_config
        if not write:
            return "emulate", t.count if is_count else t.config
        if is_count:
            t.count = value
            if value == 0:
                t.config &= ~spec.field_mask(C, "value", "enable")       # a zero count stops it
            elif _bits(C, "value", "auto_enable", t.config):
                t.config |= spec.field_mask(C, "value", "enable")
        else:
            cfg = C(value=value)
            if cfg.mbz_violations():
                return GP
            if _bits(C, "value", "direct_mode", value) and not self.has_feature(vp.part, "DIRECT_SYNTHETIC_TIMERS"):
                return GP
            if _bits(C, "value", "direct_mode", value) and \
                    _bits(C, "value", "apic_vector", value) < A.MIN_VECTOR and _bits(C, "value", "enable", value):
                return GP
            if _bits(C, "value", "enable", value) and not _bits(C, "value", "direct_mode", value) \
                    and _bits(C, "value", "sintx", value) == 0:
                value &= ~spec.field_mask(C, "value", "enable")          # SINT 0 in message mode: disabled
            t.config = value
        self._stimer_arm(vp, t)
        return "emulate", None

    def _stimer_arm(self, vp, t):
        """(Re)start timer `t` from its config and count (lock held)."""
        C = S.hv_stimer_config
        self.timers.cancel(t.handle)
        t.handle = None
        t.due = None
        if not _bits(C, "value", "enable", t.config) or t.count == 0:
            if t.count == 0:
                t.config &= ~spec.field_mask(C, "value", "enable")
            return
        p = vp.part
        if _bits(C, "value", "periodic", t.config):
            t.due = self.ref_time(p) + t.count
        else:
            t.due = t.count
        self._stimer_schedule(vp, t)

    def _stimer_schedule(self, vp, t):
        p = vp.part
        deadline = self.ref_to_ns(p, t.due)
        handle = []
        t.handle = self.timers.arm(deadline, lambda: self._stimer_fire(vp, t, handle))
        handle.append(t.handle)

    def _stimer_fire(self, vp, t, handle):
        hv = self.hv
        with hv._lock:
            if vp.deleted or t.handle is not handle[0] or getattr(vp, "plat", None) is None:
                return
            t.handle = None
            C = S.hv_stimer_config
            p = vp.part
            now = self.ref_time(p)
            due = t.due
            t.fired += 1
            if _bits(C, "value", "direct_mode", t.config):
                hv._apic_message(vp, A.DM_FIXED, _bits(C, "value", "apic_vector", t.config), False, hv._vp_cpu(vp))
                self._kick(vp)
            elif not t.msg_pending:                  # at most one undelivered expiration message
                pl = S.hv_timer_message_payload(timer_index=t.index, expiration_time=due, delivery_time=now)
                t.msg_pending = True
                self.post_locked(vp, _bits(C, "value", "sintx", t.config), hv._message(S.HVMSG_TIMER_EXPIRED, pl, 0))
            hv._log("  vp %x/%d stimer%d expired (due %d, now %d)" % (p.id, vp.index, t.index, due, now))
            if _bits(C, "value", "periodic", t.config):
                nxt = due + t.count
                if nxt <= now:                      # missed periods are skipped
                    nxt = now + t.count
                t.due = nxt
                self._stimer_schedule(vp, t)
            else:
                t.config &= ~spec.field_mask(C, "value", "enable")   # a one-shot disables itself
                t.due = None
        hv._flush_notify()

    # ---- the LAPIC timer (apic.py keeps the registers; this arms the deadline)
    def lapic_arm_locked(self, vp, deadline_ns):
        vs = self.vps(vp)
        self.timers.cancel(vs.lapic_handle)
        vs.lapic_handle = None
        if deadline_ns is None:
            return
        handle = []
        vs.lapic_handle = self.timers.arm(deadline_ns, lambda: self._lapic_fire(vp, handle))
        handle.append(vs.lapic_handle)

    def _lapic_fire(self, vp, handle):
        hv = self.hv
        with hv._lock:
            vs = getattr(vp, "plat", None)
            if vp.deleted or vs is None or vs.lapic_handle is not handle[0]:
                return
            vs.lapic_handle = None
            vector = vp.apic.timer_expired(self.clock.now_ns())
            if vector is not None:
                hv._apic_message(vp, A.DM_FIXED, vector, False, hv._vp_cpu(vp))
                self._kick(vp)
        hv._flush_notify()

    # ------------------------------------------------------------ guest hypercalls
    def vmcall(self, vp, gpr, cpl, long64, cr0=None):
        """A guest VMCALL/VMMCALL. Returns a decide() verdict."""
        p = vp.part
        ps = self.part(p)
        if cr0 is None:
            cr0 = self._engine_cr0(vp)
        if not cr0 & CR0_PE or cpl != 0:
            return UD                                   # real mode or CPL > 0
        if not _bits(S.hv_x64_msr_hypercall_contents, "value", "enable", ps.hypercall):
            return UD                                   # no hypercall page: not a hypercall
        if long64:
            control, in_gpa, out_gpa = gpr[1], gpr[2], gpr[8]
        else:
            m = 0xFFFFFFFF
            control = ((gpr[2] & m) << 32) | (gpr[0] & m)
            in_gpa = ((gpr[3] & m) << 32) | (gpr[1] & m)
            out_gpa = ((gpr[7] & m) << 32) | (gpr[6] & m)
        status, reps = self._guest_call(vp, control, in_gpa, out_gpa)
        result = spec.result_value(status, reps)
        if long64:
            return "emulate", {"gpr": {0: result}}
        return "emulate", {"gpr": {0: result & 0xFFFFFFFF, 2: result >> 32}}

    def _guest_call(self, vp, control, in_gpa, out_gpa):
        """(status, reps completed) of a guest hypercall."""
        cf = lambda name: spec.control_field(control, name)    # noqa: E731
        code = cf("call_code")
        p = vp.part
        table = {
            S.HVCALL_NOTIFY_LONG_SPIN_WAIT: ("simple", S.hv_guest_input_notify_long_spin_wait, 0, False,
                                             ("NOTIFY_LONG_SPIN_WAIT",), self._hc_spin_wait),
            S.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE: ("simple", S.hv_guest_input_flush_virtual_address, 0, False,
                                                   ("TB_FLUSH_HYPERCALLS",), self._hc_flush),
            S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST: ("rep", S.hv_guest_input_flush_virtual_address, 8, False,
                                                  ("TB_FLUSH_HYPERCALLS",), self._hc_flush),
            S.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX: ("simple", S.hv_guest_input_flush_virtual_address_ex, 0, True,
                                                      ("TB_FLUSH_HYPERCALLS", "EXTENDED_PROCESSOR_MASKS"),
                                                      self._hc_flush),
            S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX: ("rep", S.hv_guest_input_flush_virtual_address_ex, 8, True,
                                                     ("TB_FLUSH_HYPERCALLS", "EXTENDED_PROCESSOR_MASKS"),
                                                     self._hc_flush),
            S.HVCALL_SEND_IPI: ("simple", S.hv_guest_input_send_ipi, 0, False, ("SYNTHETIC_CLUSTER_IPI",),
                                self._hc_send_ipi),
            S.HVCALL_SEND_IPI_EX: ("simple", S.hv_guest_input_send_ipi_ex, 0, True,
                                   ("SYNTHETIC_CLUSTER_IPI", "EXTENDED_PROCESSOR_MASKS"), self._hc_send_ipi),
            S.HVCALL_POST_MESSAGE: None,              # no PostMessages privilege is ever granted
            S.HVCALL_SIGNAL_EVENT: None,              # SIGNAL_EVENTS is not offered
        }
        ps = self.part(p)
        ps.guest_calls[code] = ps.guest_calls.get(code, 0) + 1
        if code not in table:
            return S.HV_STATUS_INVALID_HYPERCALL_CODE, 0
        ent = table[code]
        if ent is None or not all(self.has_feature(p, n) for n in ent[4]):
            return S.HV_STATUS_ACCESS_DENIED, 0
        form, cls, rep_size, varhead_ok, _feat, handler = ent
        fast = cf("fast")
        reps, start, varhead = cf("rep_count"), cf("rep_start"), cf("varhead_size")
        if control & S.CONTROL_MBZ or cf("nested"):
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT, 0
        if form == "simple" and (reps or start):
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT, 0
        if form == "rep" and (reps == 0 or start >= reps):
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT, start
        if varhead and not varhead_ok:
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT, 0
        size = cls.SIZE + 8 * varhead + rep_size * reps
        if fast:
            # register input: the two GPA registers (no XMM input is advertised)
            if size > 16:
                return S.HV_STATUS_INVALID_HYPERCALL_INPUT, 0
            data = struct.pack("<QQ", in_gpa & U64, out_gpa & U64)[:size]
        else:
            if in_gpa & 7:
                return S.HV_STATUS_INVALID_ALIGNMENT, 0
            if (in_gpa & 0xFFF) + size > S.PAGE_SIZE or in_gpa + size > self._gpa_max(p):
                return S.HV_STATUS_INVALID_ALIGNMENT, 0
            data = self.gpa_read(p, in_gpa, size)
            if data is None:
                return S.HV_STATUS_INVALID_ALIGNMENT, 0     # not guest RAM (Hyper-V: a memory intercept)
        inp = cls.from_bytes(data[:cls.SIZE])
        if inp.mbz_violations():
            return S.HV_STATUS_INVALID_PARAMETER, start
        bank = data[cls.SIZE:cls.SIZE + 8 * varhead]
        elems = data[cls.SIZE + 8 * varhead:]
        st = handler(vp, code, inp, bank, [struct.unpack_from("<Q", elems, 8 * k)[0]
                                          for k in range(start, reps)] if rep_size else [])
        return st, (reps if (form == "rep" and st == S.HV_STATUS_SUCCESS) else start)

    @staticmethod
    def _engine_cr0(vp):
        """CR0 of a VP stopped at a VMCALL exit (decide() runs on its thread)."""
        eng = vp.engine
        uc = getattr(eng, "uc", None)
        if uc is not None:
            from unicorn import x86_const as X
            return uc.reg_read(X.UC_X86_REG_CR0)
        return vp.cpu.cr0

    def _vp_set(self, p, inp, bank):
        """VP indexes named by an Ex call's HV_VP_SET, or None when malformed."""
        if inp.format == S.HV_GENERIC_SET_ALL:
            return set(p.vps)
        if inp.format != S.HV_GENERIC_SET_SPARSE_4K:
            return None
        banks = [b for b in range(64) if inp.valid_bank_mask >> b & 1]
        if len(bank) < 8 * len(banks):
            return None
        out = set()
        for k, b in enumerate(banks):
            word = struct.unpack_from("<Q", bank, 8 * k)[0]
            out |= {64 * b + i for i in range(64) if word >> i & 1}
        return out

    def _hc_spin_wait(self, vp, code, inp, bank, elems):
        return S.HV_STATUS_SUCCESS

    def _hc_flush(self, vp, code, inp, bank, elems):
        p = vp.part
        allowed = spec.enum_mask("hv_flush_flag")
        if inp.flags & ~allowed:
            return S.HV_STATUS_INVALID_PARAMETER
        if code in (S.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX, S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX):
            targets = self._vp_set(p, inp, bank)
            if targets is None:
                return S.HV_STATUS_INVALID_PARAMETER
        else:
            targets = {i for i in range(64) if inp.processor_mask >> i & 1}
        if inp.flags & S.HV_FLUSH_ALL_PROCESSORS:
            targets = set(p.vps)
        for i in sorted(targets):
            t = p.vps.get(i)
            if t is not None and t.engine is not None:
                t.engine.flush_tlb()          # offered only when the engine has it (implemented())
        p.stats["guest_tlb_flushes"] += 1
        return S.HV_STATUS_SUCCESS

    def _hc_send_ipi(self, vp, code, inp, bank, elems):
        p = vp.part
        if inp.target_vtl != 0 or not S.HV_IPI_LOW_VECTOR <= inp.vector <= S.HV_IPI_HIGH_VECTOR:
            return S.HV_STATUS_INVALID_PARAMETER
        if code == S.HVCALL_SEND_IPI_EX:
            targets = self._vp_set(p, inp, bank)
            if targets is None:
                return S.HV_STATUS_INVALID_PARAMETER
        else:
            targets = {i for i in range(64) if inp.cpu_mask >> i & 1}
        for i in sorted(targets):
            t = p.vps.get(i)
            if t is not None:
                self.hv._apic_message(t, A.DM_FIXED, inp.vector, False, self.hv._vp_cpu(vp))
                self._kick(t)
        return S.HV_STATUS_SUCCESS


class _LapicTimerHost:
    """What apic.py's LAPIC timer needs from the platform."""

    def __init__(self, plat, vp):
        self.plat, self.vp = plat, vp

    @property
    def apic_hz(self):
        return self.plat.apic_hz

    def now_ns(self):
        return self.plat.clock.now_ns()

    def tsc_to_ns(self, tsc):
        return self.plat.clock.ns_at_tsc(tsc, self.plat.tsc_base(self.vp.part))

    def arm(self, deadline_ns):
        self.plat.lapic_arm_locked(self.vp, deadline_ns)
