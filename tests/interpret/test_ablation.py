"""Region ablation: parity with captum and with an explicit loop, a network that ignores a
region, the training-mean baseline, the atlas on the input grid, and its one-line errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.interpret.ablation import (
    RegionGrid,
    ablation_changes,
    region_importance,
    regions_on_grid,
    train_mean_baseline,
)

SHAPE = (6, 6, 6)


def _grid() -> RegionGrid:
    labels = np.zeros(SHAPE, dtype=np.int64)
    labels[:3, :3, :3] = 1  # region A
    labels[3:, 3:, 3:] = 2  # region B
    labels[:3, 3:, :] = 3  # region C
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["A", "B", "C"],
                          "n_voxels": [27, 27, 54]})
    return RegionGrid(labels, table)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 6 * 6 * 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1)).squeeze(1)


class _ReadsOnly(nn.Module):
    """Output = weighted sum of the input inside ``mask``: blind to everything else."""

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("w", torch.as_tensor(mask, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] * self.w).flatten(1).sum(1)


def _inputs(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 1, *SHAPE))
                            .astype(np.float32))


def test_zero_baseline_equals_captum_and_an_explicit_loop() -> None:
    from captum.attr import FeatureAblation

    grid, model, x = _grid(), _Small().eval(), _inputs()
    got = ablation_changes(model, x, grid, 0.0, regions_per_pass=2)
    mask = torch.as_tensor(grid.labels)[None, None].expand_as(x)
    with torch.no_grad():
        direct = FeatureAblation(lambda t: model(t)).attribute(x, baselines=0.0,
                                                               feature_mask=mask)
    for k, index in enumerate(grid.table["index"]):
        voxel = tuple(np.argwhere(grid.labels == index)[0])
        np.testing.assert_allclose(got[k], direct[:, 0][(slice(None), *voxel)].numpy(),
                                   atol=1e-6)
        ablated = x.clone()
        ablated[:, :, torch.as_tensor(grid.labels == index)] = 0.0
        with torch.no_grad():
            expected = (model(x) - model(ablated)).numpy()
        np.testing.assert_allclose(got[k], expected, atol=1e-5)


def test_a_region_the_network_ignores_has_delta_r_zero() -> None:
    grid = _grid()
    model = _ReadsOnly(grid.labels == 2)  # reads B only
    x = _inputs(n=40, seed=2)
    with torch.no_grad():
        y_pred = model(x).numpy()
    y = y_pred + np.random.default_rng(3).normal(scale=2.0, size=40)
    changes = ablation_changes(model, x, grid, 0.0)
    records = pd.DataFrame({"participant_id": [f"s{i:02d}" for i in range(40)], "repeat": 0,
                            "factor": "f", "y_true": y, "y_pred": y_pred})
    for k, index in enumerate(grid.table["index"]):
        records[int(index)] = y_pred - changes[k]
    table = region_importance(records, grid.table, n_boot=200, seed=0).set_index("region")
    assert abs(table.at["A", "delta_r"]) < 1e-6 and abs(table.at["C", "delta_r"]) < 1e-6
    assert table.at["A", "mean_abs_change"] < 1e-6
    assert table.at["B", "delta_r"] > 0.1 and table.at["B", "rank"] == 1
    assert table.at["B", "ci_low"] > 0 and table.at["B", "ci_low"] < table.at["B", "delta_r"]
    assert table.at["A", "ci_low"] == pytest.approx(0, abs=1e-6)


def test_the_training_mean_baseline_never_sees_test_subjects() -> None:
    vols = [np.full(SHAPE, float(i), np.float32) for i in range(6)]
    train, test = [0, 1, 2, 3], [4, 5]
    base = train_mean_baseline(vols.__getitem__, train)
    np.testing.assert_allclose(base, 1.5)
    vols[4] = vols[4] + 100.0  # a test subject's image changes
    np.testing.assert_array_equal(train_mean_baseline(vols.__getitem__, train), base)
    # and it is what the ablated region is set to
    grid, model = _grid(), _ReadsOnly(_grid().labels == 1)
    x = torch.from_numpy(np.stack([vols[i] for i in test])[:, None])
    changes = ablation_changes(model, x, grid, base)
    np.testing.assert_allclose(changes[0], [(x[j, 0][:3, :3, :3].sum() - 1.5 * 27).item()
                                            for j in range(2)], rtol=1e-5)


def test_regions_on_the_input_grid_by_block_majority() -> None:
    labels = np.zeros((8, 8, 8), dtype=np.int64)
    labels[:4, :4, :4] = 1  # 64 voxels: 8 blocks of 2³
    labels[4:6, 4:6, 4:5] = 2  # half a block: loses to the background
    labels[6:, 6:, 6:] = 3  # one whole block
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["big", "sliver", "one"]})
    grid = regions_on_grid(labels, table, 2, (4, 4, 4), min_voxels=2)
    assert grid.table["name"].tolist() == ["big"] and grid.table["n_voxels"].tolist() == [8]
    assert grid.skipped == ["sliver", "one"]
    assert set(np.unique(grid.labels)) == {0, 1}
    with pytest.raises(DfrnInputError, match="no region keeps 9 voxels on the network's input "
                                              "grid \\(downsample 2\\)"):
        regions_on_grid(labels, table, 2, (4, 4, 4), min_voxels=9)
    with pytest.raises(DfrnInputError, match="not on the images' grid"):
        regions_on_grid(labels, table, 2, (5, 4, 4))


def _records(n: int, n_repeats: int = 1, n_regions: int = 1, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold records: ``n`` subjects, noisy predictions, noisier ablated ones."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    frames = []
    for r in range(n_repeats):
        pred = y + rng.normal(size=n)
        rec = pd.DataFrame({"participant_id": [f"s{i:03d}" for i in range(n)], "repeat": r,
                            "factor": "f", "y_true": y, "y_pred": pred})
        for k in range(1, n_regions + 1):
            rec[k] = pred + k * rng.normal(size=n)
        frames.append(rec)
    return pd.concat(frames, ignore_index=True)


def _table(n_regions: int) -> pd.DataFrame:
    return pd.DataFrame({"index": list(range(1, n_regions + 1)),
                         "name": [f"R{k}" for k in range(1, n_regions + 1)],
                         "n_voxels": 5})


def test_bootstrap_ci_in_chunks_equals_one_draw_of_every_resample() -> None:
    """Issue 26.5: the chunked CI is the one of a single (n_boot, n) draw (as before)."""
    from dfrn.interpret.ablation import _bootstrap_ci, _pearson_rows

    records, n_boot, seed = _records(30, n_repeats=2, n_regions=3), 300, 4
    wide = [g.set_index("participant_id").sort_index() for _, g in records.groupby("repeat")]
    y = np.stack([w["y_true"].to_numpy() for w in wide])
    intact = np.stack([w["y_pred"].to_numpy() for w in wide])
    ablated = np.stack([w[[1, 2, 3]].to_numpy().T for w in wide], axis=1)  # (K, R, n)
    # the unchunked computation (dfrn before issue 26)
    boots = np.random.default_rng(seed).integers(0, 30, size=(n_boot, 30))
    r_intact = _pearson_rows(y[:, boots], intact[:, boots])
    d = np.stack([(r_intact - _pearson_rows(y[:, boots], ablated[k][:, boots])).mean(axis=0)
                  for k in range(3)])
    expected = np.nanpercentile(d, [2.5, 97.5], axis=1).T
    for chunk in (60, 37 * 60, 1 << 19):  # 1 resample, 37 at a time, all at once
        got = _bootstrap_ci(y, intact, ablated, n_boot, np.random.default_rng(seed), chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    table = region_importance(records, _table(3), n_boot=n_boot, seed=seed).sort_values("index")
    np.testing.assert_allclose(table[["ci_low", "ci_high"]].to_numpy(), expected, rtol=1e-12)


def test_a_million_bootstrap_resamples_take_bounded_memory() -> None:
    """Issue 26.5: memory does not grow with n_boot × n (tracemalloc sees numpy's arrays)."""
    import tracemalloc

    n, n_boot = 30, 10**6
    tracemalloc.start()
    try:
        table = region_importance(_records(n), _table(1), n_boot=n_boot, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_draw = n_boot * n * 8  # the (n_boot, n) int64 index array alone: 229 MiB
    assert peak < one_draw / 4, f"peak {peak / 2**20:.0f} MiB"
    assert table.at[0, "ci_low"] < table.at[0, "delta_r"] < table.at[0, "ci_high"]


def test_a_typo_in_bootstrap_is_refused_at_config_time(tmp_path) -> None:
    """Issue 26.5: ``[attention] bootstrap = 1000000000`` is one line, before any work."""
    from dfrn.config import config_from_dict

    raw = {"cohort": {"table": str(tmp_path / "c.tsv"), "targets": ["a"]},
           "attention": {"bootstrap": 1_000_000_000}}
    with pytest.raises(DfrnInputError) as info:
        config_from_dict(raw, tmp_path)
    text = str(info.value)
    assert "\n" not in text and "[attention] bootstrap must be <= 100,000" in text, text
    assert "1,000,000,000" in text
