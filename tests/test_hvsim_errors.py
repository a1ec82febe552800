"""Documented ioctl errors through the real module
(tests/hvsim/guest/errors.py), for each kernel and both scheduler modes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import suite_checks, suite_fixture  # noqa: E402

suite_run = suite_fixture("errors")


@pytest.mark.parametrize("name", suite_checks("errors"))
def test_ioctl_error(suite_run, name):
    suite_run.check(name)
