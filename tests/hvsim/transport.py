"""Host side of the hvsim guest<->simulator transport (stdlib only).

Design (details in docs/hvsim-transport.md):

* Guest RAM is a shared file (``RootVM.ram_path``); GPA == file offset.
  ``Transport`` mmaps it, so requests and responses are plain memory.
* Doorbell (guest -> host): the guest writes ``v`` as 4 ``outb`` (little
  endian, under a spinlock) to DOORBELL_PORT
  of an ``isa-debugcon`` device whose chardev is a unix socket served here.
  ``v = request_page_gpa | cpu`` (page aligned GPA below 4 GiB, cpu < 4096).
  (isa-debugcon drops 2/4-byte accesses.)
* Completion: each request page starts with a 16-byte header
  ``{u32 state; u32 cpu; u64 seq}``.  The guest sets state=PENDING before
  ringing; after ``handle(cpu, gpa)`` returned (it wrote the response into
  RAM) the transport writes state=DONE; the guest spins on it.
* Interrupt (host -> guest): ``raise_interrupt(value)`` writes one byte to a
  16550 UART (``isa-serial`` at IRQ_PORT/IRQ) through its chardev socket;
  the guest module owns the UART (RX interrupt) and reads the byte.

Doorbells are read on one thread and served by one worker per request page
(doorbell word), each in arrival order: a CPU has one request outstanding
per page, and a long one (a VP dispatch on the CPU's dispatch page) stalls
neither other CPUs nor the requests the same CPU's interrupt handlers make
on its other page meanwhile.
"""

from __future__ import annotations

import mmap
import queue
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable

# Guest-visible constants; keep in sync with transport_probe/probe.c and
# the module's hvsim seam.
DOORBELL_PORT = 0x4F0      # isa-debugcon iobase (free on q35)
IRQ_PORT = 0x2A0           # 16550 iobase: not a legacy COM port, so the
IRQ = 5                    # built-in 8250 driver never probes it
STATE_PENDING = 1
STATE_DONE = 2
HDR = struct.Struct("<IIQ")  # state, cpu, seq
CPU_MASK = 0xFFF
PAGE_SIZE = 4096

Handler = Callable[[int, int], None]


class TransportError(RuntimeError):
    pass


class Transport:
    """Serve doorbells / raise interrupts for one QEMU guest.

    Usage::

        t = Transport(workdir, handle)          # creates listening sockets
        vm = RootVM(..., extra_qemu_args=t.qemu_args())
        vm.start()
        t.start(vm.ram_path, vm.mem_size)       # accept + mmap + serve
        ...
        t.close()
    """

    def __init__(self, workdir: Path | str, handle: Handler | None = None,
                 doorbell_port: int = DOORBELL_PORT, irq_port: int = IRQ_PORT,
                 irq: int = IRQ) -> None:
        self.workdir = Path(workdir)
        self.handle = handle
        self.doorbell_port = doorbell_port
        self.irq_port = irq_port
        self.irq = irq
        self.db_path = self.workdir / "hvsim-doorbell.sock"
        self.irq_path = self.workdir / "hvsim-irq.sock"
        self._db_listen = self._listen(self.db_path)
        self._irq_listen = self._listen(self.irq_path)
        self._db: socket.socket | None = None
        self._irq: socket.socket | None = None
        self._irq_lock = threading.Lock()
        self.mem: mmap.mmap | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.error: BaseException | None = None
        self.error_text = ""                     # its traceback
        # called (once, from the failing thread) when a handler raises: the
        # simulator stops the VM at once instead of letting the guest CPU
        # spin on a request nobody will answer
        self.on_error: Callable[[BaseException], None] | None = None
        self._workers_lock = threading.Lock()
        self._queues: dict = {}      # doorbell word (page | cpu) -> its queue
        self.doorbells = 0           # served requests
        self.handle_ns = 0           # time spent in handle() + completion

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(1)
        return s

    def qemu_args(self) -> list[str]:
        """QEMU arguments for the two devices (QEMU connects as client)."""
        return [
            "-chardev", f"socket,id=hvsimdb,path={self.db_path}",
            "-device", f"isa-debugcon,chardev=hvsimdb,iobase={self.doorbell_port:#x}",
            "-chardev", f"socket,id=hvsimirq,path={self.irq_path}",
            "-device", (f"isa-serial,chardev=hvsimirq,iobase={self.irq_port:#x},"
                        f"irq={self.irq}"),
        ]

    # --- lifecycle ---------------------------------------------------------
    def start(self, ram_path: Path | str, ram_size: int,
              accept_timeout: float = 30.0) -> None:
        """Map guest RAM, accept QEMU's connections, start serving."""
        fd = os.open(ram_path, os.O_RDWR)
        try:
            self.mem = mmap.mmap(fd, ram_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        for ls in (self._db_listen, self._irq_listen):
            ls.settimeout(accept_timeout)
        self._db, _ = self._db_listen.accept()
        self._irq, _ = self._irq_listen.accept()
        self._db.settimeout(None)
        self._thread = threading.Thread(target=self._serve, name="hvsim-doorbell",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with self._workers_lock:
            for q in self._queues.values():
                q.put(None)
        for s in (self._db, self._irq, self._db_listen, self._irq_listen):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:      # a caller still holds a memoryview
                pass
        for p in (self.db_path, self.irq_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- guest memory ------------------------------------------------------
    # GPA == offset in the RAM file (all RAM below 2 GiB on q35).
    def read(self, gpa: int, size: int) -> bytes:
        return self.mem[gpa:gpa + size]

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa:gpa + len(data)] = data

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.mem, gpa)[0]

    def write_u32(self, gpa: int, v: int) -> None:
        struct.pack_into("<I", self.mem, gpa, v)

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.mem, gpa)[0]

    def write_u64(self, gpa: int, v: int) -> None:
        struct.pack_into("<Q", self.mem, gpa, v)

    # --- doorbell ----------------------------------------------------------
    def _serve(self) -> None:
        buf = b""
        try:
            while not self._closing:
                data = self._db.recv(4096)
                if not data:
                    break                       # QEMU exited
                buf += data
                n = len(buf) // 4 * 4
                for (word,) in struct.iter_unpack("<I", buf[:n]):
                    self._dispatch(word)
                buf = buf[n:]
        except OSError:
            if not self._closing:
                raise
        except BaseException as e:              # surface handler bugs
            self._fail(e)
            raise

    def _dispatch(self, word: int) -> None:
        """Hand the request to the worker of its page: a page has at most one
        request outstanding (its CPU spins until DONE), so per-page workers
        keep each page's order, while a long request (a VP dispatch, on the
        CPU's dispatch page) stalls neither the other CPUs nor the requests
        that the same CPU's interrupt handlers make on its other page."""
        with self._workers_lock:
            q = self._queues.get(word)
            if q is None:
                q = self._queues[word] = queue.SimpleQueue()
                threading.Thread(target=self._work, args=(q,),
                                 name=f"hvsim-cpu{word & CPU_MASK}-{word & ~CPU_MASK:#x}",
                                 daemon=True).start()
        q.put(word)

    def _work(self, q) -> None:
        while True:
            word = q.get()
            if word is None:
                return
            try:
                self._serve_one(word)
            except BaseException as e:          # surface handler bugs
                self._fail(e)
                return

    def _fail(self, e: BaseException) -> None:
        import traceback
        first = self.error is None
        if first:
            self.error = e
            self.error_text = "".join(traceback.format_exception(e))
            if self.on_error:
                self.on_error(e)

    def _serve_one(self, word: int) -> None:
        t0 = time.perf_counter_ns()
        cpu, gpa = word & CPU_MASK, word & ~CPU_MASK
        state, hcpu, _seq = HDR.unpack_from(self.mem, gpa)
        if state != STATE_PENDING or hcpu != cpu:
            raise TransportError(f"bad doorbell {word:#x}: state={state} "
                                 f"hdr.cpu={hcpu}")
        if self.handle is not None:
            self.handle(cpu, gpa)
        # The state word is written last (x86 TSO keeps the order of the
        # stores above); values < 256, so even a byte-wise copy cannot tear.
        self.write_u32(gpa, STATE_DONE)
        with self._workers_lock:
            self.doorbells += 1
            self.handle_ns += time.perf_counter_ns() - t0

    # --- interrupt -----------------------------------------------------------
    def raise_interrupt(self, value: int = 0) -> None:
        """Send one byte (value & 0xff) to the guest's UART -> RX interrupt.

        Bytes queue in the socket and QEMU delivers the next one only after
        the guest read the previous one (FIFO off), so none is lost.
        """
        with self._irq_lock:
            self._irq.sendall(bytes([value & 0xFF]))
