"""hvsim model: the minimal local APIC (AssertVirtualInterrupt, delivery through
the IVT/IDT, HLT with IF=1 in both scheduler modes)."""

import os
import struct
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import Root, S, seg_pack, table_pack  # noqa: E402
from model_fixtures import root, core  # noqa: E402,F401 (pytest fixtures)

R = S
IF = 1 << 9
STI_HLT = bytes([0xFB, 0xF4])                 # sti; hlt
STI_LOOP = bytes([0xFB, 0xEB, 0xFE])          # sti; jmp .
STACK = 0x8000


def assert_irq(root, pid, vector, dest=0, itype=None, logical=False, vtl=0):
    itype = S.HV_X64_INTERRUPT_TYPE_FIXED if itype is None else itype
    inp = S.hv_input_assert_virtual_interrupt(partition_id=pid, control=itype | (int(logical) << 33),
                                              dest_addr=dest, vector=vector, target_vtl=vtl)
    return root.st(S.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp, cpu=1)


def release(root, pid, vp=0):
    assert root.set_regs(pid, vp, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 0)])[0] == S.HV_STATUS_SUCCESS


def io_value(root, msgpage):
    mtype, payload = root.message(msgpage)
    assert mtype == S.HVMSG_X64_IO_PORT_INTERCEPT, hex(mtype)
    io = S.hv_x64_io_port_intercept_message.from_bytes(payload)
    assert io.port_number == 0x80
    return io.rax & 0xFF, io.header.rip


def handler(vector, iret=True):
    """mov al, vector; out 0x80, al; [iret]"""
    return bytes([0xB0, vector, 0xE6, 0x80]) + (b"\xCF" if iret else b"\xF4")


def real_mode(root, pid, main, vectors=(0x30,), vp=0):
    """IVT entries for `vectors` -> handlers at 0x2000 + 16*k; main code at 0x1000."""
    root.real_mode_guest(pid, main, vp=vp, regs=[(R.HV_X64_REGISTER_RSP, STACK)])
    for k, v in enumerate(vectors):
        root.gwrite(pid, v * 4, struct.pack("<HH", 0x2000 + 16 * k, 0))
        root.gwrite(pid, 0x2000 + 16 * k, handler(v))
    return root.map_state_page(pid, vp, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)


def sint0(root, cpu):
    simp, _ = root.hv.synic_pages(cpu)
    return simp + 256 * S.HV_SYNIC_INTERCEPTION_SINT_INDEX


def clear_slot(root, cpu):
    root.ram.write_u32(sint0(root, cpu), S.HVMSG_NONE)
    root.hv.eom(cpu)


def advance(root, pid, vp=0, n=2):
    rip = root.get_regs(pid, vp, [R.HV_X64_REGISTER_RIP])[0]
    assert root.set_regs(pid, vp, [(R.HV_X64_REGISTER_RIP, rip + n)])[0] == S.HV_STATUS_SUCCESS


READY_INTERCEPT = (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_INTERCEPT)


# ---------------------------------------------------------------- the hypercall
def test_assert_checks(root):
    pid = root.new_guest(vps=2)
    assert assert_irq(root, pid, 0x0F) == S.HV_STATUS_INVALID_PARAMETER        # exceptions
    assert assert_irq(root, pid, 0x100) == S.HV_STATUS_INVALID_PARAMETER
    assert assert_irq(root, pid, 0x30, logical=True) == S.HV_STATUS_INVALID_PARAMETER
    assert assert_irq(root, pid, 0x30, vtl=1) == S.HV_STATUS_INVALID_PARAMETER
    assert assert_irq(root, pid + 1, 0x30) == S.HV_STATUS_INVALID_PARTITION_ID
    assert assert_irq(root, pid, 0x30, dest=7) == S.HV_STATUS_SUCCESS           # nobody: dropped
    assert assert_irq(root, pid, 2, itype=S.HV_X64_INTERRUPT_TYPE_NMI) == S.HV_STATUS_SUCCESS
    vps = root.hv.partitions[pid].vps
    assert not vps[0].apic.irr and not vps[1].apic.irr
    assert assert_irq(root, pid, 0x41, dest=1) == S.HV_STATUS_SUCCESS
    assert assert_irq(root, pid, 0x42, dest=0xFF) == S.HV_STATUS_SUCCESS        # broadcast
    assert vps[0].apic.irr == {0x42} and vps[1].apic.irr == {0x41, 0x42}


# ---------------------------------------------------------------- root scheduler
def test_real_mode_hlt_blocks_and_interrupt_wakes(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_HLT)
    release(root, pid)
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_BLOCKED, root.hv.halt_event)
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_RIP]) == [0x1002]     # HLT completed
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_BLOCKED, root.hv.halt_event)
    clear_slot(root, 1)
    root.notified.clear()
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    # the halted VP is signalled to the root (the driver kicks its dispatch thread)
    mtype, payload = root.message(sint0(root, 1))
    assert mtype == S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR
    m = S.hv_vp_signal_pair_scheduler_message.from_bytes(payload)
    assert (m.vp_count, m.partition_ids[0], m.vp_indexes[0]) == (1, pid, 0)
    assert root.notified == [1]
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg) == (0x30, 0x2002)
    # the real-mode frame: IP after HLT, CS 0, FLAGS with IF; IF and TF now clear
    assert struct.unpack("<3H", root.gread(pid, STACK - 6, 6)) == (0x1002, 0, 0x202)
    rsp, rfl = root.get_regs(pid, 0, [R.HV_X64_REGISTER_RSP, R.HV_X64_REGISTER_RFLAGS])
    assert rsp == STACK - 6 and not rfl & IF


def test_hlt_with_if_clear_is_still_a_halt_intercept(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, bytes([0xF4]))
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert root.message(msg)[0] == S.HVMSG_X64_HALT
    assert root.hv.partitions[pid].vps[0].apic.irr == {0x30}                  # still pending


def test_highest_vector_first_then_iret_takes_the_next(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP, vectors=(0x31, 0x40))
    assert assert_irq(root, pid, 0x31) == S.HV_STATUS_SUCCESS
    assert assert_irq(root, pid, 0x40) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x40
    advance(root, pid)                                     # the VMM completes the OUT
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x31                 # after IRET (IF=1 again)
    assert root.hv.partitions[pid].vps[0].apic.delivered == [0x40, 0x31]


def test_sti_shadow_delays_delivery_past_hlt(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_HLT)
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS     # pending before STI
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x30
    ip = struct.unpack("<H", root.gread(pid, STACK - 6, 2))[0]
    assert ip == 0x1002, "delivered after HLT (the STI shadow covers HLT), not before it"


def test_interrupt_while_dispatch_runs(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP)
    root.hv.time_slice = 10
    root.hv.max_insns = 10 ** 9
    release(root, pid)
    out = []
    th = threading.Thread(target=lambda: out.append(root.dispatch(pid, 0)))
    th.start()
    time.sleep(0.2)
    assert root.hv.partitions[pid].vps[0].running
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    th.join(10)
    assert out == [READY_INTERCEPT]
    assert io_value(root, msg) == (0x30, 0x2002)
    assert struct.unpack("<H", root.gread(pid, STACK - 6, 2))[0] in (0x1001, 0x1002)   # in the loop


def test_register_page_vectors_are_delivered(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP)
    regpage = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_REGISTERS)
    iv = S.hv_vp_register_page_interrupt_vectors(vector_count=1)
    iv.vector[0] = 0x30
    root.ram.write(regpage + S.hv_x64_register_page.OFFSETS["interrupt_vectors"], iv.to_bytes())
    release(root, pid)
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_SCAN_INTERRUPT_INJECTION) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x30


GDT32 = struct.pack("<3Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
GDT64 = struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)


def gate32(off, sel=0x08, typ=0xE):
    return struct.pack("<HHBBH", off & 0xFFFF, sel, 0, 0x80 | typ, off >> 16)


def gate64(off, sel=0x08, typ=0xE, ist=0):
    return struct.pack("<HHBBHII", off & 0xFFFF, sel, ist, 0x80 | typ, (off >> 16) & 0xFFFF, off >> 32, 0)


def protected_mode(root, pid, main, idt_limit=0x30 * 8 + 7):
    root.map_ram(pid, 0, 16)
    root.gwrite(pid, 0x500, GDT32)
    root.gwrite(pid, 0x600 + 0x30 * 8, gate32(0x3000))
    root.gwrite(pid, 0x3000, handler(0x30))
    root.gwrite(pid, 0x2000, main)
    data = seg_pack((0, 0xFFFFFFFF, 0x10, 0xC093))
    regs = [(R.HV_X64_REGISTER_CR0, 0x11), (R.HV_X64_REGISTER_GDTR, table_pack((0x500, 23))),
            (R.HV_X64_REGISTER_IDTR, table_pack((0x600, idt_limit))),
            (R.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFFFFFF, 0x08, 0xC09B))),
            (R.HV_X64_REGISTER_DS, data), (R.HV_X64_REGISTER_ES, data), (R.HV_X64_REGISTER_SS, data),
            (R.HV_X64_REGISTER_RIP, 0x2000), (R.HV_X64_REGISTER_RSP, STACK),
            (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)]
    assert root.set_regs(pid, 0, regs)[0] == S.HV_STATUS_SUCCESS
    return root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)


def test_protected_mode_idt(root):
    pid = root.new_guest()
    msg = protected_mode(root, pid, STI_HLT)
    assert root.dispatch(pid, 0)[0] == S.HV_VP_DISPATCH_STATE_BLOCKED
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg) == (0x30, 0x3002)
    eip, cs, eflags = struct.unpack("<3I", root.gread(pid, STACK - 12, 12))
    assert (eip, cs) == (0x2002, 0x08) and eflags & IF
    rfl, cs_reg = root.get_regs(pid, 0, [R.HV_X64_REGISTER_RFLAGS, R.HV_X64_REGISTER_CS])
    assert not rfl & IF
    seg = S.hv_x64_segment_register.from_bytes(cs_reg.to_bytes(16, "little"))
    assert (seg.selector, seg.base, seg.limit) == (0x08, 0, 0xFFFFFFFF)


def test_protected_mode_vector_beyond_idt_limit_is_unrecoverable(root):
    pid = root.new_guest()
    msg = protected_mode(root, pid, STI_LOOP, idt_limit=0x2F * 8 + 7)
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert root.message(msg)[0] == S.HVMSG_UNRECOVERABLE_EXCEPTION


def test_long_mode_idt(root):
    pid = root.new_guest()
    root.map_ram(pid, 0, 32)
    root.gwrite(pid, 0x500, GDT64)
    root.gwrite(pid, 0x10000, struct.pack("<Q", 0x11000 | 3))
    root.gwrite(pid, 0x11000, struct.pack("<Q", 0x12000 | 3))
    root.gwrite(pid, 0x12000, struct.pack("<Q", 0x83))          # 2 MiB identity page
    root.gwrite(pid, 0x700 + 0x30 * 16, gate64(0x4000))
    root.gwrite(pid, 0x4000, handler(0x30))
    root.gwrite(pid, 0x3000, STI_HLT)
    data = seg_pack((0, 0xFFFFFFFF, 0x10, 0xC093))
    regs = [(R.HV_X64_REGISTER_CR3, 0x10000), (R.HV_X64_REGISTER_CR4, 0x20),
            (R.HV_X64_REGISTER_EFER, 0x500), (R.HV_X64_REGISTER_CR0, 0x80000011),
            (R.HV_X64_REGISTER_GDTR, table_pack((0x500, 23))),
            (R.HV_X64_REGISTER_IDTR, table_pack((0x700, 0x30 * 16 + 15))),
            (R.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFFFFFF, 0x08, 0xA09B))),
            (R.HV_X64_REGISTER_DS, data), (R.HV_X64_REGISTER_SS, data),
            (R.HV_X64_REGISTER_RIP, 0x3000), (R.HV_X64_REGISTER_RSP, 0x9008),
            (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)]
    assert root.set_regs(pid, 0, regs)[0] == S.HV_STATUS_SUCCESS
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.dispatch(pid, 0)[0] == S.HV_VP_DISPATCH_STATE_BLOCKED
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg) == (0x30, 0x4002)
    # 16-byte aligned frame: RIP, CS, RFLAGS, RSP, SS
    rip, cs, rfl, rsp, ss = struct.unpack("<5Q", root.gread(pid, 0x9000 - 40, 40))
    assert (rip, cs, rsp, ss) == (0x3002, 0x08, 0x9008, 0x10) and rfl & IF
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_RSP]) == [0x9000 - 40]


# ---------------------------------------------------------------- core scheduler
def wait_for(cond, timeout=10):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_core_hlt_sleeps_until_interrupt(core):
    pid = core.new_guest()
    msg = real_mode(core, pid, STI_HLT)
    vp = core.hv.partitions[pid].vps[0]
    release(core, pid)
    wait_for(lambda: vp.apic.halted)
    time.sleep(0.1)
    assert vp.running and core.message(msg)[0] == S.HVMSG_NONE       # no HALT intercept
    assert assert_irq(core, pid, 0x30) == S.HV_STATUS_SUCCESS
    assert core.hv.wait_idle(10)
    assert io_value(core, msg) == (0x30, 0x2002)
    mtype, payload = core.message(sint0(core, 0))
    assert mtype == S.HVMSG_OPAQUE_INTERCEPT


def test_core_interrupt_while_running(core):
    pid = core.new_guest()
    msg = real_mode(core, pid, STI_LOOP)
    vp = core.hv.partitions[pid].vps[0]
    release(core, pid)
    time.sleep(0.2)
    assert vp.running
    assert assert_irq(core, pid, 0x30) == S.HV_STATUS_SUCCESS
    assert core.hv.wait_idle(10)
    assert io_value(core, msg) == (0x30, 0x2002)


def test_core_explicit_suspend_stops_a_halted_vp(core):
    pid = core.new_guest()
    msg = real_mode(core, pid, STI_HLT)
    vp = core.hv.partitions[pid].vps[0]
    release(core, pid)
    wait_for(lambda: vp.apic.halted)
    assert core.set_regs(pid, 0, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 1)])[0] == S.HV_STATUS_SUCCESS
    assert not vp.running
    assert core.get_regs(pid, 0, [R.HV_REGISTER_INTERCEPT_SUSPEND]) == [0]
    # asserted while suspended: delivered once released
    assert assert_irq(core, pid, 0x30) == S.HV_STATUS_SUCCESS
    release(core, pid)
    assert core.hv.wait_idle(10)
    assert io_value(core, msg) == (0x30, 0x2002)
