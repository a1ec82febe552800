"""hvsim: a Python model of the Hyper-V hypervisor as seen by a root partition.

Public entry points (see docs/hvsim-model.md):

    hv = Hypervisor(mem, hv_base_gpa, hv_size, scheduler="root"|"core", notify=None, ncpus=2)
    hv.hypercall(cpu, control, in_gpa, out_gpa) -> result
    hv.hypercall_fast(cpu, control, in0, in1) -> result
    hv.synic_pages(cpu) -> (simp_gpa, siefp_gpa, sirbp_gpa)
    hv.eom(cpu)
    hv.stats() / hv.report() / hv.log
    hv.fail_next(code, status, nth=1) / hv.delay(code, s) / hv.insufficient_memory_once(code)
    hv.set_rep_limit(k, code=None) / hv.reset_faults()
    hv.shutdown()

Every input is decoded with the generated bindings (gen/python/mshv_spec.py).
"""

import collections
import math
import os
import random
import struct
import threading
import time

from . import spec
from . import apic as A
from . import platform as platform_mod
from .apic import LocalApic, MIN_VECTOR, RF_IF, NMI_VECTOR
from .platform import GuestPlatform, DEFAULT_SYNTHETIC_FEATURES
from .spec import S

U64 = (1 << 64) - 1
ROOT_ID = 1
# HV_PARTITION_ID_SELF (~0) is not in the spec; the model accepts it as "the caller".
PARTITION_ID_SELF = U64
MAX_VPS = 256
# Root SynIC geometry: a SIM page holds one 256-byte message slot per SINT, and
# the event ring page one hv_synic_event_ring per SINT.
SINT_COUNT = S.HV_SYNIC_SINT_COUNT
RING_SLOTS = len(S.hv_synic_event_ring().data)          # HV_SYNIC_EVENT_RING_MESSAGE_COUNT
RING_DATA = S.hv_synic_event_ring.OFFSETS["data"]
RING_MASKED = S.hv_synic_event_ring.OFFSETS["signal_masked"]
RING_FULL = S.hv_synic_event_ring.OFFSETS["ring_full"]
# TODO(spec): the HV_PORT_ID / HV_CONNECTION_ID bit layout (Id:24, Reserved:8)
# is not in the bindings; the TLFS datatypes pages give it.
ID_BITS = 24
ID_MASK = (1 << ID_BITS) - 1
# TODO(spec): event flags per SINT (one 256-byte SIEF array = 2048 flags).
EVENT_FLAGS_PER_SINT = (S.PAGE_SIZE // SINT_COUNT) * 8
# Doorbell trigger sizes (bytes) by hv_doorbell_flag size code; SIZE_ANY = any.
DOORBELL_SIZES = {S.HV_DOORBELL_FLAG_TRIGGER_SIZE_BYTE: 1, S.HV_DOORBELL_FLAG_TRIGGER_SIZE_WORD: 2,
                  S.HV_DOORBELL_FLAG_TRIGGER_SIZE_DWORD: 4, S.HV_DOORBELL_FLAG_TRIGGER_SIZE_QWORD: 8}


def _set_gpr(st, mov, value):
    """Write a MOV load's result to its destination register (x86 rules: a
    32-bit write zero-extends, 8/16-bit writes keep the rest)."""
    r, size = mov["reg"], mov["size"]
    if size == 1 and mov["high8"]:
        st.gpr[r - 4] = (st.gpr[r - 4] & ~0xFF00) | ((value & 0xFF) << 8)
    elif size in (1, 2):
        m = (1 << (8 * size)) - 1
        st.gpr[r] = (st.gpr[r] & ~m) | (value & m)
    elif size == 4:
        st.gpr[r] = value & 0xFFFFFFFF
    else:
        st.gpr[r] = value & U64


def eng_ipmask(st):
    """Instruction-pointer width for CpuState `st` (CS.L in long mode, CS.D, else 16 bits)."""
    cs_attr = st.segs[1][3]
    if st.efer & (1 << 10) and cs_attr & (1 << 13):
        return U64
    if cs_attr & (1 << 14):
        return 0xFFFFFFFF
    return 0xFFFF

# Page costs charged to the pools (documented in docs/hvsim-model.md). All are
# below the driver's up-front deposits (InitializePartition 208, CreateVp 90).
COSTS = {
    "create_partition": 2,        # from the ROOT pool
    "initialize_partition": 160,  # from the child's pool
    "create_vp": 64,              # from the child's pool
    "create_vp_root": 1,          # from the ROOT pool (root-side VP state): INSUFFICIENT_ROOT_MEMORY
    "map_vp_state_page": 1,       # from the child's pool, per state page mapped
    "install_intercept": 1,       # from the child's pool, per intercept type first installed
    "synic_enable": 1,            # child pool: SetVpRegisters turning SCONTROL.enable on (per VP)
    "access_tracking": 1,         # child pool: SetPartitionProperty GPA_PAGE_ACCESS_TRACKING 0 -> 1
    "create_port": 1,             # from the port partition's pool (the root for doorbells)
    "connect_port": 1,            # from the connection partition's pool
    # MapGpaPages: one page per 2 MiB GPA region holding 4 KiB mappings plus one
    # page per 1 GiB region holding any mapping (page-table pages).
}

ST_CREATED, ST_INITIALIZED, ST_FINALIZED = "created", "initialized", "finalized"

# Deposited pages hold this 8-byte pattern (little-endian u64) while the
# hypervisor owns them; a withdrawn page that lost it was written by the root.
POOL_PATTERN = struct.pack("<Q", 0x6C6F6F7056485F5F)   # "__HVPool"
# A contiguous request asks for one deposit chunk of this many pages.
CONTIGUOUS_PAGES = S.HV_MAX_CONTIGUOUS_ALLOCATION_PAGES

SEG_NAMES = ["ES", "CS", "SS", "DS", "FS", "GS"]
GPR_NAMES = ["RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
             "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"]
DR_NAMES = ["DR0", "DR1", "DR2", "DR3", "DR6", "DR7"]

# Default CPUID results (leaf -> eax, ebx, ecx, edx); see docs. x86 values, not ABI.
_VENDOR = struct.unpack("<3I", b"GenuineIntel")


def _r(name):
    return spec.enum("hv_register_name")[name]


class HvError(Exception):
    def __init__(self, status, reps=None):
        super().__init__(spec.status_name(status))
        self.status = status
        self.reps = reps


class CpuState:
    """Architectural state of a VP (what the register file exposes)."""

    def __init__(self, vp_index=0):
        self.gpr = [0] * 16
        self.rip = 0xFFF0
        self.rflags = 0x2
        self.segs = [(0, 0xFFFF, 0, 0x93) for _ in range(6)]
        self.segs[1] = (0xFFFF0000, 0xFFFF, 0xF000, 0x9B)
        self.ldtr = (0, 0xFFFF, 0, 0x82)
        self.tr = (0, 0xFFFF, 0, 0x8B)
        self.gdtr = (0, 0xFFFF)
        self.idtr = (0, 0xFFFF)
        self.cr0, self.cr2, self.cr3, self.cr4, self.cr8 = 0x60000010, 0, 0, 0, 0
        self.efer = 0
        self.dr = [0, 0, 0, 0, 0xFFFF0FF0, 0x400]
        self.xmm = [0] * 16
        self.msrs = {"PAT": 0x0007040600070406}
        self.shadow_at = None    # linear address of the instruction in an STI/MOV SS shadow

    def copy(self):
        c = CpuState.__new__(CpuState)
        c.__dict__ = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                      for k, v in self.__dict__.items()}
        return c


def seg_pack(seg):
    base, limit, sel, attr = seg
    v = S.hv_x64_segment_register(base=base, limit=limit, selector=sel, attributes=attr)
    return int.from_bytes(v.to_bytes(), "little")


def seg_unpack(value):
    v = S.hv_x64_segment_register.from_bytes(value.to_bytes(16, "little"))
    return (v.base, v.limit, v.selector, v.attributes)


def table_pack(t):
    v = S.hv_x64_table_register(limit=t[1], base=t[0])
    return int.from_bytes(v.to_bytes(), "little")


def table_unpack(value):
    v = S.hv_x64_table_register.from_bytes(value.to_bytes(16, "little"))
    return (v.base, v.limit)


class Vp:
    def __init__(self, part, index):
        self.part = part
        self.index = index
        self.cpu = CpuState(index)
        self.other = {}          # registers without architectural meaning here
        self.other[_r("HV_REGISTER_EXPLICIT_SUSPEND")] = 1
        self.other[_r("HV_REGISTER_VP_INDEX")] = index
        self.other[_r("HV_X64_REGISTER_INITIAL_APIC_ID")] = index
        self.other[_r("HV_X64_REGISTER_APIC_BASE")] = 0xFEE00900 if index == 0 else 0xFEE00800
        self.other[_r("HV_X64_REGISTER_XFEM")] = 1
        self.state_pages = {}    # hv_vp_state_page_type -> (pfn, overlay?)
        self.pool_pages = []     # pages this VP took from the partition pool
        self.engine = None
        self.running = False
        self.stop_req = False
        self.thread = None
        self.last_msg = None
        self.notify_cpu = None   # core scheduler: the root CPU that last released the VP
        self.dispatch_cpu = None # root scheduler: the root CPU whose DispatchVp runs the VP
        self.root_irq = False    # a root interrupt for the dispatching CPU: end the dispatch
        self.root_irq_ok = False # root scheduler: the dispatching CPU takes interrupts
        self.root_irq_poll = None  # and this tells whether it has taken one (the hvsim seam's flag)
        self.signal_count = 0
        self.apic = LocalApic(index)   # local APIC state (apic.py)
        self.vp_state = {}       # Get/SetVpState blobs
        self.cpuid_results = {}
        self.deleted = False

    def reg(self, name):
        return self.other.get(name, 0)


class Partition:
    def __init__(self, pid, flags=0):
        self.id = pid
        self.flags = flags
        self.state = ST_CREATED
        self.props = {}
        self.free = []           # deposited, unused pool pages
        self.held = {}           # owner key -> [pfns taken from the pool]
        self.vps = {}
        self.gpa = {}            # gfn -> [pfn, flags, large_base or None]
        self.large = set()       # base gfns of 2 MiB mappings
        self.l1 = collections.Counter()   # 2 MiB region -> # of 4 KiB mappings
        self.l2 = collections.Counter()   # 1 GiB region -> # of mappings (4K pages or 2M runs)
        self.map_gen = 0
        self.intercepts = {}     # (type, parameter) -> access mask
        self.ports = {}          # port id -> Port (ports this partition owns)
        self.connections = {}    # connection id -> Connection (connections it owns)
        self.root_cost = []      # root pool pages charged for this partition
        self.stats = collections.Counter()

    def held_count(self):
        return sum(len(v) for v in self.held.values())


class Port:
    def __init__(self, part, port_id, info, conn_pid):
        self.part = part
        self.id = port_id
        self.type = info.port_type
        self.target_sint = info.target_sint
        self.target_vp = info.target_vp
        self.conn_pid = conn_pid          # the partition allowed to connect (0: any)
        self.alive = True
        self.signals = 0


class Connection:
    def __init__(self, part, conn_id, port, info):
        self.part = part
        self.id = conn_id
        self.port = port                  # the Port object: stays bound after DeletePort
        self.type = info.port_type
        self.gpa = info.doorbell_gpa
        self.value = info.doorbell_trigger_value
        self.flags = info.doorbell_flags
        self.triggers = 0

    def matches(self, gpa, size, value):
        """A guest write of `size` bytes of `value` at `gpa` rings this doorbell."""
        if self.type != S.HV_PORT_TYPE_DOORBELL or gpa != self.gpa:
            return False
        want = DOORBELL_SIZES.get(self.flags & S.HV_DOORBELL_FLAG_TRIGGER_SIZE_MASK)
        if want is not None and want != size:
            return False
        return bool(self.flags & S.HV_DOORBELL_FLAG_TRIGGER_ANY_VALUE) or value == self.value


class RootSynic:
    def __init__(self, simp_pfn, siefp_pfn, sirbp_pfn):
        self.simp_pfn = simp_pfn
        self.siefp_pfn = siefp_pfn
        self.sirbp_pfn = sirbp_pfn        # event ring page: one hv_synic_event_ring per SINT
        self.queues = collections.defaultdict(collections.deque)
        self.heads = [0] * SINT_COUNT     # the hypervisor's write index per SINT ring
        self.kept = [[] for _ in range(SINT_COUNT)]   # port ids held back while a ring is full
        self.enabled = False              # the root enabled SIMP and its SINTs (HVSIM_OP_SYNIC_PAGES)


class Hypervisor:
    ROOT_ID = ROOT_ID

    def __init__(self, mem, hv_base_gpa, hv_size, scheduler="root", notify=None, ncpus=2,
                 costs=None, log_size=20000):
        if scheduler not in ("root", "core"):
            raise ValueError("scheduler must be 'root' or 'core'")
        if hv_base_gpa % 4096 or hv_size % 4096 or hv_size <= 0:
            raise ValueError("reserved range must be page aligned")
        self.S = S
        self.mem = mem
        self.hv_base = hv_base_gpa
        self.hv_size = hv_size
        self.scheduler = scheduler
        self.notify = notify
        self._async_next = {}           # code -> calls left that answer CALL_PENDING
        self.ncpus = ncpus
        self.costs = dict(COSTS, **(costs or {}))
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._overlay_free = list(range((hv_base_gpa + hv_size) // 4096 - 1, hv_base_gpa // 4096 - 1, -1))
        self._overlay_used = {}
        self.root = Partition(ROOT_ID)
        self.root.state = ST_INITIALIZED
        self.partitions = {ROOT_ID: self.root}
        self._next_pid = 0x10
        self.deposited = {}           # pfn -> partition id (pool pages anywhere)
        self.batch = {}               # deposited pfn -> (DepositMemory call, its chunk size)
        self._batch_seq = 0
        self._contig = {}             # code -> (pages, from root?): armed contiguous requests
        self._cur_code = None         # the hypercall being handled (for the contiguous knob)
        self.provided_pages = set()   # root pfns given as MapVpStatePage locations
        self.mapped = collections.Counter()   # root pfn -> number of child GPA mappings
        self.synic = {}
        self._dispatching = {}        # root CPU -> VP its DispatchVp is running (root scheduler)
        self.stats_pages = {}
        self.log = []                 # list of strings (sliceable)
        self._log_size = log_size
        self.calls = collections.Counter()
        # Things Hyper-V accepts but this project's driver promises never to
        # do (docs/design.md, "Teardown order"): recorded, never refused, so
        # a test can fail on them. One string each.
        self.contract_violations = []
        self.statuses = collections.Counter()
        self._notify_q = []
        # knobs
        self.rep_limit = {}           # code (or None for all rep calls) -> K
        self._faults = []             # [code, countdown, status]
        self._delays = {}
        self.allow_remap = False
        self.require_super_pages_flag = True
        # The hypervisor's own preemption: time_slice seconds per core
        # scheduler slice; a root-scheduler DispatchVp is bounded by its input
        # time slice (0: until something happens) and, when set, by
        # dispatch_quantum seconds (tests set it to get a preempted dispatch).
        # max_insns is passed to the engine, which does not count
        # instructions (kept for callers that set it).
        self.time_slice = 0.25
        self.dispatch_quantum = None
        self.max_insns = None
        # how often a running VP looks at a polled root-interrupt flag
        # (hypercall(root_irq=...)) that no root_interrupt() announced
        self.root_irq_poll_period = 0.01
        self.preempt_event = S.HV_VP_DISPATCH_EVENT_SUSPEND
        # DispatchVp of a VP halted with IF=1 (HLT, nothing pending): BLOCKED + this
        # event. Undocumented; anything but SUSPEND is Linux's "root_sched_blocked".
        self.halt_event = S.HV_VP_DISPATCH_EVENT_INVALID
        # Scheduler kicks: "pair" (VP_SIGNAL_PAIR), "bitset" (VP_SIGNAL_BITSET,
        # merged into a queued one for the same partition), "overflow" (a
        # BITSET whose overflow_count says signals were lost: the root must
        # look at every VP of the partition), or None: chosen at random from
        # a generator seeded by HVSIM_SEED (default 0), so a run repeats.
        self.kick_form = os.environ.get("HVSIM_KICK_FORM") or None
        self.kick_rng = random.Random(int(os.environ.get("HVSIM_SEED", "0"), 0))
        self.kicks = collections.Counter()   # form -> messages sent
        self.props_root = self._root_props()
        self.child_prop_defaults = self._child_props()
        self._closed = False
        # what the guest sees: CPUID leaves, synthetic MSRs, timers, guest hypercalls (platform.py)
        self.platform = GuestPlatform(self)

    @property
    def tsc_hz(self):
        """The guest TSC frequency (TSC_FREQUENCY MSR, reference TSC page scale)."""
        return self.platform.clock.hz

    @property
    def apic_hz(self):
        """The APIC timer's input frequency (APIC_FREQUENCY MSR)."""
        return self.platform.apic_hz

    # ================================================================ helpers
    def _root_props(self):
        P = spec.enum("hv_partition_property_code")
        return {
            P["HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0"]: 0x00000000_01FFFFFF,
            P["HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1"]: 0,
            P["HV_PARTITION_PROPERTY_PROCESSOR_XSAVE_FEATURES"]: 0x7,
            P["HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH"]: 46,
            P["HV_PARTITION_PROPERTY_IMPLEMENTED_PHYSICAL_ADDRESS_BITS"]: 46,
            P["HV_PARTITION_PROPERTY_XSAVE_STATES"]: 0x7,
            P["HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE"]: 0x340,
            P["HV_PARTITION_PROPERTY_PROCESSOR_CL_FLUSH_SIZE"]: 8,
            P["HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY"]: 2_000_000_000,
            P["HV_PARTITION_PROPERTY_PROCESSOR_VENDOR"]: 1,
            P["HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS"]: 0x0000_3FFF_0000_3FFF,
            P["HV_PARTITION_PROPERTY_COMPATIBILITY_VERSION"]: S.HV_COMPATIBILITY_21_H2,
        }

    def _child_props(self):
        P = spec.enum("hv_partition_property_code")
        d = dict(self._root_props())
        d.update({
            P["HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES"]: DEFAULT_SYNTHETIC_FEATURES,
            P["HV_PARTITION_PROPERTY_TIME_FREEZE"]: 0,
            P["HV_PARTITION_PROPERTY_REFERENCE_TIME"]: 0,
            P["HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION"]: 0,
            P["HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING"]: 0,
            P["HV_PARTITION_PROPERTY_SUSPEND"]: 0,
        })
        return d

    # Ex properties: value[0] = bank count, value[1] = bank 0 (see docs).
    ex_props = {
        S.HV_PARTITION_PROPERTY_VMM_CAPABILITIES: [1, 0],
        S.HV_PARTITION_PROPERTY_ASSIGNABLE_SYNTHETIC_PROC_FEATURES: [1, 0xFFFFFFFF],
    }
    EARLY_PROPS = {S.HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS, S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES,
                   S.HV_PARTITION_PROPERTY_HYPERCALL_DOORBELL_PAGE,
                   S.HV_PARTITION_PROPERTY_PARTITION_DIAG_BUFFER_CONFIG,
                   S.HV_PARTITION_PROPERTY_GICD_BASE_ADDRESS,
                   S.HV_PARTITION_PROPERTY_GITS_TRANSLATER_BASE_ADDRESS,
                   S.HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH,
                   S.HV_PARTITION_PROPERTY_VMM_CAPABILITIES}
    READONLY_PROPS = {S.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0, S.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1,
                      S.HV_PARTITION_PROPERTY_XSAVE_STATES, S.HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE,
                      S.HV_PARTITION_PROPERTY_PROCESSOR_VENDOR, S.HV_PARTITION_PROPERTY_PROCESSOR_CL_FLUSH_SIZE,
                      S.HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY,
                      S.HV_PARTITION_PROPERTY_IMPLEMENTED_PHYSICAL_ADDRESS_BITS,
                      S.HV_PARTITION_PROPERTY_COMPATIBILITY_VERSION}

    def in_reserved(self, pfn):
        return self.hv_base <= (pfn << 12) < self.hv_base + self.hv_size

    def is_ram(self, pfn):
        return self.mem.contains(pfn << 12, 4096)

    def _alloc_overlay(self, what):
        if not self._overlay_free:
            raise HvError(S.HV_STATUS_INSUFFICIENT_MEMORY)
        pfn = self._overlay_free.pop()
        self.mem.fill(pfn << 12, 4096)
        self._overlay_used[pfn] = what
        return pfn

    def _free_overlay(self, pfn):
        if self._overlay_used.pop(pfn, None) is not None:
            self._overlay_free.append(pfn)

    def uc_prot(self, flags):
        from unicorn import UC_PROT_READ, UC_PROT_WRITE, UC_PROT_EXEC
        if flags & S.HV_MAP_GPA_NO_ACCESS:
            return None
        p = 0
        if flags & S.HV_MAP_GPA_READABLE:
            p |= UC_PROT_READ
        if flags & S.HV_MAP_GPA_WRITABLE:
            p |= UC_PROT_WRITE
        if flags & S.HV_MAP_GPA_EXECUTABLE:
            p |= UC_PROT_EXEC
        return p if p else None

    def _log(self, line):
        self.log.append(line)
        if len(self.log) > self._log_size:
            del self.log[:len(self.log) - self._log_size]

    def _post_notify(self, cpu):
        self._notify_q.append(cpu)

    def _flush_notify(self):
        with self._lock:
            q, self._notify_q = self._notify_q, []
        if self.notify:
            for cpu in q:
                self.notify(cpu)

    # ================================================================ knobs
    def fail_next(self, code, status, nth=1):
        """Make the nth following call of `code` fail with `status`."""
        with self._lock:
            self._faults.append([code, nth, status])

    def insufficient_memory_once(self, code):
        self.fail_next(code, S.HV_STATUS_INSUFFICIENT_MEMORY)

    def contiguous_next(self, code, pages=CONTIGUOUS_PAGES, root=False):
        """The next call of `code` that charges a pool also needs `pages`
        physically contiguous pages (a naturally aligned run deposited by one
        DepositMemory call) from the target's pool, or the root's with
        root=True. Until they are there it fails with
        INSUFFICIENT_CONTIGUOUS_MEMORY (_ROOT_MEMORY); the request stays armed
        until a call of `code` succeeds in charging it."""
        with self._lock:
            self._contig[code] = (pages, root)

    def delay(self, code, seconds):
        with self._lock:
            if seconds:
                self._delays[code] = seconds
            else:
                self._delays.pop(code, None)

    def set_rep_limit(self, k, code=None):
        """Rep calls (of `code`, or all) complete at most k reps per call."""
        with self._lock:
            if k:
                self.rep_limit[code] = k
            else:
                self.rep_limit.pop(code, None)

    def reset_faults(self):
        with self._lock:
            self._faults.clear()
            self._delays.clear()
            self.rep_limit.clear()
            self._contig.clear()

    # ================================================================ introspection
    def stats(self):
        with self._lock:
            parts = {}
            for pid, p in self.partitions.items():
                parts[pid] = dict(
                    state=p.state, flags=p.flags, deposited=len(p.free) + p.held_count(), free=len(p.free),
                    used=p.held_count(), vps=sorted(p.vps),
                    maps_4k=sum(1 for e in p.gpa.values() if e[2] is None),
                    maps_2m=len(p.large), mapped_pages=len(p.gpa),
                    map_calls_2m=p.stats["map_2m"], map_calls_4k=p.stats["map_4k"],
                    intercepts=len(p.intercepts), ports=sorted(p.ports),
                    connections=sorted(p.connections))
            port_table = [dict(partition=p.id, port_id=pt.id, type=pt.type, connection_partition=pt.conn_pid,
                               target_sint=pt.target_sint, target_vp=pt.target_vp, signals=pt.signals)
                          for p in self.partitions.values() for pt in p.ports.values()]
            conn_table = [dict(partition=p.id, connection_id=cn.id, type=cn.type, port_partition=cn.port.part.id,
                               port_id=cn.port.id, port_alive=cn.port.alive, gpa=cn.gpa,
                               trigger_value=cn.value, flags=cn.flags, triggers=cn.triggers)
                          for p in self.partitions.values() for cn in p.connections.values()]
            return dict(ports=len(port_table), connections=len(conn_table),
                        # ports / connections that involve a child partition (owned by one,
                        # or created for one that may be gone by now): 0 after a clean teardown
                        ports_child=sum(1 for t in port_table
                                        if t["partition"] != ROOT_ID or t["connection_partition"] not in (0, ROOT_ID)),
                        connections_child=sum(1 for t in conn_table
                                              if t["partition"] != ROOT_ID or t["port_partition"] != ROOT_ID),
                        port_table=port_table, connection_table=conn_table,
                        calls={S.HYPERCALLS[c]["name"] if c in S.HYPERCALLS else hex(c): n
                               for c, n in self.calls.items()},
                        calls_by_code=dict(self.calls),
                        statuses={spec.status_name(s): n for s, n in self.statuses.items()},
                        partitions=parts, live=sorted(p for p in self.partitions if p != ROOT_ID),
                        overlay_used=len(self._overlay_used), scheduler=self.scheduler,
                        deposited_pages={pid: v["deposited"] for pid, v in parts.items()},
                        mappings={pid: v["mapped_pages"] for pid, v in parts.items()},
                        large_mappings=sum(v["maps_2m"] for v in parts.values()),
                        vps={pid: v["vps"] for pid, v in parts.items()},
                        contract_violations=list(self.contract_violations),
                        kicks=dict(self.kicks),
                        root_pool_used=self.root.held_count())

    def report(self, last=40):
        st = self.stats()
        lines = ["hvsim model: scheduler=%s partitions=%s" % (st["scheduler"], st["live"])]
        for pid, p in st["partitions"].items():
            lines.append("  partition 0x%x: %s" % (pid, p))
        lines.append("  ports: %d (child %d), connections: %d (child %d)" % (
            st["ports"], st["ports_child"], st["connections"], st["connections_child"]))
        for t in st["port_table"]:
            lines.append("    port %s" % t)
        for t in st["connection_table"]:
            lines.append("    connection %s" % t)
        lines.append("  calls: %s" % st["calls"])
        lines.append("  statuses: %s" % st["statuses"])
        lines.append("  last %d hypercalls:" % last)
        lines.extend("    " + l for l in list(self.log)[-last:])
        return "\n".join(lines)

    # ================================================================ hypercall entry
    def hypercall(self, cpu, control, in_gpa, out_gpa, caller_irqs=True, root_irq=None):
        """caller_irqs: the calling root CPU has interrupts enabled during the
        call (a DispatchVp then ends when it takes one). root_irq: None, or a
        callable telling whether the calling CPU has taken an interrupt since
        the call began (polled while a VP runs for it)."""
        return self._call(cpu, control, False, in_gpa, out_gpa, None, caller_irqs, root_irq)

    def hypercall_fast(self, cpu, control, in0, in1):
        return self._call(cpu, control, True, None, None, struct.pack("<QQ", in0 & U64, in1 & U64))

    def _call(self, cpu, control, fast_api, in_gpa, out_gpa, fast_bytes, caller_irqs=False,
              root_irq=None):
        code = spec.control_field(control, "call_code")
        t0 = time.monotonic()
        cont = None
        c = None
        try:
            with self._lock:
                self.calls[code] += 1
                c = _Call(self, cpu, control, code, fast_api, in_gpa, out_gpa, fast_bytes)
                self._cur_code = code
                c.caller_irqs, c.root_irq_poll = caller_irqs, root_irq
                status = c.validate()
                if status is None:
                    status = self._inject(code)
                    if status is None:
                        handler = getattr(self, "_hc_" + c.info["name"], None)
                        if handler is None:
                            status = S.HV_STATUS_INVALID_HYPERCALL_CODE
                        else:
                            try:
                                r = handler(c)
                            except HvError as e:
                                r = e.status
                                if e.reps is not None:
                                    c.done = e.reps
                            if callable(r):
                                cont = r
                                status = None
                            else:
                                status = r
            if cont is not None:
                try:
                    status = cont()
                except HvError as e:
                    status = e.status
            d = self._delays.get(code)
            if d:
                time.sleep(d)
            with self._lock:
                if status == S.HV_STATUS_SUCCESS:
                    c.commit()
                elif c.info and c.info["form"] == "rep":
                    c.commit_partial()
                reps = c.done if (c.info and c.info["form"] == "rep") else 0
                self.statuses[status] += 1
                self._log("%.3f cpu%d %s%s -> %s%s" % (
                    t0, cpu, c.describe(), "", spec.status_name(status),
                    (" reps=%d" % reps) if c.info and c.info["form"] == "rep" else ""))
                return spec.result_value(status, reps)
        finally:
            self._flush_notify()

    def _inject(self, code):
        for f in self._faults:
            if f[0] == code:
                f[1] -= 1
                if f[1] <= 0:
                    self._faults.remove(f)
                    return f[2]
                break
        return None

    # ================================================================ partition lookup
    def _part(self, pid, allow_root=True):
        if pid == PARTITION_ID_SELF:
            pid = ROOT_ID
        p = self.partitions.get(pid)
        if p is None or (p is self.root and not allow_root):
            raise HvError(S.HV_STATUS_INVALID_PARTITION_ID)
        return p

    def _child(self, pid, states=(ST_INITIALIZED,)):
        p = self._part(pid, allow_root=False)
        if p.state not in states:
            raise HvError(S.HV_STATUS_INVALID_PARTITION_STATE)
        return p

    def _vp(self, p, index):
        vp = p.vps.get(index)
        if vp is None:
            raise HvError(S.HV_STATUS_INVALID_VP_INDEX)
        return vp

    def _find_run(self, pool, k):
        """A naturally aligned run of k free pages of `pool` from one
        contiguous chunk (a DepositMemory call whose pages were one naturally
        aligned power-of-two run of at least k pages: the model's stand-in
        for a higher-order allocation), or None."""
        free = set(pool.free)
        for pfn in pool.free:
            b = self.batch.get(pfn)
            if b is None or b[1] < k or pfn % k:
                continue
            if all(pfn + j in free and self.batch.get(pfn + j) == b for j in range(k)):
                return [pfn + j for j in range(k)]
        return None

    def _take(self, p, n, key, root_n=0):
        """Charge an object: n pages from p's pool (held by p under `key`) and
        root_n pages from the root's pool (held by the root under
        ("for", p.id, key)), all or nothing. A contiguous request armed for
        the current call (contiguous_next) adds its run. Statuses:
        INSUFFICIENT_MEMORY (p's pool), INSUFFICIENT_ROOT_MEMORY (the root's
        pool charged for a child), and the CONTIGUOUS variants."""
        root = self.root
        rkey = ("for", p.id, key)
        contig = self._contig.get(self._cur_code)
        run = pool_of_run = None
        if contig:
            pages, in_root = contig
            pool_of_run = root if in_root else p
            run = self._find_run(pool_of_run, pages)
            if run is None:
                raise HvError(S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY
                              if pool_of_run is root and p is not root
                              else S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY)
        need_p = n + (len(run) if run and pool_of_run is p else 0)
        if len(p.free) < need_p:
            raise HvError(S.HV_STATUS_INSUFFICIENT_MEMORY)
        if p is not root:
            need_r = root_n + (len(run) if run and pool_of_run is root else 0)
            if len(root.free) < need_r:
                raise HvError(S.HV_STATUS_INSUFFICIENT_ROOT_MEMORY)
        if run:
            del self._contig[self._cur_code]
            for x in run:
                pool_of_run.free.remove(x)
            pool_of_run.held.setdefault(key if pool_of_run is p else rkey, []).extend(run)
        pages = [p.free.pop() for _ in range(n)]
        p.held.setdefault(key, []).extend(pages)
        if root_n:
            pool = root if p is not root else p
            pool.held.setdefault(rkey, []).extend(pool.free.pop() for _ in range(root_n))
        return pages

    def _give_back(self, p, key):
        pages = p.held.pop(key, [])
        p.free.extend(pages)
        rpages = self.root.held.pop(("for", p.id, key), [])
        self.root.free.extend(rpages)

    # ================================================================ partitions
    def _hc_create_partition(self, c):
        i = c.inp
        allowed = spec.enum_mask("hv_partition_creation_flag")
        if i.flags & ~allowed:
            return S.HV_STATUS_INVALID_PARAMETER
        if i.bits("isolation_properties", "isolation_type") != 0:
            return S.HV_STATUS_INVALID_PARAMETER
        if len(self.root.free) < self.costs["create_partition"]:
            return S.HV_STATUS_INSUFFICIENT_MEMORY
        pid = self._next_pid
        self._next_pid += 1
        p = Partition(pid, i.flags)
        p.props = dict(self.child_prop_defaults)
        p.compat = i.compatibility_version
        p.root_cost = [self.root.free.pop() for _ in range(self.costs["create_partition"])]
        self.root.held.setdefault(("partition", pid), []).extend(p.root_cost)
        self.partitions[pid] = p
        c.out = S.hv_output_partition_id(partition_id=pid)
        return S.HV_STATUS_SUCCESS

    def _hc_initialize_partition(self, c):
        p = self._child(c.inp.partition_id, (ST_CREATED,))
        self._take(p, self.costs["initialize_partition"], "partition")
        p.state = ST_INITIALIZED
        return S.HV_STATUS_SUCCESS

    def _hc_finalize_partition(self, c):
        p = self._child(c.inp.partition_id, (ST_CREATED, ST_INITIALIZED))
        if p.gpa:
            # Hyper-V drops the mappings itself; our driver unmaps every
            # region before it unpins and finalizes, so pages it unpinned are
            # never still mapped into the child.
            msg = (f"FinalizePartition of {p.id:#x} with {len(p.gpa)} GPA pages "
                   f"still mapped (the root did not unmap them first)")
            self.contract_violations.append(msg)
            self._log("contract: " + msg)
        for vp in list(p.vps.values()):
            self._destroy_vp(p, vp)
        self._unmap_all(p)
        for key in list(p.held):
            self._give_back(p, key)
        for key in [k for k in self.root.held if k[0] == "for" and k[1] == p.id]:
            self.root.free.extend(self.root.held.pop(key))
        for key in [k for k in self.stats_pages if k[1] == p.id]:
            self._free_overlay(self.stats_pages.pop(key))
        # the TLFS: finalize deletes the partition's remaining ports and
        # connections (their pool pages went back with the rest above)
        for port in list(p.ports.values()):
            self._drop_port(port)
        p.ports.clear()
        p.connections.clear()
        p.intercepts.clear()
        p.state = ST_FINALIZED
        return S.HV_STATUS_SUCCESS

    def _hc_delete_partition(self, c):
        p = self._child(c.inp.partition_id, (ST_CREATED, ST_FINALIZED))
        if p.free or p.held_count() or p.vps:
            return S.HV_STATUS_INVALID_PARTITION_STATE
        self._unmap_all(p)
        pages = self.root.held.pop(("partition", p.id), [])
        self.root.free.extend(pages)
        del self.partitions[p.id]
        return S.HV_STATUS_SUCCESS

    def _hc_get_partition_id(self, c):
        c.out = S.hv_output_partition_id(partition_id=ROOT_ID)
        return S.HV_STATUS_SUCCESS

    def _hc_get_system_property(self, c):
        if c.inp.property_id != S.HV_SYSTEM_PROPERTY_SCHEDULER_TYPE:
            return S.HV_STATUS_INVALID_PARAMETER
        v = S.HV_SCHEDULER_TYPE_ROOT if self.scheduler == "root" else S.HV_SCHEDULER_TYPE_CORE_SMT
        c.out = S.hv_output_get_system_property(value=v)
        return S.HV_STATUS_SUCCESS

    def _prop_store(self, p):
        return self.props_root if p is self.root else p.props

    def _hc_get_partition_property(self, c):
        p = self._part(c.inp.partition_id)
        if p.state == ST_FINALIZED:
            return S.HV_STATUS_INVALID_PARTITION_STATE
        code = c.inp.property_code
        store = self._prop_store(p)
        if code not in store:
            return S.HV_STATUS_UNKNOWN_PROPERTY
        c.out = S.hv_output_get_partition_property(property_value=store[code])
        return S.HV_STATUS_SUCCESS

    def _hc_set_partition_property(self, c):
        """SetPartitionProperty; with the async knob armed, it answers
        CALL_PENDING and reports the real status in an ASYNC_CALL_COMPLETION
        message on the calling CPU's SINT0, as Hyper-V does for slow properties."""
        status = self._set_property_now(c)
        code = S.HVCALL_SET_PARTITION_PROPERTY
        if self._async_next.get(code, 0) > 0:
            self._async_next[code] -= 1
            pl = S.hv_async_completion_message(partition_id=c.inp.partition_id, status=status,
                                               completion_count=1)
            msg = self._message(S.HVMSG_ASYNC_CALL_COMPLETION, pl, 0)
            self.synic_pages(c.cpu)
            self.synic[c.cpu].queues[S.HV_SYNIC_INTERCEPTION_SINT_INDEX].append(msg)
            self._deliver(c.cpu, S.HV_SYNIC_INTERCEPTION_SINT_INDEX)
            return S.HV_STATUS_CALL_PENDING
        return status

    def async_next(self, code, count=1):
        """The next `count` calls of `code` complete asynchronously."""
        with self._lock:
            self._async_next[code] = self._async_next.get(code, 0) + count

    def _set_property_now(self, c):
        p = self._part(c.inp.partition_id)
        if p is self.root:
            return S.HV_STATUS_ACCESS_DENIED
        if p.state == ST_FINALIZED:
            return S.HV_STATUS_INVALID_PARTITION_STATE
        code = c.inp.property_code
        if code not in spec.PROPERTY_NAMES:
            return S.HV_STATUS_UNKNOWN_PROPERTY
        if code in self.READONLY_PROPS:
            return S.HV_STATUS_ACCESS_DENIED
        if code in self.EARLY_PROPS and p.state != ST_CREATED:
            return S.HV_STATUS_INVALID_PARTITION_STATE
        if code == S.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING:
            on = c.inp.property_value
            if on not in (0, 1):
                return S.HV_STATUS_INVALID_PARAMETER
            if on and not p.props.get(code):
                try:
                    # the tracking bitmap comes from the partition's pool
                    self._take(p, self.costs["access_tracking"], ("tracking",))
                except HvError as e:
                    return e.status
            elif not on:
                self._give_back(p, ("tracking",))
        p.props[code] = c.inp.property_value
        return S.HV_STATUS_SUCCESS

    def _hc_get_partition_property_ex(self, c):
        p = self._part(c.inp.partition_id)
        if p.state == ST_FINALIZED:
            return S.HV_STATUS_INVALID_PARTITION_STATE
        code = c.inp.property_code
        out = S.hv_output_get_partition_property_ex()
        if code in self.ex_props:
            vals = self.ex_props[code]
        elif code in self._prop_store(p):
            vals = [self._prop_store(p)[code]]
        else:
            return S.HV_STATUS_UNKNOWN_PROPERTY
        for k, v in enumerate(vals):
            out.value[k] = v
        c.out = out
        return S.HV_STATUS_SUCCESS

    # ================================================================ memory pool
    def _hc_deposit_memory(self, c):
        p = self._part(c.inp.partition_id)
        if p.state == ST_FINALIZED:
            return S.HV_STATUS_INVALID_PARTITION_STATE
        self._batch_seq += 1
        given = [c.rep_in(i) for i in range(c.rep_start, c.rep_count)]
        n = len(given)
        chunk = n if (n & (n - 1) == 0 and given[0] % n == 0 and
                      given == list(range(given[0], given[0] + n))) else 1
        for i in c.reps():
            pfn = c.rep_in(i)
            # a frame the hypervisor owns (reserved/overlay, already deposited,
            # a provided state page) or one a child maps is refused
            if not self.is_ram(pfn) or self.in_reserved(pfn) or pfn in self.deposited \
                    or self.mapped[pfn] or pfn in self.provided_pages:
                return S.HV_STATUS_INVALID_PARAMETER
            self.deposited[pfn] = p.id
            self.batch[pfn] = (self._batch_seq, chunk)
            self.mem.write(pfn << 12, POOL_PATTERN * (S.PAGE_SIZE // len(POOL_PATTERN)))
            p.free.append(pfn)
        return S.HV_STATUS_SUCCESS

    def _check_pattern(self, pfn, owner):
        """A page going back to the root must still hold the deposit pattern:
        the root may not write into memory the hypervisor owns."""
        if self.mem.read(pfn << 12, S.PAGE_SIZE) != POOL_PATTERN * (S.PAGE_SIZE // len(POOL_PATTERN)):
            msg = (f"deposited page {pfn:#x} of partition {owner:#x} was written while the "
                   f"hypervisor owned it (pattern lost at withdraw)")
            self.contract_violations.append(msg)
            self._log("contract: " + msg)

    def _hc_withdraw_memory(self, c):
        p = self._part(c.inp.partition_id)
        for i in c.reps():
            if not p.free:
                return S.HV_STATUS_NO_RESOURCES
            pfn = p.free.pop()
            self._check_pattern(pfn, p.id)
            del self.deposited[pfn]
            self.batch.pop(pfn, None)
            c.rep_out(i, pfn)
        return S.HV_STATUS_SUCCESS

    # ================================================================ GPA maps
    def _pt_need(self, p, gfns_4k, large_base):
        """Page-table pages a new mapping needs: (new l1 regions, new l2 regions)."""
        l1 = set()
        l2 = set()
        if large_base is not None:
            if p.l2[large_base >> 18] == 0:
                l2.add(large_base >> 18)
        for g in gfns_4k:
            if p.l1[g >> 9] == 0:
                l1.add(g >> 9)
            if p.l2[g >> 18] == 0:
                l2.add(g >> 18)
        return l1, l2

    def _hc_map_gpa_pages(self, c):
        i = c.inp
        p = self._child(i.target_partition_id)
        allowed = spec.enum_mask("hv_map_gpa_flag")
        flags = i.map_flags
        if flags & ~allowed:
            return S.HV_STATUS_INVALID_PARAMETER
        large = bool(flags & S.HV_MAP_GPA_LARGE_PAGE)
        if large and (i.target_gpa_base % 512 or
                      (self.require_super_pages_flag and
                       not p.flags & S.HV_PARTITION_CREATION_FLAG_GPA_SUPER_PAGES_ENABLED)):
            return S.HV_STATUS_INVALID_PARAMETER
        width = p.props.get(S.HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH, 46)
        mmio = bool(flags & S.HV_MAP_GPA_NOT_CACHED)
        n = 512 if large else 1
        for k in c.reps():
            pfn = c.rep_in(k)
            gfn = i.target_gpa_base + k * n
            if (gfn + n) << 12 > (1 << width):
                return S.HV_STATUS_INVALID_PARAMETER
            if large and pfn % 512:
                return S.HV_STATUS_INVALID_PARAMETER
            for j in range(n):
                q = pfn + j
                if self.is_ram(q):
                    if self.in_reserved(q) or q in self.deposited:
                        return S.HV_STATUS_INVALID_PARAMETER
                elif not mmio:
                    return S.HV_STATUS_INVALID_PARAMETER
                if gfn + j in p.gpa and not self.allow_remap:
                    return S.HV_STATUS_INVALID_PARAMETER
            if self.allow_remap:
                for j in range(n):
                    if gfn + j in p.gpa:
                        self._unmap_one(p, gfn + j)
            l1, l2 = self._pt_need(p, [] if large else [gfn], gfn if large else None)
            if len(p.free) < len(l1) + len(l2):
                return S.HV_STATUS_INSUFFICIENT_MEMORY
            for r in l1:
                self._take(p, 1, ("pt1", r))
            for r in l2:
                self._take(p, 1, ("pt2", r))
            if large:
                p.large.add(gfn)
                p.l2[gfn >> 18] += 1
                for j in range(512):
                    p.gpa[gfn + j] = [pfn + j, flags & ~S.HV_MAP_GPA_LARGE_PAGE, gfn]
                    p.__dict__.get("access_states", {}).pop(gfn + j, None)
                    self.mapped[pfn + j] += 1
                p.stats["map_2m"] += 1
            else:
                p.gpa[gfn] = [pfn, flags, None]
                p.__dict__.get("access_states", {}).pop(gfn, None)
                self.mapped[pfn] += 1
                p.l1[gfn >> 9] += 1
                p.l2[gfn >> 18] += 1
                p.stats["map_4k"] += 1
            p.map_gen += 1
        return S.HV_STATUS_SUCCESS

    def _split_large(self, p, base):
        """Turn a 2 MiB mapping into 512 4 KiB mappings (page-table page from the
        pool is not charged: Hyper-V splits with its own reserve)."""
        p.large.discard(base)
        p.l2[base >> 18] -= 1
        for j in range(512):
            e = p.gpa.get(base + j)
            if e is not None:
                e[2] = None
                p.l1[(base + j) >> 9] += 1
                p.l2[(base + j) >> 18] += 1

    def _unmap_one(self, p, gfn):
        e = p.gpa.get(gfn)
        if e[2] is not None:
            self._split_large(p, e[2])
        del p.gpa[gfn]
        self.mapped[e[0]] -= 1
        if not self.mapped[e[0]]:
            del self.mapped[e[0]]
        p.l1[gfn >> 9] -= 1
        if p.l1[gfn >> 9] == 0:
            del p.l1[gfn >> 9]
            self._give_back(p, ("pt1", gfn >> 9))
        self._l2_dec(p, gfn >> 18)
        p.map_gen += 1

    def _l2_dec(self, p, region):
        p.l2[region] -= 1
        if p.l2[region] <= 0:
            del p.l2[region]
            self._give_back(p, ("pt2", region))

    def _unmap_all(self, p):
        for gfn in list(p.gpa):
            e = p.gpa.pop(gfn)
            self.mapped[e[0]] -= 1
            if not self.mapped[e[0]]:
                del self.mapped[e[0]]
        p.large.clear()
        p.l1.clear()
        p.l2.clear()
        for key in [k for k in p.held if k[0] in ("pt1", "pt2")]:
            self._give_back(p, key)
        p.map_gen += 1

    def _hc_unmap_gpa_pages(self, c):
        i = c.inp
        p = self._child(i.target_partition_id)
        allowed = spec.enum_mask("hv_unmap_gpa_flag")
        if i.unmap_flags & ~allowed:
            return S.HV_STATUS_INVALID_PARAMETER
        large = bool(i.unmap_flags & S.HV_UNMAP_GPA_LARGE_PAGE)
        if large and i.target_gpa_base % 512:
            return S.HV_STATUS_INVALID_PARAMETER
        n = 512 if large else 1
        for k in c.reps():
            gfn = i.target_gpa_base + k * n
            if any(gfn + j not in p.gpa for j in range(n)):
                return S.HV_STATUS_INVALID_PARAMETER
            if large and gfn in p.large:
                p.large.discard(gfn)
                for j in range(512):
                    e = p.gpa.pop(gfn + j)
                    self.mapped[e[0]] -= 1
                    if not self.mapped[e[0]]:
                        del self.mapped[e[0]]
                self._l2_dec(p, gfn >> 18)
                p.map_gen += 1
            else:
                for j in range(n):
                    self._unmap_one(p, gfn + j)
        return S.HV_STATUS_SUCCESS

    def _hc_get_gpa_pages_access_states(self, c):
        """Report, then clear or set, each page's accessed/dirty bits. A page
        starts accessed and dirty when it is mapped; guest accesses do not
        update the bits (simplification: Unicorn does not report them)."""
        p = self._child(c.inp.partition_id)
        f = c.inp
        if (f.bits("flags", "clear_accessed") and f.bits("flags", "set_accessed")) or \
                (f.bits("flags", "clear_dirty") and f.bits("flags", "set_dirty")):
            return S.HV_STATUS_INVALID_PARAMETER       # contradictory flags
        if not p.props.get(S.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING):
            return S.HV_STATUS_INVALID_PARTITION_STATE  # tracking is off
        acc = S.HV_GPA_PAGE_ACCESS_STATE_ACCESSED
        dirty = S.HV_GPA_PAGE_ACCESS_STATE_DIRTY
        states = p.__dict__.setdefault("access_states", {})
        for k in c.reps():
            gfn = f.hv_gpa_page_number + k
            if gfn not in p.gpa:
                c.rep_out(k, 0)
                continue
            st = states.get(gfn, acc | dirty)
            c.rep_out(k, st)
            if f.bits("flags", "clear_accessed"):
                st &= ~acc
            if f.bits("flags", "set_accessed"):
                st |= acc
            if f.bits("flags", "clear_dirty"):
                st &= ~dirty
            if f.bits("flags", "set_dirty"):
                st |= dirty
            states[gfn] = st
        return S.HV_STATUS_SUCCESS

    # ================================================================ intercepts
    def _hc_install_intercept(self, c):
        i = c.inp
        p = self._child(i.partition_id, (ST_CREATED, ST_INITIALIZED))
        allowed = spec.enum_mask("hv_intercept_access_type_mask")
        if i.access_type & ~allowed or i.intercept_type not in spec.enum("hv_intercept_type").values() \
                or i.intercept_type == S.HV_INTERCEPT_TYPE_INVALID:
            return S.HV_STATUS_INVALID_PARAMETER
        if ("intercept", i.intercept_type) not in p.held:
            # the first intercept of a type allocates that type's table
            self._take(p, self.costs["install_intercept"], ("intercept", i.intercept_type))
        p.intercepts[(i.intercept_type, i.intercept_parameter)] = i.access_type
        return S.HV_STATUS_SUCCESS

    def _hc_register_intercept_result(self, c):
        i = c.inp
        p = self._child(i.partition_id)
        if i.intercept_type != S.HV_INTERCEPT_TYPE_X64_CPUID:
            # only CPUID results have a layout in the spec and an effect in
            # the model: MSR results (and any other type) are refused
            return S.HV_STATUS_INVALID_PARAMETER
        prm = i.parameters
        key = (prm.input_eax, prm.input_ecx if prm.subleaf_specific else None)
        res = (prm.eax, prm.eax_mask, prm.ebx, prm.ebx_mask, prm.ecx, prm.ecx_mask, prm.edx, prm.edx_mask)
        targets = p.vps.values() if i.vp_index == 0xFFFFFFFF else [self._vp(p, i.vp_index)]
        p.cpuid_all = getattr(p, "cpuid_all", {})
        if i.vp_index == 0xFFFFFFFF:
            p.cpuid_all[key] = res
        for vp in targets:
            vp.cpuid_results[key] = res
        return S.HV_STATUS_SUCCESS

    def cpuid_default(self, vp, eax, ecx):
        if eax == 0:
            return (0xD, _VENDOR[0], _VENDOR[2], _VENDOR[1])
        if eax == 1:
            ecx_f = (1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 23)
            ecx_f = self.platform.cpuid1_ecx(vp.part, ecx_f)     # hypervisor, TSC-deadline bits
            edx_f = 0x0789FBFF & ~(1 << 9) | (1 << 9)
            return (0x000806EC, (vp.index << 24) | (1 << 16) | (8 << 8), ecx_f, edx_f)
        if 0x40000000 <= eax <= 0x400000FF:
            return self.platform.cpuid(vp, eax)
        if eax == 0x80000000:
            return (0x80000008, 0, 0, 0)
        if eax == 0x80000001:
            return (0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29))
        if eax == 0x80000008:
            return (46 | (48 << 8), 0, 0, 0)
        return (0, 0, 0, 0)

    def cpuid_value(self, vp, eax, ecx):
        r = list(self.cpuid_default(vp, eax, ecx))
        ov = vp.cpuid_results.get((eax, ecx)) or vp.cpuid_results.get((eax, None))
        if ov:
            for k in range(4):
                val, mask = ov[2 * k], ov[2 * k + 1]
                r[k] = (r[k] & ~mask) | (val & mask)
        return tuple(r)

    def _hc_get_vp_cpuid_values(self, c):
        p = self._child(c.inp.partition_id)
        vp = self._vp(p, c.inp.vp_index)
        for k in c.reps():
            leaf = c.rep_in(k)
            a, b, cc, d = self.cpuid_value(vp, leaf.eax, leaf.ecx)
            c.rep_out(k, S.hv_cpuid_result(eax=a, ebx=b, ecx=cc, edx=d))
        return S.HV_STATUS_SUCCESS

    # ================================================================ VPs
    def _hc_create_vp(self, c):
        i = c.inp
        p = self._child(i.partition_id)
        if i.vp_index >= MAX_VPS or i.vp_index in p.vps:
            return S.HV_STATUS_INVALID_VP_INDEX
        self._take(p, self.costs["create_vp"], ("vp", i.vp_index), root_n=self.costs["create_vp_root"])
        vp = Vp(p, i.vp_index)
        vp.cpuid_results.update(getattr(p, "cpuid_all", {}))
        p.vps[i.vp_index] = vp
        self.platform.attach_vp(vp)
        return S.HV_STATUS_SUCCESS

    def _destroy_vp(self, p, vp):
        self._stop_vp(vp)
        vp.deleted = True
        self.platform.detach_vp(vp)
        for t, (pfn, overlay) in list(vp.state_pages.items()):
            if overlay:
                self._free_overlay(pfn)
            else:
                self.provided_pages.discard(pfn)
            self._give_back(p, ("state", vp.index, t))
        vp.state_pages.clear()
        self._give_back(p, ("synic", vp.index))
        if vp.engine:
            vp.engine.close()
            vp.engine = None
        self._give_back(p, ("vp", vp.index))
        for key in [k for k in self.stats_pages if k[1] == p.id and k[2] == vp.index]:
            self._free_overlay(self.stats_pages.pop(key))
        del p.vps[vp.index]

    def _hc_delete_vp(self, c):
        p = self._child(c.inp.partition_id)
        vp = self._vp(p, c.inp.vp_index)
        self._destroy_vp(p, vp)
        return S.HV_STATUS_SUCCESS

    # ---------------------------------------------------------------- registers
    # The "intermediate" control registers are the guest's CR0/CR3/CR4/CR8 as
    # a nested hypervisor in the guest would see them. Without nested
    # virtualization (the model offers none) they are the guest's own control
    # registers; Cloud Hypervisor sets a guest's initial mode through them.
    INTERMEDIATE = {"INTERMEDIATE_CR0": "CR0", "INTERMEDIATE_CR3": "CR3",
                    "INTERMEDIATE_CR4": "CR4", "INTERMEDIATE_CR8": "CR8"}

    def get_reg(self, vp, name):
        st = vp.cpu
        n = spec.REGISTER_NAMES[name]
        short = n.replace("HV_X64_REGISTER_", "").replace("HV_REGISTER_", "")
        short = self.INTERMEDIATE.get(short, short)
        if short in GPR_NAMES:
            return st.gpr[GPR_NAMES.index(short)]
        if short == "RIP":
            return st.rip
        if short == "RFLAGS":
            return st.rflags
        if short in SEG_NAMES:
            return seg_pack(st.segs[SEG_NAMES.index(short)])
        if short == "LDTR":
            return seg_pack(st.ldtr)
        if short == "TR":
            return seg_pack(st.tr)
        if short == "GDTR":
            return table_pack(st.gdtr)
        if short == "IDTR":
            return table_pack(st.idtr)
        if short == "CR8":
            return vp.apic.tpr >> 4
        if short in ("CR0", "CR2", "CR3", "CR4"):
            return getattr(st, short.lower())
        if short == "EFER":
            return st.efer
        if short in DR_NAMES:
            return st.dr[DR_NAMES.index(short)]
        if short.startswith("XMM") and short[3:].isdigit():
            return st.xmm[int(short[3:])]
        if short in ("STAR", "LSTAR", "CSTAR", "SFMASK", "KERNEL_GS_BASE", "SYSENTER_CS",
                     "SYSENTER_EIP", "SYSENTER_ESP", "PAT"):
            return st.msrs.get(short, 0)
        if name == _r("HV_REGISTER_VP_ROOT_SIGNAL_COUNT"):
            return vp.signal_count
        if name == _r("HV_X64_REGISTER_TSC"):
            return self.platform.clock.tsc()       # the guest's TSC (platform.Clock)
        v = self.platform.get_register(vp, name)  # the guest platform's synthetic MSRs
        if v is not None:
            return v
        return vp.other.get(name, 0)

    def set_reg(self, vp, name, value):
        st = vp.cpu
        n = spec.REGISTER_NAMES[name]
        short = n.replace("HV_X64_REGISTER_", "").replace("HV_REGISTER_", "")
        short = self.INTERMEDIATE.get(short, short)
        v64 = value & U64
        if short in GPR_NAMES:
            st.gpr[GPR_NAMES.index(short)] = v64
        elif short == "RIP":
            st.rip = v64
        elif short == "RFLAGS":
            st.rflags = v64 | 2
        elif short in SEG_NAMES:
            st.segs[SEG_NAMES.index(short)] = seg_unpack(value)
        elif short == "LDTR":
            st.ldtr = seg_unpack(value)
        elif short == "TR":
            st.tr = seg_unpack(value)
        elif short == "GDTR":
            st.gdtr = table_unpack(value)
        elif short == "IDTR":
            st.idtr = table_unpack(value)
        elif short == "CR8":
            vp.apic.set_tpr((v64 & 0xF) << 4)           # CR8 is TPR[7:4]
            st.cr8 = v64 & 0xF
        elif short in ("CR0", "CR2", "CR3", "CR4"):
            setattr(st, short.lower(), v64)
        elif short == "EFER":
            st.efer = v64
        elif short in DR_NAMES:
            st.dr[DR_NAMES.index(short)] = v64
        elif short.startswith("XMM") and short[3:].isdigit():
            st.xmm[int(short[3:])] = value & ((1 << 128) - 1)
        elif short in ("STAR", "LSTAR", "CSTAR", "SFMASK", "KERNEL_GS_BASE", "SYSENTER_CS",
                       "SYSENTER_EIP", "SYSENTER_ESP", "PAT"):
            st.msrs[short] = v64
        elif name in (_r("HV_REGISTER_EXPLICIT_SUSPEND"), _r("HV_REGISTER_INTERCEPT_SUSPEND"),
                      _r("HV_REGISTER_DISPATCH_SUSPEND")):
            vp.other[name] = value & 1
        elif self.platform.set_register(vp, name, value):
            pass                                    # the guest platform's synthetic MSRs
        else:
            vp.other[name] = value & ((1 << 128) - 1)
            if name == _r("HV_X64_REGISTER_INITIAL_APIC_ID"):
                vp.apic.apic_id = value & 0xFFFFFFFF

    # SetVpRegisters value checks (TLFS: reserved bits must be zero, fixed
    # bits as the architecture defines them, nothing beyond the register's
    # width; read-only registers cannot be written). x86 numbers, Intel SDM.
    _CR0_OK = 0xE005003F            # PE MP EM TS ET NE WP AM NW CD PG
    _CR4_OK = 0x01FF7FFF            # bits 0-24 except 15 (reserved)
    _EFER_OK = 0xD01                # SCE LME LMA NXE (the model's CPU is Intel)
    _RFLAGS_RSVD = (1 << 3) | (1 << 5) | (1 << 15) | (U64 & ~((1 << 22) - 1))
    _CANONICAL = ("RIP", "KERNEL_GS_BASE", "LSTAR", "CSTAR", "SYSENTER_EIP", "SYSENTER_ESP")
    _WIDE = ("XMM", "FP_MMX")       # 128-bit value registers (prefixes)
    READONLY_REGS = frozenset(n for n in ("HV_REGISTER_VP_INDEX", "HV_REGISTER_VP_ROOT_SIGNAL_COUNT")
                              if n in spec.enum("hv_register_name"))

    @staticmethod
    def _canonical(v):
        top = v >> 47                   # 48-bit virtual addresses (CPUID 0x80000008)
        return top in (0, (1 << 17) - 1)

    def check_reg_value(self, vp, name, value):
        """The status SetVpRegisters returns for writing `value` (128 bits)
        to `name`, or None when Hyper-V would accept it."""
        n = spec.REGISTER_NAMES[name]
        short = n.replace("HV_X64_REGISTER_", "").replace("HV_REGISTER_", "")
        bad = S.HV_STATUS_INVALID_REGISTER_VALUE
        if n in self.READONLY_REGS:
            return S.HV_STATUS_INVALID_PARAMETER
        lo, hi = value & U64, value >> 64
        structured = short in SEG_NAMES or short in ("LDTR", "TR", "GDTR", "IDTR") or \
            short.startswith(self._WIDE)
        if not structured and hi and (short in GPR_NAMES or short in DR_NAMES or short in
                                      ("RIP", "RFLAGS", "CR0", "CR2", "CR3", "CR4", "CR8", "EFER")
                                      or short in self._CANONICAL):
            return bad                                  # beyond the register's width
        if short == "RFLAGS" and (lo & self._RFLAGS_RSVD or not lo & 2):
            return bad
        if short == "CR0" and (lo & ~self._CR0_OK or (lo >> 31 & 1 and not lo & 1)
                               or (lo >> 29 & 1 and not lo >> 30 & 1)):
            return bad                                  # reserved bits, PG without PE, NW without CD
        if short == "CR4" and lo & ~self._CR4_OK:
            return bad
        if short == "CR3" and lo >> 52:
            return bad                                  # beyond any physical address
        if short == "CR8" and lo > 0xF:
            return bad
        if short == "EFER" and lo & ~self._EFER_OK:
            return bad
        if short in ("DR6", "DR7") and lo >> 32:
            return bad
        if short in self._CANONICAL and not self._canonical(lo):
            return bad
        if short in ("FS", "GS", "LDTR", "TR") and not self._canonical(seg_unpack(value)[0]):
            return bad
        if short in ("GDTR", "IDTR") and (not self._canonical(table_unpack(value)[0])
                                         or table_unpack(value)[1] > 0xFFFF):
            return bad
        return None

    def _check_vtl(self, vtl):
        if vtl not in (0, 0x10):
            raise HvError(S.HV_STATUS_INVALID_PARAMETER)

    def _hc_get_vp_registers(self, c):
        p = self._child(c.inp.partition_id)
        vp = self._vp(p, c.inp.vp_index)
        self._check_vtl(c.inp.input_vtl)
        self._sync_reg_page_in(vp)
        for k in c.reps():
            name = c.rep_in(k)
            if name not in spec.REGISTER_NAMES:
                return S.HV_STATUS_INVALID_PARAMETER
            v = self.get_reg(vp, name)
            c.rep_out(k, S.hv_register_value(low=v & U64, high=(v >> 64) & U64))
        return S.HV_STATUS_SUCCESS

    SUSPEND_NAMES = None

    def _hc_set_vp_registers(self, c):
        p = self._child(c.inp.partition_id)
        vp = self._vp(p, c.inp.vp_index)
        self._check_vtl(c.inp.input_vtl)
        self._sync_reg_page_in(vp)
        susp = {_r("HV_REGISTER_EXPLICIT_SUSPEND"), _r("HV_REGISTER_INTERCEPT_SUSPEND"),
                _r("HV_REGISTER_DISPATCH_SUSPEND")}
        was_explicit = vp.reg(_r("HV_REGISTER_EXPLICIT_SUSPEND"))
        for k in c.reps():
            a = c.rep_in(k)
            if a.mbz_violations():
                return S.HV_STATUS_INVALID_PARAMETER
            if a.name not in spec.REGISTER_NAMES:
                return S.HV_STATUS_INVALID_PARAMETER
            if vp.running and a.name not in susp:
                return S.HV_STATUS_INVALID_VP_STATE
            value = a.value.low | (a.value.high << 64)
            bad = self.check_reg_value(vp, a.name, value)
            if bad is not None:
                return bad
            if a.name == _r("HV_REGISTER_SCONTROL") and value & 1 and ("synic", vp.index) not in p.held:
                # enabling the VP's SynIC allocates its message queues
                self._take(p, self.costs["synic_enable"], ("synic", vp.index))
            if a.name == _r("HV_REGISTER_EXPLICIT_SUSPEND") and a.value.low & 1 and vp.running:
                vp.stop_req = True
                self._kick(vp)
                self._wait_stopped(vp)
            self.set_reg(vp, a.name, a.value.low | (a.value.high << 64))
        self._sync_reg_page_out(vp)
        now_explicit = vp.reg(_r("HV_REGISTER_EXPLICIT_SUSPEND"))
        if self.scheduler == "root":
            if was_explicit and not now_explicit:
                self._signal_vp(vp, c.cpu)
        else:
            vp.notify_cpu = c.cpu
            self._maybe_start(vp)
        return S.HV_STATUS_SUCCESS

    # ---------------------------------------------------------------- state pages
    def _hc_map_vp_state_page(self, c):
        i = c.inp
        p = self._child(i.partition_id)
        vp = self._vp(p, i.vp_index)
        if i.type not in (S.HV_VP_STATE_PAGE_REGISTERS, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE):
            return S.HV_STATUS_INVALID_PARAMETER
        if i.type == S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE and \
                not p.flags & S.HV_PARTITION_CREATION_FLAG_INTERCEPT_MESSAGE_PAGE_ENABLED:
            return S.HV_STATUS_INVALID_PARAMETER          # the partition has no such page
        if i.type in vp.state_pages:
            c.out = S.hv_output_map_location(map_location=vp.state_pages[i.type][0])
            return S.HV_STATUS_SUCCESS
        provided = i.bits("flags", "map_location_provided")
        if provided:
            pfn = i.requested_map_location
            if not self.is_ram(pfn) or self.in_reserved(pfn) or pfn in self.deposited \
                    or self.mapped[pfn] or pfn in self.provided_pages:
                return S.HV_STATUS_INVALID_PARAMETER
        self._take(p, self.costs["map_vp_state_page"], ("state", vp.index, i.type))
        if provided:
            self.mem.fill(pfn << 12, 4096)
            vp.state_pages[i.type] = (pfn, False)
            self.provided_pages.add(pfn)
        else:
            try:
                vp.state_pages[i.type] = (self._alloc_overlay(("vp", p.id, vp.index, i.type)), True)
            except HvError:
                self._give_back(p, ("state", vp.index, i.type))
                raise
        if i.type == S.HV_VP_STATE_PAGE_REGISTERS:
            self._sync_reg_page_out(vp)
        elif vp.last_msg is not None:
            self.mem.write(vp.state_pages[i.type][0] << 12, vp.last_msg)
        c.out = S.hv_output_map_location(map_location=vp.state_pages[i.type][0])
        return S.HV_STATUS_SUCCESS

    def _hc_unmap_vp_state_page(self, c):
        i = c.inp
        p = self._child(i.partition_id)
        vp = self._vp(p, i.vp_index)
        ent = vp.state_pages.pop(i.type, None)
        if ent is None:
            return S.HV_STATUS_INVALID_PARAMETER
        if ent[1]:
            self._free_overlay(ent[0])
        else:
            self.provided_pages.discard(ent[0])
        self._give_back(p, ("state", vp.index, i.type))
        return S.HV_STATUS_SUCCESS

    def _reg_page(self, vp):
        ent = vp.state_pages.get(S.HV_VP_STATE_PAGE_REGISTERS)
        return None if ent is None else ent[0] << 12

    def _sync_reg_page_in(self, vp):
        """Load the register classes the VMM marked dirty in the register page."""
        gpa = self._reg_page(vp)
        if gpa is None:
            return
        pg = S.hv_x64_register_page.from_bytes(self.mem.read(gpa, S.hv_x64_register_page.SIZE))
        if not pg.dirty:
            return
        st = vp.cpu
        if pg.bits("dirty", "general"):
            st.gpr = list(pg.gp_registers)
        if pg.bits("dirty", "ip"):
            st.rip = pg.rip
        if pg.bits("dirty", "flags"):
            st.rflags = pg.rflags | 2
        if pg.bits("dirty", "segment"):
            st.segs = [(s.base, s.limit, s.selector, s.attributes) for s in pg.segments]
        if pg.bits("dirty", "xmm"):
            for k in range(6):
                st.xmm[k] = pg.xmm[k].low_part | (pg.xmm[k].high_part << 64)
        self.mem.write_u32(gpa + S.hv_x64_register_page.OFFSETS["dirty"], 0)

    def _sync_reg_page_out(self, vp):
        gpa = self._reg_page(vp)
        if gpa is None:
            return
        st = vp.cpu
        pg = S.hv_x64_register_page.from_bytes(self.mem.read(gpa, S.hv_x64_register_page.SIZE))
        pg.version = 1
        pg.isvalid = 1
        pg.dirty = 0
        for k in range(16):
            pg.gp_registers[k] = st.gpr[k]
        pg.rip, pg.rflags = st.rip, st.rflags
        for k in range(6):
            pg.xmm[k].low_part = st.xmm[k] & U64
            pg.xmm[k].high_part = st.xmm[k] >> 64
            b, l, s, a = st.segs[k]
            pg.segments[k].base, pg.segments[k].limit = b, l
            pg.segments[k].selector, pg.segments[k].attributes = s, a
        pg.cr0, pg.cr3, pg.cr4, pg.cr8, pg.efer, pg.dr7 = (st.cr0, st.cr3, st.cr4, vp.apic.tpr >> 4,
                                                          st.efer, st.dr[5])
        pg.xfem = vp.reg(_r("HV_X64_REGISTER_XFEM"))
        pg.interrupt_state = vp.reg(_r("HV_REGISTER_INTERRUPT_STATE"))
        pg.pending_interruption = vp.reg(_r("HV_REGISTER_PENDING_INTERRUPTION"))
        self.mem.write(gpa, pg.to_bytes())

    # ---------------------------------------------------------------- VP state blobs
    def _hc_get_vp_state(self, c):
        return self._vp_state(c, get=True)

    def _hc_set_vp_state(self, c):
        return self._vp_state(c, get=False)

    def _vp_state(self, c, get):
        i = c.inp
        p = self._child(i.partition_id)
        vp = self._vp(p, i.vp_index)
        t = i.state_data.type
        if t not in spec.enum("hv_get_set_vp_state_type").values():
            return S.HV_STATUS_INVALID_PARAMETER
        self._check_vtl(i.input_vtl)
        if t == S.HV_GET_SET_VP_STATE_LAPIC_STATE:
            self._need_lapic(p)
        sd = i.state_data
        if t == S.HV_GET_SET_VP_STATE_XSAVE:
            # the states must be ones the partition has, x87 and SSE included
            have = p.props.get(S.HV_PARTITION_PROPERTY_XSAVE_STATES, 0)
            if sd.xsave_states & ~have or sd.xsave_states & 3 != 3:
                return S.HV_STATUS_INVALID_PARAMETER
        elif sd.xsave_states or sd.xsave_flags:
            return S.HV_STATUS_INVALID_PARAMETER
        if t == S.HV_GET_SET_VP_STATE_SYNTHETIC_TIMERS:
            # the whole hv_synthetic_timers_state in the variable header (set),
            # nothing there (get): a partial blob is refused
            size = S.hv_synthetic_timers_state.SIZE
            if len(c.varhead) != (0 if get else -(-size // 8) * 8):
                return S.HV_STATUS_INVALID_PARAMETER
            if get:
                blob = vp.vp_state.get(t, bytes(size))
                c.out = S.hv_synthetic_timers_state.from_bytes(blob)
            else:
                vp.vp_state[t] = bytes(c.varhead[:size])
            return S.HV_STATUS_SUCCESS
        pfns = [int.from_bytes(c.varhead[k:k + 8], "little") for k in range(0, len(c.varhead), 8)]
        size = S.PAGE_SIZE
        if t == S.HV_GET_SET_VP_STATE_XSAVE:
            size = p.props.get(S.HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE, S.PAGE_SIZE)
        if len(pfns) != -(-size // S.PAGE_SIZE):
            return S.HV_STATUS_INVALID_PARAMETER       # one page per 4 KiB of state, no more
        # the root's own pages only: not the hypervisor's (reserved, deposited,
        # state pages) and not ones a child maps
        if any(not self.is_ram(x) or self.in_reserved(x) or x in self.deposited
               or x in self.provided_pages or self.mapped[x] for x in pfns):
            return S.HV_STATUS_INVALID_PARAMETER
        if get:
            blob = vp.vp_state.get(t)
            if blob is None:
                blob = self._default_vp_state(vp, t, len(pfns) * 4096)
            blob = blob.ljust(len(pfns) * 4096, b"\0")
            if t == S.HV_GET_SET_VP_STATE_LAPIC_STATE:
                blob = vp.apic.render(blob)               # the live registers
            for k, x in enumerate(pfns):
                self.mem.write(x << 12, blob[k * 4096:(k + 1) * 4096])
        else:
            vp.vp_state[t] = b"".join(self.mem.read(x << 12, 4096) for x in pfns)
            if t == S.HV_GET_SET_VP_STATE_LAPIC_STATE:
                vp.apic.load(vp.vp_state[t])
        return S.HV_STATUS_SUCCESS

    def _default_vp_state(self, vp, t, size):
        b = bytearray(size)
        if t == S.HV_GET_SET_VP_STATE_LAPIC_STATE:
            struct.pack_into("<I", b, 0x20, vp.index << 24)   # APIC ID
            struct.pack_into("<I", b, 0x30, 0x50014)           # version
        elif t == S.HV_GET_SET_VP_STATE_XSAVE:
            struct.pack_into("<H", b, 0, 0x37F)                # FCW
            struct.pack_into("<I", b, 24, 0x1F80)              # MXCSR
        return bytes(b)

    # ---------------------------------------------------------------- misc VP calls
    def _hc_translate_virtual_address(self, c):
        i = c.inp
        p = self._child(i.partition_id)
        vp = self._vp(p, i.vp_index)
        eng = self._engine(vp)
        eng._tcache = {}
        st = vp.cpu
        g = eng.translate(i.gva_page << 12, st.cr0, st.cr3, st.cr4, st.efer)
        # result codes (HV_TRANSLATE_GVA_*) are not in the spec: 0 success, 1 page not present
        if g is None:
            c.out = S.hv_output_translate_virtual_address(result_code=1)
        else:
            c.out = S.hv_output_translate_virtual_address(result_code=0, gpa_page=g >> 12)
        return S.HV_STATUS_SUCCESS

    def _hc_clear_virtual_interrupt(self, c):
        """Withdraw the partition's asserted ExtINT interrupts (the VMM's PIC
        dropped its output) that no VP has taken yet."""
        p = self._child(c.inp.partition_id)
        self._need_lapic(p)
        for vp in p.vps.values():
            vp.apic.extint = None
        return S.HV_STATUS_SUCCESS

    @staticmethod
    def _need_lapic(p):
        """Hyper-V emulates the local APIC only for partitions created with
        LAPIC_ENABLED; without it there is no APIC to take an interrupt or
        give its state. No status is documented: the model answers
        INVALID_PARTITION_STATE."""
        if not p.flags & S.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED:
            raise HvError(S.HV_STATUS_INVALID_PARTITION_STATE)

    # ---------------------------------------------------------------- interrupts
    # physical destinations that mean "all APICs" (xAPIC and x2APIC broadcast)
    APIC_BROADCAST = (0xFF, 0xFFFFFFFF)
    # HV_INTERRUPT_TYPE -> APIC delivery mode (x86 ICR encoding, apic.py);
    # SMI and REMOTEREAD are refused (no SMM; remote read is not an x2APIC mode)
    _ITYPE_MODE = {S.HV_X64_INTERRUPT_TYPE_FIXED: A.DM_FIXED, S.HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY: A.DM_LOWEST,
                   S.HV_X64_INTERRUPT_TYPE_NMI: A.DM_NMI, S.HV_X64_INTERRUPT_TYPE_INIT: A.DM_INIT,
                   S.HV_X64_INTERRUPT_TYPE_SIPI: A.DM_SIPI, S.HV_X64_INTERRUPT_TYPE_EXTINT: A.DM_EXTINT}

    def _apic_targets(self, p, dest):
        return [vp for vp in p.vps.values()
                if dest in self.APIC_BROADCAST or vp.reg(_r("HV_X64_REGISTER_INITIAL_APIC_ID")) == dest]

    def _hc_assert_virtual_interrupt(self, c):
        """An interrupt message to the APIC(s) named by dest_addr (physical
        mode); see docs/hvsim-model.md, "Interrupts"."""
        i = c.inp
        p = self._child(i.partition_id)
        self._need_lapic(p)
        itype = i.bits("control", "interrupt_type")
        level = i.bits("control", "level_triggered")
        if i.target_vtl != 0:
            return S.HV_STATUS_INVALID_PARAMETER          # VTLs are not modelled
        if itype not in spec.enum("hv_interrupt_type").values():
            return S.HV_STATUS_INVALID_PARAMETER
        if i.bits("control", "logical_dest_mode"):
            return S.HV_STATUS_INVALID_PARAMETER          # logical destinations: not modelled
        if itype in (S.HV_X64_INTERRUPT_TYPE_SMI, S.HV_X64_INTERRUPT_TYPE_REMOTEREAD):
            return S.HV_STATUS_INVALID_PARAMETER
        if i.vector > 0xFF:
            return S.HV_STATUS_INVALID_PARAMETER
        if itype in (S.HV_X64_INTERRUPT_TYPE_FIXED, S.HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY) \
                and i.vector < MIN_VECTOR:
            return S.HV_STATUS_INVALID_PARAMETER
        if i.dest_addr > 0xFFFFFFFF:
            return S.HV_STATUS_INVALID_PARAMETER          # an APIC id is 32 bits
        targets = self._apic_targets(p, i.dest_addr)      # none: dropped, like an APIC
        if itype == S.HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY and len(targets) > 1:
            targets = [min(targets, key=lambda v: (v.apic.ppr(), v.index))]
        for vp in targets:                                # message nobody accepts
            if itype in (S.HV_X64_INTERRUPT_TYPE_LOCALINT0, S.HV_X64_INTERRUPT_TYPE_LOCALINT1):
                self._lint(vp, itype == S.HV_X64_INTERRUPT_TYPE_LOCALINT1, i.vector, c.cpu)
            else:
                self._apic_message(vp, self._ITYPE_MODE[itype], i.vector, level, c.cpu)
        return S.HV_STATUS_SUCCESS

    def _lint(self, vp, lint1, vector, cpu):
        """A LINT pin of the VP's APIC is asserted: the LVT entry decides."""
        lvt = vp.apic.regs[A.APIC_LVT_LINT1 if lint1 else A.APIC_LVT_LINT0]
        if lvt & A.LVT_MASKED:
            self._log("  vp %x/%d LINT%d masked" % (vp.part.id, vp.index, int(lint1)))
            return
        mode = (lvt >> 8) & 7
        if mode == A.DM_FIXED:
            self._apic_message(vp, A.DM_FIXED, lvt & 0xFF, bool(lvt & A.LVT_LEVEL), cpu)
        elif mode in (A.DM_NMI, A.DM_EXTINT):
            self._apic_message(vp, mode, vector, False, cpu)

    def _apic_message(self, vp, mode, vector, level, cpu):
        """Lock held: an interrupt message accepted by `vp`'s APIC. Wakes the VP
        if it waits (root scheduler: VP_SIGNAL_PAIR on `cpu`'s SINT0)."""
        a = vp.apic
        was_blocked = a.blocked()
        if mode in (A.DM_FIXED, A.DM_LOWEST):
            if vector < MIN_VECTOR:
                self._log("  vp %x/%d illegal vector 0x%x dropped" % (vp.part.id, vp.index, vector))
                return
            a.accept(vector, level)
        elif mode == A.DM_NMI:
            a.nmi_pending = True
        elif mode == A.DM_EXTINT:
            a.extint = vector
        elif mode == A.DM_INIT:
            a.init_pending = True
            if not vp.running:
                self._apply_now(vp)
        elif mode == A.DM_SIPI:
            if not (a.wait_sipi or a.init_pending):
                self._log("  vp %x/%d SIPI ignored (not waiting for one)" % (vp.part.id, vp.index))
                return
            a.sipi_pending = vector
            if not vp.running:
                self._apply_now(vp)
        else:
            self._log("  vp %x/%d delivery mode %d dropped" % (vp.part.id, vp.index, mode))
            return
        self._log("  vp %x/%d apic: mode %d vector 0x%x%s" % (vp.part.id, vp.index, mode, vector,
                                                              " level" if level else ""))
        self._kick(vp)                        # a running VP re-checks what it can take
        if self.scheduler == "root":
            if was_blocked and not a.blocked():
                # the driver kicks its dispatch thread. Also while a DispatchVp is
                # still returning BLOCKED (vp.running): the kick must not be lost.
                self._signal_vp(vp, cpu)
        else:
            self._cond.notify_all()           # a waiting VP thread sleeps on _cond

    def _apply_now(self, vp):
        """INIT/SIPI for a VP that is not running: its registers change at once."""
        self._sync_reg_page_in(vp)
        self._apply_init_sipi(vp, vp.cpu)
        self._sync_reg_page_out(vp)

    def _apply_init_sipi(self, vp, st):
        """Lock held, the VP not in Unicorn: act on a pending INIT and SIPI."""
        a = vp.apic
        if a.init_pending:
            fresh = CpuState(vp.index)
            fresh.msrs, fresh.xmm = st.msrs, st.xmm      # INIT keeps MSRs and SSE state
            st.__dict__.update(fresh.__dict__)
            sipi = a.sipi_pending
            a.reset()
            a.wait_sipi = True
            a.sipi_pending = sipi
            self._log("  vp %x/%d INIT: waiting for SIPI" % (vp.part.id, vp.index))
        if a.wait_sipi and a.sipi_pending is not None:
            v = a.sipi_pending
            st.segs[1] = (v << 12, 0xFFFF, v << 8, 0x9B)
            st.rip = 0
            st.shadow_at = None
            a.wait_sipi = False
            a.sipi_pending = None
            self._log("  vp %x/%d SIPI 0x%x: starts at %04x:0000" % (vp.part.id, vp.index, v, v << 8))

    def _apic_eoi(self, vp):
        """Lock held: the guest wrote EOI. A level-triggered vector's EOI is sent
        to the root as HVMSG_X64_APIC_EOI (the VP keeps running)."""
        r = vp.apic.eoi()
        if r is None or not r[1]:
            return
        cpu = self._vp_cpu(vp)
        pl = S.hv_x64_apic_eoi_message(vp_index=vp.index, interrupt_vector=r[0])
        self.synic_pages(cpu)
        self.synic[cpu].queues[S.HV_SYNIC_INTERCEPTION_SINT_INDEX].append(
            self._message(S.HVMSG_X64_APIC_EOI, pl, vp.part.id))
        self._deliver(cpu, S.HV_SYNIC_INTERCEPTION_SINT_INDEX)
        self._log("  vp %x/%d EOI of level-triggered 0x%x -> cpu%d" % (vp.part.id, vp.index, r[0], cpu))

    def _send_ipi(self, vp, low, dest, x2apic):
        """Lock held: the guest wrote its ICR (low dword `low`, destination `dest`)."""
        vector, mode = low & 0xFF, (low >> 8) & 7
        level = bool(low & A.LVT_LEVEL)
        shorthand = (low >> 18) & 3
        p = vp.part
        if shorthand == 1:
            targets = [vp]
        elif shorthand in (2, 3):
            targets = [t for t in p.vps.values() if shorthand == 2 or t is not vp]
        elif low & (1 << 11):
            self._log("  vp %x/%d IPI with a logical destination dropped" % (p.id, vp.index))
            return
        else:
            bcast = 0xFFFFFFFF if x2apic else 0xFF
            targets = [t for t in p.vps.values()
                       if dest == bcast or t.reg(_r("HV_X64_REGISTER_INITIAL_APIC_ID")) == dest]
        if mode == A.DM_LOWEST and len(targets) > 1:
            targets = [min(targets, key=lambda v: (v.apic.ppr(), v.index))]
        for t in targets:
            self._apic_message(t, mode, vector, level, self._vp_cpu(vp))

    def _vp_cpu(self, vp):
        """The root CPU that gets a VP's events (doorbells to HV_ANY_VP, EOI
        messages): the CPU whose DispatchVp runs it (root scheduler), or the CPU
        that last released it (core scheduler)."""
        if vp is None:
            return 0
        cpu = vp.dispatch_cpu if self.scheduler == "root" else vp.notify_cpu
        if cpu is None:
            cpu = vp.dispatch_cpu if vp.dispatch_cpu is not None else vp.notify_cpu
        return cpu if cpu is not None and cpu < self.ncpus else 0

    def _apic_page(self, vp):
        """GPA of the VP's xAPIC page, or None when the APIC is not memory-mapped
        (partition created without LAPIC_ENABLED, APIC disabled, or x2APIC mode)."""
        if not vp.part.flags & S.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED:
            return None
        base = vp.reg(_r("HV_X64_REGISTER_APIC_BASE"))
        if not base & A.APIC_BASE_ENABLE or base & A.APIC_BASE_EXTD:
            return None
        return base & 0x000FFFFFFFFFF000

    def _apic_mmio(self, vp, st, off, size, write, value):
        """Lock held: an access to the xAPIC page. Returns the value read."""
        a = vp.apic
        if write:
            if size == 4 and not off & 0xF:
                self._apic_reg_write(vp, st, off, value, x2apic=False)
            return 0
        reg, byte = off & ~0xF, off & 0xF
        if reg >= A.APIC_PAGE_END or byte + size > 4:
            return 0
        return (a.read(reg) >> (8 * byte)) & ((1 << (8 * size)) - 1)

    def _apic_reg_write(self, vp, st, off, value, x2apic, icr_dest=None):
        a = vp.apic
        action = a.write(off, value)
        if off == A.APIC_TPR and st is not None:
            st.cr8 = a.tpr >> 4
        if action == "eoi":
            self._apic_eoi(vp)
        elif action == "icr":
            dest = icr_dest if icr_dest is not None else (a.regs[A.APIC_ICR_HIGH] >> 24)
            self._send_ipi(vp, a.regs[A.APIC_ICR_LOW], dest, x2apic)
        elif action == "self_ipi" and x2apic:
            self._apic_message(vp, A.DM_FIXED, value & 0xFF, False, self._vp_cpu(vp))

    def _apic_msr(self, vp, msr, write, value):
        """Lock held: x2APIC MSRs 0x800-0x83F and the synthetic EOI/ICR/TPR MSRs.
        Returns the value read (None for writes)."""
        off = {S.HV_X64_MSR_EOI: A.APIC_EOI, S.HV_X64_MSR_ICR: A.APIC_ICR_LOW,
               S.HV_X64_MSR_TPR: A.APIC_TPR}.get(msr)
        if off is None:
            off = (msr - A.X2APIC_MSR_BASE) << 4
        a = vp.apic
        if off == A.APIC_ICR_LOW:
            if not write:
                return (a.regs[A.APIC_ICR_HIGH] << 32) | a.regs[A.APIC_ICR_LOW]
            a.regs[A.APIC_ICR_HIGH] = (value >> 32) & 0xFFFFFFFF
            self._apic_reg_write(vp, None, off, value & 0xFFFFFFFF, x2apic=True, icr_dest=value >> 32)
            return None
        if not write:
            return a.read(off, x2apic=True)
        self._apic_reg_write(vp, None, off, value, x2apic=True)
        return None

    # The child VP's SynIC is the guest platform's (platform.py: SCONTROL,
    # SIMP, SIEFP and SINTx as the guest or its VMM wrote them).
    def _child_synic(self, vp, page):
        """(platform VP state, GPA of `page`'s base) for SignalEventDirect
        (page "siefp") or PostMessageDirect ("simp"), or raise
        INVALID_SYNIC_STATE while the SynIC or that page is off."""
        from .platform import _bits
        vs = self.platform.vps(vp)
        value = vs.siefp if page == "siefp" else vs.simp
        if not _bits(S.hv_synic_scontrol, "value", "enable", vs.scontrol) or \
                not _bits(S.hv_synic_page_msr, "value", "enable", value):
            raise HvError(S.HV_STATUS_INVALID_SYNIC_STATE)
        return vs, _bits(S.hv_synic_page_msr, "value", "base_gpfn", value) << 12

    def _raise_sint(self, vp, vs, sint, cpu):
        """A new event on SINT `sint`: its vector, unless masked or polled."""
        from .platform import _bits
        Sn = S.hv_synic_sint
        sv = vs.sint[sint]
        if _bits(Sn, "value", "masked", sv) or _bits(Sn, "value", "polling", sv):
            return
        self._apic_message(vp, A.DM_FIXED, _bits(Sn, "value", "vector", sv), False, cpu)
        self.platform._kick(vp)

    def _hc_signal_event_direct(self, c):
        """Set one event flag in the target VP's SIEF page and raise its SINT."""
        i = c.inp
        p = self._child(i.target_partition)
        vp = self._vp(p, i.target_vp)
        if i.target_vtl or i.target_sint >= SINT_COUNT or i.flag_number >= EVENT_FLAGS_PER_SINT:
            return S.HV_STATUS_INVALID_PARAMETER
        vs, base = self._child_synic(vp, "siefp")
        gpa = base + i.target_sint * (S.PAGE_SIZE // SINT_COUNT) + i.flag_number // 8
        old = self.platform.gpa_read(p, gpa, 1)
        if old is None:
            return S.HV_STATUS_INVALID_SYNIC_STATE       # the page is not guest RAM
        bit = 1 << (i.flag_number % 8)
        newly = not old[0] & bit
        if newly:
            self.platform.gpa_write(p, gpa, bytes([old[0] | bit]))
            self._raise_sint(vp, vs, i.target_sint, c.cpu)
        c.out = S.hv_output_signal_event_direct(newly_signaled=int(newly))
        return S.HV_STATUS_SUCCESS

    def _hc_post_message_direct(self, c):
        """Post a message to the target VP's SINT through the guest SynIC
        (platform.py delivers it into the SIMP slot and raises the SINT). The
        message must be a guest message type (non-zero, MSB clear) with at most
        a payload's worth of bytes; one already waiting for that SINT (slot
        full, or queued) makes it INSUFFICIENT_BUFFERS."""
        i = c.inp
        p = self._child(i.partition_id)
        vp = self._vp(p, i.vp_index)
        if i.vtl or i.sint_index >= SINT_COUNT:
            return S.HV_STATUS_INVALID_PARAMETER
        raw = bytes(i.message)[:S.hv_message.SIZE]
        hdr = S.hv_message_header.from_bytes(raw[:S.hv_message_header.SIZE])
        payload_max = S.hv_message.SIZE - S.hv_message_header.SIZE
        if hdr.message_type == S.HVMSG_NONE or hdr.message_type & 0x80000000 \
                or hdr.payload_size > payload_max:
            return S.HV_STATUS_INVALID_PARAMETER
        vs, base = self._child_synic(vp, "simp")
        slot = self.platform.gpa_read(p, base + i.sint_index * S.hv_message.SIZE, 4)
        if slot is None:
            return S.HV_STATUS_INVALID_SYNIC_STATE       # the page is not guest RAM
        if vs.queues[i.sint_index] or struct.unpack("<I", slot)[0] != S.HVMSG_NONE:
            return S.HV_STATUS_INSUFFICIENT_BUFFERS
        self.platform.post_locked(vp, i.sint_index, raw)
        return S.HV_STATUS_SUCCESS

    # ================================================================ ports and connections
    PORT_TYPES = frozenset(spec.enum("hv_port_type").values())

    def _ipc_owner(self, pid):
        """The partition that owns a port or connection: the root, or an
        initialized child (after finalize only withdraw/delete are accepted)."""
        p = self._part(pid)
        if p is not self.root and p.state != ST_INITIALIZED:
            raise HvError(S.HV_STATUS_INVALID_PARTITION_STATE)
        return p

    def _hc_create_port(self, c):
        i = c.inp
        p = self._ipc_owner(i.port_partition_id)
        if i.port_vtl or i.min_connection_vtl:
            return S.HV_STATUS_INVALID_PARAMETER          # VTLs are not modelled: only VTL 0
        if i.port_id & ~ID_MASK:
            return S.HV_STATUS_INVALID_PARAMETER          # HV_PORT_ID.Reserved
        if i.port_id == 0 or i.port_id in p.ports:
            return S.HV_STATUS_INVALID_PORT_ID
        conn_pid = i.connection_partition_id
        if conn_pid:
            cp = self._part(conn_pid)
            if cp.state == ST_FINALIZED:
                return S.HV_STATUS_INVALID_PARTITION_STATE
            conn_pid = cp.id
        info = i.port_info
        t = info.port_type
        if t not in self.PORT_TYPES:
            return S.HV_STATUS_INVALID_PARAMETER
        if t == S.HV_PORT_TYPE_DOORBELL and p is not self.root:
            return S.HV_STATUS_INVALID_PARAMETER          # doorbell ports: root partition only
        if t != S.HV_PORT_TYPE_MONITOR:
            if not S.HV_SYNIC_INTERCEPTION_SINT_INDEX < info.target_sint < SINT_COUNT:
                return S.HV_STATUS_INVALID_PARAMETER      # SINT 1..15 (SINT 0 is the hypervisor's)
            if info.target_vp != S.HV_ANY_VP:
                n = self.ncpus if p is self.root else None
                if (n is not None and info.target_vp >= n) or (n is None and info.target_vp not in p.vps):
                    return S.HV_STATUS_INVALID_VP_INDEX
            if t == S.HV_PORT_TYPE_EVENT:
                base = info.bits("event_flags", "base_flag_number")
                count = info.bits("event_flags", "flag_count")
                if count == 0 or base + count > EVENT_FLAGS_PER_SINT:
                    return S.HV_STATUS_INVALID_PARAMETER
            elif info.event_flags:
                return S.HV_STATUS_INVALID_PARAMETER      # RsvdZ of message/doorbell port info
        self._take(p, self.costs["create_port"], ("port", i.port_id))
        p.ports[i.port_id] = Port(p, i.port_id, info, conn_pid)
        return S.HV_STATUS_SUCCESS

    def _hc_connect_port(self, c):
        i = c.inp
        cp = self._ipc_owner(i.connection_partition_id)
        if i.connection_vtl:
            return S.HV_STATUS_INVALID_PARAMETER
        cid = i.connection_id
        if cid & ~ID_MASK:
            return S.HV_STATUS_INVALID_PARAMETER          # HV_CONNECTION_ID.Reserved
        if cid == 0 or cid in cp.connections:
            return S.HV_STATUS_INVALID_CONNECTION_ID
        pp = self._part(i.port_partition_id)
        if pp.state == ST_FINALIZED:
            return S.HV_STATUS_INVALID_PARTITION_STATE
        port = pp.ports.get(i.port_id)
        if port is None:
            return S.HV_STATUS_INVALID_PORT_ID
        if port.conn_pid and port.conn_pid != cp.id:
            return S.HV_STATUS_ACCESS_DENIED              # the port names another connection partition
        info = i.connection_info
        if info.port_type != port.type:
            return S.HV_STATUS_INVALID_PARAMETER
        if info.port_type == S.HV_PORT_TYPE_DOORBELL:
            f = info.doorbell_flags
            if f & ~(S.HV_DOORBELL_FLAG_TRIGGER_SIZE_MASK | S.HV_DOORBELL_FLAG_TRIGGER_ANY_VALUE):
                return S.HV_STATUS_INVALID_PARAMETER
            size_code = f & S.HV_DOORBELL_FLAG_TRIGGER_SIZE_MASK
            if size_code != S.HV_DOORBELL_FLAG_TRIGGER_SIZE_ANY and size_code not in DOORBELL_SIZES:
                return S.HV_STATUS_INVALID_PARAMETER
            n = DOORBELL_SIZES.get(size_code, 1)
            width = cp.props.get(S.HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH, 46) if cp is not self.root else 46
            if info.doorbell_gpa + n > (1 << width) or (info.doorbell_gpa & 0xFFF) + n > S.PAGE_SIZE:
                return S.HV_STATUS_INVALID_PARAMETER      # beyond the GPA space, or crossing a page
        elif info.doorbell_trigger_value or info.doorbell_flags or (
                info.doorbell_gpa and info.port_type != S.HV_PORT_TYPE_MONITOR):
            return S.HV_STATUS_INVALID_PARAMETER          # union members of other types are RsvdZ
        self._take(cp, self.costs["connect_port"], ("conn", cid))
        cp.connections[cid] = Connection(cp, cid, port, info)
        return S.HV_STATUS_SUCCESS

    def _drop_port(self, port):
        """The port is gone: its connections stay but are dead, and signals the
        hypervisor still held back for a full event ring are dropped."""
        port.alive = False
        if port.part is self.root:
            for s in self.synic.values():
                for kept in s.kept:
                    while port.id in kept:
                        kept.remove(port.id)

    def _hc_delete_port(self, c):
        p = self._ipc_owner(c.inp.port_partition_id)
        port = p.ports.pop(c.inp.port_id, None)
        if port is None:
            return S.HV_STATUS_INVALID_PORT_ID
        self._give_back(p, ("port", port.id))
        self._drop_port(port)
        return S.HV_STATUS_SUCCESS

    def _hc_disconnect_port(self, c):
        i = c.inp
        p = self._ipc_owner(i.connection_partition_id)
        conn = p.connections.get(i.connection_id)
        if conn is None:
            return S.HV_STATUS_INVALID_CONNECTION_ID
        if i.bits("flags", "is_doorbell") != int(conn.type == S.HV_PORT_TYPE_DOORBELL):
            return S.HV_STATUS_INVALID_PARAMETER
        del p.connections[conn.id]
        self._give_back(p, ("conn", conn.id))
        return S.HV_STATUS_SUCCESS

    def _hc_notify_port_ring_empty(self, c):
        """The root drained a ring it found marked full (on its own CPU):
        write the signals held back, in order, as far as they fit."""
        sint = c.inp.sint_index
        if sint >= SINT_COUNT:
            return S.HV_STATUS_INVALID_PARAMETER
        self.synic_pages(c.cpu)
        s = self.synic[c.cpu]
        wrote = False
        while s.kept[sint] and self._ring_slot_free(c.cpu, sint):
            self._ring_write(c.cpu, sint, s.kept[sint].pop(0))
            wrote = True
        if s.kept[sint]:
            self._ring_set(c.cpu, sint, RING_FULL, 1)
        if wrote:
            self._ring_notify(c.cpu, sint)
        return S.HV_STATUS_SUCCESS

    # ---------------------------------------------------------------- event rings
    def _ring_gpa(self, cpu, sint):
        return (self.synic[cpu].sirbp_pfn << 12) + sint * S.hv_synic_event_ring.SIZE

    def _ring_set(self, cpu, sint, off, value):
        self.mem.write(self._ring_gpa(cpu, sint) + off, bytes([value]))

    def _ring_slot_free(self, cpu, sint):
        head = self.synic[cpu].heads[sint]
        return self.mem.read_u32(self._ring_gpa(cpu, sint) + RING_DATA + 4 * head) == 0

    def _ring_write(self, cpu, sint, port_id):
        s = self.synic[cpu]
        head = s.heads[sint]
        self.mem.write_u32(self._ring_gpa(cpu, sint) + RING_DATA + 4 * head, port_id)
        s.heads[sint] = (head + 1) % RING_SLOTS

    def _ring_notify(self, cpu, sint):
        """Unless the root masked the ring's signal, post HVMSG_SYNIC_SINT_INTERCEPT
        (the root configures the doorbell SINT "as intercept") to SINT0. At most
        one such notification per SINT waits in the queue."""
        if self.mem.read(self._ring_gpa(cpu, sint) + RING_MASKED, 1)[0]:
            return
        pl = S.hv_notification_message_payload(sint_index=sint)
        msg = self._message(S.HVMSG_SYNIC_SINT_INTERCEPT, pl, 0)
        q = self.synic[cpu].queues[S.HV_SYNIC_INTERCEPTION_SINT_INDEX]
        if msg in q:
            return
        q.append(msg)
        self._deliver(cpu, S.HV_SYNIC_INTERCEPTION_SINT_INDEX)

    def _signal_port(self, port, vp):
        """Lock held: a doorbell rang `port` (a root port) from `vp`."""
        cpu = self._vp_cpu(vp) if port.target_vp == S.HV_ANY_VP else port.target_vp
        sint = port.target_sint
        self.synic_pages(cpu)
        s = self.synic[cpu]
        port.signals += 1
        if s.kept[sint] or not self._ring_slot_free(cpu, sint):
            # ring full: keep the signal (once per port) until NotifyPortRingEmpty
            if port.id not in s.kept[sint]:
                s.kept[sint].append(port.id)
            self._ring_set(cpu, sint, RING_FULL, 1)
            self._log("  port %d signalled: cpu%d sint%d ring full, kept" % (port.id, cpu, sint))
            return
        self._ring_write(cpu, sint, port.id)
        self._log("  port %d signalled: cpu%d sint%d" % (port.id, cpu, sint))
        self._ring_notify(cpu, sint)

    def _ring_restart(self, cpu):
        """The root (re)enables its event ring page (hvsim: HVSIM_OP_SYNIC_PAGES):
        the rings start again at slot 0; entries not yet consumed and signals
        held back are written again, in order, for ports that still exist."""
        s = self.synic[cpu]
        live = {pid for pid in self.root.ports}
        for sint in range(SINT_COUNT):
            base = self._ring_gpa(cpu, sint)
            pending = []
            for k in range(RING_SLOTS):
                slot = (s.heads[sint] + k) % RING_SLOTS
                v = self.mem.read_u32(base + RING_DATA + 4 * slot)
                if v:
                    pending.append(v)
            pending += s.kept[sint]
            self.mem.fill(base, S.hv_synic_event_ring.SIZE)
            s.heads[sint] = 0
            s.kept[sint] = []
            wrote = False
            for pid in pending:
                if pid not in live:
                    continue
                if not s.kept[sint] and self._ring_slot_free(cpu, sint):
                    self._ring_write(cpu, sint, pid)
                    wrote = True
                elif pid not in s.kept[sint]:
                    s.kept[sint].append(pid)
                    self._ring_set(cpu, sint, RING_FULL, 1)
            if wrote:
                self._ring_notify(cpu, sint)

    def _hc_map_stats_page(self, c):
        i = c.inp
        ident = i.identity
        if i.type in (S.HV_STATS_OBJECT_PARTITION, S.HV_STATS_OBJECT_VP):
            p = self._part(ident.object_id)
            if i.type == S.HV_STATS_OBJECT_VP:
                self._vp(p, ident.vp_index)
        elif i.type not in spec.enum("hv_stats_object_type").values():
            return S.HV_STATUS_INVALID_PARAMETER
        key = (i.type, ident.object_id if i.type >= S.HV_STATS_OBJECT_PARTITION else 0,
               ident.vp_index if i.type == S.HV_STATS_OBJECT_VP else 0, ident.stats_area_type)
        if key not in self.stats_pages:
            self.stats_pages[key] = self._alloc_overlay(("stats",) + key)
        c.out = S.hv_output_map_location(map_location=self.stats_pages[key])
        return S.HV_STATUS_SUCCESS

    def _hc_unmap_stats_page(self, c):
        i = c.inp
        ident = i.identity
        key = (i.type, ident.object_id if i.type >= S.HV_STATS_OBJECT_PARTITION else 0,
               ident.vp_index if i.type == S.HV_STATS_OBJECT_VP else 0, ident.stats_area_type)
        pfn = self.stats_pages.pop(key, None)
        if pfn is None:
            return S.HV_STATUS_INVALID_PARAMETER
        self._free_overlay(pfn)
        return S.HV_STATUS_SUCCESS

    # ================================================================ root SynIC
    def synic_pages(self, cpu, enable=False):
        """(SIMP GPA, SIEFP GPA, SIRBP GPA) of root CPU `cpu`: its message page,
        event flags page and event ring page, allocated (zeroed) once.
        enable=True is the root enabling them at SynIC init (hvsim:
        HVSIM_OP_SYNIC_PAGES): the event rings restart at slot 0, since a
        freshly loaded driver's tail is 0 (see docs/hvsim-model.md)."""
        with self._lock:
            s = self.synic.get(cpu)
            if s is None:
                s = self.synic[cpu] = RootSynic(self._alloc_overlay(("simp", cpu)),
                                                self._alloc_overlay(("siefp", cpu)),
                                                self._alloc_overlay(("sirbp", cpu)))
            elif enable:
                self._ring_restart(cpu)
            if enable and not s.enabled:
                # messages queued while the SynIC was off are delivered now
                s.enabled = True
                for sint in list(s.queues):
                    self._deliver(cpu, sint)
            return s.simp_pfn << 12, s.siefp_pfn << 12, s.sirbp_pfn << 12

    def synic_disable(self, cpu):
        """The root turned its SIMP or SINTs off: messages queue until the
        next enable. (No hvsim op reports this yet; tests call it directly.)"""
        with self._lock:
            self.synic_pages(cpu)
            self.synic[cpu].enabled = False

    def _slot(self, cpu, sint):
        self.synic_pages(cpu)
        return (self.synic[cpu].simp_pfn << 12) + sint * S.hv_message.SIZE

    def post_message(self, cpu, sint, msg_bytes):
        """Queue a message for root CPU `cpu` SINT `sint`; deliver if the slot is free."""
        with self._lock:
            self.synic_pages(cpu)
            q = self.synic[cpu].queues[sint]
            q.append(bytes(msg_bytes))
            self._deliver(cpu, sint)

    def _deliver(self, cpu, sint):
        s = self.synic[cpu]
        q = s.queues[sint]
        if not s.enabled:
            return                    # SIMP/SINT off: the message waits in the queue
        slot = self._slot(cpu, sint)
        flags_off = S.hv_message_header.OFFSETS["message_flags"]
        pend = S.hv_message_header.BITS["message_flags"]["msg_pending"][0]
        while q:
            if self.mem.read_u32(slot) != S.HVMSG_NONE:
                # occupied: ask for an EOM, then re-check (the root may have just freed it)
                fl = self.mem.read(slot + flags_off, 1)[0]
                self.mem.write(slot + flags_off, bytes([fl | (1 << pend)]))
                with threading.Lock():
                    pass                      # a full fence between the two accesses
                if self.mem.read_u32(slot) != S.HVMSG_NONE:
                    return
            msg = bytearray(q.popleft())
            if q:
                msg[flags_off] |= 1 << pend
            self.mem.write(slot + 4, bytes(msg[4:]))
            self.mem.write(slot, bytes(msg[:4]))       # the type goes last
            self._post_notify(cpu)
            vp = self._dispatching.get(cpu)
            if vp is not None and vp.root_irq_ok:
                self._root_irq(vp)      # the CPU has an interrupt: its DispatchVp returns
            return

    def _root_irq(self, vp):
        """The CPU dispatching `vp` has an interrupt to take: the dispatch ends
        at the VP's next instruction boundary (READY + preempt_event)."""
        vp.root_irq = True
        self._kick(vp)

    def root_interrupt(self, cpu):
        """Root scheduler: root CPU `cpu` took an interrupt (hvsim: the seam's
        HVSIM_OP_ROOT_IRQ). If its DispatchVp runs a VP and the CPU takes
        interrupts during it, the dispatch returns. Returns whether it does."""
        with self._lock:
            vp = self._dispatching.get(cpu)
            if vp is None or not vp.root_irq_ok:
                return False
            self._root_irq(vp)
            return True

    def eom(self, cpu):
        """The root wrote EOM on `cpu`: deliver the next queued message(s)."""
        with self._lock:
            if cpu in self.synic:
                for sint in list(self.synic[cpu].queues):
                    self._deliver(cpu, sint)
        self._flush_notify()

    def _message(self, mtype, payload, sender):
        m = S.hv_message()
        m.header.message_type = mtype
        pb = payload.to_bytes() if hasattr(payload, "to_bytes") else bytes(payload)
        m.header.payload_size = len(pb)
        m.header.sender = sender
        raw = bytearray(m.to_bytes())
        raw[16:16 + len(pb)] = pb
        return bytes(raw)

    KICK_FORMS = ("pair", "bitset", "overflow")

    def _signal_vp(self, vp, cpu):
        """Root scheduler: kick the VP's dispatch thread with a scheduler
        message on SINT0, in the form `kick_form` names (random if None)."""
        vp.signal_count += 1
        form = self.kick_form or self.kick_rng.choice(self.KICK_FORMS)
        if form not in self.KICK_FORMS:
            raise ValueError(f"unknown kick form {form!r}")
        self.synic_pages(cpu)
        q = self.synic[cpu].queues[S.HV_SYNIC_INTERCEPTION_SINT_INDEX]
        B = S.hv_vp_signal_bitset_scheduler_message
        if form == "pair":
            pl = S.hv_vp_signal_pair_scheduler_message(vp_count=1)
            pl.partition_ids[0] = vp.part.id
            pl.vp_indexes[0] = vp.index
            msg = self._message(S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR, pl, 0)
        else:
            # a BITSET still queued for this partition takes the VP too
            for k, queued in enumerate(q):
                hdr = S.hv_message_header.from_bytes(queued[:S.hv_message_header.SIZE])
                if hdr.message_type != S.HVMSG_SCHEDULER_VP_SIGNAL_BITSET:
                    continue
                pl = B.from_bytes(queued[16:16 + B.SIZE])
                if pl.partition_id == vp.part.id:
                    self._bitset_add(pl, vp.index, form)
                    q[k] = self._message(S.HVMSG_SCHEDULER_VP_SIGNAL_BITSET, pl, 0)
                    self.kicks[form + "_merged"] += 1
                    self._deliver(cpu, S.HV_SYNIC_INTERCEPTION_SINT_INDEX)
                    return
            pl = B(partition_id=vp.part.id, vpset_format=S.HV_GENERIC_SET_SPARSE_4K)
            self._bitset_add(pl, vp.index, form)
            msg = self._message(S.HVMSG_SCHEDULER_VP_SIGNAL_BITSET, pl, 0)
        self.kicks[form] += 1
        q.append(msg)
        self._deliver(cpu, S.HV_SYNIC_INTERCEPTION_SINT_INDEX)

    @staticmethod
    def _bitset_add(pl, index, form):
        """Add VP `index` to a sparse 4K VP set; in the overflow form it is
        counted in overflow_count instead of being named."""
        if form == "overflow":
            pl.overflow_count += 1
            return
        bank = index // 64
        banks = [b for b in range(64) if pl.valid_bank_mask >> b & 1]
        if bank not in banks:
            if len(banks) == len(pl.bank_contents):
                pl.overflow_count += 1          # no room for another bank
                return
            pos = sum(1 for b in banks if b < bank)
            vals = [pl.bank_contents[i] for i in range(len(banks))]
            vals.insert(pos, 0)
            for i, v in enumerate(vals):
                pl.bank_contents[i] = v
            pl.valid_bank_mask |= 1 << bank
            banks = sorted(banks + [bank])
        pos = banks.index(bank)
        if not pl.bank_contents[pos] >> (index % 64) & 1:
            pl.bank_contents[pos] |= 1 << (index % 64)
            pl.vp_count += 1

    # ================================================================ running VPs
    @staticmethod
    def _kick(vp):
        """Make a running VP's engine re-check its stop and interrupt state
        soon (any thread; a no-op for a VP without an engine)."""
        eng = vp.engine
        if eng is not None:
            eng.kick()

    def _engine(self, vp):
        if vp.engine is None:
            from .cpu import Engine
            vp.engine = Engine(self, vp.part, vp)
        return vp.engine

    def _decide(self, vp):
        p = vp.part

        def decide(kind, **kw):
            if kind == "doorbell":
                with self._lock:
                    hit = self._doorbell(vp, kw["gpa"], kw["size"], kw["value"])
                if hit:
                    self._flush_notify()
                return ("consume" if hit else "exit"), None
            if kind == "cpuid":
                res = self.cpuid_value(vp, kw["eax"], kw["ecx"])
                if (S.HV_INTERCEPT_TYPE_X64_CPUID, kw["eax"]) in p.intercepts or \
                        any(k[0] == S.HV_INTERCEPT_TYPE_X64_GLOBAL_CPUID for k in p.intercepts):
                    return "exit", res
                return "emulate", res
            if kind == "msr":
                msr = kw["msr"]
                acc = S.HV_INTERCEPT_ACCESS_MASK_WRITE if kw["write"] else S.HV_INTERCEPT_ACCESS_MASK_READ
                for key in ((S.HV_INTERCEPT_TYPE_X64_MSR_INDEX, msr), (S.HV_INTERCEPT_TYPE_X64_MSR, 0)):
                    if p.intercepts.get(key, 0) & acc:
                        return "exit", None
                if msr in (S.HV_X64_MSR_EOI, S.HV_X64_MSR_ICR, S.HV_X64_MSR_TPR):
                    if not self.platform.has(p, S.HV_PARTITION_PRIVILEGE_ACCESS_INTR_CTRL_REGS):
                        return platform_mod.GP          # not advertised: #GP in the guest
                    with self._lock:        # the synthetic aliases of the APIC's EOI, ICR and TPR
                        res = self._apic_msr(vp, msr, kw["write"], kw["value"])
                    self._flush_notify()
                    return "emulate", res
                if self.platform.handles_msr(msr):
                    with self._lock:        # synthetic MSRs and IA32_TSC_DEADLINE (platform.py)
                        res = self.platform.msr_locked(vp, msr, kw["write"], kw["value"])
                    self._flush_notify()
                    return res                      # ("emulate", value) or the #GP verdict
                if A.X2APIC_MSR_BASE <= msr <= A.X2APIC_MSR_LAST:
                    with self._lock:
                        res = self._apic_msr(vp, msr, kw["write"], kw["value"])
                    self._flush_notify()
                    return "emulate", res
                return "native", None
            if kind == "vmcall":
                with self._lock:            # guest hypercalls (platform.py)
                    res = self.platform.vmcall(vp, kw["gpr"], kw["cpl"], kw["long64"], kw.get("cr0"))
                self._flush_notify()
                return res
            return "emulate", None
        return decide

    def _exec_state(self, st):
        H = S.hv_x64_intercept_message_header
        cpl = (st.segs[2][3] >> 5) & 3 if st.cr0 & 1 else 0
        return (spec.set_bits(H, "execution_state", "cpl", cpl)
                | spec.set_bits(H, "execution_state", "cr0_pe", st.cr0 & 1)
                | spec.set_bits(H, "execution_state", "cr0_am", (st.cr0 >> 18) & 1)
                | spec.set_bits(H, "execution_state", "efer_lma", (st.efer >> 10) & 1))

    def _build_intercept(self, vp, ex):
        """Turn an engine Exit into (message bytes) for the intercept page."""
        st = vp.cpu
        H = S.hv_x64_intercept_message_header
        hdr = H(vp_index=vp.index, execution_state=self._exec_state(st), rip=st.rip, rflags=st.rflags)
        b, l, s, a = st.segs[1]
        hdr.cs_segment.base, hdr.cs_segment.limit, hdr.cs_segment.selector, hdr.cs_segment.attributes = b, l, s, a

        def seg(dst, k):
            dst.base, dst.limit, dst.selector, dst.attributes = st.segs[k]

        def insn_bytes(dst_arr):
            eng = vp.engine
            eng._tcache = {}
            eng._pg = (st.cr0, st.cr3, st.cr4, st.efer)
            raw = eng.read_linear(st.segs[1][0] + st.rip, 16, stop_at_page_end=True)
            for k, x in enumerate(raw[:16]):
                dst_arr[k] = x
            return min(len(raw), 16)

        pid = vp.part.id
        if ex.kind == "io":
            hdr.instruction_length_cr8 = spec.set_bits(H, "instruction_length_cr8", "instruction_length", ex.length)
            hdr.intercept_access_type = S.HV_INTERCEPT_ACCESS_WRITE if ex.write else S.HV_INTERCEPT_ACCESS_READ
            M = S.hv_x64_io_port_intercept_message
            m = M(header=hdr, port_number=ex.port, rax=st.gpr[0], rcx=st.gpr[1], rsi=st.gpr[6], rdi=st.gpr[7])
            m.access_info = (spec.set_bits(M, "access_info", "access_size", ex.size)
                             | spec.set_bits(M, "access_info", "string_op", int(ex.string))
                             | spec.set_bits(M, "access_info", "rep_prefix", int(ex.rep)))
            m.instruction_byte_count = insn_bytes(m.instruction_bytes)
            seg(m.ds_segment, 3)
            seg(m.es_segment, 0)
            return self._message(S.HVMSG_X64_IO_PORT_INTERCEPT, m, pid)
        if ex.kind == "halt":
            hdr.instruction_length_cr8 = spec.set_bits(H, "instruction_length_cr8", "instruction_length", ex.length)
            return self._message(S.HVMSG_X64_HALT, S.hv_x64_halt_message(header=hdr), pid)
        if ex.kind == "memory":
            hdr.intercept_access_type = ex.access   # HV_INTERCEPT_ACCESS_READ/WRITE/EXECUTE
            M = S.hv_x64_memory_intercept_message
            ent = vp.part.gpa.get(ex.gpa >> 12)
            m = M(header=hdr, guest_physical_address=ex.gpa)
            m.cache_type = 0 if (ent and ent[1] & S.HV_MAP_GPA_NOT_CACHED) else 6
            if not st.cr0 & (1 << 31):
                m.guest_virtual_address = ex.gpa
                m.memory_access_info = spec.set_bits(M, "memory_access_info", "gva_valid", 1)
            m.instruction_byte_count = insn_bytes(m.instruction_bytes)
            mtype = S.HVMSG_UNMAPPED_GPA if (ex.unmapped or ent is None) else S.HVMSG_GPA_INTERCEPT
            return self._message(mtype, m, pid)
        if ex.kind == "cpuid":
            hdr.instruction_length_cr8 = spec.set_bits(H, "instruction_length_cr8", "instruction_length", ex.length)
            a, b2, c2, d = ex.default
            m = S.hv_x64_cpuid_intercept_message(header=hdr, rax=st.gpr[0], rcx=st.gpr[1], rdx=st.gpr[2],
                                                 rbx=st.gpr[3], default_result_rax=a, default_result_rbx=b2,
                                                 default_result_rcx=c2, default_result_rdx=d)
            return self._message(S.HVMSG_X64_CPUID_INTERCEPT, m, pid)
        if ex.kind == "msr":
            hdr.instruction_length_cr8 = spec.set_bits(H, "instruction_length_cr8", "instruction_length", ex.length)
            hdr.intercept_access_type = S.HV_INTERCEPT_ACCESS_WRITE if ex.write else S.HV_INTERCEPT_ACCESS_READ
            m = S.hv_x64_msr_intercept_message(header=hdr, msr_number=ex.msr, rdx=st.gpr[2], rax=st.gpr[0])
            return self._message(S.HVMSG_X64_MSR_INTERCEPT, m, pid)
        if ex.kind == "exception" and (S.HV_INTERCEPT_TYPE_EXCEPTION, ex.vector) in vp.part.intercepts:
            M = S.hv_x64_exception_intercept_message
            m = M(header=hdr, exception_vector=ex.vector)
            if ex.error_code is not None:
                m.exception_info = spec.set_bits(M, "exception_info", "error_code_valid", 1)
                m.error_code = ex.error_code
            m.instruction_byte_count = insn_bytes(m.instruction_bytes)
            seg(m.ds_segment, 3)
            seg(m.ss_segment, 2)
            for k, n in enumerate(GPR_NAMES):
                setattr(m, n.lower(), st.gpr[k])
            return self._message(S.HVMSG_X64_EXCEPTION_INTERCEPT, m, pid)
        return self._message(S.HVMSG_UNRECOVERABLE_EXCEPTION, S.hv_x64_unrecoverable_exception_message(header=hdr), pid)

    def _irq_entry(self, vp, st):
        """Lock held, before (re-)entering the guest: act on INIT/SIPI and deliver
        the highest-priority event the VP can take (NMI, then ExtINT, then the
        highest IRR vector above PPR). Returns an Exit that ends the slice
        ("blocked" for a halted or INIT-ed VP with nothing to take,
        "unrecoverable" when delivery fails) or None to run."""
        from .cpu import Exit
        a = vp.apic
        if a.init_pending or (a.wait_sipi and a.sipi_pending is not None):
            self._apply_init_sipi(vp, st)
        if a.wait_sipi:
            return Exit("blocked")
        shadow = st.shadow_at == (st.segs[1][0] + st.rip) & U64
        v = kind = None
        queued = vp.engine is not None and vp.engine.event_queued()
        if queued:
            a.halted = False            # an event taken earlier goes in first
        elif not shadow:
            if a.nmi_pending and not a.nmi_blocked:
                v, kind = NMI_VECTOR, "NMI"
                a.nmi_pending = False
                a.nmi_blocked = True          # until the next IRET
            elif st.rflags & RF_IF:
                if a.extint is not None:
                    v, kind = a.extint, "ExtINT"
                    a.extint = None
                else:
                    v = a.deliverable_vector()
                    if v is not None:
                        kind = "interrupt"
                        a.take(v)
        if v is not None:
            a.halted = False
            # the CPU delivers it through the IVT/IDT at the next entry; a
            # fault while delivering escalates as on hardware (a triple fault
            # ends the run as an unrecoverable exception)
            self._engine(vp).inject("nmi" if kind == "NMI" else "interrupt", v)
            st.shadow_at = None
            a.delivered.append(v)
            self._log("  vp %x/%d %s 0x%x delivered" % (vp.part.id, vp.index, kind, v))
            return None
        if a.halted:
            return Exit("blocked")
        return None

    def _doorbell(self, vp, gpa, size, value):
        """Lock held: the guest writes `size` bytes of `value` at `gpa`, which is
        not mapped in Unicorn. True when the write rings doorbells (the
        hypervisor takes it: no intercept)."""
        p = vp.part
        if (gpa >> 12) in p.gpa or not p.connections:
            return False
        hits = [cn for cn in p.connections.values() if cn.matches(gpa, size, value)]
        for cn in hits:
            cn.triggers += 1
            self._log("  vp %x/%d doorbell gpa 0x%x size %d value 0x%x: connection %d" % (
                p.id, vp.index, gpa, size, value, cn.id))
            if cn.port.alive:
                self._signal_port(cn.port, vp)
        return bool(hits)

    def _mmio(self, vp, st, ex):
        """Lock held: the guest did a MOV load/store to an unmapped GPA. The
        hypervisor completes it itself when it is the xAPIC page; returns False
        for an ordinary HVMSG_UNMAPPED_GPA intercept."""
        p = vp.part
        if (ex.gpa >> 12) in p.gpa:
            return False
        apic = self._apic_page(vp)
        if apic is None or not apic <= ex.gpa < apic + S.PAGE_SIZE:
            return False
        size = ex.size
        value = ex.value & ((1 << (8 * size)) - 1) if ex.write else 0
        got = self._apic_mmio(vp, st, ex.gpa - apic, size, ex.write, value)
        if not ex.write:
            _set_gpr(st, ex.mov, got)
        st.rip = (st.rip + ex.length) & eng_ipmask(st)
        st.shadow_at = None
        return True

    def _run_slice(self, vp, deadline=None):
        """Run the VP (model lock NOT held). Returns the engine Exit.

        Interrupts are delivered here between engine runs: before entering the
        guest, when the engine stops on a deliverable interrupt, and when the
        guest executes HLT with IF=1 (HLT completes, RIP moves past it; with
        nothing pending the VP is halted and the slice ends with "blocked").
        Accesses the hypervisor completes itself (xAPIC page, doorbells) are
        handled here too. In the root scheduler a root interrupt for the
        dispatching CPU (a message written to its SIM page, the seam's flag
        polled through vp.root_irq_poll, hv.root_interrupt) ends the slice
        with "preempt", so the root can take it; so does `deadline` (the
        dispatch's time slice; default: the core scheduler's slice)."""
        from .cpu import Exit
        eng = self._engine(vp)
        if deadline is None:
            deadline = time.monotonic() + self.time_slice
        budget = self.max_insns if self.max_insns is not None else 1 << 62
        # the engine gets a finite deadline (its kicker thread waits for it);
        # a longer slice is run in chunks. The engine looks at stop() only at
        # exits and kicks: a root-interrupt flag that nobody kicks for (the
        # hvsim seam's, polled) is seen at the end of a chunk at the latest.
        chunk = self.root_irq_poll_period if vp.root_irq_poll is not None else 60.0
        irq = vp.apic.pending_kind

        def root_irq():
            if vp.root_irq:
                return True
            poll = vp.root_irq_poll
            if poll is not None and poll():
                vp.root_irq = True
                return True
            return False

        def stop():
            return vp.stop_req or root_irq()
        while True:
            with self._lock:
                self._sync_reg_page_in(vp)
                st = vp.cpu.copy()
                if vp.stop_req:
                    return Exit("stopped")
                if root_irq():
                    return Exit("preempt")
                ex = self._irq_entry(vp, st)
                st.cr8 = vp.apic.tpr >> 4
                vp.cpu = st
                if ex is not None:
                    return ex
            ex = eng.run(st, budget, min(deadline, time.monotonic() + chunk), stop,
                         self._decide(vp), irq)
            budget -= eng.count
            handled = False
            with self._lock:
                vp.cpu = st
                if ex.kind == "stopped" and not vp.stop_req:
                    ex = Exit("preempt")
                elif ex.kind == "preempt" and time.monotonic() < deadline:
                    handled = True          # the end of a chunk, not of the slice
                if ex.kind == "interrupt":
                    handled = True
                elif ex.kind == "halt" and st.rflags & RF_IF:
                    st.rip = (st.rip + ex.length) & eng_ipmask(st)
                    st.shadow_at = None
                    vp.apic.halted = True
                    handled = True
                elif ex.kind == "memory" and getattr(ex, "mov", None) and self._mmio(vp, st, ex):
                    handled = True
                if not handled:
                    return ex
            if self._notify_q:
                self._flush_notify()

    def _record_intercept(self, vp, ex):
        """Lock held: the VP stopped on an intercept."""
        msg = self._build_intercept(vp, ex)
        vp.last_msg = msg
        vp.other[_r("HV_REGISTER_INTERCEPT_SUSPEND")] = 1
        ent = vp.state_pages.get(S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
        if ent:
            self.mem.write(ent[0] << 12, msg)
        self._sync_reg_page_out(vp)
        vp.part.stats["intercepts"] += 1
        self._log("  vp %x/%d intercept %s rip=0x%x" % (vp.part.id, vp.index,
                        spec.MESSAGE_NAMES.get(struct.unpack_from("<I", msg)[0]), vp.cpu.rip))
        return msg

    # ---------------------------------------------------------------- root scheduler
    def _hc_dispatch_vp(self, c):
        if self.scheduler != "root":
            return S.HV_STATUS_ACCESS_DENIED
        i = c.inp
        p = self._child(i.partition_id)
        vp = self._vp(p, i.vp_index)
        allowed = spec.enum_mask("hv_dispatch_vp_flag")
        if i.flags & ~allowed:
            return S.HV_STATUS_INVALID_PARAMETER
        if i.spec_ctrl and not i.flags & S.HV_DISPATCH_VP_FLAG_SET_CALLER_SPEC_CTRL:
            return S.HV_STATUS_INVALID_PARAMETER     # a value for a flag not given
        if vp.running:
            return S.HV_STATUS_INVALID_VP_STATE
        O = S.hv_output_dispatch_vp
        if i.flags & S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND:
            vp.other[_r("HV_REGISTER_INTERCEPT_SUSPEND")] = 0
        if vp.reg(_r("HV_REGISTER_EXPLICIT_SUSPEND")) or vp.reg(_r("HV_REGISTER_DISPATCH_SUSPEND")):
            c.out = O(dispatch_state=S.HV_VP_DISPATCH_STATE_BLOCKED, dispatch_event=S.HV_VP_DISPATCH_EVENT_SUSPEND)
            return S.HV_STATUS_SUCCESS
        if vp.reg(_r("HV_REGISTER_INTERCEPT_SUSPEND")):
            c.out = O(dispatch_state=S.HV_VP_DISPATCH_STATE_READY, dispatch_event=S.HV_VP_DISPATCH_EVENT_INTERCEPT)
            return S.HV_STATUS_SUCCESS
        if i.flags & S.HV_DISPATCH_VP_FLAG_SCAN_INTERRUPT_INJECTION:
            gpa = self._reg_page(vp)
            if gpa is not None:
                off = gpa + S.hv_x64_register_page.OFFSETS["interrupt_vectors"]
                iv = S.hv_vp_register_page_interrupt_vectors.from_bytes(self.mem.read(off, 8))
                for k in range(min(iv.vector_count, 7)):
                    if iv.vector[k] >= MIN_VECTOR:
                        vp.apic.accept(iv.vector[k], False)     # edge, like a FIXED assert
                self.mem.write(off, bytes(8))
        # The root takes its interrupts during the dispatch if it called with
        # them enabled, or asked for them with ENABLE_CALLER_INTERRUPTS; then
        # each one ends the dispatch. Otherwise the VP keeps the CPU until it
        # exits or the time slice ends: Hyper-V accepts that, the driver
        # promises never to do it (docs/design.md, "Run loop").
        root_irq_ok = bool(getattr(c, "caller_irqs", True)
                           or i.flags & S.HV_DISPATCH_VP_FLAG_ENABLE_CALLER_INTERRUPTS)
        if not root_irq_ok:
            self.contract_violations.append(
                "DispatchVp of vp %x/%d on cpu %d with the root's interrupts disabled"
                % (p.id, vp.index, c.cpu))
        ts = i.time_slice                           # 100 ns units; 0: no limit
        vp.running = True
        vp.stop_req = False
        vp.root_irq = False
        vp.root_irq_ok = root_irq_ok
        vp.root_irq_poll = getattr(c, "root_irq_poll", None) if root_irq_ok else None
        vp.dispatch_cpu = c.cpu
        self._dispatching[c.cpu] = vp

        def cont():
            deadline = time.monotonic() + ts * 1e-7 if ts else math.inf
            if self.dispatch_quantum is not None:
                deadline = min(deadline, time.monotonic() + self.dispatch_quantum)
            try:
                ex = self._run_slice(vp, deadline)
            finally:
                with self._lock:
                    vp.running = False
                    if self._dispatching.get(c.cpu) is vp:
                        del self._dispatching[c.cpu]
                    vp.root_irq = False
                    vp.root_irq_ok = False
                    vp.root_irq_poll = None
                    self._cond.notify_all()
            with self._lock:
                if vp.deleted:
                    return S.HV_STATUS_INVALID_VP_INDEX
                if ex.kind == "preempt":
                    self._sync_reg_page_out(vp)
                    c.out = O(dispatch_state=S.HV_VP_DISPATCH_STATE_READY, dispatch_event=self.preempt_event)
                elif ex.kind == "stopped":
                    self._sync_reg_page_out(vp)
                    c.out = O(dispatch_state=S.HV_VP_DISPATCH_STATE_BLOCKED,
                              dispatch_event=S.HV_VP_DISPATCH_EVENT_SUSPEND)
                elif ex.kind == "blocked":
                    # halted with IF=1: the VP waits for an interrupt; _apic_message
                    # posts VP_SIGNAL_PAIR when one arrives
                    self._sync_reg_page_out(vp)
                    c.out = O(dispatch_state=S.HV_VP_DISPATCH_STATE_BLOCKED, dispatch_event=self.halt_event)
                else:
                    self._record_intercept(vp, ex)
                    c.out = O(dispatch_state=S.HV_VP_DISPATCH_STATE_READY,
                              dispatch_event=S.HV_VP_DISPATCH_EVENT_INTERCEPT)
                return S.HV_STATUS_SUCCESS
        return cont

    # ---------------------------------------------------------------- core scheduler
    def _runnable(self, vp):
        return (not vp.deleted and vp.part.state == ST_INITIALIZED
                and not vp.reg(_r("HV_REGISTER_EXPLICIT_SUSPEND"))
                and not vp.reg(_r("HV_REGISTER_INTERCEPT_SUSPEND"))
                and not vp.reg(_r("HV_REGISTER_DISPATCH_SUSPEND")))

    def _maybe_start(self, vp):
        if self.scheduler != "core" or vp.running or not self._runnable(vp) or self._closed:
            return
        vp.running = True
        vp.stop_req = False
        vp.thread = threading.Thread(target=self._vp_thread, args=(vp,), daemon=True,
                                     name="hvsim-vp-%x-%d" % (vp.part.id, vp.index))
        vp.thread.start()

    def _vp_thread(self, vp):
        try:
            while True:
                with self._lock:
                    if vp.stop_req or not self._runnable(vp) or self._closed:
                        return
                ex = self._run_slice(vp)
                with self._lock:
                    if ex.kind == "preempt":
                        continue
                    if ex.kind == "stopped":
                        self._sync_reg_page_out(vp)
                        return
                    if ex.kind == "blocked":
                        # halted with IF=1: sleep until an interrupt or a stop request
                        self._sync_reg_page_out(vp)
                        while (vp.apic.blocked() and not vp.stop_req
                               and self._runnable(vp) and not self._closed):
                            self._cond.wait()
                        continue
                    self._record_intercept(vp, ex)
                    cpu = vp.notify_cpu if vp.notify_cpu is not None else vp.index % self.ncpus
                    pl = S.hv_opaque_intercept_message(vp_index=vp.index)
                    msg = self._message(S.HVMSG_OPAQUE_INTERCEPT, pl, vp.part.id)
                    self.synic_pages(cpu)
                    self.synic[cpu].queues[S.HV_SYNIC_INTERCEPTION_SINT_INDEX].append(msg)
                    self._deliver(cpu, S.HV_SYNIC_INTERCEPTION_SINT_INDEX)
                    return
        finally:
            with self._lock:
                vp.running = False
                self._cond.notify_all()
            self._flush_notify()

    def _wait_stopped(self, vp, timeout=30):
        end = time.monotonic() + timeout
        self._cond.notify_all()          # a halted core-scheduler VP thread sleeps on _cond
        while vp.running:
            left = end - time.monotonic()
            if left <= 0:
                raise HvError(S.HV_STATUS_TIME_OUT)
            self._cond.wait(left)

    def _stop_vp(self, vp):
        if vp.running:
            vp.stop_req = True
            self._kick(vp)
            self._wait_stopped(vp)

    def wait_idle(self, timeout=10):
        """Test helper: wait until no VP is running."""
        end = time.monotonic() + timeout
        with self._lock:
            while any(vp.running for p in self.partitions.values() for vp in p.vps.values()):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self):
        self.platform.close()
        with self._lock:
            self._closed = True
            for p in self.partitions.values():
                for vp in p.vps.values():
                    if vp.running:
                        vp.stop_req = True
                        self._kick(vp)
            try:
                for p in self.partitions.values():
                    for vp in p.vps.values():
                        self._wait_stopped(vp, 5)
            except HvError:
                pass


class _Call:
    """One hypercall being processed: decoded control word, input, output."""

    def __init__(self, hv, cpu, control, code, fast_api, in_gpa, out_gpa, fast_bytes):
        self.hv = hv
        self.cpu = cpu
        self.control = control
        self.code = code
        self.fast_api = fast_api
        self.in_gpa = in_gpa
        self.out_gpa = out_gpa
        self.fast_bytes = fast_bytes
        self.info = S.HYPERCALLS.get(code)
        self.inp = None
        self.out = None
        self.varhead = b""
        self.done = 0
        self._rep_out = {}
        self.rep_count = spec.control_field(control, "rep_count")
        self.rep_start = spec.control_field(control, "rep_start")
        self.limit = 1 << 12

    def describe(self):
        if not self.info:
            return "code_0x%x" % self.code
        s = self.info["name"]
        if self.inp is not None:
            f0 = self.inp._fields_[0][0]
            v = getattr(self.inp, f0)
            if isinstance(v, int):
                s += "(%s=0x%x)" % (f0, v)
        if self.info["form"] == "rep":
            s += "[%d:%d]" % (self.rep_start, self.rep_count)
        return s

    def validate(self):
        info = self.info
        if info is None:
            return S.HV_STATUS_INVALID_HYPERCALL_CODE
        c = self.control
        if c & S.CONTROL_MBZ:
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT
        fast = spec.control_field(c, "fast")
        if fast != int(self.fast_api):
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT
        if info["form"] == "simple":
            if self.rep_count or self.rep_start:
                return S.HV_STATUS_INVALID_HYPERCALL_INPUT
        else:
            if self.rep_count == 0 or self.rep_start >= self.rep_count:
                return S.HV_STATUS_INVALID_HYPERCALL_INPUT
        vh = spec.control_field(c, "varhead_size")
        if vh and not info["varhead"]:
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT
        if fast and not info["fast"]:
            return S.HV_STATUS_INVALID_HYPERCALL_INPUT
        in_cls = info["input"]
        in_size = (in_cls.SIZE if in_cls else 0) + vh * 8 + self.rep_count * spec.elem_size(info["rep_input"])
        if fast:
            if in_size > 16:
                return S.HV_STATUS_INVALID_HYPERCALL_INPUT
            raw = self.fast_bytes
        else:
            raw = b""
            if in_size:
                g = self.in_gpa
                if g % 8:
                    return S.HV_STATUS_INVALID_ALIGNMENT
                if (g & 0xFFF) + in_size > 4096 or not self.hv.mem.contains(g, in_size):
                    return S.HV_STATUS_INVALID_ALIGNMENT
                raw = self.hv.mem.read(g, in_size)
            out_size = 0
            if info["output"] is not None:
                out_size = info["output"].SIZE
            if info["rep_output"]:
                out_size = self.rep_count * spec.elem_size(info["rep_output"])
            if out_size:
                g = self.out_gpa
                if g % 8:
                    return S.HV_STATUS_INVALID_ALIGNMENT
                if (g & 0xFFF) + out_size > 4096 or not self.hv.mem.contains(g, out_size):
                    return S.HV_STATUS_INVALID_ALIGNMENT
        self.raw = raw
        if in_cls is not None:
            self.inp = in_cls.from_bytes(raw)
            if self.inp.mbz_violations():
                return S.HV_STATUS_INVALID_PARAMETER
        off = in_cls.SIZE if in_cls else 0
        self.varhead = raw[off:off + vh * 8]
        self.rep_base = off + vh * 8
        lim = self.hv.rep_limit.get(self.code, self.hv.rep_limit.get(None))
        if lim:
            self.limit = lim
        self.done = self.rep_start
        return None

    def reps(self):
        end = min(self.rep_count, self.rep_start + self.limit)
        for i in range(self.rep_start, end):
            self.done = i
            yield i
            self.done = i + 1

    def rep_in(self, i):
        t = self.info["rep_input"]
        n = spec.elem_size(t)
        b = self.raw[self.rep_base + i * n:self.rep_base + (i + 1) * n]
        cls = spec.elem_struct(t)
        if cls is None:
            return int.from_bytes(b, "little")
        return cls.from_bytes(b)

    def rep_out(self, i, value):
        self._rep_out[i] = value

    def _write_reps(self):
        t = self.info["rep_output"]
        if not t:
            return
        n = spec.elem_size(t)
        for i, v in sorted(self._rep_out.items()):
            b = v.to_bytes() if hasattr(v, "to_bytes") and not isinstance(v, int) else int(v).to_bytes(n, "little")
            self.hv.mem.write(self.out_gpa + i * n, b)

    def commit(self):
        if self.out is not None and not self.fast_api:
            self.hv.mem.write(self.out_gpa, self.out.to_bytes())
        if self.info and self.info["form"] == "rep":
            self._write_reps()

    def commit_partial(self):
        self._write_reps()
