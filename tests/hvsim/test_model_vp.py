"""hvsim model: VPs, registers, state pages, and real guest code on Unicorn."""

import os
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import Root, S, ROOT_ID, HV_BASE, HV_SIZE, seg_pack, table_pack  # noqa: E402
from model_fixtures import root, core  # noqa: E402,F401 (pytest fixtures)

R = S  # register names live in the bindings too
SMOKE = bytes.fromhex("baf803" "00d8" "0430" "ee" "f4")   # mov dx,0x3f8; add al,bl; add al,'0'; out dx,al; hlt
ALL = S.HV_MAP_GPA_READABLE | S.HV_MAP_GPA_WRITABLE | S.HV_MAP_GPA_EXECUTABLE


def io_msg(root, gpa):
    mtype, payload = root.message(gpa)
    assert mtype == S.HVMSG_X64_IO_PORT_INTERCEPT, hex(mtype)
    return S.hv_x64_io_port_intercept_message.from_bytes(payload)


def ilen(hdr):
    return hdr.bits("instruction_length_cr8", "instruction_length")


def release(root, pid, vp=0, cpu=0):
    assert root.set_regs(pid, vp, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 0)], cpu=cpu)[0] == S.HV_STATUS_SUCCESS


# ---------------------------------------------------------------- registers
def test_reset_state(root):
    pid = root.new_guest()
    cs, rip, cr0, rfl, susp = root.get_regs(pid, 0, [R.HV_X64_REGISTER_CS, R.HV_X64_REGISTER_RIP,
                                                     R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_RFLAGS,
                                                     R.HV_REGISTER_EXPLICIT_SUSPEND])
    seg = S.hv_x64_segment_register.from_bytes(cs.to_bytes(16, "little"))
    assert (seg.selector, seg.base, seg.limit) == (0xF000, 0xFFFF0000, 0xFFFF)
    assert (rip, cr0, rfl, susp) == (0xFFF0, 0x60000010, 2, 1)


def test_register_round_trip(root):
    pid = root.new_guest()
    vals = [(R.HV_X64_REGISTER_RAX, 0x1122334455667788), (R.HV_X64_REGISTER_R15, 7),
            (R.HV_X64_REGISTER_SS, seg_pack((0x1000, 0xFFFFF, 0x18, 0xC093))),
            (R.HV_X64_REGISTER_GDTR, table_pack((0x7000, 0x2F))), (R.HV_X64_REGISTER_CR4, 0x20),
            (R.HV_X64_REGISTER_XMM3, (0xAABB << 64) | 0xCCDD), (R.HV_X64_REGISTER_EFER, 0x500),
            (R.HV_X64_REGISTER_LSTAR, 0xFFFFFFFF81000000), (R.HV_REGISTER_GUEST_OS_ID, 0x8100)]
    assert root.set_regs(pid, 0, vals) == (S.HV_STATUS_SUCCESS, len(vals))
    assert root.get_regs(pid, 0, [n for n, _ in vals]) == [v for _, v in vals]


def test_unknown_register_name(root):
    pid = root.new_guest()
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_RAX, 1), (0x00BEEF00, 1)]) == \
        (S.HV_STATUS_INVALID_PARAMETER, 1)
    st, done = root.call(S.HVCALL_GET_VP_REGISTERS, S.hv_input_get_vp_registers(partition_id=pid),
                         struct.pack("<I", 0x00BEEF00), reps=1)
    assert (st, done) == (S.HV_STATUS_INVALID_PARAMETER, 0)


def test_register_assoc_mbz(root):
    pid = root.new_guest()
    el = S.hv_register_assoc(name=R.HV_X64_REGISTER_RAX, rsvd1=1).to_bytes()
    assert root.call(S.HVCALL_SET_VP_REGISTERS, S.hv_input_set_vp_registers(partition_id=pid), el,
                     reps=1) == (S.HV_STATUS_INVALID_PARAMETER, 0)


# ---------------------------------------------------------------- state pages
def test_state_pages_come_from_reserved_range(root):
    pid = root.new_guest()
    for t in (S.HV_VP_STATE_PAGE_REGISTERS, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE):
        gpa = root.map_state_page(pid, 0, t)
        assert HV_BASE <= gpa < HV_BASE + HV_SIZE
    assert root.st(S.HVCALL_UNMAP_VP_STATE_PAGE, S.hv_input_unmap_vp_state_page(
        partition_id=pid, type=S.HV_VP_STATE_PAGE_REGISTERS)) == S.HV_STATUS_SUCCESS
    assert root.st(S.HVCALL_UNMAP_VP_STATE_PAGE, S.hv_input_unmap_vp_state_page(
        partition_id=pid, type=S.HV_VP_STATE_PAGE_REGISTERS)) == S.HV_STATUS_INVALID_PARAMETER


def test_register_page_contents_and_dirty_bits(root):
    pid = root.new_guest()
    root.set_regs(pid, 0, [(R.HV_X64_REGISTER_RBX, 0x77)])
    gpa = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_REGISTERS)
    P = S.hv_x64_register_page
    pg = P.from_bytes(root.ram.read(gpa, P.SIZE))
    assert (pg.version, pg.isvalid, pg.rip, pg.gp_registers[3]) == (1, 1, 0xFFF0, 0x77)
    assert pg.segments[1].selector == 0xF000
    pg.gp_registers[0] = 0x55
    pg.rip = 0x1234
    pg.dirty = S.HV_X64_REGISTER_PAGE_DIRTY_GENERAL      # IP not marked: not loaded
    root.ram.write(gpa, pg.to_bytes())
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_RAX, R.HV_X64_REGISTER_RIP]) == [0x55, 0xFFF0]
    assert P.from_bytes(root.ram.read(gpa, P.SIZE)).dirty == 0


# ---------------------------------------------------------------- root scheduler guests
def smoke_setup(root, pid):
    root.real_mode_guest(pid, SMOKE, regs=[(R.HV_X64_REGISTER_RAX, 2), (R.HV_X64_REGISTER_RBX, 2)])
    regpage = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_REGISTERS)
    msgpage = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    return regpage, msgpage


def test_explicit_suspend_blocks_dispatch(root):
    pid = root.new_guest()
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_BLOCKED, S.HV_VP_DISPATCH_EVENT_SUSPEND)


def test_release_sends_vp_signal(root):
    pid = root.new_guest()
    release(root, pid, cpu=1)
    simp = root.hv.synic_pages(1)[0]
    slot = simp + 256 * S.HV_SYNIC_INTERCEPTION_SINT_INDEX
    mtype, payload = root.message(slot)
    assert mtype == S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR
    m = S.hv_vp_signal_pair_scheduler_message.from_bytes(payload)
    assert (m.vp_count, m.partition_ids[0], m.vp_indexes[0]) == (1, pid, 0)
    assert root.notified == [1]
    assert root.get_regs(pid, 0, [R.HV_REGISTER_VP_ROOT_SIGNAL_COUNT]) == [1]


def test_smoke_guest_root_scheduler(root):
    pid = root.new_guest()
    regpage, msgpage = smoke_setup(root, pid)
    release(root, pid)
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_INTERCEPT)
    io = io_msg(root, msgpage)
    h = io.header
    assert io.port_number == 0x3F8 and io.bits("access_info", "access_size") == 1
    assert h.intercept_access_type == S.HV_INTERCEPT_ACCESS_WRITE
    assert io.rax & 0xFF == 0x34 and h.rip == 0x1007 and ilen(h) == 1
    assert h.vp_index == 0 and h.cs_segment.selector == 0
    assert root.get_regs(pid, 0, [R.HV_REGISTER_INTERCEPT_SUSPEND]) == [1]
    # the VMM completes the OUT: RIP += length through the register page
    P = S.hv_x64_register_page
    pg = P.from_bytes(root.ram.read(regpage, P.SIZE))
    assert pg.isvalid == 1 and pg.rip == 0x1007
    pg.rip += ilen(h)
    pg.dirty = S.HV_X64_REGISTER_PAGE_DIRTY_IP
    root.ram.write(regpage, pg.to_bytes())
    assert root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND) == \
        (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_INTERCEPT)
    mtype, payload = root.message(msgpage)
    assert mtype == S.HVMSG_X64_HALT
    assert S.hv_x64_halt_message.from_bytes(payload).header.rip == 0x1008


def test_pending_intercept_without_clear_flag(root):
    pid = root.new_guest()
    smoke_setup(root, pid)
    release(root, pid)
    root.dispatch(pid, 0)
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_INTERCEPT)
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_RIP]) == [0x1007]


def test_reset_vector_with_cs_base(root):
    """The architectural reset state: CS base 0xFFFF0000, RIP 0xFFF0."""
    pid = root.new_guest()
    pfns = root.guest_pages(1)
    assert root.map(pid, 0xFFFFF, pfns)[0] == S.HV_STATUS_SUCCESS
    root.gwrite(pid, 0xFFFFFFF0, bytes.fromhex("e6 80 f4".replace(" ", "")))   # out 0x80, al; hlt
    release(root, pid)
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.dispatch(pid, 0)[1] == S.HV_VP_DISPATCH_EVENT_INTERCEPT
    io = io_msg(root, msg)
    assert io.port_number == 0x80 and io.header.rip == 0xFFF0 and ilen(io.header) == 2
    assert io.header.cs_segment.base == 0xFFFF0000


def test_protected_mode_guest(root):
    pid = root.new_guest()
    root.map_ram(pid, 0, 16)
    gdt = struct.pack("<3Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    root.gwrite(pid, 0x500, gdt)
    code = bytes.fromhex("baf8030000" "b841000000" "ee" "f4")       # mov edx; mov eax; out dx,al; hlt
    root.gwrite(pid, 0x2000, code)
    data = seg_pack((0, 0xFFFFFFFF, 0x10, 0xC093))
    regs = [(R.HV_X64_REGISTER_CR0, 0x11), (R.HV_X64_REGISTER_GDTR, table_pack((0x500, 23))),
            (R.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFFFFFF, 0x08, 0xC09B))),
            (R.HV_X64_REGISTER_DS, data), (R.HV_X64_REGISTER_ES, data), (R.HV_X64_REGISTER_SS, data),
            (R.HV_X64_REGISTER_RIP, 0x2000), (R.HV_X64_REGISTER_RSP, 0x8000),
            (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)]
    assert root.set_regs(pid, 0, regs)[0] == S.HV_STATUS_SUCCESS
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.dispatch(pid, 0)[1] == S.HV_VP_DISPATCH_EVENT_INTERCEPT
    io = io_msg(root, msg)
    H = io.header
    assert io.port_number == 0x3F8 and io.rax == 0x41 and H.rip == 0x200A
    assert H.bits("execution_state", "cr0_pe") == 1 and H.bits("execution_state", "efer_lma") == 0
    cs = root.get_regs(pid, 0, [R.HV_X64_REGISTER_CS])[0]
    seg = S.hv_x64_segment_register.from_bytes(cs.to_bytes(16, "little"))
    assert (seg.selector, seg.limit, seg.attributes & 0xF0FF) == (0x08, 0xFFFFFFFF, 0xC09B)


def long_mode_regs(root, pid, code, rip=0x3000):
    root.map_ram(pid, 0, 32)
    gdt = struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    root.gwrite(pid, 0x500, gdt)
    root.gwrite(pid, 0x10000, struct.pack("<Q", 0x11000 | 3))
    root.gwrite(pid, 0x11000, struct.pack("<Q", 0x12000 | 3))
    root.gwrite(pid, 0x12000, struct.pack("<Q", 0x83))          # 2 MiB identity page
    root.gwrite(pid, rip, code)
    data = seg_pack((0, 0xFFFFFFFF, 0x10, 0xC093))
    return [(R.HV_X64_REGISTER_CR3, 0x10000), (R.HV_X64_REGISTER_CR4, 0x20),
            (R.HV_X64_REGISTER_EFER, 0x500), (R.HV_X64_REGISTER_CR0, 0x80000011),
            (R.HV_X64_REGISTER_GDTR, table_pack((0x500, 23))),
            (R.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFFFFFF, 0x08, 0xA09B))),
            (R.HV_X64_REGISTER_DS, data), (R.HV_X64_REGISTER_SS, data),
            (R.HV_X64_REGISTER_RIP, rip), (R.HV_X64_REGISTER_RSP, 0x9000),
            (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)]


def test_long_mode_guest(root):
    pid = root.new_guest()
    code = bytes.fromhex("48b8efbeadde00000000" "baf8030000" "ef" "f4")   # mov rax,imm64; mov edx; out dx,eax
    assert root.set_regs(pid, 0, long_mode_regs(root, pid, code))[0] == S.HV_STATUS_SUCCESS
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.dispatch(pid, 0)[1] == S.HV_VP_DISPATCH_EVENT_INTERCEPT
    io = io_msg(root, msg)
    H = io.header
    assert io.bits("access_info", "access_size") == 4 and io.rax == 0xDEADBEEF and H.rip == 0x300F
    assert H.bits("execution_state", "efer_lma") == 1
    assert io.instruction_byte_count >= 1 and io.instruction_bytes[0] == 0xEF


def test_long_mode_mmio_read(root):
    pid = root.new_guest()
    code = bytes.fromhex("8b042500002000" "f4")     # mov eax, [0x200000] (unmapped GPA 2 MiB)
    regs = long_mode_regs(root, pid, code)
    root.gwrite(pid, 0x12008, struct.pack("<Q", 0x200000 | 0x83))   # map linear 2M..4M
    assert root.set_regs(pid, 0, regs)[0] == S.HV_STATUS_SUCCESS
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.dispatch(pid, 0)[1] == S.HV_VP_DISPATCH_EVENT_INTERCEPT
    mtype, payload = root.message(msg)
    assert mtype == S.HVMSG_UNMAPPED_GPA
    m = S.hv_x64_memory_intercept_message.from_bytes(payload)
    assert m.guest_physical_address == 0x200000 and m.header.rip == 0x3000
    assert m.header.intercept_access_type == S.HV_INTERCEPT_ACCESS_READ
    assert bytes(m.instruction_bytes[:m.instruction_byte_count]).startswith(code[:7])


def test_real_mode_unmapped_gpa(root):
    pid = root.new_guest()
    root.real_mode_guest(pid, bytes.fromhex("a10050" "f4"), pages=4)     # mov ax,[0x5000]
    release(root, pid)
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.dispatch(pid, 0)[1] == S.HV_VP_DISPATCH_EVENT_INTERCEPT
    mtype, payload = root.message(msg)
    m = S.hv_x64_memory_intercept_message.from_bytes(payload)
    assert mtype == S.HVMSG_UNMAPPED_GPA and m.guest_physical_address == 0x5000
    assert m.header.rip == 0x1000 and m.instruction_byte_count == 16
    assert bytes(m.instruction_bytes[:3]) == bytes.fromhex("a10050")
    assert m.bits("memory_access_info", "gva_valid") == 1 and m.guest_virtual_address == 0x5000


def test_write_to_readonly_mapping(root):
    pid = root.new_guest()
    root.real_mode_guest(pid, bytes.fromhex("a30060" "f4"), pages=4)     # mov [0x6000],ax
    root.map_ram(pid, 6, 1, flags=S.HV_MAP_GPA_READABLE)
    release(root, pid)
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.dispatch(pid, 0)[1] == S.HV_VP_DISPATCH_EVENT_INTERCEPT
    mtype, payload = root.message(msg)
    m = S.hv_x64_memory_intercept_message.from_bytes(payload)
    assert mtype == S.HVMSG_GPA_INTERCEPT and m.guest_physical_address == 0x6000
    assert m.header.intercept_access_type == S.HV_INTERCEPT_ACCESS_WRITE


CPUID_CODE = bytes.fromhex("66b801000040" "0fa2" "ee" "f4")   # mov eax,0x40000001; cpuid; out dx,al


def test_cpuid_answered_by_model(root):
    pid = root.new_guest()
    root.real_mode_guest(pid, CPUID_CODE)
    release(root, pid)
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    root.dispatch(pid, 0)
    assert io_msg(root, msg).rax == S.HV_CPUID_INTERFACE_SIGNATURE_HV1


def test_cpuid_intercept_when_installed(root):
    pid = root.new_guest()
    assert root.st(S.HVCALL_INSTALL_INTERCEPT, S.hv_input_install_intercept(
        partition_id=pid, access_type=S.HV_INTERCEPT_ACCESS_MASK_EXECUTE,
        intercept_type=S.HV_INTERCEPT_TYPE_X64_CPUID, intercept_parameter=0x40000001)) == S.HV_STATUS_SUCCESS
    root.real_mode_guest(pid, CPUID_CODE)
    release(root, pid)
    msg = root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    root.dispatch(pid, 0)
    mtype, payload = root.message(msg)
    assert mtype == S.HVMSG_X64_CPUID_INTERCEPT
    m = S.hv_x64_cpuid_intercept_message.from_bytes(payload)
    assert m.rax == 0x40000001 and m.default_result_rax == S.HV_CPUID_INTERFACE_SIGNATURE_HV1
    assert m.header.rip == 0x1006 and ilen(m.header) == 2


def test_dispatch_is_preempted(root):
    pid = root.new_guest()
    root.hv.dispatch_quantum = 0.25        # the model preempts the dispatch
    root.real_mode_guest(pid, bytes.fromhex("ebfe"))              # jmp $
    release(root, pid)
    assert root.dispatch(pid, 0) == (S.HV_VP_DISPATCH_STATE_READY, root.hv.preempt_event)
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_RIP, R.HV_REGISTER_INTERCEPT_SUSPEND]) == [0x1000, 0]


# ---------------------------------------------------------------- core scheduler
def test_smoke_guest_core_scheduler(core):
    pid = core.new_guest()
    regpage, msgpage = smoke_setup(core, pid)
    assert core.set_regs(pid, 0, [(R.HV_REGISTER_INTERCEPT_SUSPEND, 0), (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)],
                         cpu=1)[0] == S.HV_STATUS_SUCCESS
    assert core.hv.wait_idle()
    simp = core.hv.synic_pages(1)[0]
    slot = simp + 256 * S.HV_SYNIC_INTERCEPTION_SINT_INDEX
    mtype, payload = core.message(slot)
    assert mtype == S.HVMSG_OPAQUE_INTERCEPT
    assert S.hv_message.from_bytes(core.ram.read(slot, 256)).header.sender == pid
    assert S.hv_opaque_intercept_message.from_bytes(payload).vp_index == 0
    assert core.notified == [1]
    assert core.get_regs(pid, 0, [R.HV_REGISTER_INTERCEPT_SUSPEND]) == [1]
    io = io_msg(core, msgpage)
    assert io.port_number == 0x3F8 and io.header.rip == 0x1007 and io.rax & 0xFF == 0x34
    # complete the OUT and resume; do NOT free the SINT0 slot: the next message queues
    P = S.hv_x64_register_page
    pg = P.from_bytes(core.ram.read(regpage, P.SIZE))
    pg.rip += 1
    pg.dirty = S.HV_X64_REGISTER_PAGE_DIRTY_IP
    core.ram.write(regpage, pg.to_bytes())
    core.set_regs(pid, 0, [(R.HV_REGISTER_INTERCEPT_SUSPEND, 0)], cpu=1)
    assert core.hv.wait_idle()
    assert core.message(msgpage)[0] == S.HVMSG_X64_HALT
    hdr = S.hv_message.from_bytes(core.ram.read(slot, 256)).header
    assert hdr.bits("message_flags", "msg_pending") == 1 and core.notified == [1]
    # the root frees the slot and writes EOM: the queued message arrives
    core.ram.write_u32(slot, S.HVMSG_NONE)
    core.hv.eom(1)
    assert core.message(slot)[0] == S.HVMSG_OPAQUE_INTERCEPT
    assert core.notified == [1, 1]


def test_core_explicit_suspend_stops_running_vp(core):
    pid = core.new_guest()
    core.real_mode_guest(pid, bytes.fromhex("90ebfd"))            # nop; jmp back
    core.set_regs(pid, 0, [(R.HV_REGISTER_INTERCEPT_SUSPEND, 0), (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)])
    time.sleep(0.05)
    assert core.hv.partitions[pid].vps[0].running
    assert core.set_regs(pid, 0, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 1)])[0] == S.HV_STATUS_SUCCESS
    assert not core.hv.partitions[pid].vps[0].running
    rip, isusp = core.get_regs(pid, 0, [R.HV_X64_REGISTER_RIP, R.HV_REGISTER_INTERCEPT_SUSPEND])
    assert rip in (0x1000, 0x1001) and isusp == 0


def test_dispatch_refused_in_core_mode(core):
    pid = core.new_guest()
    assert core.st(S.HVCALL_DISPATCH_VP, S.hv_input_dispatch_vp(partition_id=pid)) == S.HV_STATUS_ACCESS_DENIED


def test_finalize_stops_vps_and_frees_state_pages(core):
    pid = core.new_guest()
    core.real_mode_guest(pid, bytes.fromhex("ebfe"))
    core.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_REGISTERS)
    used = core.hv.stats()["overlay_used"]
    core.set_regs(pid, 0, [(R.HV_REGISTER_INTERCEPT_SUSPEND, 0), (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)])
    assert core.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    assert core.hv.stats()["overlay_used"] == used - 1
    assert core.hv.stats()["partitions"][pid]["used"] == 0


def test_intermediate_control_registers_are_the_guests_own(root):
    """Cloud Hypervisor sets a guest's CR0/CR3/CR4 through the INTERMEDIATE_*
    names; without nested virtualization they are the same registers."""
    pid = root.new_guest()
    R = S
    pairs = [(R.HV_X64_REGISTER_INTERMEDIATE_CR0, 0x80000011), (R.HV_X64_REGISTER_INTERMEDIATE_CR3, 0x10000),
             (R.HV_X64_REGISTER_INTERMEDIATE_CR4, 0x20), (R.HV_X64_REGISTER_INTERMEDIATE_CR8, 5)]
    assert root.set_regs(pid, 0, pairs)[0] == S.HV_STATUS_SUCCESS
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_CR0, R.HV_X64_REGISTER_CR3, R.HV_X64_REGISTER_CR4,
                                  R.HV_X64_REGISTER_CR8]) == [0x80000011, 0x10000, 0x20, 5]
    assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_CR4, 0x620)])[0] == S.HV_STATUS_SUCCESS
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_INTERMEDIATE_CR4]) == [0x620]
