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


def test_failed_map_undoes_the_part_of_the_failing_call_that_was_done():
    """MapGpaPages completes 100 reps (a partial success the wrapper
    resumes), then its resumption fails: the 100 pages the failing wrapper
    call did map must be unmapped too, not just the calls before it."""
    mshv, pt = _pt()
    pins = pinned_pages()
    sim_control("rep_limit 100 map_gpa_pages")
    sim_control("fail_next map_gpa_pages HV_STATUS_INVALID_PARAMETER 2")
    try:
        mem = GuestMemory(300 * 4096)        # one batch: 100 mapped, then the failure
        expect_errno(errno.EINVAL, pt.map, mem, 0x100000)
        assert sim_query()["mappings"] == 0, "the 100 pages mapped before the failure stay mapped"
        assert pinned_pages() == pins, "and unpinned"
    finally:
        sim_control("reset")
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


# Overlap rules: regions are [guest_pfn, guest_pfn + size) in guest pages; a
# new region may touch an existing one but not share a page with it. Each
# test maps the existing region at EXISTING, tries one new region, and
# checks the simulator holds exactly the pages that were accepted.
EXISTING = 0x104000          # GPA of the existing 4-page region [0x104000, 0x108000)


def _existing(pt):
    mem = GuestMemory(4 * 4096)
    pt.map(mem, EXISTING)
    assert sim_query()["mappings"] == 4
    return mem


def _refused(pt, gpa, pages):
    """A new region of `pages` pages at `gpa` is refused with EEXIST and
    leaves the existing region as it was."""
    mem = GuestMemory(pages * 4096)
    expect_errno(errno.EEXIST, pt.map, mem, gpa)
    assert sim_query()["mappings"] == 4, "only the existing region is mapped"


def test_adjacent_regions_are_accepted():
    mshv, pt = _pt()
    _existing(pt)
    below = GuestMemory(4 * 4096)
    above = GuestMemory(4 * 4096)
    pt.map(below, EXISTING - 4 * 4096)        # ends exactly where the existing one starts
    assert sim_query()["mappings"] == 8
    pt.map(above, EXISTING + 4 * 4096)        # starts exactly where it ends
    assert sim_query()["mappings"] == 12
    _done(mshv, pt)


def test_region_inside_an_existing_one_is_refused():
    mshv, pt = _pt()
    _existing(pt)
    _refused(pt, EXISTING + 4096, 2)          # pages 1-2 of 0-3
    _done(mshv, pt)


def test_region_overlapping_the_end_is_refused():
    mshv, pt = _pt()
    _existing(pt)
    _refused(pt, EXISTING + 3 * 4096, 4)      # starts on its last page, extends past it
    _done(mshv, pt)


def test_region_overlapping_the_start_is_refused():
    mshv, pt = _pt()
    _existing(pt)
    _refused(pt, EXISTING - 3 * 4096, 4)      # starts before it, ends on its first page
    _done(mshv, pt)


def test_region_enclosing_an_existing_one_is_refused():
    mshv, pt = _pt()
    _existing(pt)
    _refused(pt, EXISTING - 4096, 6)
    _done(mshv, pt)


def test_region_with_the_same_start_is_refused():
    mshv, pt = _pt()
    _existing(pt)
    _refused(pt, EXISTING, 4)                 # the same GPA range again (other memory)
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


THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
KPF_COMPOUND_HEAD, KPF_THP = 15, 22          # /proc/kpageflags bits
PM_PRESENT = 1 << 63                          # /proc/self/pagemap
PM_PFN_MASK = (1 << 55) - 1


def _backing_pfns(addr, pages):
    """Host frame of each page of [addr, +pages*4096) (None: not present)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, 8 * pages, addr // 4096 * 8)
    finally:
        os.close(fd)
    out = []
    for i in range(pages):
        e = int.from_bytes(raw[8 * i:8 * i + 8], "little")
        out.append(e & PM_PFN_MASK if e & PM_PRESENT else None)
    return out


def _kpageflags(pfn):
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        return int.from_bytes(os.pread(fd, 8, pfn * 8), "little")
    finally:
        os.close(fd)


def _is_huge_page(addr):
    """Is the 2 MiB at addr one transparent huge page: 512 present frames,
    contiguous from a 2 MiB-aligned head frame that kpageflags marks THP?"""
    pfns = _backing_pfns(addr, 512)
    if None in pfns or pfns[0] % 512 or pfns != list(range(pfns[0], pfns[0] + 512)):
        return False
    flags = _kpageflags(pfns[0])
    return bool(flags & (1 << KPF_THP)) and bool(flags & (1 << KPF_COMPOUND_HEAD))


class HugePage:
    """2 MiB of anonymous memory, 2 MiB aligned, backed by one transparent
    huge page; the constructor fails unless it really is one. THP is
    switched from "never" to "madvise" for this if need be (and back on
    close); a fault that falls back to 4 KiB pages is collapsed with
    MADV_COLLAPSE."""

    size = MB2

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        with open(THP_ENABLED) as f:
            self.thp_was = f.read().split("[")[1].split("]")[0]
        if self.thp_was == "never":
            with open(THP_ENABLED, "w") as f:
                f.write("madvise")
        try:
            # a fragmented root may have no free 2 MiB block: compact and
            # try again a few times before calling it a failure
            for attempt in range(4):
                try:
                    self._fault_in(libc)
                    break
                except AssertionError:
                    if attempt == 3:
                        raise
                    self.raw.close()
                    with open("/proc/sys/vm/compact_memory", "w") as f:
                        f.write("1")
        except BaseException:
            self.close()
            raise

    def _fault_in(self, libc):
        self.raw = mmap.mmap(-1, 2 * MB2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.raw))
        self.addr = (base + MB2 - 1) & ~(MB2 - 1)
        ok = libc.madvise(ctypes.c_void_p(self.addr), ctypes.c_size_t(MB2), MADV_HUGEPAGE) == 0
        assert ok, f"MADV_HUGEPAGE: errno {ctypes.get_errno()}"
        ctypes.memset(self.addr, 1, MB2)             # fault it in
        if not _is_huge_page(self.addr):
            libc.madvise(ctypes.c_void_p(self.addr), ctypes.c_size_t(MB2), MADV_COLLAPSE)
        pfns = _backing_pfns(self.addr, 512)
        assert _is_huge_page(self.addr), \
            f"no transparent huge page at {self.addr:#x} (THP {self.thp_was}): first frames " \
            f"{[hex(p) if p is not None else None for p in pfns[:4]]}"

    def close(self):
        if self.thp_was == "never":
            with open(THP_ENABLED, "w") as f:
                f.write("never")


def test_two_mib_pages_use_large_mappings():
    mshv, pt = _pt(flags=1 << S.MSHV_PT_BIT_GPA_SUPER_PAGES)
    hp = HugePage()
    pt.map(hp, 0x40000000)
    q = sim_query()
    assert q["mappings"] == 512
    assert q["large_mappings"] == 1, f"expected one 2 MiB mapping: {q}"
    _done(mshv, pt)
    hp.close()


def test_huge_page_at_an_unaligned_guest_frame_maps_small():
    """A huge page backing a region whose guest address is not 2 MiB
    aligned cannot be one 2 MiB mapping: it is mapped as 4 KiB pages."""
    mshv, pt = _pt(flags=1 << S.MSHV_PT_BIT_GPA_SUPER_PAGES)
    hp = HugePage()
    pt.map(hp, 0x40000000 + 4096)
    q = sim_query()
    assert q["mappings"] == 512 and q["large_mappings"] == 0, q
    _done(mshv, pt)
    hp.close()


def test_large_pages_need_the_partition_flag():
    mshv, pt = _pt()                       # no GPA_SUPER_PAGES
    hp = HugePage()                        # a huge page the driver could map large
    pt.map(hp, 0x40000000)
    q = sim_query()
    assert q["mappings"] == 512 and q["large_mappings"] == 0, q
    _done(mshv, pt)
    hp.close()


def _track(pt):
    """Turn on GPA access tracking (as a VMM does before dirty logging):
    GetGpaPagesAccessStates is refused without it."""
    inp = S.hv_input_set_partition_property(property_code=S.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING,
                                            property_value=1)
    assert pt.hvcall(S.HVCALL_SET_PARTITION_PROPERTY, bytes(inp))[0] == 0


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
    _track(pt)
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


def test_gpap_bitmap_needs_access_tracking():
    mshv, pt = _pt()
    mem = GuestMemory(4096)
    pt.map(mem, 0)
    out = ctypes.create_string_buffer(8)
    a = S.mshv_gpap_access_bitmap(page_count=1, bitmap_ptr=ctypes.addressof(out))
    expect_errno(errno.EIO, ioctl, pt.fd, S.MSHV_GET_GPAP_ACCESS_BITMAP, a)
    _track(pt)
    ioctl(pt.fd, S.MSHV_GET_GPAP_ACCESS_BITMAP, a)
    pt.unmap(mem, 0)
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
    _track(pt)
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


def _system_ram():
    """Top-level "System RAM" ranges of /proc/iomem: [(start, end inclusive)]."""
    out = []
    with open("/proc/iomem") as f:
        for line in f:
            if not line.startswith(" ") and line.rstrip().endswith(": System RAM"):
                start, end = line.split(":")[0].strip().split("-")
                out.append((int(start, 16), int(end, 16)))
    return out


def _is_ram(addr):
    return any(s <= addr and addr + 4095 <= e for s, e in _system_ram())


def _low_ram_edge():
    """A page below 1 MiB that is not RAM followed by one that is: /dev/mem
    lets root map both (STRICT_DEVMEM allows the first MiB)."""
    for start, _end in _system_ram():
        first = (start + 4095) & ~4095
        if 4096 <= first < (1 << 20) and not _is_ram(first - 4096):
            return first - 4096
    raise AssertionError(f"no RAM below 1 MiB after a non-RAM page: {_system_ram()}")


class DevMem:
    """A /dev/mem mapping: VM_IO | VM_PFNMAP, vm_pgoff = the physical frame."""

    def __init__(self, phys, pages):
        self.fd = os.open("/dev/mem", os.O_RDWR)
        self.mm = mmap.mmap(self.fd, pages * 4096, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=phys)
        self.size = pages * 4096
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def close(self):
        os.close(self.fd)          # the mapping itself goes with the object


def test_device_mapping_of_ram_is_refused():
    edge = _low_ram_edge()
    ram = edge + 4096
    assert _is_ram(ram)
    dev = DevMem(ram, 1)
    mshv, pt = _pt()
    pins = pinned_pages()
    expect_errno(errno.EINVAL, pt.map, dev, 0xF0000000)
    assert sim_query()["mappings"] == 0
    assert pinned_pages() == pins
    _done(mshv, pt)
    dev.close()


def test_device_mapping_reaching_into_ram_is_refused():
    edge = _low_ram_edge()                 # not RAM; the next page is
    dev = DevMem(edge, 2)
    mshv, pt = _pt()

    class First:                           # the first page alone is MMIO: accepted
        size = 4096
        addr = dev.addr
    pt.map(First, 0xF0000000)
    assert sim_query()["mappings"] == 1
    pt.unmap(First, 0xF0000000)
    expect_errno(errno.EINVAL, pt.map, dev, 0xF0000000)   # both pages: contains RAM
    assert sim_query()["mappings"] == 0
    _done(mshv, pt)
    dev.close()


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
