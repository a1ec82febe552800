"""The hvsim smoke test (tests/hvsim/guest/smoke.py) in the simulated root,
for each kernel and both scheduler modes. Select with `pytest -k smoke`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import SuiteRun, ensure_module, guest_tests, kernels  # noqa: E402

SUITE = "smoke"
_runs = {}


@pytest.fixture(scope="module", params=[(k, s) for k in kernels() for s in ("root", "core")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def smoke_run(request):
    key = request.param
    if key not in _runs:
        ensure_module()
        _runs[key] = SuiteRun(SUITE, *key)
    return _runs[key]


@pytest.mark.parametrize("name", guest_tests(SUITE))
def test_smoke(smoke_run, name):
    smoke_run.check(name)


def test_smoke_unloads_cleanly(smoke_run):
    assert "# module unloaded (rc=0)" in smoke_run.output, smoke_run.console[-4000:]
    assert smoke_run.report["partitions"] == [], smoke_run.report
    assert smoke_run.report["deposited_pages"] == 0, smoke_run.report
