"""A minimal local APIC: pending vectors per VP and their delivery through the
guest's IVT (real mode) or IDT (protected and long mode).

What is modelled (see docs/hvsim-model.md, "Interrupts"):

- an IRR-like set of pending FIXED vectors per VP (`LocalApic.irr`);
- delivery of the highest pending vector at an instruction boundary when
  RFLAGS.IF = 1 and the VP is not in an STI / MOV SS interrupt shadow;
- edge semantics: a vector leaves the IRR when it is delivered ("delivered =
  done"); there is no ISR, no TPR/PPR and no EOI is needed (an x2APIC EOI
  write, MSR 0x80B, is accepted and ignored).

Delivery is done here on a CpuState (hv.py), outside Unicorn, and the engine is
re-entered afterwards, so the segment caches are loaded the same way as for any
other state the VMM sets.

Only same-privilege delivery is supported (a CPL 0 guest, or a gate whose code
segment has the current privilege): a privilege change (TSS stack switch), a
task gate, an IST stack, an LDT code selector, virtual-8086 mode, a not-present
gate or a vector beyond the IDT limit end the VP with an unrecoverable exception
(the model's "triple fault").
"""

import struct

# x86 architectural bits (not hypervisor ABI)
CR0_PE = 1 << 0
EFER_LMA = 1 << 10
RF_TF, RF_IF, RF_NT, RF_RF, RF_VM, RF_AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17, 1 << 18
U64 = (1 << 64) - 1
MIN_VECTOR = 16             # vectors 0-15 are reserved (exceptions): not valid for FIXED


class DeliveryError(Exception):
    """The interrupt cannot be delivered (the VP ends with an unrecoverable exception)."""


class LocalApic:
    """Per-VP interrupt state."""

    def __init__(self, apic_id):
        self.apic_id = apic_id
        self.irr = set()          # pending vectors
        self.halted = False       # HLT with IF=1 executed, waiting for an interrupt
        self.delivered = []       # history (vector per delivery), for tests and reports

    def highest(self):
        return max(self.irr) if self.irr else None


class _GuestMem:
    """Linear-address access to a child's memory with its current paging state."""

    def __init__(self, hv, part, engine, st):
        self.hv, self.part, self.eng, self.st = hv, part, engine, st
        engine._tcache = {}

    def _gpa(self, lin):
        st = self.st
        g = self.eng.translate(lin, st.cr0, st.cr3, st.cr4, st.efer)
        if g is None:
            raise DeliveryError("linear 0x%x not present" % lin)
        return g

    def _chunks(self, lin, n):
        while n > 0:
            k = min(n, 4096 - (lin & 0xFFF))
            gpa = self._gpa(lin)
            ent = self.part.gpa.get(gpa >> 12)
            if ent is None or not self.hv.mem.contains(ent[0] << 12, 4096):
                raise DeliveryError("GPA 0x%x not RAM" % gpa)
            yield (ent[0] << 12) + (gpa & 0xFFF), k
            lin += k
            n -= k

    def read(self, lin, n):
        return b"".join(self.hv.mem.read(a, k) for a, k in self._chunks(lin, n))

    def write(self, lin, data):
        off = 0
        for a, k in self._chunks(lin, len(data)):
            self.hv.mem.write(a, data[off:off + k])
            off += k


def _descriptor(gm, st, sel):
    """(base, limit, attr) of a GDT code descriptor."""
    if sel & 4:
        raise DeliveryError("LDT selector 0x%x" % sel)
    if (sel & ~7) + 7 > st.gdtr[1]:
        raise DeliveryError("selector 0x%x beyond the GDT limit" % sel)
    d = struct.unpack("<Q", gm.read(st.gdtr[0] + (sel & ~7), 8))[0]
    base = ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24)
    limit = (d & 0xFFFF) | (((d >> 48) & 0xF) << 16)
    attr = (d >> 40) & 0xF0FF
    if attr & (1 << 15):                      # G
        limit = (limit << 12) | 0xFFF
    if not attr & 0x80 or not attr & 0x10 or not attr & 0x08:
        raise DeliveryError("selector 0x%x is not a present code segment" % sel)
    return base, limit, attr | 1              # the CPU sets the accessed bit


def deliver(hv, part, engine, st, vector):
    """Deliver external interrupt `vector` on CpuState `st` (updated in place).
    Raises DeliveryError when the model cannot deliver it."""
    gm = _GuestMem(hv, part, engine, st)
    if st.rflags & RF_VM:
        raise DeliveryError("virtual-8086 mode")
    if not st.cr0 & CR0_PE:
        _real_mode(gm, st, vector)
    elif st.efer & EFER_LMA:
        _long_mode(gm, st, vector)
    else:
        _protected_mode(gm, st, vector)
    st.shadow_at = None


def _real_mode(gm, st, vector):
    ivt, limit = st.idtr
    if vector * 4 + 3 > limit:
        raise DeliveryError("vector 0x%x beyond the IVT limit" % vector)
    ip, cs = struct.unpack("<HH", gm.read(ivt + vector * 4, 4))
    ss_base = st.segs[2][0]
    sp = st.gpr[4] & 0xFFFF
    for v in (st.rflags & 0xFFFF, st.segs[1][2], st.rip & 0xFFFF):
        sp = (sp - 2) & 0xFFFF
        gm.write(ss_base + sp, struct.pack("<H", v))
    st.gpr[4] = (st.gpr[4] & ~0xFFFF) | sp
    st.rflags &= ~(RF_IF | RF_TF | RF_AC)
    _base, lim, _sel, attr = st.segs[1]
    st.segs[1] = (cs << 4, lim, cs, attr)
    st.rip = ip


def _cpl(st):
    return (st.segs[2][3] >> 5) & 3


def _gate_target(gm, st, sel, gate_type):
    base, limit, attr = _descriptor(gm, st, sel)
    dpl = (attr >> 5) & 3
    conforming = attr & 0x04
    if not conforming and dpl != _cpl(st):
        raise DeliveryError("privilege change CPL %d -> %d not modelled" % (_cpl(st), dpl))
    return (base, limit, (sel & ~3) | _cpl(st), attr)


def _protected_mode(gm, st, vector):
    idt, limit = st.idtr
    if vector * 8 + 7 > limit:
        raise DeliveryError("vector 0x%x beyond the IDT limit" % vector)
    g = struct.unpack("<Q", gm.read(idt + vector * 8, 8))[0]
    gtype, present = (g >> 40) & 0xF, (g >> 47) & 1
    if not present:
        raise DeliveryError("vector 0x%x: gate not present" % vector)
    if gtype not in (0x6, 0x7, 0xE, 0xF):
        raise DeliveryError("vector 0x%x: gate type 0x%x not modelled" % (vector, gtype))
    sel = (g >> 16) & 0xFFFF
    off = (g & 0xFFFF) | (((g >> 48) & 0xFFFF) << 16)
    width = 4 if gtype & 0x8 else 2
    if width == 2:
        off &= 0xFFFF
    cs = _gate_target(gm, st, sel, gtype)
    ss_base, _l, _s, ss_attr = st.segs[2]
    big = bool(ss_attr & (1 << 14))           # SS.B: ESP, else SP
    mask = 0xFFFFFFFF if big else 0xFFFF
    sp = st.gpr[4] & mask
    fmt = "<I" if width == 4 else "<H"
    vmask = 0xFFFFFFFF if width == 4 else 0xFFFF
    for v in (st.rflags, st.segs[1][2], st.rip):
        sp = (sp - width) & mask
        gm.write(ss_base + sp, struct.pack(fmt, v & vmask))
    st.gpr[4] = (st.gpr[4] & ~mask) | sp
    st.rflags &= ~(RF_TF | RF_NT | RF_RF | RF_VM)
    if not gtype & 1:                         # interrupt gate (trap gates keep IF)
        st.rflags &= ~RF_IF
    st.segs[1] = cs
    st.rip = off


def _long_mode(gm, st, vector):
    idt, limit = st.idtr
    if vector * 16 + 15 > limit:
        raise DeliveryError("vector 0x%x beyond the IDT limit" % vector)
    lo, hi = struct.unpack("<QQ", gm.read(idt + vector * 16, 16))
    gtype, present, ist = (lo >> 40) & 0xF, (lo >> 47) & 1, (lo >> 32) & 7
    if not present:
        raise DeliveryError("vector 0x%x: gate not present" % vector)
    if gtype not in (0xE, 0xF):
        raise DeliveryError("vector 0x%x: gate type 0x%x not modelled" % (vector, gtype))
    if ist:
        raise DeliveryError("vector 0x%x: IST stacks not modelled" % vector)
    sel = (lo >> 16) & 0xFFFF
    off = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & 0xFFFFFFFF) << 32)
    cs = _gate_target(gm, st, sel, gtype)
    ss_sel = st.segs[2][2]
    old_rsp = st.gpr[4]
    rsp = old_rsp & ~0xF & U64                # 64-bit mode aligns the frame
    for v in (ss_sel, old_rsp, st.rflags, st.segs[1][2], st.rip):
        rsp = (rsp - 8) & U64
        gm.write(rsp, struct.pack("<Q", v & U64))
    st.gpr[4] = rsp
    st.rflags &= ~(RF_TF | RF_NT | RF_RF)
    if not gtype & 1:
        st.rflags &= ~RF_IF
    st.segs[1] = cs
    st.rip = off
