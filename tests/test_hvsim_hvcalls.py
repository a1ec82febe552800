"""A test per hypercall family, from a VMM inside the simulated root
(tests/hvsim/guest/hvcalls.py), for each kernel and both scheduler modes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import suite_checks, suite_fixture  # noqa: E402

suite_run = suite_fixture("hvcalls")


@pytest.mark.parametrize("name", suite_checks("hvcalls"))
def test_hvcall_family(suite_run, name):
    suite_run.check(name)
