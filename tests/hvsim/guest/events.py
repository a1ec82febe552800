"""Interrupts and doorbells as a VMM wires them: MSHV_SET_MSI_ROUTING,
MSHV_IRQFD (with resample) and MSHV_IOEVENTFD, end to end with real-mode
guest code. Runs inside the simulated root partition; TAP."""

import ctypes
import errno
import os
import select
import struct
import sys
import threading
import time

import mshv_spec as S
from mshvlib import (GuestMemory, Partition, expect_errno, ioctl, open_mshv, run_tests, sim_control,
                     sim_query, slabinfo)

PAGE = 4096
MAIN, HANDLER, COUNTER, STACK = 0x1000, 0x1100, 0x2000, 0x3000
DOORBELL = 0x8000                      # not mapped: the guest's MMIO doorbell
VEC, VEC2 = 0x30, 0x31
X2APIC_EOI = 0x80B
MSI_ADDR = 0xFEE00000
APIC_BASE_X2APIC = 0xFEE00000 | 0x800 | 0x400 | 0x100    # enabled, x2APIC, BSP

# main: sti; L: hlt; cmp byte [COUNTER], N; jb L; cli; hlt
def _main(n):
    return bytes([0xFB, 0xF4, 0x80, 0x3E]) + struct.pack("<HB", COUNTER, n) + \
        bytes([0x72, 0xF8, 0xFA, 0xF4])


# handler: inc byte [COUNTER]; (mov al, vector; mov [DOORBELL], al;)
#          mov ecx, X2APIC_EOI; xor eax, eax; xor edx, edx; wrmsr; iret
def _handler(vector, doorbell=False):
    code = bytes([0xFE, 0x06]) + struct.pack("<H", COUNTER)
    if doorbell:
        code += bytes([0xB0, vector, 0xA2]) + struct.pack("<H", DOORBELL)
    code += bytes([0x66, 0xB9]) + struct.pack("<I", X2APIC_EOI)
    code += bytes([0x66, 0x31, 0xC0, 0x66, 0x31, 0xD2, 0x0F, 0x30, 0xCF])
    return code


class Guest:
    """A real-mode guest at GPA 0 with IVT entries for `vectors`."""

    def __init__(self, main, vectors=(VEC,), doorbell=False, vps=1):
        self.mshv = open_mshv()
        self.pt = Partition(self.mshv, flags=1 << S.MSHV_PT_BIT_LAPIC)
        self.mem = GuestMemory(4 * PAGE)
        for k, v in enumerate(vectors):
            self.mem.write(v * 4, struct.pack("<HH", HANDLER + 32 * k, 0))
            self.mem.write(HANDLER + 32 * k, _handler(v, doorbell))
        self.mem.write(MAIN, main)
        self.pt.map(self.mem, 0)
        self.vps = [self.pt.vp(i) for i in range(vps)]
        for vp in self.vps:
            vp.start_real_mode(MAIN, rsp=STACK)
            status, _ = vp.set_regs([(S.HV_X64_REGISTER_APIC_BASE,
                                      APIC_BASE_X2APIC & ~(0x100 if vp.index else 0))])
            assert status == S.HV_STATUS_SUCCESS, hex(status)
        self.vp = self.vps[0]

    def counter(self):
        return self.mem.read(COUNTER, 1)[0]

    def close(self):
        self.pt.close()
        os.close(self.mshv)


def eventfd():
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def efd_count(fd):
    """Read (and reset) an eventfd's counter; 0 when it is not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def efd_wait(fd, want, timeout=10.0):
    """Sum an eventfd's signals until `want` arrived or `timeout` passed."""
    got, end = 0, time.monotonic() + timeout
    while got < want and time.monotonic() < end:
        select.select([fd], [], [], 0.05)
        got += efd_count(fd)
    return got


def routing(pt, entries):
    """MSHV_SET_MSI_ROUTING with [(gsi, address_lo, data[, address_hi])]."""
    n = len(entries)

    class Table(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("nr", ctypes.c_uint32), ("rsvd", ctypes.c_uint32),
                    ("entries", S.mshv_user_irq_entry * max(n, 1))]
    t = Table(nr=n)
    for i, e in enumerate(entries):
        t.entries[i] = S.mshv_user_irq_entry(gsi=e[0], address_lo=e[1], data=e[2],
                                             address_hi=e[3] if len(e) > 3 else 0)
    if not n:
        return ioctl(pt.fd, S.MSHV_SET_MSI_ROUTING, S.mshv_user_irq_table(nr=0))
    return ioctl(pt.fd, S.MSHV_SET_MSI_ROUTING, t)


def msi(vector, dest=0, level=False, mode=0):
    """(address_lo, data) of an x86 MSI: fixed delivery unless `mode`."""
    return MSI_ADDR | (dest << 12), vector | (mode << 8) | ((1 << 15) if level else 0)


def irqfd(pt, fd, gsi, resamplefd=None, deassign=False):
    flags = (1 << S.MSHV_IRQFD_BIT_DEASSIGN) if deassign else 0
    if resamplefd is not None:
        flags |= 1 << S.MSHV_IRQFD_BIT_RESAMPLE
    a = S.mshv_user_irqfd(fd=fd, resamplefd=resamplefd or 0, gsi=gsi, flags=flags)
    return ioctl(pt.fd, S.MSHV_IRQFD, a)


def ioeventfd(pt, fd, addr=DOORBELL, length=0, datamatch=None, deassign=False, flags=0):
    if datamatch is not None:
        flags |= 1 << S.MSHV_IOEVENTFD_BIT_DATAMATCH
    if deassign:
        flags |= 1 << S.MSHV_IOEVENTFD_BIT_DEASSIGN
    a = S.mshv_user_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
    return ioctl(pt.fd, S.MSHV_IOEVENTFD, a)


def avi_calls():
    return sim_query()["calls"].get("assert_virtual_interrupt", 0)


def msg_type(msg):
    return msg.header.message_type


def later(delay, fn, *args):
    t = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)))
    t.start()
    return t


# -- MSI routing --------------------------------------------------------------

def test_msi_routing_errors_leave_the_table_alone():
    g = Guest(_main(1))
    efd = eventfd()
    routing(g.pt, [(5, *msi(VEC))])
    irqfd(g.pt, efd, 5)
    for bad in ([(4096, *msi(VEC))],                        # gsi out of range
                [(5, *msi(VEC)), (5, *msi(VEC2))],          # a gsi twice
                [(6, *msi(VEC), 1)]):                       # address_hi
        expect_errno(errno.EINVAL, routing, g.pt, bad)
    before = avi_calls()
    os.eventfd_write(efd, 1)
    assert avi_calls() == before + 1, "gsi 5 kept its route"
    os.close(efd)
    g.close()


def test_msi_routing_refuses_too_many_entries_and_reserved_bits():
    g = Guest(_main(1))
    expect_errno(errno.EINVAL, ioctl, g.pt.fd, S.MSHV_SET_MSI_ROUTING,
                 S.mshv_user_irq_table(nr=4097))
    expect_errno(errno.EINVAL, ioctl, g.pt.fd, S.MSHV_SET_MSI_ROUTING,
                 S.mshv_user_irq_table(nr=0, rsvd=1))
    g.close()


def test_msi_routing_cleared_drops_interrupts():
    g = Guest(_main(1))
    efd = eventfd()
    routing(g.pt, [(5, *msi(VEC))])
    irqfd(g.pt, efd, 5)
    routing(g.pt, [])
    before = avi_calls()
    os.eventfd_write(efd, 1)
    assert avi_calls() == before, "a gsi without a route injects nothing"
    os.close(efd)
    g.close()


# -- irqfd --------------------------------------------------------------------

def test_irqfd_interrupt_reaches_the_guest_and_its_doorbell_fires_without_an_exit():
    """The end to end path: an irqfd injects, the guest's handler writes a
    doorbell, the VMM's ioeventfd fires, and the only exit is the final HLT."""
    g = Guest(_main(1), doorbell=True)
    efd, bell = eventfd(), eventfd()
    routing(g.pt, [(10, *msi(VEC))])
    irqfd(g.pt, efd, 10)
    ioeventfd(g.pt, bell, length=1)
    t = later(0.3, os.eventfd_write, efd, 1)
    msg = g.vp.run()
    t.join()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    assert g.counter() == 1
    assert efd_wait(bell, 1) == 1, "the doorbell signalled the eventfd"
    os.close(efd)
    os.close(bell)
    g.close()


def test_routing_changes_apply_to_assigned_irqfds():
    g = Guest(_main(1), vectors=(VEC, VEC2))
    efd = eventfd()
    routing(g.pt, [(3, *msi(VEC))])
    irqfd(g.pt, efd, 3)
    routing(g.pt, [(3, *msi(VEC2))])
    t = later(0.2, os.eventfd_write, efd, 1)
    msg = g.vp.run()
    t.join()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    # the handler that ran is VEC2's: its IVT entry is the second one
    assert struct.unpack("<H", g.mem.read(STACK - 6, 2))[0] == MAIN + 2
    assert g.mem.read(VEC2 * 4, 2) == struct.pack("<H", HANDLER + 32)
    os.close(efd)
    g.close()


def test_irqfd_routes_to_the_destination_vp():
    g = Guest(_main(1), vps=2)
    efd = eventfd()
    routing(g.pt, [(7, *msi(VEC, dest=1))])
    irqfd(g.pt, efd, 7)
    t = later(0.3, os.eventfd_write, efd, 1)
    msg = g.vps[1].run()
    t.join()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    assert g.counter() == 1
    os.close(efd)
    g.close()


def test_irqfd_errors():
    g = Guest(_main(1))
    efd = eventfd()
    expect_errno(errno.EINVAL, irqfd, g.pt, efd, 4096)
    expect_errno(errno.EBADF, irqfd, g.pt, 1000, 1)
    with open("/dev/null") as f:
        expect_errno(errno.EINVAL, irqfd, g.pt, f.fileno(), 1)
        expect_errno(errno.EINVAL, irqfd, g.pt, efd, 1, f.fileno())   # resamplefd not an eventfd
    expect_errno(errno.EBADF, irqfd, g.pt, efd, 1, 1000)
    expect_errno(errno.EINVAL, ioctl, g.pt.fd, S.MSHV_IRQFD,
                 S.mshv_user_irqfd(fd=efd, gsi=1, flags=1 << S.MSHV_IRQFD_BIT_COUNT))
    expect_errno(errno.EINVAL, ioctl, g.pt.fd, S.MSHV_IRQFD,
                 S.mshv_user_irqfd(fd=efd, gsi=1, flags=3))             # deassign + resample
    expect_errno(errno.ENOENT, lambda: irqfd(g.pt, efd, 1, deassign=True))
    irqfd(g.pt, efd, 1)
    expect_errno(errno.EBUSY, irqfd, g.pt, efd, 1)
    expect_errno(errno.EBUSY, irqfd, g.pt, efd, 2)
    expect_errno(errno.ENOENT, lambda: irqfd(g.pt, efd, 2, deassign=True))   # wrong gsi
    irqfd(g.pt, efd, 1, deassign=True)
    irqfd(g.pt, efd, 2)                                   # free again
    os.close(efd)
    g.close()


def _irqfds():
    return slabinfo()["mshvr_irqfd"][0]


def _wait_irqfds(n, timeout=5.0):
    end = time.monotonic() + timeout
    while _irqfds() != n and time.monotonic() < end:
        time.sleep(0.05)
    return _irqfds()


def test_closing_the_eventfd_removes_the_irqfd():
    g = Guest(_main(1))
    efd = eventfd()
    irqfd(g.pt, efd, 1)
    assert _irqfds() == 1
    os.close(efd)
    assert _wait_irqfds(0) == 0, "EPOLLHUP tears the irqfd down"
    g.close()


def test_closing_the_partition_fd_removes_irqfds_and_doorbells():
    g = Guest(_main(1))
    efds = [eventfd() for _ in range(3)]
    for i, fd in enumerate(efds[:2]):
        irqfd(g.pt, fd, i)
    ioeventfd(g.pt, efds[2], length=4)
    assert _irqfds() == 2 and sim_query()["ports"] == 1
    g.close()
    assert _irqfds() == 0 and sim_query()["ports"] == 0 and sim_query()["connections"] == 0
    for fd in efds:
        os.close(fd)


def test_deassigned_irqfd_injects_no_more_even_while_racing_a_fire():
    g = Guest(_main(1))
    efd = eventfd()
    routing(g.pt, [(1, *msi(VEC))])
    irqfd(g.pt, efd, 1)
    stop = threading.Event()

    def fire():
        while not stop.is_set():
            os.eventfd_write(efd, 1)
    t = threading.Thread(target=fire)
    t.start()
    time.sleep(0.2)
    irqfd(g.pt, efd, 1, deassign=True)
    before = avi_calls()
    time.sleep(0.2)
    stop.set()
    t.join()
    assert avi_calls() == before, "an injection after DEASSIGN returned"
    os.close(efd)
    g.close()


def test_routing_replaced_while_irqfds_fire():
    g = Guest(_main(1), vectors=(VEC, VEC2))
    efds = [eventfd() for _ in range(4)]
    for i, fd in enumerate(efds):
        irqfd(g.pt, fd, i)
    stop = threading.Event()

    def fire(fd):
        while not stop.is_set():
            os.eventfd_write(fd, 1)
    threads = [threading.Thread(target=fire, args=(fd,)) for fd in efds]
    for t in threads:
        t.start()
    for k in range(50):
        vec = VEC if k % 2 else VEC2
        routing(g.pt, [(i, *msi(vec)) for i in range(4)] if k % 5 else [])
    stop.set()
    for t in threads:
        t.join()
    routing(g.pt, [(0, *msi(VEC))])
    assert avi_calls() > 0
    for fd in efds:
        os.close(fd)
    g.close()


def test_resample_signals_after_the_guests_eoi_and_the_line_reasserts():
    """A level-triggered line (irqfd with resample): each EOI of the vector
    signals the resamplefd; the VMM re-asserts while its line is high (once
    here), and the guest takes the interrupt twice."""
    g = Guest(_main(2))
    efd, rfd = eventfd(), eventfd()
    routing(g.pt, [(9, *msi(VEC, level=True))])
    irqfd(g.pt, efd, 9, resamplefd=rfd)
    resamples = []

    def device():
        os.eventfd_write(efd, 1)                  # the line goes high
        resamples.append(efd_wait(rfd, 1))        # EOI #1: still high, assert again
        os.eventfd_write(efd, 1)
        resamples.append(efd_wait(rfd, 1))        # EOI #2: the line is low now
    t = later(0.3, device)
    msg = g.vp.run()
    t.join()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    assert g.counter() == 2, g.counter()
    assert resamples == [1, 1], resamples
    os.close(efd)
    os.close(rfd)
    g.close()


def test_resample_is_keyed_by_the_gsi_of_the_eoied_vector():
    """Two level-triggered GSIs on two vectors: the EOI of one signals only
    its own resamplefd (upstream passed the vector where the GSI belongs)."""
    g = Guest(_main(1), vectors=(VEC, VEC2))
    e1, r1, e2, r2 = eventfd(), eventfd(), eventfd(), eventfd()
    routing(g.pt, [(VEC2, *msi(VEC, level=True)), (2, *msi(VEC2, level=True))])
    irqfd(g.pt, e1, VEC2, resamplefd=r1)         # gsi numbered like the other vector
    irqfd(g.pt, e2, 2, resamplefd=r2)
    t = later(0.3, os.eventfd_write, e1, 1)
    msg = g.vp.run()
    t.join()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    assert efd_wait(r1, 1) == 1
    assert efd_wait(r2, 1, timeout=0.5) == 0
    for fd in (e1, r1, e2, r2):
        os.close(fd)
    g.close()


def test_resample_irqfd_is_level_triggered_whatever_its_route_says():
    """An irqfd with a resamplefd is a level-triggered line: even on a route
    programmed edge-triggered, the guest's EOI comes back and resamples."""
    g = Guest(_main(1))
    efd, rfd = eventfd(), eventfd()
    routing(g.pt, [(4, *msi(VEC, level=False))])
    irqfd(g.pt, efd, 4, resamplefd=rfd)
    t = later(0.3, os.eventfd_write, efd, 1)
    msg = g.vp.run()
    t.join()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    assert efd_wait(rfd, 1) == 1
    os.close(efd)
    os.close(rfd)
    g.close()


# -- ioeventfd ----------------------------------------------------------------

# write DOORBELL with size 1, 2, 4 (mov) or 8 (fld1; fistp qword), then cli; hlt
WRITES = {
    1: bytes([0xC6, 0x06]) + struct.pack("<HB", DOORBELL, 0x11),
    2: bytes([0xC7, 0x06]) + struct.pack("<HH", DOORBELL, 0x2222),
    4: bytes([0x66, 0xC7, 0x06]) + struct.pack("<HI", DOORBELL, 0x44444444),
    8: bytes([0xD9, 0xE8, 0xDF, 0x3E]) + struct.pack("<H", DOORBELL),
}
CLI_HLT = bytes([0xFA, 0xF4])


def _doorbell_guest(code):
    return Guest(code + CLI_HLT)


def test_doorbell_of_each_length_fires_without_an_exit():
    for length, write in WRITES.items():
        g = _doorbell_guest(write)
        bell = eventfd()
        ioeventfd(g.pt, bell, length=length)
        msg = g.vp.run()
        assert msg_type(msg) == S.HVMSG_X64_HALT, (length, hex(msg_type(msg)))
        assert efd_wait(bell, 1) == 1, length
        os.close(bell)
        g.close()


def test_doorbell_length_zero_matches_any_size():
    g = _doorbell_guest(WRITES[1] + WRITES[4])
    bell = eventfd()
    ioeventfd(g.pt, bell, length=0)
    msg = g.vp.run()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    assert efd_wait(bell, 2) == 2
    os.close(bell)
    g.close()


def test_doorbell_of_another_size_is_an_ordinary_exit():
    g = _doorbell_guest(WRITES[4] + WRITES[2])
    bell = eventfd()
    ioeventfd(g.pt, bell, length=4)                  # any value, 4 bytes only
    msg = g.vp.run()
    assert msg_type(msg) == S.HVMSG_UNMAPPED_GPA, hex(msg_type(msg))       # the 2-byte write
    m = S.hv_x64_memory_intercept_message.from_buffer_copy(bytes(msg)[16:])
    assert m.guest_physical_address == DOORBELL
    assert efd_wait(bell, 1) == 1, "the 4-byte write fired"
    os.close(bell)
    g.close()


def test_doorbell_datamatch_fires_only_for_its_value():
    for value, fires in ((0x44444444, True), (0x12345678, False)):
        g = _doorbell_guest(WRITES[4])
        bell = eventfd()
        ioeventfd(g.pt, bell, length=4, datamatch=value)
        msg = g.vp.run()
        want = S.HVMSG_X64_HALT if fires else S.HVMSG_UNMAPPED_GPA
        assert msg_type(msg) == want, (hex(value), hex(msg_type(msg)))
        assert efd_wait(bell, 1, timeout=1.0 if fires else 0.3) == int(fires), hex(value)
        os.close(bell)
        g.close()


def test_doorbell_ring_overflow_loses_no_signal():
    """More doorbell writes than the event ring holds (63) before the root
    drains it, then one write to a second doorbell while the ring is full:
    the hypervisor keeps what did not fit (coalesced per port, see
    docs/hvsim-model.md) until the root reports the ring drained, so both
    eventfds fire, the first at least once past the ring's capacity."""
    n = 150
    code = bytes([0xB9]) + struct.pack("<H", n) + bytes([0xA2]) + struct.pack("<H", DOORBELL) \
        + bytes([0xE2, 0xFB])                       # mov cx, n; L: mov [DOORBELL], al; loop L
    code += bytes([0xA2]) + struct.pack("<H", DOORBELL + 8)     # mov [DOORBELL + 8], al
    g = _doorbell_guest(code)
    a, b = eventfd(), eventfd()
    ioeventfd(g.pt, a, length=1)
    ioeventfd(g.pt, b, addr=DOORBELL + 8, length=1)
    msg = g.vp.run()
    assert msg_type(msg) == S.HVMSG_X64_HALT, hex(msg_type(msg))
    assert efd_wait(b, 1) == 1, "the write made while the ring was full was lost"
    got = efd_wait(a, n, timeout=1.0)
    assert 63 < got <= n, f"{got} signals for {n} writes"
    os.close(a)
    os.close(b)
    g.close()


def test_ioeventfd_errors():
    g = Guest(_main(1))
    bell = eventfd()
    expect_errno(errno.EOPNOTSUPP, ioeventfd, g.pt, bell, 0x3f8, 1, None, False,
                 1 << S.MSHV_IOEVENTFD_BIT_PIO)
    expect_errno(errno.EINVAL, ioeventfd, g.pt, bell, DOORBELL, 3)
    expect_errno(errno.EINVAL, ioeventfd, g.pt, bell, 2**64 - 4, 8)
    expect_errno(errno.EINVAL, ioctl, g.pt.fd, S.MSHV_IOEVENTFD,
                 S.mshv_user_ioeventfd(addr=DOORBELL, len=4, fd=bell, flags=1 << 3))
    a = S.mshv_user_ioeventfd(addr=DOORBELL, len=4, fd=bell)
    a.rsvd[0] = 1
    expect_errno(errno.EINVAL, ioctl, g.pt.fd, S.MSHV_IOEVENTFD, a)
    expect_errno(errno.EBADF, ioeventfd, g.pt, 1000)
    with open("/dev/null") as f:
        expect_errno(errno.EINVAL, ioeventfd, g.pt, f.fileno())
    expect_errno(errno.ENOENT, ioeventfd, g.pt, bell, DOORBELL, 4, None, True)
    assert sim_query()["ports"] == 0, "no failed call left a port behind"
    os.close(bell)
    g.close()


def test_failed_doorbell_connection_leaves_no_port():
    g = Guest(_main(1))
    bell = eventfd()
    sim_control("fail_next connect_port HV_STATUS_INVALID_PARAMETER")
    expect_errno(errno.EINVAL, ioeventfd, g.pt, bell, DOORBELL, 4)
    assert sim_query()["ports"] == 0 and sim_query()["connections"] == 0
    ioeventfd(g.pt, bell, length=4)                  # and the address is free
    os.close(bell)
    g.close()


def test_overlapping_ioeventfds_are_eexist():
    g = Guest(_main(1))
    a, b = eventfd(), eventfd()
    ioeventfd(g.pt, a, length=4, datamatch=1)
    expect_errno(errno.EEXIST, ioeventfd, g.pt, b, DOORBELL, 4, 1)       # same match
    expect_errno(errno.EEXIST, ioeventfd, g.pt, b, DOORBELL, 4)          # wildcard
    expect_errno(errno.EEXIST, ioeventfd, g.pt, b, DOORBELL, 0, 1)       # any length
    ioeventfd(g.pt, b, length=4, datamatch=2)                            # another value: fine
    ioeventfd(g.pt, b, length=2)                                         # another length: fine
    ioeventfd(g.pt, b, addr=DOORBELL + 8, length=4)                      # elsewhere: fine
    assert sim_query()["ports"] == 4 and sim_query()["connections"] == 4
    ioeventfd(g.pt, b, length=2, deassign=True)
    expect_errno(errno.ENOENT, ioeventfd, g.pt, b, DOORBELL, 2, None, True)
    assert sim_query()["ports"] == 3
    os.close(a)
    os.close(b)
    g.close()


# -- creation flags of Linux 7.0 ----------------------------------------------

def test_nested_and_smt_creation_flags_are_accepted():
    mshv = open_mshv()
    flags = (1 << S.MSHV_PT_BIT_NESTED_VIRTUALIZATION) | (1 << S.MSHV_PT_BIT_SMT_ENABLED_GUEST)
    pt = Partition(mshv, flags=flags)
    q = sim_query()
    got = q["creation_flags"][str(q["partitions"][0])]
    want = (S.HV_PARTITION_CREATION_FLAG_NESTED_VIRTUALIZATION_CAPABLE
            | S.HV_PARTITION_CREATION_FLAG_SMT_ENABLED_GUEST)
    assert got & want == want, f"the hypervisor got creation flags {got:#x}"
    pt.close()
    os.close(mshv)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
