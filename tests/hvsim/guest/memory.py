"""Guest memory (MSHV_SET_GUEST_MEMORY) as a VMM sees it: mapping, retries,
failures that undo themselves, overlap rules, large pages. Runs inside the
simulated root partition; TAP."""

import ctypes
import errno
import mmap
import os
import sys

import mshv_spec as S
from mshvlib import (GuestMemory, Partition, expect_errno, ioctl, open_mshv, pinned_pages, run_tests,
                     sim_control, sim_query)

MB2 = 2 << 20


def _pt(flags=0):
    mshv = open_mshv()
    return mshv, Partition(mshv, flags=flags)


def _done(mshv, pt):
    pt.close()
    os.close(mshv)


def test_map_retries_after_insufficient_memory():
    mshv, pt = _pt()
    before = sim_query()["calls"].get("deposit_memory", 0)
    sim_control("insufficient_memory_once map_gpa_pages")
    mem = GuestMemory(8 * 4096)
    pt.map(mem, 0x10000)
    q = sim_query()
    assert q["mappings"] == 8
    assert q["calls"]["deposit_memory"] == before + 1, "one deposit of 256 pages, then the retry"
    _done(mshv, pt)


def test_failed_map_undoes_what_it_mapped():
    mshv, pt = _pt()
    pins = pinned_pages()
    sim_control("fail_next map_gpa_pages HV_STATUS_INVALID_PARAMETER 2")
    mem = GuestMemory(600 * 4096)        # two MapGpaPages calls: 509 + 91
    expect_errno(errno.EINVAL, pt.map, mem, 0x100000)
    assert sim_query()["mappings"] == 0, "the first 509 pages were unmapped again"
    assert pinned_pages() == pins, "and unpinned"
    _done(mshv, pt)


def test_map_resumes_partial_rep_completion():
    mshv, pt = _pt()
    sim_control("rep_limit 100 map_gpa_pages")
    try:
        mem = GuestMemory(300 * 4096)
        pt.map(mem, 0x100000)
        assert sim_query()["mappings"] == 300
    finally:
        sim_control("reset")
        sim_control("rep_limit 0")
    _done(mshv, pt)


def test_overlapping_regions_are_refused():
    mshv, pt = _pt()
    a = GuestMemory(4 * 4096)
    big = GuestMemory(16 * 4096)
    pt.map(a, 0x104000)
    expect_errno(errno.EEXIST, pt.map, a, 0x106000, 4 * 4096)             # overlaps the end
    expect_errno(errno.EEXIST, pt.map, big, 0x100000)                      # encloses it
    pt.map(big, 0x200000)                                                  # elsewhere: fine
    _done(mshv, pt)


def test_unmap_needs_an_exact_match():
    mshv, pt = _pt()
    mem = GuestMemory(4 * 4096)
    pt.map(mem, 0x100000)
    expect_errno(errno.EINVAL, pt.unmap, mem, 0x100000, 2 * 4096)
    expect_errno(errno.EINVAL, pt.unmap, mem, 0x101000, 4 * 4096)
    pt.unmap(mem, 0x100000)
    expect_errno(errno.EINVAL, pt.unmap, mem, 0x100000)
    _done(mshv, pt)


def test_memory_without_a_vma_is_refused():
    mshv, pt = _pt()
    mem = GuestMemory(4096)
    addr = mem.addr
    mem.mm.close()
    expect_errno(errno.EINVAL, pt.map, mem, 0x100000, 4096, None, addr)
    _done(mshv, pt)


def test_two_mib_pages_use_large_mappings():
    mshv, pt = _pt(flags=1 << S.MSHV_PT_BIT_GPA_SUPER_PAGES)
    # 4 MiB aligned to 2 MiB, asked for transparent huge pages
    raw = mmap.mmap(-1, 3 * MB2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = (base + MB2 - 1) & ~(MB2 - 1)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(MB2), 14) == 0  # MADV_HUGEPAGE
    ctypes.memset(start, 1, MB2)        # fault it in (as one huge page when THP allows)

    class M:
        size = MB2
        addr = start
    pt.map(M, 0x40000000)
    q = sim_query()
    assert q["mappings"] == 512
    assert q["large_mappings"] == 1, f"expected one 2 MiB mapping: {q}"
    pt.close()
    os.close(mshv)


def test_large_pages_need_the_partition_flag():
    mshv, pt = _pt()                       # no GPA_SUPER_PAGES
    raw = mmap.mmap(-1, 3 * MB2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = (base + MB2 - 1) & ~(MB2 - 1)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(MB2), 14)
    ctypes.memset(start, 1, MB2)

    class M:
        size = MB2
        addr = start
    pt.map(M, 0x40000000)
    q = sim_query()
    assert q["mappings"] == 512 and q["large_mappings"] == 0, q
    pt.close()
    os.close(mshv)


def _bitmap(pt, base_gfn, count, kind, op):
    out = ctypes.create_string_buffer((count + 7) // 8 + 8)
    ctypes.memset(out, 0xEE, len(out))            # stale bytes must be overwritten
    a = S.mshv_gpap_access_bitmap(access_type=kind, access_op=op, page_count=count,
                                  gpap_base=base_gfn, bitmap_ptr=ctypes.addressof(out))
    ioctl(pt.fd, S.MSHV_GET_GPAP_ACCESS_BITMAP, a)
    return out.raw[:(count + 7) // 8], out.raw[(count + 7) // 8:]


def test_gpap_bitmap_read_clear_and_set():
    mshv, pt = _pt()
    mem = GuestMemory(13 * 4096)
    pt.map(mem, 0x100000)
    base = 0x100000 // 4096
    A, D = S.MSHV_GPAP_ACCESS_TYPE_ACCESSED, S.MSHV_GPAP_ACCESS_TYPE_DIRTY
    bits, tail = _bitmap(pt, base, 13, D, S.MSHV_GPAP_ACCESS_OP_NOOP)
    assert bits == b"\xff\x1f", bits.hex()                      # 13 pages, unused bits zero
    assert tail == b"\xee" * 8, "nothing written past the bitmap"
    assert _bitmap(pt, base, 13, D, S.MSHV_GPAP_ACCESS_OP_NOOP)[0] == b"\xff\x1f", "NOOP keeps bits"
    _bitmap(pt, base, 13, D, S.MSHV_GPAP_ACCESS_OP_CLEAR)
    assert _bitmap(pt, base, 13, D, S.MSHV_GPAP_ACCESS_OP_NOOP)[0] == b"\x00\x00"
    assert _bitmap(pt, base, 13, A, S.MSHV_GPAP_ACCESS_OP_NOOP)[0] == b"\xff\x1f", \
        "clearing dirty leaves accessed"
    _bitmap(pt, base + 8, 2, D, S.MSHV_GPAP_ACCESS_OP_SET)
    assert _bitmap(pt, base, 13, D, S.MSHV_GPAP_ACCESS_OP_NOOP)[0] == b"\x00\x03"
    _bitmap(pt, base, 13, A, S.MSHV_GPAP_ACCESS_OP_CLEAR)
    assert _bitmap(pt, base, 13, D, S.MSHV_GPAP_ACCESS_OP_NOOP)[0] == b"\x00\x00", \
        "clearing accessed clears dirty too"
    assert _bitmap(pt, base + 13, 3, A, S.MSHV_GPAP_ACCESS_OP_NOOP)[0] == b"\x00", "unmapped pages"
    _done(mshv, pt)


def test_gpap_bitmap_argument_errors():
    mshv, pt = _pt()
    out = ctypes.create_string_buffer(8)
    for kw in (dict(access_type=2), dict(access_op=3), dict(page_count=0), dict(bitmap_ptr=0)):
        a = dict(access_type=0, access_op=0, page_count=1, gpap_base=0,
                 bitmap_ptr=ctypes.addressof(out))
        a.update(kw)
        expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_GET_GPAP_ACCESS_BITMAP,
                     S.mshv_gpap_access_bitmap(**a))
    a = S.mshv_gpap_access_bitmap(page_count=1, bitmap_ptr=ctypes.addressof(out))
    a.rsvd[5] = 1
    expect_errno(errno.EINVAL, ioctl, pt.fd, S.MSHV_GET_GPAP_ACCESS_BITMAP, a)
    mem = GuestMemory(4096)
    pt.map(mem, 0)
    expect_errno(errno.EFAULT, ioctl, pt.fd, S.MSHV_GET_GPAP_ACCESS_BITMAP,
                 S.mshv_gpap_access_bitmap(page_count=1, bitmap_ptr=8))
    _done(mshv, pt)


def _mmio_bar():
    """(resource file, bus address) of a PCI memory BAR in the root."""
    import glob
    for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
        with open(f"{dev}/resource") as f:
            for n, line in enumerate(f):
                start, end, flags = (int(x, 16) for x in line.split())
                if flags & 0x200 and end - start + 1 >= 4096 and os.path.exists(f"{dev}/resource{n}"):
                    return f"{dev}/resource{n}", start
    raise AssertionError("no PCI memory BAR in the root to map")


def test_mmio_region_is_mapped_uncached_without_pinning():
    path, _bus = _mmio_bar()
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    bar = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mshv, pt = _pt()
    pins = pinned_pages()

    class M:
        size = 4096
        addr = ctypes.addressof(ctypes.c_char.from_buffer(bar))
    pt.map(M, 0xF0000000)
    assert sim_query()["mappings"] == 1
    assert pinned_pages() == pins, "MMIO is not pinned"
    pt.unmap(M, 0xF0000000)
    assert sim_query()["mappings"] == 0
    del M
    _done(mshv, pt)
    bar.close()
    os.close(fd)


def test_mmio_region_must_fit_its_mapping():
    path, _bus = _mmio_bar()
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    bar = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mshv, pt = _pt()

    class M:
        size = 2 * 4096                  # one page past the device mapping
        addr = ctypes.addressof(ctypes.c_char.from_buffer(bar))
    expect_errno(errno.EINVAL, pt.map, M, 0xF0000000)
    del M
    _done(mshv, pt)
    bar.close()
    os.close(fd)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
