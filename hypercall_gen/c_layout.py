"""Renders mshvr_layout_dump.c: a user-space program that prints the size of
every struct and the offset and size of every field as the C compiler lays
them out from the generated headers. tests/ compares its output with the spec."""

from .common import kstruct, marker


def render(spec):
    out = [marker(spec), "#include <stdio.h>", '#include "mshvr_hv_types.h"',
           '#include "uapi/linux/mshv.h"', "",
           "#define S(t, n) printf(\"struct %s %zu\\n\", n, sizeof(t))",
           "#define F(t, n, f) printf(\"field %s %s %zu %zu\\n\", n, #f, "
           "__builtin_offsetof(t, f), sizeof(((t *)0)->f))", "",
           "int main(void)", "{"]
    for st in list(spec.structs.values()) + list(spec.uapi.structs.values()):
        t = f"struct {st.name}" if st.uapi else kstruct(st.name)
        out.append(f'\tS({t}, "{st.name}");')
        for f in st.fields:
            if f.is_flex:
                out.append(f'\tprintf("field %s %s %zu 0\\n", "{st.name}", "{f.name}", '
                           f"__builtin_offsetof({t}, {f.name}));")
            else:
                out.append(f'\tF({t}, "{st.name}", {f.name});')
    for x in spec.uapi.ioctls:
        out.append(f'\tprintf("ioctl %s 0x%08lx\\n", "{x.name}", (unsigned long){x.name});')
    out.append("\treturn 0;")
    out.append("}")
    return "\n".join(out) + "\n"
