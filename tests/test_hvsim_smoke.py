"""The hvsim smoke test (tests/hvsim/guest/smoke.py) in the simulated root,
for each kernel and both scheduler modes. Select with `pytest -k smoke`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import suite_checks, suite_fixture  # noqa: E402

smoke_run = suite_fixture("smoke")


@pytest.mark.parametrize("name", suite_checks("smoke"))
def test_smoke(smoke_run, name):
    smoke_run.check(name)

