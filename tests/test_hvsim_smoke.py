"""The hvsim smoke test (tests/hvsim/guest/smoke.py) in the simulated root,
for each kernel and both scheduler modes. Select with `pytest -k smoke`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import guest_tests, suite_fixture  # noqa: E402

smoke_run = suite_fixture("smoke")


@pytest.mark.parametrize("name", guest_tests("smoke"))
def test_smoke(smoke_run, name):
    smoke_run.check(name)


def test_smoke_unloads_cleanly(smoke_run):
    assert "# module unloaded (rc=0)" in smoke_run.output, smoke_run.console[-4000:]
    assert smoke_run.report["partitions"] == [], smoke_run.report
    assert smoke_run.report["deposited_pages"] == 0, smoke_run.report
