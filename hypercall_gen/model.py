"""The spec model: load tlfs_spec/*.yaml, validate, resolve references and
compute derived facts. Renderers only read this model; they never parse YAML.

Every error is a SpecError whose message starts with "file:path", e.g.
"hypercall_structs.yaml:structs[3].fields[2]: overlaps field 'rsvd0'".
"""

import os
import re

import yaml

INT_TYPES = {
    "u8": (1, False), "u16": (2, False), "u32": (4, False), "u64": (8, False),
    "s8": (1, True), "s16": (2, True), "s32": (4, True), "s64": (8, True),
}
RESERVED_RE = re.compile(r"(^|_)(rsvd|reserved|pad)")
PAGE_SIZE = 4096

# Linux <asm-generic/ioctl.h> encoding (x86).
IOC_NRSHIFT, IOC_TYPESHIFT, IOC_SIZESHIFT, IOC_DIRSHIFT = 0, 8, 16, 30
IOC_DIR = {"none": 0, "w": 1, "r": 2, "rw": 3}
IOC_MACRO = {"none": "_IO", "w": "_IOW", "r": "_IOR", "rw": "_IOWR"}


class SpecError(Exception):
    """A spec problem, located as file:path."""


def _err(src, msg):
    raise SpecError(f"{src}: {msg}")


class Node:
    """Common base: every model object knows where it was written."""

    def __init__(self, raw, src):
        self.raw = raw
        self.src = src
        self.name = raw.get("name")
        self.doc = raw.get("doc", "")


class BitRange(Node):
    def __init__(self, raw, src, width_bits):
        super().__init__(raw, src)
        self.lsb = raw["lsb"]
        self.width = raw["width"]
        self.mbz = raw.get("mbz", False)
        if self.lsb + self.width > width_bits:
            _err(src, f"bit range {self.lsb}+{self.width} exceeds the {width_bits}-bit field")
        if bool(RESERVED_RE.search(self.name)) != self.mbz:
            if self.mbz:
                _err(src, f"MBZ bit range '{self.name}' must be named rsvd*, reserved* or pad* (optionally after a prefix_)")
            _err(src, f"reserved bit range '{self.name}' must be marked mbz: true")

    @property
    def mask(self):
        return ((1 << self.width) - 1) << self.lsb


def _check_bitranges(ranges, src):
    used = 0
    for b in ranges:
        if used & b.mask:
            _err(b.src, f"bit range '{b.name}' overlaps another range")
        used |= b.mask


class Field(Node):
    def __init__(self, raw, src, struct):
        super().__init__(raw, src)
        self.struct = struct
        self.type_name = raw["type"]
        self.offset = raw["offset"]
        self.count = raw.get("count")          # None: scalar; 0: flexible array
        self.mbz = raw.get("mbz", False)
        self.enum_name = raw.get("enum")
        self.type = None                        # resolved: str int type or Struct
        self.bits = []
        if bool(RESERVED_RE.search(self.name)) != self.mbz:
            if self.mbz:
                _err(src, f"MBZ field '{self.name}' must be named rsvd*, reserved* or pad* (optionally after a prefix_)")
            _err(src, f"reserved field '{self.name}' must be marked mbz: true")

    def resolve(self, spec):
        if self.type_name in INT_TYPES:
            self.type = self.type_name
        elif self.type_name in spec.structs:
            self.type = spec.structs[self.type_name]
        else:
            _err(self.src, f"unknown type '{self.type_name}'")
        if "bits" in self.raw:
            if not self.is_int:
                _err(self.src, "bits are allowed on integer fields only")
            self.bits = [BitRange(b, f"{self.src}.bits[{i}]", self.elem_size * 8)
                         for i, b in enumerate(self.raw["bits"])]
            _check_bitranges(self.bits, self.src)
        if self.enum_name is not None and self.enum_name not in spec.enums:
            _err(self.src, f"unknown enum '{self.enum_name}'")

    @property
    def is_int(self):
        return isinstance(self.type, str)

    @property
    def elem_size(self):
        return INT_TYPES[self.type][0] if self.is_int else self.type.size

    @property
    def align(self):
        return INT_TYPES[self.type][0] if self.is_int else self.type.align

    @property
    def size(self):
        if self.count is None:
            return self.elem_size
        return self.elem_size * self.count

    @property
    def is_array(self):
        return self.count is not None

    @property
    def is_flex(self):
        return self.count == 0

    @property
    def mbz_bits(self):
        m = 0
        for b in self.bits:
            if b.mbz:
                m |= b.mask
        return m


class Struct(Node):
    def __init__(self, raw, src, uapi=False):
        super().__init__(raw, src)
        self.uapi = uapi
        self.size = raw["size"]
        self.packed = raw.get("packed", False)
        if self.packed and not uapi:
            _err(src, "packed is allowed on UAPI structs only")
        self.fields = [Field(f, f"{src}.fields[{i}]", self)
                       for i, f in enumerate(raw["fields"])]
        names = set()
        for f in self.fields:
            if f.name in names:
                _err(f.src, f"duplicate field name '{f.name}'")
            names.add(f.name)
        self._resolved = False
        self._resolving = False

    def resolve(self, spec):
        if self._resolved:
            return
        if self._resolving:
            _err(self.src, "struct contains itself")
        self._resolving = True
        for f in self.fields:
            f.resolve(spec)
            if isinstance(f.type, Struct):
                f.type.resolve(spec)
        self._check_layout()
        self._resolving = False
        self._resolved = True

    @property
    def align(self):
        if self.packed:
            return 1
        return max(f.align for f in self.fields)

    def _check_layout(self):
        pos = 0
        prev = None
        for i, f in enumerate(self.fields):
            if f.is_flex and i != len(self.fields) - 1:
                _err(f.src, "only the last field may be a flexible array (count: 0)")
            if f.offset < pos:
                _err(f.src, f"field '{f.name}' at offset {f.offset} overlaps field "
                     f"'{prev.name}' (which ends at {pos})")
            if f.offset > pos:
                _err(f.src, f"implicit padding: {f.offset - pos} byte(s) before field "
                     f"'{f.name}' at offset {pos}; add an explicit rsvd field")
            if not self.packed and f.offset % f.align:
                _err(f.src, f"field '{f.name}' ({f.type_name}) at offset {f.offset} is "
                     f"not aligned to {f.align} bytes")
            pos = f.offset + f.size
            prev = f
        if pos != self.size:
            if pos < self.size:
                _err(self.src, f"implicit trailing padding: fields end at {pos} but "
                     f"size is {self.size}")
            _err(self.src, f"fields end at {pos} but size is {self.size}")
        if not self.packed and self.size % self.align:
            _err(self.src, f"size {self.size} is not a multiple of the struct "
                 f"alignment {self.align} (the compiler would add trailing padding)")

    def flat_fields(self, prefix="", base=0):
        """Yield (path, offset, Field) for every field, nested structs expanded."""
        for f in self.fields:
            path = f"{prefix}{f.name}"
            yield path, base + f.offset, f
            if isinstance(f.type, Struct) and not f.is_array:
                yield from f.type.flat_fields(path + ".", base + f.offset)

    def mbz_fields(self):
        """Every (path, offset, Field) that must be zero, nested included."""
        return [(p, o, f) for p, o, f in self.flat_fields() if f.mbz]


class Enum(Node):
    def __init__(self, raw, src):
        super().__init__(raw, src)
        self.kind = raw["kind"]
        self.type = raw["type"]
        bits = INT_TYPES[self.type][0] * 8
        self.values = []
        for i, v in enumerate(raw["values"]):
            vsrc = f"{src}.values[{i}]"
            if v["value"] >= (1 << bits):
                _err(vsrc, f"value {v['value']:#x} does not fit in {self.type}")
            self.values.append((v["name"], v["value"], v.get("doc", ""), vsrc))


class Status(Node):
    def __init__(self, raw, src):
        super().__init__(raw, src)
        self.value = raw["value"]
        self.errno = raw["errno"]


class Hypercall(Node):
    def __init__(self, raw, src):
        super().__init__(raw, src)
        self.code = raw["code"]
        self.form = raw["form"]
        self.fast = raw["fast"]
        self.async_ = raw.get("async", False)
        self.passthrough = raw["passthrough"]
        self.deposit = raw.get("deposit")
        self.rep_advance = raw.get("rep_advance")
        self.quiet_statuses = list(raw.get("quiet_statuses", []))
        # issued with the root's interrupts enabled (see hypercalls.yaml)
        self.irqs_on = raw.get("interrupts", "disabled") == "enabled"
        self.input = self.output = None
        self.rep_input = self.rep_output = self.varhead = None

    def resolve(self, spec):
        def struct_ref(key):
            name = self.raw.get(key)
            if name is None:
                return None
            if name not in spec.structs:
                _err(f"{self.src}.{key}", f"unknown struct '{name}'")
            s = spec.structs[name]
            if s.size > PAGE_SIZE:
                _err(f"{self.src}.{key}", f"struct '{name}' ({s.size} bytes) is larger "
                     f"than the {PAGE_SIZE}-byte hypercall page")
            if any(f.is_flex for f in s.fields):
                _err(f"{self.src}.{key}", f"struct '{name}' has a flexible array; "
                     "use rep elements or a variable header")
            return s

        def elem_ref(key):
            name = self.raw.get(key)
            if name is None:
                return None
            if name in INT_TYPES:
                return name
            if name in spec.structs:
                return spec.structs[name]
            _err(f"{self.src}.{key}", f"unknown type '{name}'")

        for i, q in enumerate(self.quiet_statuses):
            if q not in {s.name for s in spec.statuses}:
                _err(f"{self.src}.quiet_statuses[{i}]", f"unknown status '{q}'")
        self.input = struct_ref("input")
        self.output = struct_ref("output")
        self.rep_input = elem_ref("rep_input")
        self.rep_output = elem_ref("rep_output")
        self.varhead = elem_ref("varhead")
        rep = self.form == "rep"
        if not rep and (self.rep_input or self.rep_output or self.rep_advance):
            _err(self.src, "rep_input, rep_output and rep_advance need form: rep")
        if rep and self.input is None:
            _err(self.src, "a rep hypercall needs an input header")
        if rep and self.input.size % 8:
            _err(f"{self.src}.input", "rep elements must start 8-byte aligned: the header "
                 "size must be a multiple of 8")
        if self.output is not None and self.rep_output is not None:
            _err(self.src, "a call has an output struct or rep output elements, not both")
        if self.varhead is not None and self.varhead != "u64":
            _err(f"{self.src}.varhead", "variable header elements must be u64")
        if self.fast:
            if rep or self.output or self.varhead:
                _err(f"{self.src}.fast", "a fast call is simple, without output or variable header")
            if self.input is None or self.input.size > spec.abi.fast_max_input:
                _err(f"{self.src}.fast", f"fast input must be at most "
                     f"{spec.abi.fast_max_input} bytes")
        if self.rep_advance:
            adv = self.rep_advance
            fnames = {f.name: f for f in self.input.fields}
            if adv["field"] not in fnames:
                _err(f"{self.src}.rep_advance", f"no field '{adv['field']}' in input")
            lf = adv.get("large_flag")
            if lf:
                if lf["field"] not in fnames:
                    _err(f"{self.src}.rep_advance.large_flag", f"no field '{lf['field']}' in input")
                lf["mask_value"] = spec.value(lf["mask"], f"{self.src}.rep_advance.large_flag.mask")
        if self.deposit and self.deposit["into"] == "target":
            f0 = self.input.fields[0] if self.input else None
            if not f0 or f0.type != "u64" or "partition" not in f0.name:
                _err(f"{self.src}.deposit", "deposit into target needs an input whose first "
                     "field is the u64 partition id")
        if self.irqs_on and (rep or self.fast or self.varhead or self.deposit
                             or self.passthrough != "none"):
            _err(f"{self.src}.interrupts", "a call issued with interrupts enabled is simple, "
                 "memory-based, without variable header or deposit, and not passthrough")
        if self.passthrough != "none":
            f0 = self.input.fields[0] if self.input else None
            if not f0 or f0.type != "u64" or "partition" not in f0.name:
                _err(f"{self.src}.passthrough", "passthrough calls must start with a u64 "
                     "partition id (the kernel overwrites it)")

    @property
    def rep_in_size(self):
        return _elem_size(self.rep_input)

    @property
    def rep_out_size(self):
        return _elem_size(self.rep_output)

    def batch(self, page_size=PAGE_SIZE):
        """Most reps that fit one input page and one output page."""
        n = 4095  # the 12-bit rep count field
        hdr = self.input.size if self.input else 0
        if self.rep_in_size:
            n = min(n, (page_size - hdr) // self.rep_in_size)
        if self.rep_out_size:
            out_hdr = self.output.size if self.output else 0
            n = min(n, (page_size - out_hdr) // self.rep_out_size)
        return n


def _elem_size(t):
    if t is None:
        return 0
    if isinstance(t, str):
        return INT_TYPES[t][0]
    return t.size


class Abi(Node):
    def __init__(self, raw, src):
        super().__init__(raw, src)
        self.page_size = raw["page_size"]
        self.alignment = raw["alignment"]
        self.fast_max_input = raw["fast_max_input"]
        self.control = [BitRange(b, f"{src}.control[{i}]", 64)
                        for i, b in enumerate(raw["control"])]
        self.result = [BitRange(b, f"{src}.result[{i}]", 64)
                       for i, b in enumerate(raw["result"])]
        _check_bitranges(self.control, src + ".control")
        _check_bitranges(self.result, src + ".result")
        self.rules = raw.get("rules", [])
        for need in ("call_code", "fast", "varhead_size", "rep_count", "rep_start"):
            if need not in {b.name for b in self.control}:
                _err(src + ".control", f"missing control field '{need}'")
        for need in ("status", "reps_completed"):
            if need not in {b.name for b in self.result}:
                _err(src + ".result", f"missing result field '{need}'")

    def ctl(self, name):
        return next(b for b in self.control if b.name == name)

    def res(self, name):
        return next(b for b in self.result if b.name == name)


class UapiEnum(Node):
    def __init__(self, raw, src):
        super().__init__(raw, src)
        self.values = list(raw["values"])
        self.count = raw.get("count")
        self.mask = raw.get("mask")
        self.maps_to = dict(raw.get("maps_to", {}))
        self.maps_always = list(raw.get("maps_always", []))

    def resolve(self, spec):
        if self.maps_always and not self.mask:
            _err(f"{self.src}.maps_always", "only bit enums (with a mask) have flags to always add")
        if self.maps_to and not self.mask and set(self.maps_to) != set(self.values):
            _err(f"{self.src}.maps_to", "a value enum must map every value")
        for k, v in self.maps_to.items():
            if k not in self.values:
                _err(f"{self.src}.maps_to", f"'{k}' is not a value of {self.name}")
            spec.value(v, f"{self.src}.maps_to.{k}")
        for i, v in enumerate(self.maps_always):
            spec.value(v, f"{self.src}.maps_always[{i}]")


class Check:
    KINDS = ("mask", "below", "max", "equals", "aligned", "nonzero")

    def __init__(self, raw, src, struct, spec):
        self.src = src
        self.field_name = raw["field"]
        fields = {f.name: f for f in struct.fields}
        if self.field_name not in fields:
            _err(src, f"no field '{self.field_name}' in {struct.name}")
        self.field = fields[self.field_name]
        if not self.field.is_int or self.field.is_array:
            _err(src, f"checked field '{self.field_name}' must be a scalar integer")
        self.kind = next(k for k in self.KINDS if k in raw)
        self.ref = raw[self.kind]
        self.value = None if self.kind == "nonzero" else spec.value(self.ref, src)
        if self.kind == "aligned" and (self.value == 0 or self.value & (self.value - 1)):
            _err(src, "aligned must be a power of two")


class Ioctl(Node):
    def __init__(self, raw, src):
        super().__init__(raw, src)
        self.nr = raw["nr"]
        self.dir = raw["dir"]
        self.fds = dict(raw["fds"])
        self.copy_out = raw["copy_out"]
        self.errors = raw["errors"]
        self.returns = raw["returns"]
        self.arg = self.ext = self.ext_bit = None
        self.checks = []
        self.ext_checks = []
        self.trailer = None

    def resolve(self, spec):
        u = spec.uapi
        name = self.raw.get("arg")
        if self.dir == "none":
            if name is not None:
                _err(self.src, "an _IO ioctl takes no argument")
        else:
            if name is None:
                _err(self.src, "an ioctl with a direction needs an arg")
            if name not in u.structs:
                _err(f"{self.src}.arg", f"unknown UAPI struct '{name}'")
            self.arg = u.structs[name]
        if self.copy_out != "never" and self.dir not in ("r", "rw"):
            _err(f"{self.src}.copy_out", "copy_out needs dir r or rw")
        for fd in self.fds:
            if fd not in u.fds:
                _err(f"{self.src}.fds", f"unknown fd kind '{fd}'")
        self.checks = [Check(c, f"{self.src}.checks[{i}]", self.arg, spec)
                       for i, c in enumerate(self.raw.get("checks", []))]
        ext = self.raw.get("extended")
        if ext:
            if ext["arg"] not in u.structs:
                _err(f"{self.src}.extended.arg", f"unknown UAPI struct '{ext['arg']}'")
            self.ext = u.structs[ext["arg"]]
            if self.ext.size <= self.arg.size:
                _err(f"{self.src}.extended.arg", "the extended argument must be larger")
            if ext["field"] not in {f.name for f in self.arg.fields}:
                _err(f"{self.src}.extended.field", f"no field '{ext['field']}'")
            self.ext_field = ext["field"]
            self.ext_bit = ext["bit"]
            spec.value(self.ext_bit, f"{self.src}.extended.bit")
            # the small struct must be a prefix of the big one
            big = {f.name: f for f in self.ext.fields}
            for f in self.arg.fields:
                g = big.get(f.name)
                if not g or g.offset != f.offset or g.type_name != f.type_name:
                    _err(f"{self.src}.extended", f"field '{f.name}' of {self.arg.name} is not "
                         f"a prefix field of {self.ext.name}")
            self.ext_checks = [Check(c, f"{self.src}.extended.checks[{i}]", self.ext, spec)
                               for i, c in enumerate(ext["checks"])]
        tr = self.raw.get("trailer")
        if tr:
            fields = {f.name: f for f in self.arg.fields}
            if tr["field"] not in fields or not fields[tr["field"]].is_flex:
                _err(f"{self.src}.trailer", f"'{tr['field']}' is not a flexible array of the arg")
            if tr["count_field"] not in fields:
                _err(f"{self.src}.trailer", f"no field '{tr['count_field']}'")
            if tr["elem"] != fields[tr["field"]].type_name:
                _err(f"{self.src}.trailer", "elem does not match the flexible array type")
            self.trailer = dict(tr)
            self.trailer["max_value"] = spec.value(tr["max"], f"{self.src}.trailer.max")
            self.trailer["elem_struct"] = u.structs[tr["elem"]]
        elif self.arg is not None and any(f.is_flex for f in self.arg.fields):
            _err(f"{self.src}.arg", "an argument with a flexible array needs a trailer")

    @property
    def size(self):
        return self.arg.size if self.arg else 0

    @property
    def number(self):
        return ((IOC_DIR[self.dir] << IOC_DIRSHIFT) | (self.size << IOC_SIZESHIFT)
                | (self.spec_type << IOC_TYPESHIFT) | (self.nr << IOC_NRSHIFT))

    @property
    def macro(self):
        return IOC_MACRO[self.dir]


class Uapi(Node):
    def __init__(self, raw, src):
        super().__init__(raw, src)
        self.ioctl_type = raw["ioctl_type"]
        self.fds = {}
        for i, fd in enumerate(raw["fds"]):
            if fd["name"] in self.fds:
                _err(f"{src}.fds[{i}]", f"duplicate fd kind '{fd['name']}'")
            self.fds[fd["name"]] = fd
        self.defines = [(d["name"], d["value"], d["doc"], f"{src}.defines[{i}]")
                        for i, d in enumerate(raw["defines"])]
        self.enums = [UapiEnum(e, f"{src}.enums[{i}]") for i, e in enumerate(raw["enums"])]
        self.structs = {}
        for i, s in enumerate(raw["structs"]):
            st = Struct(s, f"{src}.structs[{i}]", uapi=True)
            if st.name in self.structs:
                _err(st.src, f"duplicate UAPI struct '{st.name}'")
            self.structs[st.name] = st
        self.ioctls = [Ioctl(x, f"{src}.ioctls[{i}]") for i, x in enumerate(raw["ioctls"])]
        for x in self.ioctls:
            x.spec_type = self.ioctl_type


class Spec:
    """The merged, validated, resolved spec."""

    def __init__(self):
        self.files = []
        self.abi = None
        self.statuses = []
        self.enums = {}
        self.structs = {}
        self.hypercalls = []
        self.uapi = None
        self.constants = {}    # every named constant -> (value, src)

    # -- constants -------------------------------------------------------
    def _add_const(self, name, value, src):
        if name in self.constants:
            _err(src, f"constant '{name}' already defined at {self.constants[name][1]}")
        self.constants[name] = (value, src)

    def value(self, ref, src):
        if isinstance(ref, int):
            return ref
        if ref not in self.constants:
            _err(src, f"unknown constant '{ref}'")
        return self.constants[ref][0]

    # -- loading ---------------------------------------------------------
    def add_document(self, doc, fname):
        self.files.append(fname)
        if "abi" in doc:
            if self.abi is not None:
                _err(f"{fname}:abi", f"abi already defined in {self.abi.src}")
            self.abi = Abi(doc["abi"], f"{fname}:abi")
        for i, s in enumerate(doc.get("statuses", [])):
            self.statuses.append(Status(s, f"{fname}:statuses[{i}]"))
        for i, e in enumerate(doc.get("enums", [])):
            en = Enum(e, f"{fname}:enums[{i}]")
            if en.name in self.enums:
                _err(en.src, f"duplicate enum '{en.name}' (first at {self.enums[en.name].src})")
            self.enums[en.name] = en
        for i, s in enumerate(doc.get("structs", [])):
            st = Struct(s, f"{fname}:structs[{i}]")
            if st.name in self.structs:
                _err(st.src, f"duplicate struct '{st.name}' (first at {self.structs[st.name].src})")
            self.structs[st.name] = st
        for i, h in enumerate(doc.get("hypercalls", [])):
            self.hypercalls.append(Hypercall(h, f"{fname}:hypercalls[{i}]"))
        if "uapi" in doc:
            if self.uapi is not None:
                _err(f"{fname}:uapi", f"uapi already defined in {self.uapi.src}")
            self.uapi = Uapi(doc["uapi"], f"{fname}:uapi")

    def finish(self):
        if self.abi is None:
            raise SpecError("spec: no document defines abi")
        if self.uapi is None:
            raise SpecError("spec: no document defines uapi")
        # constants: statuses, enum values, uapi defines and enums
        seen_status = {}
        for s in self.statuses:
            if s.value in seen_status:
                _err(s.src, f"duplicate status value {s.value:#x} (also {seen_status[s.value]})")
            seen_status[s.value] = s.name
            self._add_const(s.name, s.value, s.src)
        for e in self.enums.values():
            for name, val, _doc, vsrc in e.values:
                self._add_const(name, val, vsrc)
        for name, val, _doc, dsrc in self.uapi.defines:
            self._add_const(name, val, dsrc)
        for e in self.uapi.enums:
            for i, v in enumerate(e.values):
                self._add_const(v, i, f"{e.src}.values[{i}]")
            if e.count:
                self._add_const(e.count, len(e.values), f"{e.src}.count")
            if e.mask:
                self._add_const(e.mask, (1 << len(e.values)) - 1, f"{e.src}.mask")
        for st in self.structs.values():
            st.resolve(self)
        for e in self.uapi.enums:
            e.resolve(self)
        for st in self.uapi.structs.values():
            for f in st.fields:
                if f.type_name not in INT_TYPES and f.type_name not in self.uapi.structs:
                    _err(f.src, f"unknown type '{f.type_name}' (UAPI structs may use "
                         "integers and other UAPI structs only)")
            st.resolve(_UapiScope(self))
        codes = {}
        names = {}
        for h in self.hypercalls:
            if h.code in codes:
                _err(h.src, f"duplicate hypercall code {h.code:#x} (also '{codes[h.code]}')")
            if h.name in names:
                _err(h.src, f"duplicate hypercall name '{h.name}'")
            codes[h.code] = h.name
            names[h.name] = h
            h.resolve(self)
        nums = {}
        for x in self.uapi.ioctls:
            x.resolve(self)
            for fd in x.fds:
                key = (fd, x.number)
                if key in nums:
                    _err(x.src, f"duplicate ioctl number {x.number:#x} on the {fd} fd "
                         f"(also {nums[key]})")
                nums[key] = x.name
        inames = set()
        for x in self.uapi.ioctls:
            if x.name in inames:
                _err(x.src, f"duplicate ioctl name '{x.name}'")
            inames.add(x.name)
        return self

    # -- convenience -----------------------------------------------------
    def hypercall(self, name):
        return next(h for h in self.hypercalls if h.name == name)

    def status(self, name):
        return next(s for s in self.statuses if s.name == name)


class _UapiScope:
    """Type lookup restricted to UAPI structs, for resolving UAPI fields."""

    def __init__(self, spec):
        self.structs = spec.uapi.structs
        self.enums = spec.enums


def _load_schema(spec_dir):
    with open(os.path.join(spec_dir, "schema.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def _validate(doc, schema, fname):
    import jsonschema  # required at generation time (see README)

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        raise SpecError(f"{fname}:{path.lstrip('.') or '<top>'}: {e.message}")


def spec_files(spec_dir):
    return sorted(f for f in os.listdir(spec_dir)
                  if f.endswith(".yaml") and f != "schema.yaml")


def load(spec_dir, files=None):
    """Load and validate every document in spec_dir; return a finished Spec."""
    schema = _load_schema(spec_dir)
    spec = Spec()
    for fname in files or spec_files(spec_dir):
        path = os.path.join(spec_dir, fname)
        with open(path, encoding="utf-8") as f:
            try:
                doc = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise SpecError(f"{fname}: YAML error: {e}") from None
        if not isinstance(doc, dict):
            raise SpecError(f"{fname}:<top>: a spec document is a mapping")
        _validate(doc, schema, fname)
        spec.add_document(doc, fname)
    return spec.finish()
