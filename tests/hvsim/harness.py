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
if ! rmmod mshv_root; then
    echo "# rmmod failed: refcnt=$(cat /sys/module/mshv_root/refcnt)"
    rc=91
fi
echo "# module unloaded (rc=$rc)"
exit $rc
"""


# The pseudo-test every suite has besides its own: the boot as a whole was
# clean (see SuiteRun.check_run).
RUN_CLEAN = "run_clean"

# A kernel record anywhere in the console stream, with its newline
KMSG_RECORD = re.compile(r"\[\s*\d+\.\d+\] [^\n]*\n")
# A kernel log line on the console: "[   12.345678] text"
KMSG = re.compile(r"^\[\s*\d+\.\d+\] (.*)$")
# What a driver bug looks like in the kernel log: the guest runner's pattern
# (one definition, tests/hvsim/guest/mshvlib.py), plus panics, which the
# guest never lives to see.
sys.path.insert(0, str(ROOT / "gen" / "python"))
sys.path.insert(0, str(GUEST))
from mshvlib import KernelLog  # noqa: E402

SPLAT = re.compile(KernelLog.SPLAT.pattern + "|Kernel panic")
START = re.compile(r"hvsim-test: (start|end) (\S+)")


def suite_checks(suite):
    """What pytest reports for a suite: each guest test, then RUN_CLEAN."""
    return guest_tests(suite) + [RUN_CLEAN]


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
        for name in suite_checks(run.suite):
            try:
                run.check(name)
                p += 1
            except AssertionError:
                f += 1
        per[run.kernel] = (p, f, s)
    return [f"{k}: {p} passed, {f} failed, {s} skipped" for k, (p, f, s) in sorted(per.items())]


class SuiteRun:
    """One boot running one guest suite; results by test name."""

    def __init__(self, suite, kernel, scheduler, expect_warnings=False):
        from sim import Simulator
        self.suite, self.kernel, self.scheduler = suite, kernel, scheduler
        files = {f"/hvsim/{p.name}": p for p in GUEST.glob("*.py")}
        self.boot_retries = 0
        for attempt in range(2):
            with Simulator(RUN_SH.format(suite=suite), files=files, kernel=kernel,
                           scheduler=scheduler, expect_warnings=expect_warnings) as sim:
                self.result = sim.run()
                self.sim_log = sim.log_text()
                self.sim_error = sim.error
                self.sim_error_text = sim.error_text
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
        for line in self.tap_text().splitlines():
            m = re.match(r"^(ok|not ok) \d+ - (\S+)", line)
            if m:
                cur = m.group(2)
                self.tests[cur] = [m.group(1) == "ok", []]
            elif line.startswith("# ") and cur:
                self.tests[cur][1].append(line[2:])
        self._scan_console()

    def tap_text(self):
        """The script's output without the kernel's records. The kernel
        writes its console records whole, but between the characters of a
        line the guest is still sending, so a record can split a TAP line in
        two; taking the records out joins it again."""
        return KMSG_RECORD.sub("", self.output)

    def _scan_console(self):
        """Split the kernel's splats by the test that was running when they
        were printed (the runner marks each test's start and end in the
        kernel log): self.splats[test] and self.outside (module load,
        between tests, rmmod). self.died_in: the test that was running when
        the console stopped without the end marker (panic, timeout, the
        simulator stopping the VM)."""
        self.splats, self.outside = {}, []
        cur = None
        started = False
        for line in self.console.splitlines():
            m = KMSG.match(line)
            if not m:
                continue
            text = m.group(1)
            s = START.search(text)
            if s:
                started = True
                cur = s.group(2) if s.group(1) == "start" else None
                continue
            if SPLAT.search(text):
                where = f"during {cur}" if cur else ("after the tests" if started
                                                     else "before the tests")
                (self.splats.setdefault(cur, []) if cur else self.outside).append(
                    f"{where}: {text}")
        self.died_in = cur if cur and cur not in self.tests else None

    def _explain(self):
        return (f"\n--- guest console ---\n{self.console[-6000:]}\n"
                f"--- simulator log ---\n{self.sim_log}\n"
                f"--- simulator error ---\n{self.sim_error_text or self.sim_error!r}")

    def check_run(self):
        """The boot as a whole: the guest script exited 0 (every test passed,
        rmmod worked), the simulator raised nothing, no kernel splat outside
        a test, and the model ends with nothing left."""
        problems = []
        r = self.result
        if self.sim_error is not None:
            where = f" during {self.died_in}" if self.died_in else ""
            problems.append(f"the simulator raised{where}: {self.sim_error!r}")
        if getattr(r, "exit_code", None) is None:
            problems.append("the root never finished the script"
                            + (f" (it died during {self.died_in})" if self.died_in else "")
                            + (" (timeout)" if getattr(r, "timed_out", False) else ""))
        elif r.exit_code != 0:
            problems.append(f"the guest script exited {r.exit_code}"
                            + (" (rmmod failed)" if r.exit_code == 91 else "")
                            + (" (insmod failed)" if r.exit_code == 90 else ""))
        if "# module unloaded (rc=" in self.output and "# rmmod failed" in self.output:
            problems.append("rmmod mshv_root failed: "
                            + re.search(r"# rmmod failed.*", self.output).group(0))
        problems += self.outside
        rep = self.report or {}
        for key, clean in (("partitions", []), ("deposited_pages", 0), ("mappings", 0),
                           ("root_pool_used", 0), ("contract_violations", []),
                           ("ports", 0), ("connections", 0)):
            if key in rep and rep[key] != clean:
                problems.append(f"the model ends with {key} = {rep[key]!r}")
        if problems:
            raise AssertionError(f"{self.suite} ({self.kernel}, {self.scheduler}) did not run "
                                 "clean:\n  " + "\n  ".join(problems) + self._explain())

    def _console(self):
        try:
            return Path(self.result.log_path).read_text(errors="replace")
        except Exception:   # noqa: BLE001
            return self.output

    def check(self, name):
        """Assert that guest test `name` passed; explain everything if not."""
        if name == RUN_CLEAN:
            return self.check_run()
        where = f"({self.kernel}, {self.scheduler})"
        if name not in self.tests:
            if name == self.died_in:
                why = ["the root died during this test"] + self.splats.get(name, [])
                if self.sim_error is not None:
                    why.append(f"the simulator raised: {self.sim_error!r}")
            elif self.died_in:
                why = [f"not run: the root died during {self.died_in}"]
            else:
                why = ["did not run"]
            raise AssertionError(f"{name} {where}: " + "\n".join(why) + self._explain())
        ok, diag = self.tests[name]
        if not ok:
            raise AssertionError(f"{name} failed in the guest {where}:\n" + "\n".join(diag)
                                 + self._explain())


def suite_fixture(suite, expect_warnings=False):
    """A module-scoped pytest fixture: one boot per (kernel, scheduler) for
    `suite`, shared by all of that suite's tests. The root panics on a
    kernel WARN unless expect_warnings."""
    import pytest

    runs = {}

    @pytest.fixture(scope="module", params=[(k, s) for k in kernels() for s in ("root", "core")],
                    ids=lambda p: f"{p[0]}-{p[1]}")
    def fixture(request):
        if request.param not in runs:
            ensure_module()
            runs[request.param] = SuiteRun(suite, *request.param,
                                           expect_warnings=expect_warnings)
        return runs[request.param]

    return fixture
