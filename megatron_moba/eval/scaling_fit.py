"""Power laws L = a * C^b of LM loss against training compute, per variant and position bucket.

    from megatron_moba.eval import scaling_fit
    points = scaling_fit.read_points("results.csv")     # {(variant, bucket): [(compute, loss), ...]}
    fits = scaling_fit.fit_all(points)                   # {variant: {bucket: {a, b, a_ci, b_ci, r2, n}}}
    scaling_fit.plot(points, fits, "fits/")              # fits/scaling.png, fits/scaling.pdf

Input: a CSV with at least the columns variant,bucket,compute_pflops_days,loss (one row per
measured point: e.g. the scaling sweep's table, or points read off a paper).  The fit is a
least-squares line in log-log space; a_ci and b_ci are 95% confidence intervals (Student t),
r2 is in log space.  ``fit_table`` does it all for one table: DIR/fits.json and DIR/scaling.png /
scaling.pdf, one panel per bucket, log-log axes, measured points and dashed projections ("MoBA
Projection" in blue, "Full Attention Projection" in red).  ``tools/fit_scaling.py`` is the
command line.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from typing import List, Optional, Sequence

import numpy as np

REQUIRED = ("variant", "bucket", "compute_pflops_days", "loss")
COLORS = {"moba": "tab:blue", "full": "tab:red", "hybrid": "tab:green"}
NAMES = {"moba": "MoBA", "full": "Full Attention", "hybrid": "MoBA/Full Hybrid"}
# two-sided 95% Student t quantiles, df = 1..30 (beyond: normal)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def read_points(path: str, compute_column: str = "compute_pflops_days") -> dict:
    """{(variant, bucket): [(compute, loss), ...]} with clear errors for unusable input;
    ``compute_column``: the column of the x axis (e.g. the sweep table's job_compute_pflops_days)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    need = ("variant", "bucket", compute_column, "loss")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; need {list(need)}")
        points = defaultdict(list)
        for line, row in enumerate(reader, 2):
            try:
                c, loss = float(row[compute_column]), float(row["loss"])
            except ValueError:
                raise ValueError(f"{path}:{line}: {compute_column} and loss must be numbers") from None
            if c <= 0 or loss <= 0:
                raise ValueError(f"{path}:{line}: compute and loss must be positive for a log-log fit")
            points[(row["variant"], row["bucket"])].append((c, loss))
    if not points:
        raise ValueError(f"{path}: the table is empty")
    return points


def fit_power_law(compute, loss) -> dict:
    """Least squares of log L = log a + b log C."""
    x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError("a fit needs at least two distinct compute values")
    sxx = float(((x - x.mean()) ** 2).sum())
    b = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    log_a = float(y.mean() - b * x.mean())
    resid = y - (log_a + b * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    out = dict(a=math.exp(log_a), b=b, r2=r2, n=n, a_ci=None, b_ci=None,
               log_c_mean=float(x.mean()), log_c_sxx=sxx, resid_var=None)
    if n > 2:
        s2 = out["resid_var"] = float((resid ** 2).sum()) / (n - 2)
        t = t95(n - 2)
        se_b, se_log_a = math.sqrt(s2 / sxx), math.sqrt(s2 * (1 / n + x.mean() ** 2 / sxx))
        out["b_ci"] = [b - t * se_b, b + t * se_b]
        out["a_ci"] = [math.exp(log_a - t * se_log_a), math.exp(log_a + t * se_log_a)]
    return out


def t95(df: int) -> float:
    """Two-sided 95% Student t quantile with ``df`` degrees of freedom (normal beyond 30)."""
    return _T95[df - 1] if df <= len(_T95) else 1.96


def predict(fit: dict, compute: float) -> dict:
    """The fitted loss at ``compute`` with the 95% interval of the fitted line there (Student t, in
    log space; None for fits of two points): {loss, ci, log_se}."""
    x = math.log(compute)
    loss = fit["a"] * compute ** fit["b"]
    if fit.get("resid_var") is None:
        return dict(loss=loss, ci=None, log_se=None)
    se = math.sqrt(fit["resid_var"] * (1 / fit["n"] + (x - fit["log_c_mean"]) ** 2 / fit["log_c_sxx"]))
    t = t95(fit["n"] - 2)
    return dict(loss=loss, ci=[loss * math.exp(-t * se), loss * math.exp(t * se)], log_se=se)


def ratio_interval(fits: dict, bucket: str, compute: float) -> dict:
    """Fitted loss of moba over full at ``compute`` with a 95% interval: the two fits are
    independent, so the log ratio's variance is the sum of the two fitted lines' variances there
    (t quantile with the fits' pooled degrees of freedom).  {ratio, ci}"""
    m, f = predict(fits["moba"][bucket], compute), predict(fits["full"][bucket], compute)
    ratio = m["loss"] / f["loss"]
    if m["log_se"] is None or f["log_se"] is None:
        return dict(ratio=ratio, ci=None)
    se = math.hypot(m["log_se"], f["log_se"])
    t = t95(fits["moba"][bucket]["n"] + fits["full"][bucket]["n"] - 4)
    return dict(ratio=ratio, ci=[ratio * math.exp(-t * se), ratio * math.exp(t * se)])


def paired_ratio(sums_a, tokens_a, sums_b, tokens_b, resamples: int = 2000, seed: int = 0) -> dict:
    """Measured loss ratio A/B of two checkpoints on the same documents (per-document loss sums and
    token counts), with a 95% percentile bootstrap interval over documents (resampled in pairs):
    {ratio, ci, documents}.  Documents with no tokens in the bucket are left out."""
    sa, ta, sb, tb = (np.asarray(v, float) for v in (sums_a, tokens_a, sums_b, tokens_b))
    if not (sa.shape == ta.shape == sb.shape == tb.shape):
        raise ValueError("paired_ratio needs the same documents for both checkpoints")
    if not np.array_equal(ta, tb):
        raise ValueError("paired_ratio: the two evaluations counted different tokens per document")
    keep = ta > 0
    sa, sb, t = sa[keep], sb[keep], ta[keep]
    if not len(t):
        raise ValueError("paired_ratio: no document has tokens in this bucket")
    ratio = float(sa.sum() / sb.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(resamples, len(t)))                  # [resamples, documents]
    boot = sa[idx].sum(1) / sb[idx].sum(1)
    return dict(ratio=ratio, ci=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                documents=int(len(t)))


def fit_all(points: dict) -> dict:
    """``fit_power_law`` of every (variant, bucket): {variant: {bucket: fit}}; errors name the pair."""
    fits = defaultdict(dict)
    for (variant, bucket), pts in sorted(points.items()):
        c, loss = zip(*pts)
        try:
            fits[variant][bucket] = fit_power_law(c, loss)
        except ValueError as e:
            raise ValueError(f"variant {variant!r}, bucket {bucket!r}: {e}") from None
    return dict(fits)


def plot(points: dict, fits: dict, out_dir: str, panels: Optional[Sequence[str]] = None, extend_decades: float = 0.6,
         xlabel: str = "Training compute (PFLOP/s-days)", name: str = "scaling", title: Optional[str] = None) -> list:
    """One log-log panel per bucket (``panels``: these buckets, in this order; default every fitted
    one): the measured points and the fitted projections, drawn from half the smallest compute to
    ``extend_decades`` decades past the largest; returns [DIR/NAME.png, DIR/NAME.pdf]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    buckets = list(panels) if panels else sorted({b for _, b in points}, key=lambda s: (len(s), s))
    missing = [b for b in buckets if not any(b in per for per in fits.values())]
    if missing:
        raise ValueError(f"no fit for the panel bucket(s) {missing} (fitted: "
                         f"{sorted({b for per in fits.values() for b in per})})")
    fig, axes = plt.subplots(1, len(buckets), figsize=(5 * len(buckets), 4.2), squeeze=False)
    for ax, bucket in zip(axes[0], buckets):
        for variant in sorted(fits):
            if bucket not in fits[variant]:
                continue
            c, loss = zip(*sorted(points[(variant, bucket)]))
            color = COLORS.get(variant.lower())
            label = NAMES.get(variant.lower(), variant)
            ax.scatter(c, loss, color=color, label=label, zorder=3)
            f = fits[variant][bucket]
            grid = np.geomspace(min(c) / 2, max(c) * 10 ** extend_decades, 100)
            ax.plot(grid, f["a"] * grid ** f["b"], "--", color=color, label=f"{label} Projection")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"LM Loss {bucket}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths = [os.path.join(out_dir, name + ".png"), os.path.join(out_dir, name + ".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def select_buckets(points: dict, buckets: Optional[Sequence[str]], table: str = "the table") -> dict:
    """``points`` of the named buckets only (all of them for ``None`` or an empty list)."""
    if not buckets:
        return points
    have = sorted({b for _, b in points})
    missing = sorted(set(buckets) - set(have))
    if missing:
        raise ValueError(f"fit buckets {missing} are not in {table} (buckets: {have})")
    return {k: v for k, v in points.items() if k[1] in buckets}


def loss_ratio(fits: dict, bucket: str, compute: float) -> float:
    """Fitted loss of moba over full at ``compute`` PFLOP/s-days in ``bucket``."""
    m, f = fits["moba"][bucket], fits["full"][bucket]
    return (m["a"] * compute ** m["b"]) / (f["a"] * compute ** f["b"])


def fit_table(table: str, out: str, buckets: Optional[Sequence[str]] = None, ratio_at: Optional[float] = None,
              log=print, indent: str = "", compute_column: str = "compute_pflops_days", name: str = "scaling",
              fits_name: str = "fits", **plot_kw) -> List[str]:
    """Fit every (variant, bucket) of the CSV ``table`` (restricted to ``buckets``) against its
    ``compute_column``, write OUT/FITS_NAME.json and the plots (OUT/NAME.png/.pdf; ``plot_kw``:
    ``plot``'s panels, extend_decades, xlabel, title), log one line per fit (and the fitted moba/full
    loss ratio at ``ratio_at``); returns [json, png, pdf].  Nothing is written when the table
    cannot be fitted (ValueError)."""
    if ratio_at is not None and not ratio_at > 0:
        raise ValueError(f"the loss ratio needs a positive compute, got {ratio_at!r}")
    points = select_buckets(read_points(table, compute_column), buckets, table)
    fits = fit_all(points)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, fits_name + ".json")
    with open(path, "w") as f:
        json.dump(fits, f, indent=1)
    for variant, per_bucket in fits.items():
        for bucket, fit in per_bucket.items():
            log(f"{indent}{variant:>6} {bucket:>10}: L = {fit['a']:.4g} * C^{fit['b']:.4f}  "
                f"(R^2 {fit['r2']:.3f}, n {fit['n']})")
    if ratio_at is not None and "moba" in fits and "full" in fits:
        for bucket in sorted(set(fits["moba"]) & set(fits["full"])):
            log(f"{indent}fitted loss ratio moba/full at {ratio_at:g} PFLOP/s-days, {bucket}: "
                f"{loss_ratio(fits, bucket, ratio_at):.4f}")
    return [path] + plot(points, fits, out, name=name, **plot_kw)
