"""One behaviour per hypercall family, seen from the VMM: partition
properties, VP registers, intercepts, memory deposits, GPA maps, VP
creation and dispatch. Runs inside the simulated root partition; TAP."""

import ctypes
import errno
import os
import sys

import mshv_spec as S
from mshvlib import (GuestMemory, Partition, expect_errno, ioctl, open_mshv, run_tests,
                     sim_control, sim_query)

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


def _deposit_policy(code):
    """(pages deposited up front, DepositMemory calls that takes) per the spec."""
    pages = S.HYPERCALLS[code]["deposit"]["initial"]
    batch = S.HYPERCALLS[S.HVCALL_DEPOSIT_MEMORY]["batch"]       # PFNs per DepositMemory
    return pages, (pages + batch - 1) // batch


def _deposit_calls(q):
    return q["calls"].get("deposit_memory", 0)


def test_deposits_follow_the_spec():
    init_pages, init_calls = _deposit_policy(S.HVCALL_INITIALIZE_PARTITION)
    vp_pages, vp_calls = _deposit_policy(S.HVCALL_CREATE_VP)
    mshv = open_mshv()
    pt = Partition(mshv, initialize=False)
    q0 = sim_query()                     # creating deposits into the root only (on demand)
    assert q0["deposited_pages"] == 0, q0["deposited_pages"]
    ioctl(pt.fd, S.MSHV_INITIALIZE_PARTITION)
    q1 = sim_query()
    assert q1["deposited_pages"] == init_pages, (q1["deposited_pages"], init_pages)
    assert _deposit_calls(q1) - _deposit_calls(q0) == init_calls
    pt.vp(0)
    q2 = sim_query()
    assert q2["deposited_pages"] == init_pages + vp_pages, (q2["deposited_pages"], vp_pages)
    # CreateVp also charges a page of the root's pool, deposited on demand
    # one page per call when the root has none free: not an up-front deposit
    root_calls = q2["root_pool_pages"] - q1["root_pool_pages"]
    assert _deposit_calls(q2) - _deposit_calls(q1) - root_calls == vp_calls
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


# -- passthrough output on failure -----------------------------------------
# MSHV_ROOT_HVCALL zeroes the output buffer (tlfs_spec/uapi.yaml): the
# out_sz bytes copied back hold what the hypervisor wrote and zeroes, never
# stale kernel memory, on failure as on success.

def _hvcall_raw(fd, code, inp, out_size, reps=0):
    """MSHV_ROOT_HVCALL with the output buffer prefilled with 0xAA; returns
    (errno or 0, the argument as written back, output bytes)."""
    inbuf = ctypes.create_string_buffer(bytes(inp), len(inp))
    outbuf = ctypes.create_string_buffer(b"\xaa" * out_size, out_size)
    a = S.mshv_root_hvcall(code=code, reps=reps, in_sz=len(inp), out_sz=out_size,
                           in_ptr=ctypes.addressof(inbuf), out_ptr=ctypes.addressof(outbuf))
    try:
        ioctl(fd, S.MSHV_ROOT_HVCALL, a)
        err = 0
    except OSError as e:
        err = e.errno
    return err, a, outbuf.raw


def _dirty_bounce_buffers(pt):
    """Free kernel memory of the bounce buffers' size class (4 KiB) full of
    a pattern: a passthrough call whose whole input page is the pattern. The
    next call's buffers are likely those very objects, so an output buffer
    the driver failed to zero comes back with the pattern (or, with slab
    poisoning, with the poison)."""
    inp = bytes(S.hv_input_get_partition_property(
        property_code=S.HV_PARTITION_PROPERTY_TIME_FREEZE))
    err, _a, _out = _hvcall_raw(pt.fd, S.HVCALL_GET_PARTITION_PROPERTY,
                                inp + b"\x5c" * (4096 - len(inp)), 4096)
    assert err == 0, errno.errorcode.get(err)


def _first_nonzero(data, start):
    for i in range(start, len(data)):
        if data[i]:
            return f"byte {i} is {data[i]:#04x} ({data[i:i + 16].hex()}...)"
    return None


def _on_one_cpu():
    """Pin this thread to one CPU (slab free lists are per CPU); returns the
    old affinity."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {os.sched_getaffinity(0).pop()})
    return old


def test_failed_passthrough_call_returns_zeroed_output():
    mshv = open_mshv()
    pt = Partition(mshv)
    inp = S.hv_input_get_partition_property(property_code=S.HV_PARTITION_PROPERTY_TIME_FREEZE)
    old = _on_one_cpu()
    try:
        _dirty_bounce_buffers(pt)
        sim_control("fail_next get_partition_property HV_STATUS_ACCESS_DENIED")
        err, a, out = _hvcall_raw(pt.fd, S.HVCALL_GET_PARTITION_PROPERTY, bytes(inp), 4096)
    finally:
        os.sched_setaffinity(0, old)
    assert err == errno.EIO, errno.errorcode.get(err)
    assert a.status == S.HV_STATUS_ACCESS_DENIED, hex(a.status)
    bad = _first_nonzero(out, 0)
    assert bad is None, f"the hypervisor wrote nothing, yet {bad}"
    pt.close()
    os.close(mshv)


def test_partly_failed_rep_call_returns_completed_reps_then_zeroes():
    mshv = open_mshv()
    pt = Partition(mshv)
    vp = pt.vp(0)
    rax = 0x1122334455667788
    assert vp.set_regs([(S.HV_X64_REGISTER_RAX, rax)]) == (0, 1)
    # rep 0 is read, rep 1 is an unknown name: the hypervisor writes rep 0's
    # value and fails with reps completed = 1; reps 2 and 3 never happen
    names = [S.HV_X64_REGISTER_RAX, 0x7FFFFFF0, S.HV_X64_REGISTER_RBX, S.HV_X64_REGISTER_RCX]
    inp = bytes(S.hv_input_get_vp_registers(vp_index=0)) + \
        b"".join(n.to_bytes(4, "little") for n in names)
    old = _on_one_cpu()
    try:
        _dirty_bounce_buffers(pt)
        err, a, out = _hvcall_raw(vp.fd, S.HVCALL_GET_VP_REGISTERS, inp, 4096, reps=len(names))
    finally:
        os.sched_setaffinity(0, old)
    assert err == errno.EINVAL, errno.errorcode.get(err)
    assert a.status == S.HV_STATUS_INVALID_PARAMETER, hex(a.status)
    assert a.reps == 1, a.reps
    v = S.hv_register_value.from_buffer_copy(out[:16])
    assert (v.low, v.high) == (rax, 0), "the completed rep's output came back"
    bad = _first_nonzero(out, 16)
    assert bad is None, f"past the completed rep {bad}"
    pt.close()
    os.close(mshv)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
