#!/usr/bin/env python3
"""Build the transport probe module, boot each kernel, load it, check it.

    python3 tests/hvsim/transport_probe/run_probe.py [--kernel VER ...]
        [--nreq 1000] [--nirq 16] [--smp 2] [--echo]

For every kernel version (default: all of rootvm.DEFAULT_KERNEL_VERSIONS that
have a /usr/src/linux-headers-<ver>-amd64 tree) this builds probe.c with W=1,
boots a 2-vCPU TCG guest with the hvsim transport devices, insmods the probe,
serves its doorbells from a Transport and asserts the module's RESULT line.
Exit status 0 iff every kernel passed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import rootvm  # noqa: E402
from transport import Transport  # noqa: E402

# struct probe_req in probe.c: hdr(16) | u32 op | u32 pad | u64 arg | u64 result
OP_ECHO, OP_IRQS = 1, 2
REQ = struct.Struct("<IIQ")          # op, pad, arg   at offset 16
RESULT_OFF = 32


def build_probe(version: str, outdir: Path) -> Path:
    """Build probe.c against linux-headers-<version>-amd64 (W=1, no warnings)."""
    kdir = rootvm.headers_dir(version)
    src = outdir / f"probe-{version}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for f in ("probe.c", "Kbuild"):
        shutil.copy(HERE / f, src / f)
    r = subprocess.run(["make", "-C", str(kdir), f"M={src}", "W=1", "modules"],
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode or "warning:" in out:
        raise RuntimeError(f"probe build for {version} failed/warned:\n{out}")
    return src / "hvsim_probe.ko"


class ProbeSim:
    """The host half of the probe protocol (see probe.c)."""

    def __init__(self) -> None:
        self.t: Transport | None = None
        self.requests = 0

    def handle(self, cpu: int, gpa: int) -> None:
        t = self.t
        op, _pad, arg = REQ.unpack_from(t.mem, gpa + 16)
        self.requests += 1
        if op == OP_ECHO:
            t.write_u64(gpa + RESULT_OFF, (arg * 3 + cpu) & (2**64 - 1))
        elif op == OP_IRQS:
            t.write_u64(gpa + RESULT_OFF, arg)
            # Raise them from another thread, after the reply is complete,
            # spaced out so that most arrive as separate interrupts.
            def burst() -> None:
                for v in range(1, arg + 1):
                    time.sleep(0.002)
                    t.raise_interrupt(v)
            threading.Thread(target=burst, daemon=True).start()
        else:
            raise ValueError(f"probe: unknown op {op} from cpu{cpu}")


def run_one(version: str, nreq: int, nirq: int, echo: bool,
            timeout: float, smp: int = 2) -> tuple[bool, str]:
    work = Path(tempfile.mkdtemp(prefix="hvsim-probe-"))
    ko = build_probe(version, work)
    sim = ProbeSim()
    tr = Transport(work, sim.handle)
    sim.t = tr
    script = (f"insmod /hvsim/hvsim_probe.ko nreq={nreq} nirq={nirq} || exit 1\n"
              "cat /proc/interrupts | grep -E 'CPU|hvsim'\n"
              "rmmod hvsim_probe || exit 2\n")
    vm = rootvm.RootVM(script, files={"/hvsim/hvsim_probe.ko": ko},
                       kernel_version=version, smp=smp, timeout=timeout,
                       extra_qemu_args=tr.qemu_args(), workdir=work, echo=echo)
    with vm, tr:
        vm.start()
        tr.start(vm.ram_path, vm.mem_size)
        res = vm.wait()
    m = re.search(r"hvsim-probe: RESULT (\w+) (.*)", res.output)
    ok = (res.exit_code == 0 and m is not None and m.group(1) == "PASS"
          and tr.error is None and "unloaded" in res.output)
    host_us = tr.handle_ns / max(1, tr.doorbells) / 1000
    lines = [f"== {version}: {'PASS' if ok else 'FAIL'}",
             f"   {res.summary()}",
             f"   probe: {m.group(0) if m else 'no RESULT line'}",
             f"   host: {tr.doorbells} doorbells served, "
             f"{host_us:.1f} us/request inside the host handler",
             f"   log: {res.log_path}"]
    lines += [f"   {l}" for l in res.output.splitlines()
              if "hvsim-probe: cpu" in l]
    if tr.error:
        lines.append(f"   host error: {tr.error!r}")
    return ok, "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append", help="kernel ABI version")
    ap.add_argument("--nreq", type=int, default=1000)
    ap.add_argument("--nirq", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--smp", type=int, default=2, help="guest vCPUs")
    ap.add_argument("--echo", action="store_true", help="echo the console")
    a = ap.parse_args()
    versions = a.kernel or [v for v in rootvm.DEFAULT_KERNEL_VERSIONS
                            if rootvm.headers_dir(v).is_dir()]
    all_ok = True
    for v in versions:
        ok, report = run_one(v, a.nreq, a.nirq, a.echo, a.timeout, a.smp)
        print(report, flush=True)
        all_ok &= ok
    print("ALL PASS" if all_ok else "SOME FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
