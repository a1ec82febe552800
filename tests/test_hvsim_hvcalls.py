"""A test per hypercall family, from a VMM inside the simulated root
(tests/hvsim/guest/hvcalls.py), for each kernel and both scheduler modes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import SuiteRun, ensure_module, guest_tests, kernels  # noqa: E402

SUITE = "hvcalls"
_runs = {}


@pytest.fixture(scope="module", params=[(k, s) for k in kernels() for s in ("root", "core")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def suite_run(request):
    key = request.param
    if key not in _runs:
        ensure_module()
        _runs[key] = SuiteRun(SUITE, *key)
    return _runs[key]


@pytest.mark.parametrize("name", guest_tests(SUITE))
def test_hvcall_family(suite_run, name):
    suite_run.check(name)
