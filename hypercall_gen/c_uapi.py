"""Renders the UAPI header, installed as include/linux/mshv.h. It must stay
binary compatible with Linux's include/uapi/linux/mshv.h and compile on its own
as C90 and as C++."""

from .common import marker, wrap_comment
from .c_types import CStruct


def _ustruct(name):
    return f"struct {name}"


def _enum(e):
    out = ["/*"] + wrap_comment(e.doc) + [" */", "enum {"]
    names = list(e.values) + ([e.count] if e.count else [])
    for i, n in enumerate(names):
        sep = "," if i < len(names) - 1 else ""
        out.append(f"\t{n}{sep}")
    out.append("};")
    if e.mask:
        out.append(f"\n#define {e.mask} ((1 << {e.count}) - 1)")
    return "\n".join(out) + "\n"


def render(spec):
    u = spec.uapi
    out = [marker(spec)]
    out.append("#ifndef _UAPI_LINUX_MSHV_H\n#define _UAPI_LINUX_MSHV_H\n")
    out.append("#include <linux/types.h>\n#include <linux/ioctl.h>\n")
    out.append(f"#define MSHV_IOCTL 0x{u.ioctl_type:X}\n")
    for name, val, doc, _src in u.defines:
        out.append(f"/* {doc} */")
        out.append(f"#define {name} 0x{val:x}\n" if val > 9 else f"#define {name} {val}\n")
    for e in u.enums:
        out.append(_enum(e))
    for st in u.structs.values():
        out.append(CStruct(st, struct_name=_ustruct, const_prefix="MSHV_").decl())
    # each ioctl is defined once, in the section of the first fd kind it works on
    home = {x.name: next(fd for fd in u.fds if fd in x.fds) for x in u.ioctls}
    for fdname, fd in u.fds.items():
        xs = [x for x in u.ioctls if home[x.name] == fdname]
        if not xs:
            continue
        out.append(f"/* ioctls on the {fdname} fd: {fd['doc']} */")
        for x in xs:
            also = [k for k in x.fds if k != fdname]
            if also:
                out.append(f"/* {x.name} also works on the {', '.join(also)} fd */")
            if x.dir == "none":
                out.append(f"#define {x.name} {x.macro}(MSHV_IOCTL, 0x{x.nr:02x})")
            else:
                out.append(f"#define {x.name} {x.macro}(MSHV_IOCTL, 0x{x.nr:02x}, "
                           f"struct {x.arg.name})")
        out.append("")
    out.append("#endif /* _UAPI_LINUX_MSHV_H */")
    return "\n".join(out) + "\n"
