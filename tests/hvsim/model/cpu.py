"""Run one child VP on the patched Unicorn (see ucx.py).

The VP's architectural state lives in the model's register file (a CpuState,
see hv.py); an Engine loads it into a per-VP Unicorn instance before running
and stores it back afterwards. Only what changed since the last store is
written back, and translated code is kept across runs, so an exit and
re-entry costs tens of microseconds, not a retranslation.

Nothing is hooked per instruction. Unicorn runs in full-system mode: SYSCALL,
privilege changes, exceptions and interrupts behave as on hardware, through
the guest's own GDT/IDT/TSS. These leave the guest (ucx "exits"), with RIP at
the instruction and nothing of it done:

- IN/OUT/INS/OUTS, CPUID, RDMSR/WRMSR, HLT, VMCALL/VMMCALL, MOV CR8 (after
  the CPU's own privilege checks: RDMSR at CPL 3 is a #GP in the guest);
- accesses to unmapped or protected GPAs (memory hooks, which only run on
  such a fault);
- exceptions whose vector the partition intercepts (the exit bitmap);
- a triple fault;
- the interrupt window the model asked for, and kicks (from any thread:
  stop requests, new interrupts, the time slice's end).

CPUID, MSR and VMCALL exits go to the hypervisor's decide() first, which may
answer them itself (the instruction is completed here and the guest goes on)
or turn them into intercepts. Events the hypervisor injects (external
interrupts, NMIs, exceptions) are delivered by the CPU at the next entry.
"""

import threading
import heapq
import time

from . import ucx
from unicorn import (Uc, UcError, UC_ARCH_X86, UC_MODE_64, UC_HOOK_MEM_UNMAPPED, UC_HOOK_MEM_PROT,
                     UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE,
                     UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_MEM_FETCH_UNMAPPED,
                     UC_MEM_READ_PROT, UC_MEM_WRITE_PROT, UC_MEM_FETCH_PROT)
from unicorn import x86_const as X

# x86 architectural bits (not hypervisor ABI, so not in the TLFS bindings)
CR0_PE, CR0_AM, CR0_PG = 1 << 0, 1 << 18, 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
MSR_EFER = 0xC0000080
RFLAGS_IF = 1 << 9
# QEMU segment-cache flag bits (descriptor high dword)
DESC_DPL_SHIFT, DESC_B, DESC_L = 13, 1 << 22, 1 << 21

GPR_UC = [X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
          X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
          X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
          X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15]
XMM_UC = [getattr(X, "UC_X86_REG_XMM%d" % i) for i in range(16)]
DR_UC = [X.UC_X86_REG_DR0, X.UC_X86_REG_DR1, X.UC_X86_REG_DR2, X.UC_X86_REG_DR3,
         X.UC_X86_REG_DR6, X.UC_X86_REG_DR7]
CR_UC = [X.UC_X86_REG_CR0, X.UC_X86_REG_CR2, X.UC_X86_REG_CR3, X.UC_X86_REG_CR4]
# MSR-like registers kept inside Unicorn (hv register suffix -> MSR index)
NATIVE_MSRS = {"STAR": 0xC0000081, "LSTAR": 0xC0000082, "CSTAR": 0xC0000083,
               "SFMASK": 0xC0000084, "KERNEL_GS_BASE": 0xC0000102,
               "SYSENTER_CS": 0x174, "SYSENTER_ESP": 0x175, "SYSENTER_EIP": 0x176,
               "PAT": 0x277}

PREFIXES = {0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65}
# the instructions that exit, by what the model needs of them
EXIT_INSNS = (ucx.EXIT_INSN_IO | ucx.EXIT_INSN_CPUID | ucx.EXIT_INSN_MSR | ucx.EXIT_INSN_HLT
              | ucx.EXIT_INSN_VMCALL | ucx.EXIT_INSN_CR8)
# Default TSC frequency when the hypervisor does not set hv.tsc_hz.
DEFAULT_TSC_HZ = 1_000_000_000

U64 = (1 << 64) - 1


def attr_to_flags(attr):
    """hv_x64_segment_register.attributes -> QEMU segment-cache flags."""
    return ((attr & 0xFF) << 8) | (((attr >> 12) & 0xF) << 20)


def flags_to_attr(flags):
    return ((flags >> 8) & 0xFF) | (((flags >> 20) & 0xF) << 12)


class Exit:
    """Why a run stopped. kind: io, halt, memory, cpuid, msr, vmcall, exception,
    unrecoverable, preempt, stopped, interrupt (an interrupt can be taken at
    this boundary; hv.py queues it with Engine.inject and re-enters), blocked
    (hv.py only: HLT with IF=1 and nothing pending)."""

    def __init__(self, kind, **kw):
        self.kind = kind
        self.__dict__.update(kw)

    def __repr__(self):
        return "Exit(%s)" % ", ".join("%s=%r" % kv for kv in self.__dict__.items())


class _Kicker:
    """One thread that kicks engines whose time slice has ended."""

    def __init__(self):
        self._heap = []
        self._cond = threading.Condition()
        self._seq = 0
        self._thread = None

    def arm(self, deadline, engine):
        """Kick `engine` at `deadline` (time.monotonic()) unless its
        slice_token has changed by then; no kick for an infinite deadline."""
        if deadline == float("inf"):
            with self._cond:
                self._seq += 1
                return self._seq
        with self._cond:
            self._seq += 1
            token = self._seq
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (deadline, token, engine))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="hvsim-kicker")
                self._thread.start()
            if earliest is None or deadline < earliest:
                self._cond.notify()     # otherwise the thread wakes before this one is due
            return token

    def _loop(self):
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token, engine = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(min(left, 3600.0))
                    continue
                heapq.heappop(self._heap)
                if engine.slice_token == token:
                    engine.kick()


_KICKER = _Kicker()


class Engine:
    """A Unicorn instance bound to one VP of one partition."""

    def __init__(self, hv, part, vp):
        self.hv, self.part, self.vp = hv, part, vp
        # _life orders kick() (any thread) against close(): no kick may reach
        # a released Unicorn handle
        self._life = threading.Lock()
        self.closed = False
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # Unicorn's 64-bit mode starts with EFER.LMA set and paging off, which
        # no CPU can be in; a PG 1 -> 0 transition clears LMA as on hardware,
        # after which CR0/EFER writes keep LMA = CR0.PG && EFER.LME.
        self.uc.reg_write(X.UC_X86_REG_CR0, CR0_PG | CR0_PE | 0x10)
        self.uc.reg_write(X.UC_X86_REG_CR0, 0x10)
        self.uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, 0))
        if self.uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER) & EFER_LMA:
            raise RuntimeError("unicorn: EFER.LMA stuck after leaving paging")
        ucx.set_system_mode(self.uc, True)
        ucx.set_exit_insns(self.uc, EXIT_INSNS)
        self.exc_bitmap = None
        self.tsc_hz = getattr(hv, "tsc_hz", None) or DEFAULT_TSC_HZ
        ucx.set_tsc(self.uc, self.tsc_hz, -(self.tsc_hz * getattr(part, "tsc_base_ns", 0) // 10 ** 9))
        self.map_gen = -1
        self.regions = []
        self.loaded = None          # the CpuState Unicorn holds, as last loaded or stored
        self.code_check = None      # (page gpa, bytes) at the last exit: root rewrites of code
        self.slice_token = 0
        self.count = 0
        self.runs = 0
        self.exits = {}
        self._event = None          # (kind, vector, error_code) to inject at the next entry
        # flush requests from other threads (FLUSH_TLB, FLUSH_CODE bits), done
        # before the next guest instruction; _flush_done counts completions
        self._flush_cond = threading.Condition()
        self._flush_req = 0
        self._flush_seq = self._flush_done = 0
        self.in_cpu = False         # inside uc.emu_start (guarded by _flush_cond)
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED | UC_HOOK_MEM_PROT, self._on_mem)
        self.fr = ucx.FastRegs(self.uc)
        self.rf = ucx.RegFile(GPR_UC + [X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS] + CR_UC + DR_UC,
                              XMM_UC, [MSR_EFER] + list(NATIVE_MSRS.values()),
                              [X.UC_X86_REG_GDTR, X.UC_X86_REG_IDTR, X.UC_X86_REG_LDTR, X.UC_X86_REG_TR])

    def close(self):
        with self._life:
            self.closed = True
            self.slice_token = 0
            ucx.release(self.uc)

    def kick(self):
        """Thread-safe: make a running engine stop at the next block boundary
        and re-check should_stop(), irq_pending() and its deadline. A kick
        while nothing runs ends the next run's first block at once. A kick
        after close() does nothing (the Unicorn handle is gone)."""
        with self._life:
            if not self.closed:
                ucx.kick(self.uc)

    FLUSH_TLB, FLUSH_CODE = 1, 2

    def flush_tlb(self, wait=0.1):
        """Thread-safe: flush this VP's TLB before it runs another guest
        instruction (a guest TLB-flush hypercall for another VP). If the VP is
        inside the CPU now, wait (up to `wait` s) until it has flushed, as a
        flush hypercall returns only when the targets' TLBs are clean. (The
        wait is short: callers may hold the model lock, which the target
        needs if it is inside a doorbell decision.)"""
        self._request_flush(self.FLUSH_TLB, wait)

    def flush_code(self, wait=0.1):
        """Thread-safe: drop this VP's translated code (and TLB) before its
        next guest instruction: the hypervisor rewrote guest code (an overlay
        page) through root RAM."""
        self._request_flush(self.FLUSH_CODE, wait)

    def _request_flush(self, what, wait):
        with self._flush_cond:
            self._flush_req |= what
            self._flush_seq += 1
            seq = self._flush_seq
            if not self.in_cpu:
                return          # done at this VP's next entry, before any guest instruction
        self.kick()
        with self._flush_cond:
            # flushed, or out of the CPU (then it flushes before it re-enters)
            self._flush_cond.wait_for(lambda: self._flush_done >= seq or not self.in_cpu, wait)

    def _do_flushes(self):
        with self._flush_cond:
            req, seq = self._flush_req, self._flush_seq
            self._flush_req = 0
        if req & self.FLUSH_CODE:
            self._flush()
        elif req & self.FLUSH_TLB:
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        with self._flush_cond:
            self._flush_done = max(self._flush_done, seq)
            self._flush_cond.notify_all()

    def tsc(self):
        """The guest's TSC now (what RDTSC returns, before TSC_AUX/offsets the guest wrote)."""
        return time.monotonic_ns() * self.tsc_hz // 10 ** 9 - \
            self.tsc_hz * getattr(self.part, "tsc_base_ns", 0) // 10 ** 9

    def inject(self, kind, vector, error_code=None):
        """Queue an event for the next entry: kind is 'interrupt' (the caller
        checked RFLAGS.IF and the shadow), 'nmi' or 'exception'. The CPU
        delivers it through the IDT/IVT before the next instruction."""
        k = {"interrupt": ucx.INJECT_INTERRUPT, "nmi": ucx.INJECT_NMI,
             "exception": ucx.INJECT_EXCEPTION}[kind]
        if self._event is not None:
            raise RuntimeError("an event is already queued for injection")
        self._event = (k, vector, -1 if error_code is None else error_code)

    def event_queued(self):
        """An event taken from the APIC (or an exception) waits for the next
        entry: nothing else may be injected before it."""
        return self._event is not None

    # ------------------------------------------------------------ memory
    def sync_maps(self):
        """(Re)map the partition's GPA space when it changed since last run."""
        part = self.part
        if self.map_gen == part.map_gen:
            return False
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
        self._flush()
        self.code_check = None
        return True

    def _flush(self):
        """Drop all translations, and the TLB with them: a translation flush
        alone, with TLB entries kept, left the kernel's decompressor running
        on corrupt state (tests/hvsim/unicorn/README.md)."""
        self.uc.ctl_flush_tb()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

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
    def load(self, st):
        """Load a CpuState (hv.py) into Unicorn: only what differs from what
        Unicorn holds (the last load or store)."""
        uc = self.uc
        w = uc.reg_write
        old = self.loaded
        if old is None or (st.cr0, st.cr3, st.cr4, st.efer) != (old.cr0, old.cr3, old.cr4, old.efer):
            w(X.UC_X86_REG_CR0, 0x10)                   # paging off: leaves long mode
            w(X.UC_X86_REG_MSR, (MSR_EFER, st.efer & ~EFER_LMA))
            w(X.UC_X86_REG_CR4, st.cr4)
            w(X.UC_X86_REG_CR3, st.cr3)
            w(X.UC_X86_REG_CR0, st.cr0)                 # PG+LME+PAE -> the CPU sets LMA
            old = None                                  # segment state depends on the mode
        if old is None or st.cr2 != old.cr2:
            w(X.UC_X86_REG_CR2, st.cr2)
        if old is None or st.gpr != old.gpr or st.rflags != old.rflags or st.dr != old.dr:
            # GPRs, RIP and RFLAGS in one call (not the CRs: a CR write flushes the TLB)
            self.rf.write_regs(uc, st.gpr + [st.rip, st.rflags])
            if old is None or st.dr != old.dr:
                for r, v in zip(DR_UC, st.dr):
                    w(r, v)
        if old is None or st.xmm != old.xmm:
            self.rf.write_xmm(uc, st.xmm)
        if old is None or st.gdtr != old.gdtr:
            w(X.UC_X86_REG_GDTR, (0, st.gdtr[0], st.gdtr[1], 0))
        if old is None or st.idtr != old.idtr:
            w(X.UC_X86_REG_IDTR, (0, st.idtr[0], st.idtr[1], 0))
        if old is None or st.ldtr != old.ldtr:
            w(X.UC_X86_REG_LDTR, (st.ldtr[2], st.ldtr[0], st.ldtr[1], attr_to_flags(st.ldtr[3])))
        if old is None or st.tr != old.tr:
            w(X.UC_X86_REG_TR, (st.tr[2], st.tr[0], st.tr[1], attr_to_flags(st.tr[3])))
        if old is None or st.msrs != old.msrs:
            for name, idx in NATIVE_MSRS.items():
                w(X.UC_X86_REG_MSR, (idx, st.msrs.get(name, 0)))
        if old is None or st.segs != old.segs:
            # CS after the control registers (CS.L needs EFER.LMA), SS last (CPL = SS.DPL)
            for i in (0, 3, 4, 5, 1, 2):
                base, limit, sel, attr = st.segs[i]
                ucx.set_segment(uc, i, sel, base, limit, attr_to_flags(attr) if attr else 0)
        w(X.UC_X86_REG_RIP, st.rip)
        shadow = st.shadow_at is not None and st.shadow_at == (st.segs[1][0] + st.rip) & U64
        ucx.set_intr_state(uc, (ucx.INTR_SHADOW if shadow else 0)
                           | (ucx.INTR_NMI_MASKED if self.vp.apic.nmi_blocked else 0))
        self.loaded = st.copy()

    def store(self, st):
        """Read Unicorn's state back into a CpuState."""
        uc = self.uc
        regs, xmm, msrs, tables = self.rf.read(uc)
        st.gpr = regs[:16]
        st.rip, st.rflags = regs[16], regs[17]
        st.cr0, st.cr2, st.cr3, st.cr4 = regs[18:22]
        st.dr = regs[22:28]
        st.xmm = xmm
        st.cr8 = self.vp.apic.tpr >> 4      # CR8 is the APIC's TPR[7:4] (MOV CR8 exits)
        st.efer = msrs[0]
        for name, v in zip(NATIVE_MSRS, msrs[1:]):
            st.msrs[name] = v
        (_s, gb, gl, _f), (_s2, ib, il, _f2) = tables[0], tables[1]
        st.gdtr, st.idtr = (gb, gl), (ib, il)
        for name, (sel, base, limit, flags) in zip(("ldtr", "tr"), tables[2:]):
            setattr(st, name, (base, limit, sel, flags_to_attr(flags)))
        segs = []
        for k in range(6):
            sel, base, limit, flags = ucx.get_segment(uc, k)
            segs.append((base, limit, sel & 0xFFFF, flags_to_attr(flags)))
        st.segs = segs
        istate = ucx.get_intr_state(uc)
        st.shadow_at = (segs[1][0] + st.rip) & U64 if istate & ucx.INTR_SHADOW else None
        self.vp.apic.nmi_blocked = bool(istate & ucx.INTR_NMI_MASKED)
        self.loaded = st.copy()

    def _refresh_pg(self, st):
        self._pg = (st.cr0, st.cr3, st.cr4, st.efer)
        self._tcache = {}

    def _cs64(self, st):
        return bool(st.efer & EFER_LMA and st.segs[1][3] & (1 << 13))

    def _ipmask(self, st):
        if self._cs64(st):
            return U64
        return 0xFFFFFFFF if st.segs[1][3] & (1 << 14) else 0xFFFF

    # ------------------------------------------------------------ running
    def run(self, st, max_insns, deadline, should_stop, decide, irq_pending=None):
        """Run from CpuState `st` until an exit; `st` is updated in place.

        should_stop() -> bool is checked before each entry and after every
        exit and kick. irq_pending() -> 0 (nothing), 1 (a maskable interrupt
        can be taken) or 2 (an NMI or INIT): the run stops with
        Exit("interrupt") at the first boundary where RFLAGS.IF = 1 and no
        STI/MOV SS shadow applies, or at once for 2. Whoever makes either
        true while the VP runs calls kick(). The run ends with
        Exit("preempt") at `deadline` (time.monotonic()). max_insns is not
        counted (nothing is hooked per instruction).
        decide(kind, **info) lets the hypervisor answer CPUID, MSR, VMCALL
        and doorbell accesses itself (see hv.py).
        """
        irq_pending = irq_pending or (lambda: 0)
        self._decide_fn = decide
        S = self.hv.S
        bitmap = 0
        for key in self.part.intercepts:
            if key[0] == S.HV_INTERCEPT_TYPE_EXCEPTION and 0 <= key[1] < 32:
                bitmap |= 1 << key[1]
        if bitmap != self.exc_bitmap:
            ucx.set_exception_exits(self.uc, bitmap)
            self.exc_bitmap = bitmap
        self.count = 0
        self.runs += 1
        if self.sync_maps() or self.loaded is None:
            pass
        elif self.code_check is not None:
            lin, page, data = self.code_check
            if self.gpa_read(page, 4096) != data:
                # the page the VP stopped in changed (the guest's own stores
                # there were already handled): drop its translations
                self.uc.ctl_remove_cache(lin, lin + 4096)
        self.load(st)
        self._refresh_pg(st)
        self.slice_token = _KICKER.arm(deadline, self)
        try:
            ex = self._loop(st, deadline, should_stop, decide, irq_pending)
        finally:
            self.slice_token = 0
        self.store(st)
        self._remember_code(st)
        return ex

    def _remember_code(self, st):
        lin = (st.segs[1][0] + st.rip) & U64
        self._refresh_pg(st)
        g = self.translate(lin & ~0xFFF)
        if g is not None:
            data = self.gpa_read(g & ~0xFFF, 4096)
            self.code_check = (lin & ~0xFFF, g & ~0xFFF, data) if data else None
        else:
            self.code_check = None

    def _loop(self, st, deadline, should_stop, decide, irq_pending):
        uc = self.uc
        while True:
            if should_stop():
                return Exit("stopped")
            if time.monotonic() >= deadline:
                return Exit("preempt")
            apic = self.vp.apic
            apic.nmi_blocked = bool(ucx.get_intr_state(uc) & ucx.INTR_NMI_MASKED)
            k = irq_pending()
            if k == 2:
                return Exit("interrupt")
            # an NMI waits for the IRET that unblocks NMIs; an interrupt for IF=1
            ucx.irq_window(uc, (ucx.WINDOW_IRQ if k else 0)
                           | (ucx.WINDOW_NMI if apic.nmi_pending and apic.nmi_blocked else 0))
            with self._flush_cond:
                self.in_cpu = True      # from here a flush request kicks and waits
                pending = self._flush_req
            if pending:
                self._do_flushes()
            if self._event is not None:
                # handed to the CPU only now: the CPU delivers it before
                # anything (a kick, a step) can end the run, so an event
                # is never left inside Unicorn behind a returned run
                ucx.inject(uc, *self._event)
                self._event = None
            self.mem_exit = None
            self.consumed = None
            try:
                uc.emu_start(self.fr.get(X.UC_X86_REG_RIP), U64)
                err = None
            except UcError as e:
                err = e
            finally:
                with self._flush_cond:
                    self.in_cpu = False
                    self._flush_cond.notify_all()
            reason, vector, error_code = ucx.exit_reason(uc)
            name = ucx.EXIT_NAMES.get(reason, reason)
            self.exits[name] = self.exits.get(name, 0) + 1
            if self.consumed is not None:
                # a write the hypervisor took (doorbell): complete the instruction
                if self.consumed[0] == "mov":
                    self._advance(self.consumed[1])
                else:
                    ex = self._step_into_scratch(self.consumed[1])
                    if ex is not None:
                        return ex
                continue
            if self.mem_exit is not None:
                return self.mem_exit
            if err is not None:
                return Exit("unrecoverable", error=str(err))
            if reason in (ucx.EXIT_KICK, ucx.EXIT_NONE, ucx.EXIT_STEP):
                continue
            if reason == ucx.EXIT_IRQ_WINDOW:
                return Exit("interrupt")
            if reason == ucx.EXIT_EXCEPTION:
                return Exit("exception", vector=vector, error_code=None if error_code < 0 else error_code)
            if reason == ucx.EXIT_TRIPLE_FAULT:
                return Exit("unrecoverable", error="triple fault")
            ex = self._insn_exit(reason, decide)
            if ex is not None:
                return ex

    def _step_into_scratch(self, page):
        """Run the one instruction that wrote to doorbell page `page` with a
        scratch page mapped there, so that it completes and its writes go
        nowhere (the page is unmapped again before anything else runs)."""
        uc = self.uc
        ucx.irq_window(uc, 0)
        with self._flush_cond:
            self.in_cpu = True
            pending = self._flush_req
        if pending:
            self._do_flushes()
        uc.mem_map(page, 4096)
        try:
            ucx.step(uc)
            try:
                uc.emu_start(self.fr.get(X.UC_X86_REG_RIP), U64)
            except UcError as e:
                return Exit("unrecoverable", error="doorbell write: %s" % e)
        finally:
            uc.mem_unmap(page, 4096)
            with self._flush_cond:
                self.in_cpu = False
                self._flush_cond.notify_all()
        reason = ucx.exit_reason(uc)[0]
        if reason == ucx.EXIT_STEP:
            return None
        if reason == ucx.EXIT_TRIPLE_FAULT:
            return Exit("unrecoverable", error="triple fault")
        if reason == ucx.EXIT_EXCEPTION:
            _r, vector, error_code = ucx.exit_reason(uc)
            return Exit("exception", vector=vector, error_code=None if error_code < 0 else error_code)
        return Exit("unrecoverable", error="doorbell write did not complete (%s)"
                    % ucx.EXIT_NAMES.get(reason, reason))

    # ------------------------------------------------------------ instruction exits
    def _cur(self):
        """(RIP, CS base, 64-bit code?, 32-bit default operand size?)"""
        sel, base, limit, flags = ucx.get_segment(self.uc, 1)
        rip = self.fr.get(X.UC_X86_REG_RIP)
        long64 = bool(flags & DESC_L and self.fr.msr(MSR_EFER) & EFER_LMA)
        d32 = bool(flags & DESC_B) or long64
        return rip, base, long64, d32

    def _fetch(self, lin):
        """The bytes of the instruction at linear `lin` (through the CPU's MMU)."""
        return ucx.fetch(self.uc, lin, 15)

    def _advance(self, n, cur=None):
        rip, base, long64, d32 = cur or self._cur()
        mask = U64 if long64 else (0xFFFFFFFF if d32 else 0xFFFF)
        self.fr.set(X.UC_X86_REG_RIP, (rip + n) & mask)
        istate = ucx.get_intr_state(self.uc)
        if istate & ucx.INTR_SHADOW:
            ucx.set_intr_state(self.uc, istate & ~ucx.INTR_SHADOW)

    def _insn_exit(self, reason, decide):
        """An instruction in the exit set stopped the run: answer it or return an Exit."""
        uc = self.uc
        fr = self.fr
        cur = rip, base, long64, d32 = self._cur()
        lin = (base + rip) & U64
        b = self._fetch(lin)
        i = 0
        rep = osz = False
        rex = 0
        while i < len(b) and (b[i] in PREFIXES or (long64 and 0x40 <= b[i] <= 0x4F)):
            if b[i] in (0xF2, 0xF3):
                rep = True
            if b[i] == 0x66:
                osz = True
            if 0x40 <= b[i] <= 0x4F:
                rex = b[i]
            else:
                rex = 0             # a REX prefix counts only right before the opcode
            i += 1
        if reason == ucx.EXIT_IO:
            op = b[i]
            string = op in (0x6C, 0x6D, 0x6E, 0x6F)
            byte = op in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E)
            write = op in (0xE6, 0xE7, 0xEE, 0xEF, 0x6E, 0x6F)
            imm = op in (0xE4, 0xE5, 0xE6, 0xE7)
            port = b[i + 1] if imm else fr.get(X.UC_X86_REG_RDX) & 0xFFFF
            width = 1 if byte else (2 if d32 == osz else 4)
            length = i + (2 if imm else 1)
            return Exit("io", rip_lin=lin, length=length, port=port, size=width, write=write,
                        string=string, rep=rep and string, insn=bytes(b[:length]))
        if reason == ucx.EXIT_HLT:
            return Exit("halt", rip_lin=lin, length=i + 1)
        length = i + 2
        if reason == ucx.EXIT_CPUID:
            eax = fr.get(X.UC_X86_REG_RAX) & 0xFFFFFFFF
            ecx = fr.get(X.UC_X86_REG_RCX) & 0xFFFFFFFF
            verdict, res = decide("cpuid", eax=eax, ecx=ecx)
            if verdict == "exit":
                return Exit("cpuid", rip_lin=lin, length=length, eax=eax, ecx=ecx, default=res)
            for reg, v in zip(GPR_UC[:4], (res[0], res[2], res[3], res[1])):   # RAX RCX RDX RBX
                fr.set(reg, v & 0xFFFFFFFF)
            self._advance(length, cur)
            return None
        if reason == ucx.EXIT_MSR:
            write = b[i + 1] == 0x30
            ecx = fr.get(X.UC_X86_REG_RCX) & 0xFFFFFFFF
            value = ((fr.get(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32) | \
                (uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFFFFFF)
            verdict, res = decide("msr", msr=ecx, write=write, value=value)
            if verdict == "exit":
                return Exit("msr", rip_lin=lin, length=length, msr=ecx, write=write, value=value)
            if verdict == "exception":
                self.inject("exception", res["vector"], res.get("error_code"))
                return None
            if verdict == "native":
                # the CPU's own MSR (EFER, STAR, FS/GS base, ...): Unicorn does it
                if write:
                    uc.reg_write(X.UC_X86_REG_MSR, (ecx, value))
                else:
                    res = uc.reg_read(X.UC_X86_REG_MSR, ecx)
            if not write:
                fr.set(X.UC_X86_REG_RAX, res & 0xFFFFFFFF)
                fr.set(X.UC_X86_REG_RDX, (res >> 32) & 0xFFFFFFFF)
            self._advance(length, cur)
            return None
        if reason == ucx.EXIT_VMCALL:
            length = i + 3
            sel, _b, _l, ssflags = ucx.get_segment(uc, 2)
            cpl = (ssflags >> DESC_DPL_SHIFT) & 3 if uc.reg_read(X.UC_X86_REG_CR0) & CR0_PE else 0
            verdict, res = decide("vmcall", gpr=list(uc.reg_read_batch(GPR_UC)),
                                  xmm=[uc.reg_read(x) for x in XMM_UC], cpl=cpl, long64=long64,
                                  cr0=uc.reg_read(X.UC_X86_REG_CR0))
            if verdict == "exit":
                return Exit("vmcall", rip_lin=lin, length=length)
            if verdict == "exception":
                self.inject("exception", res["vector"], res.get("error_code"))
                return None
            for k, v in (res or {}).get("gpr", {}).items():
                uc.reg_write(GPR_UC[k], v & U64)
            for k, v in (res or {}).get("xmm", {}).items():
                uc.reg_write(XMM_UC[k], v)
            self._advance(length, cur)
            return None
        if reason == ucx.EXIT_CR8:
            # MOV to/from CR8: CR8 is the APIC's TPR[7:4], emulated here
            modrm = b[i + 2]
            length = i + 3
            reg = GPR_UC[(modrm & 7) | (8 if rex & 1 else 0)]
            if b[i + 1] == 0x22:
                self.vp.apic.set_tpr((uc.reg_read(reg) & 0xF) << 4)
            else:
                uc.reg_write(reg, self.vp.apic.tpr >> 4)
            self._advance(length, cur)
            return None
        return Exit("unrecoverable", error="unexpected exit %r" % reason)

    # ------------------------------------------------------------ memory exits
    _MEM_KIND = {UC_MEM_READ_UNMAPPED: ("unmapped", 0), UC_MEM_WRITE_UNMAPPED: ("unmapped", 1),
                 UC_MEM_FETCH_UNMAPPED: ("unmapped", 2), UC_MEM_READ_PROT: ("prot", 0),
                 UC_MEM_WRITE_PROT: ("prot", 1), UC_MEM_FETCH_PROT: ("prot", 2)}

    def _on_mem(self, uc, access, address, size, value, _ud):
        """An access to an unmapped or protected GPA (the address Unicorn passes
        is the GPA). RIP is that of the accessing instruction; nothing of it
        is done. Always stops the run."""
        kind, acc = self._MEM_KIND.get(access, ("unmapped", 0))
        if self.mem_exit is not None or self.consumed is not None:
            return False
        rip, base, long64, d32 = self._cur()
        lin = (base + rip) & U64
        mov = None
        length = 0
        if acc in (0, 1):
            b = self._fetch(lin)
            mov, length = decode_mov(b, long64, d32)
            if mov is not None and (mov["store"] != (acc == 1) or mov["size"] != size):
                mov = None
        if kind == "unmapped" and acc == 1:
            v = value & ((1 << (8 * size)) - 1) if size <= 8 else value
            if self.decide_doorbell(address, size, v):
                self.consumed = ("mov", length) if mov is not None else ("step", address & ~0xFFF)
                return False
        self.mem_exit = Exit("memory", rip_lin=lin if acc != 2 else None, gpa=address, access=acc,
                             unmapped=(kind == "unmapped"), size=size, write=(acc == 1),
                             value=value & U64, length=length, mov=mov)
        return False

    def decide_doorbell(self, gpa, size, value):
        return self._decide_fn("doorbell", gpa=gpa, size=size, value=value)[0] == "consume"


def _modrm_length(b, i, long64, asz16):
    """Bytes of ModRM + SIB + displacement starting at b[i]; None if short."""
    if i >= len(b):
        return None
    modrm = b[i]
    mod, rm = modrm >> 6, modrm & 7
    n = 1
    if mod == 3:
        return n
    if asz16:
        if mod == 0 and rm == 6:
            return n + 2
        return n + (1 if mod == 1 else 2 if mod == 2 else 0)
    if rm == 4:
        if i + 1 >= len(b):
            return None
        sib = b[i + 1]
        n += 1
        if mod == 0 and sib & 7 == 5:
            n += 4
    elif mod == 0 and rm == 5:
        n += 4              # disp32 (RIP-relative in 64-bit mode)
    return n + (1 if mod == 1 else 4 if mod == 2 else 0)


def decode_mov(b, long64, d32):
    """The instruction in `b`, if it is a plain MOV between a register or an
    immediate and memory (88/89/8A/8B/C6/C7/A0-A3): ({store, size, reg,
    high8}, length); (None, 0) otherwise. The hypervisor completes such
    accesses itself (the xAPIC page in hv.py, doorbells)."""
    i = 0
    osz = asz = False
    while i < len(b) and b[i] in PREFIXES:
        if b[i] == 0x66:
            osz = True
        elif b[i] == 0x67:
            asz = True
        elif b[i] in (0xF0, 0xF2, 0xF3):
            return None, 0
        i += 1
    rex = 0
    if long64 and i < len(b) and 0x40 <= b[i] <= 0x4F:
        rex = b[i]
        i += 1
    if i >= len(b):
        return None, 0
    op = b[i]
    if op not in (0x88, 0x89, 0x8A, 0x8B, 0xC6, 0xC7, 0xA0, 0xA1, 0xA2, 0xA3):
        return None, 0
    byte = op in (0x88, 0x8A, 0xC6, 0xA0, 0xA2)
    if byte:
        size = 1
    elif rex & 8:
        size = 8
    else:
        size = (2 if osz else 4) if (d32 or long64) else (4 if osz else 2)
    if long64:
        asz16 = False
        moffs = 4 if asz else 8
    else:
        asz16 = d32 == asz
        moffs = 2 if asz16 else 4
    if op in (0xA0, 0xA1, 0xA2, 0xA3):
        n = i + 1 + moffs
        if n > len(b):
            return None, 0
        return {"store": op in (0xA2, 0xA3), "size": size, "reg": 0, "high8": False}, n
    m = _modrm_length(b, i + 1, long64, asz16)
    if m is None:
        return None, 0
    modrm = b[i + 1]
    if modrm >> 6 == 3:
        return None, 0
    n = i + 1 + m
    if op in (0xC6, 0xC7):
        if (modrm >> 3) & 7:
            return None, 0
        n += 1 if byte else min(size, 4)
        if n > len(b):
            return None, 0
        return {"store": True, "size": size, "reg": None, "high8": False}, n
    if n > len(b):
        return None, 0
    reg = ((modrm >> 3) & 7) | (8 if rex & 4 else 0)
    high8 = byte and not rex and reg >= 4
    return {"store": op in (0x88, 0x89), "size": size, "reg": reg, "high8": high8}, n
