"""tools/fit_scaling.py: recovers known power laws from noisy points; clear errors on bad tables."""
import csv
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("fit_scaling", os.path.join(ROOT, "tools", "fit_scaling.py"))
fit_scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fit_scaling)

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
    assert fit_scaling.main([str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--ratio-at", "1"]) == 0
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
        fit_scaling.fit_power_law(c, 3.0 * c ** -0.05 * np.exp(rng.normal(0, 0.01, c.size)))["b_ci"]
        for _ in range(400)))
    assert 0.91 <= hits / 400 <= 0.99


def test_exact_points_give_exact_fit():
    f = fit_scaling.fit_power_law([1, 10, 100], [2.0, 2.0 * 10 ** -0.1, 2.0 * 100 ** -0.1])
    assert abs(f["a"] - 2.0) < 1e-12 and abs(f["b"] + 0.1) < 1e-12 and abs(f["r2"] - 1) < 1e-12


@pytest.mark.parametrize("content,text", [
    ("variant,bucket,compute_pflops_days,loss\n", "the table is empty"),
    ("variant,bucket,loss\nmoba,0k,2.0\n", "missing column(s) ['compute_pflops_days']"),
    ("variant,bucket,compute_pflops_days,loss\nmoba,0k,-1,2\n", "must be positive"),
    ("variant,bucket,compute_pflops_days,loss\nmoba,0k,x,2\n", ":2: compute_pflops_days and loss must be numbers"),
    ("variant,bucket,compute_pflops_days,loss\nmoba,0k,1,2\n", "at least two distinct compute values"),
])
def test_bad_tables_fail_clearly(tmp_path, capsys, content, text):
    (tmp_path / "t.csv").write_text(content)
    assert fit_scaling.main([str(tmp_path / "t.csv"), "--out", str(tmp_path / "o")]) == 2
    assert text in capsys.readouterr().err
