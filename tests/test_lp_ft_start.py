"""`tools lp-ft-start` (the experiment behind the large-head learning rate) on a tiny corpus folder."""
from __future__ import annotations

import numpy as np
import pytest

from autodl_core.errors import UserInputError
from tools.lp_ft_start import markdown, parse_rates, run_dataset

pretrained = pytest.importorskip("pretrained")


def test_rates_are_numbers_or_the_solvers_choice():
    assert parse_rates("0.016, 0.005,solver") == ["0.016", "0.005", "solver"]
    for bad in ("", "fast", "0.01,-1"):
        with pytest.raises(UserInputError):
            parse_rates(bad)


@pytest.mark.skipif(not pretrained.weights_available("mobilenetv2_100"), reason="MobileNetV2 weights not installed")
def test_a_curve_per_rate_with_the_solvers_choice_from_the_head(tmp_path):
    rng = np.random.default_rng(0)
    n = 160
    y = np.eye(2, dtype=np.float32)[np.arange(n) % 2]
    x = rng.integers(0, 120, (n, 24, 24, 3), dtype=np.uint8)
    x[y[:, 1] == 1, :12] += 120  # the upper half brighter for one class
    np.savez_compressed(tmp_path / "data.npz", x=x, y=y, is_test=np.arange(n) >= 140)
    rows = run_dataset(str(tmp_path), 32, ["0.016", "solver"], n_fit=96, n_val=40, checkpoints=(2, 4))
    assert [r["rate"] for r in rows] == ["0.016", "solver"]
    for row in rows:
        assert list(row["val_nauc_by_step"]) == ["2", "4"]
        assert all(-1.0 <= v <= 1.0 for v in row["val_nauc_by_step"].values())
        assert row["head_row_norm"] > 0 and -1.0 <= row["probe_val_nauc"] <= 1.0
    solver_lr = rows[1]["lr"]
    assert solver_lr == 0.016 or solver_lr == pytest.approx(0.0048)
    assert "(solver)" in markdown(rows)
