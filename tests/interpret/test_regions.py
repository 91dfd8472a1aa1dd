"""Region ranking of attention maps, and the planted region through the whole chain."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.interpret.maps import factor_attention_map, localisation_scores, to_template_space
from dfrn.interpret.regions import RANK_COLUMNS, rank_regions
from dfrn.plotting import plot_fam


def _reference(shape: tuple[int, int, int]) -> nib.Nifti1Image:
    affine = np.array([[-1.0, 0, 0, 90.0], [0, 1.0, 0, -126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
    img.set_qform(affine, code=4)
    img.set_sform(affine, code=4)
    return img


def _octant_atlas(shape: tuple[int, int, int], split: tuple[int, int, int]) -> np.ndarray:
    idx = np.indices(shape)
    octant = sum((idx[a] >= split[a]).astype(int) << (2 - a) for a in range(3))
    atlas = 1 + octant
    atlas[0] = 0  # a background slab
    return atlas.astype(np.int16)


def test_rank_regions_means_counts_and_resampling() -> None:
    ref = _reference((8, 8, 8))
    atlas = _octant_atlas((8, 8, 8), (4, 4, 4))
    data = np.zeros((8, 8, 8), np.float32)
    data[4:, :4, 4:] = -3.0  # octant 1 + 0b101 = 6: strong, negative (ranked by |·|)
    data[:4, 4:, :4] = 1.0  # octant 1 + 0b010 = 3
    data[0] = 100.0  # background: ignored
    labels = pd.DataFrame({"name": [f"box{k}" for k in range(1, 10)]}, index=range(1, 10))
    table = rank_regions(
        nib.Nifti1Image(data, ref.affine), nib.Nifti1Image(atlas, ref.affine), labels, "F1"
    )
    assert list(table.columns) == [
        "factor", "rank", "region", "label", "mean_attention", "n_voxels",
    ]  # fmt: skip
    assert tuple(table.columns) == RANK_COLUMNS
    assert len(table) == 8  # box9 has no voxel
    assert list(table["region"][:2]) == ["box6", "box3"]
    assert table["rank"].tolist() == list(range(1, 9))
    assert (table["factor"] == "F1").all()
    np.testing.assert_allclose(table["mean_attention"][:2], [3.0, 1.0])
    assert table.loc[table.region == "box3", "n_voxels"].item() == 3 * 4 * 4

    # a map on a finer grid (2×) is resampled onto the atlas grid
    fine_aff = ref.affine.copy()
    fine_aff[:3, :3] /= 2
    fine_aff[:3, 3] -= ref.affine[:3, :3] @ np.full(3, 0.25)
    fine = data.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    t2 = rank_regions(
        nib.Nifti1Image(fine, fine_aff), nib.Nifti1Image(atlas, ref.affine), {6: "a", 3: "b"}, "F1"
    )
    assert t2["region"].tolist() == ["a", "b"]
    assert t2["mean_attention"][0] == pytest.approx(3.0, rel=0.05)


class _RegionNet(nn.Module):
    """conv → ReLU → spatially weighted sum; sensitivity is 10× higher inside ``box``."""

    def __init__(self, shape: tuple[int, int, int], box: tuple[slice, ...], seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.relu = nn.ReLU()
        weight = torch.full(shape, 0.1)
        weight[box] = 1.0
        self.register_buffer("spatial", weight)
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.5, -0.5, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.relu(self.conv(x)) * self.spatial).sum((2, 3, 4))
        return self.head(z).squeeze(1)


def test_planted_region_ranks_first_through_the_whole_chain(tmp_path) -> None:
    ref = _reference((15, 16, 13))  # 1 mm input grid; training grid is ↓2: (8, 8, 7)
    small_shape = (8, 8, 7)
    box = (slice(4, 8), slice(0, 4), slice(4, 7))  # ↑ input [8:15, 0:8, 8:13]: octant 0b101
    rng = np.random.default_rng(0)
    vols = rng.normal(size=(10, *small_shape)).astype(np.float32)
    splits = [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9], [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    tasks = [(_RegionNet(small_shape, box, seed=s), t) for s, t in enumerate(splits)]
    fam = factor_attention_map(tasks, vols, "guided_backprop", batch_size=4)
    assert fam.n_maps == 20
    again = factor_attention_map(tasks, vols, "guided_backprop", batch_size=1)
    np.testing.assert_allclose(again.absolute, fam.absolute, rtol=1e-5, atol=1e-8)

    img = to_template_space(fam.absolute, ref, downsample=2)
    atlas = _octant_atlas(ref.shape, (8, 8, 8))
    labels = pd.DataFrame({"name": [f"region{k}" for k in range(1, 9)]}, index=range(1, 9))
    table = rank_regions(img, nib.Nifti1Image(atlas, ref.affine), labels, "F2")
    assert table["region"].iloc[0] == "region6"
    assert table["mean_attention"].iloc[0] > 3 * table["mean_attention"].iloc[1]

    truth = np.zeros(ref.shape, bool)
    truth[8:15, 0:8, 8:13] = True
    scores = localisation_scores(img.get_fdata(), truth)
    assert scores["roc_auc"] > 0.9
    assert scores["top_fraction_in_truth"] > 0.9

    template = nib.Nifti1Image(rng.random(ref.shape).astype(np.float32), ref.affine)
    out = plot_fam({"F2": img, "F3": to_template_space(fam.signed, ref, 2)}, template,
                   tmp_path / "figures" / "fig4_fam.png")  # fmt: skip
    assert out.exists() and out.stat().st_size > 1000


def test_rank_regions_brute_force_with_nonfinite_voxels_and_label_tables(tmp_path) -> None:
    rng = np.random.default_rng(7)
    ref = _reference((9, 10, 11))
    atlas = rng.integers(-1, 7, size=ref.shape).astype(np.float32)  # -1 is background too
    data = rng.normal(size=ref.shape)
    data[1, 2, 3] = np.nan
    data[4, 5, 6] = -np.inf
    data[atlas == 5] = np.nan  # region 5 has no finite voxel: not ranked
    names = {k: f"r{k}" for k in (0, 1, 2, 3, 5, 6, 42)}  # 0 is background, 4 unnamed
    nib.save(nib.Nifti1Image(data, ref.affine), tmp_path / "map.nii.gz")
    nib.save(nib.Nifti1Image(atlas, ref.affine), tmp_path / "atlas.nii.gz")
    table = rank_regions(tmp_path / "map.nii.gz", str(tmp_path / "atlas.nii.gz"), names, "F")
    finite = np.isfinite(data)
    expected = {
        k: (np.abs(data[(atlas == k) & finite]).mean(), int(((atlas == k) & finite).sum()))
        for k in (1, 2, 3, 6)
    }
    order = sorted(expected, key=lambda k: -expected[k][0])
    assert table["label"].tolist() == order
    assert table["region"].tolist() == [f"r{k}" for k in order]
    np.testing.assert_allclose(
        table["mean_attention"], [expected[k][0] for k in order], rtol=1e-12
    )
    assert table["n_voxels"].tolist() == [expected[k][1] for k in order]
    # the same labels as a Series, and as a table with an ``index`` column
    series = pd.Series(names)
    frame = pd.DataFrame({"index": list(names), "name": list(names.values())})
    for labels in (series, frame):
        other = rank_regions(
            nib.Nifti1Image(data, ref.affine), nib.Nifti1Image(atlas, ref.affine), labels, "F"
        )
        pd.testing.assert_frame_equal(other, table)


def test_rank_regions_input_errors(tmp_path) -> None:
    ref = _reference((4, 4, 4))
    atlas = nib.Nifti1Image(np.ones((4, 4, 4), np.float32) * 1.5, ref.affine)
    amap = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), ref.affine)
    with pytest.raises(DfrnInputError, match="integer labels"):
        rank_regions(amap, atlas, {1: "a"}, "F")
    with pytest.raises(DfrnInputError, match=r"missing.nii.gz does not exist"):
        rank_regions(tmp_path / "missing.nii.gz", atlas, {1: "a"}, "F")
    four_d = nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), ref.affine)
    with pytest.raises(DfrnInputError, match=r"attention map: .*shape \(4, 4, 4, 2\); a 3D"):
        rank_regions(four_d, atlas, {1: "a"}, "F")
    with pytest.raises(DfrnInputError, match="'name' column"):
        rank_regions(amap, nib.Nifti1Image(np.ones((4, 4, 4), np.int16), ref.affine),
                     pd.DataFrame({"label": ["a"]}), "F")  # fmt: skip


def test_an_atlas_in_another_space_is_refused_another_resolution_is_not(tmp_path) -> None:
    """Issue 26.9: a map is resampled onto an atlas at another resolution of its grid (the
    template's 1 mm atlas, maps at the cohort's 2 mm), never onto an atlas in another space."""
    affine = _reference((8, 8, 8)).affine  # the maps: 2 mm
    affine[:3, :3] *= 2.0
    data = np.zeros((8, 8, 8), np.float32)
    data[4:, :4, 4:] = 3.0
    amap = nib.Nifti1Image(data, affine)
    fine = affine.copy()  # the atlas: 1 mm, the same field of view
    fine[:3, :3] /= 2
    fine[:3, 3] -= affine[:3, :3] @ np.full(3, 0.25)
    atlas = _octant_atlas((16, 16, 16), (8, 8, 8))
    nib.save(nib.Nifti1Image(atlas, fine), tmp_path / "atlas_1mm.nii.gz")
    table = rank_regions(amap, tmp_path / "atlas_1mm.nii.gz", {6: "a", 3: "b"}, "F")
    assert table["region"].tolist() == ["a", "b"]  # b: only what trilinear blurs into it
    assert table["mean_attention"][0] > 10 * table["mean_attention"][1]
    for name, other in (("shifted", affine.copy()), ("flipped", affine @ np.diag([1, -1, 1, 1]))):
        if name == "shifted":
            other[:3, 3] += 2.0  # same voxels, one voxel off: another space
        nib.save(nib.Nifti1Image(atlas[::2, ::2, ::2], other), tmp_path / f"{name}.nii.gz")
        with pytest.raises(DfrnInputError) as info:
            rank_regions(amap, tmp_path / f"{name}.nii.gz", {6: "a", 3: "b"}, "F",
                         atlas_option="--atlas")
        text = str(info.value)
        assert "\n" not in text and text.startswith(
            f"atlas {tmp_path / f'{name}.nii.gz'} is not on the grid of the attention map"), text
        assert text.count("shape (8, 8, 8), 2×2×2 mm voxels") == 2 and "fix --atlas" in text
