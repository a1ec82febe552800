"""The patched Unicorn (tests/hvsim/unicorn/patches): one behaviour per test.

Each test drives the library directly through model/ucx.py on a small
long-mode machine (identity-mapped first 4 MiB, a GDT with ring-0 and ring-3
segments and a TSS, an IDT whose handlers record the vector, the error code
and the saved RIP/CS, then HLT). Every behaviour here is one the published
Unicorn 2.1.4 lacks, so each test fails on it.
"""

import struct
import threading
import time

import pytest

import model  # noqa: F401  (loads the patched library first)
from model import ucx
from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, UC_HOOK_CODE
from unicorn import x86_const as X

U64 = (1 << 64) - 1
CODE, USER_CODE, STACK, USER_STACK = 0x10000, 0x20000, 0xA000, 0x28000
PML4, PDPT, PD, GDT, IDT, TSS, RECORD = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0xA000
HANDLERS = 0xC000          # 0x80 bytes each: vectors 0-31, then 0x30 and 0x80
KCODE, KDATA, UDATA, UCODE, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084
# QEMU segment-cache flags (descriptor bits 8..23 of the high dword)
F_KCODE, F_DATA, F_UCODE, F_UDATA = 0xA09B00, 0xC09300, 0xA0FB00, 0xC0F300
ALL_EXITS = 0x3F


def _gdt():
    def desc(access, flags):
        return struct.pack("<Q", 0xFFFF | (access << 40) | (0xF << 48) | (flags << 52))
    tss = struct.pack("<Q", 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40)) + struct.pack("<Q", 0)
    return (struct.pack("<Q", 0) + desc(0x9B, 0xA) + desc(0x93, 0xC) + desc(0xF3, 0xC)
            + desc(0xFB, 0xA) + tss)


def _gate(off, dpl=0, ist=0):
    return struct.pack("<HHBBHII", off & 0xFFFF, KCODE, ist, 0x8E | (dpl << 5),
                       (off >> 16) & 0xFFFF, off >> 32, 0)


def _handler(vector, with_error):
    """Record (vector, error code, saved RIP, saved CS) at RECORD + 32*n, count n."""
    # mov rbx,[RECORD]; shl rbx,5; add rbx,RECORD+8
    code = bytes.fromhex("488b1c25") + struct.pack("<I", RECORD)
    code += bytes.fromhex("48c1e305") + bytes.fromhex("4881c3") + struct.pack("<I", RECORD + 8)
    code += bytes.fromhex("48c703") + struct.pack("<I", vector)           # mov qword [rbx], vector
    if with_error:
        code += bytes.fromhex("488b0424" "48894308")                        # mov rax,[rsp]; [rbx+8]
        frame = 8
    else:
        code += bytes.fromhex("48c7430800000000")                           # [rbx+8] = 0
        frame = 0
    code += bytes.fromhex("488b4424") + bytes([frame]) + bytes.fromhex("48894310")   # saved RIP
    code += bytes.fromhex("488b4424") + bytes([frame + 8]) + bytes.fromhex("48894318")  # saved CS
    code += bytes.fromhex("48ff0425") + struct.pack("<I", RECORD)           # inc qword [RECORD]
    code += b"\xF4"                                                         # hlt (exits)
    return code


ERROR_VECTORS = (8, 10, 11, 12, 13, 14, 17)


def handler_base(vector):
    return HANDLERS + 0x80 * (vector if vector < 32 else {0x30: 32, 0x80: 33}[vector])


class Machine:
    def __init__(self, exits=ALL_EXITS):
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        w = uc.reg_write
        # leave Unicorn's LMA-without-paging start state, as model/cpu.py does
        w(X.UC_X86_REG_CR0, 0x80000011)
        w(X.UC_X86_REG_CR0, 0x10)
        w(X.UC_X86_REG_MSR, (MSR_EFER, 0))
        ucx.set_system_mode(uc, True)
        ucx.set_exit_insns(uc, exits)
        uc.mem_map(0, 0x400000)
        uc.mem_write(PML4, struct.pack("<Q", PDPT | 7))
        uc.mem_write(PDPT, struct.pack("<Q", PD | 7))
        uc.mem_write(PD, struct.pack("<QQ", 0x83 | 4, 0x200083 | 4))     # 2 x 2 MiB, user
        uc.mem_write(GDT, _gdt())
        tss = bytearray(0x68)
        struct.pack_into("<Q", tss, 4, STACK)          # RSP0
        uc.mem_write(TSS, bytes(tss))
        for v in list(range(32)) + [0x30, 0x80]:
            h = handler_base(v)
            uc.mem_write(h, _handler(v, v in ERROR_VECTORS))
            uc.mem_write(IDT + 16 * v, _gate(h, dpl=3 if v == 0x80 else 0))
        w(X.UC_X86_REG_CR3, PML4)
        w(X.UC_X86_REG_CR4, 0x20)
        w(X.UC_X86_REG_MSR, (MSR_EFER, 0x501))          # LME, NXE, SCE
        w(X.UC_X86_REG_CR0, 0x80000011)
        w(X.UC_X86_REG_GDTR, (0, GDT, 0x37, 0))
        w(X.UC_X86_REG_IDTR, (0, IDT, 16 * 0x100 - 1, 0))
        w(X.UC_X86_REG_TR, (TSS_SEL, TSS, 0x67, 0x8B00))
        for i in (0, 3, 4, 5):
            ucx.set_segment(uc, i, KDATA, 0, 0xFFFFFFFF, F_DATA)
        ucx.set_segment(uc, 1, KCODE, 0, 0xFFFFFFFF, F_KCODE)
        ucx.set_segment(uc, 2, KDATA, 0, 0xFFFFFFFF, F_DATA)
        w(X.UC_X86_REG_RSP, STACK)
        w(X.UC_X86_REG_RFLAGS, 0x2)

    def user_mode(self):
        ucx.set_segment(self.uc, 1, UCODE, 0, 0xFFFFFFFF, F_UCODE)
        ucx.set_segment(self.uc, 2, UDATA, 0, 0xFFFFFFFF, F_UDATA)
        self.uc.reg_write(X.UC_X86_REG_RSP, USER_STACK)

    def run(self, code=None, at=None):
        if code is not None:
            self.uc.mem_write(at if at is not None else CODE, code)
        if code is not None or at is not None:
            self.uc.reg_write(X.UC_X86_REG_RIP, at if at is not None else CODE)
        self.uc.emu_start(self.uc.reg_read(X.UC_X86_REG_RIP), U64)
        return ucx.exit_reason(self.uc)

    def rip(self):
        return self.uc.reg_read(X.UC_X86_REG_RIP)

    def reg(self, r):
        return self.uc.reg_read(getattr(X, "UC_X86_REG_" + r))

    def records(self):
        n = struct.unpack("<Q", self.uc.mem_read(RECORD, 8))[0]
        return [struct.unpack_from("<4Q", self.uc.mem_read(RECORD + 8 + 32 * k, 32)) for k in range(n)]

    def cpl(self):
        return ucx.get_segment(self.uc, 2)[3] >> 13 & 3

    def close(self):
        ucx.release(self.uc)


@pytest.fixture
def m():
    mach = Machine()
    yield mach
    mach.close()


def handler_hlt(vector):
    """Address of the HLT that ends the handler of `vector` (where it exits)."""
    return handler_base(vector) + len(_handler(vector, vector in ERROR_VECTORS)) - 1


# ---------------------------------------------------------------- instruction exits
@pytest.mark.parametrize("code,reason", [
    (bytes.fromhex("e680"), ucx.EXIT_IO),            # out 0x80, al
    (bytes.fromhex("66ed"), ucx.EXIT_IO),            # in ax, dx
    (bytes.fromhex("f3 6e"), ucx.EXIT_IO),           # rep outsb
    (bytes.fromhex("0fa2"), ucx.EXIT_CPUID),
    (bytes.fromhex("0f32"), ucx.EXIT_MSR),           # rdmsr
    (bytes.fromhex("0f30"), ucx.EXIT_MSR),           # wrmsr
    (bytes.fromhex("f4"), ucx.EXIT_HLT),
    (bytes.fromhex("0f01c1"), ucx.EXIT_VMCALL),
    (bytes.fromhex("0f01d9"), ucx.EXIT_VMCALL),      # vmmcall
    (bytes.fromhex("440f20c0"), ucx.EXIT_CR8),       # mov rax, cr8
])
def test_exit_before_the_instruction(m, code, reason):
    m.uc.reg_write(X.UC_X86_REG_RAX, 0x1234)
    m.uc.reg_write(X.UC_X86_REG_RCX, 0x10)           # an MSR QEMU knows (TSC)
    m.uc.reg_write(X.UC_X86_REG_RSI, 0x100)
    got = m.run(bytes.fromhex("4889c3") + code)      # mov rbx, rax; <insn>
    assert got == (reason, -1, -1)
    assert m.rip() == CODE + 3                       # at the instruction, not past it
    assert m.reg("RAX") == 0x1234 and m.reg("RSI") == 0x100   # and none of it done


def test_exit_insns_off_runs_them(m):
    ucx.set_exit_insns(m.uc, ucx.EXIT_INSN_HLT)
    m.uc.reg_write(X.UC_X86_REG_RAX, 0)
    assert m.run(bytes.fromhex("0fa2" "f4"))[0] == ucx.EXIT_HLT   # CPUID executed
    assert m.rip() == CODE + 2 and m.reg("RAX") != 0


def test_rdmsr_at_cpl3_is_a_gp_not_an_exit(m):
    m.user_mode()
    assert m.run(bytes.fromhex("0f32"), at=USER_CODE) == (ucx.EXIT_HLT, -1, -1)
    assert m.rip() == handler_hlt(13)
    assert m.records() == [(13, 0, USER_CODE, UCODE)]


# ---------------------------------------------------------------- system instructions
def test_syscall_and_sysret_change_privilege(m):
    w = m.uc.reg_write
    w(X.UC_X86_REG_MSR, (MSR_STAR, (KCODE << 32) | ((UDATA - 8 - 3) << 48)))
    w(X.UC_X86_REG_MSR, (MSR_LSTAR, CODE + 0x100))
    w(X.UC_X86_REG_MSR, (MSR_FMASK, 0x200))
    m.uc.mem_write(CODE + 0x100, bytes.fromhex("e680" "48 0f 07"))   # out; sysretq
    m.user_mode()
    w(X.UC_X86_REG_RFLAGS, 0x202)
    assert m.run(bytes.fromhex("0f05" "f4"), at=USER_CODE)[0] == ucx.EXIT_IO
    assert m.rip() == CODE + 0x100 and m.cpl() == 0
    assert m.reg("RCX") == USER_CODE + 2 and m.reg("R11") & 0x200
    assert not m.reg("RFLAGS") & 0x200                                # SFMASK cleared IF
    m.uc.reg_write(X.UC_X86_REG_RIP, CODE + 0x102)
    assert m.run()[0] == ucx.EXIT_HLT                # HLT at CPL 3 -> #GP -> handler HLT
    assert m.records() == [(13, 0, USER_CODE + 2, UCODE)]


def test_syscall_without_efer_sce_is_ud(m):
    m.uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, 0x500))
    assert m.run(bytes.fromhex("0f05"))[0] == ucx.EXIT_HLT
    assert m.records() == [(6, 0, CODE, KCODE)]


def test_verw_in_long_mode(m):
    # verw [rip+2]; jmp +2; dw KDATA; out   (Linux's return-to-user path)
    assert m.run(bytes.fromhex("0f002d02000000" "eb02" "1000" "e680"))[0] == ucx.EXIT_IO
    assert m.records() == []


# ---------------------------------------------------------------- exceptions
def test_ud_goes_through_the_idt(m):
    assert m.run(bytes.fromhex("0f0b"))[0] == ucx.EXIT_HLT          # ud2
    assert m.records() == [(6, 0, CODE, KCODE)]


def test_page_faults_in_a_row_stay_page_faults(m):
    """Unicorn left its nested-exception state set: the second fault became #DF."""
    for k in range(3):
        m.uc.reg_write(X.UC_X86_REG_RSP, STACK)
        # new code at a new place: Unicorn does not see uc_mem_write over translated code
        code = bytes.fromhex("488b0425") + struct.pack("<I", 0x40000000 + k * 8)
        assert m.run(code, at=CODE + 0x100 * k)[0] == ucx.EXIT_HLT
    assert [r[0] for r in m.records()] == [14, 14, 14]
    assert m.records()[0][1] == 0                    # not present, read, supervisor
    assert m.reg("CR2") == 0x40000010


def test_exception_exit_bitmap(m):
    ucx.set_exception_exits(m.uc, 1 << 14)
    got = m.run(bytes.fromhex("48c70425") + struct.pack("<I", 0x40000000) + struct.pack("<I", 5))
    assert got == (ucx.EXIT_EXCEPTION, 14, 2)        # write to a not-present page
    assert m.rip() == CODE and m.reg("CR2") == 0x40000000 and m.records() == []
    m.uc.reg_write(X.UC_X86_REG_RSP, STACK)
    assert m.run(bytes.fromhex("0f0b"), at=CODE + 0x100)[0] == ucx.EXIT_HLT   # #UD still delivered
    assert m.records() == [(6, 0, CODE + 0x100, KCODE)]


def test_int3_exits_at_the_instruction(m):
    ucx.set_exception_exits(m.uc, 1 << 3)
    assert m.run(bytes.fromhex("90cc")) == (ucx.EXIT_EXCEPTION, 3, -1)
    assert m.rip() == CODE + 1


def test_triple_fault_is_an_exit(m):
    m.uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 7, 0))   # only vector 0 fits
    assert m.run(bytes.fromhex("0f0b"))[0] == ucx.EXIT_TRIPLE_FAULT


def test_exception_is_not_reported_as_the_next_runs_fault(m):
    """The exit-address probe after a run faulted on the guest's page tables
    and left CR2 pointing at 2^64-1."""
    m.uc.reg_write(X.UC_X86_REG_CR2, 0x1234000)
    m.run(bytes.fromhex("f4"))
    assert m.reg("CR2") == 0x1234000


# ---------------------------------------------------------------- events
def test_inject_interrupt(m):
    ucx.inject(m.uc, ucx.INJECT_INTERRUPT, 0x30)
    assert m.run(bytes.fromhex("f4"))[0] == ucx.EXIT_HLT
    assert m.records() == [(0x30, 0, CODE, KCODE)]


def test_inject_exception_with_error_code_from_user_mode_switches_stack(m):
    m.user_mode()
    m.uc.mem_write(USER_CODE, b"\xF4")
    m.uc.reg_write(X.UC_X86_REG_RIP, USER_CODE)
    ucx.inject(m.uc, ucx.INJECT_EXCEPTION, 13, 0x28)
    assert m.run()[0] == ucx.EXIT_HLT
    assert m.records() == [(13, 0x28, USER_CODE, UCODE)]
    assert STACK - 0x40 < m.reg("RSP") < STACK and m.cpl() == 0


def test_inject_nmi_blocks_nmis_until_iret(m):
    ucx.inject(m.uc, ucx.INJECT_NMI, 2)
    m.run(bytes.fromhex("f4"))
    assert m.records() == [(2, 0, CODE, KCODE)]
    assert ucx.get_intr_state(m.uc) & ucx.INTR_NMI_MASKED
    ucx.irq_window(m.uc, ucx.WINDOW_NMI)
    m.uc.mem_write(CODE + 0x40, bytes.fromhex("48cf"))              # iretq
    m.uc.mem_write(STACK - 40, struct.pack("<5Q", CODE + 0x50, KCODE, 2, STACK, KDATA))
    m.uc.reg_write(X.UC_X86_REG_RSP, STACK - 40)
    m.uc.mem_write(CODE + 0x50, b"\xEB\xFE")                        # jmp $
    assert m.run(at=CODE + 0x40)[0] == ucx.EXIT_IRQ_WINDOW
    assert m.rip() == CODE + 0x50 and not ucx.get_intr_state(m.uc) & ucx.INTR_NMI_MASKED


def test_irq_window_waits_for_if_and_the_sti_shadow(m):
    ucx.irq_window(m.uc, ucx.WINDOW_IRQ)
    # mov ecx, 1000; loop; sti; nop; jmp $
    got = m.run(bytes.fromhex("b9e8030000" "e2fe" "fb" "90" "ebfe"))
    assert got[0] == ucx.EXIT_IRQ_WINDOW
    assert m.rip() == CODE + 9 and m.reg("RCX") == 0   # after the NOP the STI shadow covered


def test_interrupt_shadow_round_trips(m):
    ucx.set_intr_state(m.uc, ucx.INTR_SHADOW)
    assert ucx.get_intr_state(m.uc) == ucx.INTR_SHADOW
    m.uc.reg_write(X.UC_X86_REG_RFLAGS, 0x202)
    ucx.irq_window(m.uc, ucx.WINDOW_IRQ)
    assert m.run(bytes.fromhex("90" "ebfe"))[0] == ucx.EXIT_IRQ_WINDOW
    assert m.rip() == CODE + 1                       # the shadowed NOP ran first


def test_kick_from_another_thread_stops_a_spinning_guest(m):
    t = threading.Timer(0.2, ucx.kick, args=(m.uc,))
    t.start()
    start = time.monotonic()
    assert m.run(bytes.fromhex("ebfe"))[0] == ucx.EXIT_KICK
    assert 0.15 < time.monotonic() - start < 5 and m.rip() == CODE
    t.join()


def test_kick_before_the_run_is_not_lost(m):
    ucx.kick(m.uc)
    assert m.run(bytes.fromhex("ebfe"))[0] == ucx.EXIT_KICK


def test_step_runs_one_instruction_of_cached_code(m):
    code = bytes.fromhex("b9e8030000" "ffc9" "75fc" "f4")   # mov ecx,1000; L: dec ecx; jnz L; hlt
    assert m.run(code)[0] == ucx.EXIT_HLT                   # translated and cached
    m.uc.reg_write(X.UC_X86_REG_RCX, 5)
    m.uc.reg_write(X.UC_X86_REG_RIP, CODE + 5)
    for want_rip, want_rcx in ((CODE + 7, 4), (CODE + 5, 4), (CODE + 7, 3)):
        ucx.step(m.uc)
        assert m.run()[0] == ucx.EXIT_STEP
        assert (m.rip(), m.reg("RCX")) == (want_rip, want_rcx)
    assert m.run()[0] == ucx.EXIT_HLT and m.reg("RCX") == 0  # normal blocks again


# ---------------------------------------------------------------- state
def test_segment_load_sets_cpl_and_mode(m):
    m.user_mode()
    assert m.cpl() == 3
    assert ucx.get_segment(m.uc, 1) == (UCODE, 0, 0xFFFFFFFF, F_UCODE)
    assert m.run(bytes.fromhex("fa"), at=USER_CODE)[0] == ucx.EXIT_HLT   # CLI at CPL 3, IOPL 0
    assert m.records() == [(13, 0, USER_CODE, UCODE)]


def test_32bit_code_segment(m):
    ucx.set_segment(m.uc, 1, KCODE, 0, 0xFFFFFFFF, 0xC09B00)       # compatibility mode
    m.uc.reg_write(X.UC_X86_REG_RAX, 0)
    assert m.run(bytes.fromhex("48" "f4"))[0] == ucx.EXIT_HLT      # 0x48 is DEC EAX there
    assert m.rip() == CODE + 1 and m.reg("RAX") == 0xFFFFFFFF


def test_virtual_tsc_runs_at_the_set_frequency(m):
    hz = 2_000_000_000
    ucx.set_tsc(m.uc, hz, 0)
    code = bytes.fromhex("0f31" "48c1e220" "4809c2" "4889d3" "f4")   # rdtsc; rbx = edx:eax
    before = time.monotonic_ns()
    m.run(code)
    after = time.monotonic_ns()
    tsc = m.reg("RBX")
    assert before * hz // 10 ** 9 <= tsc <= after * hz // 10 ** 9


# ---------------------------------------------------------------- self-modifying code
def test_guest_store_over_translated_code_takes_effect(m):
    """Stores to pages without code skip the write check (fast); a page that
    code was translated from gets it back, so a guest that rewrites its own
    code runs the new code."""
    # T: out 0x80, al; (first pass) then: mov byte [T], 0xF4 (hlt); jmp T
    t = CODE + 0x40
    m.uc.mem_write(t, bytes.fromhex("e680" "ebfe"))
    m.uc.reg_write(X.UC_X86_REG_RIP, t)
    assert m.run()[0] == ucx.EXIT_IO                 # T translated and run once
    code = bytes.fromhex("c60425") + struct.pack("<I", t) + b"\xF4"        # mov byte [t], 0xf4
    code += b"\xE9" + struct.pack("<i", t - (CODE + 0x80 + len(code) + 5))   # jmp t
    assert m.run(code, at=CODE + 0x80)[0] == ucx.EXIT_HLT
    assert m.rip() == t


def test_store_to_a_data_page_after_code_left_it(m):
    """A page that held code and is then written as data (and never run
    again) keeps working: the stores land."""
    m.uc.mem_write(CODE + 0x1000, b"\xF4")
    m.uc.reg_write(X.UC_X86_REG_RIP, CODE + 0x1000)
    assert m.run()[0] == ucx.EXIT_HLT
    # mov rsi, CODE+0x1000; mov ecx, 512; L: mov [rsi], rcx; add rsi, 8; loop L; out
    code = b"\x48\xbe" + struct.pack("<Q", CODE + 0x1000) + bytes.fromhex("b900020000" "48890e" "4883c608" "e2f7" "e680")
    assert m.run(code, at=CODE + 0x2000)[0] == ucx.EXIT_IO
    assert struct.unpack("<Q", m.uc.mem_read(CODE + 0x1000, 8))[0] == 512
    assert struct.unpack("<Q", m.uc.mem_read(CODE + 0x1FF8, 8))[0] == 1


def test_fetch_reads_through_the_mmu_without_side_effects(m):
    m.uc.mem_write(CODE + 0xFFE, b"\x0f\x0b")
    m.uc.reg_write(X.UC_X86_REG_CR2, 0x5000)
    assert ucx.fetch(m.uc, CODE + 0xFFE, 4) == b"\x0f\x0b\x00\x00"        # page crossing, both mapped
    assert ucx.fetch(m.uc, 0x40000000 - 2, 4) == b""                       # not present
    assert m.reg("CR2") == 0x5000
    assert m.run(bytes.fromhex("0f0b"), at=CODE + 0x200)[0] == ucx.EXIT_HLT  # no stale #PF state
    assert m.records() == [(6, 0, CODE + 0x200, KCODE)]


def test_injected_event_goes_in_before_a_pending_kick(m):
    """A kick that was already pending must not leave the injected event
    queued inside Unicorn behind a returned run."""
    ucx.kick(m.uc)
    ucx.inject(m.uc, ucx.INJECT_INTERRUPT, 0x30)
    m.uc.mem_write(CODE, bytes.fromhex("ebfe"))
    m.uc.reg_write(X.UC_X86_REG_RIP, CODE)
    m.run()
    assert m.records() == [(0x30, 0, CODE, KCODE)]
    ucx.inject(m.uc, ucx.INJECT_INTERRUPT, 0x30)          # the queue is free again


def test_a_step_that_ends_on_an_exit_does_not_linger(m):
    ucx.set_exception_exits(m.uc, 1 << 6)
    m.uc.mem_write(CODE, bytes.fromhex("0f0b" "90" "f4"))  # ud2; nop; hlt
    m.uc.reg_write(X.UC_X86_REG_RIP, CODE)
    ucx.step(m.uc)
    assert m.run() == (ucx.EXIT_EXCEPTION, 6, -1)
    m.uc.reg_write(X.UC_X86_REG_RIP, CODE + 2)          # the VMM skips the ud2
    assert m.run()[0] == ucx.EXIT_HLT and m.rip() == CODE + 3
