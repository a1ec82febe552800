"""The C compiler's layout of every generated struct equals the spec, and so
does the ctypes layout of the Python bindings."""

import ctypes
import os

from conftest import need_tool, run


def _dump(gen_dir, tmp_path):
    need_tool("gcc")
    exe = tmp_path / "layout_dump"
    r = run(["gcc", "-std=gnu11", "-Wall", "-Werror", "-I", gen_dir, "-o", str(exe),
             os.path.join(gen_dir, "mshvr_layout_dump.c")])
    assert r.returncode == 0, r.stderr
    r = run([str(exe)])
    assert r.returncode == 0
    sizes, fields, ioctls = {}, {}, {}
    for line in r.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "struct":
            sizes[rest[0]] = int(rest[1])
        elif kind == "field":
            fields[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "ioctl":
            ioctls[rest[0]] = int(rest[1], 16)
    return sizes, fields, ioctls


def _all_structs(spec):
    return list(spec.structs.values()) + list(spec.uapi.structs.values())


def test_c_layout_matches_spec(spec, gen_dir, tmp_path):
    sizes, fields, ioctls = _dump(gen_dir, tmp_path)
    structs = _all_structs(spec)
    assert len(sizes) == len(structs)
    for st in structs:
        assert sizes[st.name] == st.size, st.name
        for f in st.fields:
            assert fields[(st.name, f.name)] == (f.offset, f.size), (st.name, f.name)
    for x in spec.uapi.ioctls:
        assert ioctls[x.name] == x.number


def test_python_bindings_match_spec(spec, bindings):
    for st in _all_structs(spec):
        cls = getattr(bindings, st.name)
        assert ctypes.sizeof(cls) == st.size, st.name
        for f in st.fields:
            assert getattr(cls, f.name).offset == f.offset, (st.name, f.name)
            assert getattr(cls, f.name).size == f.size or f.is_flex, (st.name, f.name)


def test_python_bindings_constants(spec, bindings):
    for s in spec.statuses:
        assert getattr(bindings, s.name) == s.value
    for e in spec.enums.values():
        for name, val, _d, _s in e.values:
            assert getattr(bindings, name) == val
    for x in spec.uapi.ioctls:
        assert getattr(bindings, x.name) == x.number
    for h in spec.hypercalls:
        assert bindings.HYPERCALLS[h.code]["name"] == h.name


def test_python_mbz_violations(bindings):
    v = bindings.hv_input_create_vp()
    assert v.mbz_violations() == []
    v.rsvd0[1] = 1
    assert v.mbz_violations() == ["rsvd0"]
    a = bindings.hv_input_assert_virtual_interrupt()
    a.control = 1 << 40
    assert a.mbz_violations() == ["control.rsvd"]
    p = bindings.hv_input_create_partition()
    p.proximity_domain_info.flags = 1 << 5
    assert p.mbz_violations() == ["proximity_domain_info.flags.rsvd"]


def test_register_page_follows_the_hypervisors_layout(bindings):
    """The VP register page as Hyper-V writes it and VMMs (rust-vmm, Cloud
    Hypervisor, OpenVMM) read it: an 8-byte reserved field after rflags."""
    rp = bindings.hv_x64_register_page
    assert rp.OFFSETS["rip"] == 136 and rp.OFFSETS["rflags"] == 144
    xmm = [f for f in rp.OFFSETS if f.startswith("xmm")][0]
    assert rp.OFFSETS[xmm] == 160
    assert rp.OFFSETS["cr0"] == 352
    assert rp.OFFSETS["interrupt_vectors"] == 688 and rp.SIZE == 696


def test_message_layouts(bindings):
    assert bindings.hv_message.SIZE == 256
    assert bindings.hv_x64_intercept_message_header.SIZE == 40
    io = bindings.hv_x64_io_port_intercept_message
    assert io.OFFSETS["port_number"] == 40 and io.OFFSETS["rax"] == 48
    mem = bindings.hv_x64_memory_intercept_message
    assert mem.OFFSETS["guest_physical_address"] == 56 and mem.OFFSETS["instruction_bytes"] == 64
