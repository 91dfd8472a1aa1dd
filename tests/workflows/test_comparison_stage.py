"""cv/comparison.tsv from a results folder's prediction files: which pairs, which factors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.config import config_from_dict
from dfrn.workflows.comparison import run_comparison_stage
from dfrn.workflows.results import ResultsFolder


def _predictions(factors: list[str], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for factor in factors:
        y = rng.standard_normal(30)
        pred = 0.6 * y + 0.8 * rng.standard_normal(30)
        rows += [{"participant_id": f"sub-{i:02d}", "repeat": 0, "fold": i % 5, "factor": factor,
                  "y_true": y[i], "y_pred": pred[i]} for i in range(30)]
    return pd.DataFrame(rows)


def test_a_factor_one_model_lacks_gets_no_row_and_one_log_line(tmp_path: Path) -> None:
    folder = ResultsFolder(tmp_path)
    folder.cv.mkdir(parents=True)
    folder.baseline.mkdir()
    _predictions(["anhedonia", "sleep"], 0).to_csv(folder.predictions, sep="\t", index=False)
    ridge = _predictions(["anhedonia", "sleep"], 0)
    ridge = ridge[ridge.factor == "anhedonia"].assign(y_pred=lambda d: d.y_pred[::-1].values)
    ridge.to_csv(folder.baseline_predictions, sep="\t", index=False)
    cfg = config_from_dict({"cohort": {"table": "cohort.tsv", "targets": ["anhedonia", "sleep"]},
                            "cv": {"seed": 4}, "compare": {"bootstrap": 200}}, tmp_path)
    logs: list[str] = []
    table = run_comparison_stage(tmp_path, cfg, logs.append)
    assert table is not None and table[["factor", "model_a", "model_b"]].values.tolist() == [
        ["anhedonia", "dfrn", "ridge"]]
    assert "comparison: no dfrn vs ridge row for sleep: the ROI ridge has no predictions of it" \
        in logs
    back = pd.read_csv(folder.comparison, sep="\t")
    pd.testing.assert_frame_equal(back, table, check_dtype=False, atol=1e-12)
    assert any(line.startswith("  dfrn vs ridge, anhedonia: ") for line in logs)
    # the network alone: nothing to compare, and no stale table of the earlier pair left
    folder.baseline_predictions.unlink()
    assert run_comparison_stage(tmp_path, cfg, logs.append) is None
    assert not folder.comparison.exists()
