"""hvsim model: memory pools, partition state machine, properties, GPA maps."""

import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import Root, S, ROOT_ID, HV_BASE, seg_pack  # noqa: E402
from model.hv import COSTS  # noqa: E402
from model_fixtures import root  # noqa: E402,F401 (pytest fixtures)


def parts(root):
    return root.hv.stats()["partitions"]


# ---------------------------------------------------------------- deposit / withdraw
def test_deposit_and_withdraw_round_trip(root):
    pfns = root.pool_pages(5)
    assert root.deposit(ROOT_ID, pfns) == (S.HV_STATUS_SUCCESS, 5)
    assert parts(root)[ROOT_ID]["free"] == 5
    st, done = root.withdraw(ROOT_ID, 3)
    assert (st, done) == (S.HV_STATUS_SUCCESS, 3)
    got = root.out_u64s(3)
    assert set(got) <= set(pfns)
    st, done = root.withdraw(ROOT_ID, 8)      # only 2 left: Linux stops on NO_RESOURCES
    assert (st, done) == (S.HV_STATUS_NO_RESOURCES, 2)
    assert set(got + root.out_u64s(2)) == set(pfns)
    assert root.withdraw(ROOT_ID, 1) == (S.HV_STATUS_NO_RESOURCES, 0)


@pytest.mark.parametrize("what", ["reserved", "outside", "twice", "mapped"])
def test_deposit_rejects_bad_pages(root, what):
    if what == "reserved":
        pfn = HV_BASE >> 12
    elif what == "outside":
        pfn = (root.ram.size >> 12) + 10
    elif what == "twice":
        pfn = root.pool_pages(1)[0]
        assert root.deposit(ROOT_ID, [pfn])[0] == S.HV_STATUS_SUCCESS
    else:
        pid = root.new_guest()
        pfn = root.map_ram(pid, 0, 1)[0]
    good = root.pool_pages(1)[0]
    st, done = root.deposit(ROOT_ID, [good, pfn])
    assert (st, done) == (S.HV_STATUS_INVALID_PARAMETER, 1)


def test_create_partition_charges_root_pool(root):
    inp = S.hv_input_create_partition(flags=S.HV_PARTITION_CREATION_FLAG_EXO_PARTITION)
    assert root.st(S.HVCALL_CREATE_PARTITION, inp) == S.HV_STATUS_INSUFFICIENT_MEMORY
    root.deposit(ROOT_ID, root.pool_pages(COSTS["create_partition"]))
    assert root.st(S.HVCALL_CREATE_PARTITION, inp) == S.HV_STATUS_SUCCESS
    assert parts(root)[ROOT_ID]["free"] == 0


def test_normal_path_fits_driver_deposits(root):
    pid = root.create_partition()
    assert root.initialize(pid) == S.HV_STATUS_SUCCESS      # 208 deposited first
    assert root.create_vp(pid, 0) == S.HV_STATUS_SUCCESS   # 90 deposited first
    p = parts(root)[pid]
    assert p["deposited"] == 298 and p["used"] == COSTS["initialize_partition"] + COSTS["create_vp"]


def test_initialize_insufficient_memory(root):
    pid = root.create_partition()
    root.deposit(pid, root.pool_pages(COSTS["initialize_partition"] - 1))
    assert root.fast(S.HVCALL_INITIALIZE_PARTITION, pid) == S.HV_STATUS_INSUFFICIENT_MEMORY
    root.deposit(pid, root.pool_pages(1))
    assert root.fast(S.HVCALL_INITIALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS


# ---------------------------------------------------------------- state machine
def test_create_vp_before_initialize(root):
    pid = root.create_partition()
    root.deposit(pid, root.pool_pages(90))
    assert root.st(S.HVCALL_CREATE_VP, S.hv_input_create_vp(partition_id=pid)) == \
        S.HV_STATUS_INVALID_PARTITION_STATE


def test_initialize_twice(root):
    pid = root.new_guest(vps=0)
    assert root.fast(S.HVCALL_INITIALIZE_PARTITION, pid) == S.HV_STATUS_INVALID_PARTITION_STATE


def test_early_property_only_before_initialize(root):
    pid = root.create_partition()
    inp = S.hv_input_set_partition_property(partition_id=pid,
                                            property_code=S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES,
                                            property_value=0x1234)
    assert root.st(S.HVCALL_SET_PARTITION_PROPERTY, inp) == S.HV_STATUS_SUCCESS
    assert root.initialize(pid) == S.HV_STATUS_SUCCESS
    assert root.st(S.HVCALL_SET_PARTITION_PROPERTY, inp) == S.HV_STATUS_INVALID_PARTITION_STATE
    g = S.hv_input_get_partition_property(partition_id=pid,
                                          property_code=S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES)
    assert root.st(S.HVCALL_GET_PARTITION_PROPERTY, g) == S.HV_STATUS_SUCCESS
    assert root.out(S.hv_output_get_partition_property).property_value == 0x1234


def test_only_withdraw_and_delete_after_finalize(root):
    pid = root.new_guest()
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    assert root.st(S.HVCALL_CREATE_VP, S.hv_input_create_vp(partition_id=pid, vp_index=1)) == \
        S.HV_STATUS_INVALID_PARTITION_STATE
    assert root.map(pid, 0, root.guest_pages(1))[0] == S.HV_STATUS_INVALID_PARTITION_STATE
    g = S.hv_input_get_partition_property(partition_id=pid,
                                          property_code=S.HV_PARTITION_PROPERTY_TIME_FREEZE)
    assert root.st(S.HVCALL_GET_PARTITION_PROPERTY, g) == S.HV_STATUS_INVALID_PARTITION_STATE
    assert root.deposit(pid, root.pool_pages(1))[0] == S.HV_STATUS_INVALID_PARTITION_STATE
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_INVALID_PARTITION_STATE


def test_delete_needs_finalize_and_empty_pool(root):
    pid = root.new_guest()
    root.map_ram(pid, 0, 4)
    assert root.fast(S.HVCALL_DELETE_PARTITION, pid) == S.HV_STATUS_INVALID_PARTITION_STATE
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    assert parts(root)[pid]["used"] == 0 and parts(root)[pid]["vps"] == []
    assert root.fast(S.HVCALL_DELETE_PARTITION, pid) == S.HV_STATUS_INVALID_PARTITION_STATE
    total = parts(root)[pid]["deposited"]
    st, done = root.withdraw(pid, 512)
    assert (st, done) == (S.HV_STATUS_NO_RESOURCES, total)
    assert root.fast(S.HVCALL_DELETE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    assert pid not in root.hv.stats()["live"]
    # root pages come back: the partition's and its VP's
    assert parts(root)[ROOT_ID]["free"] == COSTS["create_partition"] + COSTS["create_vp_root"]


def test_delete_created_partition_without_finalize(root):
    pid = root.create_partition()          # the driver's create-failure path
    assert root.fast(S.HVCALL_DELETE_PARTITION, pid) == S.HV_STATUS_SUCCESS


# ---------------------------------------------------------------- properties
def test_root_properties_for_vmms(root):
    for code in (S.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0, S.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1,
                 S.HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH, S.HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE,
                 S.HV_PARTITION_PROPERTY_XSAVE_STATES):
        inp = S.hv_input_get_partition_property(partition_id=ROOT_ID, property_code=code)
        assert root.st(S.HVCALL_GET_PARTITION_PROPERTY, inp) == S.HV_STATUS_SUCCESS
    for code in (S.HV_PARTITION_PROPERTY_ASSIGNABLE_SYNTHETIC_PROC_FEATURES,
                 S.HV_PARTITION_PROPERTY_VMM_CAPABILITIES):
        inp = S.hv_input_get_partition_property_ex(partition_id=ROOT_ID, property_code=code)
        assert root.st(S.HVCALL_GET_PARTITION_PROPERTY_EX, inp) == S.HV_STATUS_SUCCESS
        assert root.out(S.hv_output_get_partition_property_ex).value[0] == 1   # bank count


def test_unknown_property(root):
    inp = S.hv_input_get_partition_property(partition_id=ROOT_ID, property_code=0x00BB0000)
    assert root.st(S.HVCALL_GET_PARTITION_PROPERTY, inp) == S.HV_STATUS_UNKNOWN_PROPERTY


# ---------------------------------------------------------------- GPA maps
def test_map_and_alias_both_ways(root):
    pid = root.new_guest()
    pfns = root.map_ram(pid, 0x10, 2)
    root.ram.write((pfns[1] << 12) + 8, b"root->guest")
    assert root.gread(pid, 0x11008, 11) == b"root->guest"
    root.gwrite(pid, 0x10010, b"guest->root")
    assert root.ram.read((pfns[0] << 12) + 0x10, 11) == b"guest->root"
    assert root.hv.stats()["mappings"][pid] == 2


def test_map_overlap_refused(root):
    pid = root.new_guest()
    root.map_ram(pid, 0x10, 4)
    st, done = root.map(pid, 0x12, root.guest_pages(4))
    assert (st, done) == (S.HV_STATUS_INVALID_PARAMETER, 0)


def test_map_rejects_deposited_and_reserved_pages(root):
    pid = root.new_guest()
    assert root.map(pid, 0, [HV_BASE >> 12])[0] == S.HV_STATUS_INVALID_PARAMETER
    dep = root.pool_pages(1)
    root.deposit(ROOT_ID, dep)
    assert root.map(pid, 0, dep)[0] == S.HV_STATUS_INVALID_PARAMETER


def test_mmio_map_may_target_non_ram(root):
    pid = root.new_guest()
    flags = S.HV_MAP_GPA_READABLE | S.HV_MAP_GPA_WRITABLE | S.HV_MAP_GPA_NOT_CACHED
    assert root.map(pid, 0xFEC00, [0xFEC00], flags)[0] == S.HV_STATUS_SUCCESS
    assert root.map(pid, 0xFED00, [0xFED00])[0] == S.HV_STATUS_INVALID_PARAMETER


def test_map_charges_page_table_pages_and_unmap_returns_them(root):
    pid = root.new_guest()
    free0 = parts(root)[pid]["free"]
    root.map_ram(pid, 0, 4)                       # 1 page (2 MiB region) + 1 (1 GiB region)
    assert parts(root)[pid]["free"] == free0 - 2
    root.map_ram(pid, 512, 1)                     # new 2 MiB region, same 1 GiB region
    assert parts(root)[pid]["free"] == free0 - 3
    assert root.unmap(pid, 0, 4) == (S.HV_STATUS_SUCCESS, 4)
    assert parts(root)[pid]["free"] == free0 - 2
    assert root.unmap(pid, 512, 1)[0] == S.HV_STATUS_SUCCESS
    assert parts(root)[pid]["free"] == free0


def test_map_insufficient_memory_resumes(root):
    pid = root.new_guest()
    st, done = root.withdraw(pid, 512)
    assert st == S.HV_STATUS_NO_RESOURCES
    pfns = root.guest_pages(3)
    flags = S.HV_MAP_GPA_READABLE
    inp = S.hv_input_map_gpa_pages(target_partition_id=pid, target_gpa_base=0, map_flags=flags)
    st, done = root.call(S.HVCALL_MAP_GPA_PAGES, inp, struct.pack("<3Q", *pfns), reps=3)
    assert (st, done) == (S.HV_STATUS_INSUFFICIENT_MEMORY, 0)
    root.deposit(pid, root.pool_pages(2))
    assert root.call(S.HVCALL_MAP_GPA_PAGES, inp, struct.pack("<3Q", *pfns), reps=3) == (S.HV_STATUS_SUCCESS, 3)


def test_large_page_map_and_unmap(root):
    pid = root.new_guest()
    pfns = root.guest_pages(1024, align=512)
    st, done = root.map(pid, 1024, [pfns[0], pfns[512]], large=True)
    assert (st, done) == (S.HV_STATUS_SUCCESS, 2)
    s = root.hv.stats()
    assert s["large_mappings"] == 2 and s["partitions"][pid]["mapped_pages"] == 1024
    root.ram.write((pfns[700] << 12), b"big")
    assert root.gread(pid, (1024 + 700) << 12, 3) == b"big"
    assert root.unmap(pid, 1024, 2, large=True) == (S.HV_STATUS_SUCCESS, 2)
    assert root.hv.stats()["large_mappings"] == 0


@pytest.mark.parametrize("gfn,off", [(1000, 0), (1024, 1)])
def test_large_page_alignment(root, gfn, off):
    pid = root.new_guest()
    pfns = root.guest_pages(512, align=512)
    assert root.map(pid, gfn, [pfns[0] + off], large=True)[0] == S.HV_STATUS_INVALID_PARAMETER


def test_large_page_needs_super_pages_flag(root):
    pid = root.new_guest(flags=S.HV_PARTITION_CREATION_FLAG_EXO_PARTITION)
    pfns = root.guest_pages(512, align=512)
    assert root.map(pid, 0, [pfns[0]], large=True)[0] == S.HV_STATUS_INVALID_PARAMETER


def test_unmap_unmapped(root):
    pid = root.new_guest()
    root.map_ram(pid, 0, 2)
    assert root.unmap(pid, 0, 3) == (S.HV_STATUS_INVALID_PARAMETER, 2)


# ---------------------------------------------------------------- teardown order
def test_finalize_with_mappings_drops_them_and_is_recorded(root):
    """Hyper-V drops a partition's GPA mappings at finalize; the model does
    too, and records the finalize as a violation of the driver's own
    teardown order (unmap, then unpin, then finalize)."""
    pid = root.new_guest(vps=0)
    root.map_ram(pid, 0x100, 3)
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    st = root.hv.stats()
    assert st["mappings"][pid] == 0
    assert st["contract_violations"] == [
        f"FinalizePartition of {pid:#x} with 3 GPA pages still mapped "
        "(the root did not unmap them first)"]


def test_finalize_after_unmapping_is_not_recorded(root):
    pid = root.new_guest(vps=0)
    root.map_ram(pid, 0x100, 3)
    assert root.unmap(pid, 0x100, 3)[0] == S.HV_STATUS_SUCCESS
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == S.HV_STATUS_SUCCESS
    assert root.hv.stats()["contract_violations"] == []
    assert root.hv.stats()["root_pool_used"] == 2, "the partition still exists: its cost stays"
