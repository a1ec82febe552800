#!/usr/bin/env python3
"""Mutation testing of the driver (make mutate; not part of make check).

Each mutation of tests/mutations.yaml is one plausible bug in mshv/*.c. The
runner checks the list (every `find` matches exactly once), runs the union of
the listed suites once unmutated (the baseline; it must pass), then for each
mutation: copies the repository to a scratch directory, applies the edit,
builds the hvsim module (a mutation that does not build is invalid, not
caught) and runs the mutation's suites with pytest -x. A failing run has
caught the mutation, a passing one missed it; a run that times out counts as
caught and is marked.

It prints a table as it goes, keeps each run's output in build/mutate/<id>.log
and writes a report: docs/mutation-score.md for a run of the whole list,
build/mutate/mutation-score.md for a partial one (--only), unless --report.
Exit status: 0 when every mutation run was caught (or argued equivalent),
1 when one was missed or did not build, 2 when the list, the baseline or the
runner itself is broken.
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "mutations.yaml"
LOGS = ROOT / "build" / "mutate"
DOC = ROOT / "docs" / "mutation-score.md"
NOT_COPIED = {".git", ".venv", "build", ".cache", "dist"}
KEYS = {"id", "file", "find", "replace", "edits", "what", "suites", "equivalent"}
SUITE_TIMEOUT = 600         # seconds of pytest per suite file of a mutation
BUILD_TIMEOUT = 900


class ListError(Exception):
    pass


def suite_path(name):
    """`memory` -> tests/test_hvsim_memory.py; paths and node ids pass as is."""
    return name if "/" in name or name.endswith(".py") else f"tests/test_hvsim_{name}.py"


def pattern(find):
    """`find` as a regex: exact, except that each run of whitespace matches
    any run of whitespace."""
    words = find.split()
    if not words:
        raise ListError("empty find")
    return re.compile(r"\s+".join(re.escape(w) for w in words))


def apply(text, edits):
    """`text` with each (find, replace) applied in order; each find must
    match exactly once."""
    for find, replace in edits:
        hits = list(pattern(find).finditer(text))
        if len(hits) != 1:
            raise ListError(f"find matches {len(hits)} times, not once: {find.strip()!r}")
        text = text[:hits[0].start()] + replace + text[hits[0].end():]
    return text


def source(rel, rev=None):
    """A file of the work tree, or of revision `rev`; None if it has none."""
    if rev is None:
        p = ROOT / rel
        return p.read_text() if p.is_file() else None
    r = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def load(rev=None, path=LIST):
    """The mutation list (always the work tree's), checked against the
    sources it mutates: the work tree's, or revision `rev`'s."""
    items = yaml.safe_load(path.read_text())
    if not isinstance(items, list):
        raise ListError(f"{path}: not a list")
    seen, errors = set(), []
    for n, m in enumerate(items):
        where = f"{path.name} entry {n + 1} ({m.get('id', '?') if isinstance(m, dict) else m!r})"
        try:
            if not isinstance(m, dict):
                raise ListError("not a mapping")
            unknown = set(m) - KEYS
            if unknown:
                raise ListError(f"unknown keys {sorted(unknown)}")
            for k in ("id", "file", "what", "suites"):
                if not m.get(k):
                    raise ListError(f"no {k}")
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", m["id"]):
                raise ListError("id is not a short slug")
            if m["id"] in seen:
                raise ListError("duplicate id")
            seen.add(m["id"])
            if ("edits" in m) == ("find" in m or "replace" in m):
                raise ListError("needs find+replace or edits, not both")
            raw = m["edits"] if "edits" in m else [{"find": m.get("find"), "replace": m.get("replace")}]
            if not raw or any(not isinstance(e, dict) or set(e) != {"find", "replace"}
                              or not isinstance(e["find"], str) or not isinstance(e["replace"], str)
                              for e in raw):
                raise ListError("each edit needs a find and a replace (strings)")
            m["edits"] = [(e["find"], e["replace"]) for e in raw]
            text = source(m["file"], rev) if re.fullmatch(r"mshv/\w+\.c", m["file"]) else None
            if text is None:
                raise ListError(f"no such driver file {m['file']}")
            if apply(text, m["edits"]) == text:
                raise ListError("the edit changes nothing")
            if isinstance(m["suites"], str):
                m["suites"] = m["suites"].split()
            m["suites"] = [suite_path(s) for s in m["suites"]]
            for s in m["suites"]:
                if source(s.split("::")[0], rev) is None:
                    raise ListError(f"no such test file {s}")
        except ListError as e:
            errors.append(f"{where}: {e}")
    if errors:
        raise ListError("\n".join(errors))
    return items


# --- scratch copies --------------------------------------------------------

def copy_repo(dst, rev=None):
    """The work tree as it is (tracked and untracked, not ignored files) plus
    gen/, without .git, .venv, build, .cache and dist; or, with `rev`, that
    revision's files (gen/ is then generated by the build)."""
    if rev is not None:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
        return
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f]
    gen = ROOT / "gen"
    if gen.is_dir():
        files += [str(p.relative_to(ROOT)) for p in gen.rglob("*") if not p.is_dir()]
    for f in sorted(set(files)):
        if Path(f).parts[0] in NOT_COPIED or "__pycache__" in Path(f).parts:
            continue
        src = ROOT / f
        if not src.is_file():
            continue                        # deleted in the work tree
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / f)          # keeps mtimes: gen/ stays current for make


def python():
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def environment(scratch, kernels):
    env = dict(os.environ)
    env["HVSIM_CACHE"] = str(ROOT / ".cache" / "hvsim")    # no refetching kernels
    env.setdefault("HVSIM_UNICORN_CACHE", str(ROOT / ".cache" / "unicorn"))  # nor rebuilding Unicorn
    env["TMPDIR"] = str(scratch / "tmp")    # the VMs' work dirs: found and removed with it
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if kernels:
        env["HVSIM_KERNELS"] = kernels
    (scratch / "tmp").mkdir(exist_ok=True)
    return env


def stop(proc, scratch):
    """End a timed-out pytest: SIGINT first (pytest then stops its VMs),
    then SIGKILL for its process group and any QEMU it started (QEMU runs in
    its own session; its command line names the scratch directory)."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(scratch).encode() in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for ram in Path("/dev/shm").glob(f"hvsim-{proc.pid}-*.ram"):
        ram.unlink(missing_ok=True)


def run(cmd, scratch, env, timeout, log):
    """Run `cmd` in `scratch`, output appended to `log`: (rc, seconds, timed_out)."""
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        # own session, so that stop() can end it all; SIGINT at its default
        # (not ignored, as in a background job) so that pytest stops cleanly
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            rc, timed_out = proc.wait(timeout), False
        except subprocess.TimeoutExpired:
            stop(proc, scratch)
            rc, timed_out = None, True
        except KeyboardInterrupt:       # the child has its own session: stop it too
            stop(proc, scratch)
            raise
        f.write(f"\n[exit {rc}{', timeout' if timed_out else ''} after "
                f"{time.monotonic() - t0:.0f} s]\n")
    return rc, time.monotonic() - t0, timed_out


def first_failure(log):
    """The first FAILED/ERROR line of pytest's summary, compacted."""
    text = Path(log).read_text(errors="replace")
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if not m:
        return ""
    node = m.group(1)
    g = re.fullmatch(r"tests/test_hvsim_(\w+)\.py::\w+\[(\d+\.\d+)\S*?-(root|core)-(\w+)\]", node)
    if g:
        return f"{g.group(1)} {g.group(3)} {g.group(2)}: {g.group(4)}"
    return node.removeprefix("tests/")


def evaluate(m, edits, suites, args, log):
    """Copy, mutate, build, test: (result, first failure, seconds)."""
    scratch = Path(tempfile.mkdtemp(prefix="mut-"))
    t0 = time.monotonic()
    try:
        copy_repo(scratch, args.rev)
        if edits:
            src = scratch / m["file"]
            src.write_text(apply(src.read_text(), edits))
        env = environment(scratch, args.kernels)
        rc, _s, timed_out = run(["make", "--no-print-directory", "debian-modules", "HVSIM=1",
                                 f"PYTHON={python()}"], scratch, env, BUILD_TIMEOUT, log)
        if rc != 0:
            return "does not build", "timeout" if timed_out else "", time.monotonic() - t0
        if args.build_only:
            return "builds", "", time.monotonic() - t0
        timeout = args.timeout or SUITE_TIMEOUT * len(suites)
        rc, _s, timed_out = run([python(), "-m", "pytest", *suites, "-x", "-q", "-rfE",
                                 "-p", "no:cacheprovider"], scratch, env, timeout, log)
        secs = time.monotonic() - t0
        if timed_out:
            return "caught (timeout)", f"no result in {timeout} s", secs
        if rc == 0:
            return "missed", "", secs
        if rc == 1:
            return "caught", first_failure(log), secs
        return "error", f"pytest exit {rc}", secs
    finally:
        if args.keep:
            print(f"    scratch copy kept: {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


# --- report --------------------------------------------------------------------

def score(results, equivalents):
    """(caught, scored): equivalent mutations that were not caught and the
    invalid ones (did not build, runner error) are not scored."""
    scored = [r for i, r in results.items()
              if r[0] in ("caught", "caught (timeout)", "missed")
              and not (i in equivalents and r[0] == "missed")]
    caught = sum(1 for r in scored if r[0] != "missed")
    return caught, len(scored)


def label(mid, result, equivalents):
    if mid in equivalents and result.startswith(("caught", "missed")):
        return "equivalent" if result == "missed" else f"{result} (listed as equivalent!)"
    return {"missed": "MISSED"}.get(result, result)


def revision(rev=None):
    cmd = ["git", "rev-parse", "--short", rev] if rev else ["git", "describe", "--always", "--dirty"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def write_report(path, items, results, started, args, partial):
    equivalents = {m["id"]: m["equivalent"] for m in items if m.get("equivalent")}
    caught, scored = score(results, equivalents)
    kernels = args.kernels or os.environ.get("HVSIM_KERNELS") or "newest"
    lines = [
        "# Mutation score",
        "",
        "Written by `make mutate` (scripts/mutate.py) from tests/mutations.yaml: each",
        "mutation is one plausible bug in mshv/*.c, built and run alone in a scratch copy",
        "against the suites that cover it. A missed mutation is treated like a failing",
        "test: add or sharpen a test, or argue in the list why it is equivalent. Grow the",
        "list with every feature.",
        "",
        "    make mutate                        # the whole list; rewrites this page",
        "    make mutate ONLY=\"id1 id2\"         # some (report in build/mutate/)",
        "    make mutate KERNELS=all            # on 6.1 too",
        "    make mutate MUTATE_FLAGS=\"--rev HEAD\"   # a commit, not the work tree",
        "    .venv/bin/python scripts/mutate.py --list | --build-only | --keep | --help",
        "",
        "The unmutated suites must pass first (baseline). A mutation that does not",
        "build is invalid (fix the list), a run that times out counts as caught.",
        "Each run's output: build/mutate/<id>.log.",
        "",
        f"- date: {started:%Y-%m-%d %H:%M}",
        f"- revision: {revision(args.rev)}" + (f" (--rev {args.rev}, list from the work tree)"
                                               if args.rev else ""),
        f"- kernels: {kernels} (HVSIM_KERNELS), both scheduler modes",
    ]
    if partial:
        lines.append(f"- **partial run** (--only): {len(results)} of {len(items)} mutations")
    lines += [
        f"- **score: {caught}/{scored} caught**"
        + (f" ({100 * caught / scored:.0f}%)" if scored else "")
        + f"; {sum(1 for i in results if i in equivalents and results[i][0] == 'missed')}"
        " equivalent, "
        f"{sum(1 for r in results.values() if r[0] in ('does not build', 'error'))} invalid"
        " (not scored)",
        "",
        "| id | file | what | result | first failure | s |",
        "|---|---|---|---|---|---|",
    ]
    for m in items:
        r = results.get(m["id"])
        res, fail, secs = (label(m["id"], r[0], equivalents), r[1], f"{r[2]:.0f}") if r \
            else ("not run", "", "")
        cells = [f"`{m['id']}`", m["file"].removeprefix("mshv/"), m["what"], res, fail, secs]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if equivalents:
        lines += ["", "## Argued equivalent", ""]
        lines += [f"- `{i}`: {' '.join(why.split())}" for i, why in equivalents.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# --- main ---------------------------------------------------------------------

ROW = "{:<38} {:<14} {:<22} {:>5}  {}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--list", action="store_true", help="check and print the list, run nothing")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    ap.add_argument("--kernels", help="HVSIM_KERNELS for the runs (all: 6.1 too)")
    ap.add_argument("--timeout", type=int, help=f"seconds per mutation's pytest run "
                    f"(default {SUITE_TIMEOUT} per suite file)")
    ap.add_argument("--rev", help="mutate this git revision (git archive), not the work tree")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--build-only", action="store_true",
                    help="only check that each mutation builds (no tests, no report)")
    ap.add_argument("--report", type=Path, help="where to write the report (default: "
                    "docs/mutation-score.md, or build/mutate/ for --only)")
    args = ap.parse_args(argv)

    try:
        items = load(args.rev)
    except (ListError, yaml.YAMLError) as e:
        print(f"mutate: {LIST.relative_to(ROOT)} is broken:\n{e}", file=sys.stderr)
        return 2
    if args.only:
        ids = {m["id"] for m in items}
        unknown = [i for i in args.only if i not in ids]
        if unknown:
            print(f"mutate: no such mutation: {' '.join(unknown)}", file=sys.stderr)
            return 2
    todo = [m for m in items if not args.only or m["id"] in args.only]
    if args.list:
        for m in todo:
            eq = " (argued equivalent)" if m.get("equivalent") else ""
            suites = " ".join(re.sub(r"^tests/test_hvsim_(\w+)\.py$", r"\1", s) for s in m["suites"])
            print(f"{m['id']:<38} {m['file']:<20} [{suites}] {m['what']}{eq}")
        print(f"{len(todo)} mutations, every find matches once")
        return 0

    LOGS.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()
    if not args.no_baseline and not args.build_only:
        suites = list(dict.fromkeys(s for m in todo for s in m["suites"]))
        log = LOGS / "baseline.log"
        log.write_text("")
        print(f"mutate: baseline (unmutated): {' '.join(suites)}", flush=True)
        res, fail, secs = evaluate({"id": "baseline"}, None, suites, args, log)
        if res != "missed":             # i.e. not green
            print(f"mutate: the unmutated tree does not pass ({fail or res}); see {log}",
                  file=sys.stderr)
            return 2
        print(f"mutate: baseline green in {secs:.0f} s", flush=True)

    report = args.report or (LOGS / "mutation-score.md" if args.only else DOC)
    equivalents = {m["id"] for m in items if m.get("equivalent")}
    results = {}
    print(ROW.format("mutation", "file", "result", "s", "first failure"))
    for m in todo:
        log = LOGS / f"{m['id']}.log"
        log.write_text(f"# {m['id']}: {m['what']}\n")
        results[m["id"]] = evaluate(m, m["edits"], m["suites"], args, log)
        res, fail, secs = results[m["id"]]
        print(ROW.format(m["id"], m["file"].removeprefix("mshv/"), label(m["id"], res, equivalents),
                         f"{secs:.0f}", fail), flush=True)
        if not args.build_only:
            write_report(report, items, results, started, args, partial=bool(args.only))

    invalid = [i for i, r in results.items() if r[0] in ("does not build", "error")]
    if args.build_only:
        print(f"mutate: {len(results) - len(invalid)}/{len(results)} mutations build")
        if invalid:
            print(f"mutate: does not build (see build/mutate/<id>.log): {' '.join(invalid)}",
                  file=sys.stderr)
        return 1 if invalid else 0
    caught, scored = score(results, equivalents)
    missed = [i for i, r in results.items() if r[0] == "missed" and i not in equivalents]
    shown = report.resolve().relative_to(ROOT) if report.resolve().is_relative_to(ROOT) else report
    print(f"mutate: {caught}/{scored} caught; report: {shown}")
    if missed:
        print(f"mutate: MISSED: {' '.join(missed)}", file=sys.stderr)
    if invalid:
        print(f"mutate: invalid (see build/mutate/<id>.log): {' '.join(invalid)}", file=sys.stderr)
    return 1 if missed or invalid else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("mutate: interrupted", file=sys.stderr)
        sys.exit(130)
