"""megatron_moba.eval.scaling_fit and tools/fit_scaling.py: recovers known power laws from noisy points;
clear errors on bad tables."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import tool_exit_code
from megatron_moba.eval import scaling_fit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
TOOL = os.path.join(ROOT, "tools", "fit_scaling.py")


TRUE = {("moba", "0k-2k"): (3.1, -0.051), ("full", "0k-2k"): (3.0, -0.050),
        ("moba", "12k-14k"): (2.6, -0.060), ("full", "12k-14k"): (2.55, -0.058)}


def _table(path, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "bucket", "compute_pflops_days", "loss", "model"])
        for (variant, bucket), (a, b) in TRUE.items():
            for c in np.geomspace(1e-3, 1e1, 12):
                w.writerow([variant, bucket, c, a * c ** b * np.exp(rng.normal(0, noise)), "m"])


def test_fit_recovers_known_coefficients(tmp_path):
    _table(tmp_path / "t.csv")
    r = subprocess.run([sys.executable, "tools/fit_scaling.py", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"),
                        "--ratio-at", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("fitted loss ratio moba/full at 1 PFLOP/s-days") == 2
    fits = json.load(open(tmp_path / "o" / "fits.json"))
    for (variant, bucket), (a, b) in TRUE.items():
        f = fits[variant][bucket]
        assert abs(f["b"] - b) < 0.01 and abs(f["a"] / a - 1) < 0.03
        assert f["b_ci"][0] < f["b"] < f["b_ci"][1] and f["a_ci"][0] < f["a"] < f["a_ci"][1]
        assert f["r2"] > 0.9 and f["n"] == 12
    assert os.path.getsize(tmp_path / "o" / "scaling.png") > 10_000 and os.path.exists(tmp_path / "o" / "scaling.pdf")


def test_confidence_intervals_are_calibrated():
    """Over many noisy samples, the 95% intervals contain the true exponent about 95% of the time."""
    rng = np.random.default_rng(1)
    c = np.geomspace(1e-3, 1e1, 8)
    hits = sum(lo < -0.05 < hi for lo, hi in (
        scaling_fit.fit_power_law(c, 3.0 * c ** -0.05 * np.exp(rng.normal(0, 0.01, c.size)))["b_ci"]
        for _ in range(400)))
    assert 0.91 <= hits / 400 <= 0.99


def test_exact_points_give_exact_fit():
    f = scaling_fit.fit_power_law([1, 10, 100], [2.0, 2.0 * 10 ** -0.1, 2.0 * 100 ** -0.1])
    assert abs(f["a"] - 2.0) < 1e-12 and abs(f["b"] + 0.1) < 1e-12 and abs(f["r2"] - 1) < 1e-12


@pytest.mark.parametrize("content,text", [
    ("variant,bucket,compute_pflops_days,loss\n", "the table is empty"),
    ("variant,bucket,loss\nmoba,0k,2.0\n", "missing column(s) ['compute_pflops_days']"),
    ("variant,bucket,compute_pflops_days,loss\nmoba,0k,-1,2\n", "must be positive"),
    ("variant,bucket,compute_pflops_days,loss\nmoba,0k,x,2\n", ":2: compute_pflops_days and loss must be numbers"),
    ("variant,bucket,compute_pflops_days,loss\nmoba,0k,1,2\n", "at least two distinct compute values"),
])
def test_bad_tables_fail_clearly(tmp_path, capsys, monkeypatch, content, text):
    (tmp_path / "t.csv").write_text(content)
    assert tool_exit_code(monkeypatch, "fit_scaling.py", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o")) == 2
    assert text in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")                   # nothing written
    with pytest.raises(ValueError) as e:
        scaling_fit.fit_table(str(tmp_path / "t.csv"), str(tmp_path / "o"))
    assert text in str(e.value)


def test_bucket_selection_and_ratio(tmp_path):
    _table(tmp_path / "t.csv")
    lines = []
    paths = scaling_fit.fit_table(str(tmp_path / "t.csv"), str(tmp_path / "o"), buckets=["12k-14k"], ratio_at=2.0,
                                  log=lines.append)
    assert paths == [str(tmp_path / "o" / n) for n in ("fits.json", "scaling.png", "scaling.pdf")]
    fits = json.load(open(paths[0]))
    assert {v: sorted(b) for v, b in fits.items()} == {"moba": ["12k-14k"], "full": ["12k-14k"]}
    expected = scaling_fit.loss_ratio(fits, "12k-14k", 2.0)
    assert abs(expected - 2.6 * 2.0 ** -0.060 / (2.55 * 2.0 ** -0.058)) < 0.02
    assert lines[-1] == f"fitted loss ratio moba/full at 2 PFLOP/s-days, 12k-14k: {expected:.4f}"
    with pytest.raises(ValueError, match=r"fit buckets \['2k-4k'\] are not in"):
        scaling_fit.fit_table(str(tmp_path / "t.csv"), str(tmp_path / "p"), buckets=["0k-2k", "2k-4k"])
    with pytest.raises(ValueError, match="needs a positive compute"):
        scaling_fit.fit_table(str(tmp_path / "t.csv"), str(tmp_path / "p"), ratio_at=0.0)
    assert not os.path.exists(tmp_path / "p")


def test_help_from_any_directory(tmp_path):
    r = subprocess.run([sys.executable, TOOL, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: fit_scaling.py" in r.stdout and "--ratio-at" in r.stdout and "Fit power laws" in r.stdout
