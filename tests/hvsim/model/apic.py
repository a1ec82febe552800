"""The local APIC of a child VP.

What is modelled (see docs/hvsim-model.md, "Interrupts"):

- IRR, ISR and TMR (256 bits each, as Python ints), TPR (also CR8), PPR, and a
  register file for the rest of the APIC page (LVTs, SVR, ICR);
- the APIC timer: one-shot, periodic and TSC-deadline modes, initial and
  current count, divide configuration. It counts at `timer_host.apic_hz`
  (the APIC_FREQUENCY MSR) divided by the divide configuration; the
  platform (platform.py) supplies the clock and arms the deadline on its
  timer thread, whose expiry comes back here (timer_expired) and is accepted
  like any other FIXED interrupt. Without a timer host (no platform) the
  registers are stored and the timer does not count;
- acceptance of FIXED/LOWESTPRIORITY vectors (IRR, TMR = level), delivery of
  the highest IRR vector whose priority class is above PPR (IRR -> ISR), EOI
  clearing the highest ISR bit (a level-triggered vector's EOI is reported
  to hv.py, which posts HVMSG_X64_APIC_EOI);
- NMI (one latched, delivered through vector 2 whatever RFLAGS.IF, blocked
  until the next IRET), ExtINT (one pending vector, not subject to PPR, no
  IRR/ISR), INIT (wait-for-SIPI) and SIPI;
- choosing the event to deliver at an instruction boundary outside an STI /
  MOV SS interrupt shadow. The CPU delivers it (hv.py injects it through
  Engine.inject; the patched Unicorn delivers through the guest's IVT/IDT).

Every number here is x86 architecture (Intel SDM vol. 3, chapter 11), not
hypervisor ABI, so none of it is in the TLFS bindings.
"""

import struct

# x86 architectural bits (not hypervisor ABI)
RF_IF = 1 << 9
U64 = (1 << 64) - 1
MIN_VECTOR = 16             # vectors 0-15 are reserved (exceptions): not valid for FIXED
NMI_VECTOR = 2

# APIC page register offsets (xAPIC MMIO; the x2APIC MSR is 0x800 + offset / 16)
APIC_ID, APIC_VERSION, APIC_TPR, APIC_APR, APIC_PPR, APIC_EOI = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0
APIC_RRD, APIC_LDR, APIC_DFR, APIC_SVR = 0xC0, 0xD0, 0xE0, 0xF0
APIC_ISR, APIC_TMR, APIC_IRR = 0x100, 0x180, 0x200          # 8 registers each, 16 bytes apart
APIC_ESR, APIC_LVT_CMCI, APIC_ICR_LOW, APIC_ICR_HIGH = 0x280, 0x2F0, 0x300, 0x310
APIC_LVT_TIMER, APIC_LVT_THERMAL, APIC_LVT_PERF = 0x320, 0x330, 0x340
APIC_LVT_LINT0, APIC_LVT_LINT1, APIC_LVT_ERROR = 0x350, 0x360, 0x370
APIC_TIMER_ICR, APIC_TIMER_CCR, APIC_TIMER_DCR, APIC_SELF_IPI = 0x380, 0x390, 0x3E0, 0x3F0
APIC_PAGE_END = 0x400
X2APIC_MSR_BASE, X2APIC_MSR_LAST = 0x800, 0x83F
APIC_VERSION_VALUE = 0x00050014      # integrated APIC, version 0x14, 6 LVT entries
LVT_MASKED = 1 << 16
LVT_LEVEL = 1 << 15
APIC_BASE_EXTD, APIC_BASE_ENABLE = 1 << 10, 1 << 11
# LVT timer mode (bits 18:17)
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2
# ICR / LVT delivery modes (bits 10:8)
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
LVTS = (APIC_LVT_CMCI, APIC_LVT_TIMER, APIC_LVT_THERMAL, APIC_LVT_PERF, APIC_LVT_LINT0,
        APIC_LVT_LINT1, APIC_LVT_ERROR)
_READ_ONLY = {APIC_ID, APIC_VERSION, APIC_APR, APIC_PPR, APIC_RRD, APIC_TIMER_CCR}


def _bits(mask):
    """Set bit numbers of an int, highest first."""
    out = []
    while mask:
        b = mask.bit_length() - 1
        out.append(b)
        mask &= ~(1 << b)
    return out


class LocalApic:
    """Per-VP interrupt controller state. Thread note: the engine reads it from
    the VP thread without the model lock; every field is replaced atomically
    (ints, bools), so a reader sees either the old or the new value."""

    def __init__(self, apic_id):
        self.apic_id = apic_id
        self.delivered = []       # history (vector per delivery), for tests and reports
        self.halted = False       # HLT with IF=1 executed, waiting for an interrupt
        self.timer_host = None    # platform.py: apic_hz, now_ns(), tsc_to_ns(), arm(deadline_ns|None)
        self.timer_fired = 0      # timer expirations (for tests and reports)
        self.auto_eoi = 0         # vectors taken without entering ISR (SynIC SINTs with AutoEOI)
        self.reset()

    def reset(self):
        """Power-up / INIT state of the APIC registers (the ID is kept)."""
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.tpr = 0
        self.regs = {APIC_LDR: 0, APIC_DFR: 0xFFFFFFFF, APIC_SVR: 0xFF, APIC_ESR: 0,
                     APIC_ICR_LOW: 0, APIC_ICR_HIGH: 0, APIC_TIMER_ICR: 0, APIC_TIMER_DCR: 0}
        for r in LVTS:
            self.regs[r] = LVT_MASKED
        self.nmi_pending = False
        self.nmi_blocked = False
        self.extint = None        # pending ExtINT vector
        self.wait_sipi = False    # after INIT: waits for a SIPI, does not run
        self.init_pending = False # INIT accepted while the VP ran: applied at the next boundary
        self.sipi_pending = None  # SIPI vector accepted, applied with the INIT state
        self.halted = False
        self._timer_stop()
        self.tsc_deadline = 0     # IA32_TSC_DEADLINE (0: disarmed)

    # ------------------------------------------------------------ priorities
    @staticmethod
    def highest(mask):
        return mask.bit_length() - 1 if mask else None

    def ppr(self):
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        if (self.tpr & 0xF0) >= (isrv & 0xF0):
            return self.tpr & 0xFF
        return isrv & 0xF0

    def deliverable_vector(self):
        """Highest IRR vector whose priority class is above PPR, or None."""
        if not self.irr:
            return None
        v = self.irr.bit_length() - 1
        return v if (v & 0xF0) > (self.ppr() & 0xF0) else None

    def pending_kind(self):
        """For the engine, at an instruction boundary: 2 = an NMI can be taken
        (whatever RFLAGS.IF), 1 = a maskable interrupt can be taken when
        RFLAGS.IF = 1, 0 = nothing."""
        if self.init_pending or (self.nmi_pending and not self.nmi_blocked):
            return 2
        if self.extint is not None or (self.irr and self.deliverable_vector() is not None):
            return 1
        return 0

    def wakeable(self):
        """Something ends the wait of a halted (IF = 1) or INIT-ed VP."""
        if self.init_pending:
            return True
        if self.wait_sipi:
            return self.sipi_pending is not None
        return self.pending_kind() != 0

    def blocked(self):
        """The VP cannot run now: waiting for a SIPI, or halted with nothing to take."""
        return (self.wait_sipi or self.halted) and not self.wakeable()

    # ------------------------------------------------------------ acceptance
    def accept(self, vector, level):
        """A FIXED/LOWESTPRIORITY message reaches this APIC: IRR and TMR."""
        bit = 1 << vector
        self.irr |= bit
        self.tmr = (self.tmr | bit) if level else (self.tmr & ~bit)

    def take(self, vector):
        """The CPU acknowledges `vector`: IRR -> ISR (not for an AutoEOI vector)."""
        bit = 1 << vector
        self.irr &= ~bit
        if not self.auto_eoi & bit:
            self.isr |= bit

    def eoi(self):
        """EOI: clear the highest ISR bit. Returns (vector, level) or None."""
        if not self.isr:
            return None
        v = self.isr.bit_length() - 1
        self.isr &= ~(1 << v)
        return v, bool(self.tmr >> v & 1)

    def set_tpr(self, value):
        self.tpr = value & 0xFF

    # ------------------------------------------------------------ registers
    def read(self, off, x2apic=False):
        """32-bit value of the register at APIC page offset `off` (16-aligned)."""
        if off == APIC_ID:
            return self.apic_id if x2apic else (self.apic_id & 0xFF) << 24
        if off == APIC_VERSION:
            return APIC_VERSION_VALUE
        if off == APIC_TPR:
            return self.tpr
        if off == APIC_PPR:
            return self.ppr()
        if off == APIC_TIMER_CCR:
            return self.timer_current_count()
        if off == APIC_LDR and x2apic:
            # x2APIC logical ID, derived from the x2APIC ID (cluster, bit)
            return ((self.apic_id >> 4) << 16) | (1 << (self.apic_id & 0xF))
        for base, mask in ((APIC_ISR, self.isr), (APIC_TMR, self.tmr), (APIC_IRR, self.irr)):
            if base <= off < base + 0x80:
                return (mask >> (32 * ((off - base) >> 4))) & 0xFFFFFFFF
        return self.regs.get(off, 0)

    def write(self, off, value):
        """Store a 32-bit write to a writable register. Returns what the write
        means for hv.py: "eoi", "icr" (an IPI to send), "self_ipi" or None."""
        value &= 0xFFFFFFFF
        if off == APIC_EOI:
            return "eoi"
        if off == APIC_TPR:
            self.set_tpr(value)
            return None
        if off == APIC_SELF_IPI:
            return "self_ipi"
        if off in _READ_ONLY or APIC_ISR <= off < APIC_IRR + 0x80:
            return None                         # read-only: the write is dropped
        if off == APIC_LVT_TIMER:
            old = self.timer_mode()
            self.regs[off] = value
            if self.timer_mode() != old:        # a mode change disarms the timer
                self._timer_stop()
                self.tsc_deadline = 0
            return None
        if off == APIC_TIMER_ICR:
            self.regs[off] = value
            self._timer_start_count()
            return None
        if off in LVTS or off in self.regs:
            self.regs[off] = value
            return "icr" if off == APIC_ICR_LOW else None
        return None

    # ------------------------------------------------------------ the timer
    def timer_mode(self):
        return (self.regs.get(APIC_LVT_TIMER, LVT_MASKED) >> 17) & 3

    def timer_divisor(self):
        """Divide configuration (bits 0, 1, 3): 2, 4, ..., 128, or 1 for 0b111."""
        dcr = self.regs.get(APIC_TIMER_DCR, 0)
        v = ((dcr >> 1) & 4) | (dcr & 3)
        return 1 if v == 7 else 2 << v

    def _ticks_ns(self, ticks):
        h = self.timer_host
        return ticks * self.timer_divisor() * 1_000_000_000 // h.apic_hz

    def _timer_stop(self):
        self._t_start = None      # monotonic ns the current count started at
        self._t_period = 0        # ns per full count
        self._t_icr = 0
        if getattr(self, "timer_host", None) is not None:
            self.timer_host.arm(None)

    def _timer_start_count(self):
        """A write to the initial-count register (one-shot/periodic modes)."""
        h = self.timer_host
        if self.timer_mode() == TIMER_TSC_DEADLINE or h is None:
            return                              # ignored in TSC-deadline mode
        icr = self.regs.get(APIC_TIMER_ICR, 0)
        self._timer_stop()
        if icr == 0:
            return                              # a zero count stops the timer
        self._t_icr = icr
        self._t_start = h.now_ns()
        self._t_period = max(1, self._ticks_ns(icr))
        h.arm(self._t_start + self._t_period)

    def timer_current_count(self):
        h = self.timer_host
        if h is None or self._t_start is None or self.timer_mode() == TIMER_TSC_DEADLINE:
            return 0
        elapsed = (h.now_ns() - self._t_start) * h.apic_hz // (self.timer_divisor() * 1_000_000_000)
        if self.timer_mode() == TIMER_PERIODIC:
            return self._t_icr - (elapsed % self._t_icr)
        return max(0, self._t_icr - elapsed)

    def timer_write_tsc_deadline(self, value):
        """WRMSR IA32_TSC_DEADLINE: ignored outside TSC-deadline mode; 0 disarms."""
        h = self.timer_host
        if self.timer_mode() != TIMER_TSC_DEADLINE or h is None:
            return
        self.tsc_deadline = value
        h.arm(None if value == 0 else h.tsc_to_ns(value))

    def timer_expired(self, now_ns):
        """The armed deadline passed (platform timer thread, model lock held).
        Re-arms a periodic count. Returns the vector to accept, or None when
        the LVT entry is masked."""
        h = self.timer_host
        mode = self.timer_mode()
        if mode == TIMER_TSC_DEADLINE:
            if not self.tsc_deadline:
                return None
            self.tsc_deadline = 0
        elif self._t_start is None:
            return None
        elif mode == TIMER_PERIODIC:
            n = max(1, (now_ns - self._t_start) // self._t_period)
            self._t_start += n * self._t_period     # missed periods are dropped
            h.arm(self._t_start + self._t_period)
        else:
            self._t_start = None
        self.timer_fired += 1
        lvt = self.regs.get(APIC_LVT_TIMER, LVT_MASKED)
        if lvt & LVT_MASKED or (lvt & 0xFF) < MIN_VECTOR:
            return None
        return lvt & 0xFF

    # ------------------------------------------------------------ LAPIC VP state blob
    STATE_REGS = (APIC_TPR, APIC_LDR, APIC_DFR, APIC_SVR, APIC_ESR, APIC_ICR_LOW, APIC_ICR_HIGH,
                  APIC_TIMER_ICR, APIC_TIMER_DCR) + LVTS

    def render(self, blob):
        """Overlay the live registers on a LAPIC state blob (APIC page layout)."""
        b = bytearray(blob)
        for off in (APIC_ID, APIC_VERSION, APIC_PPR) + self.STATE_REGS:
            struct.pack_into("<I", b, off, self.read(off))
        for base in (APIC_ISR, APIC_TMR, APIC_IRR):
            for k in range(8):
                struct.pack_into("<I", b, base + 16 * k, self.read(base + 16 * k))
        return bytes(b)

    def load(self, blob):
        """Load the registers from a LAPIC state blob (SetVpState)."""
        def rd(off):
            return struct.unpack_from("<I", blob, off)[0]
        self.tpr = rd(APIC_TPR) & 0xFF
        for off in self.STATE_REGS:
            if off != APIC_TPR:
                self.regs[off] = rd(off)
        for base, name in ((APIC_ISR, "isr"), (APIC_TMR, "tmr"), (APIC_IRR, "irr")):
            v = 0
            for k in range(8):
                v |= rd(base + 16 * k) << (32 * k)
            setattr(self, name, v & ~0xFFFF)     # vectors 0-15 cannot be pending

    # ------------------------------------------------------------ for tests / reports
    def vectors(self, which="irr"):
        return set(_bits(getattr(self, which)))

