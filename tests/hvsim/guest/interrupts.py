"""Virtual interrupts as a VMM sees them: HvCallAssertVirtualInterrupt through
MSHV_ROOT_HVCALL wakes a halted VP or interrupts a running one, and the guest
takes the interrupt through its IVT. Runs inside the simulated root partition; TAP."""

import ctypes
import errno
import os
import signal
import struct
import sys
import threading
import time

import mshv_spec as S
from mshvlib import GuestMemory, Partition, open_mshv, run_tests, sim_control, sim_query

PAGE = 4096
VECTOR = 0x30
MAIN, HANDLER, STACK = 0x1000, 0x1100, 0x3000
STI_HLT = bytes([0xFB, 0xF4])                         # sti; hlt
STI_LOOP = bytes([0xFB, 0xEB, 0xFE])                  # sti; jmp .
CS, RSP = 1, 4
libc = ctypes.CDLL(None, use_errno=True)


# the hypervisor's APIC takes interrupts only in partitions created with it
LAPIC = 1 << S.MSHV_PT_BIT_LAPIC


def _handler(vector):
    return bytes([0xB0, vector, 0xE6, 0x80, 0xF4])     # mov $vector,%al; out %al,$0x80; hlt


def _guest(main, vectors=(VECTOR,)):
    """Real-mode guest at GPA 0: IVT entries for `vectors`, main code at MAIN."""
    mshv = open_mshv()
    pt = Partition(mshv, flags=LAPIC)
    mem = GuestMemory(4 * PAGE)
    for k, v in enumerate(vectors):
        mem.write(v * 4, struct.pack("<HH", HANDLER + 16 * k, 0))
        mem.write(HANDLER + 16 * k, _handler(v))
    mem.write(MAIN, main)
    pt.map(mem, 0)
    vp = pt.vp(0)
    r = vp.regs
    r.rip = MAIN
    r.segments[CS].base = 0
    r.segments[CS].selector = 0
    r.gp_registers[RSP] = STACK
    r.dirty |= (S.HV_X64_REGISTER_PAGE_DIRTY_IP | S.HV_X64_REGISTER_PAGE_DIRTY_SEGMENT
                | S.HV_X64_REGISTER_PAGE_DIRTY_GENERAL)
    return mshv, pt, mem, vp


def _assert_irq(pt, vector=VECTOR, dest=0, logical=False):
    """ASSERT_VIRTUAL_INTERRUPT through the partition fd: (status, errno or 0)."""
    inp = S.hv_input_assert_virtual_interrupt(control=S.HV_X64_INTERRUPT_TYPE_FIXED | (int(logical) << 33),
                                              dest_addr=dest, vector=vector)
    try:
        return pt.hvcall(S.HVCALL_ASSERT_VIRTUAL_INTERRUPT, bytes(inp))[0], 0
    except OSError as e:
        return e.hv_status, e.errno


def _assert_later(pt, delay, got):
    def fire():
        time.sleep(delay)
        got.append((time.monotonic(), _assert_irq(pt)))
    t = threading.Thread(target=fire)
    t.start()
    return t


def _check_handler_exit(msg, mem, vector=VECTOR, ret_ip=MAIN + 2):
    assert msg.header.message_type == S.HVMSG_X64_IO_PORT_INTERCEPT, hex(msg.header.message_type)
    io = S.hv_x64_io_port_intercept_message.from_buffer_copy(bytes(msg)[16:])
    assert io.port_number == 0x80 and io.rax & 0xFF == vector, (hex(io.port_number), hex(io.rax))
    assert io.header.rip == HANDLER + 2, hex(io.header.rip)
    ip, cs, flags = struct.unpack("<3H", mem.read(STACK - 6, 6))
    assert (cs, flags & 0x200) == (0, 0x200), (hex(cs), hex(flags))
    if ret_ip is not None:
        assert ip == ret_ip, hex(ip)
    print(f"# vector {vector:#x} taken: handler wrote {io.rax & 0xFF:#x} at rip {io.header.rip:#x}, "
          f"return ip {ip:#x}", flush=True)


def test_interrupt_wakes_a_halted_guest():
    mshv, pt, mem, vp = _guest(STI_HLT)
    got = []
    t0 = time.monotonic()
    th = _assert_later(pt, 0.5, got)
    msg = vp.run()
    t1 = time.monotonic()
    th.join(30)
    assert got and got[0][1] == (S.HV_STATUS_SUCCESS, 0), got
    assert t1 >= got[0][0], "the run returned before the interrupt was asserted"
    print(f"# run returned {t1 - t0:.2f}s after it started", flush=True)
    _check_handler_exit(msg, mem)                       # IP after the HLT
    pt.close()
    os.close(mshv)


def test_every_kick_form_wakes_a_halted_guest():
    """Root scheduler: the hypervisor kicks a halted VP with VP_SIGNAL_PAIR,
    VP_SIGNAL_BITSET, or a BITSET whose overflow names no VP (the driver
    must then kick every VP of the partition). Each form must wake the run."""
    def stuck(*_a):
        raise TimeoutError("the kick did not wake the run")
    old = signal.signal(signal.SIGALRM, stuck)
    try:
        for form in ("pair", "bitset", "overflow"):
            sim_control(f"kick_form {form}")
            before = sim_query()["kicks"].get(form, 0)
            mshv, pt, mem, vp = _guest(STI_HLT)
            try:
                got = []
                th = _assert_later(pt, 0.3, got)
                signal.setitimer(signal.ITIMER_REAL, 20)
                try:
                    msg = vp.run()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    th.join(30)
                _check_handler_exit(msg, mem)
                q = sim_query()
                if q["scheduler"] == "root":
                    assert q["kicks"].get(form, 0) > before, (form, q["kicks"])
            finally:
                pt.close()              # a lost kick must not leave the VP to the next test
                os.close(mshv)
    finally:
        sim_control("kick_form random")
        signal.signal(signal.SIGALRM, old)


def test_interrupt_reaches_a_running_guest():
    mshv, pt, mem, vp = _guest(STI_LOOP)
    got = []
    th = _assert_later(pt, 0.5, got)
    msg = vp.run()
    th.join(30)
    assert got and got[0][1] == (S.HV_STATUS_SUCCESS, 0), got
    _check_handler_exit(msg, mem, ret_ip=None)
    ip = struct.unpack("<H", mem.read(STACK - 6, 2))[0]
    assert ip in (MAIN + 1, MAIN + 3), hex(ip)          # somewhere in the loop
    pt.close()
    os.close(mshv)


def test_pending_interrupt_is_taken_at_sti():
    mshv, pt, mem, vp = _guest(STI_HLT)
    assert _assert_irq(pt) == (S.HV_STATUS_SUCCESS, 0)  # before the VP ever ran
    msg = vp.run()
    _check_handler_exit(msg, mem)                       # after HLT: the STI shadow covers it
    pt.close()
    os.close(mshv)


def test_highest_vector_first():
    mshv, pt, mem, vp = _guest(STI_HLT, vectors=(0x31, 0x40))
    assert _assert_irq(pt, 0x31) == (S.HV_STATUS_SUCCESS, 0)
    assert _assert_irq(pt, 0x40) == (S.HV_STATUS_SUCCESS, 0)
    msg = vp.run()
    io = S.hv_x64_io_port_intercept_message.from_buffer_copy(bytes(msg)[16:])
    assert io.rax & 0xFF == 0x40, hex(io.rax)
    pt.close()
    os.close(mshv)


def test_signal_interrupts_a_halted_run():
    mshv, pt, mem, vp = _guest(STI_HLT)
    old = signal.signal(signal.SIGALRM, lambda *a: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        buf = ctypes.create_string_buffer(256)
        ret = libc.ioctl(vp.fd, ctypes.c_ulong(S.MSHV_RUN_VP), buf)
        err = ctypes.get_errno()
        assert ret == -1 and err == errno.EINTR, (ret, err)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    got = []
    th = _assert_later(pt, 0.3, got)
    msg = vp.run()                                      # still halted: waits for the interrupt
    th.join(30)
    assert got and got[0][1] == (S.HV_STATUS_SUCCESS, 0), got
    _check_handler_exit(msg, mem)
    pt.close()
    os.close(mshv)


def test_assert_checks():
    mshv = open_mshv()
    pt = Partition(mshv, flags=LAPIC)
    pt.vp(0)
    st, err = _assert_irq(pt, vector=5)
    assert st == S.HV_STATUS_INVALID_PARAMETER and err, (hex(st), err)
    st, err = _assert_irq(pt, logical=True)
    assert st == S.HV_STATUS_INVALID_PARAMETER and err, (hex(st), err)
    assert _assert_irq(pt, dest=9) == (S.HV_STATUS_SUCCESS, 0), "no such APIC: dropped"
    pt.close()
    os.close(mshv)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
