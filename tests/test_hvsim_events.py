"""Interrupts and doorbells (tests/hvsim/guest/events.py) in the simulated
root, for each kernel and both scheduler modes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import suite_checks, suite_fixture  # noqa: E402

suite_run = suite_fixture("events")


@pytest.mark.parametrize("name", suite_checks("events"))
def test_guest_events(suite_run, name):
    suite_run.check(name)
