"""hvsim glue: one simulated root partition = QEMU (rootvm) + the transport +
the hypervisor model, wired together.

    with Simulator(script, files, kernel="6.12.117+deb12", scheduler="root") as sim:
        result = sim.run()          # boots, runs the script, waits
        sim.hv.stats()              # the model, for host-side checks

The request pages the module sends (struct hvsim_request) are decoded with
the generated bindings; see docs/hvsim-transport.md.
"""

import json
import os
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "gen" / "python"))

import mshv_spec as S  # noqa: E402
from rootvm import RootVM, version_for_headers  # noqa: E402
from transport import Transport  # noqa: E402

from model import Hypervisor  # noqa: E402
from model.memory import MmapRam  # noqa: E402

ROOT_IRQ_OFF = S.hvsim_request.OFFSETS["root_irq"]


def module_path(kernel_version):
    """The hvsim build of mshv_root.ko for a Debian kernel version."""
    kver = kernel_version + "-amd64"
    ko = ROOT / "build" / f"{kver}-hvsim" / "mshv_root.ko"
    if not ko.is_file():
        raise FileNotFoundError(f"{ko}: run 'make debian-modules HVSIM=1' first")
    return ko


def kernel_versions():
    """Debian kernel versions the project builds for, oldest first:
    the newest installed 6.1.0-N and 6.12.N+deb12 (see scripts/kernels.sh)."""
    import subprocess
    out = subprocess.run([str(ROOT / "scripts" / "kernels.sh")], capture_output=True,
                         text=True, check=True).stdout.split()
    return [version_for_headers(k) for k in out]


def strict_cmdline(expect_warnings=False):
    """Kernel parameters that make the root strict about driver bugs:
    a WARN panics (unless the test expects one), fresh allocations are not
    zeroed (Debian zeroes them by default, which would hide a missing
    zeroing in the driver), and slab objects are poisoned and red-zoned so
    stale contents, overruns and use after free show (as BUG reports).
    slab_nomerge keeps each cache's reports under its own name."""
    args = ["init_on_alloc=0", "slub_debug=FZP", "slab_nomerge"]
    if not expect_warnings:
        args.append("panic_on_warn=1")
    return args


class Simulator:
    def __init__(self, script, files=None, kernel=None, scheduler="root", timeout=240,
                 echo=False, mem_mb=1024, reserved_mb=64, smp=2, expect_warnings=False):
        self.kernel = kernel or kernel_versions()[-1]
        self.scheduler = scheduler
        self.workdir = Path(tempfile.mkdtemp(prefix="hvsim-"))
        self.transport = Transport(self.workdir, self._handle)
        # a simulator exception ends the run at once (the guest CPU that made
        # the request would otherwise spin until the timeout)
        self.transport.on_error = lambda e: self.vm.kill()
        files = dict(files or {})
        files.setdefault("/hvsim/mshv_root.ko", module_path(self.kernel))
        files.setdefault("/hvsim/mshv_spec.py", ROOT / "gen" / "python" / "mshv_spec.py")
        self.vm = RootVM(script, files=files, kernel_version=self.kernel, mem_mb=mem_mb,
                         reserved_mb=reserved_mb, smp=smp, timeout=timeout,
                         extra_qemu_args=self.transport.qemu_args(), workdir=self.workdir,
                         extra_cmdline=strict_cmdline(expect_warnings), echo=echo)
        self.hv = None
        self.smp = smp
        self.requests = 0
        self.error = None
        self.error_text = ""
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.vm.kill()
        self.transport.close()

    def run(self):
        self.vm.start()
        self.transport.start(self.vm.ram_path, self.vm.mem_size)
        mem = MmapRam(self.transport.mem, self.vm.mem_size)
        self.hv = Hypervisor(mem, self.vm.reserved_base, self.vm.reserved_size,
                             scheduler=self.scheduler, notify=self._notify, ncpus=self.smp)
        result = self.vm.wait()
        if self.transport.error is not None:
            self.error = self.transport.error
            self.error_text = self.transport.error_text
        return result

    def log_text(self):
        """What to print when a test fails: the model's hypercall log."""
        try:
            return "\n".join(self.hv.log[-200:]) if self.hv else ""
        except Exception:   # noqa: BLE001
            return ""

    # -- transport callbacks ----------------------------------------------
    def _notify(self, cpu):
        self.transport.raise_interrupt(cpu)

    def _handle(self, cpu, gpa):
        mem = self.transport
        req = S.hvsim_request.from_bytes(mem.read(gpa, S.hvsim_request.SIZE))
        self.requests += 1
        if req.flags & ~S.HVSIM_REQUEST_CALLER_IRQS_ENABLED or req.rsvd1:
            raise ValueError(f"hvsim request with flags={req.flags:#x} rsvd1={req.rsvd1:#x}")
        irqs_on = bool(req.flags & S.HVSIM_REQUEST_CALLER_IRQS_ENABLED)
        op = req.op
        if op == S.HVSIM_OP_HELLO:
            req.arg0, req.arg1, req.arg2 = S.HVSIM_MAGIC, S.HVSIM_VERSION, self.vm.reserved_base
        elif self.hv is None:
            raise RuntimeError("request before the model exists")
        elif op == S.HVSIM_OP_HYPERCALL:
            # a CPU waiting with interrupts on flags the interrupts it takes in
            # root_irq: the model polls it while it runs a VP for this call
            flag = gpa + ROOT_IRQ_OFF
            poll = (lambda: mem.read_u32(flag) != 0) if irqs_on else None
            req.result = self.hv.hypercall(cpu, req.control, req.input_gpa, req.output_gpa,
                                           caller_irqs=irqs_on, root_irq=poll)
        elif op == S.HVSIM_OP_HYPERCALL_FAST:
            req.result = self.hv.hypercall_fast(cpu, req.control, req.in0, req.in1)
        elif op == S.HVSIM_OP_SYNIC_PAGES:
            # the root enabling its SynIC pages: SIMP, SIEFP, SIRBP (event rings)
            req.arg0, req.arg1, req.arg2 = self.hv.synic_pages(req.arg0, enable=True)
        elif op == S.HVSIM_OP_EOM:
            self.hv.eom(req.arg0)
        elif op == S.HVSIM_OP_ROOT_IRQ:
            # the CPU took an interrupt while its dispatch page (arg0, seq arg1)
            # was pending; if that request is still being served, it ends
            d = S.hvsim_request.from_bytes(mem.read(req.arg0, S.hvsim_request.SIZE))
            if (d.state == S.HVSIM_STATE_PENDING and d.cpu == cpu and d.seq == req.arg1
                    and req.arg0 != gpa):
                self.hv.root_interrupt(cpu)
        elif op == S.HVSIM_OP_QUERY:
            text = json.dumps(self.report()).encode()
            if len(text) > req.arg1:
                text = text[:req.arg1]
            mem.write(req.arg0, text)
            req.arg2 = len(text)
        elif op == S.HVSIM_OP_CONTROL:
            req.arg2 = self.control(mem.read(req.arg0, req.arg1).decode())
        else:
            raise ValueError(f"unknown hvsim op {op}")
        # write back everything but the state word (the transport sets it last)
        # and root_irq (the guest's while the request is pending)
        mem.write(gpa + 8, bytes(req)[8:ROOT_IRQ_OFF])

    def control(self, command):
        """Fault injection from inside the root (debugfs mshv_hvsim/control):
        'fail_next <hypercall> <HV_STATUS_x> [nth]', 'insufficient_memory_once
        <hypercall>', 'contiguous_next <hypercall> [root]', 'kick_form
        pair|bitset|overflow|random', 'async_next <hypercall>', 'rep_limit <n>
        [hypercall]', 'reset'.
        Returns 0 or 1."""
        words = command.split()
        try:
            if words[0] == "fail_next":
                nth = int(words[3]) if len(words) > 3 else 1
                self.hv.fail_next(S.HVCALL_BY_NAME[words[1]], getattr(S, words[2]), nth=nth)
            elif words[0] == "async_next":
                self.hv.async_next(S.HVCALL_BY_NAME[words[1]])
            elif words[0] == "insufficient_memory_once":
                self.hv.insufficient_memory_once(S.HVCALL_BY_NAME[words[1]])
            elif words[0] == "contiguous_next":
                if len(words) > 2 and words[2] != "root":
                    return 1
                self.hv.contiguous_next(S.HVCALL_BY_NAME[words[1]], root=len(words) > 2)
            elif words[0] == "kick_form":
                self.hv.kick_form = None if words[1] == "random" else words[1]
            elif words[0] == "rep_limit":
                code = S.HVCALL_BY_NAME[words[2]] if len(words) > 2 else None
                self.hv.set_rep_limit(int(words[1]), code=code)
            elif words[0] == "reset":
                self.hv.reset_faults()
            else:
                return 1
        except (IndexError, KeyError, AttributeError, ValueError):
            return 1
        return 0

    def report(self):
        """The introspection report tests read (debugfs mshv_hvsim/query):
        child partitions only; the root's own pool legitimately keeps the
        pages it was given for creating partitions."""
        st = self.hv.stats()
        root = self.hv.ROOT_ID
        kids = [p for p in st["live"]]
        return {
            "partitions": kids,
            "deposited_pages": sum(v for p, v in st["deposited_pages"].items() if p != root),
            "root_pool_pages": st["deposited_pages"].get(root, 0),
            # root pages charged to live objects (child partitions): 0 when none live
            "root_pool_used": st["root_pool_used"],
            "contract_violations": st["contract_violations"],
            "mappings": sum(v for p, v in st["mappings"].items() if p != root),
            "large_mappings": st["large_mappings"],
            "vps": sum(len(v) for p, v in st["vps"].items() if p != root),
            # ports / connections that involve a child partition (owned by one, or
            # a root port created for one, even if that partition is gone)
            "ports": st["ports_child"],
            "connections": st["connections_child"],
            # HvCallCreatePartition flags of each live child (JSON: id string -> int)
            "creation_flags": {pid: st["partitions"][pid]["flags"] for pid in kids},
            "calls": st["calls"],
            "statuses": st["statuses"],
            # scheduler kicks sent, by form (pair, bitset, overflow, *_merged)
            "kicks": st["kicks"],
            "scheduler": st["scheduler"],
        }
