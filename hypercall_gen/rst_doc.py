"""Renders mshv-api.rst: the reference in the style of KVM's api.rst. For each
ioctl its fd, type, parameters, returns and errors; for each hypercall its
form, policies and layout tables."""

from .common import marker


def _title(text, ch):
    return f"{text}\n{ch * len(text)}\n"


def _layout(st, out):
    out.append(f"``{st.name}`` ({st.size} bytes): {st.doc}\n")
    out.append("=======  ======  ==============================  ==========================")
    out.append("Offset   Size    Field                           Type")
    out.append("=======  ======  ==============================  ==========================")
    for f in st.fields:
        t = f.type_name + (f"[{f.count}]" if f.count is not None else "")
        if f.mbz:
            t += " (MBZ)"
        out.append(f"{f.offset:<7}  {f.size:<6}  {f.name:<30}  {t}")
        for b in f.bits:
            bt = f"bits {b.lsb}..{b.lsb + b.width - 1}" + (" (MBZ)" if b.mbz else "")
            out.append(f"{'':<7}  {'':<6}  {'  .' + b.name:<30}  {bt}")
    out.append("=======  ======  ==============================  ==========================\n")


def render(spec):
    u = spec.uapi
    out = [".. " + marker(spec, comment_start="", comment_end="", line="  ").strip().replace("\n", "\n  "), ""]
    out.append(_title("The /dev/mshv API and the hypercalls behind it", "="))
    out.append("This document is generated from ``tlfs_spec/``; it describes the ioctls "
               "``mshv_root.ko`` implements and the hypercalls it issues.\n")
    out.append(_title("1. File descriptors", "-"))
    for name, fd in u.fds.items():
        out.append(f"- **{name}**: {fd['doc']}")
    out.append("")
    out.append(_title("2. ioctls", "-"))
    for i, x in enumerate(u.ioctls, 1):
        out.append(_title(f"2.{i} {x.name}", "~"))
        out.append(f":Number: ``{x.macro}(0x{u.ioctl_type:X}, 0x{x.nr:02x}"
                   + (f", struct {x.arg.name})``" if x.arg else ")``")
                   + f" = ``0x{x.number:08X}``")
        out.append(f":Fds: {', '.join(x.fds)}")
        out.append(f":Type: {x.macro} ({'no argument' if x.dir == 'none' else 'argument ' + x.dir})")
        out.append(f":Parameters: {'none' if not x.arg else 'struct ' + x.arg.name}"
                   + (f" (or struct {x.ext.name} with {x.ext_bit} set)" if x.ext else ""))
        out.append(f":Returns: {x.returns}")
        out.append("")
        out.append(x.doc + "\n")
        if x.checks or x.ext_checks or x.trailer:
            out.append("Checked before the handler runs (each failure is ``-EINVAL``); "
                       "reserved fields must be zero:\n")
            for c in x.checks + x.ext_checks:
                ref = "" if c.kind == "nonzero" else f" {c.ref}"
                out.append(f"- ``{c.field_name}``: {c.kind}{ref}")
            if x.trailer:
                out.append(f"- ``{x.trailer['count_field']}`` at most {x.trailer['max']} "
                           f"``{x.trailer['elem']}`` entries follow the header")
            out.append("")
        out.append("Errors:\n")
        out.append("==========  ==========================================================")
        for e in x.errors:
            out.append(f"{e['errno']:<10}  {e['when']}")
        out.append("==========  ==========================================================\n")
        if x.arg:
            _layout(x.arg, out)
        if x.ext:
            _layout(x.ext, out)
        if x.trailer:
            _layout(x.trailer["elem_struct"], out)
    out.append(_title("3. Hypercalls", "-"))
    abi = spec.abi
    out.append(abi.doc + "\n")
    out.append("Control word:\n")
    for b in abi.control:
        out.append(f"- bits {b.lsb}..{b.lsb + b.width - 1}: ``{b.name}``"
                   + (" (MBZ)" if b.mbz else f" - {b.doc}"))
    out.append("")
    for r in abi.rules:
        out.append(f"- {r}")
    out.append("")
    for h in sorted(spec.hypercalls, key=lambda h: h.code):
        out.append(_title(f"HvCall {h.name} (0x{h.code:04x})", "~"))
        out.append(h.doc + "\n")
        d = h.deposit
        out.append(f":Form: {h.form}{', may be issued fast' if h.fast else ''}"
                   f"{', variable header' if h.varhead else ''}{', may complete asynchronously' if h.async_ else ''}")
        out.append(":Deposit: " + ("none" if not d else
                   f"{d['initial']} pages up front, {d['retry']} per INSUFFICIENT_MEMORY retry, "
                   f"into the {d['into']} partition"))
        out.append(f":Passthrough: {h.passthrough}")
        if h.irqs_on:
            out.append(":Interrupts: enabled (issued with preemption off on this CPU's dispatch pages)")
        if h.form == "rep":
            out.append(f":Rep elements: in {getattr(h.rep_input, 'name', h.rep_input)}, "
                       f"out {getattr(h.rep_output, 'name', h.rep_output)}; "
                       f"{h.batch(abi.page_size)} per call")
        out.append("")
        for st in (h.input, h.output):
            if st is not None:
                _layout(st, out)
    out.append(_title("4. Status codes", "-"))
    out.append("======  ================================================  ==========")
    for s in spec.statuses:
        out.append(f"0x{s.value:04x}  {s.name:<48}  {s.errno}")
    out.append("======  ================================================  ==========")
    return "\n".join(out) + "\n"
