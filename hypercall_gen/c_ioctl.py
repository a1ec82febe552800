"""Renders mshvr_ioctl.h and mshvr_ioctl.c: per fd kind, the ioctl dispatch
from command to hand-written handler, with copy-in, flag-mask, range and MBZ
checks (each failure -EINVAL), copy-out, and -ENOTTY for unknown commands."""

from .common import marker, wrap_comment


def _ustruct(st):
    return f"struct {st.name}"


def _check_expr(c, var):
    f = f"{var}->{c.field_name}"
    ref = c.ref if isinstance(c.ref, str) else str(c.value)
    if c.kind == "mask":
        return f"{f} & ~(__u64)({ref})"
    if c.kind == "below":
        return f"{f} >= {ref}"
    if c.kind == "max":
        return f"{f} > {ref}"
    if c.kind == "equals":
        return f"{f} != {ref}"
    if c.kind == "aligned":
        return f"{f} & (({ref}) - 1)"
    if c.kind == "nonzero":
        return f"!{f}"
    raise AssertionError(c.kind)


class ArgCheck:
    """The generated validator of one argument struct (MBZ fields + checks)."""

    def __init__(self, st, checks, suffix=""):
        self.st = st
        self.checks = checks
        self.fn = f"mshvr_check_{st.name}{suffix}"

    def render(self):
        out = [f"static bool {self.fn}(const {_ustruct(self.st)} *a)", "{"]
        conds = []
        for f in self.st.fields:
            if not f.mbz:
                continue
            if f.is_array:
                conds.append(f"memchr_inv(a->{f.name}, 0, sizeof(a->{f.name}))")
            else:
                conds.append(f"a->{f.name}")
        for c in self.checks:
            conds.append(_check_expr(c, "a"))
        if not conds:
            out.append("\treturn true;")
        else:
            for cond in conds:
                out.append(f"\tif ({cond})")
                out.append("\t\treturn false;")
            out.append("\treturn true;")
        out.append("}")
        return "\n".join(out) + "\n"


class IoctlCase:
    """One (fd kind, ioctl) pair: a static do-function and its switch case."""

    def __init__(self, spec, x, fd):
        self.spec = spec
        self.x = x
        self.fd = fd
        self.handler = x.fds[fd]
        self.ctype = spec.uapi.fds[fd]["ctype"]
        self.fn = f"mshvr_do_{fd}_{x.name.lower()}"
        self.check = ArgCheck(x.arg, x.checks) if x.arg and x.dir in ("w", "rw") else None
        self.ext_check = ArgCheck(x.ext, x.ext_checks, "_ext") if x.ext else None

    def handler_arg_type(self):
        x = self.x
        if x.arg is None:
            return None
        st = x.ext if x.ext else x.arg
        const = "const " if x.dir == "w" else ""
        return f"{const}{_ustruct(st)} *"

    def proto(self):
        t = self.handler_arg_type()
        args = [f"{self.ctype} *ctx"] + ([f"{t}arg"] if t else [])
        return f"long {self.handler}({', '.join(args)});"

    def render(self):
        x = self.x
        out = [f"static long {self.fn}({self.ctype} *ctx, void __user *uarg)", "{"]
        if x.arg is None:
            out.append(f"\treturn {self.handler}(ctx);")
            out.append("}")
            return "\n".join(out) + "\n"
        if x.trailer:
            return self._render_trailer()
        if x.ext:
            return self._render_ext()
        st = _ustruct(x.arg)
        out.append(f"\t{st} a;")
        out.append("\tlong ret;\n")
        if x.dir in ("w", "rw"):
            out.append("\tif (copy_from_user(&a, uarg, sizeof(a)))")
            out.append("\t\treturn -EFAULT;")
            out.append(f"\tif (!{self.check.fn}(&a))")
            out.append("\t\treturn -EINVAL;")
        else:
            out.append("\tmemset(&a, 0, sizeof(a));")
        out.append(f"\tret = {self.handler}(ctx, &a);")
        if x.copy_out == "on_success":
            out.append("\tif (ret >= 0 && copy_to_user(uarg, &a, sizeof(a)))")
            out.append("\t\tret = -EFAULT;")
        elif x.copy_out == "always":
            out.append("\tif (copy_to_user(uarg, &a, sizeof(a)) && ret >= 0)")
            out.append("\t\tret = -EFAULT;")
        out.append("\treturn ret;")
        out.append("}")
        return "\n".join(out) + "\n"

    def _render_ext(self):
        x = self.x
        small, big = _ustruct(x.arg), _ustruct(x.ext)
        f = x.ext_field
        out = [f"static long {self.fn}({self.ctype} *ctx, void __user *uarg)", "{",
               f"\t{small} a;", f"\t{big} b;", ""]
        out.append("\tif (copy_from_user(&a, uarg, sizeof(a)))")
        out.append("\t\treturn -EFAULT;")
        out.append(f"\tif (!{self.check.fn}(&a))")
        out.append("\t\treturn -EINVAL;")
        out.append(f"\tif (a.{f} & (1ULL << {x.ext_bit})) {{")
        out.append("\t\t/* the larger argument, read again whole and checked whole */")
        out.append("\t\tif (copy_from_user(&b, uarg, sizeof(b)))")
        out.append("\t\t\treturn -EFAULT;")
        out.append(f"\t\tif (!{self.ext_check.fn}(&b))")
        out.append("\t\t\treturn -EINVAL;")
        out.append("\t} else {")
        out.append("\t\tmemset(&b, 0, sizeof(b));")
        for fld in x.arg.fields:
            out.append(f"\t\tb.{fld.name} = a.{fld.name};")
        out.append("\t}")
        out.append(f"\treturn {self.handler}(ctx, &b);")
        out.append("}")
        return "\n".join(out) + "\n"

    def _render_trailer(self):
        x = self.x
        tr = x.trailer
        st = _ustruct(x.arg)
        elem = f"struct {tr['elem']}"
        cnt = tr["count_field"]
        mx = tr["max"] if isinstance(tr["max"], str) else str(tr["max_value"])
        out = [f"static long {self.fn}({self.ctype} *ctx, void __user *uarg)", "{",
               f"\t{st} hdr, *a;", "\tsize_t size;", "\tlong ret;", ""]
        out.append("\tif (copy_from_user(&hdr, uarg, sizeof(hdr)))")
        out.append("\t\treturn -EFAULT;")
        out.append(f"\tif (!{self.check.fn}(&hdr) || hdr.{cnt} > {mx})")
        out.append("\t\treturn -EINVAL;")
        out.append(f"\tsize = sizeof(hdr) + (size_t)hdr.{cnt} * sizeof({elem});")
        out.append("\ta = kvmalloc(size, GFP_KERNEL_ACCOUNT);")
        out.append("\tif (!a)")
        out.append("\t\treturn -ENOMEM;")
        out.append("\tif (copy_from_user(a, uarg, size)) {")
        out.append("\t\tkvfree(a);")
        out.append("\t\treturn -EFAULT;")
        out.append("\t}")
        out.append("\t/* keep the header that was checked, whatever user space did since */")
        out.append("\tmemcpy(a, &hdr, sizeof(hdr));")
        out.append(f"\tret = {self.handler}(ctx, a);")
        out.append("\tkvfree(a);")
        out.append("\treturn ret;")
        out.append("}")
        return "\n".join(out) + "\n"


def _cases(spec):
    cases = []
    for fd in spec.uapi.fds:
        for x in spec.uapi.ioctls:
            if fd in x.fds:
                cases.append(IoctlCase(spec, x, fd))
    return cases


def render_h(spec):
    out = [marker(spec)]
    out.append("#ifndef _MSHVR_IOCTL_H\n#define _MSHVR_IOCTL_H\n")
    out.append('#include <linux/types.h>\n#include "mshvr_hv_types.h"\n#include "uapi/linux/mshv.h"\n')
    for fd in spec.uapi.fds.values():
        out.append(f"{fd['ctype']};")
    out.append("")
    for fdname, fd in spec.uapi.fds.items():
        out.append("/*")
        out += wrap_comment(f"{fdname} fd: {fd['doc']} Dispatch and the handlers the "
                            "driver implements for it.")
        out.append(" */")
        out.append(f"long mshvr_ioctl_dispatch_{fdname}({fd['ctype']} *ctx, unsigned int cmd,"
                   " unsigned long arg);")
        for c in _cases(spec):
            if c.fd == fdname:
                out.append(c.proto())
        out.append("")
    out.append("/* UAPI flag bits (or values) to the hypervisor flags (values) they stand for;")
    out.append(" * a value without a mapping gives U64_MAX */")
    for e in spec.uapi.enums:
        if e.maps_to or e.maps_always:
            out.append(f"u64 mshvr_map_{e.name}(u64 {'bits' if e.mask else 'value'});")
    out.append("")
    out.append("#endif /* _MSHVR_IOCTL_H */")
    return "\n".join(out) + "\n"


def render_c(spec):
    out = [marker(spec)]
    out.append("#include <linux/errno.h>\n#include <linux/limits.h>\n#include <linux/slab.h>\n#include <linux/mm.h>\n"
               "#include <linux/string.h>\n#include <linux/uaccess.h>\n"
               '#include "mshvr_ioctl.h"\n')
    out.append("/* UAPI layout, checked where the kernel uses it */")
    for st in spec.uapi.structs.values():
        out.append(f'static_assert(sizeof(struct {st.name}) == {st.size});')
        for f in st.fields:
            if not f.is_flex:
                out.append(f"static_assert(offsetof(struct {st.name}, {f.name}) == {f.offset});")
    for x in spec.uapi.ioctls:
        out.append(f"static_assert({x.name} == 0x{x.number:08x}U);")
    out.append("")
    for e in spec.uapi.enums:
        if not (e.maps_to or e.maps_always):
            continue
        if not e.mask:
            out.append(f"u64 mshvr_map_{e.name}(u64 value)\n{{\n\tswitch (value) {{")
            for k, v in e.maps_to.items():
                out.append(f"\tcase {k}:\n\t\treturn MSHVR_{v};")
            out.append("\tdefault:\n\t\treturn U64_MAX;\n\t}\n}\n")
            continue
        out.append(f"u64 mshvr_map_{e.name}(u64 bits)\n{{")
        always = " | ".join(f"MSHVR_{v}" for v in e.maps_always) or "0"
        out.append(f"\tu64 hv = {always};\n")
        for k, v in e.maps_to.items():
            out.append(f"\tif (bits & (1ULL << {k}))")
            out.append(f"\t\thv |= MSHVR_{v};")
        out.append("\treturn hv;\n}\n")
    done = set()
    for c in _cases(spec):
        for chk in (c.check, c.ext_check):
            if chk and chk.fn not in done:
                done.add(chk.fn)
                out.append(chk.render())
    for c in _cases(spec):
        out.append(c.render())
    for fdname, fd in spec.uapi.fds.items():
        out.append(f"long mshvr_ioctl_dispatch_{fdname}({fd['ctype']} *ctx, unsigned int cmd,"
                   " unsigned long arg)")
        out.append("{")
        out.append("\tvoid __user *uarg = (void __user *)arg;\n")
        out.append("\tswitch (cmd) {")
        for c in _cases(spec):
            if c.fd == fdname:
                out.append(f"\tcase {c.x.name}:")
                out.append(f"\t\treturn {c.fn}(ctx, uarg);")
        out.append("\tdefault:")
        out.append("\t\treturn -ENOTTY;")
        out.append("\t}")
        out.append("}\n")
    return "\n".join(out)
