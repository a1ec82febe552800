"""Access to the generated bindings (gen/python/mshv_spec.py).

Every layout and constant the model uses comes from there; this module only
locates it and derives lookup tables (names by value) from it.
"""

import os
import sys

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
_GEN = os.path.join(_ROOT, "gen", "python")
if _GEN not in sys.path:
    sys.path.insert(0, _GEN)

import mshv_spec as S  # noqa: E402  (generated)

PAGE = S.PAGE_SIZE


def enum(name):
    """{CONST: value} of a spec enum (the bindings export one dict per enum,
    in ENUMS)."""
    return S.ENUMS[name]


def enum_mask(name):
    """The OR of every value of a flags enum: the bits a caller may set."""
    mask = 0
    for v in S.ENUMS[name].values():
        mask |= v
    return mask


REGISTER_NAMES = {v: k for k, v in enum("hv_register_name").items()}
MESSAGE_NAMES = {v: k for k, v in enum("hv_message_type").items()}
PROPERTY_NAMES = {v: k for k, v in enum("hv_partition_property_code").items()}
STATUS_NAMES = S.STATUS_NAMES


def status_name(st):
    return STATUS_NAMES.get(st, "0x%x" % st)


def field_mask(cls, field, bit):
    """Mask of a named bit range of a struct field (from the bindings)."""
    lsb, width, _mbz = cls.BITS[field][bit]
    return ((1 << width) - 1) << lsb


def set_bits(cls, field, bit, value):
    lsb, width, _ = cls.BITS[field][bit]
    return (value & ((1 << width) - 1)) << lsb


def control_field(control, name):
    lsb, width = S.CONTROL[name]
    return (control >> lsb) & ((1 << width) - 1)


def result_value(status, reps=0):
    lsb_s, w_s = S.RESULT["status"]
    lsb_r, w_r = S.RESULT["reps_completed"]
    return ((status & ((1 << w_s) - 1)) << lsb_s) | ((reps & ((1 << w_r) - 1)) << lsb_r)


def result_status(result):
    lsb, w = S.RESULT["status"]
    return (result >> lsb) & ((1 << w) - 1)


def result_reps(result):
    lsb, w = S.RESULT["reps_completed"]
    return (result >> lsb) & ((1 << w) - 1)


def make_control(code, rep_count=0, rep_start=0, fast=False, varhead=0):
    """Build a hypercall control word (for tests and tools)."""
    def put(name, v):
        lsb, w = S.CONTROL[name]
        assert 0 <= v < (1 << w), (name, v)
        return v << lsb
    return (put("call_code", code) | put("fast", int(fast)) | put("varhead_size", varhead)
            | put("rep_count", rep_count) | put("rep_start", rep_start))


def elem_size(t):
    """Size of a rep element type name ('u64' or a struct name)."""
    if t is None:
        return 0
    if t in S.INT_SIZES:
        return S.INT_SIZES[t]
    return S.STRUCTS[t].SIZE


def elem_struct(t):
    return None if t is None or t in S.INT_SIZES else S.STRUCTS[t]
