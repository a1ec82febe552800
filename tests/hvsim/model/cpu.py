"""Run one child VP on Unicorn (unicorn==2.1.4).

The VP's architectural state lives in the model's register file (a dict of
hv register name -> 128-bit value, see hv.py); an Engine loads it into a
per-VP Unicorn instance before running and stores it back afterwards.

Unicorn 2.1.4's register API cannot set hidden segment state (in UC_MODE_64
writing CS/DS/ES/SS only changes the selector), so the engine patches the
segment caches and the hflags bits QEMU derives from them directly in a saved
CPU context (CPUX86State). The layout of that context is discovered and
verified at start-up (_CtxLayout); a mismatch raises instead of silently
running with a wrong state.

Intercepts are found by a UC_HOOK_CODE hook that looks at each instruction
BEFORE it executes (IN/OUT/INS/OUTS, HLT, CPUID, RDMSR/WRMSR) and stops with
RIP at the instruction and no effect applied; memory intercepts come from the
UNMAPPED/PROT memory hooks (the address Unicorn passes there is the GPA). A
write the hypervisor takes (a doorbell) completes into a scratch page mapped
for that one instruction; MOV CR8 is emulated (CR8 is the APIC's TPR).
"""

import struct
import time

from unicorn import (Uc, UcError, UC_ARCH_X86, UC_MODE_64, UC_PROT_READ, UC_PROT_WRITE,
                     UC_PROT_EXEC, UC_HOOK_CODE, UC_HOOK_MEM_UNMAPPED, UC_HOOK_MEM_PROT,
                     UC_HOOK_INTR, UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED,
                     UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_PROT, UC_MEM_WRITE_PROT,
                     UC_MEM_FETCH_PROT, UC_ERR_INSN_INVALID)
from unicorn import x86_const as X

# x86 architectural bits (not hypervisor ABI, so not in the TLFS bindings)
CR0_PE, CR0_AM, CR0_PG = 1 << 0, 1 << 18, 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
MSR_EFER = 0xC0000080
RFLAGS_IF = 1 << 9
# QEMU segment-cache flag bits (descriptor high dword) and hflags bits
DESC_DPL_SHIFT, DESC_B, DESC_L = 13, 1 << 22, 1 << 21
HF_CPL_MASK, HF_CS32, HF_SS32, HF_ADDSEG, HF_PE, HF_LMA, HF_CS64 = 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 14, 1 << 15
HF_VM = 1 << 17

GPR_UC = [X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
          X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
          X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
          X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15]
XMM_UC = [getattr(X, "UC_X86_REG_XMM%d" % i) for i in range(16)]
DR_UC = [X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3,
         X.UC_X86_REG_DR6, X.UC_X86_REG_DR7]
# MSR-like registers kept inside Unicorn (hv register suffix -> MSR index)
NATIVE_MSRS = {"STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083,
               "SFMASK": 0xC0000084, "KERNEL_GS_BASE": 0xC0000102,
               "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175, "SYSENTER_EIP": 0x176,
               "PAT": 0x277}

IO_OPS = {0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF, 0x6C, 0x6D, 0x6E, 0x6F}
PREFIXES = {0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65}

U64 = (1 << 64) - 1


def attr_to_flags(attr):
    """hv_x64_segment_register.attributes -> QEMU segment-cache flags."""
    return ((attr & 0xFF) << 8) | (((attr >> 12) & 0xF) << 20)


def flags_to_attr(flags):
    return ((flags >> 8) & 0xFF) | (((flags >> 20) & 0xF) << 12)


class _CtxLayout:
    """Offsets inside a Unicorn x86 context blob (uc_context header + CPUX86State),
    found with marker values and verified, once per process."""

    _cached = None

    @classmethod
    def get(cls):
        if cls._cached is None:
            cls._cached = cls()
        return cls._cached

    def __init__(self):
        import ctypes
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.reg_write(X.UC_X86_REG_CR0, 0x10)
        uc.reg_write(X.UC_X86_REG_RAX, 0x1122334455667788)
        uc.reg_write(X.UC_X86_REG_RCX, 0x99AABBCCDDEEFF01)
        uc.reg_write(X.UC_X86_REG_FS, 0x1234)          # real-mode load: base 0x12340
        uc.reg_write(X.UC_X86_REG_GS, 0x2345)
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, 0xD01))
        ctx = uc.context_save()
        ptr = ctypes.cast(ctx.context, ctypes.c_void_p).value
        raw = ctypes.string_at(ptr, ctx.size)   # uc_context header + CPU state
        self.data = raw.find(struct.pack("<QQ", 0x1122334455667788, 0x99AABBCCDDEEFF01))
        if self.data < 0:
            raise RuntimeError("unicorn context layout: registers not found")
        d = raw[self.data:]
        self.eip, self.hflags, self.segs = 128, 176, 184
        self.seg_size = 24   # SegmentCache {u32 selector; pad; u64 base; u32 limit; u32 flags}
        fs = struct.unpack_from("<IIQII", d, self.segs + 4 * self.seg_size)
        gs = struct.unpack_from("<IIQII", d, self.segs + 5 * self.seg_size)
        if fs[0] != 0x1234 or fs[2] != 0x12340 or gs[0] != 0x2345 or gs[2] != 0x23450:
            raise RuntimeError("unicorn context layout: segment caches not where expected")
        self.efer = None
        for off in range(self.segs, min(len(d) - 8, 2048), 8):
            if struct.unpack_from("<Q", d, off)[0] == 0xD01:
                self.efer = off
                break
        if self.efer is None:
            raise RuntimeError("unicorn context layout: EFER not found")
        # bytes patched by Engine.load: everything up to and including EFER
        self.size = self.efer + 8
        if self.data + self.size > ctx.size:
            raise RuntimeError("unicorn context layout: context too small")


class Exit:
    """Why a run stopped. kind: io, halt, memory, cpuid, msr, exception,
    unrecoverable, preempt, stopped, interrupt (an interrupt is deliverable at
    this boundary; hv.py delivers it and re-enters), blocked (hv.py only: HLT
    with IF=1 and nothing pending)."""

    def __init__(self, kind, **kw):
        self.kind = kind
        self.__dict__.update(kw)

    def __repr__(self):
        return "Exit(%s)" % ", ".join("%s=%r" % kv for kv in self.__dict__.items())


class Engine:
    """A Unicorn instance bound to one VP of one partition."""

    def __init__(self, hv, part, vp):
        import ctypes
        self._ctypes = ctypes
        self.hv, self.part, self.vp = hv, part, vp
        self.lay = _CtxLayout.get()
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.map_gen = -1
        self.regions = []
        self.uc.hook_add(UC_HOOK_CODE, self._on_code)
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED | UC_HOOK_MEM_PROT, self._on_mem)
        self.uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def close(self):
        try:
            self.uc.release_handle()
        except Exception:
            pass

    # ------------------------------------------------------------ memory
    def sync_maps(self):
        """(Re)map the partition's GPA space when it changed since last run."""
        part = self.part
        if self.map_gen == part.map_gen:
            return
        for base, size in self.regions:
            self.uc.mem_unmap(base, size)
        self.regions = []
        ram = self.hv.mem
        runs = []
        for gfn in sorted(part.gpa):
            pfn, flags = part.gpa[gfn][0], part.gpa[gfn][1]
            if not ram.contains(pfn << 12, 4096):
                continue     # MMIO target outside root RAM: accesses intercept as unmapped
            prot = self.hv.uc_prot(flags)
            if prot is None:
                continue
            if runs and runs[-1][0] + runs[-1][2] == gfn and runs[-1][1] + runs[-1][2] == pfn \
                    and runs[-1][3] == prot:
                runs[-1][2] += 1
            else:
                runs.append([gfn, pfn, 1, prot])
        for gfn, pfn, n, prot in runs:
            self.uc.mem_map_ptr(gfn << 12, n << 12, prot, ram.host_pointer(pfn << 12))
            self.regions.append((gfn << 12, n << 12))
        self.map_gen = part.map_gen
        self.uc.ctl_flush_tb()

    def gpa_read(self, gpa, n):
        """Read child GPA bytes through the partition map (None if unmapped)."""
        out = b""
        while n > 0:
            ent = self.part.gpa.get(gpa >> 12)
            if ent is None or not self.hv.mem.contains(ent[0] << 12, 4096):
                return None if not out else out
            off = gpa & 0xFFF
            k = min(n, 4096 - off)
            out += self.hv.mem.read((ent[0] << 12) + off, k)
            gpa += k
            n -= k
        return out

    def _gpa_u64(self, gpa, size=8):
        b = self.gpa_read(gpa, size)
        if b is None or len(b) < size:
            return None
        return int.from_bytes(b, "little")

    def translate(self, lin, cr0=None, cr3=None, cr4=None, efer=None):
        """Linear -> guest physical with the current (or given) paging state;
        None when not present."""
        if cr0 is None:
            cr0, cr3, cr4, efer = self._pg
        if not cr0 & CR0_PG:
            return lin & (U64 if efer & EFER_LMA else 0xFFFFFFFF)
        amask = 0x000FFFFFFFFFF000
        if efer & EFER_LMA:
            table = cr3 & amask
            for shift in (39, 30, 21, 12):
                e = self._gpa_u64(table + ((lin >> shift) & 0x1FF) * 8)
                if e is None or not e & 1:
                    return None
                if shift in (30, 21) and e & 0x80:
                    return (e & amask & ~((1 << shift) - 1)) | (lin & ((1 << shift) - 1))
                table = e & amask
            return table | (lin & 0xFFF)
        if cr4 & CR4_PAE:
            e = self._gpa_u64((cr3 & 0xFFFFFFE0) + ((lin >> 30) & 3) * 8)
            if e is None or not e & 1:
                return None
            table = e & amask
            for shift in (21, 12):
                e = self._gpa_u64(table + ((lin >> shift) & 0x1FF) * 8)
                if e is None or not e & 1:
                    return None
                if shift == 21 and e & 0x80:
                    return (e & amask & ~0x1FFFFF) | (lin & 0x1FFFFF)
                table = e & amask
            return table | (lin & 0xFFF)
        e = self._gpa_u64((cr3 & 0xFFFFF000) + ((lin >> 22) & 0x3FF) * 4, 4)
        if e is None or not e & 1:
            return None
        if e & 0x80 and cr4 & CR4_PSE:
            return (e & 0xFFC00000) | ((e & 0x1FE000) << 19) | (lin & 0x3FFFFF)
        e = self._gpa_u64((e & 0xFFFFF000) + ((lin >> 12) & 0x3FF) * 4, 4)
        if e is None or not e & 1:
            return None
        return (e & 0xFFFFF000) | (lin & 0xFFF)

    def read_linear(self, lin, n, stop_at_page_end=False):
        out = b""
        while n > 0:
            gpa = self._tcache.get(lin >> 12)
            if gpa is None:
                g = self.translate(lin & ~0xFFF)
                if g is None:
                    break
                gpa = self._tcache[lin >> 12] = g & ~0xFFF
            off = lin & 0xFFF
            k = min(n, 4096 - off)
            b = self.gpa_read(gpa + off, k)
            if not b:
                break
            out += b
            if stop_at_page_end or len(b) < k:
                break
            lin += k
            n -= k
        return out

    # ------------------------------------------------------------ state
    def _ctx(self):
        ctx = self.uc.context_save()
        ptr = self._ctypes.cast(ctx.context, self._ctypes.c_void_p).value + self.lay.data
        return ctx, ptr

    def load(self, st):
        """Load a CpuState (hv.py) into Unicorn."""
        uc = self.uc
        w = uc.reg_write
        w(X.UC_X86_REG_CR0, 0x10)                       # paging off: leaves long mode
        w(X.UC_X86_REG_MSR, (MSR_EFER, st.efer & ~EFER_LMA))
        w(X.UC_X86_REG_CR4, st.cr4)
        w(X.UC_X86_REG_CR3, st.cr3)
        w(X.UC_X86_REG_CR0, st.cr0)                     # PG+LME+PAE -> QEMU sets LMA
        w(X.UC_X86_REG_CR2, st.cr2)
        w(X.UC_X86_REG_CR8, st.cr8)
        for r, v in zip(GPR_UC, st.gpr):
            w(r, v)
        w(X.UC_X86_REG_RFLAGS, st.rflags)
        for r, v in zip(DR_UC, st.dr):
            w(r, v)
        for r, v in zip(XMM_UC, st.xmm):
            w(r, v)
        w(X.UC_X86_REG_GDTR, (0, st.gdtr[0], st.gdtr[1], 0))
        w(X.UC_X86_REG_IDTR, (0, st.idtr[0], st.idtr[1], 0))
        for reg, seg in ((X.UC_X86_REG_LDTR, st.ldtr), (X.UC_X86_REG_TR, st.tr)):
            w(reg, (seg[2], seg[0], seg[1], attr_to_flags(seg[3])))
        for name, idx in NATIVE_MSRS.items():
            w(X.UC_X86_REG_MSR, (idx, st.msrs.get(name, 0)))
        # segment caches + the hflags QEMU derives from them
        ctx, p = self._ctx()
        lay = self.lay
        raw = bytearray(self._ctypes.string_at(p, lay.size))
        # EFER.LMA is not writable through WRMSR and Unicorn starts in long mode:
        # set LMA (and HF_LMA) from CR0.PG && EFER.LME like the CPU would.
        lma = bool(st.cr0 & CR0_PG and st.efer & EFER_LME)
        efer = (struct.unpack_from("<Q", raw, lay.efer)[0] & ~EFER_LMA) | (EFER_LMA if lma else 0)
        flags = []
        for i, (base, limit, sel, attr) in enumerate(st.segs):
            f = attr_to_flags(attr) if attr else 0
            flags.append(f)
            struct.pack_into("<IIQII", raw, lay.segs + i * lay.seg_size, sel, 0, base, limit, f)
        hf = struct.unpack_from("<I", raw, lay.hflags)[0]
        hf &= ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG | HF_LMA | HF_PE)
        if lma:
            hf |= HF_LMA
        if st.cr0 & CR0_PE:
            hf |= HF_PE
        cs_f, ss_f = flags[1], flags[2]
        if (hf & HF_LMA) and (cs_f & DESC_L):
            hf |= HF_CS32 | HF_SS32 | HF_CS64
        elif cs_f & DESC_B:
            hf |= HF_CS32
        if st.cr0 & CR0_PE and not (st.rflags & (1 << 17)):
            hf |= (ss_f >> DESC_DPL_SHIFT) & 3
        elif st.rflags & (1 << 17):
            hf |= 3
        new = HF_SS32 if ss_f & DESC_B else 0
        if hf & HF_CS64:
            pass
        elif not (st.cr0 & CR0_PE) or (st.rflags & (1 << 17)) or not (hf & HF_CS32):
            new |= HF_ADDSEG
        elif st.segs[3][0] | st.segs[0][0] | st.segs[2][0]:
            new |= HF_ADDSEG
        hf = (hf & ~(HF_SS32 | HF_ADDSEG)) | new
        struct.pack_into("<I", raw, lay.hflags, hf)
        struct.pack_into("<Q", raw, lay.efer, efer)
        self._ctypes.memmove(p, bytes(raw), lay.size)
        uc.context_restore(ctx)
        w(X.UC_X86_REG_RIP, st.rip)

    def store(self, st):
        """Read Unicorn's state back into a CpuState."""
        r = self.uc.reg_read
        st.gpr = [r(x) for x in GPR_UC]
        st.rip = r(X.UC_X86_REG_RIP)
        st.rflags = r(X.UC_X86_REG_RFLAGS)
        st.cr0, st.cr2, st.cr3, st.cr4 = (r(X.UC_X86_REG_CR0), r(X.UC_X86_REG_CR2),
                                          r(X.UC_X86_REG_CR3), r(X.UC_X86_REG_CR4))
        st.cr8 = self.vp.apic.tpr >> 4      # CR8 is the APIC's TPR[7:4] (MOV CR8 is emulated)
        st.efer = r(X.UC_X86_REG_MSR, MSR_EFER)
        st.dr = [r(x) for x in DR_UC]
        st.xmm = [r(x) for x in XMM_UC]
        g = r(X.UC_X86_REG_GDTR)
        i = r(X.UC_X86_REG_IDTR)
        st.gdtr, st.idtr = (g[1], g[2]), (i[1], i[2])
        for name, reg in (("ldtr", X.UC_X86_REG_LDTR), ("tr", X.UC_X86_REG_TR)):
            sel, base, limit, flags = r(reg)
            setattr(st, name, (base, limit, sel, flags_to_attr(flags)))
        for name, idx in NATIVE_MSRS.items():
            st.msrs[name] = r(X.UC_X86_REG_MSR, idx)
        _ctx, p = self._ctx()
        raw = self._ctypes.string_at(p + self.lay.segs, 6 * self.lay.seg_size)
        segs = []
        for k in range(6):
            sel, _pad, base, limit, flags = struct.unpack_from("<IIQII", raw, k * self.lay.seg_size)
            segs.append((base, limit, sel & 0xFFFF, flags_to_attr(flags)))
        st.segs = segs

    def _hflags(self):
        _ctx, p = self._ctx()
        return struct.unpack("<I", self._ctypes.string_at(p + self.lay.hflags, 4))[0]

    def _seg(self, idx):
        _ctx, p = self._ctx()
        raw = self._ctypes.string_at(p + self.lay.segs + idx * self.lay.seg_size, self.lay.seg_size)
        sel, _pad, base, limit, flags = struct.unpack("<IIQII", raw)
        return base, limit, sel & 0xFFFF, flags

    def _refresh_pg(self):
        r = self.uc.reg_read
        self._pg = (r(X.UC_X86_REG_CR0), r(X.UC_X86_REG_CR3), r(X.UC_X86_REG_CR4),
                    r(X.UC_X86_REG_MSR, MSR_EFER))
        self._tcache = {}

    # ------------------------------------------------------------ running
    def run(self, st, max_insns, deadline, should_stop, decide, irq_pending=None):
        """Run from CpuState `st` until an exit; `st` is updated in place.

        should_stop() -> bool is polled at each instruction boundary.
        irq_pending() -> 0 (nothing), 1 (a maskable interrupt can be taken) or 2
        (an NMI or INIT): the run stops with Exit("interrupt") at the first
        boundary outside an interrupt shadow (the instruction after STI, MOV SS
        or POP SS) where RFLAGS.IF = 1, or at once for 2. st.shadow_at carries a
        shadow across runs (linear address of the instruction it covers).
        decide(kind, **info) -> 'exit' | 'emulate' lets the hypervisor choose
        between intercepting a CPUID/MSR access and answering it itself; when
        emulating it returns a dict of register results.
        """
        self.sync_maps()
        self.load(st)
        self.uc.ctl_flush_tb()
        self._refresh_pg()
        self.exit = None
        self.count = 0
        self.max_insns = max_insns
        self.deadline = deadline
        self.should_stop = should_stop
        self.decide = decide
        self.irq_pending = irq_pending or (lambda: 0)
        self._shadow_next = getattr(st, "shadow_at", None)
        self._shadow_cur = None
        self.cur = None
        self.cur_size = 0
        try:
            self.uc.emu_start(self.uc.reg_read(X.UC_X86_REG_RIP), U64)
        except UcError as e:
            self._drop_scratch()
            if self.exit is None:
                if e.errno == UC_ERR_INSN_INVALID:
                    self.exit = Exit("exception", vector=6, error_code=None)
                else:
                    self.exit = Exit("unrecoverable", error=str(e))
        self._drop_scratch()
        if self.exit is None:
            self.exit = Exit("unrecoverable", error="emulation ended")
        ex = self.exit
        if getattr(ex, "rip_lin", None) is not None:
            self.uc.reg_write(X.UC_X86_REG_RIP, (ex.rip_lin - self._seg(1)[0]) & self._ipmask())
        self.store(st)
        st.shadow_at = self._shadow_cur
        return ex

    def _ipmask(self):
        hf = self._hflags()
        return U64 if hf & HF_CS64 else 0xFFFFFFFF

    def _stop(self, ex):
        if self.exit is None:
            self.exit = ex
        self.uc.emu_stop()

    _scratch = ()

    def _drop_scratch(self):
        """Unmap the scratch pages that swallowed doorbell writes."""
        if self._scratch:
            for page in self._scratch:
                self.uc.mem_unmap(page, 4096)
            self._scratch = ()

    def _on_code(self, uc, addr, size, _ud):
        if self._scratch:
            self._drop_scratch()        # the instruction that rang a doorbell is done
        self.cur = addr
        self.cur_size = size
        self.count += 1
        if self._pg_stale():
            self._refresh_pg()
        shadow = addr == self._shadow_next
        self._shadow_next = None
        self._shadow_cur = addr if shadow else None
        if self.should_stop():
            return self._stop(Exit("stopped", rip_lin=addr))
        if self.count > self.max_insns or (self.count & 0x3FF == 0 and time.monotonic() > self.deadline):
            return self._stop(Exit("preempt", rip_lin=addr))
        if not shadow:
            k = self.irq_pending()
            if k and (k == 2 or self.uc.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_IF):
                return self._stop(Exit("interrupt", rip_lin=addr))
        b = self.read_linear(addr, size)
        i = 0
        rep = False
        while i < len(b) and (b[i] in PREFIXES or 0x40 <= b[i] <= 0x4F):
            if b[i] in (0xF2, 0xF3):
                rep = True
            i += 1
        if i >= len(b):
            return
        op = b[i]
        if op in (0xFB, 0x17) or (op == 0x8E and i + 1 < len(b) and (b[i + 1] >> 3) & 7 == 2):
            self._shadow_next = addr + size     # STI, POP SS, MOV SS: shadow on the next instruction
        if op == 0xCF:
            self.vp.apic.nmi_blocked = False     # IRET ends NMI blocking
        if op in IO_OPS:
            return self._io(addr, size, b, i, rep)
        if op == 0xF4:
            return self._stop(Exit("halt", rip_lin=addr, length=size))
        if op == 0x0F and i + 1 < len(b):
            op2 = b[i + 1]
            if op2 == 0xA2:
                return self._cpuid(addr, size)
            if op2 in (0x30, 0x32):
                return self._msr(addr, size, write=(op2 == 0x30))
            if op2 == 0x22 or (op2 == 0x01 and i + 2 < len(b) and (b[i + 2] >> 3) & 7 == 7):
                self._stale = True      # mov to CR / invlpg: recompute paging next time
            if op2 in (0x20, 0x22) and i + 2 < len(b) and (b[i + 2] >> 3) & 7 == 0 and i > 0 \
                    and 0x40 <= b[i - 1] <= 0x4F and b[i - 1] & 4:
                return self._mov_cr8(addr, size, b[i - 1], b[i + 2], to_cr8=(op2 == 0x22))
            if op2 == 0x01 and i + 2 < len(b) and b[i + 2] in (0xC1, 0xD9):
                return self._vmcall(addr, size)

    _stale = False

    def _vmcall(self, addr, size):
        """VMCALL/VMMCALL: a guest hypercall. decide("vmcall", gpr=[16], xmm=[16],
        cpl=, long64=) -> ("emulate", {"gpr": {i: v}, "xmm": {i: v}}) to complete
        it, ("exception", {"vector": v, "error_code": e or None}) to fault, or
        ("exit", None) to intercept."""
        r = self.uc.reg_read
        hf = self._hflags()
        verdict, res = self.decide("vmcall", gpr=[r(x) for x in GPR_UC], xmm=[r(x) for x in XMM_UC],
                                   cpl=hf & HF_CPL_MASK, long64=bool(hf & HF_CS64))
        if verdict == "exit":
            return self._stop(Exit("vmcall", rip_lin=addr, length=size))
        if verdict == "exception":
            return self._stop(Exit("exception", rip_lin=addr, vector=res["vector"],
                                   error_code=res.get("error_code")))
        for k, v in (res or {}).get("gpr", {}).items():
            self.uc.reg_write(GPR_UC[k], v & U64)
        for k, v in (res or {}).get("xmm", {}).items():
            self.uc.reg_write(XMM_UC[k], v)
        self.uc.reg_write(X.UC_X86_REG_RIP, (addr + size - self._seg(1)[0]) & self._ipmask())

    def kick(self):
        """Ask a running engine (from any thread) to re-check should_stop()
        and irq_pending() soon. This engine polls both at every instruction,
        so there is nothing to do."""

    def _mov_cr8(self, addr, size, rex, modrm, to_cr8):
        """MOV to/from CR8 (REX.R, CR0 encoding): CR8 is the APIC's TPR[7:4].
        Emulated here (Unicorn has no APIC): a write sets TPR = CR8 << 4."""
        reg = GPR_UC[(modrm & 7) | (8 if rex & 1 else 0)]
        if to_cr8:
            self.vp.apic.set_tpr((self.uc.reg_read(reg) & 0xF) << 4)
        else:
            self.uc.reg_write(reg, self.vp.apic.tpr >> 4)
        self.uc.reg_write(X.UC_X86_REG_RIP, (addr + size - self._seg(1)[0]) & self._ipmask())

    def _pg_stale(self):
        if self._stale:
            self._stale = False
            return True
        return False

    def _opsize32(self, b, i):
        """Operand size (bytes) of a non-byte IN/OUT: 2 or 4."""
        hf = self._hflags()
        d32 = bool(hf & HF_CS32)
        if 0x66 in b[:i]:
            d32 = not d32
        return 4 if d32 else 2

    def _io(self, addr, size, b, i, rep):
        op = b[i]
        r = self.uc.reg_read
        string = op in (0x6C, 0x6D, 0x6E, 0x6F)
        byte = op in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E)
        write = op in (0xE6, 0xE7, 0xEE, 0xEF, 0x6E, 0x6F)
        if op in (0xE4, 0xE5, 0xE6, 0xE7):
            port = b[i + 1]
        else:
            port = r(X.UC_X86_REG_RDX) & 0xFFFF
        width = 1 if byte else self._opsize32(b, i)
        self._stop(Exit("io", rip_lin=addr, length=size, port=port, size=width, write=write,
                        string=string, rep=rep and string, insn=bytes(b)))

    def _cpuid(self, addr, size):
        r = self.uc.reg_read
        eax, ecx = r(X.UC_X86_REG_RAX) & 0xFFFFFFFF, r(X.UC_X86_REG_RCX) & 0xFFFFFFFF
        verdict, res = self.decide("cpuid", eax=eax, ecx=ecx)
        if verdict == "exit":
            return self._stop(Exit("cpuid", rip_lin=addr, length=size, eax=eax, ecx=ecx, default=res))
        w = self.uc.reg_write
        for reg, v in zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX), res):
            w(reg, v & 0xFFFFFFFF)
        w(X.UC_X86_REG_RIP, (addr + size - self._seg(1)[0]) & self._ipmask())

    def _msr(self, addr, size, write):
        r = self.uc.reg_read
        ecx = r(X.UC_X86_REG_RCX) & 0xFFFFFFFF
        value = ((r(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32) | (r(X.UC_X86_REG_RAX) & 0xFFFFFFFF)
        verdict, res = self.decide("msr", msr=ecx, write=write, value=value)
        if verdict == "exit":
            return self._stop(Exit("msr", rip_lin=addr, length=size, msr=ecx, write=write, value=value))
        if verdict == "native":
            if write and ecx == MSR_EFER:
                self._stale = True
            return
        w = self.uc.reg_write
        if not write:
            w(X.UC_X86_REG_RAX, res & 0xFFFFFFFF)
            w(X.UC_X86_REG_RDX, (res >> 32) & 0xFFFFFFFF)
        else:
            w(X.UC_X86_REG_CR8, self.vp.apic.tpr >> 4)   # an emulated write may have set TPR
        w(X.UC_X86_REG_RIP, (addr + size - self._seg(1)[0]) & self._ipmask())

    _MEM_KIND = {UC_MEM_READ_UNMAPPED: ("unmapped", 0), UC_MEM_WRITE_UNMAPPED: ("unmapped", 1),
                 UC_MEM_FETCH_UNMAPPED: ("unmapped", 2), UC_MEM_READ_PROT: ("prot", 0),
                 UC_MEM_WRITE_PROT: ("prot", 1), UC_MEM_FETCH_PROT: ("prot", 2)}

    def _on_mem(self, uc, access, address, size, value, _ud):
        kind, acc = self._MEM_KIND.get(access, ("unmapped", 0))
        if kind == "unmapped" and acc == 1 and self.exit is None:
            v = value & ((1 << (8 * size)) - 1) if size <= 8 else value
            if self.decide("doorbell", gpa=address, size=size, value=v)[0] == "consume":
                # the hypervisor took the write: let the instruction complete
                # into a scratch page, unmapped again at the next instruction
                page = address & ~0xFFF
                self.uc.mem_map(page, 4096, UC_PROT_READ | UC_PROT_WRITE)
                self._scratch = tuple(self._scratch) + (page,)
                return True
        cur = self.cur
        if acc == 2:
            cur = None   # the faulting fetch is the instruction itself (RIP from Unicorn)
        if self.exit is None:
            mov = None
            if kind == "unmapped" and acc in (0, 1) and cur is not None:
                mov = self._decode_mov(cur)
                if mov is not None and (mov["store"] != (acc == 1) or mov["size"] != size):
                    mov = None
            self.exit = Exit("memory", rip_lin=cur, gpa=address, access=acc, unmapped=(kind == "unmapped"),
                             size=size, write=(acc == 1), value=value & ((1 << 64) - 1),
                             length=self.cur_size, mov=mov)
        return False

    def _decode_mov(self, addr):
        """The current instruction, if it is a plain MOV between a register or
        an immediate and memory (88/89/8A/8B/C6/C7/A0-A3): {store, size, reg,
        high8}; None otherwise. The hypervisor completes such accesses to the
        xAPIC page itself (hv.py, _mmio)."""
        b = self.read_linear(addr, self.cur_size)
        hf = self._hflags()
        long64 = bool(hf & HF_CS64)
        d32 = bool(hf & HF_CS32)
        i = 0
        osz = False
        while i < len(b) and b[i] in PREFIXES:
            if b[i] == 0x66:
                osz = True
            elif b[i] == 0xF0:
                return None
            i += 1
        rex = 0
        if long64 and i < len(b) and 0x40 <= b[i] <= 0x4F:
            rex = b[i]
            i += 1
        if i >= len(b):
            return None
        op = b[i]
        if op not in (0x88, 0x89, 0x8A, 0x8B, 0xC6, 0xC7, 0xA0, 0xA1, 0xA2, 0xA3):
            return None
        byte = op in (0x88, 0x8A, 0xC6, 0xA0, 0xA2)
        if byte:
            size = 1
        elif rex & 8:
            size = 8
        else:
            size = (2 if osz else 4) if (d32 or long64) else (4 if osz else 2)
        if op in (0xA0, 0xA1, 0xA2, 0xA3):
            return {"store": op in (0xA2, 0xA3), "size": size, "reg": 0, "high8": False}
        if i + 1 >= len(b):
            return None
        modrm = b[i + 1]
        if modrm >> 6 == 3:
            return None
        if op in (0xC6, 0xC7):
            if (modrm >> 3) & 7:
                return None
            return {"store": True, "size": size, "reg": None, "high8": False}
        reg = ((modrm >> 3) & 7) | (8 if rex & 4 else 0)
        high8 = byte and not rex and reg >= 4
        return {"store": op in (0x88, 0x89), "size": size, "reg": reg, "high8": high8}

    def _on_intr(self, uc, intno, _ud):
        self._stop(Exit("exception", rip_lin=self.cur, vector=intno, error_code=None))
