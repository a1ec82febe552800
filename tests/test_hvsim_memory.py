"""Guest memory behaviour (tests/hvsim/guest/memory.py) in the simulated
root, for each kernel and both scheduler modes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import suite_checks, suite_fixture  # noqa: E402

suite_run = suite_fixture("memory")


@pytest.mark.parametrize("name", suite_checks("memory"))
def test_guest_memory(suite_run, name):
    suite_run.check(name)
