"""Runs the model and every renderer; writes outputs only when they change."""

import os

from . import c_hvcall, c_ioctl, c_layout, c_types, c_uapi, model, py_bindings, rst_doc


def render_all(spec_dir):
    spec = model.load(spec_dir)
    return {
        "uapi/linux/mshv.h": c_uapi.render(spec),
        "mshvr_hv_types.h": c_types.render(spec),
        "mshvr_hvcall.h": c_hvcall.render_h(spec),
        "mshvr_hvcall.c": c_hvcall.render_c(spec),
        "mshvr_ioctl.h": c_ioctl.render_h(spec),
        "mshvr_ioctl.c": c_ioctl.render_c(spec),
        "mshvr_layout_dump.c": c_layout.render(spec),
        "python/mshv_spec.py": py_bindings.render(spec),
        "doc/mshv-api.rst": rst_doc.render(spec),
    }


def write(files, out_dir):
    changed = 0
    for rel, text in sorted(files.items()):
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except FileNotFoundError:
            pass
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        changed += 1
    return changed
