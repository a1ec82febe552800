"""hvsim hypervisor model (pure Python + Unicorn). See docs/hvsim-model.md."""

from . import ucx  # noqa: F401  (first: points the unicorn package at the patched library)

from .spec import S, make_control, result_status, result_reps, result_value  # noqa: F401
from .memory import MmapRam, AnonRam, FileRam  # noqa: F401
from .hv import Hypervisor, ROOT_ID, COSTS, CpuState  # noqa: F401
