"""hvsim model: the Hyper-V platform a guest sees (platform.py, the LAPIC
timer in apic.py): hypervisor CPUID leaves, synthetic MSRs, the hypercall
page, the reference counter and TSC page, synthetic timers, the LAPIC timer,
guest hypercalls, and a long-mode guest program that uses all of them."""

import os
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import S  # noqa: E402
from model.spec import make_control, result_status, result_reps  # noqa: E402
from model import apic as A  # noqa: E402
from model import platform as PL  # noqa: E402
from model.cpu import Engine  # noqa: E402
from model_fixtures import root, core  # noqa: E402,F401 (pytest fixtures)

R = S
F = S.ENUMS["hv_partition_synthetic_proc_feature"]
CH_FEATURES = PL.DEFAULT_SYNTHETIC_FEATURES       # what Cloud Hypervisor / mshv-ioctls assign


def feat(*names):
    v = 0
    for n in names:
        v |= F["HV_SYNTHETIC_PROC_FEATURE_" + n]
    return v


BASIC = feat("HYPERVISOR_PRESENT", "HV1")


def new_guest(root, features=None, vps=1, ram_pages=64):
    """A child partition with `features` as SYNTHETIC_PROC_FEATURES (set
    before InitializePartition, as a VMM does) and RAM at GPA 0."""
    pid = root.create_partition()
    if features is not None:
        inp = S.hv_input_set_partition_property(partition_id=pid,
                                                property_code=S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES,
                                                property_value=features)
        assert root.st(S.HVCALL_SET_PARTITION_PROPERTY, inp) == S.HV_STATUS_SUCCESS
    assert root.initialize(pid) == S.HV_STATUS_SUCCESS
    for i in range(vps):
        assert root.create_vp(pid, i) == S.HV_STATUS_SUCCESS
    if ram_pages:
        root.map_ram(pid, 0, ram_pages)
    return pid


def vpo(root, pid, vp=0):
    return root.hv.partitions[pid].vps[vp]


def msr(root, pid, index, value=None, vp=0):
    """A guest RDMSR (value None) or WRMSR as the engine issues it: the verdict."""
    hv = root.hv
    with hv._lock:
        r = hv.platform.msr_locked(vpo(root, pid, vp), index, value is not None, value or 0)
    hv._flush_notify()
    return r


def rd(root, pid, index, vp=0):
    verdict, v = msr(root, pid, index, vp=vp)
    assert verdict == "emulate", (hex(index), verdict, v)
    return v


def wr(root, pid, index, value, vp=0):
    verdict, v = msr(root, pid, index, value, vp=vp)
    assert verdict == "emulate", (hex(index), verdict, v)


def is_gp(r):
    return r == ("exception", {"vector": 13, "error_code": 0})


def cpuid(root, pid, leaf, vp=0):
    return root.hv.cpuid_value(vpo(root, pid, vp), leaf, 0)


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


# ================================================================ CPUID
@pytest.fixture
def no_flush(monkeypatch):
    """The engine as it is: no cross-thread TLB flush."""
    monkeypatch.delattr(Engine, "flush_tlb", raising=False)


@pytest.fixture
def flushes(monkeypatch):
    """An engine with Engine.flush_tlb(): records the VPs it flushed."""
    done = []
    monkeypatch.setattr(Engine, "flush_tlb", lambda self: done.append(self.vp.index), raising=False)
    return done


def test_cpuid_leaves_follow_the_vmm_features(root, no_flush):
    pid = new_guest(root, CH_FEATURES, ram_pages=0)
    a, b, c, d = cpuid(root, pid, S.HYPERV_CPUID_VENDOR_AND_MAX_FUNCTIONS)
    assert struct.pack("<3I", b, c, d) == b"Microsoft Hv" and a == 0x4000000A
    assert cpuid(root, pid, S.HYPERV_CPUID_INTERFACE)[0] == S.HV_CPUID_INTERFACE_SIGNATURE_HV1
    assert cpuid(root, pid, 1)[2] & (1 << 31)                         # hypervisor present
    assert cpuid(root, pid, 1)[2] & (1 << 24)                         # TSC deadline
    eax, ebx, ecx, edx = cpuid(root, pid, S.HYPERV_CPUID_FEATURES)
    want = (S.HV_PARTITION_PRIVILEGE_ACCESS_PARTITION_REFERENCE_COUNTER | S.HV_PARTITION_PRIVILEGE_ACCESS_SYNIC_REGS
            | S.HV_PARTITION_PRIVILEGE_ACCESS_SYNTHETIC_TIMER_REGS | S.HV_PARTITION_PRIVILEGE_ACCESS_INTR_CTRL_REGS
            | S.HV_PARTITION_PRIVILEGE_ACCESS_HYPERCALL_MSRS | S.HV_PARTITION_PRIVILEGE_ACCESS_VP_INDEX
            | S.HV_PARTITION_PRIVILEGE_ACCESS_PARTITION_REFERENCE_TSC
            | S.HV_PARTITION_PRIVILEGE_ACCESS_FREQUENCY_REGS)
    assert eax == want, hex(eax)              # guest idle is assigned but not implemented: not offered
    assert ebx == 0 and ecx == 0              # no partition-management or port privileges for a guest
    assert edx == S.HV_FEATURE_FREQUENCY_MSRS_AVAILABLE | S.HV_STIMER_DIRECT_MODE_AVAILABLE
    hints, spin, _, _ = cpuid(root, pid, S.HYPERV_CPUID_ENLIGHTMENT_INFO)
    assert hints & S.HV_X64_CLUSTER_IPI_RECOMMENDED
    assert not hints & S.HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED      # the engine cannot flush another VP
    assert hints & S.HV_X64_APIC_ACCESS_RECOMMENDED and hints & S.HV_DEPRECATING_AEOI_RECOMMENDED
    assert not hints & S.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED and spin == 0xFFFFFFFF
    assert cpuid(root, pid, S.HYPERV_CPUID_IMPLEMENT_LIMITS)[:2] == (256, root.hv.ncpus)
    assert cpuid(root, pid, S.HYPERV_CPUID_HARDWARE_FEATURES)[0] & S.HV_X64_SLAT_IN_USE
    assert cpuid(root, pid, 0x4000000B) == (0, 0, 0, 0)


def test_cpuid_a_reduced_feature_set(root):
    pid = new_guest(root, BASIC | feat("ACCESS_PARTITION_REFERENCE_COUNTER", "EXTENDED_PROCESSOR_MASKS",
                                       "SIGNAL_EVENTS", "ENLIGHTENED_VMCS"), ram_pages=0)
    eax, ebx, _, edx = cpuid(root, pid, S.HYPERV_CPUID_FEATURES)
    assert eax == S.HV_PARTITION_PRIVILEGE_ACCESS_PARTITION_REFERENCE_COUNTER
    assert ebx == 0                           # SIGNAL_EVENTS: not implemented, so not offered
    assert edx == 0
    hints = cpuid(root, pid, S.HYPERV_CPUID_ENLIGHTMENT_INFO)[0]
    assert not hints & (S.HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED | S.HV_X64_CLUSTER_IPI_RECOMMENDED)
    assert not hints & S.HV_X64_APIC_ACCESS_RECOMMENDED
    # ... and what is not advertised is absent
    for m in (S.HV_X64_MSR_HYPERCALL, S.HV_X64_MSR_GUEST_OS_ID, S.HV_X64_MSR_VP_INDEX, S.HV_X64_MSR_SCONTROL,
              S.HV_X64_MSR_STIMER0_CONFIG, S.HV_X64_MSR_REFERENCE_TSC, S.HV_X64_MSR_TSC_FREQUENCY,
              S.HV_X64_MSR_VP_ASSIST_PAGE):
        assert is_gp(msr(root, pid, m)), hex(m)
    assert rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT) >= 0


def test_cpuid_without_features_shows_no_hypervisor(root):
    pid = new_guest(root, 0, ram_pages=0)
    assert not cpuid(root, pid, 1)[2] & (1 << 31)
    for leaf in range(0x40000000, 0x4000000B):
        assert cpuid(root, pid, leaf) == (0, 0, 0, 0)
    pid2 = new_guest(root, feat("HYPERVISOR_PRESENT"), ram_pages=0)    # no Hv#1
    assert cpuid(root, pid2, 0x40000000)[0] == S.HYPERV_CPUID_INTERFACE
    assert cpuid(root, pid2, S.HYPERV_CPUID_INTERFACE)[0] == 0
    assert cpuid(root, pid2, S.HYPERV_CPUID_FEATURES) == (0, 0, 0, 0)


def test_vmm_sees_the_default_features_and_cpuid_through_get_vp_cpuid_values(root):
    pid = new_guest(root, ram_pages=0)
    inp = S.hv_input_get_partition_property(partition_id=pid,
                                            property_code=S.HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES)
    assert root.st(S.HVCALL_GET_PARTITION_PROPERTY, inp) == S.HV_STATUS_SUCCESS
    assert root.out(S.hv_output_get_partition_property).property_value == CH_FEATURES
    assert cpuid(root, pid, S.HYPERV_CPUID_FEATURES)[0] & S.HV_PARTITION_PRIVILEGE_ACCESS_HYPERCALL_MSRS


# ================================================================ MSRs
def test_synthetic_msr_access_rules(root):
    pid = new_guest(root, CH_FEATURES, vps=2)
    assert rd(root, pid, S.HV_X64_MSR_VP_INDEX, vp=1) == 1
    assert is_gp(msr(root, pid, S.HV_X64_MSR_VP_INDEX, 5))             # read-only
    assert is_gp(msr(root, pid, S.HV_X64_MSR_TIME_REF_COUNT, 5))
    assert is_gp(msr(root, pid, S.HV_X64_MSR_TSC_FREQUENCY, 5))
    assert is_gp(msr(root, pid, S.HV_X64_MSR_SVERSION, 5))
    assert rd(root, pid, S.HV_X64_MSR_SVERSION) == S.HV_SYNIC_VERSION_1
    assert rd(root, pid, S.HV_X64_MSR_TSC_FREQUENCY) == root.hv.tsc_hz
    assert rd(root, pid, S.HV_X64_MSR_APIC_FREQUENCY) == root.hv.apic_hz
    for m in (S.HV_X64_MSR_RESET, S.HV_X64_MSR_GUEST_IDLE, S.HV_X64_MSR_CRASH_CTL, S.HV_X64_MSR_SIRBP,
              S.HV_X64_MSR_VP_RUNTIME, S.HV_X64_MSR_TSC_INVARIANT_CONTROL, 0x40000050):
        assert is_gp(msr(root, pid, m)), hex(m)                       # not advertised
    # SINTs: masked at reset; an unmasked vector below 16 is refused
    assert rd(root, pid, S.HV_X64_MSR_SINT3) & (1 << 16)
    assert is_gp(msr(root, pid, S.HV_X64_MSR_SINT3, 0x0F))
    wr(root, pid, S.HV_X64_MSR_SINT3, 0x50)
    assert rd(root, pid, S.HV_X64_MSR_SINT3) == 0x50
    # per VP: VP 1's SINT3 is untouched
    assert rd(root, pid, S.HV_X64_MSR_SINT3, vp=1) & (1 << 16)


def test_vp_runtime_when_advertised(root):
    pid = new_guest(root, BASIC | feat("ACCESS_VP_RUN_TIME_REG"), ram_pages=0)
    a = rd(root, pid, S.HV_X64_MSR_VP_RUNTIME)
    time.sleep(0.01)
    assert rd(root, pid, S.HV_X64_MSR_VP_RUNTIME) >= a + 50000
    assert cpuid(root, pid, S.HYPERV_CPUID_FEATURES)[0] == S.HV_PARTITION_PRIVILEGE_ACCESS_VP_RUNTIME_REG


def test_hypercall_page(root):
    pid = new_guest(root, CH_FEATURES)
    root.gwrite(pid, 0x20000, b"\x90" * 4096)
    wr(root, pid, S.HV_X64_MSR_HYPERCALL, 0x20001)
    assert rd(root, pid, S.HV_X64_MSR_HYPERCALL) == 0x20000            # enable stays 0 without an OS id
    assert root.gread(pid, 0x20000, 4) == b"\x90" * 4
    wr(root, pid, S.HV_X64_MSR_GUEST_OS_ID, 0x8100000000060C00)
    wr(root, pid, S.HV_X64_MSR_HYPERCALL, 0x20001)
    assert rd(root, pid, S.HV_X64_MSR_HYPERCALL) == 0x20001
    page = root.gread(pid, 0x20000, 4096)
    assert page[:4] == bytes.fromhex("0f01c1c3") and set(page[4:]) == {0xCC}    # vmcall; ret
    # partition-wide: VP 0's write shows on every VP
    # zeroing the OS id disables the page; the guest's own bytes come back
    wr(root, pid, S.HV_X64_MSR_GUEST_OS_ID, 0)
    assert rd(root, pid, S.HV_X64_MSR_HYPERCALL) == 0x20000
    assert root.gread(pid, 0x20000, 4) == b"\x90" * 4
    assert is_gp(msr(root, pid, S.HV_X64_MSR_HYPERCALL, (1 << 46) | 1))     # beyond the GPA width
    # locked: later writes change nothing
    wr(root, pid, S.HV_X64_MSR_GUEST_OS_ID, 1)
    wr(root, pid, S.HV_X64_MSR_HYPERCALL, 0x20003)
    wr(root, pid, S.HV_X64_MSR_HYPERCALL, 0x30001)
    assert rd(root, pid, S.HV_X64_MSR_HYPERCALL) == 0x20003


def test_vmm_reaches_the_synthetic_msrs_as_registers(root):
    pid = new_guest(root, CH_FEATURES)
    ok = S.HV_STATUS_SUCCESS
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_GUEST_OS_ID, 0x8100000000060C00),
                                  (R.HV_X64_REGISTER_HYPERCALL, 0x20001)])[0] == ok
    assert rd(root, pid, S.HV_X64_MSR_HYPERCALL) == 0x20001                  # the guest sees it
    assert root.gread(pid, 0x20000, 3) == bytes.fromhex("0f01c1")
    wr(root, pid, S.HV_X64_MSR_STIMER1_CONFIG, cfg(direct_mode=1, apic_vector=0x42))
    wr(root, pid, S.HV_X64_MSR_SINT5, 0x55)
    got = root.get_regs(pid, 0, [R.HV_REGISTER_STIMER1_CONFIG, R.HV_REGISTER_SINT5, R.HV_REGISTER_SVERSION,
                                 R.HV_REGISTER_TIME_REF_COUNT])
    assert got[:3] == [cfg(direct_mode=1, apic_vector=0x42), 0x55, S.HV_SYNIC_VERSION_1] and got[3] > 0
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_STIMER0_CONFIG, 1 << 13)])[0] == S.HV_STATUS_INVALID_PARAMETER
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_TIME_REF_COUNT, 5)])[0] == S.HV_STATUS_INVALID_PARAMETER
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_SINT0, 0x10000)])[0] == ok
    assert rd(root, pid, S.HV_X64_MSR_SINT0) == 0x10000


# ================================================================ time
def test_reference_counter_and_tsc_page(root):
    pid = new_guest(root, CH_FEATURES)
    hv = root.hv
    a = rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT)
    time.sleep(0.02)
    b = rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT)
    assert 190000 <= b - a <= 2000000                     # 100 ns units: 20 ms is 200000
    wr(root, pid, S.HV_X64_MSR_REFERENCE_TSC, 0x21001)
    assert rd(root, pid, S.HV_X64_MSR_REFERENCE_TSC) == 0x21001
    pg = S.hv_reference_tsc_page.from_bytes(root.gread(pid, 0x21000, 4096))
    assert pg.tsc_sequence != 0 and not pg.mbz_violations()
    assert pg.tsc_scale == (10_000_000 << 64) // hv.tsc_hz

    def page_time(tsc):
        return ((tsc * pg.tsc_scale) >> 64) + pg.tsc_offset
    # the model's TSC and the MSR agree
    for _ in range(3):
        m0 = rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT)
        t = page_time(hv.platform.clock.tsc())
        m1 = rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT)
        assert m0 - 2 <= t <= m1 + 2, (m0, t, m1)
    # ... and the engine's RDTSC is that TSC
    eng = hv._engine(vpo(root, pid))
    assert eng.tsc_hz == hv.tsc_hz
    for _ in range(3):
        a = hv.platform.guest_tsc(hv.partitions[pid])
        e = eng.tsc()
        b = hv.platform.guest_tsc(hv.partitions[pid])
        assert a <= e <= b
    # a partition whose TSC counts from its own base: page and MSR still agree
    pid2 = new_guest(root, CH_FEATURES)
    hv.partitions[pid2].tsc_base_ns = time.monotonic_ns() - 5_000_000_000
    wr(root, pid2, S.HV_X64_MSR_REFERENCE_TSC, 0x21001)
    pg2 = S.hv_reference_tsc_page.from_bytes(root.gread(pid2, 0x21000, 4096))
    eng2 = hv._engine(vpo(root, pid2))
    m0 = rd(root, pid2, S.HV_X64_MSR_TIME_REF_COUNT)
    t = ((eng2.tsc() * pg2.tsc_scale) >> 64) + pg2.tsc_offset
    m1 = rd(root, pid2, S.HV_X64_MSR_TIME_REF_COUNT)
    assert m0 - 2 <= t <= m1 + 2 and eng2.tsc() < 6 * hv.tsc_hz
    # re-enabling bumps the sequence
    wr(root, pid, S.HV_X64_MSR_REFERENCE_TSC, 0x21001)
    assert S.hv_reference_tsc_page.from_bytes(root.gread(pid, 0x21000, 4096)).tsc_sequence == pg.tsc_sequence + 1


def test_tsc_register_is_the_guest_tsc(root):
    pid = new_guest(root, ram_pages=0)
    clock = root.hv.platform.clock
    a = clock.tsc()
    v = root.get_regs(pid, 0, [R.HV_X64_REGISTER_TSC])[0]
    b = clock.tsc()
    assert a <= v <= b
    time.sleep(0.01)
    w = root.get_regs(pid, 0, [R.HV_X64_REGISTER_TSC])[0]
    assert 0.009 * root.hv.tsc_hz <= w - v <= 0.2 * root.hv.tsc_hz


# ================================================================ synthetic timers
CFG = S.hv_stimer_config


def cfg(**bits):
    v = 0
    for k, x in bits.items():
        lsb, w, _ = CFG.BITS["value"][k]
        v |= x << lsb
    return v


def test_stimer_direct_one_shot(root):
    pid = new_guest(root, CH_FEATURES)
    vp = vpo(root, pid)
    wr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, cfg(direct_mode=1, apic_vector=0x42, auto_enable=1))
    assert not rd(root, pid, S.HV_X64_MSR_STIMER0_CONFIG) & 1
    now = rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT)
    wr(root, pid, S.HV_X64_MSR_STIMER0_COUNT, now + 500000)           # 50 ms: auto-enables
    assert rd(root, pid, S.HV_X64_MSR_STIMER0_CONFIG) & 1
    assert 0x42 not in vp.apic.vectors()
    wait_for(lambda: 0x42 in vp.apic.vectors())
    assert rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT) >= now + 500000     # never early
    assert not rd(root, pid, S.HV_X64_MSR_STIMER0_CONFIG) & 1             # a one-shot disables itself
    assert vp.plat.stimers[0].fired == 1
    # a count in the past expires at once
    wr(root, pid, S.HV_X64_MSR_STIMER1_CONFIG, cfg(direct_mode=1, apic_vector=0x43, auto_enable=1))
    wr(root, pid, S.HV_X64_MSR_STIMER1_COUNT, 1)
    wait_for(lambda: 0x43 in vp.apic.vectors(), 1)


def test_stimer_periodic_and_disable(root):
    pid = new_guest(root, CH_FEATURES)
    vp = vpo(root, pid)
    t = vp.plat.stimers[2]
    wr(root, pid, S.HV_X64_MSR_STIMER2_COUNT, 20000)                  # 2 ms period
    wr(root, pid, S.HV_X64_MSR_STIMER2_CONFIG, cfg(enable=1, periodic=1, direct_mode=1, apic_vector=0x44))
    wait_for(lambda: t.fired >= 5)
    assert rd(root, pid, S.HV_X64_MSR_STIMER2_CONFIG) & 1                 # periodic stays enabled
    wr(root, pid, S.HV_X64_MSR_STIMER2_COUNT, 0)                          # zero count stops it
    assert not rd(root, pid, S.HV_X64_MSR_STIMER2_CONFIG) & 1
    n = t.fired
    time.sleep(0.02)
    assert t.fired == n and root.hv.platform.timers.pending() == 0


def test_stimer_config_checks(root):
    pid = new_guest(root, CH_FEATURES)
    assert is_gp(msr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, 1 << 13))     # reserved
    assert is_gp(msr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, 1 << 40))
    # message mode with SINT 0 is disabled at once
    wr(root, pid, S.HV_X64_MSR_STIMER0_COUNT, 1 << 40)
    wr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, cfg(enable=1, sintx=0))
    assert not rd(root, pid, S.HV_X64_MSR_STIMER0_CONFIG) & 1
    # direct mode needs DIRECT_SYNTHETIC_TIMERS
    pid2 = new_guest(root, CH_FEATURES & ~feat("DIRECT_SYNTHETIC_TIMERS"))
    assert not cpuid(root, pid2, S.HYPERV_CPUID_FEATURES)[3] & S.HV_STIMER_DIRECT_MODE_AVAILABLE
    assert is_gp(msr(root, pid2, S.HV_X64_MSR_STIMER0_CONFIG, cfg(direct_mode=1, apic_vector=0x40)))


SIMP_GPA, SINT = 0x30000, 2


def synic_on(root, pid, vector=0x50, vp=0):
    wr(root, pid, S.HV_X64_MSR_SIMP, SIMP_GPA | 1, vp=vp)
    wr(root, pid, S.HV_X64_MSR_SCONTROL, 1, vp=vp)
    wr(root, pid, S.HV_X64_MSR_SINT0 + SINT, vector, vp=vp)


def slot(root, pid):
    raw = root.gread(pid, SIMP_GPA + SINT * 256, 256)
    return S.hv_message.from_bytes(raw), S.hv_timer_message_payload.from_bytes(raw[16:])


def test_stimer_message_mode(root):
    pid = new_guest(root, CH_FEATURES)
    vp = vpo(root, pid)
    synic_on(root, pid)
    due = rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT) + 20000
    wr(root, pid, S.HV_X64_MSR_STIMER3_CONFIG, cfg(sintx=SINT, auto_enable=1))
    wr(root, pid, S.HV_X64_MSR_STIMER3_COUNT, due)
    wait_for(lambda: 0x50 in vp.apic.vectors())
    m, pl = slot(root, pid)
    assert m.header.message_type == S.HVMSG_TIMER_EXPIRED
    assert m.header.payload_size == S.hv_timer_message_payload.SIZE
    assert pl.timer_index == 3 and pl.expiration_time == due and pl.delivery_time >= due


def test_stimer_messages_wait_for_a_free_slot_and_eom(root):
    pid = new_guest(root, CH_FEATURES)
    vp = vpo(root, pid)
    synic_on(root, pid)
    t = vp.plat.stimers[1]
    wr(root, pid, S.HV_X64_MSR_STIMER1_COUNT, 20000)
    wr(root, pid, S.HV_X64_MSR_STIMER1_CONFIG, cfg(enable=1, periodic=1, sintx=SINT))
    wait_for(lambda: t.fired >= 3)                          # the slot stayed full
    m, pl = slot(root, pid)
    assert m.header.message_type == S.HVMSG_TIMER_EXPIRED and m.header.bits("message_flags", "msg_pending")
    first = pl.expiration_time
    assert len(vp.plat.queues[SINT]) == 1                   # one undelivered expiration, not one per period
    # the guest frees the slot and writes EOM: the next message arrives
    root.gwrite(pid, SIMP_GPA + SINT * 256, struct.pack("<I", S.HVMSG_NONE))
    vp.apic.irr = 0
    wr(root, pid, S.HV_X64_MSR_EOM, 0)
    m, pl = slot(root, pid)
    assert m.header.message_type == S.HVMSG_TIMER_EXPIRED and pl.expiration_time > first
    assert 0x50 in vp.apic.vectors()
    wr(root, pid, S.HV_X64_MSR_STIMER1_CONFIG, 0)


def test_auto_eoi_sint_skips_the_isr(root):
    pid = new_guest(root, CH_FEATURES)
    a = vpo(root, pid).apic
    synic_on(root, pid, vector=0x51)
    wr(root, pid, S.HV_X64_MSR_SINT0 + SINT, 0x51 | (1 << 17))             # AutoEOI
    wr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, cfg(sintx=SINT, auto_enable=1))
    wr(root, pid, S.HV_X64_MSR_STIMER0_COUNT, 1)
    wait_for(lambda: 0x51 in a.vectors(), 1)
    a.take(0x51)
    assert not a.isr and not a.irr
    a.accept(0x52, False)
    a.take(0x52)                                                           # an ordinary vector: ISR
    assert a.vectors("isr") == {0x52}
    wr(root, pid, S.HV_X64_MSR_SINT0 + SINT, 0x51)                         # AutoEOI off again
    a.accept(0x51, False)
    a.take(0x51)
    assert a.vectors("isr") == {0x51, 0x52}


def test_masked_sint_holds_the_message(root):
    pid = new_guest(root, CH_FEATURES)
    vp = vpo(root, pid)
    synic_on(root, pid)
    wr(root, pid, S.HV_X64_MSR_SINT0 + SINT, 0x50 | (1 << 16))
    wr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, cfg(sintx=SINT, auto_enable=1))
    wr(root, pid, S.HV_X64_MSR_STIMER0_COUNT, 1)
    wait_for(lambda: vp.plat.stimers[0].fired == 1, 1)
    assert slot(root, pid)[0].header.message_type == S.HVMSG_NONE and not vp.apic.irr
    wr(root, pid, S.HV_X64_MSR_SINT0 + SINT, 0x50)            # unmasking delivers it
    assert slot(root, pid)[0].header.message_type == S.HVMSG_TIMER_EXPIRED and 0x50 in vp.apic.vectors()


# ================================================================ LAPIC timer
def apic_w(root, pid, off, value, vp=0):
    hv = root.hv
    with hv._lock:
        hv._apic_msr(vpo(root, pid, vp), A.X2APIC_MSR_BASE + (off >> 4), True, value)


def apic_r(root, pid, off, vp=0):
    hv = root.hv
    with hv._lock:
        return hv._apic_msr(vpo(root, pid, vp), A.X2APIC_MSR_BASE + (off >> 4), False, 0)


def test_lapic_timer_one_shot(root):
    pid = new_guest(root, ram_pages=0)
    vp = vpo(root, pid)
    hz = root.hv.apic_hz
    apic_w(root, pid, A.APIC_TIMER_DCR, 0xB)                    # divide by 1
    apic_w(root, pid, A.APIC_LVT_TIMER, 0x60)                    # one-shot, vector 0x60
    apic_w(root, pid, A.APIC_TIMER_ICR, hz // 10)                # 100 ms
    c1 = apic_r(root, pid, A.APIC_TIMER_CCR)
    time.sleep(0.002)
    c2 = apic_r(root, pid, A.APIC_TIMER_CCR)
    assert hz // 10 >= c1 > c2 > 0
    assert 0x60 not in vp.apic.vectors()
    wait_for(lambda: 0x60 in vp.apic.vectors())
    assert apic_r(root, pid, A.APIC_TIMER_CCR) == 0 and vp.apic.timer_fired == 1
    time.sleep(0.02)
    assert vp.apic.timer_fired == 1
    # the divider: /2 halves the count rate
    apic_w(root, pid, A.APIC_TIMER_DCR, 0x0)
    assert vp.apic.timer_divisor() == 2
    t0 = time.monotonic()
    apic_w(root, pid, A.APIC_TIMER_ICR, hz)                      # 2 s at /2
    t1 = time.monotonic()
    time.sleep(0.01)
    t2 = time.monotonic()
    done = hz - apic_r(root, pid, A.APIC_TIMER_CCR)
    t3 = time.monotonic()
    assert (t2 - t1) * hz / 2 * 0.99 <= done <= (t3 - t0) * hz / 2 * 1.01 + 1, done     # half rate
    apic_w(root, pid, A.APIC_TIMER_ICR, 0)                       # a zero count stops it
    assert apic_r(root, pid, A.APIC_TIMER_CCR) == 0 and root.hv.platform.timers.pending() == 0


def test_lapic_timer_periodic_and_masked(root):
    pid = new_guest(root, ram_pages=0)
    a = vpo(root, pid).apic
    hz = root.hv.apic_hz
    apic_w(root, pid, A.APIC_TIMER_DCR, 0xB)
    apic_w(root, pid, A.APIC_LVT_TIMER, (1 << 17) | A.LVT_MASKED | 0x61)    # periodic, masked
    apic_w(root, pid, A.APIC_TIMER_ICR, hz // 500)                          # 2 ms
    wait_for(lambda: a.timer_fired >= 3)
    assert 0x61 not in a.vectors()                              # masked: counts, no interrupt
    apic_w(root, pid, A.APIC_LVT_TIMER, (1 << 17) | 0x61)        # unmask (same mode keeps counting)
    wait_for(lambda: 0x61 in a.vectors())
    n = a.timer_fired
    wait_for(lambda: a.timer_fired >= n + 3)
    apic_w(root, pid, A.APIC_LVT_TIMER, 0x61)                    # mode change disarms
    n = a.timer_fired
    time.sleep(0.01)
    assert a.timer_fired == n


def test_lapic_tsc_deadline(root):
    pid = new_guest(root, ram_pages=0)
    a = vpo(root, pid).apic
    clock = root.hv.platform.clock
    dl = clock.tsc() + clock.hz // 5                             # 200 ms
    wr(root, pid, PL.MSR_IA32_TSC_DEADLINE, dl)                   # one-shot mode: ignored
    assert rd(root, pid, PL.MSR_IA32_TSC_DEADLINE) == 0
    apic_w(root, pid, A.APIC_LVT_TIMER, (2 << 17) | 0x62)
    apic_w(root, pid, A.APIC_TIMER_ICR, 1000)                    # ignored in TSC-deadline mode
    assert apic_r(root, pid, A.APIC_TIMER_CCR) == 0
    wr(root, pid, PL.MSR_IA32_TSC_DEADLINE, dl)
    assert rd(root, pid, PL.MSR_IA32_TSC_DEADLINE) == dl
    due_ns = vpo(root, pid).plat.lapic_handle[0]                  # armed for the first ns with TSC >= dl
    assert clock.tsc(due_ns) >= dl > clock.tsc(due_ns - 1)
    wait_for(lambda: 0x62 in a.vectors())
    assert clock.tsc() >= dl and rd(root, pid, PL.MSR_IA32_TSC_DEADLINE) == 0
    # writing 0 disarms
    wr(root, pid, PL.MSR_IA32_TSC_DEADLINE, clock.tsc() + clock.hz // 100)
    wr(root, pid, PL.MSR_IA32_TSC_DEADLINE, 0)
    assert root.hv.platform.timers.pending() == 0


def test_tsc_deadline_absent_when_the_vmm_hides_it(root):
    pid = new_guest(root, ram_pages=0)
    inp = S.hv_input_register_intercept_result(partition_id=pid, vp_index=0xFFFFFFFF,
                                               intercept_type=S.HV_INTERCEPT_TYPE_X64_CPUID)
    inp.parameters.input_eax, inp.parameters.ecx, inp.parameters.ecx_mask = 1, 0, 1 << 24
    assert root.st(S.HVCALL_REGISTER_INTERCEPT_RESULT, inp) == S.HV_STATUS_SUCCESS
    assert not cpuid(root, pid, 1)[2] & (1 << 24)
    assert is_gp(msr(root, pid, PL.MSR_IA32_TSC_DEADLINE))
    assert is_gp(msr(root, pid, PL.MSR_IA32_TSC_DEADLINE, 5))


def test_clock_conversions():
    c = PL.Clock(2_000_000_000)
    for base in (0, 5_000_000_001):
        for ns in (base + d for d in (1, 999, 123_456_789_012, 10 ** 15 + 7)):
            t = c.tsc(ns, base)
            assert t == (ns * 2 - base * 2) & PL.U64
            n = c.ns_at_tsc(t, base)
            assert c.tsc(n, base) >= t > c.tsc(n - 1, base)
    c3 = PL.Clock(3_000_000_001)                                  # not a divisor of 10^9
    for t in (1, 2, 3, 10 ** 12 + 1):
        n = c3.ns_at_tsc(t)
        assert c3.tsc(n) >= t > c3.tsc(n - 1)


def test_timers_stop_when_the_vp_goes(root):
    pid = new_guest(root)
    wr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, cfg(direct_mode=1, apic_vector=0x42, auto_enable=1))
    wr(root, pid, S.HV_X64_MSR_STIMER0_COUNT, 1 << 40)
    apic_w(root, pid, A.APIC_LVT_TIMER, 0x60)
    apic_w(root, pid, A.APIC_TIMER_ICR, 1 << 30)
    assert root.hv.platform.timers.pending() == 2
    inp = S.hv_input_delete_vp(partition_id=pid, vp_index=0)
    assert root.fast(S.HVCALL_DELETE_VP, *struct.unpack("<QQ", inp.to_bytes())) == S.HV_STATUS_SUCCESS
    assert root.hv.platform.timers.pending() == 0


# ================================================================ guest hypercalls
LONG = dict(cpl=0, long64=True, cr0=0x80000011)


def hcall(root, pid, control, in_gpa=0, out_gpa=0, vp=0, **kw):
    """A guest VMCALL in 64-bit mode: RCX control, RDX input GPA (or in0), R8 output GPA (or in1)."""
    gpr = [0] * 16
    gpr[1], gpr[2], gpr[8] = control, in_gpa, out_gpa
    args = dict(LONG, **kw)
    with root.hv._lock:
        return root.hv.platform.vmcall(vpo(root, pid, vp), gpr, args["cpl"], args["long64"], args["cr0"])


def hstatus(r):
    assert r[0] == "emulate", r
    return result_status(r[1]["gpr"][0]), result_reps(r[1]["gpr"][0])


def enable_hypercalls(root, pid):
    wr(root, pid, S.HV_X64_MSR_GUEST_OS_ID, 0x8100000000060C00)
    wr(root, pid, S.HV_X64_MSR_HYPERCALL, 0x20001)


def test_guest_hypercall_environment(root):
    pid = new_guest(root, CH_FEATURES, vps=2)
    ipi = make_control(S.HVCALL_SEND_IPI, fast=True)
    assert hcall(root, pid, ipi, 0x40, 2) == PL.UD                       # no hypercall page yet
    enable_hypercalls(root, pid)
    assert hcall(root, pid, ipi, 0x40, 2, cpl=3) == PL.UD                # CPL > 0
    assert hcall(root, pid, ipi, 0x40, 2, cr0=0x10) == PL.UD             # real mode
    assert hstatus(hcall(root, pid, ipi, 0x40, 2)) == (S.HV_STATUS_SUCCESS, 0)
    assert vpo(root, pid, 1).apic.vectors() == {0x40} and not vpo(root, pid, 0).apic.irr
    assert hstatus(hcall(root, pid, make_control(0x7777)))[0] == S.HV_STATUS_INVALID_HYPERCALL_CODE
    # 32-bit caller: EDX:EAX control, EBX:ECX and EDI:ESI; result in EDX:EAX
    gpr = [0] * 16
    gpr[0], gpr[1], gpr[6] = ipi, 0x41, 1
    with root.hv._lock:
        v, res = root.hv.platform.vmcall(vpo(root, pid), gpr, 0, False, 0x11)
    assert v == "emulate" and res["gpr"] == {0: 0, 2: 0} and 0x41 in vpo(root, pid, 0).apic.vectors()


def test_guest_hypercall_checks(root, no_flush):
    pid = new_guest(root, CH_FEATURES, vps=2)
    enable_hypercalls(root, pid)
    ipi = make_control(S.HVCALL_SEND_IPI, fast=True)
    E = S
    assert hstatus(hcall(root, pid, ipi, 0x0F, 1))[0] == E.HV_STATUS_INVALID_PARAMETER        # vector < 16
    assert hstatus(hcall(root, pid, ipi, 0x100, 1))[0] == E.HV_STATUS_INVALID_PARAMETER
    assert hstatus(hcall(root, pid, ipi, 0x40 | (1 << 32), 1))[0] == E.HV_STATUS_INVALID_PARAMETER  # VTL 1
    assert hstatus(hcall(root, pid, ipi, 0x40 | (1 << 40), 1))[0] == E.HV_STATUS_INVALID_PARAMETER  # reserved
    assert hstatus(hcall(root, pid, ipi | (1 << 27), 0x40, 1))[0] == E.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert hstatus(hcall(root, pid, make_control(S.HVCALL_SEND_IPI, rep_count=1, fast=True), 0x40, 1))[0] == \
        E.HV_STATUS_INVALID_HYPERCALL_INPUT                                                     # rep on simple
    assert not any(v.apic.irr for v in root.hv.partitions[pid].vps.values())
    # not advertised: refused
    for code in (S.HVCALL_SEND_IPI_EX, S.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX, S.HVCALL_NOTIFY_LONG_SPIN_WAIT,
                 S.HVCALL_POST_MESSAGE, S.HVCALL_SIGNAL_EVENT):
        assert hstatus(hcall(root, pid, make_control(code), 0x5000))[0] == E.HV_STATUS_ACCESS_DENIED, hex(code)
    for code in (S.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST):
        assert hstatus(hcall(root, pid, make_control(code), 0x5000))[0] == E.HV_STATUS_ACCESS_DENIED


def test_guest_tlb_flush_hypercalls(root, flushes):
    """Offered when the engine can flush another VP's TLB (here a stand-in)."""
    pid = new_guest(root, CH_FEATURES | feat("EXTENDED_PROCESSOR_MASKS"), vps=3)
    assert cpuid(root, pid, S.HYPERV_CPUID_ENLIGHTMENT_INFO)[0] & S.HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED
    enable_hypercalls(root, pid)
    for i in range(3):
        root.hv._engine(vpo(root, pid, i))
    E = S
    # memory input: the flush list (rep)
    lst = make_control(S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST, rep_count=3)
    hdr = S.hv_guest_input_flush_virtual_address(address_space=0x10000, flags=0, processor_mask=3)
    root.gwrite(pid, 0x5000, hdr.to_bytes() + struct.pack("<3Q", 0x1000, 0x2000, 0x3005))
    assert hstatus(hcall(root, pid, lst, 0x5000)) == (E.HV_STATUS_SUCCESS, 3)
    assert flushes == [0, 1]                                                # processor mask 3
    assert hstatus(hcall(root, pid, lst, 0x5004))[0] == E.HV_STATUS_INVALID_ALIGNMENT
    assert hstatus(hcall(root, pid, lst, 0x5FF0))[0] == E.HV_STATUS_INVALID_ALIGNMENT    # crosses a page
    assert hstatus(hcall(root, pid, lst, 0x900000))[0] == E.HV_STATUS_INVALID_ALIGNMENT  # not guest RAM
    assert hstatus(hcall(root, pid, make_control(S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST), 0x5000))[0] == \
        E.HV_STATUS_INVALID_HYPERCALL_INPUT                                                 # rep count 0
    assert hstatus(hcall(root, pid, make_control(S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST, rep_count=2, rep_start=2),
                         0x5000))[0] == E.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert hstatus(hcall(root, pid, make_control(S.HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST, rep_count=3, varhead=1),
                         0x5000))[0] == E.HV_STATUS_INVALID_HYPERCALL_INPUT                 # no variable header
    hdr.flags = 1 << 10
    root.gwrite(pid, 0x5000, hdr.to_bytes())
    assert hstatus(hcall(root, pid, lst, 0x5000)) == (E.HV_STATUS_INVALID_PARAMETER, 0)
    space = make_control(S.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE)
    hdr.flags = S.HV_FLUSH_ALL_PROCESSORS | S.HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES
    root.gwrite(pid, 0x5000, hdr.to_bytes())
    n = root.hv.partitions[pid].stats["guest_tlb_flushes"]
    del flushes[:]
    assert hstatus(hcall(root, pid, space, 0x5000)) == (E.HV_STATUS_SUCCESS, 0)
    assert flushes == [0, 1, 2]                                             # all processors
    assert root.hv.partitions[pid].stats["guest_tlb_flushes"] == n + 1
    # the Ex form: a sparse VP set naming VP 2
    ex = S.hv_guest_input_flush_virtual_address_ex(address_space=0, flags=0, format=S.HV_GENERIC_SET_SPARSE_4K,
                                                   valid_bank_mask=1)
    root.gwrite(pid, 0x5000, ex.to_bytes() + struct.pack("<Q", 1 << 2))
    del flushes[:]
    assert hstatus(hcall(root, pid, make_control(S.HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX, varhead=1), 0x5000)) == \
        (E.HV_STATUS_SUCCESS, 0)
    assert flushes == [2]


def test_guest_ex_hypercalls_when_advertised(root):
    pid = new_guest(root, CH_FEATURES | feat("EXTENDED_PROCESSOR_MASKS", "NOTIFY_LONG_SPIN_WAIT"), vps=3)
    assert cpuid(root, pid, S.HYPERV_CPUID_ENLIGHTMENT_INFO)[0] & S.HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED
    assert cpuid(root, pid, S.HYPERV_CPUID_ENLIGHTMENT_INFO)[1] != 0xFFFFFFFF
    enable_hypercalls(root, pid)
    # sparse set: bank 0 = VPs 0 and 2
    inp = S.hv_guest_input_send_ipi_ex(vector=0x55, format=S.HV_GENERIC_SET_SPARSE_4K, valid_bank_mask=1)
    root.gwrite(pid, 0x5000, inp.to_bytes() + struct.pack("<Q", 0b101))
    ex = make_control(S.HVCALL_SEND_IPI_EX, varhead=1)
    assert hstatus(hcall(root, pid, ex, 0x5000)) == (S.HV_STATUS_SUCCESS, 0)
    assert [0x55 in vpo(root, pid, i).apic.vectors() for i in range(3)] == [True, False, True]
    # a bank mask naming more banks than the variable header holds
    inp.valid_bank_mask = 0b11
    root.gwrite(pid, 0x5000, inp.to_bytes())
    assert hstatus(hcall(root, pid, ex, 0x5000))[0] == S.HV_STATUS_INVALID_PARAMETER
    inp.format, inp.vector = S.HV_GENERIC_SET_ALL, 0x56
    root.gwrite(pid, 0x5000, inp.to_bytes())
    assert hstatus(hcall(root, pid, make_control(S.HVCALL_SEND_IPI_EX), 0x5000))[0] == S.HV_STATUS_SUCCESS
    assert all(0x56 in vpo(root, pid, i).apic.vectors() for i in range(3))
    spin = make_control(S.HVCALL_NOTIFY_LONG_SPIN_WAIT, fast=True)
    assert hstatus(hcall(root, pid, spin, 100)) == (S.HV_STATUS_SUCCESS, 0)
    assert hstatus(hcall(root, pid, spin, 100 | (1 << 32)))[0] == S.HV_STATUS_INVALID_PARAMETER


# ================================================================ guests on the engine
# #GP handler; the frame is [error code, RIP, CS, RFLAGS, RSP, SS]:
#   pop qword [0x6010] (the error code); add qword [rsp], 2 (skip the RDMSR/WRMSR);
#   inc dword [0x600c]; iretq
GP_HANDLER = bytes.fromhex("8f042510600000" "4883042402" "ff04250c600000" "48cf")


READY_INTERCEPT = (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_INTERCEPT)


def long_mode(root, pid, code, handlers=(), vp=0):
    """Long mode, 2 MiB identity map, code at 0x3000, handlers (vector,
    bytes) at 0x4000 + 0x100*k, stack below 0x9000."""
    return root.long_mode_guest(pid, code, handlers, vp)


def run_until_intercept(root, pid, timeout=8.0):
    """Dispatch like the driver: again after BLOCKED once the VP is signalled."""
    end = time.monotonic() + timeout
    vp = vpo(root, pid)
    while time.monotonic() < end:
        st = root.dispatch(pid, 0)
        if st == READY_INTERCEPT:
            return
        if st[0] == S.HV_VP_DISPATCH_STATE_BLOCKED:
            while vp.apic.blocked() and time.monotonic() < end:
                time.sleep(0.001)
    raise AssertionError("no intercept in %.1f s" % timeout)


def test_apic_msrs_fault_without_interrupt_control(root):
    # mov ecx, HV_X64_MSR_EOI; xor eax, eax; xor edx, edx; wrmsr; out 0x80, al; hlt
    pid = new_guest(root, CH_FEATURES & ~feat("ACCESS_INTR_CTRL_REGS"))
    assert not cpuid(root, pid, S.HYPERV_CPUID_ENLIGHTMENT_INFO)[0] & S.HV_X64_APIC_ACCESS_RECOMMENDED
    code = b"\xB9" + struct.pack("<I", S.HV_X64_MSR_EOI) + b"\x31\xC0\x31\xD2\x0F\x30\xE6\x80\xF4"
    msg = long_mode(root, pid, code, handlers=[(13, GP_HANDLER)])
    run_until_intercept(root, pid)
    assert root.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert struct.unpack("<II", root.gread(pid, 0x600C, 8)) == (1, 0)


def test_halted_vp_is_signalled_when_its_timer_expires(root):
    """Root scheduler: DispatchVp returns BLOCKED for sti; hlt; the synthetic
    timer's expiry posts VP_SIGNAL_PAIR to the dispatching CPU, and the next
    DispatchVp delivers the interrupt."""
    pid = new_guest(root, CH_FEATURES)
    msg = long_mode(root, pid, b"\xFB\xF4\xE6\x80\xF4", handlers=[(0x42, counting_handler(1))])
    wr(root, pid, S.HV_X64_MSR_STIMER0_CONFIG, cfg(direct_mode=1, apic_vector=0x42, auto_enable=1))
    wr(root, pid, S.HV_X64_MSR_STIMER0_COUNT, rd(root, pid, S.HV_X64_MSR_TIME_REF_COUNT) + 3000000)   # 0.3 s
    while root.take_message(1):
        pass
    root.notified.clear()
    assert root.dispatch(pid, 0)[0] == S.HV_VP_DISPATCH_STATE_BLOCKED    # halted, the timer still armed
    st = root.st(S.HVCALL_DISPATCH_VP, S.hv_input_dispatch_vp(partition_id=pid, vp_index=0), cpu=1)
    assert st == S.HV_STATUS_SUCCESS and root.out(S.hv_output_dispatch_vp).dispatch_state == \
        S.HV_VP_DISPATCH_STATE_BLOCKED
    wait_for(lambda: 1 in root.notified)
    mtype, payload, _ = root.take_message(1)
    assert mtype == S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR
    m = S.hv_vp_signal_pair_scheduler_message.from_bytes(payload)
    assert (m.vp_count, m.partition_ids[0], m.vp_indexes[0]) == (1, pid, 0)
    assert root.dispatch(pid, 0) == READY_INTERCEPT
    assert root.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert struct.unpack("<I", root.gread(pid, 0x6004, 4))[0] == 1


# #UD handler: add qword [rsp], 3 (skip the VMCALL); inc dword [0x600c]; iretq
UD_HANDLER = bytes.fromhex("4883042403ff04250c60000048cf")


def test_vmcall_without_hypercall_page_is_ud(root):
    pid = new_guest(root, CH_FEATURES)
    # vmcall; out 0x80, al; hlt
    msg = long_mode(root, pid, b"\x0F\x01\xC1\xE6\x80\xF4", handlers=[(6, UD_HANDLER)])
    run_until_intercept(root, pid)
    assert root.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert struct.unpack("<I", root.gread(pid, 0x600C, 4))[0] == 1
    assert root.hv.partitions[pid].plat.guest_calls == {}               # not a hypercall


# The guest program (64-bit, at 0x3000; assembled with GNU as,
# source in the comments). Results at 0x6100.., interrupt counts at 0x6000.
#   cpuid 0x40000000 -> [6100..610c]; cpuid 0x40000001 eax -> [6110];
#   cpuid 0x40000003 eax/ebx/edx -> [6114]/[6118]/[611c]; cpuid 1 ecx -> [6120]
#   wrmsr GUEST_OS_ID = 0x8100000000060c00; wrmsr HYPERCALL = 0x20001
#   rcx = 0x1000b (SendSyntheticClusterIpi, fast), rdx = 0x41, r8 = 1; call 0x20000; [6140] = rax
#   wrmsr REFERENCE_TSC = 0x21001; [6128] = reftime(); [6130] = rdmsr TIME_REF_COUNT
#   wrmsr STIMER0_CONFIG = 0x1428 (direct, vector 0x42, auto-enable); wrmsr STIMER0_COUNT = reftime() + 20000
#   x2APIC: DCR = 0xb, LVT timer = 0x43 (one-shot), initial count = 600000 (3 ms at 200 MHz)
#   wait: sti; hlt; cli; until [6000], [6004] and [6008] are all non-zero
#   [6138] = reftime(); mov al, 0x99; out 0x80, al; hlt
#   reftime: do { ebx = seq; rax = ((rdtsc * scale) >> 64) + offset } while (seq != ebx)
PROGRAM = bytes.fromhex(
    "b8000000400fa289042500610000891c2504610000890c25086100008914250c610000b8010000400fa289042510610000"
    "b8030000400fa289042514610000891c25186100008914251c610000b8010000000fa2890c2520610000b900000040b800"
    "0c0600ba000000810f30b901000040b80100020031d20f30b90b000100ba4100000041b801000000b800000200ffd04889"
    "042540610000b921000040b80110020031d20f30e89d0000004889042528610000b9200000400f32890425306100008914"
    "2534610000b9b0000040b82814000031d20f30e86d0000004805204e00004889c248c1ea20b9b10000400f30b93e080000"
    "b80b00000031d20f30b932080000b8430000000f30b938080000b8c02709000f30fbf4fa833c25006000000074f3833c25"
    "046000000074e9833c25086000000074dfe80d0000004889042538610000b099e680f45152538b1c25001002000f3148c1"
    "e2204809d048f72425081002004889d048030425101002003b1c250010020075d45b5a59c3")
# push rax; push rcx; push rdx; inc dword [0x6000]; wrmsr HV_X64_MSR_EOI = 0; pop rdx; pop rcx; pop rax; iretq
HANDLER = bytes.fromhex("505152ff042500600000b97000004031c031d20f305a595848cf")


def counting_handler(k):
    h = bytearray(HANDLER)
    struct.pack_into("<I", h, 6, 0x6000 + 4 * k)
    return bytes(h)


def test_guest_program_uses_the_platform(root):
    """The issue's program: CPUID leaves, hypercall page and a hypercall
    through it, reference TSC page, a synthetic timer and a LAPIC timer,
    HLT until both timer interrupts (and the IPI) arrived."""
    pid = new_guest(root, CH_FEATURES)
    root.gwrite(pid, 0x20000, b"\xF4" * 4096)                 # what the page shows without the overlay
    msg = long_mode(root, pid, PROGRAM, handlers=[(0x41, counting_handler(0)), (0x42, counting_handler(1)),
                                                  (0x43, counting_handler(2))])
    t0 = time.monotonic()
    run_until_intercept(root, pid)
    mtype, payload = root.message(msg)
    assert mtype == S.HVMSG_X64_IO_PORT_INTERCEPT, hex(mtype)
    io = S.hv_x64_io_port_intercept_message.from_bytes(payload)
    assert io.port_number == 0x80 and io.rax & 0xFF == 0x99
    res = root.gread(pid, 0x6100, 0x48)
    a, b, c, d, hv1, f_eax, f_ebx, f_edx, ecx1 = struct.unpack_from("<9I", res)
    assert struct.pack("<3I", b, c, d) == b"Microsoft Hv" and a >= 0x40000005
    assert hv1 == S.HV_CPUID_INTERFACE_SIGNATURE_HV1 and ecx1 & (1 << 31)
    want = cpuid(root, pid, S.HYPERV_CPUID_FEATURES)
    assert (f_eax, f_ebx, f_edx) == (want[0], want[1], want[3])
    t_page1, t_msr1, t_page2, status = struct.unpack_from("<QQQQ", res, 0x28)
    assert status == S.HV_STATUS_SUCCESS                                  # the hypercall through the page
    # page and MSR agree: the MSR was read after the page
    assert t_page1 <= t_msr1 <= t_page2
    assert t_page2 - t_page1 >= 30000                                     # the LAPIC timer waited >= 3 ms
    assert t_page2 - t_page1 <= (time.monotonic() - t0) * 1e7 + 10000
    ipi, stimer, lapic = struct.unpack("<3I", root.gread(pid, 0x6000, 12))
    assert (ipi, stimer, lapic) == (1, 1, 1)
    vp = vpo(root, pid)
    assert sorted(vp.apic.delivered) == [0x41, 0x42, 0x43]
    assert not vp.apic.isr                                                 # every handler EOI'd
    assert root.hv.partitions[pid].plat.guest_calls == {S.HVCALL_SEND_IPI: 1}
    assert time.monotonic() - t0 < 10


def test_guest_gp_handler_runs_for_an_unadvertised_msr(root):
    """No exception intercept: the #GP goes through the guest's IDT, as
    Linux's rdmsr_safe() expects."""
    pid = new_guest(root, BASIC | feat("ACCESS_HYPERCALL_REGS"))
    # mov ecx, SCONTROL; rdmsr; wrmsr; out 0x80, al; hlt
    code = b"\xB9" + struct.pack("<I", S.HV_X64_MSR_SCONTROL) + b"\x0F\x32\x0F\x30\xE6\x80\xF4"
    msg = long_mode(root, pid, code, handlers=[(13, GP_HANDLER)])
    run_until_intercept(root, pid)
    assert root.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    count, err = struct.unpack("<II", root.gread(pid, 0x600C, 8))
    assert (count, err) == (2, 0)


def test_core_scheduler_halted_vp_wakes_on_lapic_timer(core):
    pid = new_guest(core, CH_FEATURES)
    # x2APIC: DCR = 0xb; LVT timer = 0x43; count = 1 ms; wait: sti; hlt; cmp [6008], 0; je wait; out 0x80, al; hlt
    code = (b"\xB9\x3E\x08\x00\x00\xB8\x0B\x00\x00\x00\x31\xD2\x0F\x30"
            b"\xB9\x32\x08\x00\x00\xB8\x43\x00\x00\x00\x0F\x30"
            b"\xB9\x38\x08\x00\x00\xB8" + struct.pack("<I", core.hv.apic_hz // 1000) + b"\x0F\x30"
            b"\xFB\xF4\x83\x3C\x25\x08\x60\x00\x00\x00\x74\xF4\xE6\x80\xF4")
    msg = long_mode(core, pid, code, handlers=[(0x43, counting_handler(2))])
    vp = vpo(core, pid)
    wait_for(lambda: vp.apic.halted or not vp.running)
    assert core.hv.wait_idle(5)
    mtype, _ = core.message(msg)
    assert mtype == S.HVMSG_X64_IO_PORT_INTERCEPT
    assert struct.unpack("<I", core.gread(pid, 0x6008, 4))[0] == 1
