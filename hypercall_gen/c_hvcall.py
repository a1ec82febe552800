"""Renders mshvr_hvcall.h and mshvr_hvcall.c: one typed wrapper per hypercall,
the HV_STATUS name/errno table and the per-hypercall facts table that the
MSHV_ROOT_HVCALL passthrough consults.

Each wrapper zeroes the per-CPU input page, fills it field by field from its
typed arguments, splits rep calls into page-sized batches resumed from the
reps-completed index, issues fast calls in registers, deposits memory and
retries on INSUFFICIENT_MEMORY per the spec's policy, maps the status to an
errno and logs every failure with the status name."""

from .common import KTYPES, kconst, kstruct, marker
from .model import Struct

PASSTHROUGH = {"none": 0, "partition": 1, "root_and_partition": 2}


def _elem_ctype(t):
    return KTYPES[t] if isinstance(t, str) else kstruct(t.name)


class Param:
    def __init__(self, ctype, name, path, field):
        self.ctype, self.name, self.path, self.field = ctype, name, path, field

    def decl(self):
        return f"{self.ctype}{self.name}"


def _params(st, prefix="", path=""):
    """Typed arguments for every non-reserved field, nested structs flattened."""
    out = []
    for f in st.fields:
        if f.mbz:
            continue
        name = f"{prefix}{f.name}"
        p = f"{path}{f.name}"
        if isinstance(f.type, Struct):
            if f.is_array:
                raise ValueError(f"{f.src}: arrays of structs in a hypercall input "
                                 "cannot be passed as typed arguments")
            out += _params(f.type, name + "_", p + ".")
        elif f.is_array:
            out.append(Param(f"const {KTYPES[f.type]} *", name, p, f))
        else:
            out.append(Param(f"{KTYPES[f.type]} ", name, p, f))
    return out


class Wrapper:
    """One hypercall's C wrapper."""

    def __init__(self, spec, h):
        self.spec = spec
        self.h = h
        self.params = _params(h.input) if h.input else []
        self.fn = f"mshvr_hvcall_{h.name}"

    def signature(self):
        h = self.h
        args = [p.decl() for p in self.params]
        if h.output:
            args.append(f"{kstruct(h.output.name)} *output")
        if h.varhead:
            args += ["const u64 *varhead", "u32 varhead_count"]
        if h.form == "rep":
            if h.rep_input:
                args.append(f"const {_elem_ctype(h.rep_input)} *rep_in")
            if h.rep_output:
                args.append(f"{_elem_ctype(h.rep_output)} *rep_out")
            args += ["u32 rep_count", "u32 *reps_done"]
        args.append("u16 *hv_status")
        return f"int {self.fn}({', '.join(args)})"

    def proto(self):
        out = "/* " + self.h.doc + " */\n"
        if self.h.form == "rep":
            # callers size their rep arrays to whole hypercalls with it
            out += (f"#define {self.fn.upper()}_REP_BATCH\t"
                    f"{self.h.batch(self.spec.abi.page_size)}\t/* reps per hypercall */\n")
        return out + self.signature() + ";\n"

    # -- pieces --------------------------------------------------------------
    def _mbz_guards(self):
        out = []
        for p in self.params:
            if p.field.mbz_bits and not p.field.is_array:
                m = kconst(f"{p.field.struct.name.upper()}_{p.field.name.upper()}_MBZ_MASK")
                out.append(f"\tif (WARN_ON_ONCE({p.name} & {m}))\n\t\treturn -EINVAL;")
        return out

    def _fill(self, dst, base_expr=None, indent=2):
        t = "\t" * indent
        lines = []
        for p in self.params:
            f = p.field
            if f.is_array:
                lines.append(f"{t}for (hc_i = 0; hc_i < {f.count}; hc_i++)")
                lines.append(f"{t}\t{dst}{p.path}[hc_i] = {p.name}[hc_i];")
            elif base_expr and p.name == self.h.rep_advance["field"]:
                lines.append(f"{t}{dst}{p.path} = {base_expr};")
            else:
                lines.append(f"{t}{dst}{p.path} = {p.name};")
        return lines

    def _uses_index(self):
        return any(p.field.is_array for p in self.params)

    def _deposit_target(self):
        d = self.h.deposit
        if d["into"] == "root":
            return "mshvr_root_partition_id()", "true"
        return self.params[0].name, "false"

    def _status_tail(self):
        h = self.h
        return [
            "\tif (hv_status)",
            "\t\t*hv_status = hc_status;",
            f"\tif (hc_status != {kconst('HV_STATUS_SUCCESS')}) {{",
        ] + ([
            "\t\tif (" + " &&\n\t\t    ".join(f"hc_status != {kconst(q)}" for q in h.quiet_statuses) + ")",
            f'\t\t\tmshvr_hvcall_log_failure("{h.name}", {kconst("HVCALL_" + h.name.upper())}, hc_status);',
        ] if h.quiet_statuses else [
            f'\t\tmshvr_hvcall_log_failure("{h.name}", {kconst("HVCALL_" + h.name.upper())}, hc_status);',
        ]) + [
            ("\t\treturn hc_ret ? hc_ret : mshvr_hv_status_to_errno(hc_status);"
             if h.deposit else "\t\treturn mshvr_hv_status_to_errno(hc_status);"),
            "\t}",
            "\treturn 0;",
        ]

    def _retry(self, indent):
        """Deposit-and-retry after a needs-memory status, per the spec."""
        h = self.h
        t = "\t" * indent
        if not h.deposit:
            return [f"{t}break;"]
        target, root = self._deposit_target()
        return [
            f"{t}hc_ret = mshvr_hv_deposit_on_status(hc_status, {target}, {root},",
            f"{t}\t\t\t\t\t {h.deposit['retry']}, &hc_attempt);",
            f"{t}if (hc_ret)",
            f"{t}\tbreak;",
        ]

    def _initial_deposit(self):
        h = self.h
        if not h.deposit or not h.deposit["initial"]:
            return []
        target, _root = self._deposit_target()
        return [
            f"\thc_ret = mshvr_hv_deposit({target}, {h.deposit['initial']});",
            "\tif (hc_ret)",
            "\t\treturn hc_ret;",
        ]

    # -- bodies ----------------------------------------------------------------
    def _prologue(self):
        """Argument guards, then the up-front deposit (which may sleep)."""
        out = self._mbz_guards()
        if self.h.deposit:
            out.append("\tmight_sleep();")
        return out + self._initial_deposit()

    def _epilogue(self):
        """End of the attempt loop: retry after a deposit, then the status."""
        out = ["\t\tif (!mshvr_hv_status_needs_memory(hc_status))", "\t\t\tbreak;"]
        out += self._retry(2)
        out.append("\t}")
        out += self._status_tail()
        out.append("}")
        return "\n".join(out) + "\n"

    def body(self):
        if self.h.fast:
            return self._body_fast()
        if self.h.form == "rep":
            return self._body_rep()
        return self._body_simple()

    def _locals(self, extra=()):
        out = []
        if self._uses_index():
            out.append("\tunsigned int hc_i;")
        if self.h.deposit:
            out += ["\tunsigned int hc_attempt = 0;", "\tint hc_ret = 0;"]
        out += list(extra)
        out += ["\tu16 hc_status;"]
        return out

    def _body_fast(self):
        h = self.h
        code = kconst("HVCALL_" + h.name.upper())
        out = [self.signature(), "{",
               "\tunion {",
               f"\t\t{kstruct(h.input.name)} s;",
               "\t\tu64 w[2];",
               "\t} hc_in;"]
        out += self._locals(["\tu64 hc_result;"])
        out.append("")
        out += self._prologue()
        out.append("\tfor (;;) {")
        out.append("\t\tmemset(&hc_in, 0, sizeof(hc_in));")
        out += self._fill("hc_in.s.")
        out.append(f"\t\thc_result = mshvr_seam_hypercall_fast({code} | "
                   f"{kconst('HV_CONTROL_FAST_MASK')},")
        out.append("\t\t\t\t\t\t     hc_in.w[0], hc_in.w[1]);")
        out.append("\t\thc_status = mshvr_hv_result_status(hc_result);")
        return "\n".join(out) + "\n" + self._epilogue()

    def _body_simple(self):
        h = self.h
        code = kconst("HVCALL_" + h.name.upper())
        intype = f"{kstruct(h.input.name)} *hc_in" if h.input else "void *hc_in"
        out = [self.signature(), "{", f"\t{intype};", "\tvoid *hc_out;"]
        if not h.irqs_on:
            out.append("\tunsigned long hc_flags;")
        out.append("\tu64 hc_control;")
        out += self._locals(["\tu64 hc_result;"])
        out.append("")
        out += self._mbz_guards()
        if h.varhead:
            out.append(f"\tif (varhead_count > {kconst('HV_CONTROL_VARHEAD_SIZE_MASK')} >> "
                       f"{kconst('HV_CONTROL_VARHEAD_SIZE_SHIFT')} ||")
            out.append(f"\t    sizeof(*hc_in) + varhead_count * sizeof(u64) > "
                       f"{kconst('HV_PAGE_SIZE')})")
            out.append("\t\treturn -EINVAL;")
        if h.deposit:
            out.append("\tmight_sleep();")
        out += self._initial_deposit()
        ctl = code
        if h.varhead:
            ctl = (f"{code} |\n\t\t     ((u64)varhead_count << "
                   f"{kconst('HV_CONTROL_VARHEAD_SIZE_SHIFT')})")
        out.append(f"\thc_control = {ctl};")
        out.append("\tfor (;;) {")
        if h.irqs_on:
            out.append("\t\thc_in = mshvr_hvcall_begin_irqs_on(&hc_out);")
        else:
            out.append("\t\thc_in = mshvr_hvcall_begin(&hc_flags, &hc_out);")
        out.append(f"\t\tmemset(hc_in, 0, {kconst('HV_PAGE_SIZE')});")
        out += self._fill("hc_in->")
        if h.varhead:
            out.append("\t\tmemcpy(hc_in + 1, varhead, varhead_count * sizeof(u64));")
        if h.irqs_on:
            out.append("\t\thc_result = mshvr_seam_hypercall_irqs_on(hc_control, hc_in, hc_out);")
        else:
            out.append("\t\thc_result = mshvr_seam_hypercall(hc_control, hc_in, hc_out);")
        out.append("\t\thc_status = mshvr_hv_result_status(hc_result);")
        if h.output:
            out.append(f"\t\tif (hc_status == {kconst('HV_STATUS_SUCCESS')})")
            out.append("\t\t\tmemcpy(output, hc_out, sizeof(*output));")
        out.append("\t\tmshvr_hvcall_end_irqs_on();" if h.irqs_on
                   else "\t\tmshvr_hvcall_end(hc_flags);")
        return "\n".join(out) + "\n" + self._epilogue()

    def _body_rep(self):
        h = self.h
        code = kconst("HVCALL_" + h.name.upper())
        batch = h.batch(self.spec.abi.page_size)
        in_t = kstruct(h.input.name)
        out = [self.signature(), "{", f"\t{in_t} *hc_in;", "\tvoid *hc_out;",
               "\tunsigned long hc_flags;", "\tu32 hc_done = 0, hc_batch, hc_comp;"]
        out += self._locals(["\tu64 hc_result;"])
        out.append("")
        out += self._mbz_guards()
        if h.deposit:
            out.append("\tmight_sleep();")
        out += self._initial_deposit()
        out.append(f"\thc_status = {kconst('HV_STATUS_SUCCESS')};")
        out.append("\twhile (hc_done < rep_count) {")
        out.append(f"\t\thc_batch = min_t(u32, rep_count - hc_done, {batch});")
        out.append("\t\thc_comp = 0;")
        out.append("\t\twhile (hc_comp < hc_batch) {")
        out.append("\t\t\thc_in = mshvr_hvcall_begin(&hc_flags, &hc_out);")
        out.append(f"\t\t\tmemset(hc_in, 0, {kconst('HV_PAGE_SIZE')});")
        base = None
        adv = h.rep_advance
        if adv:
            by = f"(u64)hc_done * {adv['by']}"
            lf = adv.get("large_flag")
            if lf:
                mask = f"0x{lf['mask_value']:x}"
                by = (f"(u64)hc_done * (({lf['field']} & {mask}) ? "
                      f"{lf['by']} : {adv['by']})")
            base = f"{adv['field']} + {by}"
        out += self._fill("hc_in->", base, indent=3)
        if h.rep_input:
            out.append("\t\t\tmemcpy(hc_in + 1, rep_in + hc_done, hc_batch * sizeof(*rep_in));")
        out.append(f"\t\t\thc_result = mshvr_seam_hypercall({code} |")
        out.append(f"\t\t\t\t((u64)hc_batch << {kconst('HV_CONTROL_REP_COUNT_SHIFT')}) |")
        out.append(f"\t\t\t\t((u64)hc_comp << {kconst('HV_CONTROL_REP_START_SHIFT')}),")
        out.append("\t\t\t\thc_in, hc_out);")
        out.append("\t\t\thc_status = mshvr_hv_result_status(hc_result);")
        if h.rep_output:
            out.append("\t\t\tif (mshvr_hv_result_reps(hc_result) > hc_comp &&")
            out.append("\t\t\t    mshvr_hv_result_reps(hc_result) <= hc_batch)")
            out.append("\t\t\t\tmemcpy(rep_out + hc_done + hc_comp,")
            out.append("\t\t\t\t       (u8 *)hc_out + hc_comp * sizeof(*rep_out),")
            out.append("\t\t\t\t       (mshvr_hv_result_reps(hc_result) - hc_comp) * "
                       "sizeof(*rep_out));")
        out.append("\t\t\tmshvr_hvcall_end(hc_flags);")
        out.append("\t\t\t/* reps completed is absolute; it may only move forward */")
        out.append("\t\t\tif (mshvr_hv_result_reps(hc_result) > hc_batch ||")
        out.append(f"\t\t\t    (hc_status == {kconst('HV_STATUS_SUCCESS')} &&")
        out.append("\t\t\t     mshvr_hv_result_reps(hc_result) <= hc_comp)) {")
        out.append(f'\t\t\t\tmshvr_hvcall_log_protocol("{h.name}", hc_result, hc_comp, hc_batch);')
        out.append(f"\t\t\t\thc_status = {kconst('HV_STATUS_OPERATION_FAILED')};")
        out.append("\t\t\t\tbreak;")
        out.append("\t\t\t}")
        out.append("\t\t\tif (mshvr_hv_result_reps(hc_result) > hc_comp)")
        out.append("\t\t\t\thc_comp = mshvr_hv_result_reps(hc_result);")
        out.append(f"\t\t\tif (hc_status == {kconst('HV_STATUS_SUCCESS')})")
        out.append("\t\t\t\tcontinue;")
        out.append("\t\t\tif (!mshvr_hv_status_needs_memory(hc_status))")
        out.append("\t\t\t\tbreak;")
        out += self._retry(3)
        out.append("\t\t}")
        out.append("\t\thc_done += hc_comp;")
        out.append(f"\t\tif (hc_status != {kconst('HV_STATUS_SUCCESS')})")
        out.append("\t\t\tbreak;")
        out.append("\t}")
        out.append("\tif (reps_done)")
        out.append("\t\t*reps_done = hc_done;")
        out += self._status_tail()
        out.append("}")
        return "\n".join(out) + "\n"


def render_h(spec):
    out = [marker(spec)]
    out.append("#ifndef _MSHVR_HVCALL_H\n#define _MSHVR_HVCALL_H\n")
    out.append('#include <linux/types.h>\n#include "mshvr_hv_types.h"\n')
    out.append("""/* MSHV_ROOT_HVCALL policy of a hypercall */
enum mshvr_passthrough {
	MSHVR_PASSTHROUGH_NONE = 0,
	MSHVR_PASSTHROUGH_PARTITION = 1,
	MSHVR_PASSTHROUGH_ROOT_AND_PARTITION = 2,
};

/* What the spec says about one hypercall */
struct mshvr_hvcall_info {
	const char *name;
	u16 code;
	bool rep;
	bool fast;
	bool async;
	bool varhead;
	enum mshvr_passthrough passthrough;
	u16 in_size;		/* fixed input header, bytes */
	u16 out_size;		/* fixed output, bytes */
	u16 rep_in_size;	/* bytes per rep input element */
	u16 rep_out_size;	/* bytes per rep output element */
	u16 rep_batch;		/* most reps per call that fit one page */
	bool deposit;		/* has a deposit policy */
	bool deposit_into_root;
	u16 deposit_initial;
	u16 deposit_retry;
};

extern const struct mshvr_hvcall_info mshvr_hvcall_infos[];
extern const unsigned int mshvr_hvcall_info_count;
const struct mshvr_hvcall_info *mshvr_hvcall_info(u16 code);

const char *mshvr_hv_status_name(u16 status);
int mshvr_hv_status_to_errno(u16 status);

static inline u16 mshvr_hv_result_status(u64 result)
{
""")
    out.append(f"\treturn (result & {kconst('HV_RESULT_STATUS_MASK')}) >> "
               f"{kconst('HV_RESULT_STATUS_SHIFT')};\n}}\n")
    out.append("static inline u32 mshvr_hv_result_reps(u64 result)\n{")
    out.append(f"\treturn (result & {kconst('HV_RESULT_REPS_COMPLETED_MASK')}) >> "
               f"{kconst('HV_RESULT_REPS_COMPLETED_SHIFT')};\n}}\n")
    needs = [s.name for s in spec.statuses if s.errno == "ENOMEM"]
    out.append("/* Statuses that ask the caller to deposit memory and retry */")
    out.append("static inline bool mshvr_hv_status_needs_memory(u16 status)\n{")
    cond = " ||\n\t       ".join(f"status == {kconst(n)}" for n in needs)
    out.append(f"\treturn {cond};\n}}\n")
    out.append("""/*
 * Provided by the hand-written driver (mshv/hv_call.c) and the seam:
 * mshvr_hvcall_begin() disables interrupts and returns this CPU's zeroable
 * input page (and output page in *out); mshvr_hvcall_end() restores them.
 * Calls the spec marks "interrupts: enabled" use mshvr_hvcall_begin_irqs_on()
 * instead: preemption off, interrupts left on, this CPU's dispatch pages,
 * issued with mshvr_seam_hypercall_irqs_on().
 */
void *mshvr_hvcall_begin(unsigned long *flags, void **out);
void mshvr_hvcall_end(unsigned long flags);
void *mshvr_hvcall_begin_irqs_on(void **out);
void mshvr_hvcall_end_irqs_on(void);
u64 mshvr_seam_hypercall(u64 control, void *input, void *output);
u64 mshvr_seam_hypercall_irqs_on(u64 control, void *input, void *output);
u64 mshvr_seam_hypercall_fast(u64 control, u64 in0, u64 in1);
u64 mshvr_root_partition_id(void);
int mshvr_hv_deposit(u64 partition_id, unsigned int pages);
int mshvr_hv_deposit_on_status(u16 status, u64 target_partition_id, bool into_root,
			       unsigned int pages, unsigned int *attempt);
void mshvr_hvcall_log_failure(const char *name, u16 code, u16 status);
void mshvr_hvcall_log_protocol(const char *name, u64 result, u32 start, u32 count);
""")
    for h in sorted(spec.hypercalls, key=lambda h: h.code):
        out.append(Wrapper(spec, h).proto())
    out.append("#endif /* _MSHVR_HVCALL_H */")
    return "\n".join(out) + "\n"


def _info(spec, h):
    d = h.deposit
    fields = [
        f'.name = "{h.name}"',
        f".code = {kconst('HVCALL_' + h.name.upper())}",
        f".rep = {'true' if h.form == 'rep' else 'false'}",
        f".fast = {'true' if h.fast else 'false'}",
        f".async = {'true' if h.async_ else 'false'}",
        f".varhead = {'true' if h.varhead else 'false'}",
        f".passthrough = {['MSHVR_PASSTHROUGH_NONE', 'MSHVR_PASSTHROUGH_PARTITION', 'MSHVR_PASSTHROUGH_ROOT_AND_PARTITION'][PASSTHROUGH[h.passthrough]]}",
        f".in_size = {h.input.size if h.input else 0}",
        f".out_size = {h.output.size if h.output else 0}",
        f".rep_in_size = {h.rep_in_size}",
        f".rep_out_size = {h.rep_out_size}",
        f".rep_batch = {h.batch(spec.abi.page_size) if h.form == 'rep' else 0}",
        f".deposit = {'true' if d else 'false'}",
        f".deposit_into_root = {'true' if d and d['into'] == 'root' else 'false'}",
        f".deposit_initial = {d['initial'] if d else 0}",
        f".deposit_retry = {d['retry'] if d else 0}",
    ]
    return "\t{\n" + "".join(f"\t\t{x},\n" for x in fields) + "\t},"


def render_c(spec):
    out = [marker(spec)]
    out.append("#include <linux/bug.h>\n#include <linux/errno.h>\n#include <linux/kernel.h>\n"
               "#include <linux/minmax.h>\n#include <linux/string.h>\n"
               '#include "mshvr_hvcall.h"\n')
    out.append("const char *mshvr_hv_status_name(u16 status)\n{\n\tswitch (status) {")
    for s in spec.statuses:
        out.append(f'\tcase {kconst(s.name)}:\n\t\treturn "{s.name}";')
    out.append('\tdefault:\n\t\treturn "HV_STATUS_UNKNOWN";\n\t}\n}\n')
    out.append("int mshvr_hv_status_to_errno(u16 status)\n{\n\tswitch (status) {")
    by_errno = {}
    for s in spec.statuses:
        by_errno.setdefault(s.errno, []).append(s.name)
    for errno, names in by_errno.items():
        for n in names:
            out.append(f"\tcase {kconst(n)}:")
        out.append("\t\treturn 0;" if errno == "0" else f"\t\treturn -{errno};")
    out.append("\tdefault:\n\t\treturn -EIO;\n\t}\n}\n")
    out.append("const struct mshvr_hvcall_info mshvr_hvcall_infos[] = {")
    for h in sorted(spec.hypercalls, key=lambda h: h.code):
        out.append(_info(spec, h))
    out.append("};\n")
    out.append("const unsigned int mshvr_hvcall_info_count = ARRAY_SIZE(mshvr_hvcall_infos);\n")
    out.append("""const struct mshvr_hvcall_info *mshvr_hvcall_info(u16 code)
{
	unsigned int lo = 0, hi = ARRAY_SIZE(mshvr_hvcall_infos);

	/* the table is sorted by code */
	while (lo < hi) {
		unsigned int mid = lo + (hi - lo) / 2;

		if (mshvr_hvcall_infos[mid].code == code)
			return &mshvr_hvcall_infos[mid];
		if (mshvr_hvcall_infos[mid].code < code)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}
""")
    for h in sorted(spec.hypercalls, key=lambda h: h.code):
        out.append(Wrapper(spec, h).body())
    return "\n".join(out)
