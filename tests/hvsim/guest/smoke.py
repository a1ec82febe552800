"""The hvsim smoke test: a real-mode guest writes '4' to port 0x3f8 and halts.

Runs inside the simulated root partition; prints TAP.
"""

import os
import stat
import sys

import mshv_spec as S
from mshvlib import GuestMemory, Partition, open_mshv, run_tests

# mov $0x3f8,%dx; add %bl,%al; add $'0',%al; out %al,(%dx); hlt
CODE = bytes([0xBA, 0xF8, 0x03, 0x00, 0xD8, 0x04, 0x30, 0xEE, 0xF4])
OUT_OFFSET = 7      # the `out` is the 8th byte
RAX, RBX = 0, 3     # register page gp_registers[] order: rax rcx rdx rbx ...
CS = 1              # segments[]: es cs ss ds fs gs


def test_smoke_dev_mshv_mode():
    st = os.stat("/dev/mshv")
    assert stat.S_ISCHR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


def test_smoke_real_mode_guest():
    mshv = open_mshv()
    pt = Partition(mshv)
    mem = GuestMemory(4096)
    mem.write(0, CODE)
    pt.map(mem, 0x1000)
    vp = pt.vp(0)
    r = vp.regs
    assert r.isvalid == 1, "the hypervisor fills the register page"
    r.gp_registers[RAX] = 2
    r.gp_registers[RBX] = 2
    r.rip = 0x1000
    r.segments[CS].base = 0
    r.segments[CS].selector = 0
    r.dirty |= (S.HV_X64_REGISTER_PAGE_DIRTY_GENERAL | S.HV_X64_REGISTER_PAGE_DIRTY_IP |
                S.HV_X64_REGISTER_PAGE_DIRTY_SEGMENT)

    msg = vp.run()
    assert msg.header.message_type == S.HVMSG_X64_IO_PORT_INTERCEPT, hex(msg.header.message_type)
    io = S.hv_x64_io_port_intercept_message.from_buffer_copy(bytes(msg)[16:])
    hdr = io.header
    assert io.port_number == 0x3F8
    assert io.bits("access_info", "access_size") == 1
    assert hdr.intercept_access_type == S.HV_INTERCEPT_ACCESS_WRITE
    assert io.rax & 0xFF == ord("4"), hex(io.rax)
    assert hdr.rip == 0x1000 + OUT_OFFSET, hex(hdr.rip)
    assert hdr.bits("instruction_length_cr8", "instruction_length") == 1
    print(f"# IO port intercept: port {io.port_number:#x} wrote {chr(io.rax & 0xff)!r} "
          f"at rip {hdr.rip:#x}", flush=True)

    # the VMM advances RIP, through the register page
    r.rip = hdr.rip + hdr.bits("instruction_length_cr8", "instruction_length")
    r.dirty |= S.HV_X64_REGISTER_PAGE_DIRTY_IP
    msg = vp.run()
    assert msg.header.message_type == S.HVMSG_X64_HALT, hex(msg.header.message_type)
    print("# HALT intercept", flush=True)
    del r       # the register page mapping can only close without users
    pt.close()
    os.close(mshv)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), only=sys.argv[1:] or None))
