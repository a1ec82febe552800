"""hvsim model: ports and connections (Create/Connect/Delete/DisconnectPort,
NotifyPortRingEmpty), doorbells rung by guest writes, and the root's event
rings (ring_full, signal_masked, wraparound), read the way Linux reads them."""

import os
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import Root, S, ROOT_ID, seg_pack, table_pack  # noqa: E402
from model.hv import COSTS  # noqa: E402
from model_fixtures import root, core  # noqa: E402,F401 (pytest fixtures)

R = S
DB = 0x9000                       # doorbell GPA: unmapped (the guest gets pages 0-0x7FFF)
ANY = S.HV_DOORBELL_FLAG_TRIGGER_ANY_VALUE
BYTE, WORD, DWORD, QWORD = (S.HV_DOORBELL_FLAG_TRIGGER_SIZE_BYTE, S.HV_DOORBELL_FLAG_TRIGGER_SIZE_WORD,
                            S.HV_DOORBELL_FLAG_TRIGGER_SIZE_DWORD, S.HV_DOORBELL_FLAG_TRIGGER_SIZE_QWORD)
SIZE_ANY = S.HV_DOORBELL_FLAG_TRIGGER_SIZE_ANY
OUT80 = bytes.fromhex("b07ee680")                       # mov al, 0x7e; out 0x80, al
READY_INTERCEPT = (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_INTERCEPT)
PREEMPTED = (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_SUSPEND)
DOORBELL_SINT = S.HV_SYNIC_DOORBELL_SINT_INDEX


# 16-bit stores to DB (real mode, DS = 0)
def mov8(v):
    return bytes([0xC6, 0x06]) + struct.pack("<HB", DB, v)


def mov16(v):
    return bytes([0xC7, 0x06]) + struct.pack("<HH", DB, v)


def mov32(v):
    return bytes([0x66, 0xC7, 0x06]) + struct.pack("<HI", DB, v)


def guest(root, code, vp=0):
    """Real-mode guest: `code` at 0x1000 then OUT 0x80; pages 0-0x7FFF mapped."""
    root.real_mode_guest(root_pid(root), code + OUT80, vp=vp, pages=8)
    return root.map_state_page(root_pid(root), vp, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)


def root_pid(root):
    return max(p for p in root.hv.partitions if p != ROOT_ID)


def release(root, pid, vp=0, cpu=0):
    assert root.set_regs(pid, vp, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 0)], cpu=cpu)[0] == S.HV_STATUS_SUCCESS
    while root.take_message(cpu):                       # the kick (VP_SIGNAL_PAIR)
        pass


def run_to_out(root, pid, msgpage):
    """Dispatch until the OUT 0x80 intercept; returns the dispatch results seen."""
    seen = []
    for _ in range(10):
        r = root.dispatch(pid, 0)
        seen.append(r)
        if r == READY_INTERCEPT:
            mtype, _ = root.message(msgpage)
            return seen, mtype
    raise AssertionError(seen)


def msg_types(root, cpu):
    out = []
    while True:
        m = root.take_message(cpu)
        if m is None:
            return out
        out.append(m)


def held(root, pid, key):
    return key in root.hv.partitions[pid].held


# ================================================================ ports and connections
def test_port_and_connection_pool_charges(root):
    pid = root.new_guest()
    hv = root.hv
    root_free = len(hv.root.free)
    assert root.create_port(5, pid) == S.HV_STATUS_SUCCESS     # deposits 1 root page first
    assert held(root, ROOT_ID, ("port", 5))
    assert len(hv.root.free) == root_free                      # the deposited page is the port's
    child_free = len(hv.partitions[pid].free)
    assert root.connect_port(5, pid, 5, DB, flags=ANY) == S.HV_STATUS_SUCCESS
    assert len(hv.partitions[pid].free) == child_free - 1 and held(root, pid, ("conn", 5))
    st = hv.stats()
    assert (st["ports"], st["connections"], st["ports_child"], st["connections_child"]) == (1, 1, 1, 1)
    assert root.disconnect_port(5, pid) == S.HV_STATUS_SUCCESS
    assert len(hv.partitions[pid].free) == child_free and not held(root, pid, ("conn", 5))
    assert root.delete_port(5) == S.HV_STATUS_SUCCESS
    assert not held(root, ROOT_ID, ("port", 5)) and len(hv.root.free) == root_free + 1
    st = hv.stats()
    assert (st["ports"], st["connections"]) == (0, 0)


def test_insufficient_memory_then_retry(root):
    pid = root.new_guest()
    assert root.create_port(5, pid, retry=False) == S.HV_STATUS_INSUFFICIENT_MEMORY   # empty root pool
    assert root.deposit(ROOT_ID, root.pool_pages(1))[0] == S.HV_STATUS_SUCCESS
    assert root.create_port(5, pid, retry=False) == S.HV_STATUS_SUCCESS
    # drain the child's pool: ConnectPort needs one page from it
    free = len(root.hv.partitions[pid].free)
    st, done = root.withdraw(pid, free)
    assert (st, done) == (S.HV_STATUS_SUCCESS, free)
    assert root.connect_port(5, pid, 5, DB, flags=ANY, retry=False) == S.HV_STATUS_INSUFFICIENT_MEMORY
    assert root.hv.stats()["connections"] == 0
    assert root.connect_port(5, pid, 5, DB, flags=ANY) == S.HV_STATUS_SUCCESS            # 1 page deposited
    assert root.hv.partitions[pid].free == []


def test_create_port_checks(root):
    pid = root.new_guest()
    assert root.deposit(ROOT_ID, root.pool_pages(4))[0] == S.HV_STATUS_SUCCESS
    P = S.HV_STATUS_INVALID_PARAMETER
    c = root.create_port
    assert c(0, pid) == S.HV_STATUS_INVALID_PORT_ID
    assert c(1 << 24, pid) == P                                          # HV_PORT_ID.Reserved
    assert c(1, pid + 1) == S.HV_STATUS_INVALID_PARTITION_ID            # no such connection partition
    assert c(1, pid, port_pid=pid + 1) == S.HV_STATUS_INVALID_PARTITION_ID
    assert c(1, pid, port_pid=pid) == P                                  # doorbell ports: root only
    assert c(1, pid, sint=0) == P and c(1, pid, sint=16) == P
    assert c(1, pid, vp=2) == S.HV_STATUS_INVALID_VP_INDEX               # the root has 2 CPUs
    assert c(1, pid, ptype=9) == P
    assert c(1, pid, port_vtl=1) == P and c(1, pid, min_connection_vtl=1) == P
    assert c(1, pid, rsvd0=1) == P                                       # MBZ
    inp = S.hv_input_create_port(port_partition_id=ROOT_ID, port_id=1, connection_partition_id=pid)
    inp.port_info.port_type, inp.port_info.target_sint = S.HV_PORT_TYPE_DOORBELL, DOORBELL_SINT
    inp.port_info.target_vp = S.HV_ANY_VP
    inp.port_info.event_flags = 1                                        # doorbell RsvdZ
    assert root.st(S.HVCALL_CREATE_PORT, inp) == P
    inp.port_info.event_flags = 1 << 40                                  # event_flags.rsvd (MBZ)
    assert root.st(S.HVCALL_CREATE_PORT, inp) == P
    assert root.hv.stats()["ports"] == 0 and \
        root.hv.root.held_count() == 2 + COSTS["create_vp_root"]         # only the partition and its VP
    assert c(1, pid, vp=1) == S.HV_STATUS_SUCCESS
    assert c(1, pid) == S.HV_STATUS_INVALID_PORT_ID                      # duplicate
    assert c(2, 0) == S.HV_STATUS_SUCCESS                                # no connection partition
    assert c(3, (1 << 64) - 1) == S.HV_STATUS_SUCCESS           # ~0 (self): the root itself
    # a message port in the child, targeting its VP 0 (charged to the child)
    assert c(4, ROOT_ID, port_pid=pid, ptype=S.HV_PORT_TYPE_MESSAGE, sint=2, vp=0) == S.HV_STATUS_SUCCESS
    assert held(root, pid, ("port", 4))
    assert c(5, ROOT_ID, port_pid=pid, ptype=S.HV_PORT_TYPE_MESSAGE, sint=2, vp=3) == \
        S.HV_STATUS_INVALID_VP_INDEX


def test_connect_port_checks(root):
    pid = root.new_guest()
    other = root.new_guest()
    assert root.create_port(5, pid) == S.HV_STATUS_SUCCESS
    assert root.create_port(6, pid, ptype=S.HV_PORT_TYPE_EVENT, sint=3, event_flags=(4 << 16)) == \
        S.HV_STATUS_SUCCESS
    P = S.HV_STATUS_INVALID_PARAMETER
    c = root.connect_port
    assert c(1, pid, 99, DB, flags=ANY) == S.HV_STATUS_INVALID_PORT_ID
    assert c(1, pid, 5, DB, flags=ANY, port_pid=pid + 5) == S.HV_STATUS_INVALID_PARTITION_ID
    assert c(1, other, 5, DB, flags=ANY) == S.HV_STATUS_ACCESS_DENIED        # the port names `pid`
    assert c(1, ROOT_ID, 5, DB, flags=ANY) == S.HV_STATUS_ACCESS_DENIED
    assert c(1, pid, 5, DB, ptype=S.HV_PORT_TYPE_EVENT) == P                  # type mismatch
    assert c(1, pid, 6, DB, flags=ANY) == P                                   # doorbell info to an event port
    assert c(0, pid, 5, DB, flags=ANY) == S.HV_STATUS_INVALID_CONNECTION_ID
    assert c(1 << 24, pid, 5, DB, flags=ANY) == P                             # HV_CONNECTION_ID.Reserved
    assert c(1, pid, 5, DB, flags=ANY | 0x8) == P                             # unknown flag bit
    assert c(1, pid, 5, DB, flags=5) == P                                     # size code 5 in the mask
    assert c(1, pid, 5, 0xFFE, flags=DWORD) == P                              # crosses a page
    assert c(1, pid, 5, 1 << 46, flags=BYTE) == P                             # beyond the GPA width
    assert c(1, pid, 5, DB, flags=ANY, connection_vtl=1) == P
    assert c(1, pid, 5, DB, flags=ANY, rsvd1=1) == P                          # MBZ
    assert root.hv.stats()["connections"] == 0
    assert c(1, pid, 5, 0xFFC, flags=DWORD) == S.HV_STATUS_SUCCESS
    assert c(1, pid, 5, DB, flags=ANY) == S.HV_STATUS_INVALID_CONNECTION_ID   # duplicate id
    assert c(2, pid, 5, 0xFFC, flags=DWORD) == S.HV_STATUS_SUCCESS            # two connections, one port
    assert c(3, pid, 6, ptype=S.HV_PORT_TYPE_EVENT) == S.HV_STATUS_SUCCESS
    assert root.hv.stats()["connections"] == 3


def test_delete_and_disconnect_checks(root):
    pid = root.new_guest()
    root.doorbell(pid, 5, DB, flags=ANY)
    assert root.delete_port(6) == S.HV_STATUS_INVALID_PORT_ID
    assert root.disconnect_port(6, pid) == S.HV_STATUS_INVALID_CONNECTION_ID
    assert root.disconnect_port(5, pid, doorbell=False) == S.HV_STATUS_INVALID_PARAMETER
    assert root.disconnect_port(5, pid + 1) == S.HV_STATUS_INVALID_PARTITION_ID
    inp = S.hv_input_delete_port(port_partition_id=ROOT_ID, port_id=5, rsvd0=1)
    assert root.fast(S.HVCALL_DELETE_PORT, *struct.unpack("<QQ", inp.to_bytes())) == \
        S.HV_STATUS_INVALID_PARAMETER
    inp = S.hv_input_disconnect_port(connection_partition_id=pid, connection_id=5, flags=3)
    assert root.fast(S.HVCALL_DISCONNECT_PORT, *struct.unpack("<QQ", inp.to_bytes())) == \
        S.HV_STATUS_INVALID_PARAMETER
    # memory form works too
    assert root.st(S.HVCALL_DISCONNECT_PORT, S.hv_input_disconnect_port(
        connection_partition_id=pid, connection_id=5, flags=1)) == S.HV_STATUS_SUCCESS
    assert root.st(S.HVCALL_DELETE_PORT, S.hv_input_delete_port(port_partition_id=ROOT_ID, port_id=5)) == \
        S.HV_STATUS_SUCCESS
    assert root.hv.stats()["ports"] == root.hv.stats()["connections"] == 0


def test_finalize_deletes_the_partitions_ports_and_connections(root):
    pid = root.new_guest()
    root.doorbell(pid, 5, DB, flags=ANY)
    assert root.create_port(9, ROOT_ID, port_pid=pid, ptype=S.HV_PORT_TYPE_MESSAGE, sint=2, vp=0) == \
        S.HV_STATUS_SUCCESS
    st = root.hv.stats()
    assert (st["ports"], st["connections"]) == (2, 1)
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    st = root.hv.stats()
    # the child's port and connection are gone; the root's port for it stays
    assert (st["ports"], st["connections"], st["ports_child"]) == (1, 0, 1)
    assert root.disconnect_port(5, pid) == S.HV_STATUS_INVALID_PARTITION_STATE
    assert root.delete_port(9, port_pid=pid) == S.HV_STATUS_INVALID_PARTITION_STATE
    # every child page can be withdrawn, and the partition deleted
    free = len(root.hv.partitions[pid].free)
    assert root.withdraw(pid, free + 1)[0] == S.HV_STATUS_NO_RESOURCES
    assert root.fast(S.HVCALL_DELETE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    # a root port whose connection partition is gone: still the root's to delete
    assert root.hv.stats()["ports_child"] == 1
    assert root.connect_port(5, pid, 5, DB, flags=ANY) == S.HV_STATUS_INVALID_PARTITION_ID
    assert root.delete_port(5) == S.HV_STATUS_SUCCESS
    st = root.hv.stats()
    assert (st["ports"], st["ports_child"], st["root_pool_used"]) == (0, 0, 0)


def test_create_port_for_a_finalized_partition(root):
    pid = root.new_guest()
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    assert root.create_port(5, pid) == S.HV_STATUS_INVALID_PARTITION_STATE


# ================================================================ doorbells
@pytest.mark.parametrize("code,flags,value,rings", [
    (mov8(0x5A), BYTE, 0x5A, True),
    (mov8(0x5B), BYTE, 0x5A, False),                 # another value
    (mov16(0x5A), BYTE, 0x5A, False),                # another size
    (mov16(0x1234), WORD, 0x1234, True),
    (mov32(0xDEADBEEF), DWORD, 0xDEADBEEF, True),
    (mov32(0xDEADBEEF), DWORD | ANY, 0, True),       # any value of that size
    (mov8(0x01), DWORD | ANY, 0, False),             # ...but not another size
    (mov16(0x77), SIZE_ANY, 0x77, True),             # any size, that value
    (mov8(0x77), SIZE_ANY, 0x77, True),
    (mov8(0x78), SIZE_ANY, 0x77, False),
    (mov32(0x42), SIZE_ANY | ANY, 0, True),          # any write at all
    (bytes.fromhex("d9e8" "df3e0090"), QWORD, 1, True),              # fld1; fistp qword [DB]
    (bytes.fromhex("bf0090" "b83412" "ab"), WORD, 0x1234, True),     # mov di, DB; mov ax; stosw
])
def test_doorbell_match(root, code, flags, value, rings):
    pid = root.new_guest()
    msg = guest(root, code)
    root.doorbell(pid, 7, DB, value=value, flags=flags)
    release(root, pid)
    r = root.dispatch(pid, 0)
    if not rings:
        # an ordinary MMIO exit: RIP at the MOV, nothing signalled
        assert r == READY_INTERCEPT
        mtype, payload = root.message(msg)
        assert mtype == S.HVMSG_UNMAPPED_GPA
        m = S.hv_x64_memory_intercept_message.from_bytes(payload)
        assert (m.guest_physical_address, m.header.rip) == (DB, 0x1000)
        assert m.header.intercept_access_type == S.HV_INTERCEPT_ACCESS_WRITE
        assert root.drain_ring(0) == [] and msg_types(root, 0) == []
        return
    # consumed by the hypervisor: the dispatch returns for the root's interrupt,
    # then the VP goes on after the MOV to the OUT
    assert r == PREEMPTED
    m = root.take_message(0)
    assert m[0] == S.HVMSG_SYNIC_SINT_INTERCEPT
    assert S.hv_notification_message_payload.from_bytes(m[1]).sint_index == DOORBELL_SINT
    assert root.drain_ring(0) == [7]
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    mtype, payload = root.message(msg)
    assert mtype == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert S.hv_x64_io_port_intercept_message.from_bytes(payload).header.rip == 0x1000 + len(code) + 2
    assert root.hv.stats()["connection_table"][0]["triggers"] == 1


def test_doorbell_needs_an_unmapped_gpa(root):
    pid = root.new_guest()
    root.real_mode_guest(pid, mov8(1) + OUT80, pages=16)          # DB is guest RAM here
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    root.doorbell(pid, 7, DB, flags=ANY)
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert root.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert root.gread(pid, DB, 1) == b"\x01" and root.drain_ring(0) == []


def test_doorbell_read_modify_write_is_an_mmio_exit(root):
    pid = root.new_guest()
    msg = guest(root, bytes.fromhex("8006009001"))            # add byte [0x9000], 1: reads first
    root.doorbell(pid, 7, DB, flags=ANY)
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert root.message(msg)[0] == S.HVMSG_UNMAPPED_GPA
    assert root.drain_ring(0) == []


def test_qword_doorbell_in_long_mode(root):
    pid = root.new_guest()
    root.map_ram(pid, 0, 32)
    root.gwrite(pid, 0x500, struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    root.gwrite(pid, 0x10000, struct.pack("<Q", 0x11000 | 3))
    root.gwrite(pid, 0x11000, struct.pack("<Q", 0x12000 | 3))
    root.gwrite(pid, 0x12000, struct.pack("<Q", 0x83))                # 2 MiB identity page
    # mov rax, imm64; mov [0x40000], rax; mov al, 0x7e; out 0x80, al
    code = b"\x48\xB8" + struct.pack("<Q", 0x1122334455667788) + bytes.fromhex("48890425" "00000400") + OUT80
    root.gwrite(pid, 0x3000, code)
    data = seg_pack((0, 0xFFFFFFFF, 0x10, 0xC093))
    regs = [(R.HV_X64_REGISTER_CR3, 0x10000), (R.HV_X64_REGISTER_CR4, 0x20),
            (R.HV_X64_REGISTER_EFER, 0x500), (R.HV_X64_REGISTER_CR0, 0x80000011),
            (R.HV_X64_REGISTER_GDTR, table_pack((0x500, 23))),
            (R.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFFFFFF, 0x08, 0xA09B))),
            (R.HV_X64_REGISTER_DS, data), (R.HV_X64_REGISTER_SS, data),
            (R.HV_X64_REGISTER_RIP, 0x3000), (R.HV_X64_REGISTER_RSP, 0x9000)]
    assert root.set_regs(pid, 0, regs)[0] == S.HV_STATUS_SUCCESS
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    root.doorbell(pid, 7, 0x40000, value=0x1122334455667788, flags=QWORD)
    release(root, pid)
    seen, mtype = run_to_out(root, pid, msg)
    assert seen == [PREEMPTED, READY_INTERCEPT] and mtype == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert root.drain_ring(0) == [7]


def test_deleted_port_connection_swallows_writes_silently(root):
    pid = root.new_guest()
    msg = guest(root, mov8(1))
    root.doorbell(pid, 7, DB, flags=ANY)
    assert root.delete_port(7) == S.HV_STATUS_SUCCESS         # before DisconnectPort
    assert root.hv.stats()["connections"] == 1
    release(root, pid)
    seen, mtype = run_to_out(root, pid, msg)
    assert seen == [READY_INTERCEPT] and mtype == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert root.drain_ring(0) == [] and msg_types(root, 0) == []
    # a new port with the same id does not revive the old connection
    assert root.create_port(7, pid) == S.HV_STATUS_SUCCESS
    assert root.hv.partitions[pid].connections[7].port.alive is False
    assert root.disconnect_port(7, pid) == S.HV_STATUS_SUCCESS
    assert root.delete_port(7) == S.HV_STATUS_SUCCESS


def test_doorbell_rings_the_dispatching_cpu(root):
    pid = root.new_guest()
    msg = guest(root, mov8(1))
    root.doorbell(pid, 7, DB, flags=ANY)
    release(root, pid)
    assert root.st(S.HVCALL_DISPATCH_VP, S.hv_input_dispatch_vp(partition_id=pid), cpu=1) == \
        S.HV_STATUS_SUCCESS
    assert root.drain_ring(0) == [] and root.drain_ring(1) == [7]
    assert [m[0] for m in msg_types(root, 1)] == [S.HVMSG_SYNIC_SINT_INTERCEPT]


def test_doorbell_port_with_a_target_vp(root):
    pid = root.new_guest()
    msg = guest(root, mov8(1))
    assert root.create_port(7, pid, vp=1) == S.HV_STATUS_SUCCESS
    assert root.connect_port(7, pid, 7, DB, flags=ANY) == S.HV_STATUS_SUCCESS
    release(root, pid)
    seen, _ = run_to_out(root, pid, msg)
    assert seen == [READY_INTERCEPT]                           # cpu 1 is not the dispatching CPU
    assert root.drain_ring(0) == [] and root.drain_ring(1) == [7]


def test_signal_masked_suppresses_the_notification(root):
    pid = root.new_guest()
    msg = guest(root, mov8(1))
    root.doorbell(pid, 7, DB, flags=ANY)
    gpa, _ = root.ring(0)
    root.ram.write(gpa + S.hv_synic_event_ring.OFFSETS["signal_masked"], b"\x01")
    release(root, pid)
    seen, _ = run_to_out(root, pid, msg)
    assert seen == [READY_INTERCEPT]                           # no root interrupt, no early return
    assert msg_types(root, 0) == []
    assert root.ring(0)[1].data[0] == 7                        # the entry is written all the same
    assert root.drain_ring(0) == [7]


# ---------------------------------------------------------------- event rings
def loop_guest(root, n, ports=1):
    """Real-mode loop: n times, a byte write to each of `ports` doorbells
    (DB, DB+8, ...), then OUT 0x80."""
    body = b"".join(bytes([0xC6, 0x06]) + struct.pack("<HB", DB + 8 * k, 1) for k in range(ports))
    # mov cx, n; L: body; dec cx; jnz L
    loop = body + b"\x49" + bytes([0x75, (-(len(body) + 3)) & 0xFF])
    return guest(root, b"\xB9" + struct.pack("<H", n) + loop)


def test_ring_wraparound(root):
    pid = root.new_guest()
    msg = loop_guest(root, 100)
    root.doorbell(pid, 7, DB, flags=ANY)
    release(root, pid)
    got = []
    for _ in range(200):
        r = root.dispatch(pid, 0)
        got += root.drain_ring(0)
        msg_types(root, 0)
        if r == READY_INTERCEPT:
            break
    assert root.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert got == [7] * 100
    s = root.hv.synic[0]
    assert s.heads[DOORBELL_SINT] == 100 % 63 and root.tails[(0, DOORBELL_SINT)] == 100 % 63
    assert not any(root.ring(0)[1].data)                       # every slot consumed and zeroed


def test_ring_full_keeps_signals_until_notify_port_ring_empty(root):
    pid = root.new_guest()
    msg = loop_guest(root, 40, ports=2)                        # 80 signals, ports 7 and 8 alternating
    root.doorbell(pid, 7, DB, flags=ANY)
    root.doorbell(pid, 8, DB + 8, flags=ANY)
    release(root, pid)
    # nobody consumes: the first notification stays in the SINT0 slot, so the
    # VP runs through the loop in the second dispatch
    seen, mtype = run_to_out(root, pid, msg)
    assert seen == [PREEMPTED, READY_INTERCEPT] and mtype == S.HVMSG_X64_IO_PORT_INTERCEPT
    gpa, ring = root.ring(0)
    assert ring.ring_full == 1
    assert list(ring.data) == [7, 8] * 31 + [7]                # 63 entries; the rest held back
    assert root.hv.synic[0].kept[DOORBELL_SINT] == [8, 7]      # once per port, in order
    assert root.hv.stats()["port_table"][0]["signals"] == 40
    # the root drains like Linux: 63 entries, then ring_full -> NotifyPortRingEmpty
    got = root.drain_ring(0)
    assert got == [7, 8] * 31 + [7] + [8, 7]
    assert root.ring(0)[1].ring_full == 0 and root.hv.synic[0].kept[DOORBELL_SINT] == []
    assert root.hv.calls[S.HVCALL_NOTIFY_PORT_RING_EMPTY] == 1


def test_notify_port_ring_empty_when_nothing_is_kept(root):
    assert root.fast(S.HVCALL_NOTIFY_PORT_RING_EMPTY, DOORBELL_SINT) == S.HV_STATUS_SUCCESS
    assert root.fast(S.HVCALL_NOTIFY_PORT_RING_EMPTY, 16) == S.HV_STATUS_INVALID_PARAMETER
    assert root.fast(S.HVCALL_NOTIFY_PORT_RING_EMPTY, DOORBELL_SINT | (1 << 32)) == \
        S.HV_STATUS_INVALID_PARAMETER                          # rsvd0 (MBZ)


def test_notify_port_ring_empty_refills_and_sets_ring_full_again(root):
    pid = root.new_guest()
    hv = root.hv
    root.doorbell(pid, 7, DB, flags=ANY)
    port = hv.root.ports[7]
    vp = hv.partitions[pid].vps[0]
    with hv._lock:
        for _ in range(63):
            hv._signal_port(port, vp)
        hv._signal_port(port, vp)                              # full: kept
    gpa, ring = root.ring(0)
    assert ring.ring_full == 1 and hv.synic[0].kept[DOORBELL_SINT] == [7]
    # the root consumed only two entries, then (wrongly early) notifies
    assert [root.ring_get(0), root.ring_get(0)] == [7, 7]
    root.ram.write(gpa + S.hv_synic_event_ring.OFFSETS["ring_full"], b"\x00")
    assert root.fast(S.HVCALL_NOTIFY_PORT_RING_EMPTY, DOORBELL_SINT) == S.HV_STATUS_SUCCESS
    assert hv.synic[0].kept[DOORBELL_SINT] == [] and root.ring(0)[1].ring_full == 0
    assert len(root.drain_ring(0)) == 61 + 1


def test_delete_port_drops_its_kept_signals(root):
    pid = root.new_guest()
    hv = root.hv
    root.doorbell(pid, 7, DB, flags=ANY)
    with hv._lock:
        for _ in range(64):
            hv._signal_port(hv.root.ports[7], hv.partitions[pid].vps[0])
    assert hv.synic[0].kept[DOORBELL_SINT] == [7]
    assert root.disconnect_port(7, pid) == S.HV_STATUS_SUCCESS
    assert root.delete_port(7) == S.HV_STATUS_SUCCESS
    assert hv.synic[0].kept[DOORBELL_SINT] == []


def test_synic_init_restarts_the_rings(root):
    pid = root.new_guest()
    hv = root.hv
    root.doorbell(pid, 7, DB, flags=ANY)
    with hv._lock:
        for _ in range(5):
            hv._signal_port(hv.root.ports[7], hv.partitions[pid].vps[0])
    assert [root.ring_get(0) for _ in range(3)] == [7, 7, 7]
    # a reloaded driver starts with tail 0: enabling the pages restarts the ring
    simp, siefp, sirbp = hv.synic_pages(0, enable=True)
    assert hv.synic[0].heads[DOORBELL_SINT] == 2
    assert list(root.ring(0)[1].data)[:3] == [7, 7, 0]
    root.tails.clear()
    assert root.drain_ring(0) == [7, 7]


def test_synic_pages_are_three_zeroed_overlay_pages(root):
    pages = root.hv.synic_pages(1)
    assert len(set(pages)) == 3
    for g in pages:
        assert root.hv.in_reserved(g >> 12) and root.ram.read(g, 4096) == bytes(4096)
    assert root.hv.synic_pages(1) == pages


# ---------------------------------------------------------------- core scheduler
def wait_for(cond, timeout=10):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_core_doorbell_goes_to_the_releasing_cpu(core):
    pid = core.new_guest()
    msg = guest(core, mov8(1))
    core.doorbell(pid, 7, DB, flags=ANY)
    core.notified.clear()
    assert core.set_regs(pid, 0, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 0)], cpu=1)[0] == S.HV_STATUS_SUCCESS
    assert core.hv.wait_idle(10)
    assert core.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    types = [m[0] for m in msg_types(core, 1)]
    assert types == [S.HVMSG_SYNIC_SINT_INTERCEPT, S.HVMSG_OPAQUE_INTERCEPT]
    assert core.drain_ring(1) == [7] and core.drain_ring(0) == []
    assert 1 in core.notified


def test_query_report_counts_ports_and_connections_of_children(root):
    import types
    import sim
    pid = root.new_guest()
    report = lambda: sim.Simulator.report(types.SimpleNamespace(hv=root.hv))     # noqa: E731
    assert (report()["ports"], report()["connections"]) == (0, 0)
    assert root.create_port(3, 0) == S.HV_STATUS_SUCCESS       # a root port for nobody: not counted
    root.doorbell(pid, 5, DB, flags=ANY)
    q = report()
    assert (q["ports"], q["connections"]) == (1, 1)
    assert q["root_pool_used"] == 2 + COSTS["create_vp_root"] + 2   # the partition, its VP, two ports
    assert root.disconnect_port(5, pid) == S.HV_STATUS_SUCCESS
    assert root.delete_port(5) == S.HV_STATUS_SUCCESS
    assert root.delete_port(3) == S.HV_STATUS_SUCCESS
    q = report()
    assert (q["ports"], q["connections"], q["root_pool_used"]) == (0, 0, 2 + COSTS["create_vp_root"])
