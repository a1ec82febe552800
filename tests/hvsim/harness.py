"""pytest-side harness: boot the simulated root once per (guest suite,
kernel, scheduler), run the suite's TAP tests in it, and hand each test's
result to its own pytest test."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GUEST = HERE / "guest"

RUN_SH = """set -u
insmod /hvsim/mshv_root.ko || exit 90
echo "# module loaded: $(dmesg | grep mshv_root | tail -n 1)"
cd /hvsim
python3 /hvsim/{suite}.py
rc=$?
rmmod mshv_root || rc=91
echo "# module unloaded (rc=$rc)"
exit $rc
"""


def guest_tests(suite):
    """Names of the test functions in tests/hvsim/guest/<suite>.py, statically."""
    tree = ast.parse((GUEST / f"{suite}.py").read_text())
    return sorted(n.name for n in tree.body
                  if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"))


def kernels():
    """Kernels to test: HVSIM_KERNELS=all (CI) or the newest (6.12) by default."""
    from sim import kernel_versions
    ks = kernel_versions()
    return ks if os.environ.get("HVSIM_KERNELS", "") == "all" else ks[-1:]


def ensure_module():
    """Build the hvsim flavour of the module for every kernel (quietly)."""
    r = subprocess.run(["make", "--no-print-directory", "debian-modules", "HVSIM=1"],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("hvsim module build failed:\n" + r.stdout + r.stderr)


# every SuiteRun of this pytest session, for the per-kernel summary
ALL_RUNS = []


def kernel_summaries():
    """One line per kernel: the in-guest tests of every suite run on it,
    as 'KERNEL: N passed, N failed, N skipped' (a test that did not report
    counts as failed)."""
    per = {}
    for run in ALL_RUNS:
        p, f, s = per.get(run.kernel, (0, 0, 0))
        for name in guest_tests(run.suite):
            if name not in run.tests:
                f += 1
            elif run.tests[name][0]:
                p += 1
            else:
                f += 1
        per[run.kernel] = (p, f, s)
    return [f"{k}: {p} passed, {f} failed, {s} skipped" for k, (p, f, s) in sorted(per.items())]


class SuiteRun:
    """One boot running one guest suite; results by test name."""

    def __init__(self, suite, kernel, scheduler):
        from sim import Simulator
        self.suite, self.kernel, self.scheduler = suite, kernel, scheduler
        files = {f"/hvsim/{p.name}": p for p in GUEST.glob("*.py")}
        self.boot_retries = 0
        for attempt in range(2):
            with Simulator(RUN_SH.format(suite=suite), files=files, kernel=kernel,
                           scheduler=scheduler) as sim:
                self.result = sim.run()
                self.sim_log = sim.log_text()
                self.sim_error = sim.error
                self.report = sim.report() if sim.hv else {}
            # The stock kernel dying under the emulator before /init (before
            # the module or any test ran) is not a test result: boot once more,
            # and say so.
            if self.result.init_wall_s is not None or attempt:
                break
            self.boot_retries += 1
            print(f"hvsim: {kernel} died before /init; booting again", file=sys.stderr)
        self.output = self.result.script_output() if hasattr(self.result, "script_output") \
            else str(self.result)
        self.console = self._console()
        ALL_RUNS.append(self)
        self.tests = {}
        cur = None
        for line in self.output.splitlines():
            m = re.match(r"^(ok|not ok) \d+ - (\S+)", line)
            if m:
                cur = m.group(2)
                self.tests[cur] = [m.group(1) == "ok", []]
            elif line.startswith("# ") and cur:
                self.tests[cur][1].append(line[2:])

    def _console(self):
        try:
            return Path(self.result.log_path).read_text(errors="replace")
        except Exception:   # noqa: BLE001
            return self.output

    def check(self, name):
        """Assert that guest test `name` passed; explain everything if not."""
        if name not in self.tests:
            raise AssertionError(
                f"{name} did not run in the guest ({self.kernel}, {self.scheduler})\n"
                f"--- guest console ---\n{self.console[-6000:]}\n"
                f"--- simulator log ---\n{self.sim_log}\n--- simulator error ---\n{self.sim_error!r}")
        ok, diag = self.tests[name]
        if not ok:
            raise AssertionError(
                f"{name} failed in the guest ({self.kernel}, {self.scheduler}):\n" + "\n".join(diag)
                + f"\n--- guest console ---\n{self.console[-6000:]}\n--- simulator log ---\n{self.sim_log}")


def suite_fixture(suite):
    """A module-scoped pytest fixture: one boot per (kernel, scheduler) for
    `suite`, shared by all of that suite's tests."""
    import pytest

    runs = {}

    @pytest.fixture(scope="module", params=[(k, s) for k in kernels() for s in ("root", "core")],
                    ids=lambda p: f"{p[0]}-{p[1]}")
    def fixture(request):
        if request.param not in runs:
            ensure_module()
            runs[request.param] = SuiteRun(suite, *request.param)
        return runs[request.param]

    return fixture
