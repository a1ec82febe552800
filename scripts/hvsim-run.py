#!/usr/bin/env python3
"""The main job's demo: boot the simulated root partition (Debian's stock
kernel under QEMU, the Python hypervisor model behind it), load the hvsim
build of mshv_root.ko, and run the smoke guest (a real-mode program that
writes '4' to port 0x3f8 and halts) in a child partition, showing each step.

    scripts/hvsim-run.py [--kernel 6.1.0-57] [--scheduler root|core]
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hvsim"))

from harness import GUEST, RUN_SH, ensure_module  # noqa: E402
from sim import Simulator, kernel_versions  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default=None, help="Debian kernel version (default: newest 6.12)")
    ap.add_argument("--scheduler", default="root", choices=("root", "core"))
    args = ap.parse_args()
    kernel = args.kernel or kernel_versions()[-1]
    print(f"== building the hvsim flavour of mshv_root.ko (make debian-modules HVSIM=1)")
    ensure_module()
    print(f"== booting Debian {kernel} under QEMU/TCG with the hvsim hypervisor model "
          f"({args.scheduler} scheduler)")
    files = {f"/hvsim/{p.name}": p for p in GUEST.glob("*.py")}
    t0 = time.monotonic()
    with Simulator(RUN_SH.format(suite="smoke"), files=files, kernel=kernel,
                   scheduler=args.scheduler, echo=False) as sim:
        res = sim.run()
        out = res.script_output()
        for line in out.splitlines():
            print("   guest| " + line)
        calls = sim.report()["calls"] if sim.hv else {}
    print(f"== done in {time.monotonic() - t0:.1f} s; hypercalls the module made: "
          + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
    ok = "# module unloaded (rc=0)" in out and "not ok" not in out
    print("== smoke guest " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
