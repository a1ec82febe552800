"""Every documented ioctl error, through the real module (the generated
argument checks and the handlers' own), plus the fd and buffer hygiene a VMM
relies on. Runs inside the simulated root partition; TAP."""

import ctypes
import errno
import fcntl
import mmap
import os
import resource
import sys

import mshv_spec as S
from mshvlib import (GuestMemory, Partition, expect_errno, ioctl, open_mshv,
                     pinned_pages, run_tests, sim_control, sim_query)

BAD_PTR = 0x10          # never mapped
PAGE = 4096


def _raw(fd, req, ptr):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ioctl(fd, ctypes.c_ulong(req), ctypes.c_void_p(ptr)) == 0:
        return 0
    return ctypes.get_errno()


def test_create_partition_errors():
    mshv = open_mshv()
    for kw in (dict(pt_flags=1 << S.MSHV_PT_BIT_COUNT), dict(pt_isolation=S.MSHV_PT_ISOLATION_COUNT)):
        expect_errno(errno.EINVAL, ioctl, mshv, S.MSHV_CREATE_PARTITION, S.mshv_create_partition(**kw))
    v2 = S.mshv_create_partition_v2(pt_flags=1 << S.MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES,
                                    pt_num_cpu_fbanks=1)
    expect_errno(errno.EINVAL, ioctl, mshv, S.MSHV_CREATE_PARTITION, v2)
    v2.pt_num_cpu_fbanks = S.MSHV_NUM_CPU_FEATURES_BANKS
    v2.pt_rsvd1[0] = 1
    expect_errno(errno.EINVAL, ioctl, mshv, S.MSHV_CREATE_PARTITION, v2)
    assert _raw(mshv, S.MSHV_CREATE_PARTITION, BAD_PTR) == errno.EFAULT
    assert sim_query()["partitions"] == []
    os.close(mshv)


def test_create_partition_v2_and_cloexec():
    mshv = open_mshv()
    v2 = S.mshv_create_partition_v2(pt_flags=(1 << S.MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES) |
                                    (1 << S.MSHV_PT_BIT_LAPIC),
                                    pt_num_cpu_fbanks=S.MSHV_NUM_CPU_FEATURES_BANKS)
    v2.pt_cpu_fbanks[0] = 0
    fd = ioctl(mshv, S.MSHV_CREATE_PARTITION, v2)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:mshv_partition"
    ioctl(fd, S.MSHV_INITIALIZE_PARTITION)
    vp = ioctl(fd, S.MSHV_CREATE_VP, S.mshv_create_vp(vp_index=0))
    assert fcntl.fcntl(vp, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.readlink(f"/proc/self/fd/{vp}") == "anon_inode:mshv_vp"
    os.close(vp)
    os.close(fd)
    os.close(mshv)


def test_create_vp_errors():
    mshv = open_mshv()
    pt = Partition(mshv)
    assert _raw(pt.fd, S.MSHV_CREATE_VP, BAD_PTR) == errno.EFAULT
    expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_CREATE_VP, S.mshv_create_vp(vp_index=1000))
    pt.close()
    os.close(mshv)


def test_set_guest_memory_errors():
    mshv = open_mshv()
    pt = Partition(mshv)
    mem = GuestMemory(2 * PAGE)
    base = dict(size=PAGE, guest_pfn=0x100, userspace_addr=mem.addr, flags=0)
    for kw in (dict(size=0), dict(size=PAGE + 8), dict(userspace_addr=mem.addr + 8),
               dict(flags=1 << S.MSHV_SET_MEM_BIT_COUNT)):
        a = dict(base)
        a.update(kw)
        expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_SET_GUEST_MEMORY, S.mshv_user_mem_region(**a))
    r = S.mshv_user_mem_region(**base)
    r.rsvd[3] = 1
    expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_SET_GUEST_MEMORY, r)
    # memory that cannot be pinned (no access): -EFAULT, nothing left behind
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    addr = libc.mmap(None, PAGE, 0, 0x22, -1, 0)          # PROT_NONE, MAP_PRIVATE|ANON
    expect_errno(errno.EFAULT, ioctl, pt.fd, S.MSHV_SET_GUEST_MEMORY,
                 S.mshv_user_mem_region(size=PAGE, guest_pfn=0x200, userspace_addr=addr))
    assert sim_query()["mappings"] == 0
    assert _raw(pt.fd, S.MSHV_SET_GUEST_MEMORY, BAD_PTR) == errno.EFAULT
    pt.close()
    os.close(mshv)


def test_root_hvcall_errors():
    mshv = open_mshv()
    pt = Partition(mshv)
    inbuf = ctypes.create_string_buffer(16)
    outbuf = ctypes.create_string_buffer(8)
    good = dict(code=S.HVCALL_GET_PARTITION_PROPERTY, in_sz=16, out_sz=8,
                in_ptr=ctypes.addressof(inbuf), out_ptr=ctypes.addressof(outbuf))
    for kw in (dict(status=1), dict(in_ptr=0), dict(in_sz=PAGE + 1), dict(in_sz=4),
               dict(out_ptr=0), dict(out_sz=0), dict(reps=3), dict(code=S.HVCALL_CREATE_VP)):
        a = dict(good)
        a.update(kw)
        expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_ROOT_HVCALL, S.mshv_root_hvcall(**a))
    # 300 register values (4800 bytes) cannot come back in one output page:
    # refused before any hypercall (the hypervisor would write past the page)
    # (out_sz may be smaller: only out_sz bytes are copied back, but the
    # hypervisor writes all 300 values)
    names = ctypes.create_string_buffer(16 + 4 * 300)
    out = ctypes.create_string_buffer(4800)
    for out_sz in (4800, 16):
        before = sim_query()["calls"].get("get_vp_registers", 0)
        expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_ROOT_HVCALL, S.mshv_root_hvcall(
            code=S.HVCALL_GET_VP_REGISTERS, reps=300, in_sz=16 + 4 * 300, out_sz=out_sz,
            in_ptr=ctypes.addressof(names), out_ptr=ctypes.addressof(out)))
        assert sim_query()["calls"].get("get_vp_registers", 0) == before, \
            f"out_sz {out_sz}: the call reached the hypervisor"
    a = S.mshv_root_hvcall(**good)
    a.rsvd[2] = 1
    expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_ROOT_HVCALL, a)
    a = dict(good)
    a["in_ptr"] = BAD_PTR
    expect_errno(errno.EFAULT, ioctl, pt.fd, S.MSHV_ROOT_HVCALL, S.mshv_root_hvcall(**a))
    pt.close()
    os.close(mshv)


def test_root_hvcall_zeroes_what_the_hypervisor_does_not_write():
    mshv = open_mshv()
    pt = Partition(mshv)
    inp = S.hv_input_get_partition_property(property_code=S.HV_PARTITION_PROPERTY_TIME_FREEZE)
    inbuf = ctypes.create_string_buffer(bytes(inp), 16)
    outbuf = ctypes.create_string_buffer(b"\xaa" * 256, 256)
    a = S.mshv_root_hvcall(code=S.HVCALL_GET_PARTITION_PROPERTY, in_sz=16, out_sz=256,
                           in_ptr=ctypes.addressof(inbuf), out_ptr=ctypes.addressof(outbuf))
    ioctl(pt.fd, S.MSHV_ROOT_HVCALL, a)
    assert a.status == 0
    assert outbuf.raw[8:256] == bytes(248), "no stale bytes past the hypervisor's output"
    pt.close()
    os.close(mshv)


def test_root_hvcall_deposits_and_retries():
    mshv = open_mshv()
    pt = Partition(mshv)
    vp = pt.vp(0)
    before = sim_query()["calls"].get("deposit_memory", 0)
    sim_control("insufficient_memory_once set_vp_registers")
    status, reps = vp.set_regs([(S.HV_X64_REGISTER_RAX, 5)])
    assert status == 0 and reps == 1
    assert sim_query()["calls"]["deposit_memory"] == before + 1
    pt.close()
    os.close(mshv)


def _status_count(name):
    return sim_query()["statuses"].get(name, 0)


def test_create_vp_deposits_contiguous_memory():
    """CreateVp that needs physically contiguous pages: the driver answers
    INSUFFICIENT_CONTIGUOUS_MEMORY with one contiguous chunk (single pages
    never satisfy it), and the chunk is withdrawn page by page at teardown."""
    mshv = open_mshv()
    pt = Partition(mshv)
    before = _status_count("HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY")
    deposits = sim_query()["calls"].get("deposit_memory", 0)
    sim_control("contiguous_next create_vp")
    try:
        vp = pt.vp(0)
        vp.set_regs([(S.HV_X64_REGISTER_RAX, 1)])
        assert _status_count("HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY") == before + 1
        # the up-front deposit, then one chunk (not thousands of single pages)
        assert sim_query()["calls"]["deposit_memory"] <= deposits + 3
    finally:
        sim_control("reset")            # an unsatisfied request must not outlive the test
        pt.close()
        os.close(mshv)


def test_create_vp_deposits_contiguous_root_memory():
    mshv = open_mshv()
    pt = Partition(mshv)
    before = _status_count("HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY")
    sim_control("contiguous_next create_vp root")
    try:
        pt.vp(0)
        assert _status_count("HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY") == before + 1
    finally:
        sim_control("reset")
        pt.close()
        os.close(mshv)


def test_create_vp_deposits_into_the_root_on_insufficient_root_memory():
    """Every VP costs a page of the root's pool: once the root's free pages
    are used up, CreateVp answers INSUFFICIENT_ROOT_MEMORY and the driver
    deposits into the root, not into the child."""
    mshv = open_mshv()
    pt = Partition(mshv)
    q = sim_query()
    before = _status_count("HV_STATUS_INSUFFICIENT_ROOT_MEMORY")
    spare = q["root_pool_pages"] - q["root_pool_used"]
    vps = [pt.vp(i) for i in range(spare + 1)]
    assert len(vps) == spare + 1
    assert _status_count("HV_STATUS_INSUFFICIENT_ROOT_MEMORY") >= before + 1
    pt.close()
    os.close(mshv)


def test_async_property_set_is_waited_for():
    mshv = open_mshv()
    pt = Partition(mshv)
    code = S.HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION
    sim_control("async_next set_partition_property")
    inp = S.hv_input_set_partition_property(property_code=code, property_value=1)
    status, _r, _o = pt.hvcall(S.HVCALL_SET_PARTITION_PROPERTY, bytes(inp))
    assert status == 0, "the final status, not CALL_PENDING"
    # a failing asynchronous call reports its real status
    sim_control("async_next set_partition_property")
    bad = S.hv_input_set_partition_property(property_code=0x7FFFFFF0, property_value=1)
    try:
        pt.hvcall(S.HVCALL_SET_PARTITION_PROPERTY, bytes(bad))
        raise AssertionError("an unknown property was set")
    except OSError as e:
        assert e.hv_status == S.HV_STATUS_UNKNOWN_PROPERTY, hex(e.hv_status)
    # and a VP fd may not start one
    vp = pt.vp(0)
    expect_errno(errno.EINVAL, vp.hvcall, S.HVCALL_SET_PARTITION_PROPERTY, bytes(inp))
    pt.close()
    os.close(mshv)


def test_failed_initialize_gives_its_pages_back():
    mshv = open_mshv()
    pt = Partition(mshv, initialize=False)
    sim_control("fail_next initialize_partition HV_STATUS_OPERATION_FAILED")
    expect_errno(errno.EIO, ioctl, pt.fd, S.MSHV_INITIALIZE_PARTITION)
    assert sim_query()["deposited_pages"] == 0, "the 208 pages were withdrawn"
    ioctl(pt.fd, S.MSHV_INITIALIZE_PARTITION)             # and it can try again
    pt.close()
    os.close(mshv)


def test_vp_state_errors():
    mshv = open_mshv()
    pt = Partition(mshv)
    vp = pt.vp(0)
    buf = mmap.mmap(-1, PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    for kw in (dict(type=S.MSHV_VP_STATE_COUNT), dict(buf_ptr=addr + 8), dict(buf_sz=100),
               dict(buf_ptr=0)):
        a = dict(type=S.MSHV_VP_STATE_LAPIC, buf_sz=PAGE, buf_ptr=addr)
        a.update(kw)
        for req in (S.MSHV_GET_VP_STATE, S.MSHV_SET_VP_STATE):
            expect_errno(errno.EINVAL, ioctl, vp.fd, req, S.mshv_get_set_vp_state(**a))
    a = S.mshv_get_set_vp_state(type=S.MSHV_VP_STATE_LAPIC, buf_sz=PAGE, buf_ptr=addr)
    a.rsvd[0] = 1
    expect_errno(errno.EINVAL, ioctl, vp.fd, S.MSHV_GET_VP_STATE, a)
    expect_errno(errno.EFAULT, ioctl, vp.fd, S.MSHV_GET_VP_STATE,
                 S.mshv_get_set_vp_state(type=S.MSHV_VP_STATE_LAPIC, buf_sz=PAGE, buf_ptr=PAGE))
    assert _raw(vp.fd, S.MSHV_RUN_VP, BAD_PTR) in (errno.EFAULT, errno.EINTR)
    pt.close()
    os.close(mshv)


# -- resource exhaustion -------------------------------------------------

class _NoFreeFd:
    """Within: RLIMIT_NOFILE is lowered and every fd below it is in use, so
    the next fd the process gets fails with EMFILE. Restored on exit."""

    def __enter__(self):
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, self.limit[1]))
        self.fds = []
        try:
            while True:
                self.fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            if e.errno != errno.EMFILE:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc):
        for fd in self.fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limit)


def test_create_partition_without_a_free_fd_is_emfile():
    mshv = open_mshv()
    with _NoFreeFd():
        expect_errno(errno.EMFILE, ioctl, mshv, S.MSHV_CREATE_PARTITION, S.mshv_create_partition())
    q = sim_query()
    assert q["partitions"] == [], f"the failed create left partition(s) {q['partitions']}"
    os.close(mshv)


def test_create_vp_without_a_free_fd_is_emfile():
    mshv = open_mshv()
    pt = Partition(mshv)
    with _NoFreeFd():
        expect_errno(errno.EMFILE, ioctl, pt.fd, S.MSHV_CREATE_VP, S.mshv_create_vp(vp_index=0))
    assert sim_query()["vps"] == 0, "the VP the hypervisor created was not deleted again"
    pt.vp(0)                        # index 0 is free again, in the driver and the hypervisor
    assert sim_query()["vps"] == 1
    pt.close()
    os.close(mshv)


def test_initialize_is_enomem_when_memory_cannot_be_deposited():
    mshv = open_mshv()
    pt = Partition(mshv, initialize=False)
    before = sim_query()["calls"]
    sim_control("fail_next deposit_memory HV_STATUS_INSUFFICIENT_MEMORY")
    expect_errno(errno.ENOMEM, ioctl, pt.fd, S.MSHV_INITIALIZE_PARTITION)
    q = sim_query()
    assert q["deposited_pages"] == 0, f"{q['deposited_pages']} pages left deposited"
    assert q["calls"].get("initialize_partition", 0) == before.get("initialize_partition", 0), \
        "InitializePartition was issued without its deposit"
    ioctl(pt.fd, S.MSHV_INITIALIZE_PARTITION)             # not initialized yet: it can try again
    pt.close()
    os.close(mshv)


# Page counts of regions whose page array (8 bytes a page) the root cannot
# allocate: just under kvmalloc's INT_MAX limit, just over it (kvmalloc
# WARNs there unless told not to), and far beyond (vmalloc's turn).
HUGE_REGION_PAGES = ((2**31 - 1) // 8, 2**31 // 8 + 1, 2**36)


def test_region_too_large_for_kernel_memory_is_enomem():
    """The VMM chooses the size: a page array the kernel cannot allocate is
    ENOMEM, quietly (no WARN, no allocation-failure splat), and nothing of
    the region stays behind."""
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024            # MemTotal
    mshv = open_mshv()
    pt = Partition(mshv)
    mem = GuestMemory(PAGE)
    pins = pinned_pages()
    for pages in HUGE_REGION_PAGES:
        assert pages * 8 > total, f"the root has {total} bytes of RAM"
        expect_errno(errno.ENOMEM, pt.map, mem, 0x100000, pages * PAGE)
        assert sim_query()["mappings"] == 0
        assert pinned_pages() == pins
    pt.map(mem, 0x100000)                  # nothing of it stayed behind: the GPA range is free
    pt.close()
    os.close(mshv)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
