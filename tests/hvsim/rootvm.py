"""Boot a throw-away Debian-kernel VM under QEMU/TCG for hvsim tests.

This module is a plain library (no pytest dependency).  It provides:

* ``kernel_image(version)``: fetch ``linux-image-<version>-amd64-unsigned``
  with ``apt-get download`` into the cache and unpack it with ``dpkg -x``
  (never installed).  ``version_for_headers()`` picks the version matching an
  installed ``/usr/src/linux-headers-<version>-amd64`` tree.
* ``base_initramfs()``: a cached cpio with busybox-static and a
  trimmed Debian python3.11 (``/usr/bin/python3``) plus the shared libraries
  it needs, all taken from ``apt-get download``'ed .debs.
* ``RootVM``: boots QEMU (TCG only) with guest RAM backed by a shared file
  that the host can mmap, runs one caller-supplied shell script as the
  guest's workload and returns its exit status and console output.

Guest physical memory layout (see docs/hvsim-transport.md):

* All guest RAM (at most 2 GiB) is below the q35 PCI hole, so it is one
  linear block at GPA 0: **file offset == GPA** for ``0 <= GPA < mem_mb MiB``.
* ``reserved_mb`` MiB just below the top 2 MiB of RAM (SeaBIOS keeps the ACPI
  tables in the top 128 KiB) are hidden from Linux with
  ``memmap=<size>$<base>`` (e820 "reserved"); ``RootVM.reserved_base`` /
  ``RootVM.reserved_size`` give the range.  The simulator owns it.
* Kernels boot through their PVH entry point by default (see boot_image()).

Cache: ``$HVSIM_CACHE`` or ``<repo>/.cache/hvsim``.  A second run does no apt
work (every step checks for its output first).
"""

from __future__ import annotations

import atexit
import gzip
import io
import os
import re
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[2]

# Debian kernel ABI versions the project tests against (the "<ver>" in
# linux-image-<ver>-amd64-unsigned / linux-headers-<ver>-amd64).
DEFAULT_KERNEL_VERSIONS = ("6.12.117+deb12", "6.1.0-57")

QEMU = os.environ.get("HVSIM_QEMU", "qemu-system-x86_64")

# Packages that make up the in-guest python3 (plus the libraries needed by
# the interpreter and the extension modules we keep).
PYTHON_DEBS = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
)
LIB_DEBS = ("libc6", "zlib1g", "libexpat1", "libffi8", "libbz2-1.0",
            "liblzma5", "libuuid1")
BUSYBOX_DEB = "busybox-static"

# Stdlib directories we do not need in the guest.
PY_PRUNE_DIRS = {"test", "idlelib", "ensurepip", "tkinter", "lib2to3",
                 "pydoc_data", "turtledemo", "__pycache__", "unittest",
                 "venv", "distutils", "xmlrpc", "wsgiref", "sqlite3",
                 "curses", "dbm", "config-3.11-x86_64-linux-gnu"}
# Extension modules never wanted (tests / examples).
PY_PRUNE_EXT = re.compile(r"^(_test|_ctypes_test|xxlimited|_xxtestfuzz|"
                          r"_xxsubinterpreters)")

MULTIARCH_LIB = "lib/x86_64-linux-gnu"

# SeaBIOS keeps its "high" tables (ACPI RSDT/DSDT/FACS, ...) in the top
# 128 KiB of RAM below 4 GiB (e820 reserved).  The hvsim reserved range ends
# this far below the top of RAM so the simulator never overwrites them.
FIRMWARE_TOP = 2 << 20


def log(msg: str) -> None:
    print(f"[rootvm] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Cache and Debian package handling
# ---------------------------------------------------------------------------

def cache_dir() -> Path:
    """Root of the download/unpack cache (created on demand)."""
    d = Path(os.environ.get("HVSIM_CACHE", REPO_ROOT / ".cache" / "hvsim"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _deb_glob_name(pkg: str) -> str:
    # apt-get download names files <pkg>_<version-with-%3a>_<arch>.deb
    return f"{pkg}_*.deb"


def fetch_debs(pkgs: Sequence[str]) -> dict[str, Path]:
    """Return {package: .deb path}, downloading the missing ones.

    Downloads go to <cache>/debs with ``apt-get download`` (no install).
    """
    debdir = cache_dir() / "debs"
    debdir.mkdir(exist_ok=True)
    found: dict[str, Path] = {}
    missing = []
    for p in pkgs:
        hits = sorted(debdir.glob(_deb_glob_name(p)))
        if hits:
            found[p] = hits[-1]
        else:
            missing.append(p)
    if missing:
        log(f"apt-get download {' '.join(missing)}")
        # Sandbox user root: the cache dir is usually not writable by _apt.
        subprocess.run(["apt-get", "download", "-q",
                        "-o", "APT::Sandbox::User=root", *missing],
                       cwd=debdir, check=True, stdout=subprocess.DEVNULL)
        for p in missing:
            hits = sorted(debdir.glob(_deb_glob_name(p)))
            if not hits:
                raise RuntimeError(f"apt-get download produced no .deb for {p}")
            found[p] = hits[-1]
    return found


def _extract_debs(debs: Sequence[Path], dest: Path) -> None:
    """dpkg -x every .deb into dest, atomically (tmp dir + rename)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def kernel_image(version: str = DEFAULT_KERNEL_VERSIONS[0]) -> Path:
    """Path of vmlinuz for Debian kernel ABI ``version`` (fetched if needed)."""
    root = cache_dir() / "kernels" / version
    vmlinuz = root / "boot" / f"vmlinuz-{version}-amd64"
    if not vmlinuz.exists():
        pkg = f"linux-image-{version}-amd64-unsigned"
        debs = fetch_debs([pkg])
        _extract_debs([debs[pkg]], root)
        if not vmlinuz.exists():
            raise RuntimeError(f"{pkg} did not contain {vmlinuz.name}")
    return vmlinuz


def _decompress_payload(bz: bytes) -> bytes:
    """Return the vmlinux ELF inside a bzImage (xz, zstd, or gzip payload)."""
    import lzma
    setup_sects = bz[0x1F1] or 4
    off, length = struct.unpack_from("<II", bz, 0x248)   # payload_offset/len
    payload = bz[(setup_sects + 1) * 512 + off:][:length]
    # The kernel build appends the decompressed size (le32) to the stream.
    size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if payload.startswith(b"\xfd7zXZ\x00"):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        # No zstd in the 3.11 stdlib: use the zstd CLI (Debian "zstd").
        out = subprocess.run(["zstd", "-dc"], input=payload[:-4],
                             capture_output=True, check=True).stdout
    elif payload.startswith(b"\x1f\x8b"):
        out = gzip.decompress(payload[:-4])
    else:
        raise RuntimeError(f"unsupported bzImage payload {payload[:4].hex()}")
    if not out.startswith(b"\x7fELF") or len(out) != size:
        raise RuntimeError("bzImage payload did not decompress to vmlinux")
    return out


def boot_image(version: str = DEFAULT_KERNEL_VERSIONS[0],
               mode: str | None = None) -> Path:
    """Kernel file to hand to QEMU's -kernel.

    mode (default $HVSIM_BOOT or "auto"):
      "pvh"     - the uncompressed vmlinux ELF, booted through its PVH entry
                  point (CONFIG_PVH=y in Debian).  Skips the in-guest
                  decompression, which under TCG costs ~6 s for 6.1's xz and
                  ~2 s for 6.12's zstd.  Same kernel binary, other entry.
      "bzimage" - the vmlinuz as shipped.
      "auto"    - pvh if the payload can be decompressed here, else bzimage.
    """
    mode = mode or os.environ.get("HVSIM_BOOT", "auto")
    bz = kernel_image(version)
    if mode == "bzimage":
        return bz
    vmlinux = bz.with_name(f"vmlinux-{version}-amd64")
    if not vmlinux.exists():
        try:
            data = _decompress_payload(bz.read_bytes())
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            if mode == "pvh":
                raise
            log(f"PVH boot unavailable for {version} ({e}); using bzImage")
            return bz
        tmp = vmlinux.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(vmlinux)
    return vmlinux


def installed_header_versions(src: Path = Path("/usr/src")) -> list[str]:
    """Kernel ABI versions with a linux-headers-<ver>-amd64 dir installed."""
    out = []
    for d in sorted(src.glob("linux-headers-*-amd64")):
        out.append(d.name[len("linux-headers-"):-len("-amd64")])
    return out


def version_for_headers(headers_dir: Union[str, Path]) -> str:
    """Map /usr/src/linux-headers-<ver>-amd64 (or just <ver>) to <ver>."""
    name = Path(headers_dir).name
    m = re.fullmatch(r"(?:linux-headers-)?(.+?)(?:-amd64)?", name)
    if not m:
        raise ValueError(f"not a linux-headers dir: {headers_dir}")
    return m.group(1)


def headers_dir(version: str) -> Path:
    return Path("/usr/src") / f"linux-headers-{version}-amd64"


# ---------------------------------------------------------------------------
# cpio (newc) writer
# ---------------------------------------------------------------------------

class Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1000
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        self.ino += 1
        namez = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0,
                  len(namez), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + namez)
        self.buf.write(b"\0" * (-(len(hdr) + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if not path or path in self.dirs:
            return
        parent = os.path.dirname(path)
        if parent:
            self.mkdir(parent)
        self.dirs.add(path)
        self._entry(path, stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path, stat.S_IFREG | (mode & 0o7777), data)

    def symlink(self, path: str, target: str) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_tree(self, src: Path, dest: str = "/") -> None:
        """Add a host directory tree (files, dirs, symlinks) under dest."""
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel = os.path.relpath(dirpath, src)
            gdir = os.path.normpath(os.path.join(dest, rel))
            self.mkdir(gdir)
            for n in sorted(filenames) + [d for d in dirnames
                                          if os.path.islink(os.path.join(dirpath, d))]:
                hp = os.path.join(dirpath, n)
                gp = os.path.join(gdir, n)
                st = os.lstat(hp)
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(gp, os.readlink(hp))
                elif stat.S_ISREG(st.st_mode):
                    self.file(gp, Path(hp).read_bytes(), st.st_mode)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self.buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


# ---------------------------------------------------------------------------
# Base initramfs: busybox + python3
# ---------------------------------------------------------------------------

def _needed(elf: Path) -> list[str]:
    """DT_NEEDED entries of an ELF file (via binutils' readelf)."""
    out = subprocess.run(["readelf", "-d", str(elf)], check=True,
                         capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _python_root() -> Path:
    """Trimmed root tree with python3.11 and its libraries (cached)."""
    root = cache_dir() / "pyroot"
    if (root / ".complete").exists():
        return root
    raw = cache_dir() / "pyroot-debs"
    if not (raw / "usr/bin/python3.11").exists():
        debs = fetch_debs(PYTHON_DEBS + LIB_DEBS)
        _extract_debs(list(debs.values()), raw)

    shutil.rmtree(root, ignore_errors=True)
    pylib_src = raw / "usr/lib/python3.11"
    pylib_dst = root / "usr/lib/python3.11"

    def ignore(d: str, names: list[str]) -> set[str]:
        drop = {n for n in names if n in PY_PRUNE_DIRS or n.endswith(".pyc")}
        if d.endswith("lib-dynload"):
            drop |= {n for n in names if PY_PRUNE_EXT.match(n)}
        return drop

    shutil.copytree(pylib_src, pylib_dst, ignore=ignore, symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy2(raw / "usr/bin/python3.11", root / "usr/bin/python3.11")
    os.symlink("python3.11", root / "usr/bin/python3")

    # Resolve shared libraries from the extracted debs; drop extension
    # modules whose libraries we do not ship (ssl, sqlite, curses, ...).
    libdirs = [raw / MULTIARCH_LIB, raw / "usr" / MULTIARCH_LIB]

    def find_lib(name: str) -> Path | None:
        for d in libdirs:
            if (d / name).exists():
                return d / name
        return None

    wanted: dict[str, Path] = {}
    todo = [root / "usr/bin/python3.11"]
    for so in sorted((pylib_dst / "lib-dynload").glob("*.so")):
        libs = [find_lib(n) for n in _needed(so)]
        if all(libs):
            todo.append(so)
        else:
            so.unlink()
    while todo:
        elf = todo.pop()
        for n in _needed(elf):
            if n not in wanted:
                wanted[n] = find_lib(n)
                todo.append(wanted[n])
    dst_lib = root / MULTIARCH_LIB
    dst_lib.mkdir(parents=True)
    for n, p in wanted.items():
        shutil.copy2(p.resolve(), dst_lib / n)
    # The dynamic loader at its ELF interpreter path.
    (root / "lib64").mkdir()
    shutil.copy2((raw / MULTIARCH_LIB / "ld-linux-x86-64.so.2").resolve(),
                 dst_lib / "ld-linux-x86-64.so.2")
    os.symlink(f"/{MULTIARCH_LIB}/ld-linux-x86-64.so.2",
               root / "lib64/ld-linux-x86-64.so.2")
    # Strip debug info / symbols to save space (binutils).
    for p in list(dst_lib.iterdir()) + list((pylib_dst / "lib-dynload").glob("*.so")):
        subprocess.run(["strip", "--strip-unneeded", str(p)], check=False,
                       stderr=subprocess.DEVNULL)
    (root / ".complete").touch()
    return root


def base_initramfs() -> Path:
    """Cached cpio: busybox + python3 + directory skeleton.

    Left uncompressed (~23 MiB): unpacking the gzip'ed variant (~8 MiB) costs
    the guest ~0.6 s more under TCG than loading the bigger file via fw_cfg.
    """
    out = cache_dir() / "base-initramfs.cpio"
    if out.exists():
        return out
    bb_root = cache_dir() / "busybox"
    if not (bb_root / "bin/busybox").exists():
        debs = fetch_debs([BUSYBOX_DEB])
        _extract_debs([debs[BUSYBOX_DEB]], bb_root)
    pyroot = _python_root()

    c = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev",
              "tmp", "run", "etc", "root", "hvsim"):
        c.mkdir(d)
    c.file("bin/busybox", (bb_root / "bin/busybox").read_bytes(), 0o755)
    # busybox applet symlinks are created by /init (busybox --install -s);
    # sh must exist up front for the #! line.
    c.symlink("bin/sh", "busybox")
    c.add_tree(pyroot, "/")
    data = c.finish()              # padded: the next cpio member stays aligned
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(out)
    log(f"built {out} ({len(data) // 1024} KiB)")
    return out


# The guest's /init.  @NONCE@ makes the markers impossible to produce by
# accident (e.g. a test echoing the script).
INIT_SCRIPT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/kernel/debug && mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "HVSIM-INIT @NONCE@ uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /hvsim
sh /hvsim/run.sh
rc=$?
echo "HVSIM-END @NONCE@ rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
"""

FileSpec = Union[str, Path, bytes, tuple]


def build_initramfs(out: Path, script: str,
                    files: Mapping[str, FileSpec] | None = None,
                    nonce: str = "x") -> Path:
    """Write base initramfs + a small uncompressed cpio with /init, the
    caller's script (/hvsim/run.sh) and ``files``.

    ``files`` maps guest path -> host path (mode copied), bytes (0644) or
    (bytes, mode).  Linux unpacks concatenated cpio archives in order.
    """
    c = Cpio()
    c.file("init", INIT_SCRIPT.replace("@NONCE@", nonce).encode(), 0o755)
    c.file("hvsim/run.sh", script.encode(), 0o755)
    for gpath, spec in (files or {}).items():
        if isinstance(spec, tuple):
            c.file(gpath, spec[0], spec[1])
        elif isinstance(spec, bytes):
            c.file(gpath, spec, 0o644)
        else:
            p = Path(spec)
            c.file(gpath, p.read_bytes(), p.stat().st_mode)
    with open(out, "wb") as f:
        f.write(base_initramfs().read_bytes())
        f.write(c.finish())
    return out


# ---------------------------------------------------------------------------
# QEMU
# ---------------------------------------------------------------------------

_live: set["RootVM"] = set()


@atexit.register
def _kill_all() -> None:
    for vm in list(_live):
        vm.kill()


@dataclass
class GuestResult:
    exit_code: int | None          # None: no end marker (panic, timeout...)
    output: str                    # full console log
    log_path: Path
    timed_out: bool
    qemu_rc: int | None
    wall_s: float                  # QEMU start -> QEMU exit
    init_wall_s: float | None      # QEMU start -> /init marker (host clock)
    first_line_wall_s: float | None  # QEMU start -> first console line
    init_uptime_s: float | None    # guest /proc/uptime at /init start
    end_uptime_s: float | None     # guest /proc/uptime at end marker

    def script_output(self) -> str:
        """Console lines between the /init and end markers."""
        m = re.search(r"HVSIM-INIT \S+ uptime=\S+\n(.*)HVSIM-END ",
                      self.output, re.S)
        return m.group(1) if m else ""

    def summary(self) -> str:
        f = lambda v: "n/a" if v is None else f"{v:.2f}s"
        return (f"rc={self.exit_code} timed_out={self.timed_out} "
                f"first-console-line: wall {f(self.first_line_wall_s)}; "
                f"boot-to-init: wall {f(self.init_wall_s)} guest-uptime "
                f"{f(self.init_uptime_s)}; whole run: wall {f(self.wall_s)}")


class RootVM:
    """One QEMU/TCG guest running one script.

    Usage::

        with RootVM(script="insmod /hvsim/x.ko") as vm:
            vm.start()                     # returns once QEMU is running
            ...                            # e.g. serve a transport
            res = vm.wait()

    or simply ``RootVM(...).run()``.
    """

    def __init__(self, script: str, files: Mapping[str, FileSpec] | None = None,
                 kernel_version: str = DEFAULT_KERNEL_VERSIONS[0],
                 mem_mb: int = 1024, reserved_mb: int = 64, smp: int = 2,
                 timeout: float = 180.0,
                 extra_qemu_args: Sequence[str] = (),
                 extra_cmdline: Sequence[str] = (),
                 workdir: Path | None = None,
                 ram_dir: Path | None = None,
                 echo: bool = False,
                 boot: str | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        if mem_mb > 2048:
            # q35 puts RAM above 2 GiB (when ram >= 2.75G) at 4 GiB; keep the
            # simple GPA == file offset mapping.
            raise ValueError("mem_mb must be <= 2048 for a linear GPA map")
        if not 0 < reserved_mb < mem_mb // 2:
            raise ValueError("bad reserved_mb")
        self.script = script
        self.files = dict(files or {})
        self.kernel_version = kernel_version
        self.mem_mb = mem_mb
        self.reserved_mb = reserved_mb
        self.smp = smp
        self.timeout = timeout
        self.extra_qemu_args = list(extra_qemu_args)
        self.extra_cmdline = list(extra_cmdline)
        self.echo = echo
        self.boot = boot            # see boot_image(): "pvh" | "bzimage" | "auto"
        self.on_line = on_line
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="hvsim-vm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # tmpfs for the RAM file: it is guest RAM, keep it off the disk.
        ram_dir = Path(ram_dir or ("/dev/shm" if os.path.isdir("/dev/shm")
                                   else self.workdir))
        self.ram_path = ram_dir / f"hvsim-{os.getpid()}-{secrets.token_hex(4)}.ram"
        self.log_path = self.workdir / "console.log"
        self.nonce = secrets.token_hex(6)
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._t0 = 0.0
        self._t_init: float | None = None
        self._t_first: float | None = None
        self._reader: threading.Thread | None = None

    # --- memory layout -----------------------------------------------------
    @property
    def mem_size(self) -> int:
        return self.mem_mb << 20

    @property
    def reserved_size(self) -> int:
        return self.reserved_mb << 20

    @property
    def reserved_base(self) -> int:
        """GPA of the range hidden from Linux (just below the firmware area)."""
        return self.mem_size - FIRMWARE_TOP - self.reserved_size

    @staticmethod
    def gpa_to_file_offset(gpa: int) -> int:
        """Guest physical address -> offset in the RAM file (identity)."""
        return gpa

    # --- command line ----------------------------------------------------------
    def cmdline(self) -> str:
        args = [
            "console=ttyS0,115200", "panic=-1", "oops=panic",
            f"memmap={self.reserved_size:#x}${self.reserved_base:#x}",
            # Keep ACPI PnP from handing ISA devices to built-in drivers
            # (8250_pnp would grab the hvsim UART); see the doc.
            "pnpacpi=off",
            "nokaslr", "tsc=reliable", "no_timer_check",
            "rdinit=/init",
        ]
        return " ".join(args + self.extra_cmdline)

    def qemu_argv(self, initrd: Path) -> list[str]:
        return [
            QEMU,
            # q35: modern chipset, RAM linear up to 2 GiB, ISA IRQs 5/7/10/11
            # unused (PCI INTx goes to IOAPIC pins 16-23).
            "-machine", "q35,memory-backend=ram",
            # One TCG thread for all vCPUs: with multi-threaded TCG the
            # kernel's int3-based live patching (text_poke_bp) sometimes
            # leaves a vCPU executing a stale int3 ("Oops: int3" in
            # sched_clock_cpu at boot, seen under load on 6.12).
            "-accel", "tcg,thread=single",
            # max: every feature TCG implements (RDRAND -> fast crng init,
            # x2apic, ...); no host-CPU dependency since TCG emulates it.
            "-cpu", "max",
            "-smp", str(self.smp),
            "-m", f"{self.mem_mb}M",
            "-object", (f"memory-backend-file,id=ram,size={self.mem_mb}M,"
                        f"mem-path={self.ram_path},share=on"),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=con,signal=off",
            "-serial", "chardev:con",
            "-kernel", str(boot_image(self.kernel_version, self.boot)),
            "-initrd", str(initrd),
            "-append", self.cmdline(),
            *self.extra_qemu_args,
        ]

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        initrd = build_initramfs(self.workdir / "initrd.img", self.script,
                                 self.files, self.nonce)
        argv = self.qemu_argv(initrd)
        (self.workdir / "qemu.argv").write_text(" ".join(argv) + "\n")
        # Pre-create the RAM file so the host side can mmap it at once.
        with open(self.ram_path, "wb") as f:
            f.truncate(self.mem_size)
        self._logf = open(self.log_path, "w")
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _live.add(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").replace("\r", "")
            self._lines.append(line)
            if self._t_first is None:
                self._t_first = time.monotonic() - self._t0
            self._logf.write(line)
            self._logf.flush()
            if self._t_init is None and f"HVSIM-INIT {self.nonce}" in line:
                self._t_init = time.monotonic() - self._t0
            if self.echo:
                print(line, end="", flush=True)
            if self.on_line:
                self.on_line(line)
        self._logf.close()             # EOF: QEMU (and its children) exited

    def wait(self, timeout: float | None = None) -> GuestResult:
        assert self.proc
        timeout = self.timeout if timeout is None else timeout
        timed_out = False
        try:
            self.proc.wait(timeout=max(0.0, self._t0 + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        wall = time.monotonic() - self._t0
        if self._reader:
            self._reader.join(timeout=5)
        self._cleanup()
        out = "".join(self._lines)
        code = init_up = end_up = None
        m = re.search(rf"HVSIM-INIT {self.nonce} uptime=([\d.]+)", out)
        if m:
            init_up = float(m.group(1))
        m = re.search(rf"HVSIM-END {self.nonce} rc=(\d+) uptime=([\d.]+)", out)
        if m:
            code, end_up = int(m.group(1)), float(m.group(2))
        return GuestResult(code, out, self.log_path, timed_out,
                           self.proc.returncode, wall, self._t_init,
                           self._t_first, init_up, end_up)

    def run(self) -> GuestResult:
        with self:
            self.start()
            return self.wait()

    def kill(self) -> None:
        p = self.proc
        if p and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        _live.discard(self)
        # The RAM file and the initrd are big; the console log stays.
        for p in (self.ram_path, self.workdir / "initrd.img"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RootVM":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def run_script(script: str, **kw) -> GuestResult:
    """Boot, run ``script`` in the guest, power off; return the result."""
    vm = RootVM(script, **kw)
    res = vm.run()
    log(f"{vm.kernel_version}: {res.summary()} (log: {res.log_path})")
    return res


_SMOKE_SCRIPT = """
python3 -c 'import ctypes, fcntl, mmap, os, struct, threading, signal; print("python-ok", ctypes.sizeof(ctypes.c_void_p))'
grep -i reserved /proc/iomem | grep -v fd00000000
python3 - <<'EOF'
import mmap, os
fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, offset=@BASE@)
print("guest-read", m[:16])
m[16:32] = b"guest-was-here!!"
EOF
"""


def _smoke(ver: str, echo: bool) -> bool:
    """python3 works in the guest; the reserved range is shared with the host
    at file offset == GPA (host writes before boot, guest answers via
    /dev/mem while the host watches the live file)."""
    import mmap
    vm = RootVM("", kernel_version=ver, echo=echo, timeout=120)
    base = vm.reserved_base
    vm.script = _SMOKE_SCRIPT.replace("@BASE@", hex(base))
    seen = False
    with vm:
        vm.start()
        with open(vm.ram_path, "r+b") as f:
            mem = mmap.mmap(f.fileno(), vm.mem_size)
        # QEMU maps the file as it is; this lands at GPA == reserved_base.
        mem[base:base + 16] = b"host-was-here!!!"
        deadline = time.monotonic() + vm.timeout
        while vm.proc.poll() is None and time.monotonic() < deadline:
            seen |= mem[base + 16:base + 32] == b"guest-was-here!!"
            time.sleep(0.05)
        seen |= mem[base + 16:base + 32] == b"guest-was-here!!"
        mem.close()
        r = vm.wait()
    log(f"{ver}: {r.summary()} (log: {r.log_path})")
    good = (r.exit_code == 0 and "python-ok 8" in r.output and
            "guest-read b'host-was-here!!!'" in r.output and seen)
    print(f"{ver}: {'OK' if good else 'FAIL'} reserved=[{base:#x}, "
          f"{base + vm.reserved_size:#x}) host-saw-guest-write={seen}")
    return good


if __name__ == "__main__":
    # Smoke test for every kernel: boot, python3 in the guest, shared RAM.
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append",
                    help="Debian kernel ABI version (repeatable)")
    ap.add_argument("--echo", action="store_true", help="echo the console")
    a = ap.parse_args()
    ok = True
    for v in a.kernel or DEFAULT_KERNEL_VERSIONS:
        ok &= _smoke(v, a.echo)
    raise SystemExit(0 if ok else 1)
