"""Factor attention maps: Eq. 4 averaging, template space (affine round trip), localisation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.interpret.maps import (
    FoldTask,
    factor_attention_map,
    localisation_scores,
    to_template_space,
)


class _Quadratic(nn.Module):
    """f(x) = ½ Σ w·x² per subject; its input gradient is w·x."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w * x[:, 0] ** 2).sum((1, 2, 3))


def test_eq4_out_of_fold_and_all_models_averaging() -> None:
    rng = np.random.default_rng(3)
    shape = (3, 4, 5)
    vols = rng.normal(size=(8, *shape)).astype(np.float32)  # subject 7 is never tested
    test_sets = [[0, 1, 2], [3, 4, 5, 6], [0, 3, 5], [1, 2, 4]]  # 2 repeats × 2 folds
    ws = [rng.normal(size=shape).astype(np.float32) for _ in test_sets]  # mixed signs
    tasks = [
        FoldTask(model=(lambda w=w: _Quadratic(w)), test_indices=t, repeat=k // 2, fold=k % 2)
        for k, (w, t) in enumerate(zip(ws, test_sets, strict=True))
    ]
    subjects = range(7)

    def expected(models_of: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
        per_subject = [np.mean([ws[m] * vols[i] for m in models_of[i]], axis=0) for i in subjects]
        per_subject_abs = [
            np.mean([np.abs(ws[m] * vols[i]) for m in models_of[i]], axis=0) for i in subjects
        ]
        return np.mean(per_subject, axis=0), np.mean(per_subject_abs, axis=0)

    oof_models = {i: [m for m, t in enumerate(test_sets) if i in t] for i in subjects}
    assert oof_models[6] == [1]  # subject 6 has one model, the others two: equal weight anyway
    got = factor_attention_map(tasks, vols, "gradient", batch_size=2)
    signed, absolute = expected(oof_models)
    np.testing.assert_allclose(got.signed, signed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.absolute, absolute, rtol=1e-5, atol=1e-6)
    assert (got.n_subjects, got.n_maps, got.mode) == (7, 13, "oof")
    assert not np.allclose(np.abs(got.signed), got.absolute)  # mean |a| ≠ |mean a|

    # "all": every model's map for every (tested) subject; volumes given as a callable
    everyone = {i: list(range(len(test_sets))) for i in subjects}
    got_all = factor_attention_map(
        [(t.model, t.test_indices) for t in tasks],
        lambda i: vols[i],
        "gradient",
        mode="all",
        batch_size=3,
    )
    signed, absolute = expected(everyone)
    np.testing.assert_allclose(got_all.signed, signed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_all.absolute, absolute, rtol=1e-5, atol=1e-6)
    assert got_all.n_maps == 7 * 4


def test_eq4_rejects_out_of_range_subjects_and_bad_mode() -> None:
    vols = np.zeros((3, 2, 2, 2), np.float32)
    model = _Quadratic(np.ones((2, 2, 2)))
    with pytest.raises(DfrnInputError, match="test subject indices"):
        factor_attention_map([(model, [0, 3])], vols, "gradient")
    with pytest.raises(DfrnInputError, match="mode"):
        factor_attention_map([(model, [0])], vols, "gradient", mode="mean")


def _reference(shape: tuple[int, int, int]) -> nib.Nifti1Image:
    affine = np.array([[-1.0, 0, 0, 90.0], [0, 1.0, 0, -126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
    img.set_qform(affine, code=4)
    img.set_sform(affine, code=4)
    return img


def test_template_space_keeps_input_grid_through_save_and_reload(tmp_path) -> None:
    ref = _reference((15, 16, 13))
    ref_path = tmp_path / "t1.nii.gz"
    nib.save(ref, ref_path)
    small = np.random.default_rng(0).random((8, 8, 7)).astype(np.float32)
    img = to_template_space(small, ref_path, downsample=2)
    nib.save(img, tmp_path / "fam.nii.gz")
    back = nib.load(tmp_path / "fam.nii.gz")
    assert back.shape == ref.shape
    np.testing.assert_allclose(back.affine, ref.affine)
    assert not np.allclose(back.affine, np.eye(4))
    assert int(back.header["sform_code"]) == 4
    # order 0 repeats each block onto the input voxels it covers, padding cropped
    blocks = to_template_space(small, ref, 2, order=0).get_fdata()
    np.testing.assert_array_equal(blocks[8:10, 2:4, 12], np.full((2, 2), small[4, 1, 6]))
    # factor 1 is the identity
    same = np.random.default_rng(1).random(ref.shape)
    np.testing.assert_allclose(to_template_space(same, ref, 1).get_fdata(), same, rtol=1e-6)
    with pytest.raises(DfrnInputError, match="expected \\(8, 8, 7\\)"):
        to_template_space(small[:, :, :6], ref, 2)


def test_template_space_interpolates_at_block_centres() -> None:
    from nilearn.image import resample_to_img

    ref = _reference((12, 9, 10))
    f = 3
    small = np.random.default_rng(2).random((4, 3, 4)).astype(np.float32)
    up = to_template_space(small, ref, f).get_fdata()
    # the block-averaged grid's affine: axes ×f, origin at the first block's centre
    small_aff = ref.affine.copy()
    small_aff[:3, 3] = ref.affine[:3, :3] @ np.full(3, (f - 1) / 2) + ref.affine[:3, 3]
    small_aff[:3, :3] *= f
    want = resample_to_img(
        nib.Nifti1Image(small, small_aff), ref, interpolation="linear", force_resample=True
    ).get_fdata()
    inner = (slice(2, 10), slice(2, 7), slice(2, 10))  # strictly inside the outer block centres
    np.testing.assert_allclose(up[inner], want[inner], atol=1e-5)
    # the downsampled voxel is the mean of its block for a map linear in the voxel index
    ramp = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 3, 4), np.float32)
    up = to_template_space(ramp, ref, f).get_fdata()
    np.testing.assert_allclose(up[3:9].reshape(2, 3, 9, 10).mean(axis=1)[:, 0, 0], [1.0, 2.0])


def test_localisation_scores() -> None:
    truth = np.zeros((10, 10, 10), bool)
    truth[2:5, 2:5, 2:5] = True
    noise = np.random.default_rng(0).random(truth.shape)
    s = localisation_scores(np.where(truth, -5.0, 0.1) * (1 + 0.1 * noise), truth)  # |·| used
    assert s["roc_auc"] == 1.0 and s["top_fraction_in_truth"] == 1.0
    assert s["n_truth"] == 27 and s["chance_top_fraction"] == pytest.approx(0.027)
    brain = np.ones_like(truth)
    brain[9] = False
    flipped = localisation_scores(np.where(truth, 0.0, 1.0), truth, brain)
    assert flipped["roc_auc"] == 0.0 and flipped["n_voxels"] == 900
    with pytest.raises(DfrnInputError, match="truth mask covers 0"):
        localisation_scores(noise, np.zeros_like(truth))
