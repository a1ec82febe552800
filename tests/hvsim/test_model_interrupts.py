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


# 16-bit code: mov ecx, 0x80B; xor eax, eax; xor edx, edx; wrmsr (x2APIC EOI)
EOI16 = bytes.fromhex("66b90b080000" "6631c0" "6631d2" "0f30")


def handler(vector, iret=True, eoi=False):
    """mov al, vector; out 0x80, al; [EOI]; [iret | hlt]"""
    return bytes([0xB0, vector, 0xE6, 0x80]) + (EOI16 if eoi else b"") + (b"\xCF" if iret else b"\xF4")


def real_mode(root, pid, main, vectors=(0x30,), vp=0, eoi=False):
    """IVT entries for `vectors` -> handlers at 0x2000 + 32*k; main code at 0x1000."""
    root.real_mode_guest(pid, main, vp=vp, regs=[(R.HV_X64_REGISTER_RSP, STACK)])
    for k, v in enumerate(vectors):
        root.gwrite(pid, v * 4, struct.pack("<HH", 0x2000 + 32 * k, 0))
        root.gwrite(pid, 0x2000 + 32 * k, handler(v, eoi=eoi))
    return root.map_state_page(pid, vp, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)


def sint0(root, cpu):
    simp = root.hv.synic_pages(cpu)[0]
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
    assert vps[0].apic.vectors() == {0x42} and vps[1].apic.vectors() == {0x41, 0x42}


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
    assert root.hv.partitions[pid].vps[0].apic.vectors() == {0x30}             # still pending


def test_highest_vector_first_then_eoi_and_iret_take_the_next(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP, vectors=(0x31, 0x40), eoi=True)
    assert assert_irq(root, pid, 0x31) == S.HV_STATUS_SUCCESS
    assert assert_irq(root, pid, 0x40) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x40
    advance(root, pid)                                     # the VMM completes the OUT
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x31                 # after EOI and IRET (IF=1 again)
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


def _long_mode_guest(root, code):
    """A long-mode guest (identity-mapped 2 MiB, 64-bit GDT) running `code`
    at 0x3000 with an interrupt gate for vector 0x30 at 0x4000; returns
    (pid, its intercept-message page)."""
    pid = root.new_guest()
    root.map_ram(pid, 0, 32)
    msg = root.long_mode_guest(pid, code, [(0x30, handler(0x30))], idt_limit=0x30 * 16 + 15, rsp=0x9008)
    return pid, msg


def test_long_mode_idt(root):
    pid, msg = _long_mode_guest(root, STI_HLT)
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


# ================================================================ the local APIC
LAPIC_FLAGS = (S.HV_PARTITION_CREATION_FLAG_GPA_SUPER_PAGES_ENABLED | S.HV_PARTITION_CREATION_FLAG_EXO_PARTITION
               | S.HV_PARTITION_CREATION_FLAG_INTERCEPT_MESSAGE_PAGE_ENABLED
               | S.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED)
CLI_LOOP = bytes([0xFA, 0xEB, 0xFE])           # cli; jmp .
PREEMPTED = (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_SUSPEND)


def assert_full(root, pid, **kw):
    inp = S.hv_input_assert_virtual_interrupt(partition_id=pid, **kw)
    return root.st(S.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp, cpu=1)


def ctl(itype, level=False):
    return itype | (int(level) << 32)


def wrmsr16(msr, value):
    """16-bit code: mov ecx, msr; mov eax, lo; mov edx, hi; wrmsr"""
    return (b"\x66\xB9" + struct.pack("<I", msr) + b"\x66\xB8" + struct.pack("<I", value & 0xFFFFFFFF)
            + b"\x66\xBA" + struct.pack("<I", value >> 32) + b"\x0F\x30")


def lapic_state(root, pid, vp=0, blob=None):
    """Get (or, with `blob`, set) the LAPIC VP state through a one-page PFN list."""
    pfn = root.guest_pages(1)[0]
    cls, code = ((S.hv_input_set_vp_state, S.HVCALL_SET_VP_STATE) if blob is not None
                 else (S.hv_input_get_vp_state, S.HVCALL_GET_VP_STATE))
    inp = cls(partition_id=pid, vp_index=vp)
    inp.state_data.type = S.HV_GET_SET_VP_STATE_LAPIC_STATE
    if blob is not None:
        root.ram.write(pfn << 12, blob)
    assert root.call(code, inp, struct.pack("<Q", pfn), varhead=1)[0] == S.HV_STATUS_SUCCESS
    return root.ram.read(pfn << 12, 4096)


def test_assert_input_checks(root):
    pid = root.new_guest(vps=2)
    P = S.HV_STATUS_INVALID_PARAMETER
    T = S
    assert assert_full(root, pid, control=ctl(T.HV_X64_INTERRUPT_TYPE_SMI), vector=0x30) == P
    assert assert_full(root, pid, control=ctl(T.HV_X64_INTERRUPT_TYPE_REMOTEREAD), vector=0x30) == P
    assert assert_full(root, pid, control=10, vector=0x30) == P                      # unknown type
    assert assert_full(root, pid, control=ctl(T.HV_X64_INTERRUPT_TYPE_NMI), vector=0x100) == P
    assert assert_full(root, pid, control=ctl(T.HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY), vector=0xF) == P
    assert assert_full(root, pid, control=0, vector=0x30, dest_addr=1 << 32) == P
    assert assert_full(root, pid, control=1 << 40, vector=0x30) == P                  # control.rsvd
    assert assert_full(root, pid, control=0, vector=0x30, rsvd0=1) == P
    assert assert_full(root, pid, control=0, vector=0x30, rsvd1=1) == P
    vps = root.hv.partitions[pid].vps
    assert not vps[0].apic.irr and not vps[1].apic.irr
    assert not any(v.apic.nmi_pending for v in vps.values())
    # NMI ignores the vector; it latches once per VP
    assert assert_full(root, pid, control=ctl(T.HV_X64_INTERRUPT_TYPE_NMI), vector=0, dest_addr=1) == \
        S.HV_STATUS_SUCCESS
    assert vps[1].apic.nmi_pending and not vps[0].apic.nmi_pending
    # level-triggered FIXED sets the TMR bit
    assert assert_full(root, pid, control=ctl(0, level=True), vector=0x51) == S.HV_STATUS_SUCCESS
    assert vps[0].apic.vectors("tmr") == {0x51} and vps[0].apic.vectors() == {0x51}


def test_lowest_priority_broadcast_goes_to_one_vp(root):
    pid = root.new_guest(vps=2)
    vps = root.hv.partitions[pid].vps
    lowest = ctl(S.HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY)
    assert assert_full(root, pid, control=lowest, vector=0x50, dest_addr=0xFF) == S.HV_STATUS_SUCCESS
    assert vps[0].apic.vectors() == {0x50} and vps[1].apic.vectors() == set()
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_CR8, 8)])[0] == S.HV_STATUS_SUCCESS
    assert assert_full(root, pid, control=lowest, vector=0x60, dest_addr=0xFF) == S.HV_STATUS_SUCCESS
    assert vps[1].apic.vectors() == {0x60}                   # VP 0's priority is higher now


def test_tpr_masks_lower_priority_classes(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP, vectors=(0x30, 0x50), eoi=True)
    root.hv.dispatch_quantum = 0.25        # the model preempts the dispatch
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_CR8, 4)])[0] == S.HV_STATUS_SUCCESS
    assert root.hv.partitions[pid].vps[0].apic.tpr == 0x40
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == PREEMPTED                 # 0x30 (class 3) <= TPR class 4
    assert assert_irq(root, pid, 0x50) == S.HV_STATUS_SUCCESS
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x50
    advance(root, pid)
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == PREEMPTED   # EOI, IRET
    assert root.hv.partitions[pid].vps[0].apic.vectors() == {0x30}
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_CR8, 2)])[0] == S.HV_STATUS_SUCCESS
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x30


def test_guest_tpr_by_x2apic_msr(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, wrmsr16(0x808, 0x40) + STI_LOOP)
    root.hv.dispatch_quantum = 0.25        # the model preempts the dispatch
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == PREEMPTED
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_CR8]) == [4]
    assert root.hv.partitions[pid].vps[0].apic.ppr() == 0x40


def test_guest_tpr_by_mov_cr8(root):
    # mov eax, 3; mov cr8, rax; sti; jmp .
    pid, msg = _long_mode_guest(root, bytes.fromhex("b803000000" "440f22c0") + STI_LOOP)
    root.hv.dispatch_quantum = 0.25        # the model preempts the dispatch
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    assert root.dispatch(pid, 0) == PREEMPTED                 # class 3 <= TPR class 3
    vp = root.hv.partitions[pid].vps[0]
    assert vp.apic.tpr == 0x30 and root.get_regs(pid, 0, [R.HV_X64_REGISTER_CR8]) == [3]
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_CR8, 0)])[0] == S.HV_STATUS_SUCCESS
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg) == (0x30, 0x4002)


def test_same_class_waits_for_eoi(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP, vectors=(0x41, 0x42))     # handlers IRET without EOI
    root.hv.dispatch_quantum = 0.25        # the model preempts the dispatch
    assert assert_irq(root, pid, 0x41) == S.HV_STATUS_SUCCESS
    assert assert_irq(root, pid, 0x42) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x42
    advance(root, pid)
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == PREEMPTED
    a = root.hv.partitions[pid].vps[0].apic
    assert a.vectors("isr") == {0x42} and a.vectors() == {0x41} and a.ppr() == 0x40


def test_eoi_clears_the_highest_isr_bit(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, EOI16 + bytes([0xE6, 0x80]))
    blob = bytearray(lapic_state(root, pid))
    struct.pack_into("<I", blob, 0x100 + 16 * 1, 1 << (0x31 - 32))   # ISR: 0x31 and 0x40
    struct.pack_into("<I", blob, 0x100 + 16 * 2, 1 << (0x40 - 64))
    lapic_state(root, pid, blob=bytes(blob))
    a = root.hv.partitions[pid].vps[0].apic
    assert a.vectors("isr") == {0x31, 0x40} and a.ppr() == 0x40
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert a.vectors("isr") == {0x31}
    got = lapic_state(root, pid)
    assert struct.unpack_from("<I", got, 0x100 + 16 * 2)[0] == 0
    assert struct.unpack_from("<I", got, 0xA0)[0] == 0x30             # PPR


def test_lapic_state_shows_irr_and_tpr(root):
    pid = root.new_guest()
    assert assert_irq(root, pid, 0x41) == S.HV_STATUS_SUCCESS
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_CR8, 2)])[0] == S.HV_STATUS_SUCCESS
    got = lapic_state(root, pid)
    assert struct.unpack_from("<I", got, 0x200 + 16 * 2)[0] == 1 << 1
    assert struct.unpack_from("<I", got, 0x80)[0] == 0x20
    assert struct.unpack_from("<I", got, 0x30)[0] == 0x50014
    assert struct.unpack_from("<I", got, 0x350)[0] == 0x10000          # LINT0 masked


def test_level_triggered_eoi_message(root):
    pid = root.new_guest(vps=2)
    msg = real_mode(root, pid, STI_LOOP, eoi=True, vp=1)
    assert assert_full(root, pid, control=ctl(0, level=True), vector=0x30, dest_addr=1) == S.HV_STATUS_SUCCESS
    release(root, pid, vp=1)
    while root.take_message(0):
        pass
    assert root.dispatch(pid, 1) == READY_INTERCEPT             # the handler's OUT
    assert io_value(root, msg)[0] == 0x30
    advance(root, pid, vp=1)
    # the EOI is a root interrupt on the dispatching CPU: the dispatch returns
    assert root.dispatch(pid, 1, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == PREEMPTED
    mtype, payload, sender = root.take_message(0)
    assert (mtype, sender) == (S.HVMSG_X64_APIC_EOI, pid)
    m = S.hv_x64_apic_eoi_message.from_bytes(payload)
    assert (m.vp_index, m.interrupt_vector) == (1, 0x30)
    assert root.take_message(0) is None and root.take_message(1) is None
    # edge-triggered: EOI sends nothing
    assert assert_irq(root, pid, 0x30, dest=1) == S.HV_STATUS_SUCCESS
    root.hv.dispatch_quantum = 0.25        # the model preempts the dispatch
    assert root.dispatch(pid, 1) == READY_INTERCEPT
    advance(root, pid, vp=1)
    assert root.dispatch(pid, 1, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == PREEMPTED
    assert root.take_message(0) is None
    assert root.hv.partitions[pid].vps[1].apic.isr == 0


def test_level_triggered_eoi_message_core(core):
    pid = core.new_guest()
    msg = real_mode(core, pid, bytes([0xFB, 0xF4, 0xEB, 0xFD]), eoi=True)    # sti; L: hlt; jmp L
    assert assert_full(core, pid, control=ctl(0, level=True), vector=0x30) == S.HV_STATUS_SUCCESS
    assert core.set_regs(pid, 0, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 0)], cpu=1)[0] == S.HV_STATUS_SUCCESS
    assert core.hv.wait_idle(10)
    assert io_value(core, msg)[0] == 0x30
    assert core.take_message(1)[0] == S.HVMSG_OPAQUE_INTERCEPT
    advance(core, pid)
    core.set_regs(pid, 0, [(R.HV_REGISTER_INTERCEPT_SUSPEND, 0)], cpu=1)
    wait_for(lambda: core.hv.partitions[pid].vps[0].apic.halted)   # EOI, IRET, HLT
    mtype, payload, sender = core.take_message(1)
    assert (mtype, sender) == (S.HVMSG_X64_APIC_EOI, pid)
    assert S.hv_x64_apic_eoi_message.from_bytes(payload).interrupt_vector == 0x30


def test_halted_vp_with_a_masked_interrupt_stays_halted(root):
    pid = root.new_guest()
    real_mode(root, pid, STI_HLT)
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_CR8, 4)])[0] == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_BLOCKED, root.hv.halt_event)
    clear_slot(root, 1)
    assert assert_irq(root, pid, 0x30) == S.HV_STATUS_SUCCESS
    assert root.message(sint0(root, 1))[0] == S.HVMSG_NONE        # not deliverable: no kick
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_BLOCKED, root.hv.halt_event)


def test_nmi_ignores_if_and_is_blocked_until_iret(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, CLI_LOOP)
    # NMI handler: out 0x80; out 0x81; iret
    root.gwrite(pid, 2 * 4, struct.pack("<HH", 0x2400, 0))
    root.gwrite(pid, 0x2400, bytes.fromhex("b002e680" "b022e681" "cf"))
    nmi = ctl(S.HV_X64_INTERRUPT_TYPE_NMI)
    assert assert_full(root, pid, control=nmi) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert S.hv_x64_io_port_intercept_message.from_bytes(root.message(msg)[1]).port_number == 0x80
    assert assert_full(root, pid, control=nmi) == S.HV_STATUS_SUCCESS     # while the handler runs
    advance(root, pid)
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == READY_INTERCEPT
    assert S.hv_x64_io_port_intercept_message.from_bytes(root.message(msg)[1]).port_number == 0x81
    advance(root, pid)
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == READY_INTERCEPT
    m = S.hv_x64_io_port_intercept_message.from_bytes(root.message(msg)[1])
    assert (m.port_number, m.header.rip) == (0x80, 0x2402)               # the second NMI, after IRET
    ip = struct.unpack("<H", root.gread(pid, STACK - 6, 2))[0]
    assert ip in (0x1000, 0x1001, 0x1002)                                 # back in the main code
    assert root.hv.partitions[pid].vps[0].apic.delivered == [2, 2]


def test_extint_bypasses_the_irr_and_clear_withdraws_it(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP, vectors=(0x08,))
    ext = ctl(S.HV_X64_INTERRUPT_TYPE_EXTINT)
    a = root.hv.partitions[pid].vps[0].apic
    assert assert_full(root, pid, control=ext, vector=0x08) == S.HV_STATUS_SUCCESS
    assert a.extint == 0x08 and a.irr == 0
    assert root.fast(S.HVCALL_CLEAR_VIRTUAL_INTERRUPT, pid) == S.HV_STATUS_SUCCESS
    assert a.extint is None
    assert assert_full(root, pid, control=ext, vector=0x08) == S.HV_STATUS_SUCCESS
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x08
    assert a.isr == 0 and a.extint is None


def test_lint0_follows_its_lvt(root):
    pid = root.new_guest()
    a = root.hv.partitions[pid].vps[0].apic
    lint0 = ctl(S.HV_X64_INTERRUPT_TYPE_LOCALINT0)
    assert assert_full(root, pid, control=lint0, vector=0x08) == S.HV_STATUS_SUCCESS
    assert a.extint is None                                  # masked after reset: dropped
    blob = bytearray(lapic_state(root, pid))
    struct.pack_into("<I", blob, 0x350, 7 << 8)              # LINT0: ExtINT
    struct.pack_into("<I", blob, 0x360, 4 << 8)              # LINT1: NMI
    lapic_state(root, pid, blob=bytes(blob))
    assert assert_full(root, pid, control=lint0, vector=0x08) == S.HV_STATUS_SUCCESS
    assert assert_full(root, pid, control=ctl(S.HV_X64_INTERRUPT_TYPE_LOCALINT1)) == S.HV_STATUS_SUCCESS
    assert a.extint == 0x08 and a.nmi_pending


def test_init_then_sipi_starts_the_vp(root):
    pid = root.new_guest()
    msg = real_mode(root, pid, STI_LOOP)
    root.gwrite(pid, 0x3000, bytes.fromhex("b099e680"))       # SIPI vector 3: 0300:0000
    release(root, pid)
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_RAX, 0x1234)])[0] == S.HV_STATUS_SUCCESS
    assert assert_full(root, pid, control=ctl(S.HV_X64_INTERRUPT_TYPE_SIPI), vector=3) == S.HV_STATUS_SUCCESS
    assert not root.hv.partitions[pid].vps[0].apic.wait_sipi    # SIPI without INIT: ignored
    assert assert_full(root, pid, control=ctl(S.HV_X64_INTERRUPT_TYPE_INIT)) == S.HV_STATUS_SUCCESS
    cs, rip = root.get_regs(pid, 0, [R.HV_X64_REGISTER_CS, R.HV_X64_REGISTER_RIP])
    assert (S.hv_x64_segment_register.from_bytes(cs.to_bytes(16, "little")).selector, rip) == (0xF000, 0xFFF0)
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_BLOCKED, root.hv.halt_event)
    clear_slot(root, 1)
    assert assert_full(root, pid, control=ctl(S.HV_X64_INTERRUPT_TYPE_SIPI), vector=3) == S.HV_STATUS_SUCCESS
    assert root.message(sint0(root, 1))[0] == S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR   # kicked
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    m = S.hv_x64_io_port_intercept_message.from_bytes(root.message(msg)[1])
    assert (m.rax & 0xFF, m.header.rip, m.header.cs_segment.selector) == (0x99, 2, 0x300)


def test_x2apic_self_ipi_and_icr(root):
    pid = root.new_guest(vps=2)
    # ICR: fixed 0x45 to APIC 1; SELF_IPI 0x30; then loop with interrupts on
    msg = real_mode(root, pid, wrmsr16(0x830, (1 << 32) | 0x45) + wrmsr16(0x83F, 0x30) + STI_LOOP)
    release(root, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert io_value(root, msg)[0] == 0x30
    assert root.hv.partitions[pid].vps[1].apic.vectors() == {0x45}


def test_xapic_page(root):
    pid = root.new_guest(flags=LAPIC_FLAGS)
    main = (bytes.fromhex("c70580 00e0fe 20000000".replace(" ", ""))     # mov dword [FEE00080], 0x20 (TPR)
            + bytes.fromhex("a13000e0fe" "e780")                        # mov eax, [FEE00030]; out 0x80, eax
            + bytes.fromhex("a1a000e0fe" "e780")                        # PPR
            + bytes.fromhex("66a13200e0fe" "e780"))                     # mov ax, [FEE00032]: version[31:16]
    msg = protected_mode(root, pid, main)
    rax = []
    for _ in range(3):
        assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == READY_INTERCEPT
        m = S.hv_x64_io_port_intercept_message.from_bytes(root.message(msg)[1])
        rax.append(m.rax & 0xFFFFFFFF)
        advance(root, pid)
    assert rax[:2] == [0x50014, 0x20] and rax[2] & 0xFFFF == 0x0005
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_CR8]) == [2]


def test_xapic_eoi_and_isr_reads(root):
    pid = root.new_guest(flags=LAPIC_FLAGS)
    msg = protected_mode(root, pid, STI_HLT)
    # handler 0x30: ISR[1] -> out; EOI; ISR[1] -> out; iret
    root.gwrite(pid, 0x3000, bytes.fromhex("a11001e0fe" "e780" "c705b000e0fe00000000" "a11001e0fe" "e780" "cf"))
    assert assert_full(root, pid, control=ctl(0, level=True), vector=0x30) == S.HV_STATUS_SUCCESS
    while root.take_message(0):
        pass
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert S.hv_x64_io_port_intercept_message.from_bytes(root.message(msg)[1]).rax == 1 << 16
    advance(root, pid)
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == PREEMPTED
    mtype, payload, sender = root.take_message(0)
    assert (mtype, sender) == (S.HVMSG_X64_APIC_EOI, pid)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert S.hv_x64_io_port_intercept_message.from_bytes(root.message(msg)[1]).rax == 0


def test_apic_page_without_lapic_is_an_mmio_exit(root):
    pid = root.new_guest(flags=LAPIC_FLAGS & ~S.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED)
    msg = protected_mode(root, pid, bytes.fromhex("a13000e0fe" "e780"))
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    mtype, payload = root.message(msg)
    assert mtype == S.HVMSG_UNMAPPED_GPA
    assert S.hv_x64_memory_intercept_message.from_bytes(payload).guest_physical_address == 0xFEE00030
