"""Fixtures of the model's unit tests (imported by each test_model_*.py; a
conftest.py here would shadow tests/conftest.py for `from conftest import`): a fake root driving the model in
memory, in either scheduler mode."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model.testkit import Root  # noqa: E402


@pytest.fixture
def root():
    r = Root()
    yield r
    r.close()


@pytest.fixture
def core():
    r = Root(scheduler="core")
    yield r
    r.close()
