"""Renders mshvr_hv_types.h: hypervisor constants and structs with
compile-time size and offset checks. The header is usable from the kernel and
from user-space test programs (it needs only <linux/types.h>)."""

from .common import CPREFIX, CTYPES, c_int_literal, kconst, kstruct, marker, wrap_comment
from .model import Struct


def _field_decl(f, types=CTYPES, struct_name=kstruct):
    t = types[f.type] if f.is_int else struct_name(f.type.name)
    if f.count is None:
        return f"{t} {f.name};"
    if f.count == 0:
        return f"{t} {f.name}[];"
    return f"{t} {f.name}[{f.count}];"


class CStruct:
    """One struct, rendering itself: declaration, bit masks, layout asserts."""

    def __init__(self, st, struct_name=kstruct, const_prefix=CPREFIX, types=CTYPES):
        self.st = st
        self.struct_name = struct_name
        self.const_prefix = const_prefix
        self.types = types

    @property
    def cname(self):
        return self.struct_name(self.st.name)

    def decl(self):
        out = ["/*"]
        out += wrap_comment(self.st.doc)
        out.append(" */")
        out.append(f"{self.cname} {{")
        for f in self.st.fields:
            decl = _field_decl(f, self.types, self.struct_name)
            note = f"/* {f.offset:#x}" + (" MBZ" if f.mbz else "") + " */"
            out.append(f"\t{decl:<40} {note}")
        attr = " __attribute__((packed))" if self.st.packed else ""
        out.append(f"}}{attr};")
        return "\n".join(out) + "\n"

    def bit_macros(self):
        out = []
        for f in self.st.fields:
            for b in f.bits:
                base = f"{self.const_prefix}{self.st.name.upper()}_{f.name.upper()}_{b.name.upper()}"
                lit = c_int_literal(b.mask, f.elem_size * 8)
                out.append(f"#define {base}_SHIFT {b.lsb}")
                out.append(f"#define {base}_MASK {lit}")
            if f.mbz_bits:
                base = f"{self.const_prefix}{self.st.name.upper()}_{f.name.upper()}"
                out.append(f"#define {base}_MBZ_MASK {c_int_literal(f.mbz_bits, f.elem_size * 8)}")
        return "\n".join(out) + ("\n" if out else "")

    def asserts(self):
        n = self.cname
        out = [f'_Static_assert(sizeof({n}) == {self.st.size}, "{self.st.name} size");']
        for f in self.st.fields:
            if f.is_flex:
                continue
            out.append(f"_Static_assert(__builtin_offsetof({n}, {f.name}) == {f.offset}, "
                       f'"{self.st.name}.{f.name} offset");')
        return "\n".join(out) + "\n"


def _struct_order(structs):
    """Structs in dependency order (a nested struct before its user), stable."""
    done, order = set(), []

    def visit(st):
        if st.name in done:
            return
        done.add(st.name)
        for f in st.fields:
            if isinstance(f.type, Struct):
                visit(f.type)
        order.append(st)

    for st in structs:
        visit(st)
    return order


def render(spec):
    abi = spec.abi
    out = [marker(spec)]
    out.append("#ifndef _MSHVR_HV_TYPES_H\n#define _MSHVR_HV_TYPES_H\n")
    out.append("#include <linux/types.h>\n")
    out.append(f"#define {CPREFIX}HV_PAGE_SIZE {abi.page_size}")
    out.append(f"#define {CPREFIX}HV_HYPERCALL_ALIGNMENT {abi.alignment}")
    out.append(f"#define {CPREFIX}HV_FAST_MAX_INPUT {abi.fast_max_input}\n")
    out.append("/* Hypercall control word (input value) */")
    for b in abi.control:
        base = f"{CPREFIX}HV_CONTROL_{b.name.upper()}"
        out.append(f"#define {base}_SHIFT {b.lsb}")
        out.append(f"#define {base}_MASK {c_int_literal(b.mask)}")
    out.append("/* Hypercall result value */")
    for b in abi.result:
        base = f"{CPREFIX}HV_RESULT_{b.name.upper()}"
        out.append(f"#define {base}_SHIFT {b.lsb}")
        out.append(f"#define {base}_MASK {c_int_literal(b.mask)}")
    out.append("")
    out.append("/* HV_STATUS codes */")
    for s in spec.statuses:
        out.append(f"#define {kconst(s.name)} 0x{s.value:04x}")
    out.append("")
    out.append("/* Hypercall codes */")
    for h in sorted(spec.hypercalls, key=lambda h: h.code):
        out.append(f"#define {kconst('HVCALL_' + h.name.upper())} 0x{h.code:04x}")
    out.append("")
    for e in spec.enums.values():
        out.append(f"/* {e.name} ({e.kind}, {e.type}): {e.doc} */")
        bits = 64 if e.type in ("u64", "s64") else 32
        for name, val, _doc, _src in e.values:
            out.append(f"#define {kconst(name)} {c_int_literal(val, bits)}")
        out.append("")
    for st in _struct_order(spec.structs.values()):
        cs = CStruct(st)
        out.append(cs.decl())
        bm = cs.bit_macros()
        if bm:
            out.append(bm)
        out.append(cs.asserts())
    out.append("#endif /* _MSHVR_HV_TYPES_H */")
    return "\n".join(out) + "\n"
