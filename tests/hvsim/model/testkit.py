"""Helpers for the model's unit tests: an in-memory root partition that issues
hypercalls the way the driver does, building every input with the bindings."""

import struct

from .spec import S, make_control, result_status, result_reps
from .memory import AnonRam
from .hv import Hypervisor, ROOT_ID, seg_pack, table_pack

MB = 1 << 20
RAM_SIZE = 64 * MB
HV_BASE = 48 * MB          # reserved range [48 MiB, 64 MiB)
HV_SIZE = 16 * MB
IN_GPA = 0x10000           # per-"CPU" hypercall input/output pages
OUT_GPA = 0x11000
POOL_BASE = 0x100          # root RAM pages 1 MiB.. handed out for deposits
GUEST_BASE = 0x1000        # root RAM pages 16 MiB..48 MiB used as guest memory
U64 = (1 << 64) - 1


class Root:
    """A fake root partition driving the model."""

    def __init__(self, scheduler="root", notify=None, ncpus=2, ram_mb=None, kick_form="pair"):
        """ram_mb: root RAM size (default 64 MiB: guest memory 16..48 MiB);
        with a larger size the hypervisor's 16 MiB sit at the top and guest
        memory runs from 16 MiB up to them."""
        size = RAM_SIZE if ram_mb is None else ram_mb * MB
        self.ram = AnonRam(size)
        self.notified = []
        self.hv = Hypervisor(self.ram, size - HV_SIZE, HV_SIZE, scheduler=scheduler,
                             notify=notify or self.notified.append, ncpus=ncpus)
        # unit tests read scheduler kicks as VP_SIGNAL_PAIR unless they ask
        # for another form (test_model_strict.py covers BITSET and overflow)
        self.hv.kick_form = kick_form
        for cpu in range(ncpus):       # the driver enables every CPU's SynIC at load
            self.hv.synic_pages(cpu, enable=True)
        self._next_pool = POOL_BASE
        self._next_guest = GUEST_BASE

    def close(self):
        self.hv.shutdown()

    # -------------------------------------------------------------- raw calls
    def call(self, code, inp=b"", elems=b"", reps=0, start=0, cpu=0, varhead=0, in_gpa=IN_GPA,
             out_gpa=OUT_GPA, control=None):
        data = bytes(inp) + bytes(elems)
        if data:
            self.ram.write(in_gpa, data)
        ctl = control if control is not None else make_control(code, reps, start, varhead=varhead)
        r = self.hv.hypercall(cpu, ctl, in_gpa, out_gpa)
        return result_status(r), result_reps(r)

    def st(self, *a, **kw):
        return self.call(*a, **kw)[0]

    def fast(self, code, in0=0, in1=0, cpu=0):
        return result_status(self.hv.hypercall_fast(cpu, make_control(code, fast=True), in0, in1))

    def out(self, cls, off=0):
        return cls.from_bytes(self.ram.read(OUT_GPA + off, cls.SIZE))

    def out_u64s(self, n):
        return list(struct.unpack("<%dQ" % n, self.ram.read(OUT_GPA, 8 * n)))

    # -------------------------------------------------------------- pages
    def pool_pages(self, n):
        p = list(range(self._next_pool, self._next_pool + n))
        self._next_pool += n
        return p

    def guest_pages(self, n, align=1):
        start = -(-self._next_guest // align) * align
        self._next_guest = start + n
        return list(range(start, start + n))

    NEEDS_MEMORY = (S.HV_STATUS_INSUFFICIENT_MEMORY, S.HV_STATUS_INSUFFICIENT_ROOT_MEMORY,
                    S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY,
                    S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY)

    def contiguous_pages(self, n=S.HV_MAX_CONTIGUOUS_ALLOCATION_PAGES):
        """n consecutive pool pages, naturally aligned (an order-3 allocation)."""
        self._next_pool = -(-self._next_pool // n) * n
        return self.pool_pages(n)

    def deposit_for(self, status, pid, pages=1):
        """The driver's answer to a needs-memory status: `pages` pages into
        `pid` (INSUFFICIENT_MEMORY), into the root (the ROOT variants), one
        contiguous chunk for the CONTIGUOUS variants (as upstream Linux)."""
        if status in (S.HV_STATUS_INSUFFICIENT_ROOT_MEMORY, S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY):
            pid = ROOT_ID
        if status in (S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY,
                      S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY):
            pfns = self.contiguous_pages()
        else:
            pfns = self.pool_pages(pages)
        assert self.deposit(pid, pfns)[0] == S.HV_STATUS_SUCCESS

    def with_deposits(self, pid, build, tries=16):
        """Issue build() (returning a status) until it stops asking for memory."""
        for _ in range(tries):
            st = build()
            if st not in self.NEEDS_MEMORY:
                return st
            self.deposit_for(st, pid)
        return st

    def deposit(self, pid, pfns, start=0):
        return self.call(S.HVCALL_DEPOSIT_MEMORY, S.hv_input_deposit_memory(partition_id=pid),
                         struct.pack("<%dQ" % len(pfns), *pfns), reps=len(pfns), start=start)

    def withdraw(self, pid, n, start=0):
        return self.call(S.HVCALL_WITHDRAW_MEMORY, S.hv_input_withdraw_memory(partition_id=pid),
                         reps=n, start=start)

    # -------------------------------------------------------------- lifecycle
    def create_partition(self, flags=S.HV_PARTITION_CREATION_FLAG_GPA_SUPER_PAGES_ENABLED
                         | S.HV_PARTITION_CREATION_FLAG_EXO_PARTITION
                         | S.HV_PARTITION_CREATION_FLAG_INTERCEPT_MESSAGE_PAGE_ENABLED
                         | S.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED):
        """Like the driver: retry with one root page per INSUFFICIENT_MEMORY."""
        inp = S.hv_input_create_partition(flags=flags, compatibility_version=S.HV_COMPATIBILITY_21_H2)
        for _ in range(64):
            st = self.st(S.HVCALL_CREATE_PARTITION, inp)
            if st != S.HV_STATUS_INSUFFICIENT_MEMORY:
                break
            assert self.deposit(ROOT_ID, self.pool_pages(1))[0] == S.HV_STATUS_SUCCESS
        assert st == S.HV_STATUS_SUCCESS, st
        return self.out(S.hv_output_partition_id).partition_id

    def initialize(self, pid):
        assert self.deposit(pid, self.pool_pages(208))[0] == S.HV_STATUS_SUCCESS
        return self.fast(S.HVCALL_INITIALIZE_PARTITION, pid)

    def create_vp(self, pid, index=0):
        assert self.deposit(pid, self.pool_pages(90))[0] == S.HV_STATUS_SUCCESS
        return self.with_deposits(pid, lambda: self.st(S.HVCALL_CREATE_VP,
                                                      S.hv_input_create_vp(partition_id=pid, vp_index=index)))

    def new_guest(self, vps=1, **kw):
        pid = self.create_partition(**kw)
        assert self.initialize(pid) == S.HV_STATUS_SUCCESS
        for i in range(vps):
            assert self.create_vp(pid, i) == S.HV_STATUS_SUCCESS
        return pid

    def map(self, pid, gfn, pfns, flags=None, large=False):
        if flags is None:
            flags = S.HV_MAP_GPA_READABLE | S.HV_MAP_GPA_WRITABLE | S.HV_MAP_GPA_EXECUTABLE
        if large:
            flags |= S.HV_MAP_GPA_LARGE_PAGE
        start = 0
        while True:
            st, done = self.call(S.HVCALL_MAP_GPA_PAGES,
                                 S.hv_input_map_gpa_pages(target_partition_id=pid, target_gpa_base=gfn,
                                                          map_flags=flags),
                                 struct.pack("<%dQ" % len(pfns), *pfns), reps=len(pfns), start=start)
            if st == S.HV_STATUS_INSUFFICIENT_MEMORY:
                self.deposit(pid, self.pool_pages(256))
                start = done
                continue
            return st, done

    def map_ram(self, pid, gfn, n, flags=None):
        """Map n fresh root pages at gfn; returns their root PFNs."""
        pfns = self.guest_pages(n)
        st, _ = self.map(pid, gfn, pfns, flags)
        assert st == S.HV_STATUS_SUCCESS, st
        return pfns

    def unmap(self, pid, gfn, n, large=False):
        return self.call(S.HVCALL_UNMAP_GPA_PAGES,
                         S.hv_input_unmap_gpa_pages(target_partition_id=pid, target_gpa_base=gfn,
                                                    unmap_flags=S.HV_UNMAP_GPA_LARGE_PAGE if large else 0),
                         reps=n)

    # -------------------------------------------------------------- registers
    def set_regs(self, pid, vp, pairs, cpu=0):
        el = b"".join(S.hv_register_assoc(name=n, value=S.hv_register_value(low=v & U64, high=v >> 64)).to_bytes()
                      for n, v in pairs)
        for _ in range(16):
            st, done = self.call(S.HVCALL_SET_VP_REGISTERS,
                                 S.hv_input_set_vp_registers(partition_id=pid, vp_index=vp),
                                 el, reps=len(pairs), cpu=cpu)
            if st not in self.NEEDS_MEMORY:
                return st, done
            self.deposit_for(st, pid)
        return st, done

    def get_regs(self, pid, vp, names):
        st, _ = self.call(S.HVCALL_GET_VP_REGISTERS, S.hv_input_get_vp_registers(partition_id=pid, vp_index=vp),
                          struct.pack("<%dI" % len(names), *names), reps=len(names))
        assert st == S.HV_STATUS_SUCCESS, st
        out = []
        for i in range(len(names)):
            v = self.out(S.hv_register_value, 16 * i)
            out.append(v.low | (v.high << 64))
        return out

    def map_state_page(self, pid, vp, type_):
        st = self.with_deposits(pid, lambda: self.st(
            S.HVCALL_MAP_VP_STATE_PAGE, S.hv_input_map_vp_state_page(partition_id=pid, vp_index=vp, type=type_)))
        assert st == S.HV_STATUS_SUCCESS, st
        return self.out(S.hv_output_map_location).map_location << 12

    def dispatch(self, pid, vp, flags=0):
        st = self.st(S.HVCALL_DISPATCH_VP, S.hv_input_dispatch_vp(partition_id=pid, vp_index=vp, flags=flags))
        assert st == S.HV_STATUS_SUCCESS, st
        o = self.out(S.hv_output_dispatch_vp)
        return o.dispatch_state, o.dispatch_event

    def message(self, gpa):
        m = S.hv_message.from_bytes(self.ram.read(gpa, 256))
        return m.header.message_type, self.ram.read(gpa + 16, 240)

    # -------------------------------------------------------------- ports (like the driver)
    def _retry(self, pid, build):
        """Issue build() until it stops asking for memory: one page into `pid`
        per INSUFFICIENT_MEMORY (the spec's deposit policy for ports)."""
        return self.with_deposits(pid, build, tries=8)

    def create_port(self, port_id, conn_pid, port_pid=ROOT_ID, ptype=S.HV_PORT_TYPE_DOORBELL,
                    sint=S.HV_SYNIC_DOORBELL_SINT_INDEX, vp=S.HV_ANY_VP, retry=True, event_flags=0, **kw):
        inp = S.hv_input_create_port(port_partition_id=port_pid, port_id=port_id,
                                     connection_partition_id=conn_pid, **kw)
        inp.port_info.event_flags = event_flags
        inp.port_info.port_type = ptype
        inp.port_info.target_sint = sint
        inp.port_info.target_vp = vp
        call = lambda: self.st(S.HVCALL_CREATE_PORT, inp)      # noqa: E731
        return self._retry(port_pid, call) if retry else call()

    def connect_port(self, conn_id, conn_pid, port_id, gpa=0, value=0, flags=0, port_pid=ROOT_ID,
                     ptype=S.HV_PORT_TYPE_DOORBELL, retry=True, **kw):
        inp = S.hv_input_connect_port(connection_partition_id=conn_pid, connection_id=conn_id,
                                      port_partition_id=port_pid, port_id=port_id, **kw)
        ci = inp.connection_info
        ci.port_type, ci.doorbell_gpa, ci.doorbell_trigger_value, ci.doorbell_flags = ptype, gpa, value, flags
        call = lambda: self.st(S.HVCALL_CONNECT_PORT, inp)     # noqa: E731
        return self._retry(conn_pid, call) if retry else call()

    def delete_port(self, port_id, port_pid=ROOT_ID):
        inp = S.hv_input_delete_port(port_partition_id=port_pid, port_id=port_id)
        return self.fast(S.HVCALL_DELETE_PORT, *struct.unpack("<QQ", inp.to_bytes()))

    def disconnect_port(self, conn_id, conn_pid, doorbell=True):
        inp = S.hv_input_disconnect_port(connection_partition_id=conn_pid, connection_id=conn_id,
                                         flags=int(doorbell))
        return self.fast(S.HVCALL_DISCONNECT_PORT, *struct.unpack("<QQ", inp.to_bytes()))

    def doorbell(self, pid, port_id, gpa, value=0, flags=0, conn_id=None):
        """The driver's ioeventfd registration: a root doorbell port + a connection."""
        assert self.create_port(port_id, pid) == S.HV_STATUS_SUCCESS
        st = self.connect_port(port_id if conn_id is None else conn_id, pid, port_id, gpa, value, flags)
        assert st == S.HV_STATUS_SUCCESS, st

    # -------------------------------------------------------------- root SynIC (like Linux)
    def sint0(self, cpu):
        return self.hv.synic_pages(cpu)[0] + S.hv_message.SIZE * S.HV_SYNIC_INTERCEPTION_SINT_INDEX

    def take_message(self, cpu):
        """The root's ISR: read the SINT0 slot, free it, EOM if msg_pending.
        Returns (type, payload bytes, sender) or None when the slot is empty."""
        gpa = self.sint0(cpu)
        m = S.hv_message.from_bytes(self.ram.read(gpa, S.hv_message.SIZE))
        if m.header.message_type == S.HVMSG_NONE:
            return None
        out = (m.header.message_type, self.ram.read(gpa + 16, 240), m.header.sender)
        self.ram.write_u32(gpa, S.HVMSG_NONE)
        if m.header.bits("message_flags", "msg_pending"):
            self.hv.eom(cpu)
        return out

    def ring(self, cpu, sint=S.HV_SYNIC_DOORBELL_SINT_INDEX):
        gpa = self.hv.synic_pages(cpu)[2] + sint * S.hv_synic_event_ring.SIZE
        return gpa, S.hv_synic_event_ring.from_bytes(self.ram.read(gpa, S.hv_synic_event_ring.SIZE))

    def ring_get(self, cpu, sint=S.HV_SYNIC_DOORBELL_SINT_INDEX):
        """Linux's synic_event_ring_get_queued_port(): the next port id or 0."""
        tails = self.__dict__.setdefault("tails", {})
        tail = tails.get((cpu, sint), 0)
        gpa, _ = self.ring(cpu, sint)
        off = S.hv_synic_event_ring.OFFSETS
        slot = gpa + off["data"] + 4 * tail
        port = self.ram.read_u32(slot)
        if not port:
            if self.ram.read(gpa + off["ring_full"], 1)[0]:
                self.ram.write(gpa + off["ring_full"], b"\0")
                st = self.fast(S.HVCALL_NOTIFY_PORT_RING_EMPTY, sint, cpu=cpu)
                assert st == S.HV_STATUS_SUCCESS, st
                port = self.ram.read_u32(slot)
            if not port:
                self.ram.write(gpa + off["signal_masked"], b"\0")
                port = self.ram.read_u32(slot)
                if not port:
                    return 0
            self.ram.write(gpa + off["signal_masked"], b"\1")
        self.ram.write_u32(slot, 0)
        tails[(cpu, sint)] = (tail + 1) % len(S.hv_synic_event_ring().data)
        return port

    def drain_ring(self, cpu, sint=S.HV_SYNIC_DOORBELL_SINT_INDEX):
        out = []
        while True:
            p = self.ring_get(cpu, sint)
            if not p:
                return out
            out.append(p)

    # -------------------------------------------------------------- guests
    def real_mode_guest(self, pid, code, at=0x1000, vp=0, regs=(), pages=16):
        """Map `pages` pages at GPA 0, put code at `at`, CS=0 base 0, RIP=at."""
        pfns = self.map_ram(pid, 0, pages)
        self.gwrite(pid, at, code)
        r = [(S.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFF, 0, 0x9B))), (S.HV_X64_REGISTER_RIP, at)]
        r += list(regs)
        assert self.set_regs(pid, vp, r)[0] == S.HV_STATUS_SUCCESS
        return pfns

    def long_mode_guest(self, pid, code, handlers=(), vp=0, idt_limit=0xFF * 16 + 15, rsp=0x9000,
                        pd_extra=()):
        """64-bit mode on mapped GPA [0, 2 MiB): one 2 MiB identity page
        (plus the page-directory entries `pd_extra` after it), GDT at 0x500
        (0x08 code, 0x10 data), page tables at 0x10000, `code` at 0x3000,
        interrupt gates for `handlers` [(vector, bytes)] at 0x4000 + 0x100*k
        (IDT at 0x700). Returns the VP's intercept-message page."""
        gdt = struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
        self.gwrite(pid, 0x500, gdt)
        self.gwrite(pid, 0x10000, struct.pack("<Q", 0x11000 | 3))
        self.gwrite(pid, 0x11000, struct.pack("<Q", 0x12000 | 3))
        self.gwrite(pid, 0x12000, b"".join(struct.pack("<Q", e) for e in (0x83,) + tuple(pd_extra)))
        for k, (vec, body) in enumerate(handlers):
            off = 0x4000 + 0x100 * k
            gate = struct.pack("<HHBBHII", off & 0xFFFF, 0x08, 0, 0x8E, (off >> 16) & 0xFFFF, off >> 32, 0)
            self.gwrite(pid, 0x700 + vec * 16, gate)
            self.gwrite(pid, off, body)
        self.gwrite(pid, 0x3000, code)
        data = seg_pack((0, 0xFFFFFFFF, 0x10, 0xC093))
        R = S
        regs = [(R.HV_X64_REGISTER_CR3, 0x10000), (R.HV_X64_REGISTER_CR4, 0x20),
                (R.HV_X64_REGISTER_EFER, 0x500), (R.HV_X64_REGISTER_CR0, 0x80000011),
                (R.HV_X64_REGISTER_GDTR, table_pack((0x500, 23))),
                (R.HV_X64_REGISTER_IDTR, table_pack((0x700, idt_limit))),
                (R.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFFFFFF, 0x08, 0xA09B))),
                (R.HV_X64_REGISTER_DS, data), (R.HV_X64_REGISTER_SS, data), (R.HV_X64_REGISTER_ES, data),
                (R.HV_X64_REGISTER_RIP, 0x3000), (R.HV_X64_REGISTER_RSP, rsp),
                (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)]
        assert self.set_regs(pid, vp, regs)[0] == S.HV_STATUS_SUCCESS
        return self.map_state_page(pid, vp, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)

    def gwrite(self, pid, gpa, data):
        """Write guest memory through the root's view (the page the GFN maps)."""
        part = self.hv.partitions[pid]
        data = bytes(data)
        while data:
            pfn = part.gpa[gpa >> 12][0]
            k = min(len(data), 4096 - (gpa & 0xFFF))
            self.ram.write((pfn << 12) + (gpa & 0xFFF), data[:k])
            data, gpa = data[k:], gpa + k

    def gread(self, pid, gpa, n):
        part = self.hv.partitions[pid]
        pfn = part.gpa[gpa >> 12][0]
        return self.ram.read((pfn << 12) + (gpa & 0xFFF), n)


__all__ = ["Root", "S", "seg_pack", "table_pack", "ROOT_ID", "HV_BASE", "HV_SIZE", "IN_GPA", "OUT_GPA",
           "make_control", "result_status", "result_reps"]
