"""Shared fixtures: paths, a freshly generated tree, a C compiler helper."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "tlfs_spec")
sys.path.insert(0, ROOT)


def pytest_configure(config):
    """gen/ (the generated bindings, headers and C) is what many tests
    import or build: bring it up to date before collection, so that any one
    test file runs on a fresh clone. make does nothing when it is current."""
    r = subprocess.run(["make", "--no-print-directory", "generate", f"PYTHON={sys.executable}"],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise pytest.UsageError("make generate failed:\n" + r.stdout + r.stderr)


def run(cmd, **kw):
    """Run a command, returning CompletedProcess with text output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def spec():
    from hypercall_gen import model
    return model.load(SPEC)


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory):
    """The generator's output for the current spec, in a private directory."""
    out = tmp_path_factory.mktemp("gen")
    r = run([sys.executable, "-m", "hypercall_gen", "--spec", SPEC, "--out", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return str(out)


@pytest.fixture(scope="session")
def bindings(gen_dir):
    """The generated Python bindings, imported."""
    import importlib.util
    path = os.path.join(gen_dir, "python", "mshv_spec.py")
    s = importlib.util.spec_from_file_location("mshv_spec_under_test", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def parse_tap(text):
    """Return (passed, failed names, plan) from TAP output."""
    passed, failed, plan = 0, [], None
    for line in text.splitlines():
        if line.startswith("ok "):
            passed += 1
        elif line.startswith("not ok "):
            failed.append(line)
        elif line.startswith("1.."):
            plan = int(line[3:])
    return passed, failed, plan


def need_tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh")


def pytest_terminal_summary(terminalreporter):
    """The in-guest suites' totals, one line per kernel (both scheduler modes)."""
    mod = sys.modules.get("harness")
    if mod is None or not mod.ALL_RUNS:
        return
    terminalreporter.section("in-guest tests per kernel")
    for line in mod.kernel_summaries():
        terminalreporter.write_line(line)
