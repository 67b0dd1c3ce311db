#!/usr/bin/env python
"""Fit power laws L = a * C^b of LM loss against training compute, per variant and position bucket.

    python tools/fit_scaling.py results.csv --out fits/ [--ratio-at 1.0]

Input: a CSV with at least the columns variant,bucket,compute_pflops_days,loss (one row per
measured point: e.g. the scaling sweep's table, or points read off a paper).  The fit is a
least-squares line in log-log space; a_ci and b_ci are 95% confidence intervals (Student t),
r2 is in log space.  Writes DIR/fits.json ({variant: {bucket: {a, b, a_ci, b_ci, r2, n}}}) and
DIR/scaling.png / scaling.pdf: one panel per bucket, log-log axes, measured points and dashed
projections ("MoBA Projection" in blue, "Full Attention Projection" in red).
The library: megatron_moba.eval.scaling_fit.
"""
from __future__ import annotations

import argparse
import sys

from megatron_moba.eval import scaling_fit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="CSV with variant,bucket,compute_pflops_days,loss")
    p.add_argument("--out", required=True, help="directory for fits.json and the plots")
    p.add_argument("--ratio-at", type=float, default=None,
                   help="also report the fitted loss ratio moba/full at this compute (PFLOP/s-days)")
    args = p.parse_args(argv)
    try:
        paths = scaling_fit.fit_table(args.table, args.out, ratio_at=args.ratio_at)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths[1:]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
