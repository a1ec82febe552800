"""hvsim model: DispatchVp's time slice, its flags, and root interrupts that
end it (root scheduler). The driver dispatches with the root's interrupts
enabled; the hvsim seam flags each interrupt the waiting CPU takes."""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.spec import make_control, result_status  # noqa: E402
from model.testkit import S, IN_GPA, OUT_GPA  # noqa: E402
from model_fixtures import root  # noqa: E402,F401 (pytest fixture)

R = S
LOOP = bytes.fromhex("ebfe")                        # jmp .
OUT_HLT = bytes.fromhex("e680f4")                   # out 0x80, al; hlt
READY_PREEMPTED = (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_SUSPEND)
READY_INTERCEPT = (S.HV_VP_DISPATCH_STATE_READY, S.HV_VP_DISPATCH_EVENT_INTERCEPT)
MS = 10_000                                         # time_slice units (100 ns) per millisecond


def guest(root, code):
    pid = root.new_guest()
    root.real_mode_guest(pid, code)
    root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)
    assert root.set_regs(pid, 0, [(R.HV_REGISTER_EXPLICIT_SUSPEND, 0)])[0] == S.HV_STATUS_SUCCESS
    while root.take_message(0):                     # the release's kick: SINT0 free again
        pass
    return pid


def dispatch(root, pid, flags=0, time_slice=0, spec_ctrl=0, cpu=0, **kw):
    """DispatchVp as the hvsim seam issues it: kw are caller_irqs and root_irq.
    Returns (status, (state, event))."""
    inp = S.hv_input_dispatch_vp(partition_id=pid, vp_index=0, flags=flags, time_slice=time_slice,
                                 spec_ctrl=spec_ctrl)
    root.ram.write(IN_GPA, bytes(inp))
    st = result_status(root.hv.hypercall(cpu, make_control(S.HVCALL_DISPATCH_VP), IN_GPA, OUT_GPA, **kw))
    o = root.out(S.hv_output_dispatch_vp)
    return st, (o.dispatch_state, o.dispatch_event)


def sim_message():
    m = S.hv_message()
    m.header.message_type = S.HVMSG_SCHEDULER_VP_SIGNAL_PAIR
    return bytes(m)


def in_thread(fn):
    out = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    return th, out


def wait_running(root, pid, timeout=5):
    vp = root.hv.partitions[pid].vps[0]
    end = time.monotonic() + timeout
    while not (vp.running and vp.engine is not None):
        assert time.monotonic() < end, "the dispatch never started"
        time.sleep(0.01)
    return vp


def rip(root, pid):
    return root.get_regs(pid, 0, [R.HV_X64_REGISTER_RIP])[0]


# ---------------------------------------------------------------- time slice
def test_time_slice_ends_the_dispatch(root):
    pid = guest(root, LOOP)
    t0 = time.monotonic()
    assert dispatch(root, pid, time_slice=50 * MS) == (S.HV_STATUS_SUCCESS, READY_PREEMPTED)
    took = time.monotonic() - t0
    assert 0.05 <= took < 0.2, f"a 50 ms slice took {took:.3f} s"
    assert rip(root, pid) == 0x1000
    assert root.hv.stats()["contract_violations"] == []


def test_zero_time_slice_runs_until_something_happens(root):
    pid = guest(root, LOOP)
    t0 = time.monotonic()
    th, out = in_thread(lambda: dispatch(root, pid))
    vp = wait_running(root, pid)
    time.sleep(0.6)
    assert vp.running and not out, "time slice 0 ended a dispatch nothing happened to"
    assert root.hv.root_interrupt(0)
    th.join(5)
    assert out == [(S.HV_STATUS_SUCCESS, READY_PREEMPTED)]
    assert time.monotonic() - t0 >= 0.6


# ---------------------------------------------------------------- root interrupts
def test_flagged_root_interrupt_ends_the_dispatch(root):
    pid = guest(root, LOOP)
    taken = threading.Event()
    th, out = in_thread(lambda: dispatch(root, pid, caller_irqs=True, root_irq=taken.is_set))
    vp = wait_running(root, pid)
    time.sleep(0.2)
    assert vp.running and not out
    taken.set()                                     # the seam's flag, polled by the model
    th.join(5)
    assert out == [(S.HV_STATUS_SUCCESS, READY_PREEMPTED)]
    assert rip(root, pid) == 0x1000 and not vp.running
    # the next dispatch starts with no interrupt pending
    assert dispatch(root, pid, time_slice=20 * MS, caller_irqs=True,
                    root_irq=lambda: False) == (S.HV_STATUS_SUCCESS, READY_PREEMPTED)


def test_interrupt_pending_at_the_call_returns_before_the_guest_runs(root):
    pid = guest(root, OUT_HLT)
    assert dispatch(root, pid, caller_irqs=True, root_irq=lambda: True) == \
        (S.HV_STATUS_SUCCESS, READY_PREEMPTED)
    assert rip(root, pid) == 0x1000                 # the OUT has not run
    assert dispatch(root, pid) == (S.HV_STATUS_SUCCESS, READY_INTERCEPT)


def test_root_interrupt_kicks_the_engine_and_only_ends_its_cpus_dispatch(root):
    pid = guest(root, LOOP)
    th, out = in_thread(lambda: dispatch(root, pid, cpu=1))
    vp = wait_running(root, pid)
    kicks = []
    real_kick = vp.engine.kick
    vp.engine.kick = lambda: (kicks.append(1), real_kick())
    try:
        assert not root.hv.root_interrupt(0)        # another CPU's interrupt
        time.sleep(0.2)
        assert vp.running and not out and not kicks
        assert root.hv.root_interrupt(1)
        th.join(5)
    finally:
        del vp.engine.kick
    assert out == [(S.HV_STATUS_SUCCESS, READY_PREEMPTED)] and kicks == [1]
    assert not root.hv.root_interrupt(1)            # nothing dispatched there any more


def test_caller_with_interrupts_off_keeps_the_vp_running(root):
    """Hyper-V cannot give the root an interrupt it has masked: the dispatch
    runs on (here until its time slice), and the model records that the
    driver broke its promise to dispatch with interrupts enabled."""
    pid = guest(root, LOOP)
    t0 = time.monotonic()
    th, out = in_thread(lambda: dispatch(root, pid, time_slice=400 * MS, caller_irqs=False,
                                         root_irq=lambda: True))
    wait_running(root, pid)
    root.hv.post_message(0, 0, sim_message())  # a SIM message for that CPU
    assert not root.hv.root_interrupt(0)
    th.join(5)
    assert out == [(S.HV_STATUS_SUCCESS, READY_PREEMPTED)]
    assert time.monotonic() - t0 >= 0.4, "ended by a root interrupt the root could not take"
    v = root.hv.stats()["contract_violations"]
    assert len(v) == 1 and "interrupts disabled" in v[0]


def test_enable_caller_interrupts_flag(root):
    pid = guest(root, LOOP)
    st = dispatch(root, pid, flags=S.HV_DISPATCH_VP_FLAG_ENABLE_CALLER_INTERRUPTS, time_slice=2000 * MS,
                  caller_irqs=False, root_irq=lambda: True)
    assert st == (S.HV_STATUS_SUCCESS, READY_PREEMPTED)
    assert root.hv.stats()["contract_violations"] == []


# ---------------------------------------------------------------- flags
def test_dispatch_flags_are_validated(root):
    pid = guest(root, OUT_HLT)
    for bad in (0x80, 0x8000_0000):
        assert dispatch(root, pid, flags=bad)[0] == S.HV_STATUS_INVALID_PARAMETER
    # a spec_ctrl value without the flag that says to use it
    assert dispatch(root, pid, spec_ctrl=1)[0] == S.HV_STATUS_INVALID_PARAMETER
    assert rip(root, pid) == 0x1000
    assert dispatch(root, pid, flags=S.HV_DISPATCH_VP_FLAG_SET_CALLER_SPEC_CTRL, spec_ctrl=1) == \
        (S.HV_STATUS_SUCCESS, READY_INTERCEPT)
