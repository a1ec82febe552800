"""hvsim child-VP benchmarks (`make bench`): how fast the model runs guest code.

Each benchmark builds a long-mode guest in a child partition with the model's
test root (model/testkit.py: the same hypercalls the driver makes) and times
DispatchVp calls until the guest's final OUT. The instruction counts are known
by construction (fixed loops), so MIPS = instructions / wall time, including
every model cost on the way (dispatch, exits, register write-back).

  compute      register arithmetic, one taken branch per 5 instructions
  memory       a load and a store per iteration over a 1 MiB array (TLB hits)
  page-walk    one load per 4 KiB page over 8 MiB of 4 KiB mappings, CR3
               reloaded after each sweep: every access is a TLB miss
  msr          WRMSR of a synthetic MSR the model answers without an intercept
  exits        OUT to a port the root handles: a full intercept round trip
               (DispatchVp, message, SetVpRegisters for RIP) per instruction

This is a measurement, not a test: nothing here asserts a speed.
"""

import argparse
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model.testkit import Root, S  # noqa: E402

R = S
STACK = 0x9000                   # code at 0x3000 (Root.long_mode_guest)
ARRAY = 0x100000                 # 1 MiB inside the 2 MiB identity page
PAGED_BASE, PAGED_MB = 0x200000, 8


def long_mode_guest(root, code, paged=False):
    """A child partition with one VP in 64-bit mode running `code` at 0x3000.
    GPA [0, 2 MiB) is one 2 MiB page; with paged=True GPA [2 MiB, 10 MiB) is
    also mapped, with 4 KiB pages (page tables at 1.5 MiB)."""
    pid = root.new_guest()
    pages = (PAGED_BASE + PAGED_MB * 2 ** 20) // 4096 if paged else 512
    for gfn in range(0, pages, 256):              # one rep list per input page
        root.map_ram(pid, gfn, min(256, pages - gfn))
    pd = []
    if paged:
        pt_base = 0x180000
        for k in range(PAGED_MB // 2):
            pt = pt_base + k * 4096
            pd.append(pt | 3)
            base = PAGED_BASE + k * 2 ** 21
            root.gwrite(pid, pt, b"".join(struct.pack("<Q", (base + i * 4096) | 3) for i in range(512)))
    msg = root.long_mode_guest(pid, code, pd_extra=pd, rsp=STACK)
    return pid, msg


def run_until_out(root, pid, msg):
    """Dispatch until the guest's OUT; returns (seconds, dispatches)."""
    start = time.perf_counter()
    n = 0
    flags = 0
    while True:
        n += 1
        state, event = root.dispatch(pid, 0, flags)
        if event == S.HV_VP_DISPATCH_EVENT_INTERCEPT:
            break
    elapsed = time.perf_counter() - start
    assert root.message(msg)[0] == S.HVMSG_X64_IO_PORT_INTERCEPT
    return elapsed, n


def imm64(v):
    return struct.pack("<Q", v)


def bench_compute(root, iters):
    # mov r8, iters; L: add rax, rbx; imul rcx, rdx; xor rsi, rax; dec r8; jnz L; out 0x80, al
    code = (b"\x49\xb8" + imm64(iters) + bytes.fromhex("4801d8" "480fafca" "4831c6" "49ffc8" "75f1")
            + bytes.fromhex("e680"))
    pid, msg = long_mode_guest(root, code)
    t, n = run_until_out(root, pid, msg)
    assert root.get_regs(pid, 0, [R.HV_X64_REGISTER_R8]) == [0], "the loop did not run to the end"
    return 5 * iters, t, n


def bench_memory(root, sweeps):
    words = (1 << 20) // 8
    # mov r9, sweeps; S: mov rsi, ARRAY; mov rcx, words; L: add rax,[rsi]; mov [rsi],rax;
    # add rsi, 8; dec rcx; jnz L; dec r9; jnz S; out
    code = (b"\x49\xb9" + imm64(sweeps) + b"\x48\xbe" + imm64(ARRAY) + b"\x48\xb9" + imm64(words)
            + bytes.fromhex("480306" "488906" "4883c608" "48ffc9" "75f1" "49ffc9" "75d8") + bytes.fromhex("e680"))
    pid, msg = long_mode_guest(root, code)
    t, n = run_until_out(root, pid, msg)
    return sweeps * (2 + 5 * words + 2), t, n


def bench_page_walk(root, sweeps):
    pages = PAGED_MB * 256
    # mov r9, sweeps; S: mov rax, cr3; mov cr3, rax; mov rsi, PAGED_BASE; mov rcx, pages;
    # L: add rbx, [rsi]; add rsi, 4096; dec rcx; jnz L; dec r9; jnz S; out
    code = (b"\x49\xb9" + imm64(sweeps) + bytes.fromhex("0f20d8" "0f22d8") + b"\x48\xbe" + imm64(PAGED_BASE)
            + b"\x48\xb9" + imm64(pages) + bytes.fromhex("48031e" "4881c600100000" "48ffc9" "75f1"
                                                        "49ffc9" "75d2") + bytes.fromhex("e680"))
    pid, msg = long_mode_guest(root, code, paged=True)
    t, n = run_until_out(root, pid, msg)
    return sweeps * (4 + 4 * pages + 2), t, n, sweeps * pages


def bench_msr(root, count):
    # mov ecx, HV_X64_MSR_TPR; xor eax, eax; xor edx, edx; mov r9, count;
    # L: wrmsr; dec r9; jnz L; out   (each WRMSR is answered by the model itself)
    code = (b"\xb9" + struct.pack("<I", S.HV_X64_MSR_TPR) + bytes.fromhex("31c0" "31d2") + b"\x49\xb9"
            + imm64(count) + bytes.fromhex("0f30" "49ffc9" "75f9") + bytes.fromhex("e680"))
    pid, msg = long_mode_guest(root, code)
    t, n = run_until_out(root, pid, msg)
    return count, t


def bench_exits(root, count):
    # L: out 0x80, al; jmp L
    pid, msg = long_mode_guest(root, bytes.fromhex("e680" "ebfc"))
    start = time.perf_counter()
    for _ in range(count):
        state, event = root.dispatch(pid, 0, S.HV_DISPATCH_VP_FLAG_CLEAR_INTERCEPT_SUSPEND)
        assert event == S.HV_VP_DISPATCH_EVENT_INTERCEPT
        rip = root.get_regs(pid, 0, [R.HV_X64_REGISTER_RIP])[0]
        assert root.set_regs(pid, 0, [(R.HV_X64_REGISTER_RIP, rip + 2)])[0] == S.HV_STATUS_SUCCESS
    return count, time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the work (default 1)")
    args = ap.parse_args(argv)
    sc = args.scale
    root = Root()
    root.hv.dispatch_quantum = 0.25         # DispatchVp (time slice 0) is preempted after it
    print("hvsim child-VP benchmarks (patched Unicorn, model/cpu.py); time slice %.2f s"
          % root.hv.dispatch_quantum)
    print("%-10s %14s %9s %10s %10s  %s" % ("bench", "instructions", "seconds", "MIPS", "dispatches", "note"))
    try:
        insns, t, n = bench_compute(root, int(40_000_000 * sc))
        print("%-10s %14d %9.3f %10.1f %10d" % ("compute", insns, t, insns / t / 1e6, n))
        insns, t, n = bench_memory(root, max(1, int(100 * sc)))
        print("%-10s %14d %9.3f %10.1f %10d" % ("memory", insns, t, insns / t / 1e6, n))
        insns, t, n, misses = bench_page_walk(root, max(1, int(200 * sc)))
        print("%-10s %14d %9.3f %10.1f %10d  %.0f ns per TLB miss (%d misses)"
              % ("page-walk", insns, t, insns / t / 1e6, n, t / misses * 1e9, misses))
        count, t = bench_msr(root, max(1, int(20000 * sc)))
        print("%-10s %14d %9.3f %10.3f %10s  %.1f us per exit the model answers itself (WRMSR)"
              % ("msr", count, t, count / t / 1e6, "", t / count * 1e6))
        count, t = bench_exits(root, max(1, int(2000 * sc)))
        print("%-10s %14d %9.3f %10.3f %10d  %.1f us per intercept round trip"
              % ("exits", count, t, count / t / 1e6, count, t / count * 1e6))
    finally:
        root.close()


if __name__ == "__main__":
    main()
