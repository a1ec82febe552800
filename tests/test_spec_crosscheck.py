"""The spec against two independent public sources.

tests/fixtures/spec_facts/ holds facts read from Linux's include/hyperv/*.h and uapi/linux/mshv.h, from
Microsoft's headers (as vendored in rust-vmm/mshv) and from OpenVMM's hvdef, each tagged with its
sources (docs/spec-crosscheck.md says how they were read and how disagreements were resolved). This
test loads tlfs_spec/ through the generator's model and checks every struct size, field offset, bit
range, constant, hypercall code, ioctl number and the hypercall ABI against those facts. Anything the
spec defines that the facts do not cover must be listed, with a reason, in project_only.yaml.
"""

import os
import shutil

import pytest
import yaml

from conftest import ROOT, SPEC

FACTS = os.path.join(ROOT, "tests", "fixtures", "spec_facts")
SOURCES = {"linux", "ms", "openvmm", "rustvmm", "tlfs", "linux_sheet"}


def _load(name):
    with open(os.path.join(FACTS, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def facts():
    return {
        "constants": _load("constants.yaml")["constants"],
        "structs": _load("structs.yaml")["structs"],
        "abi": _load("abi.yaml"),
        "project": _load("project_only.yaml"),
    }


# ---------------------------------------------------------------- what the spec defines

def spec_constants(spec):
    """Every named number the spec defines: statuses, enum values, UAPI defines and enums,
    hypercall codes (as HVCALL_<NAME>) and ioctl numbers."""
    out = {name: val for name, (val, _src) in spec.constants.items()}
    for h in spec.hypercalls:
        out["HVCALL_" + h.name.upper()] = h.code
    for x in spec.uapi.ioctls:
        out[x.name] = x.number
    return out


def spec_structs(spec):
    out = dict(spec.structs)
    out.update(spec.uapi.structs)
    return out


# ---------------------------------------------------------------- the checks (lists of problems)

def check_constants(spec, facts):
    problems = []
    consts = facts["constants"]
    project = facts["project"].get("constants", {})
    for name, val in sorted(spec_constants(spec).items()):
        if name in consts:
            want = consts[name]["value"]
            if val != want:
                problems.append(f"{name}: spec {val:#x}, sources {want:#x} ({consts[name]['src']})")
        elif name not in project:
            problems.append(f"{name}: not in the facts table and not listed as project-only")
    return problems


def check_structs(spec, facts):
    problems = []
    table = facts["structs"]
    project = facts["project"].get("structs", {})
    for sname, st in spec_structs(spec).items():
        po = project.get(sname, {})
        if sname not in table:
            if not po or "fields" in po:
                problems.append(f"{sname}: not in the facts table and not listed as project-only")
            continue
        fact = table[sname]
        want_size = po.get("size", fact["size"])
        if st.size != want_size:
            problems.append(f"{sname}: size {st.size}, sources {fact['size']}")
        extra_ok = set(po.get("fields", []))
        names = set()
        for f in st.fields:
            names.add(f.name)
            if f.name in fact["fields"]:
                if f.offset != fact["fields"][f.name]:
                    problems.append(f"{sname}.{f.name}: offset {f.offset}, sources {fact['fields'][f.name]}")
            elif f.name not in extra_ok:
                problems.append(f"{sname}.{f.name}: field not in the facts table")
            problems += _check_bits(sname, f, fact.get("bits", {}))
        for fname in fact["fields"]:
            if fname not in names:
                problems.append(f"{sname}.{fname}: the sources have this field at offset "
                                f"{fact['fields'][fname]}; the spec does not")
    return problems


def _check_bits(sname, field, bits):
    problems = []
    fb = bits.get(field.name)
    if not field.bits:
        if fb:
            problems.append(f"{sname}.{field.name}: the sources give bit ranges, the spec none")
        return problems
    if not fb:
        return [f"{sname}.{field.name}: bit ranges not in the facts table"]
    names = set()
    for b in field.bits:
        names.add(b.name)
        want = fb.get(b.name)
        if want is None:
            problems.append(f"{sname}.{field.name}.{b.name}: bit range not in the facts table")
        elif [b.lsb, b.width] != want:
            problems.append(f"{sname}.{field.name}.{b.name}: bits [{b.lsb}, {b.width}], "
                            f"sources {want} ({fb['src']})")
    for k, v in fb.items():
        if k not in ("src", "differs") and k not in names:
            problems.append(f"{sname}.{field.name}.{k}: the sources have bits {v}; the spec does not")
    return problems


def check_abi(spec, facts):
    problems = []
    for part, ranges in (("control", spec.abi.control), ("result", spec.abi.result)):
        want = facts["abi"][part]
        have = {b.name: [b.lsb, b.width] for b in ranges}
        for name in sorted(set(want) | set(have)):
            if name not in have:
                problems.append(f"abi.{part}.{name}: in the sources, not in the spec")
            elif name not in want:
                problems.append(f"abi.{part}.{name}: not in the facts table")
            elif have[name] != want[name]["bits"]:
                problems.append(f"abi.{part}.{name}: spec {have[name]}, sources {want[name]['bits']}")
    return problems


def all_problems(spec, facts):
    return check_constants(spec, facts) + check_structs(spec, facts) + check_abi(spec, facts)


# ---------------------------------------------------------------- tests

def test_constants_match_sources(spec, facts):
    assert check_constants(spec, facts) == []


def test_structs_match_sources(spec, facts):
    assert check_structs(spec, facts) == []


def test_abi_matches_sources(spec, facts):
    assert check_abi(spec, facts) == []


def test_every_fact_names_its_sources(facts):
    bad = []
    for name, e in facts["constants"].items():
        if not e.get("src") or not all(s.split(":")[0] in SOURCES for s in e["src"]):
            bad.append(name)
    for name, e in facts["structs"].items():
        if not e.get("sources") or not set(e["sources"]) <= SOURCES:
            bad.append(name)
        for fname, fb in e.get("bits", {}).items():
            if not fb.get("src") or not set(fb["src"]) <= SOURCES:
                bad.append(f"{name}.{fname}")
    for part in ("control", "result"):
        for name, e in facts["abi"][part].items():
            if not e.get("src") or not set(e["src"]) <= SOURCES:
                bad.append(f"abi.{part}.{name}")
    assert bad == []


def test_project_only_list_is_current(spec, facts):
    """An entry is only allowed for something the spec defines and the facts do not cover."""
    stale = []
    consts = spec_constants(spec)
    for name in facts["project"].get("constants", {}):
        if name not in consts or name in facts["constants"]:
            stale.append(name)
    structs = spec_structs(spec)
    for name, po in facts["project"].get("structs", {}).items():
        if not po.get("reason"):
            stale.append(name + " (no reason)")
        if name not in structs:
            stale.append(name)
        elif "fields" in po:
            fact = facts["structs"].get(name, {"fields": {}})
            for fname in po["fields"]:
                if fname in fact["fields"] or fname not in {f.name for f in structs[name].fields}:
                    stale.append(f"{name}.{fname}")
        elif name in facts["structs"]:
            stale.append(name)
    assert stale == []


MUTATIONS = [
    # (file, old text, new text, what the check must report)
    # the two errors of issue 9, put back: the valid flag at bit 1, and an 8-byte GetSystemProperty input
    ("hypercall_structs.yaml",
     "          - {name: rsvd, lsb: 1, width: 30, mbz: true}\n"
     "          - {name: proximity_info_valid, lsb: 31, width: 1,",
     "          - {name: rsvd, lsb: 2, width: 30, mbz: true}\n"
     "          - {name: proximity_info_valid, lsb: 1, width: 1,",
     "hv_proximity_domain_info.flags.proximity_info_valid"),
    ("hypercall_structs.yaml",
     "    size: 16\n    fields:\n      - {name: property_id, type: u32, offset: 0, enum: hv_system_property}\n"
     "      - {name: rsvd0, type: u32, offset: 4, mbz: true}\n      - {name: arg, type: u64, offset: 8}\n",
     "    size: 8\n    fields:\n      - {name: property_id, type: u32, offset: 0, enum: hv_system_property}\n"
     "      - {name: arg, type: u32, offset: 4}\n",
     "hv_input_get_system_property: size"),
    ("constants.yaml",
     "{name: HV_X64_REGISTER_RIP, value: 0x00020010}",
     "{name: HV_X64_REGISTER_RIP, value: 0x00020011}",
     "HV_X64_REGISTER_RIP"),
    ("hypercalls.yaml", "code: 0x00c2", "code: 0x00c3", "HVCALL_DISPATCH_VP"),
    ("messages.yaml", "{name: rip, type: u64, offset: 24}", "{name: rip2, type: u64, offset: 24}",
     "hv_x64_intercept_message_header.rip"),
    ("uapi.yaml", "    - name: MSHV_ROOT_HVCALL\n      nr: 0x07", "    - name: MSHV_ROOT_HVCALL\n      nr: 0x09",
     "MSHV_ROOT_HVCALL"),
    ("hvsim.yaml", "{name: HVSIM_IRQ, value: 5,", "{name: HVSIM_IRQ_NEW, value: 5,", "HVSIM_IRQ_NEW"),
]


@pytest.mark.parametrize("fname,old,new,expect", MUTATIONS, ids=[m[3] for m in MUTATIONS])
def test_check_catches_a_wrong_spec(tmp_path, facts, fname, old, new, expect):
    """The checks can fail: a copy of the spec with one value changed is reported."""
    from hypercall_gen import model

    spec_dir = tmp_path / "tlfs_spec"
    shutil.copytree(SPEC, spec_dir)
    path = spec_dir / fname
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"mutation anchor not found once in {fname}: {old!r}"
    path.write_text(text.replace(old, new), encoding="utf-8")
    problems = all_problems(model.load(str(spec_dir)), facts)
    assert any(expect in p for p in problems), problems
