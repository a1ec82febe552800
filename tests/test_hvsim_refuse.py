"""Off Hyper-V the module refuses to load: the production build in a plain
QEMU root (no hypervisor), and the hvsim build without a simulator behind
it. Each says why in one log line and fails with -ENODEV."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "hvsim"))
from harness import ROOT, ensure_module, kernels  # noqa: E402

# one finit_module(2) per build (busybox insmod retries with init_module)
LOAD = ("import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
        "fd = os.open(sys.argv[1], os.O_RDONLY); "
        "r = libc.syscall(313, fd, b'', 0); print(r, ctypes.get_errno())")
SCRIPT = f"""
echo "prod-rc=$(python3 -c "{LOAD}" /hvsim/prod.ko)"
echo "sim-rc=$(python3 -c "{LOAD}" /hvsim/sim.ko)"
test -e /dev/mshv && echo "dev-present" || echo "dev-absent"
dmesg | grep mshv_root | sed 's/^/log: /'
"""


@pytest.fixture(scope="module", params=kernels())
def refused(request):
    from rootvm import RootVM
    ensure_module()
    import subprocess
    r = subprocess.run(["make", "--no-print-directory", "debian-modules"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    kver = request.param + "-amd64"
    files = {"/hvsim/prod.ko": ROOT / "build" / kver / "mshv_root.ko",
             "/hvsim/sim.ko": ROOT / "build" / f"{kver}-hvsim" / "mshv_root.ko"}
    with RootVM(SCRIPT, files=files, kernel_version=request.param, timeout=120) as vm:
        vm.start()
        out = vm.wait().script_output()
    # the kernel's console lines interleave with the script's: keep the script's
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith("["))


def test_production_build_refuses_without_hyperv(refused):
    assert "prod-rc=-1 19" in refused, refused      # -ENODEV
    lines = [ln for ln in refused.splitlines()
             if ln.startswith("log:") and "mshv_root: not running as a Hyper-V root partition" in ln]
    assert len(lines) == 1, refused


def test_hvsim_build_refuses_without_the_simulator(refused):
    assert "sim-rc=-1 19" in refused, refused
    lines = [ln for ln in refused.splitlines()
             if ln.startswith("log:") and "mshv_root: not running under the hvsim simulator" in ln]
    assert len(lines) == 1, refused


def test_no_device_node_appears(refused):
    assert "dev-absent" in refused, refused
