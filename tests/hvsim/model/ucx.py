"""The patched Unicorn the model runs child VPs on, and its x86 controls.

Unicorn 2.1.4 as published is a user-mode sandbox: SYSCALL only calls a
hook, exceptions never reach the guest's IDT, RDMSR/WRMSR cannot be hooked,
and the only way to stop before an instruction is a per-instruction hook
(~3 us each from Python). `scripts/build-unicorn.sh` builds the same release
from its published source with the patches in `tests/hvsim/unicorn/patches/`
(x86 only, cached under `.cache/unicorn/`); they add a full-system mode and
the controls below (documented in the patched `unicorn/x86.h`).

Importing this module points the `unicorn` Python package at that library
(LIBUNICORN_PATH) and checks that it is the patched one, so it must be
imported before anything imports `unicorn`; `model/__init__.py` does.
"""

import ctypes
import os
from pathlib import Path

UNICORN_VERSION = "2.1.4"
REPO_ROOT = Path(__file__).resolve().parents[3]


def library_dir():
    """Where scripts/build-unicorn.sh puts libunicorn.so.2."""
    env = os.environ.get("HVSIM_UNICORN_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("HVSIM_UNICORN_CACHE", REPO_ROOT / ".cache" / "unicorn"))
    return cache / UNICORN_VERSION


_LIB = library_dir()
if not (_LIB / "libunicorn.so.2").exists():
    raise ImportError("the patched Unicorn is not built (%s/libunicorn.so.2 missing): run "
                      "scripts/build-unicorn.sh (scripts/setup.sh does)" % _LIB)
if "unicorn" in __import__("sys").modules and os.environ.get("LIBUNICORN_PATH") != str(_LIB):
    raise ImportError("unicorn was imported before model.ucx: it loaded the unpatched library")
os.environ["LIBUNICORN_PATH"] = str(_LIB)

import unicorn  # noqa: E402
from unicorn import UC_CTL_IO_READ, UC_CTL_IO_WRITE  # noqa: E402

# uc_control_type values added by the patches (unicorn/unicorn.h)
CTL_SYSTEM_MODE = 0x1000
CTL_EXIT_INSNS = 0x1001
CTL_EXCEPTION_EXITS = 0x1002
CTL_EXIT_REASON = 0x1003
CTL_INJECT = 0x1004
CTL_IRQ_WINDOW = 0x1005
CTL_KICK = 0x1006
CTL_SEGMENT = 0x1007
CTL_INTR_STATE = 0x1008
CTL_TSC_HZ = 0x1009
CTL_STEP = 0x100A

# UC_X86_EXIT_INSN_* (unicorn/x86.h)
EXIT_INSN_IO, EXIT_INSN_CPUID, EXIT_INSN_MSR = 1 << 0, 1 << 1, 1 << 2
EXIT_INSN_HLT, EXIT_INSN_VMCALL, EXIT_INSN_CR8 = 1 << 3, 1 << 4, 1 << 5
# uc_x86_exit_reason
(EXIT_NONE, EXIT_IO, EXIT_CPUID, EXIT_MSR, EXIT_HLT, EXIT_VMCALL, EXIT_CR8,
 EXIT_IRQ_WINDOW, EXIT_KICK, EXIT_EXCEPTION, EXIT_TRIPLE_FAULT, EXIT_STEP) = range(12)
EXIT_NAMES = {v: k for k, v in globals().items() if k.startswith("EXIT_") and isinstance(v, int)
              and not k.startswith("EXIT_INSN")}
# UC_X86_WINDOW_*
WINDOW_IRQ, WINDOW_NMI = 1 << 0, 1 << 1
# UC_X86_INJECT_*
INJECT_INTERRUPT, INJECT_NMI, INJECT_EXCEPTION = 0, 1, 2
# UC_X86_INTR_STATE_*
INTR_SHADOW, INTR_NMI_MASKED = 1 << 0, 1 << 1


class Segment(ctypes.Structure):
    """uc_x86_segment: flags are descriptor bits 8-23 of the high dword."""
    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


def _lib():
    from unicorn.unicorn_py3 import unicorn as binding
    if Path(binding.uclib._name).resolve() != (_LIB / "libunicorn.so.2").resolve():
        # the binding silently falls back to its bundled library when ours
        # does not load (an unresolved symbol, say)
        import ctypes as ct
        try:
            ct.CDLL(str(_LIB / "libunicorn.so.2"))
        except OSError as e:
            raise ImportError("the patched Unicorn does not load: %s" % e)
        raise ImportError("unicorn loaded %s, not the patched %s" % (binding.uclib._name, _LIB))
    return binding.uclib


_uc_ctl = _lib().uc_ctl


def _code(ctl, op, nargs):
    return (op << 30) | (nargs << 26) | ctl


def ctl_write(uc, ctl, *args):
    err = _uc_ctl(uc._uch, _code(ctl, UC_CTL_IO_WRITE, len(args)), *args)
    if err:
        raise unicorn.UcError(err)


def ctl_read(uc, ctl, *args):
    err = _uc_ctl(uc._uch, _code(ctl, UC_CTL_IO_READ, len(args)), *args)
    if err:
        raise unicorn.UcError(err)


def set_system_mode(uc, on=True):
    ctl_write(uc, CTL_SYSTEM_MODE, ctypes.c_int(int(on)))


def set_exit_insns(uc, mask):
    ctl_write(uc, CTL_EXIT_INSNS, ctypes.c_uint32(mask))


def set_exception_exits(uc, bitmap):
    ctl_write(uc, CTL_EXCEPTION_EXITS, ctypes.c_uint32(bitmap & 0xFFFFFFFF))


def exit_reason(uc):
    """(reason, vector, error_code); vector/error_code are -1 when not reported."""
    r, v, e = ctypes.c_uint32(), ctypes.c_int32(), ctypes.c_int64()
    ctl_read(uc, CTL_EXIT_REASON, ctypes.byref(r), ctypes.byref(v), ctypes.byref(e))
    return r.value, v.value, e.value


def inject(uc, kind, vector, error_code=-1):
    ctl_write(uc, CTL_INJECT, ctypes.c_int(kind), ctypes.c_int(vector), ctypes.c_int64(error_code))


def irq_window(uc, mask):
    """Exit at the next window of `mask` (WINDOW_IRQ, WINDOW_NMI); 0 cancels."""
    ctl_write(uc, CTL_IRQ_WINDOW, ctypes.c_int(mask))


def kick(uc):
    """Thread-safe: end the running (or the next) emu_start at a TB boundary."""
    err = _uc_ctl(uc._uch, _code(CTL_KICK, UC_CTL_IO_WRITE, 0))
    if err:
        raise unicorn.UcError(err)


def step(uc):
    """The next emu_start runs one instruction (or delivers one event)."""
    err = _uc_ctl(uc._uch, _code(CTL_STEP, UC_CTL_IO_WRITE, 0))
    if err:
        raise unicorn.UcError(err)


def get_segment(uc, idx):
    s = Segment()
    ctl_read(uc, CTL_SEGMENT, ctypes.c_int(idx), ctypes.byref(s))
    return s.selector, s.base, s.limit, s.flags


def set_segment(uc, idx, selector, base, limit, flags):
    s = Segment(selector, base, limit, flags)
    ctl_write(uc, CTL_SEGMENT, ctypes.c_int(idx), ctypes.byref(s))


def get_intr_state(uc):
    v = ctypes.c_uint32()
    ctl_read(uc, CTL_INTR_STATE, ctypes.byref(v))
    return v.value


def set_intr_state(uc, value):
    ctl_write(uc, CTL_INTR_STATE, ctypes.c_uint32(value))


def set_tsc(uc, hz, offset):
    ctl_write(uc, CTL_TSC_HZ, ctypes.c_uint64(hz), ctypes.c_int64(offset))


def release(uc):
    """Free a Uc's native handle now (the binding otherwise waits for the
    garbage collector, and engines sit in reference cycles through their hooks)."""
    fin = getattr(uc, "_Uc__finalizer", None)
    if fin is not None:
        fin()


def check():
    """Raise ImportError unless the loaded library has the patches."""
    u = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    try:
        set_system_mode(u, True)
    except unicorn.UcError:
        raise ImportError("%s is not the patched Unicorn (no full-system mode): rebuild it with "
                          "scripts/build-unicorn.sh" % _LIB)
    finally:
        release(u)


check()


class RegFile:
    """Batched access to the registers the model keeps (one C call each way
    for the 64-bit ones, one for the XMM registers): the Python binding's
    per-register path costs ~10 us a register, which made an exit slow."""

    def __init__(self, reg_ids, xmm_ids, msr_ids, table_ids):
        n = len(reg_ids)
        self.n = n
        self.ids = (ctypes.c_int32 * n)(*reg_ids)
        self.vals = (ctypes.c_uint64 * n)()
        self.ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(self.vals) + 8 * i for i in range(n)])
        m = len(xmm_ids)
        self.m = m
        self.xids = (ctypes.c_int32 * m)(*xmm_ids)
        self.xvals = ((ctypes.c_uint64 * 2) * m)()
        self.xptrs = (ctypes.c_void_p * m)(*[ctypes.addressof(self.xvals) + 16 * i for i in range(m)])

        class Msr(ctypes.Structure):
            _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]

        class Mmr(ctypes.Structure):
            _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                        ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]
        k = len(msr_ids)
        self.k = k
        self.msr_reg = msr_reg = __import__("unicorn").x86_const.UC_X86_REG_MSR
        self.mids = (ctypes.c_int32 * k)(*([msr_reg] * k))
        self.mvals = (Msr * k)(*[Msr(i, 0) for i in msr_ids])
        self.mptrs = (ctypes.c_void_p * k)(*[ctypes.addressof(self.mvals) + ctypes.sizeof(Msr) * i
                                             for i in range(k)])
        t = len(table_ids)
        self.t = t
        self.tids = (ctypes.c_int32 * t)(*table_ids)
        self.tvals = (Mmr * t)()
        self.tptrs = (ctypes.c_void_p * t)(*[ctypes.addressof(self.tvals) + ctypes.sizeof(Mmr) * i
                                             for i in range(t)])
        lib = _lib()
        self._rd, self._wr = lib.uc_reg_read_batch, lib.uc_reg_write_batch

    def _call(self, fn, uc, ids, ptrs, n):
        err = fn(uc._uch, ids, ptrs, n)
        if err:
            raise unicorn.UcError(err)

    def read(self, uc):
        """-> (64-bit values, XMM values, MSR values, (selector, base, limit, flags) tables)"""
        self._call(self._rd, uc, self.ids, self.ptrs, self.n)
        self._call(self._rd, uc, self.xids, self.xptrs, self.m)
        self._call(self._rd, uc, self.mids, self.mptrs, self.k)
        self._call(self._rd, uc, self.tids, self.tptrs, self.t)
        return (list(self.vals), [x[0] | (x[1] << 64) for x in self.xvals],
                [v.value for v in self.mvals],
                [(v.selector, v.base, v.limit, v.flags) for v in self.tvals])

    def write_regs(self, uc, values):
        """Write the first len(values) registers of the 64-bit list."""
        for i, v in enumerate(values):
            self.vals[i] = v
        self._call(self._wr, uc, self.ids, self.ptrs, len(values))

    def write_xmm(self, uc, values):
        for i, v in enumerate(values):
            self.xvals[i][0] = v & 0xFFFFFFFFFFFFFFFF
            self.xvals[i][1] = v >> 64
        self._call(self._wr, uc, self.xids, self.xptrs, self.m)

    def write_msrs(self, uc, values):
        for i, v in enumerate(values):
            self.mvals[i].value = v
        self._call(self._wr, uc, self.mids, self.mptrs, self.k)
