"""Factor attention maps: attribution, Eq. 4 averaging, template space, regions, sanity check."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.interpret.maps import (
    METHODS,
    AttributionError,
    FoldTask,
    attribution,
    count_hooked_relus,
    factor_attention_map,
    localisation_scores,
    plot_fam,
    rank_regions,
    to_template_space,
)
from dfrn.interpret.sanity import DFRN_CASCADE, cascading_randomization, plot_sanity, ssim3d
from dfrn.models.network import DFRN


@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------
# Guided backprop: parity with an independent implementation, hooks, other methods
# --------------------------------------------------------------------------------------


class _GuidedReluFn(torch.autograd.Function):
    """ReLU whose backward is R_l = (f_l > 0)·(R_{l+1} > 0)·R_{l+1}."""

    @staticmethod
    def forward(ctx, f: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(f)
        return f.clamp(min=0)

    @staticmethod
    def backward(ctx, r: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (f,) = ctx.saved_tensors
        return (f > 0).to(r.dtype) * (r > 0).to(r.dtype) * r


class _GuidedRelu(nn.Module):
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return _GuidedReluFn.apply(f)


def _manual_guided_backprop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    guided = copy.deepcopy(model).eval()
    for mod in list(guided.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(mod, child_name, _GuidedRelu())
    assert not any(isinstance(m, nn.ReLU) for m in guided.modules())
    inp = x.clone().requires_grad_(True)
    guided(inp).sum().backward()
    return inp.grad


@pytest.fixture(scope="module")
def dfrn64() -> dict[str, object]:
    torch.manual_seed(0)
    model = DFRN().double().eval()
    x = torch.randn(1, 1, 8, 9, 8, dtype=torch.float64)
    return {"model": model, "x": x, "gbp": attribution(model, x, "guided_backprop")}


def test_guided_backprop_matches_independent_guided_relu(dfrn64) -> None:
    model, x, ours = dfrn64["model"], dfrn64["x"], dfrn64["gbp"]
    manual = _manual_guided_backprop(model, x)
    assert ours.shape == x.shape
    assert manual.abs().max() > 0
    torch.testing.assert_close(ours, manual, rtol=1e-9, atol=1e-12)


def test_guided_backprop_differs_from_plain_gradient(dfrn64) -> None:
    model, x, gbp = dfrn64["model"], dfrn64["x"], dfrn64["gbp"]
    grad = attribution(model, x, "gradient")
    plain = x.clone().requires_grad_(True)
    model(plain).sum().backward()
    torch.testing.assert_close(grad, plain.grad, rtol=1e-9, atol=1e-12)
    rel = (gbp - grad).norm() / grad.norm()
    assert rel > 0.5


def test_hooked_relus_counted_and_fired(dfrn64) -> None:
    model, x = dfrn64["model"], dfrn64["x"]
    assert count_hooked_relus(model) == 9  # stem + 2 per residual block
    assert count_hooked_relus(model, x) == 9  # hooks that actually fired in a backward pass


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.relu(self.conv(x)) - 0.1)  # second ReLU is not a module
        return h.mean((1, 2, 3, 4))


def test_unhooked_relu_is_an_error_not_a_silent_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 5, 5, 5)
    with pytest.raises(AttributionError, match="1 of the model's 2 ReLU"):
        attribution(_FunctionalRelu(), x, "guided_backprop")
    with pytest.raises(AttributionError):
        count_hooked_relus(_FunctionalRelu(), x)


class _Quadratic(nn.Module):
    """f(x) = ½ Σ w·x² per subject; its input gradient is w·x."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w * x[:, 0] ** 2).sum((1, 2, 3))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "guided_backprop"])
def test_other_methods_on_a_known_gradient(method: str) -> None:
    torch.manual_seed(1)
    model = _Quadratic(np.random.default_rng(0).normal(size=(3, 4, 5)))
    model.train()
    x = torch.randn(2, 1, 3, 4, 5)
    a = attribution(model, x, method, n_steps=16, nt_samples=4)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert model.training  # eval during attribution, mode restored
    exact = model.w.detach() * x[:, 0]  # the input gradient
    if method == "gradient":
        torch.testing.assert_close(a[:, 0], exact)
    elif method == "integrated_gradients":  # x · ∫ w·(αx) dα = ½ w·x²
        torch.testing.assert_close(a[:, 0], 0.5 * exact * x[:, 0], rtol=1e-4, atol=1e-5)
    else:  # smoothgrad: same seed, same map, whatever the batch
        assert not torch.allclose(a[:, 0], exact)
        again = attribution(model, x[1:], method, nt_samples=4, seed=[1])
        torch.testing.assert_close(a[1:], again)


def test_guided_backprop_without_relus_is_rejected() -> None:
    model = _Quadratic(np.ones((3, 4, 5)))
    with pytest.raises(AttributionError, match="hooked 0"):
        attribution(model, torch.randn(1, 1, 3, 4, 5), "guided_backprop")


def test_bad_method_and_shape_are_input_errors() -> None:
    model = _Quadratic(np.ones((3, 4, 5)))
    with pytest.raises(DfrnInputError, match="unknown attribution method"):
        attribution(model, torch.randn(1, 1, 3, 4, 5), "lrp")
    with pytest.raises(DfrnInputError, match="N, C, D, H, W"):
        attribution(model, torch.randn(3, 4, 5), "gradient")


# --------------------------------------------------------------------------------------
# Eq. 4: averaging over subjects, folds and repeats
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Template space
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Regions and localisation
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Planted cohort: the whole chain finds the planted region
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Model-randomisation sanity check on a DFRN with a fitted read-out
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_dfrn() -> tuple[nn.Module, torch.Tensor]:
    """A DFRN whose read-out is fitted (ridge, closed form) to a planted signal.

    Full training is too slow for a unit test on a shared CPU; a fitted ``fc`` makes the
    trained model differ from a randomised one where the cascade starts.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 32
    x = torch.randn(n, 1, 16, 16, 16, generator=g)
    y = torch.randn(n, generator=g)
    x[:, 0, 9:15, 2:8, 9:15] += y[:, None, None, None]
    model = DFRN().eval()
    feats: list[torch.Tensor] = []
    hook = model.avgpool.register_forward_hook(lambda m, i, o: feats.append(o.flatten(1)))
    with torch.no_grad():
        model(x)
    hook.remove()
    f = feats[0].double()
    mu, sd = f.mean(0), f.std(0) + 1e-8
    z = (f - mu) / sd
    wz = torch.linalg.solve(
        z.T @ z + n * torch.eye(z.shape[1], dtype=z.dtype), z.T @ (y - y.mean()).double()
    )
    with torch.no_grad():
        model.fc.weight.copy_((wz / sd)[None].float())
        model.fc.bias.fill_(float(y.mean() - (mu * wz / sd).sum()))
        pred = model(x)
    assert np.corrcoef(pred.numpy(), y.numpy())[0, 1] > 0.5
    return model, x[:1]


def test_cascading_randomization_gradient_fails_less_than_guided_backprop(
    fitted_dfrn, tmp_path
) -> None:
    model, x = fitted_dfrn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    df = cascading_randomization(model, x, ["gradient", "guided_backprop"], seed=0)
    for k, v in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(v, before[k])
    steps = ["trained"] + [s for s, _ in DFRN_CASCADE]
    assert list(df.columns) == ["method", "step", "spearman", "ssim"]
    assert df["step"].tolist() == steps * 2
    by = df.set_index(["method", "step"])
    assert by.loc[("gradient", "trained"), "spearman"] == 1.0
    # the plain gradient depends on the learned read-out; guided backprop barely does
    assert by.loc[("gradient", "fc"), "spearman"] < 0.7
    assert by.loc[("guided_backprop", "fc"), "spearman"] > 0.8
    assert (
        by.loc[("gradient", "fc"), "spearman"] < by.loc[("guided_backprop", "fc"), "spearman"] - 0.2
    )
    assert by.loc[("gradient", "conv1"), "spearman"] < 0.9
    assert df["ssim"].between(-1, 1).all()
    out = plot_sanity(df, tmp_path / "sanity.png")
    assert out.exists() and out.stat().st_size > 1000


def test_ssim3d_identity_and_contrast() -> None:
    a = np.random.default_rng(0).random((14, 14, 14))
    assert ssim3d(a, a) == pytest.approx(1.0)
    assert ssim3d(a, 1 - a) < 0
    with pytest.raises(DfrnInputError):
        ssim3d(a, a[:-1])
