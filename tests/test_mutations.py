"""The mutation list (tests/mutations.yaml) still fits the driver: every
`find` matches exactly once. Running the mutations is `make mutate`, not part
of this suite; this only makes a stale list fail at once."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, f"{ROOT}/scripts")
import mutate  # noqa: E402


def test_every_mutation_applies_once():
    items = mutate.load()
    assert len(items) >= 25
    assert all(m["suites"] for m in items)


def test_find_is_exact_but_whitespace_flexible():
    text = "\tif (a < b &&\n\t    c)\n\t\treturn -EEXIST;\n"
    assert mutate.apply(text, [("if (a < b && c)", "if (a <= b && c)")]).startswith("\tif (a <= b && c)")
    with pytest.raises(mutate.ListError):
        mutate.apply(text, [("if (a<b && c)", "")])             # not whitespace: exact
    with pytest.raises(mutate.ListError):
        mutate.apply(text + text, [("return -EEXIST;", "")])    # twice: refused
