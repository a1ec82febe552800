"""User-space unit tests of the generated C (hypercall wrappers and ioctl
dispatch), built against tests/cshim with fake hypervisor and handlers."""

import os

import pytest

from conftest import ROOT, need_tool, parse_tap, run

HARNESSES = {
    "hvcall": ("tests/c/hvcall_harness.c", "mshvr_hvcall.c", 40),
    "ioctl": ("tests/c/ioctl_harness.c", "mshvr_ioctl.c", 50),
}


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_harness(name, gen_dir, tmp_path):
    need_tool("gcc")
    harness, unit, min_tests = HARNESSES[name]
    exe = tmp_path / name
    r = run(["gcc", "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-I", os.path.join(ROOT, "tests", "cshim"), "-I", gen_dir, "-o", str(exe),
             os.path.join(ROOT, harness), os.path.join(gen_dir, unit)])
    assert r.returncode == 0, r.stderr
    r = run([str(exe)])
    passed, failed, plan = parse_tap(r.stdout)
    assert failed == [], "\n".join(failed)
    assert plan == passed and passed >= min_tests, r.stdout
    assert r.returncode == 0, r.stderr
