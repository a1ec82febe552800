"""hvsim model: hypercall decoding and Hyper-V-like input checking."""

import os
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import Root, S, ROOT_ID, IN_GPA, OUT_GPA, make_control, result_status, result_reps  # noqa: E402
from model_fixtures import root  # noqa: E402,F401 (pytest fixtures)


def test_unknown_code(root):
    assert result_status(root.hv.hypercall(0, make_control(0x7FFF), IN_GPA, OUT_GPA)) == \
        S.HV_STATUS_INVALID_HYPERCALL_CODE


@pytest.mark.parametrize("bit", [27, 30, 44, 47, 60, 63])
def test_reserved_control_bits(root, bit):
    ctl = make_control(S.HVCALL_GET_PARTITION_ID) | (1 << bit)
    assert result_status(root.hv.hypercall(0, ctl, IN_GPA, OUT_GPA)) == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_rep_count_zero_on_rep_call(root):
    assert root.st(S.HVCALL_DEPOSIT_MEMORY, S.hv_input_deposit_memory(partition_id=ROOT_ID), reps=0) == \
        S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_rep_count_on_simple_call(root):
    assert root.st(S.HVCALL_GET_PARTITION_ID, reps=1) == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_rep_start_not_below_count(root):
    st = root.st(S.HVCALL_DEPOSIT_MEMORY, S.hv_input_deposit_memory(partition_id=ROOT_ID),
                 struct.pack("<2Q", 0x100, 0x101), reps=2, start=2)
    assert st == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_varhead_on_call_without_one(root):
    assert root.st(S.HVCALL_GET_PARTITION_ID, varhead=1) == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_fast_on_memory_only_call(root):
    r = root.hv.hypercall_fast(0, make_control(S.HVCALL_CREATE_VP, fast=True), 1, 0)
    assert result_status(r) == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_fast_bit_must_match_calling_form(root):
    # memory-form entry point with the fast bit set
    r = root.hv.hypercall(0, make_control(S.HVCALL_INITIALIZE_PARTITION, fast=True), IN_GPA, OUT_GPA)
    assert result_status(r) == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_input_gpa_misaligned(root):
    inp = S.hv_input_get_partition_property(partition_id=ROOT_ID,
                                            property_code=S.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0)
    assert root.st(S.HVCALL_GET_PARTITION_PROPERTY, inp, in_gpa=IN_GPA + 4) == S.HV_STATUS_INVALID_ALIGNMENT


def test_output_gpa_misaligned(root):
    assert root.st(S.HVCALL_GET_PARTITION_ID, out_gpa=OUT_GPA + 2) == S.HV_STATUS_INVALID_ALIGNMENT


def test_rep_list_crossing_page(root):
    # header 8 bytes at page offset 4096-16: two u64 elements cross into the next page
    pfns = struct.pack("<2Q", 0x100, 0x101)
    st = root.st(S.HVCALL_DEPOSIT_MEMORY, S.hv_input_deposit_memory(partition_id=ROOT_ID), pfns,
                 reps=2, in_gpa=IN_GPA + 4096 - 16)
    assert st == S.HV_STATUS_INVALID_ALIGNMENT
    assert root.hv.stats()["partitions"][ROOT_ID]["deposited"] == 0


def test_output_crossing_page(root):
    st = root.st(S.HVCALL_GET_PARTITION_PROPERTY_EX,
                 S.hv_input_get_partition_property_ex(partition_id=ROOT_ID,
                                                      property_code=S.HV_PARTITION_PROPERTY_VMM_CAPABILITIES),
                 out_gpa=OUT_GPA + 64)
    assert st == S.HV_STATUS_INVALID_ALIGNMENT


def test_mbz_field(root):
    inp = S.hv_input_get_partition_property(partition_id=ROOT_ID,
                                            property_code=S.HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0, rsvd0=1)
    assert root.st(S.HVCALL_GET_PARTITION_PROPERTY, inp) == S.HV_STATUS_INVALID_PARAMETER


def test_mbz_bit_range(root):
    inp = S.hv_input_create_partition()
    inp.proximity_domain_info.flags = 1 << 5      # flags.rsvd
    assert root.st(S.HVCALL_CREATE_PARTITION, inp) == S.HV_STATUS_INVALID_PARAMETER


def test_unknown_partition(root):
    assert root.fast(S.HVCALL_INITIALIZE_PARTITION, 0x9999) == S.HV_STATUS_INVALID_PARTITION_ID


def test_root_is_not_a_child(root):
    assert root.fast(S.HVCALL_INITIALIZE_PARTITION, ROOT_ID) == S.HV_STATUS_INVALID_PARTITION_ID


def test_unknown_vp(root):
    pid = root.new_guest()
    assert root.st(S.HVCALL_GET_VP_REGISTERS, S.hv_input_get_vp_registers(partition_id=pid, vp_index=5),
                   struct.pack("<I", S.HV_X64_REGISTER_RIP), reps=1) == S.HV_STATUS_INVALID_VP_INDEX


def test_get_partition_id(root):
    assert root.st(S.HVCALL_GET_PARTITION_ID) == S.HV_STATUS_SUCCESS
    assert root.out(S.hv_output_partition_id).partition_id == ROOT_ID != 0


@pytest.mark.parametrize("mode,expect", [("root", "HV_SCHEDULER_TYPE_ROOT"), ("core", "HV_SCHEDULER_TYPE_CORE_SMT")])
def test_scheduler_type(mode, expect):
    r = Root(scheduler=mode)
    inp = S.hv_input_get_system_property(property_id=S.HV_SYSTEM_PROPERTY_SCHEDULER_TYPE)
    assert r.st(S.HVCALL_GET_SYSTEM_PROPERTY, inp) == S.HV_STATUS_SUCCESS
    assert r.out(S.hv_output_get_system_property).value == getattr(S, expect)


def test_rep_limit_returns_absolute_reps_and_resumes(root):
    root.hv.set_rep_limit(3, S.HVCALL_DEPOSIT_MEMORY)
    pfns = root.pool_pages(8)
    st, done = root.deposit(ROOT_ID, pfns)
    assert (st, done) == (S.HV_STATUS_SUCCESS, 3)
    st, done = root.deposit(ROOT_ID, pfns, start=done)
    assert (st, done) == (S.HV_STATUS_SUCCESS, 6)         # absolute, not relative
    st, done = root.deposit(ROOT_ID, pfns, start=done)
    assert (st, done) == (S.HV_STATUS_SUCCESS, 8)
    assert root.hv.stats()["partitions"][ROOT_ID]["free"] == 8


def test_fail_next_nth(root):
    root.hv.fail_next(S.HVCALL_GET_PARTITION_ID, S.HV_STATUS_ACCESS_DENIED, nth=2)
    assert root.st(S.HVCALL_GET_PARTITION_ID) == S.HV_STATUS_SUCCESS
    assert root.st(S.HVCALL_GET_PARTITION_ID) == S.HV_STATUS_ACCESS_DENIED
    assert root.st(S.HVCALL_GET_PARTITION_ID) == S.HV_STATUS_SUCCESS


def test_insufficient_memory_once_and_reset(root):
    root.hv.insufficient_memory_once(S.HVCALL_GET_PARTITION_ID)
    root.hv.delay(S.HVCALL_GET_PARTITION_ID, 0.05)
    t = time.monotonic()
    assert root.st(S.HVCALL_GET_PARTITION_ID) == S.HV_STATUS_INSUFFICIENT_MEMORY
    assert time.monotonic() - t >= 0.05
    root.hv.reset_faults()
    assert root.st(S.HVCALL_GET_PARTITION_ID) == S.HV_STATUS_SUCCESS


def test_log_and_stats(root):
    root.st(S.HVCALL_GET_PARTITION_ID)
    root.hv.hypercall(0, make_control(0x7FFF), IN_GPA, OUT_GPA)
    assert "get_partition_id" in root.hv.log[-2] and "HV_STATUS_SUCCESS" in root.hv.log[-2]
    assert "HV_STATUS_INVALID_HYPERCALL_CODE" in root.hv.log[-1]
    st = root.hv.stats()
    assert st["calls"]["get_partition_id"] == 1
    assert "partition 0x1" in root.hv.report()
