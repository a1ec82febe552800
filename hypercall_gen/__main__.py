"""python3 -m hypercall_gen [--spec DIR] [--out DIR] [--check]"""

import argparse
import os
import sys

from . import generate
from .model import SpecError


def main(argv=None):
    ap = argparse.ArgumentParser(prog="hypercall_gen", description=__doc__)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--spec", default=os.path.join(here, "tlfs_spec"))
    ap.add_argument("--out", default=os.path.join(here, "gen"))
    ap.add_argument("--check", action="store_true",
                    help="validate the spec and render in memory; write nothing")
    args = ap.parse_args(argv)
    try:
        files = generate.render_all(args.spec)
    except SpecError as e:
        print(f"hypercall_gen: error: {e}", file=sys.stderr)
        return 1
    if args.check:
        print(f"hypercall_gen: spec OK ({len(files)} outputs)")
        return 0
    changed = generate.write(files, args.out)
    print(f"hypercall_gen: {len(files)} files in {args.out} ({changed} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
