"""Boot Debian's stock kernel in a child partition of the model (no QEMU).

A minimal VMM over the model's test root (model/testkit.py issues the same
hypercalls the driver does): it loads a bzImage with the Linux x86 64-bit
boot protocol, gives it an e820 map, a command line and an initramfs, and
answers its intercepts: a 16550 at 0x3F8 whose output it prints, every other
port reading all ones, MMIO reads of unmapped GPAs all ones and writes
dropped. It measures how far and how fast the kernel gets, which is what the
model's engine and guest platform are for; the real VMM (issue 10) drives
/dev/mshv instead.

    python3 tests/hvsim/linux_child.py [--kernel 6.12.117+deb12] [--mem 256]
        [--seconds 120] [--until 'Run /init'] [--cmdline '...']
"""

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model.testkit import Root, S, seg_pack, table_pack  # noqa: E402
from model.cpu import decode_mov  # noqa: E402

MB = 1 << 20
ZERO_PAGE, CMDLINE, GDT, PML4 = 0x7000, 0x20000, 0x500, 0x9000
LOAD = 0x1000000                    # the kernel's preferred load address (16 MiB)
COM1 = 0x3F8
DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 rdinit=/init"


def kernel_path(version):
    from rootvm import kernel_image
    return kernel_image(version)


def small_initramfs():
    """newc cpio: /init (busybox sh) that prints a marker and powers off."""
    from rootvm import cache_dir
    bb = (cache_dir() / "busybox" / "bin" / "busybox").read_bytes()

    def entry(name, data, mode):
        hdr = "070701" + "".join("%08X" % v for v in (
            0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
        out = hdr.encode() + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        return out + b"\0" * (-len(out) % 4)
    # printed through /dev/kmsg: the console driver writes kernel messages by
    # polling, while a tty write would wait for a UART interrupt this VMM
    # does not raise
    init = (b"#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\n"
            b"/bin/busybox echo HVSIM-CHILD-INIT $(/bin/busybox uname -r) > /dev/kmsg\n"
            b"/bin/busybox poweroff -f\n")
    arc = (entry("bin", b"", 0o40755) + entry("dev", b"", 0o40755) + entry("bin/busybox", bb, 0o100755)
           + entry("init", init, 0o100755) + entry("TRAILER!!!", b"", 0))
    return arc + b"\0" * (-len(arc) % 512)


class Vmm:
    def __init__(self, mem_mb, out=sys.stdout):
        self.root = Root(ram_mb=mem_mb + 64)
        # a DispatchVp with time slice 0 runs until something happens: the model
        # preempts it after SLICE seconds so that run() can check its time limit
        self.root.hv.dispatch_quantum = float(os.environ.get("SLICE", "0.5"))
        self.mem = mem_mb * MB
        self.out = out
        self.serial = bytearray()
        self.exits = {}
        self.lsr_reads = 0
        pid = self.root.new_guest()
        self.pid = pid
        for gfn in range(0, self.mem // 4096, 256):
            self.root.map_ram(pid, gfn, 256)
        self.msg = self.root.map_state_page(pid, 0, S.HV_VP_STATE_PAGE_INTERCEPT_MESSAGE)

    def write(self, gpa, data):
        self.root.gwrite(self.pid, gpa, data)

    def load_bzimage(self, image, initrd, cmdline):
        bz = image
        if bz[0x202:0x206] != b"HdrS":
            raise SystemExit("not a bzImage")
        setup_sects = bz[0x1F1] or 4
        version, = struct.unpack_from("<H", bz, 0x206)
        xload, = struct.unpack_from("<H", bz, 0x236)
        if version < 0x20C or not xload & 1:
            raise SystemExit("kernel lacks the 64-bit entry (protocol %x)" % version)
        kernel = bz[(setup_sects + 1) * 512:]
        self.write(LOAD, kernel)
        zp = bytearray(4096)
        hdr_end = 0x202 + bz[0x201]
        zp[0x1F1:hdr_end] = bz[0x1F1:hdr_end]
        zp[0x210] = 0xFF                                    # type_of_loader: undefined
        zp[0x211] |= 0x01 | 0x80                            # LOADED_HIGH | CAN_USE_HEAP
        struct.pack_into("<H", zp, 0x224, 0xFE00)           # heap_end_ptr
        struct.pack_into("<I", zp, 0x228, CMDLINE)
        self.write(CMDLINE, cmdline.encode() + b"\0")
        rd = (self.mem - len(initrd) - MB) & ~0xFFF
        self.write(rd, initrd)
        struct.pack_into("<II", zp, 0x218, rd, len(initrd))
        e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2), (MB, self.mem - MB, 1)]
        for k, (a, n, t) in enumerate(e820):
            struct.pack_into("<QQI", zp, 0x2D0 + 20 * k, a, n, t)
        zp[0x1E8] = len(e820)
        self.write(ZERO_PAGE, bytes(zp))
        # identity map of the first 4 GiB with 2 MiB pages, 64-bit GDT (0x10 code, 0x18 data)
        self.write(PML4, struct.pack("<Q", (PML4 + 0x1000) | 3))
        self.write(PML4 + 0x1000, b"".join(struct.pack("<Q", (PML4 + 0x2000 + 0x1000 * i) | 3) for i in range(4)))
        for i in range(4):
            self.write(PML4 + 0x2000 + 0x1000 * i,
                       b"".join(struct.pack("<Q", ((i * 512 + j) << 21) | 0x83) for j in range(512)))
        self.write(GDT, struct.pack("<4Q", 0, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
        R = S
        data = seg_pack((0, 0xFFFFFFFF, 0x18, 0xC093))
        regs = [(R.HV_X64_REGISTER_CR3, PML4), (R.HV_X64_REGISTER_CR4, 0x20),
                (R.HV_X64_REGISTER_EFER, 0x500), (R.HV_X64_REGISTER_CR0, 0x80000011),
                (R.HV_X64_REGISTER_GDTR, table_pack((GDT, 31))),
                (R.HV_X64_REGISTER_CS, seg_pack((0, 0xFFFFFFFF, 0x10, 0xA09B))),
                (R.HV_X64_REGISTER_DS, data), (R.HV_X64_REGISTER_ES, data), (R.HV_X64_REGISTER_SS, data),
                (R.HV_X64_REGISTER_RIP, LOAD + 0x200), (R.HV_X64_REGISTER_RSI, ZERO_PAGE),
                (R.HV_X64_REGISTER_RSP, 0x8FF0), (R.HV_REGISTER_EXPLICIT_SUSPEND, 0)]
        assert self.root.set_regs(self.pid, 0, regs)[0] == S.HV_STATUS_SUCCESS

    # ------------------------------------------------------------ intercepts
    def _complete(self, rip_len, pairs=()):
        R = S
        rip = self.root.get_regs(self.pid, 0, [R.HV_X64_REGISTER_RIP])[0]
        regs = list(pairs) + [(R.HV_X64_REGISTER_RIP, rip + rip_len)]
        assert self.root.set_regs(self.pid, 0, regs)[0] == S.HV_STATUS_SUCCESS

    def io(self, payload):
        m = S.hv_x64_io_port_intercept_message.from_bytes(payload)
        port = m.port_number
        size = m.access_info & 7
        write = m.header.intercept_access_type == S.HV_INTERCEPT_ACCESS_WRITE
        length = m.header.instruction_length_cr8 & 0xF
        if m.access_info & 0x18:
            raise SystemExit("string I/O at port 0x%x not handled" % port)
        if write:
            if port == COM1:
                ch = m.rax & 0xFF
                self.serial.append(ch)
                self.out.write(chr(ch))
                self.out.flush()
            self._complete(length)
            return
        value = (1 << (8 * size)) - 1
        if port == COM1 + 5:
            value = 0x60                                    # LSR: THR empty, transmitter idle
        elif COM1 <= port <= COM1 + 7:
            value = 0
        mask = (1 << (8 * size)) - 1
        rax = (m.rax & ~mask) | (value & mask) if size < 4 else value & 0xFFFFFFFF
        self._complete(length, [(S.HV_X64_REGISTER_RAX, rax)])

    def mmio(self, payload):
        m = S.hv_x64_memory_intercept_message.from_bytes(payload)
        insn = bytes(m.instruction_bytes[:m.instruction_byte_count])
        long64 = bool(m.header.execution_state >> 2 & 1)    # efer_lma
        mov, length = decode_mov(insn, True, True)
        if mov is None:
            raise SystemExit("MMIO at 0x%x by a non-MOV instruction %s" % (m.guest_physical_address, insn.hex()))
        pairs = []
        if not mov["store"]:
            names = ["RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI"] + ["R%d" % i for i in range(8, 16)]
            reg = getattr(S, "HV_X64_REGISTER_" + names[mov["reg"]])
            pairs.append((reg, (1 << (8 * min(mov["size"], 8))) - 1))
        del long64
        self._complete(length, pairs)

    def run(self, seconds, until):
        start = time.monotonic()
        flags = 0
        while time.monotonic() - start < seconds:
            state, event = self.root.dispatch(self.pid, 0, flags)
            flags = 0
            if event != S.HV_VP_DISPATCH_EVENT_INTERCEPT:
                continue
            mtype, payload = self.root.message(self.msg)
            name = {S.HVMSG_X64_IO_PORT_INTERCEPT: "io", S.HVMSG_UNMAPPED_GPA: "mmio",
                    S.HVMSG_X64_HALT: "halt"}.get(mtype, hex(mtype))
            self.exits[name] = self.exits.get(name, 0) + 1
            flags = S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND
            if name == "io":
                self.io(payload)
            elif name == "mmio":
                self.mmio(payload)
            elif name == "halt":
                return "halted"
            else:
                return "intercept %s" % name
            if until and until.encode() in self.serial:
                return "reached %r" % until
        return "time limit"


def main(argv=None):
    ap = argparse.ArgumentParser(description="boot Debian's kernel in a child partition of the model")
    ap.add_argument("--kernel", default="6.12.117+deb12")
    ap.add_argument("--mem", type=int, default=256, help="guest MiB")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--until", default="HVSIM-CHILD-INIT")
    ap.add_argument("--cmdline", default=DEFAULT_CMDLINE)
    args = ap.parse_args(argv)
    vmm = Vmm(args.mem)
    vmm.load_bzimage(kernel_path(args.kernel).read_bytes(), small_initramfs(), args.cmdline)
    t0 = time.monotonic()
    try:
        result = vmm.run(args.seconds, args.until)
    finally:
        eng = vmm.root.hv.partitions[vmm.pid].vps[0].engine
        print("\n--- %s after %.1f s; intercepts %s; engine exits %s" % (
            locals().get("result", "error"), time.monotonic() - t0, vmm.exits, eng and eng.exits))
        vmm.root.close()


if __name__ == "__main__":
    main()
