"""The UAPI header: Linux 6.19's numbers, names and sizes; compiles alone as
C90 and as C++; installs as include/linux/mshv.h."""

import os

import pytest

from conftest import ROOT, need_tool, run

# Values from Linux 6.19 include/uapi/linux/mshv.h, written out by hand.
LINUX_IOCTLS = {
    "MSHV_CREATE_PARTITION": 0x4010B800, "MSHV_INITIALIZE_PARTITION": 0x0000B800,
    "MSHV_CREATE_VP": 0x4004B801, "MSHV_SET_GUEST_MEMORY": 0x4020B802,
    "MSHV_IRQFD": 0x4010B803, "MSHV_IOEVENTFD": 0x4020B804,
    "MSHV_SET_MSI_ROUTING": 0x4008B805, "MSHV_GET_GPAP_ACCESS_BITMAP": 0xC020B806,
    "MSHV_ROOT_HVCALL": 0xC020B807, "MSHV_RUN_VP": 0x8100B800,
    "MSHV_GET_VP_STATE": 0xC010B801, "MSHV_SET_VP_STATE": 0xC010B802,
}
LINUX_SIZES = {
    "mshv_create_partition": 16, "mshv_create_partition_v2": 64, "mshv_create_vp": 4,
    "mshv_user_mem_region": 32, "mshv_user_irqfd": 16, "mshv_user_ioeventfd": 32,
    "mshv_user_irq_entry": 16, "mshv_user_irq_table": 8, "mshv_gpap_access_bitmap": 32,
    "mshv_root_hvcall": 32, "mshv_run_vp": 256, "mshv_get_set_vp_state": 16,
}
LINUX_CONSTANTS = {
    "MSHV_IOCTL": 0xB8, "MSHV_HV_PAGE_SIZE": 0x1000, "MSHV_RUN_VP_BUF_SZ": 256,
    "MSHV_NUM_CPU_FEATURES_BANKS": 2,
    "MSHV_PT_BIT_LAPIC": 0, "MSHV_PT_BIT_X2APIC": 1, "MSHV_PT_BIT_GPA_SUPER_PAGES": 2,
    "MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES": 3, "MSHV_PT_BIT_NESTED_VIRTUALIZATION": 4,
    "MSHV_PT_BIT_SMT_ENABLED_GUEST": 5, "MSHV_PT_BIT_COUNT": 6, "MSHV_PT_FLAGS_MASK": 0x3F,
    "MSHV_PT_ISOLATION_NONE": 0, "MSHV_PT_ISOLATION_COUNT": 1,
    "MSHV_SET_MEM_BIT_WRITABLE": 0, "MSHV_SET_MEM_BIT_EXECUTABLE": 1,
    "MSHV_SET_MEM_BIT_UNMAP": 2, "MSHV_SET_MEM_BIT_COUNT": 3, "MSHV_SET_MEM_FLAGS_MASK": 7,
    "MSHV_IRQFD_BIT_DEASSIGN": 0, "MSHV_IRQFD_BIT_RESAMPLE": 1, "MSHV_IRQFD_BIT_COUNT": 2,
    "MSHV_IRQFD_FLAGS_MASK": 3,
    "MSHV_IOEVENTFD_BIT_DATAMATCH": 0, "MSHV_IOEVENTFD_BIT_PIO": 1,
    "MSHV_IOEVENTFD_BIT_DEASSIGN": 2, "MSHV_IOEVENTFD_BIT_COUNT": 3,
    "MSHV_IOEVENTFD_FLAGS_MASK": 7,
    "MSHV_GPAP_ACCESS_TYPE_ACCESSED": 0, "MSHV_GPAP_ACCESS_TYPE_DIRTY": 1,
    "MSHV_GPAP_ACCESS_TYPE_COUNT": 2, "MSHV_GPAP_ACCESS_OP_NOOP": 0,
    "MSHV_GPAP_ACCESS_OP_CLEAR": 1, "MSHV_GPAP_ACCESS_OP_SET": 2, "MSHV_GPAP_ACCESS_OP_COUNT": 3,
    "MSHV_VP_MMAP_OFFSET_REGISTERS": 0, "MSHV_VP_MMAP_OFFSET_INTERCEPT_MESSAGE": 1,
    "MSHV_VP_MMAP_OFFSET_GHCB": 2, "MSHV_VP_MMAP_OFFSET_COUNT": 3,
    "MSHV_VP_STATE_LAPIC": 0, "MSHV_VP_STATE_XSAVE": 1, "MSHV_VP_STATE_SIMP": 2,
    "MSHV_VP_STATE_SIEFP": 3, "MSHV_VP_STATE_SYNTHETIC_TIMERS": 4, "MSHV_VP_STATE_COUNT": 5,
}
# (struct, field, offset, size)
LINUX_FIELDS = [
    ("mshv_create_partition_v2", "pt_num_cpu_fbanks", 16, 2),
    ("mshv_create_partition_v2", "pt_cpu_fbanks", 24, 16),
    ("mshv_create_partition_v2", "pt_disabled_xsave", 56, 8),
    ("mshv_user_mem_region", "flags", 24, 1), ("mshv_user_mem_region", "rsvd", 25, 7),
    ("mshv_user_ioeventfd", "len", 16, 4), ("mshv_user_ioeventfd", "fd", 20, 4),
    ("mshv_user_ioeventfd", "flags", 24, 4),
    ("mshv_gpap_access_bitmap", "page_count", 8, 8), ("mshv_gpap_access_bitmap", "bitmap_ptr", 24, 8),
    ("mshv_root_hvcall", "status", 8, 2), ("mshv_root_hvcall", "rsvd", 10, 6),
    ("mshv_root_hvcall", "in_ptr", 16, 8), ("mshv_root_hvcall", "out_ptr", 24, 8),
    ("mshv_get_set_vp_state", "buf_sz", 4, 4), ("mshv_get_set_vp_state", "buf_ptr", 8, 8),
]


@pytest.fixture(scope="module")
def probe(gen_dir, tmp_path_factory):
    """Compile a program that prints every constant, size and offset above."""
    need_tool("gcc")
    d = tmp_path_factory.mktemp("uapi")
    src = ["#include <stdio.h>", "#include <stddef.h>", '#include "uapi/linux/mshv.h"',
           "int main(void) {"]
    for n in list(LINUX_IOCTLS) + list(LINUX_CONSTANTS):
        src.append(f'printf("{n} %lu\\n", (unsigned long)({n}));')
    for s in LINUX_SIZES:
        src.append(f'printf("sizeof:{s} %zu\\n", sizeof(struct {s}));')
    for s, f, _o, _z in LINUX_FIELDS:
        src.append(f'printf("{s}.{f} %zu %zu\\n", offsetof(struct {s}, {f}), '
                   f"sizeof(((struct {s} *)0)->{f}));")
    src += ["return 0;", "}"]
    (d / "probe.c").write_text("\n".join(src))
    r = run(["gcc", "-Wall", "-Werror", "-I", gen_dir, "-o", str(d / "probe"), str(d / "probe.c")])
    assert r.returncode == 0, r.stderr
    out = run([str(d / "probe")]).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_ioctl_numbers(probe):
    for n, v in LINUX_IOCTLS.items():
        assert int(probe[n]) == v, n


def test_constants(probe):
    for n, v in LINUX_CONSTANTS.items():
        assert int(probe[n]) == v, n


def test_struct_sizes(probe):
    for s, v in LINUX_SIZES.items():
        assert int(probe[f"sizeof:{s}"]) == v, s


def test_field_offsets(probe):
    for s, f, o, z in LINUX_FIELDS:
        assert probe[f"{s}.{f}"] == f"{o} {z}", (s, f)


@pytest.mark.parametrize("cmd", [
    ["gcc", "-std=c90", "-Wall", "-Werror", "-x", "c"],
    ["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-x", "c"],
    ["g++", "-std=c++11", "-Wall", "-Werror", "-x", "c++"],
], ids=["c90", "c99", "c++"])
def test_header_compiles_standalone(gen_dir, tmp_path, cmd):
    need_tool(cmd[0])
    src = tmp_path / "t.c"
    src.write_text('#include "uapi/linux/mshv.h"\nint main(void) { return 0; }\n')
    r = run(cmd + ["-I", gen_dir, "-o", str(tmp_path / "t"), str(src)])
    assert r.returncode == 0, r.stderr


def test_header_has_no_kernel_only_constructs(gen_dir):
    text = open(os.path.join(gen_dir, "uapi", "linux", "mshv.h"), encoding="utf-8").read()
    for bad in ("__KERNEL__", "__packed", "\tu64 ", "BIT(", "//", "mshvr_"):
        assert bad not in text, bad


def test_headers_install(tmp_path):
    r = run(["make", "-s", "headers_install", f"INSTALL_HDR_PATH={tmp_path}"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    installed = tmp_path / "include" / "linux" / "mshv.h"
    assert installed.is_file()
    assert "#define MSHV_IOCTL 0xB8" in installed.read_text()
