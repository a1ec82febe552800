"""One behaviour per hypercall family, seen from the VMM: partition
properties, VP registers, intercepts, memory deposits, GPA maps, VP
creation and dispatch. Runs inside the simulated root partition; TAP."""

import errno
import os
import sys

import mshv_spec as S
from mshvlib import GuestMemory, Partition, expect_errno, ioctl, open_mshv, run_tests, sim_query

# cpuid; out %al,$0x80; hlt   (real mode)
CPUID_CODE = bytes([0x0F, 0xA2, 0xE6, 0x80, 0xF4])
# mov (0x2000),%al; out %al,$0x80; movb $0x5a,(0x2001); hlt   (real mode, DS base 0)
MEM_CODE = bytes([0xA0, 0x00, 0x20, 0xE6, 0x80, 0xC6, 0x06, 0x01, 0x20, 0x5A, 0xF4])


def _prop_get(pt, code, fd=None):
    inp = S.hv_input_get_partition_property(property_code=code)
    status, _r, out = pt.hvcall(S.HVCALL_GET_PARTITION_PROPERTY, bytes(inp), 8, fd=fd)
    return status, S.hv_output_get_partition_property.from_bytes(out).property_value


def _prop_set(pt, code, value):
    inp = S.hv_input_set_partition_property(property_code=code, property_value=value)
    return pt.hvcall(S.HVCALL_SET_PARTITION_PROPERTY, bytes(inp))[0]


class _Root:
    """A handle on the root partition through /dev/mshv."""

    def __init__(self, fd):
        self.fd = fd

    hvcall = Partition.hvcall


def test_property_set_then_get():
    mshv = open_mshv()
    pt = Partition(mshv)
    assert _prop_set(pt, S.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION, 1) == 0
    status, val = _prop_get(pt, S.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION)
    assert status == 0 and val == 1, (status, val)
    pt.close()
    os.close(mshv)


def test_early_property_refused_after_initialize():
    mshv = open_mshv()
    pt = Partition(mshv)
    try:
        _prop_set(pt, S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES, 1)
        raise AssertionError("an early property was set after initialize")
    except OSError as e:
        assert e.hv_status == S.HV_STATUS_INVALID_PARTITION_STATE, hex(e.hv_status)
    pt.close()
    os.close(mshv)


def test_early_property_accepted_before_initialize():
    mshv = open_mshv()
    pt = Partition(mshv, initialize=False)
    assert _prop_set(pt, S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES, 1) == 0
    ioctl(pt.fd, S.MSHV_INITIALIZE_PARTITION)
    pt.close()
    os.close(mshv)


def test_root_properties_through_dev_mshv():
    mshv = open_mshv()
    status, val = _prop_get(_Root(mshv), S.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0)
    assert status == 0 and val != 0, (status, val)
    inp = S.hv_input_get_partition_property_ex(
        property_code=S.HV_PARTITION_PROPERTY_ASSIGNABLE_SYNTHETIC_PROC_FEATURES)
    status, _r, out = _Root(mshv).hvcall(S.HVCALL_GET_PARTITION_PROPERTY_EX, bytes(inp), 64)
    assert status == 0
    os.close(mshv)


def test_dev_mshv_refuses_other_hypercalls():
    mshv = open_mshv()
    inp = S.hv_input_set_partition_property(
        property_code=S.HV_PARTITION_PROPERTY_TIME_FREEZE, property_value=1)
    expect_errno(errno.EINVAL, _Root(mshv).hvcall, S.HVCALL_SET_PARTITION_PROPERTY, bytes(inp))
    os.close(mshv)


def test_passthrough_refuses_kernel_only_calls():
    mshv = open_mshv()
    pt = Partition(mshv)
    for code in (S.HVCALL_DISPATCH_VP, S.HVCALL_DEPOSIT_MEMORY, S.HVCALL_DELETE_PARTITION, 0x7FFF):
        expect_errno(errno.EINVAL, pt.hvcall, code, bytes(32))
    pt.close()
    os.close(mshv)


def test_passthrough_targets_the_fds_partition():
    mshv = open_mshv()
    pt = Partition(mshv)
    inp = S.hv_input_set_partition_property(
        partition_id=0xDEAD, property_code=S.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION,
        property_value=1)
    assert pt.hvcall(S.HVCALL_SET_PARTITION_PROPERTY, bytes(inp))[0] == 0
    assert _prop_get(pt, S.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION) == (0, 1)
    pt.close()
    os.close(mshv)


def test_vp_registers_round_trip():
    mshv = open_mshv()
    pt = Partition(mshv)
    vp = pt.vp(0)
    want = [(S.HV_X64_REGISTER_RAX, 0x1122334455667788), (S.HV_X64_REGISTER_RIP, 0x7000),
            (S.HV_X64_REGISTER_RFLAGS, 0x202), (S.HV_X64_REGISTER_DR7, 0x400),
            (S.HV_X64_REGISTER_PAT, 0x0007040600070406), (S.HV_X64_REGISTER_EFER, 0),
            (S.HV_X64_REGISTER_XMM0, 0xAAAA, 0xBBBB)]
    status, reps = vp.set_regs(want)
    assert status == 0 and reps == len(want), (status, reps)
    status, vals = vp.get_regs([w[0] for w in want])
    assert status == 0
    for w, v in zip(want, vals):
        assert v.low == w[1] and (len(w) < 3 or v.high == w[2]), (hex(w[0]), hex(v.low))
    pt.close()
    os.close(mshv)


def test_unknown_register_is_refused():
    mshv = open_mshv()
    pt = Partition(mshv)
    vp = pt.vp(0)
    try:
        vp.get_regs([0x7FFFFFF0])
        raise AssertionError("an unknown register was read")
    except OSError as e:
        assert e.hv_status == S.HV_STATUS_INVALID_PARAMETER, hex(e.hv_status)
    pt.close()
    os.close(mshv)


def test_cpuid_intercept():
    mshv = open_mshv()
    pt = Partition(mshv)
    mem = GuestMemory(4096)
    mem.write(0, CPUID_CODE)
    pt.map(mem, 0x1000)
    inp = S.hv_input_install_intercept(access_type=S.HV_INTERCEPT_ACCESS_MASK_EXECUTE,
                                       intercept_type=S.HV_INTERCEPT_TYPE_X64_CPUID,
                                       intercept_parameter=0)
    assert pt.hvcall(S.HVCALL_INSTALL_INTERCEPT, bytes(inp))[0] == 0
    vp = pt.vp(0)
    vp.start_real_mode(0x1000, rax=0)
    msg = vp.run()
    assert msg.header.message_type == S.HVMSG_X64_CPUID_INTERCEPT, hex(msg.header.message_type)
    c = S.hv_x64_cpuid_intercept_message.from_buffer_copy(bytes(msg)[16:])
    assert c.header.rip == 0x1000 and c.rax == 0
    pt.close()
    os.close(mshv)


def test_guest_and_vmm_share_memory():
    mshv = open_mshv()
    pt = Partition(mshv)
    mem = GuestMemory(2 * 4096)
    mem.write(0, MEM_CODE)
    mem.write(0x1000, b"\x37")           # GPA 0x2000, written by the VMM
    pt.map(mem, 0x1000)
    vp = pt.vp(0)
    vp.start_real_mode(0x1000)
    msg = vp.run()
    assert msg.header.message_type == S.HVMSG_X64_IO_PORT_INTERCEPT
    io = S.hv_x64_io_port_intercept_message.from_buffer_copy(bytes(msg)[16:])
    assert io.port_number == 0x80 and io.rax & 0xFF == 0x37, hex(io.rax)
    vp.regs.rip = io.header.rip + 2
    vp.regs.dirty |= S.HV_X64_REGISTER_PAGE_DIRTY_IP
    msg = vp.run()
    assert msg.header.message_type == S.HVMSG_X64_HALT
    assert mem.read(0x1001, 1) == b"\x5a", "the guest's store is in the VMM's memory"
    pt.close()
    os.close(mshv)


def test_unmapped_gpa_intercept():
    mshv = open_mshv()
    pt = Partition(mshv)
    mem = GuestMemory(4096)
    mem.write(0, MEM_CODE)               # reads GPA 0x2000, which is not mapped
    pt.map(mem, 0x1000)
    vp = pt.vp(0)
    vp.start_real_mode(0x1000)
    msg = vp.run()
    assert msg.header.message_type == S.HVMSG_UNMAPPED_GPA, hex(msg.header.message_type)
    m = S.hv_x64_memory_intercept_message.from_buffer_copy(bytes(msg)[16:])
    assert m.guest_physical_address == 0x2000, hex(m.guest_physical_address)
    assert m.instruction_byte_count >= 3 and bytes(m.instruction_bytes[:3]) == MEM_CODE[:3]
    assert m.header.rip == 0x1000
    pt.close()
    os.close(mshv)


def test_deposits_follow_the_spec():
    mshv = open_mshv()
    before = sim_query()["calls"].get("deposit_memory", 0)
    pt = Partition(mshv)                 # initialize deposits up front
    pt.vp(0)                             # so does create_vp
    after = sim_query()
    assert after["calls"].get("deposit_memory", 0) >= before + 2, after["calls"]
    assert after["deposited_pages"] >= 208 + 90, after["deposited_pages"]
    pt.close()
    os.close(mshv)


def test_map_and_unmap_gpa_pages():
    mshv = open_mshv()
    pt = Partition(mshv)
    mem = GuestMemory(16 * 4096)
    pt.map(mem, 0x100000)
    assert sim_query()["mappings"] == 16
    pt.unmap(mem, 0x100000)
    assert sim_query()["mappings"] == 0
    pt.close()
    os.close(mshv)


def test_two_vps():
    mshv = open_mshv()
    pt = Partition(mshv)
    a, b = pt.vp(0), pt.vp(1)
    assert sim_query()["vps"] == 2
    expect_errno(errno.EEXIST, pt.vp, 1)
    del a, b
    pt.close()
    os.close(mshv)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
