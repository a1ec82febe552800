"""hvsim model: the strictness rules (issue 9, item 3). Each test shows a
refusal (or a charge) that a lenient model would not make: pool charges and
the insufficient-memory statuses, deposited-page protection, register value
checks, VP state shapes, calls that must do their work, scheduler kick forms
and the root SynIC's enable state."""

import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import Root, S, ROOT_ID, HV_BASE, seg_pack, table_pack  # noqa: E402
from model.hv import COSTS  # noqa: E402
from model import spec  # noqa: E402
from model_fixtures import root  # noqa: E402,F401 (pytest fixtures)

R = S
OK = S.HV_STATUS_SUCCESS
BADVAL = S.HV_STATUS_INVALID_REGISTER_VALUE
P = S.HV_STATUS_INVALID_PARAMETER


def parts(root):
    return root.hv.stats()["partitions"]


def create_vp_raw(root, pid, index=0):
    return root.st(S.HVCALL_CREATE_VP, S.hv_input_create_vp(partition_id=pid, vp_index=index))


def initialized(root):
    pid = root.create_partition()
    assert root.initialize(pid) == OK
    return pid


def root_free(root):
    return parts(root)[ROOT_ID]["free"]


# ---------------------------------------------------------------- pool charges
def test_initialize_with_a_short_pool_is_insufficient_memory(root):
    pid = root.create_partition()
    assert root.fast(S.HVCALL_INITIALIZE_PARTITION, pid) == S.HV_STATUS_INSUFFICIENT_MEMORY
    root.deposit(pid, root.pool_pages(COSTS["initialize_partition"]))
    assert root.fast(S.HVCALL_INITIALIZE_PARTITION, pid) == OK


def test_create_vp_charges_the_child_and_the_root(root):
    pid = initialized(root)
    # the child's pool after initialize holds 208 - 160 pages: short of 64
    assert create_vp_raw(root, pid) == S.HV_STATUS_INSUFFICIENT_MEMORY
    root.deposit(pid, root.pool_pages(COSTS["create_vp"]))
    assert root_free(root) == 0
    assert create_vp_raw(root, pid) == S.HV_STATUS_INSUFFICIENT_ROOT_MEMORY
    root.deposit(pid, root.pool_pages(1))                  # into the child: does not help
    assert create_vp_raw(root, pid) == S.HV_STATUS_INSUFFICIENT_ROOT_MEMORY
    root.deposit(ROOT_ID, root.pool_pages(COSTS["create_vp_root"]))
    assert create_vp_raw(root, pid) == OK
    assert root.hv.stats()["root_pool_used"] == COSTS["create_partition"] + COSTS["create_vp_root"]
    # deleting the VP gives the root's page back
    assert root.fast(S.HVCALL_DELETE_VP, pid, 0) == OK
    assert root.hv.stats()["root_pool_used"] == COSTS["create_partition"]
    assert root_free(root) == COSTS["create_vp_root"]


def _state_page(root, pid, t=S.HV_VP_STATE_PAGE_REGISTERS):
    return root.st(S.HVCALL_MAP_VP_STATE_PAGE,
                   S.hv_input_map_vp_state_page(partition_id=pid, vp_index=0, type=t))


def _drain(root, pid):
    """Withdraw everything free from pid's pool."""
    while root.withdraw(pid, 500)[0] == OK:
        pass
    assert parts(root)[pid]["free"] == 0


def test_map_vp_state_page_charges_the_pool(root):
    pid = root.new_guest()
    _drain(root, pid)
    assert _state_page(root, pid) == S.HV_STATUS_INSUFFICIENT_MEMORY
    root.deposit(pid, root.pool_pages(1))
    assert _state_page(root, pid) == OK
    assert parts(root)[pid]["free"] == 0
    assert _state_page(root, pid) == OK                    # the same page again: no new charge
    assert root.st(S.HVCALL_UNMAP_VP_STATE_PAGE,
                   S.hv_input_unmap_vp_state_page(partition_id=pid, vp_index=0,
                                                  type=S.HV_VP_STATE_PAGE_REGISTERS)) == OK
    assert parts(root)[pid]["free"] == 1                   # given back


def test_install_intercept_charges_the_pool_per_type(root):
    pid = root.new_guest()
    _drain(root, pid)

    def install(param):
        return root.st(S.HVCALL_INSTALL_INTERCEPT, S.hv_input_install_intercept(
            partition_id=pid, access_type=S.HV_INTERCEPT_ACCESS_MASK_EXECUTE,
            intercept_type=S.HV_INTERCEPT_TYPE_X64_CPUID, intercept_parameter=param))
    assert install(1) == S.HV_STATUS_INSUFFICIENT_MEMORY
    root.deposit(pid, root.pool_pages(1))
    assert install(1) == OK and install(2) == OK            # one table per type
    assert parts(root)[pid]["free"] == 0


def test_enabling_a_vp_synic_charges_the_pool(root):
    pid = root.new_guest()
    _drain(root, pid)
    st, done = root.call(S.HVCALL_SET_VP_REGISTERS, S.hv_input_set_vp_registers(partition_id=pid, vp_index=0),
                         b"".join(S.hv_register_assoc(name=n, value=S.hv_register_value(low=v)).to_bytes()
                                  for n, v in [(R.HV_X64_REGISTER_RAX, 1), (R.HV_REGISTER_SCONTROL, 1)]),
                         reps=2)
    assert (st, done) == (S.HV_STATUS_INSUFFICIENT_MEMORY, 1)
    root.deposit(pid, root.pool_pages(1))
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_SCONTROL, 1)])[0] == OK
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_SCONTROL, 0), (R.HV_REGISTER_SCONTROL, 1)])[0] == OK


def _set_prop(root, pid, code, value):
    return root.st(S.HVCALL_SET_PARTITION_PROPERTY,
                   S.hv_input_set_partition_property(partition_id=pid, property_code=code,
                                                     property_value=value))


def test_access_tracking_charges_the_pool(root):
    pid = root.new_guest()
    _drain(root, pid)
    T = S.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING
    assert _set_prop(root, pid, T, 1) == S.HV_STATUS_INSUFFICIENT_MEMORY
    root.deposit(pid, root.pool_pages(1))
    assert _set_prop(root, pid, T, 1) == OK
    assert _set_prop(root, pid, T, 2) == P
    assert _set_prop(root, pid, T, 0) == OK
    assert parts(root)[pid]["free"] == 1


def test_contiguous_request_needs_an_aligned_chunk(root):
    pid = initialized(root)
    root.deposit(pid, root.pool_pages(COSTS["create_vp"] + 64))
    root.deposit(ROOT_ID, root.pool_pages(4))
    root.hv.contiguous_next(S.HVCALL_CREATE_VP)
    C = S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_MEMORY
    assert create_vp_raw(root, pid) == C
    for _ in range(16):                                   # single pages never make a chunk
        root.deposit(pid, root.pool_pages(1))
    assert create_vp_raw(root, pid) == C
    start = -(-root._next_pool // 8) * 8 + 1               # consecutive but not aligned
    root._next_pool = start
    root.deposit(pid, root.pool_pages(8))
    assert create_vp_raw(root, pid) == C
    root.deposit(pid, root.pool_pages(3) + root.contiguous_pages())   # a chunk inside a mixed deposit
    assert create_vp_raw(root, pid) == C
    chunk = root.contiguous_pages()
    assert root.deposit(pid, chunk)[0] == OK
    assert create_vp_raw(root, pid) == OK
    assert set(chunk) <= set(root.hv.partitions[pid].held[("vp", 0)])
    assert create_vp_raw(root, pid, 1) == OK               # the request was for one call


def test_contiguous_root_request(root):
    pid = initialized(root)
    root.deposit(pid, root.pool_pages(COSTS["create_vp"]))
    root.hv.contiguous_next(S.HVCALL_CREATE_VP, root=True)
    assert create_vp_raw(root, pid) == S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY
    root.deposit(pid, root.contiguous_pages())            # into the child: does not help
    assert create_vp_raw(root, pid) == S.HV_STATUS_INSUFFICIENT_CONTIGUOUS_ROOT_MEMORY
    root.deposit(ROOT_ID, root.contiguous_pages())
    assert create_vp_raw(root, pid) == S.HV_STATUS_INSUFFICIENT_ROOT_MEMORY   # the chunk, then 1 more
    root.deposit(ROOT_ID, root.pool_pages(1))
    assert create_vp_raw(root, pid) == OK


def test_teardown_returns_every_charge(root):
    pid = root.new_guest(vps=2)
    root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_REGISTERS)
    root.map_state_page(pid, 1, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    root.with_deposits(pid, lambda: _set_prop(root, pid, S.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING, 1))
    assert root.set_regs(pid, 1, [(R.HV_REGISTER_SCONTROL, 1)])[0] == OK
    root.map_ram(pid, 0, 4)
    root.unmap(pid, 0, 4)
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == OK
    assert parts(root)[pid]["used"] == 0
    _drain(root, pid)
    assert root.fast(S.HVCALL_DELETE_PARTITION, pid) == OK
    assert root.hv.stats()["root_pool_used"] == 0
    assert root.hv.stats()["contract_violations"] == []


# ---------------------------------------------------------------- deposited pages
def test_root_write_into_a_deposited_page_is_a_contract_violation(root):
    pfns = root.pool_pages(3)
    assert root.deposit(ROOT_ID, pfns) == (OK, 3)
    root.ram.write((pfns[1] << 12) + 100, b"oops")
    assert root.withdraw(ROOT_ID, 3) == (OK, 3)
    v = root.hv.stats()["contract_violations"]
    assert len(v) == 1 and f"{pfns[1]:#x}" in v[0]


def test_untouched_deposits_come_back_clean(root):
    pid = root.new_guest()
    assert root.fast(S.HVCALL_FINALIZE_PARTITION, pid) == OK
    _drain(root, pid)
    assert root.hv.stats()["contract_violations"] == []


def test_frames_the_hypervisor_owns_are_refused(root):
    pid = root.new_guest()
    # reserved (overlay) range and pages already deposited
    assert root.deposit(ROOT_ID, [HV_BASE >> 12])[0] == P
    pool = root.pool_pages(1)
    assert root.deposit(pid, pool)[0] == OK
    assert root.deposit(ROOT_ID, pool)[0] == P
    # a page given as a state-page location belongs to the hypervisor
    mine = root.guest_pages(1)[0]
    inp = S.hv_input_map_vp_state_page(partition_id=pid, vp_index=0, type=S.HV_VP_STATE_PAGE_REGISTERS,
                                       requested_map_location=mine)
    inp.flags = spec.field_mask(S.hv_input_map_vp_state_page, "flags", "map_location_provided")
    assert root.with_deposits(pid, lambda: root.st(S.HVCALL_MAP_VP_STATE_PAGE, inp)) == OK
    assert root.deposit(ROOT_ID, [mine])[0] == P
    # nor can it be handed over as VP state buffers
    for frame in (mine, pool[0], HV_BASE >> 12):
        assert _vp_state(root, pid, S.HV_GET_SET_VP_STATE_LAPIC_STATE, [frame]) == P
    assert _vp_state(root, pid, S.HV_GET_SET_VP_STATE_LAPIC_STATE, root.guest_pages(1)) == OK


# ---------------------------------------------------------------- registers
BAD_VALUES = [
    (R.HV_X64_REGISTER_CR0, 1 << 32),                # reserved high half
    (R.HV_X64_REGISTER_CR0, 1 << 6),                 # reserved bit
    (R.HV_X64_REGISTER_CR0, 0x80000000),             # PG without PE
    (R.HV_X64_REGISTER_CR0, 0x20000011),             # NW without CD
    (R.HV_X64_REGISTER_CR4, 1 << 15),                # reserved
    (R.HV_X64_REGISTER_CR4, 1 << 40),
    (R.HV_X64_REGISTER_EFER, 1 << 2),                # reserved
    (R.HV_X64_REGISTER_EFER, 1 << 12),               # SVME on an Intel CPU
    (R.HV_X64_REGISTER_CR8, 16),                     # CR8 is 4 bits
    (R.HV_X64_REGISTER_CR3, 1 << 60),
    (R.HV_X64_REGISTER_RIP, 0x0000800000000000),     # not canonical
    (R.HV_X64_REGISTER_LSTAR, 0x8000000000000000),
    (R.HV_X64_REGISTER_RAX, 1 << 64),                # wider than 64 bits
    (R.HV_X64_REGISTER_RIP, 1 << 70),
    (R.HV_X64_REGISTER_RFLAGS, 0),                   # bit 1 is fixed to 1
    (R.HV_X64_REGISTER_RFLAGS, 0x2 | (1 << 3)),      # reserved
    (R.HV_X64_REGISTER_RFLAGS, 0x2 | (1 << 40)),
    (R.HV_X64_REGISTER_DR7, 0x400 | (1 << 32)),
    (R.HV_X64_REGISTER_FS, seg_pack((0x0000900000000000, 0xFFFF, 0, 0x93))),
    (R.HV_X64_REGISTER_GDTR, table_pack((0x0000800000000000, 0x27))),
]


@pytest.mark.parametrize("name,value", BAD_VALUES,
                         ids=[f"{spec.REGISTER_NAMES[n]}={v:#x}" for n, v in BAD_VALUES])
def test_invalid_register_values_are_refused(root, name, value):
    pid = root.new_guest()
    before = root.get_regs(pid, 0, [name])
    st, done = root.set_regs(pid, 0, [(R.HV_X64_REGISTER_RBX, 7), (name, value)])
    assert (st, done) == (BADVAL, 1)
    assert root.get_regs(pid, 0, [name]) == before


def test_read_only_registers_are_refused(root):
    pid = root.new_guest(vps=2)
    assert root.set_regs(pid, 1, [(R.HV_REGISTER_VP_INDEX, 0)]) == (P, 0)
    assert root.get_regs(pid, 1, [R.HV_REGISTER_VP_INDEX]) == [1]


def test_valid_register_values_are_accepted(root):
    pid = root.new_guest()
    good = [(R.HV_X64_REGISTER_CR0, 0xE005003F & ~(1 << 29)), (R.HV_X64_REGISTER_CR4, 0x6F8),
            (R.HV_X64_REGISTER_EFER, 0xD01), (R.HV_X64_REGISTER_RIP, 0xFFFF800000001000),
            (R.HV_X64_REGISTER_RFLAGS, 0x246), (R.HV_X64_REGISTER_CR8, 15),
            (R.HV_X64_REGISTER_XMM0, (1 << 127) | 5)]
    assert root.set_regs(pid, 0, good) == (OK, len(good))


# ---------------------------------------------------------------- creation flags
NO_LAPIC = (S.HV_PARTITION_CREATION_FLAG_EXO_PARTITION
            | S.HV_PARTITION_CREATION_FLAG_INTERCEPT_MESSAGE_PAGE_ENABLED)


def test_interrupts_need_the_lapic_flag(root):
    pid = root.new_guest(flags=NO_LAPIC)
    inp = S.hv_input_assert_virtual_interrupt(partition_id=pid, control=S.HV_X64_INTERRUPT_TYPE_FIXED,
                                              dest_addr=0, vector=0x30)
    st = S.HV_STATUS_INVALID_PARTITION_STATE
    assert root.st(S.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp) == st
    assert root.fast(S.HVCALL_CLEAR_VIRTUAL_INTERRUPT, pid) == st
    assert _vp_state(root, pid, S.HV_GET_SET_VP_STATE_LAPIC_STATE, root.guest_pages(1)) == st
    assert _vp_state(root, pid, S.HV_GET_SET_VP_STATE_LAPIC_STATE, root.guest_pages(1), get=True) == st
    pid = root.new_guest()
    inp.partition_id = pid
    assert root.st(S.HVCALL_ASSERT_VIRTUAL_INTERRUPT, inp) == OK


def test_intercept_message_page_needs_its_flag(root):
    pid = root.new_guest(flags=S.HV_PARTITION_CREATION_FLAG_LAPIC_ENABLED)
    assert root.with_deposits(pid, lambda: _state_page(root, pid, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)) == P
    assert root.with_deposits(pid, lambda: _state_page(root, pid, S.HV_VP_STATE_PAGE_REGISTERS)) == OK


# ---------------------------------------------------------------- VP state shapes
def _vp_state(root, pid, t, pfns, get=False, states=0, vh=None):
    cls = S.hv_input_get_vp_state if get else S.hv_input_set_vp_state
    inp = cls(partition_id=pid, vp_index=0)
    inp.state_data.type = t
    inp.state_data.xsave_states = states
    body = vh if vh is not None else struct.pack("<%dQ" % len(pfns), *pfns)
    code = S.HVCALL_GET_VP_STATE if get else S.HVCALL_SET_VP_STATE
    return root.st(code, inp, body, varhead=len(body) // 8)


def test_vp_state_page_counts_and_xsave_states(root):
    pid = root.new_guest()
    L, X = S.HV_GET_SET_VP_STATE_LAPIC_STATE, S.HV_GET_SET_VP_STATE_XSAVE
    assert _vp_state(root, pid, L, root.guest_pages(2)) == P          # LAPIC is one page
    assert _vp_state(root, pid, L, []) == P
    assert _vp_state(root, pid, L, root.guest_pages(1), states=1) == P  # xsave states on LAPIC
    x = root.guest_pages(1)
    assert _vp_state(root, pid, X, x, states=0x7) == OK
    assert _vp_state(root, pid, X, x, states=0xF) == P                 # a state the partition lacks
    assert _vp_state(root, pid, X, x, states=0x4) == P                 # without x87/SSE
    assert _vp_state(root, pid, X, root.guest_pages(2), states=0x7) == P


def test_synthetic_timer_state_must_be_whole(root):
    pid = root.new_guest()
    T = S.HV_GET_SET_VP_STATE_SYNTHETIC_TIMERS
    size = S.hv_synthetic_timers_state.SIZE
    assert _vp_state(root, pid, T, [], vh=bytes(8)) == P
    assert _vp_state(root, pid, T, [], vh=bytes(size - 8)) == P
    assert _vp_state(root, pid, T, [], vh=bytes(size)) == OK
    assert _vp_state(root, pid, T, [], get=True, vh=bytes(8)) == P
    assert _vp_state(root, pid, T, [], get=True, vh=b"") == OK


# ---------------------------------------------------------------- calls do their work
SYNIC_GFN = 0x20               # SIMP at 0x20000, SIEFP at 0x21000


def _child_synic(root, pid, vector=0x40, masked=False, simp=True, siefp=True):
    root.map_ram(pid, SYNIC_GFN, 2)
    regs = [(R.HV_REGISTER_SCONTROL, 1),
            (R.HV_REGISTER_SIMP, (SYNIC_GFN << 12) | int(simp)),
            (R.HV_REGISTER_SIEFP, ((SYNIC_GFN + 1) << 12) | int(siefp)),
            (R.HV_REGISTER_SINT0 + 3, vector | ((1 << 16) if masked else 0))]
    assert root.set_regs(pid, 0, regs)[0] == OK


def _signal(root, pid, sint=3, flag=10, vtl=0):
    st = root.st(S.HVCALL_SIGNAL_EVENT_DIRECT, S.hv_input_signal_event_direct(
        target_partition=pid, target_vp=0, target_vtl=vtl, target_sint=sint, flag_number=flag))
    return st, root.out(S.hv_output_signal_event_direct).newly_signaled


def test_signal_event_direct_sets_the_flag_and_raises_the_sint(root):
    pid = root.new_guest()
    assert _signal(root, pid)[0] == S.HV_STATUS_INVALID_SYNIC_STATE     # SynIC off
    _child_synic(root, pid)
    assert _signal(root, pid, sint=16)[0] == P
    assert _signal(root, pid, flag=2048)[0] == P
    assert _signal(root, pid, vtl=1)[0] == P
    assert _signal(root, pid) == (OK, 1)
    assert root.gread(pid, ((SYNIC_GFN + 1) << 12) + 3 * 256 + 1, 1) == bytes([1 << 2])
    assert root.hv.partitions[pid].vps[0].apic.irr >> 0x40 & 1
    assert _signal(root, pid) == (OK, 0)                                 # already set


def test_signal_event_direct_needs_siefp_enabled(root):
    pid = root.new_guest()
    _child_synic(root, pid, siefp=False)
    assert _signal(root, pid)[0] == S.HV_STATUS_INVALID_SYNIC_STATE


def _post(root, pid, mtype=0x1234, size=8, sint=3, payload=b"hello!!!"):
    m = S.hv_message()
    m.header.message_type, m.header.payload_size = mtype, size
    raw = bytearray(m.to_bytes())
    raw[16:16 + len(payload)] = payload
    inp = S.hv_input_post_message_direct(partition_id=pid, vp_index=0, sint_index=sint)
    for k, b in enumerate(raw):
        inp.message[k] = b
    return root.st(S.HVCALL_POST_MESSAGE_DIRECT, inp)


def test_post_message_direct_writes_the_slot(root):
    pid = root.new_guest()
    assert _post(root, pid) == S.HV_STATUS_INVALID_SYNIC_STATE
    _child_synic(root, pid)
    assert _post(root, pid, sint=16) == P
    assert _post(root, pid, mtype=0) == P                                # HVMSG_NONE
    assert _post(root, pid, mtype=0x80000001) == P                       # hypervisor's types
    assert _post(root, pid, size=241) == P
    assert _post(root, pid) == OK
    slot = (SYNIC_GFN << 12) + 3 * 256
    assert struct.unpack("<I", root.gread(pid, slot, 4))[0] == 0x1234
    assert root.gread(pid, slot + 16, 8) == b"hello!!!"
    assert root.hv.partitions[pid].vps[0].apic.irr >> 0x40 & 1           # the SINT is raised
    assert _post(root, pid) == S.HV_STATUS_INSUFFICIENT_BUFFERS          # slot still full


def test_post_message_direct_to_a_masked_sint_waits(root):
    pid = root.new_guest()
    _child_synic(root, pid, masked=True)
    assert _post(root, pid) == OK
    slot = (SYNIC_GFN << 12) + 3 * 256
    assert struct.unpack("<I", root.gread(pid, slot, 4))[0] == S.HVMSG_NONE   # held back
    assert not root.hv.partitions[pid].vps[0].apic.irr >> 0x40 & 1
    assert _post(root, pid) == S.HV_STATUS_INSUFFICIENT_BUFFERS          # one is waiting
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_SINT0 + 3, 0x40)])[0] == OK   # unmasked: delivered
    assert struct.unpack("<I", root.gread(pid, slot, 4))[0] == 0x1234


def test_register_intercept_result_refuses_other_types(root):
    pid = root.new_guest()
    for t in (S.HV_INTERCEPT_TYPE_X64_MSR, S.HV_INTERCEPT_TYPE_X64_IO_PORT, 0x77):
        inp = S.hv_input_register_intercept_result(partition_id=pid, vp_index=0, intercept_type=t)
        assert root.st(S.HVCALL_REGISTER_INTERCEPT_RESULT, inp) == P


def _access(root, pid, gfn, n, **flags):
    inp = S.hv_input_get_gpa_pages_access_state(partition_id=pid, hv_gpa_page_number=gfn)
    for k, v in flags.items():
        inp.flags |= spec.field_mask(S.hv_input_get_gpa_pages_access_state, "flags", k) if v else 0
    return root.call(S.HVCALL_GET_GPA_PAGES_ACCESS_STATES, inp, reps=n)[0]


def test_access_states_need_tracking_and_consistent_flags(root):
    pid = root.new_guest()
    root.map_ram(pid, 0, 4)
    assert _access(root, pid, 0, 4) == S.HV_STATUS_INVALID_PARTITION_STATE
    root.with_deposits(pid, lambda: _set_prop(root, pid, S.HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING, 1))
    assert _access(root, pid, 0, 4) == OK
    assert _access(root, pid, 0, 4, clear_dirty=1, set_dirty=1) == P
    assert _access(root, pid, 0, 4, clear_accessed=1, set_accessed=1) == P
    assert _access(root, pid, 0, 4, clear_accessed=1, set_dirty=1) == OK


# ---------------------------------------------------------------- scheduler kicks
def _kick(root, pid, vp):
    """Release a VP with EXPLICIT_SUSPEND 1 -> 0: the root scheduler kicks it."""
    assert root.set_regs(pid, vp, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 1)])[0] == OK
    assert root.set_regs(pid, vp, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 0)])[0] == OK


def _bitset(payload):
    return S.hv_vp_signal_bitset_scheduler_message.from_bytes(
        payload[:S.hv_vp_signal_bitset_scheduler_message.SIZE])


def test_bitset_kicks_name_the_vps_and_merge():
    root = Root(kick_form="bitset")
    try:
        pid = root.new_guest(vps=3)
        _kick(root, pid, 0)
        _kick(root, pid, 2)                  # a message of its own: the first one is in the slot
        t, payload, _ = root.take_message(0)
        assert t == S.HVMSG_SCHEDULER_VP_SIGNAL_BITSET
        m = _bitset(payload)
        assert (m.partition_id, m.vpset_format, m.overflow_count) == (pid, S.HV_GENERIC_SET_SPARSE_4K, 0)
        assert (m.valid_bank_mask, m.bank_contents[0], m.vp_count) == (1, 0b1, 1)
        t, payload, _ = root.take_message(0)
        m = _bitset(payload)
        assert (m.valid_bank_mask, m.bank_contents[0], m.vp_count) == (1, 0b100, 1)
        root.hv.synic_disable(0)             # hold messages: queued kicks merge
        _kick(root, pid, 1)
        _kick(root, pid, 2)
        root.hv.synic_pages(0, enable=True)
        t, payload, _ = root.take_message(0)
        m = _bitset(payload)
        assert (m.bank_contents[0], m.vp_count) == (0b110, 2)
        assert root.hv.stats()["kicks"]["bitset_merged"] == 1
    finally:
        root.close()


def test_overflow_kicks_name_no_vp():
    root = Root(kick_form="overflow")
    try:
        pid = root.new_guest(vps=2)
        _kick(root, pid, 1)
        t, payload, _ = root.take_message(0)
        m = _bitset(payload)
        assert t == S.HVMSG_SCHEDULER_VP_SIGNAL_BITSET
        assert (m.partition_id, m.overflow_count, m.valid_bank_mask, m.vp_count) == (pid, 1, 0, 0)
    finally:
        root.close()


def test_random_kick_forms_are_seeded():
    def forms(seed):
        os.environ["HVSIM_SEED"] = str(seed)
        try:
            root = Root(kick_form=None)
        finally:
            del os.environ["HVSIM_SEED"]
        try:
            pid = root.new_guest()
            out = []
            for _ in range(12):
                _kick(root, pid, 0)
                out.append(root.take_message(0)[0])
            return out, root.hv.stats()["kicks"]
        finally:
            root.close()
    a, kicks = forms(3)
    assert forms(3)[0] == a
    assert set(a) == {S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR, S.HVMSG_SCHEDULER_VP_SIGNAL_BITSET}
    assert set(kicks) == {"pair", "bitset", "overflow"}


# ---------------------------------------------------------------- root SynIC state
def test_messages_wait_until_the_root_enables_its_synic():
    root = Root()
    try:
        root.hv.synic_disable(1)
        root.hv.post_message(1, 0, root.hv._message(S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR, b"", 0))
        assert root.take_message(1) is None
        root.hv.synic_pages(1, enable=True)
        assert root.take_message(1)[0] == S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR
    finally:
        root.close()


def test_a_cpu_that_never_enabled_its_synic_gets_no_message():
    root = Root(ncpus=1)
    try:
        # CPU 1 exists for the model but its root never enabled the SynIC
        root.hv.post_message(1, 0, root.hv._message(S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR, b"", 0))
        assert root.take_message(1) is None
    finally:
        root.close()
