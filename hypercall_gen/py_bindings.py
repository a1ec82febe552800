"""Renders mshv_spec.py: ctypes classes of every struct (hypervisor and UAPI)
and every constant, plus tables of hypercalls, statuses and ioctls. The
simulator and the tests use these, never hand-written layouts."""

from .c_types import _struct_order
from .common import py_marker
from .model import INT_TYPES

CT = {"u8": "ctypes.c_uint8", "u16": "ctypes.c_uint16", "u32": "ctypes.c_uint32",
      "u64": "ctypes.c_uint64", "s8": "ctypes.c_int8", "s16": "ctypes.c_int16",
      "s32": "ctypes.c_int32", "s64": "ctypes.c_int64"}


def _ftype(f):
    t = CT[f.type] if f.is_int else f.type.name
    if f.count is not None:
        return f"{t} * {f.count}"
    return t


def _struct(st):
    out = [f"class {st.name}(_Struct):", f'    """{st.doc}"""', "    _pack_ = 1",
           "    _fields_ = ["]
    for f in st.fields:
        out.append(f'        ("{f.name}", {_ftype(f)}),')
    out.append("    ]")
    out.append(f"    SIZE = {st.size}")
    out.append("    OFFSETS = {" + ", ".join(f'"{f.name}": {f.offset}' for f in st.fields) + "}")
    mbz = [f.name for f in st.fields if f.mbz]
    out.append(f"    MBZ = {tuple(mbz)!r}")
    bits = {}
    for f in st.fields:
        for b in f.bits:
            bits.setdefault(f.name, {})[b.name] = (b.lsb, b.width, b.mbz)
    out.append(f"    BITS = {bits!r}")
    out.append(f"    UAPI = {st.uapi!r}")
    return "\n".join(out) + "\n"


def _elem(t):
    if t is None:
        return None
    return t if isinstance(t, str) else t.name


def render(spec):
    out = [py_marker(spec), '"""Generated ctypes bindings of the mshv spec."""\n',
           "import ctypes\n", "",
           "class _Struct(ctypes.Structure):",
           '    """Base of every generated struct."""',
           "    _pack_ = 1",
           "",
           "    def mbz_violations(self):",
           '        """Names of reserved fields or bit ranges that are not zero."""',
           "        bad = []",
           "        for name in self.MBZ:",
           "            v = getattr(self, name)",
           "            if (any(bytes(v)) if hasattr(v, '_length_') else v):",
           "                bad.append(name)",
           "        for fname, ranges in self.BITS.items():",
           "            v = getattr(self, fname)",
           "            for bname, (lsb, width, mbz) in ranges.items():",
           "                if mbz and (v >> lsb) & ((1 << width) - 1):",
           '                    bad.append(f"{fname}.{bname}")',
           "        for fname, _t in self._fields_:",
           "            v = getattr(self, fname)",
           "            if isinstance(v, _Struct):",
           '                bad += [f"{fname}.{b}" for b in v.mbz_violations()]',
           "        return bad",
           "",
           "    @classmethod",
           "    def from_bytes(cls, data):",
           "        return cls.from_buffer_copy(bytes(data[:ctypes.sizeof(cls)]))",
           "",
           "    def to_bytes(self):",
           "        return bytes(self)",
           "",
           "    def bits(self, field, name):",
           "        lsb, width, _mbz = self.BITS[field][name]",
           "        return (getattr(self, field) >> lsb) & ((1 << width) - 1)",
           "",
           ""]
    abi = spec.abi
    out.append(f"PAGE_SIZE = {abi.page_size}")
    out.append("CONTROL = {" + ", ".join(f'"{b.name}": ({b.lsb}, {b.width})' for b in abi.control) + "}")
    out.append("CONTROL_MBZ = " + hex(sum(b.mask for b in abi.control if b.mbz)))
    out.append("RESULT = {" + ", ".join(f'"{b.name}": ({b.lsb}, {b.width})' for b in abi.result) + "}")
    out.append("")
    out.append("# HV_STATUS codes")
    for s in spec.statuses:
        out.append(f"{s.name} = 0x{s.value:04x}")
    out.append("STATUS_NAMES = {" + ", ".join(f"0x{s.value:04x}: \"{s.name}\"" for s in spec.statuses) + "}")
    out.append("STATUS_ERRNO = {" + ", ".join(f'"{s.name}": "{s.errno}"' for s in spec.statuses) + "}")
    out.append("")
    for e in spec.enums.values():
        out.append(f"# {e.name}: {e.doc}")
        for name, val, _d, _s in e.values:
            out.append(f"{name} = 0x{val:x}")
        out.append("")
    out.append("ENUMS = {")
    for e in spec.enums.values():
        out.append(f'    "{e.name}": {{' + ", ".join(f'"{n}": 0x{v:x}' for n, v, _d, _s in e.values) + "},")
    out.append("}")
    out.append("")
    u = spec.uapi
    out.append("# UAPI defines and enums")
    out.append(f"MSHV_IOCTL = 0x{u.ioctl_type:x}")
    for name, val, _d, _s in u.defines:
        out.append(f"{name} = 0x{val:x}")
    for e in u.enums:
        for i, v in enumerate(e.values):
            out.append(f"{v} = {i}")
        if e.count:
            out.append(f"{e.count} = {len(e.values)}")
        if e.mask:
            out.append(f"{e.mask} = 0x{(1 << len(e.values)) - 1:x}")
    out.append("")
    for st in _struct_order(list(spec.structs.values()) + list(u.structs.values())):
        out.append(_struct(st))
        out.append("")
    out.append("STRUCTS = {" + ", ".join(f'"{n}": {n}' for n in list(spec.structs) + list(u.structs)) + "}")
    out.append("")
    out.append("# ioctls: name -> number")
    for x in u.ioctls:
        out.append(f"{x.name} = 0x{x.number:08x}")
    out.append("IOCTLS = {" + ", ".join(
        f'"{x.name}": dict(number=0x{x.number:08x}, nr={x.nr}, dir="{x.dir}", '
        f'arg={x.arg.name if x.arg else None}, fds={tuple(x.fds)!r})' for x in u.ioctls) + "}")
    out.append("")
    out.append("# hypercalls")
    for h in sorted(spec.hypercalls, key=lambda h: h.code):
        out.append(f"HVCALL_{h.name.upper()} = 0x{h.code:04x}")
    out.append("HYPERCALLS = {")
    for h in sorted(spec.hypercalls, key=lambda h: h.code):
        d = h.deposit
        adv = None
        if h.rep_advance:
            adv = {"field": h.rep_advance["field"], "by": h.rep_advance["by"]}
            lf = h.rep_advance.get("large_flag")
            if lf:
                adv["large_flag"] = {"field": lf["field"], "mask": lf["mask_value"], "by": lf["by"]}
        out.append(
            f"    0x{h.code:04x}: dict(name=\"{h.name}\", form=\"{h.form}\", fast={h.fast}, "
            f"input={h.input.name if h.input else None}, "
            f"output={h.output.name if h.output else None}, "
            f"rep_input={_elem(h.rep_input)!r}, rep_output={_elem(h.rep_output)!r}, "
            f"varhead={_elem(h.varhead)!r}, rep_advance={adv!r}, "
            f"deposit={d!r}, passthrough=\"{h.passthrough}\", async_={h.async_}, "
            f"batch={h.batch(spec.abi.page_size) if h.form == 'rep' else 0}),")
    out.append("}")
    out.append("HVCALL_BY_NAME = {v[\"name\"]: k for k, v in HYPERCALLS.items()}")
    out.append("INT_SIZES = " + repr({k: v[0] for k, v in INT_TYPES.items()}))
    out.append("")
    out.append("for _c in STRUCTS.values():")
    out.append("    assert ctypes.sizeof(_c) == _c.SIZE, _c.__name__")
    out.append("    for _f, _o in _c.OFFSETS.items():")
    out.append("        assert getattr(_c, _f).offset == _o, (_c.__name__, _f)")
    return "\n".join(out) + "\n"
