"""The training recipe: joint heads, early-stopping rules, stratified split, augmentation,
AdamW and the cosine schedule. Each test plants what the option must (or must not) do."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dfrn.errors import DfrnInputError
from dfrn.models.augment import Augmenter
from dfrn.models.early_stopping import SMOOTHED_MARGIN, EarlyStopping
from dfrn.models.regressor import DFRNRegressor, masked_sse, stratified_holdout


def _vols(n: int, size: int = 16) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal((size,) * 3).astype(np.float32)
            for i in range(n)]


VOLS = _vols(12)


def test_joint_with_one_factor_equals_separate_training() -> None:
    y = np.linspace(-1, 1, 10)
    sep = DFRNRegressor(epochs=2, seed=3, val_fraction=0.2).fit(VOLS[:10], y)
    joint = DFRNRegressor(epochs=2, seed=3, val_fraction=0.2).fit(VOLS[:10], y[:, None])
    assert joint.model_.n_outputs == 1 and joint.predict(VOLS[10:]).shape == (2, 1)
    np.testing.assert_array_equal(sep.val_ids_, joint.val_ids_)
    np.testing.assert_allclose(joint.predict(VOLS[10:])[:, 0], sep.predict(VOLS[10:]), atol=1e-6)


def test_five_factors_give_five_columns_and_missing_values_are_masked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.standard_normal((10, 5))
    y[[1, 4, 7], 2] = np.nan  # factor 2 is missing for three subjects
    est = DFRNRegressor(epochs=2, seed=0, val_fraction=0.0).fit(VOLS[:10], y)
    pred = est.predict(VOLS[10:])
    assert pred.shape == (2, 5) and np.all(np.isfinite(pred))  # a NaN in the loss spreads
    assert est.y_mean_[2] == pytest.approx(np.nanmean(y[:, 2]))
    # one factor of a joint network is a one-output network that predicts exactly it
    est.save(tmp_path / "joint.pt")
    back = DFRNRegressor.load(tmp_path / "joint.pt")
    np.testing.assert_allclose(back.predict(VOLS[10:]), pred, rtol=1e-6)
    third = DFRNRegressor.load(tmp_path / "joint.pt", output=2)
    assert third.model_.n_outputs == 1
    np.testing.assert_allclose(third.predict(VOLS[10:]), pred[:, 2], rtol=1e-5, atol=1e-6)


def test_masked_sse_ignores_missing_targets_and_sends_them_no_gradient() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan")], [1.0, 1.0]])
    loss = masked_sse(pred, target)
    assert float(loss.detach()) == pytest.approx(1.0 + 4.0 + 9.0)
    loss.backward()
    assert float(pred.grad[0, 1]) == 0.0 and float(pred.grad[0, 0]) == pytest.approx(2.0)


def test_no_early_stopping_trains_exactly_epochs_on_every_subject() -> None:
    y = np.linspace(-1, 1, 10)
    est = DFRNRegressor(epochs=4, patience=1, val_fraction=0.3, early_stopping="none",
                        seed=0).fit(VOLS[:10], y)
    assert len(est.history_) == 4 and est.best_epoch_ == 3
    assert len(est.val_ids_) == 0 and est.history_["val_loss"].isna().all()


def _run(rule: EarlyStopping, losses: list[float]) -> tuple[int, int]:
    """(epochs trained, kept epoch) for a planted sequence of validation losses."""
    for epoch, v in enumerate(losses):
        if rule.update(v).stop:
            return epoch + 1, rule.best_epoch_
    return len(losses), rule.best_epoch_


def test_a_single_lucky_epoch_stops_raw_early_stopping_but_not_the_smoothed_rule() -> None:
    losses = [1.0 - 0.02 * t for t in range(30)]  # steady improvement ...
    losses[2] = 0.3  # ... and one lucky spike early on
    trained, kept = _run(EarlyStopping("val", patience=4), losses)
    assert (trained, kept) == (7, 2)  # raw: stopped by the spike, which it keeps
    trained, kept = _run(EarlyStopping("smoothed", patience=4, min_epochs=10, smoothing=0.8),
                         losses)
    assert trained == 30 and kept == 29
    jump = [1.0 - 0.02 * t for t in range(30)]
    jump[12] *= 35  # a 35-fold jump of one epoch, as measured on a small validation split
    trained, kept = _run(EarlyStopping("smoothed", patience=4, min_epochs=10), jump)
    assert trained == 30 and kept == 29
    # the smoothed rule still stops on a real plateau, after min_epochs
    flat = [1.0 - 0.05 * t for t in range(8)] + [0.65] * 30
    trained, _ = _run(EarlyStopping("smoothed", patience=4, min_epochs=10), flat)
    assert 10 <= trained < 38
    # an untrained network's low first loss is not kept: epochs before min_epochs are not
    # candidates (measured: raw stopping kept epoch 0 of a subtle-atrophy cohort)
    early_low = [0.8] + [1.5 - 0.02 * t for t in range(1, 30)]
    assert _run(EarlyStopping("val", patience=10), early_low) == (11, 0)
    trained, kept = _run(EarlyStopping("smoothed", patience=10, min_epochs=10), early_low)
    assert kept >= 9 and trained == 30


def test_a_diverged_epoch_is_never_kept() -> None:
    for mode in ("val", "smoothed"):
        rule = EarlyStopping(mode, patience=2, min_epochs=1)
        steps = [rule.update(v) for v in (1.0, float("nan"), float("nan"))]
        assert [s.improved for s in steps] == [True, False, False] and steps[-1].stop
        assert rule.best_epoch_ == 0


def test_history_keeps_raw_and_smoothed_validation_loss() -> None:
    est = DFRNRegressor(epochs=3, val_fraction=0.3, early_stopping="smoothed", min_epochs=1,
                        smoothing=0.5, seed=0).fit(VOLS[:10], np.linspace(-1, 1, 10))
    h = est.history_
    v = h.val_loss.to_numpy()
    medians = [v[0], np.median(v[:2]), np.median(v[:3])]
    expect = [medians[0]]
    for m in medians[1:]:
        expect.append(0.5 * expect[-1] + 0.5 * m)
    np.testing.assert_allclose(h.val_loss_smoothed, expect, rtol=1e-9)
    assert est.best_epoch_ in _smoothed_best_epochs(expect)


def _smoothed_best_epochs(losses: list[float], tol: float = 1e-9) -> set[int]:
    """The epoch(s) the smoothed rule may keep: a new best must beat the old by the margin.

    Where a loss lies within ``tol`` of the threshold (floating point differs between
    hosts), both decisions are followed, so the answer holds on any machine.
    """
    paths = {(math.inf, -1)}
    for epoch, loss in enumerate(losses):
        nxt = set()
        for best, kept in paths:
            threshold = best - (SMOOTHED_MARGIN * abs(best) if best < math.inf else 0.0)
            if loss < threshold - tol * abs(loss):
                nxt.add((loss, epoch))
            elif loss >= threshold + tol * abs(loss):
                nxt.add((best, kept))
            else:
                nxt |= {(loss, epoch), (best, kept)}
        paths = nxt
    return {kept for _, kept in paths}


def test_the_modelled_rule_counts_the_margin() -> None:
    """A gain under 0.1% is no new best: the case that failed on another host."""
    assert _smoothed_best_epochs([1.4338, 1.4318, 1.4307]) == {1}  # 1.4307 > 1.4318 × 0.999
    assert _smoothed_best_epochs([1.0, 0.9, 0.5]) == {2}
    losses = [1.0, 0.999]  # exactly on the margin: either answer is right on some host
    assert _smoothed_best_epochs(losses) == {0, 1}
    stopper = EarlyStopping("smoothed", patience=5, min_epochs=1, smoothing=0.0)
    # smoothing 0: the watched loss is the 3-epoch median 1.4338, 1.4328, 1.4318
    watched = [stopper.update(v).watched for v in [1.4338, 1.4318, 1.4307]]
    assert stopper.best_epoch_ == 2 and _smoothed_best_epochs(watched) == {2}


def test_stratified_validation_split_spans_the_target() -> None:
    rng = np.random.default_rng(0)
    y = rng.permutation(100).astype(float)
    val = stratified_holdout(y, 10, rng)
    assert sorted((y[val] // 10).astype(int).tolist()) == list(range(10))  # one per decile
    est = DFRNRegressor(epochs=1, val_fraction=0.2, seed=1, early_stopping="val").fit(
        _vols(20, 8), np.arange(20.0))
    assert sorted(est.val_ids_ // 5) == [0, 1, 2, 3]  # one per quartile (random: 13% chance)


def test_a_random_split_is_the_draw_of_earlier_versions() -> None:
    est = DFRNRegressor(epochs=1, val_fraction=0.3, val_split="random", seed=4,
                        early_stopping="val").fit(
        VOLS[:10], np.arange(10.0))
    np.testing.assert_array_equal(est.val_ids_,
                                  np.sort(np.random.default_rng(4).permutation(10)[:3]))


def _blob() -> torch.Tensor:
    x = torch.zeros(1, 1, 24, 24, 24)
    x[0, 0, 3:9, 9:15, 9:15] = 1.0  # a lateralised effect: first axis, low side
    return x


def test_augmentation_is_seeded_and_never_flips_unless_asked() -> None:
    aug = Augmenter("light", seed=7)
    a, b = aug(_blob(), epoch=0, step=0), Augmenter("light", seed=7)(_blob(), 0, 0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a rerun draws the same
    assert not torch.equal(a, aug(_blob(), 0, 1)) and not torch.equal(a, _blob())
    axis = torch.arange(24.0)[:, None, None]

    def side(x: torch.Tensor) -> float:  # centre of mass along the first axis
        return float((x[0, 0] * axis).sum() / x[0, 0].sum())

    assert all(side(aug(_blob(), 0, s)) < 10 for s in range(20))
    coarse = Augmenter("light", seed=7, voxel_mm=8.0).transform.transforms[0]
    assert coarse.translation == (-0.25, 0.25) * 3  # 2 mm at 8 mm voxels: a quarter voxel
    flips = Augmenter("light", seed=7, flip=True)
    assert any(side(flips(_blob(), 0, s)) > 14 for s in range(20))  # the check can fail


def test_augmented_training_is_reproducible_and_absent_at_prediction() -> None:
    y = np.linspace(-1, 1, 10)
    kw = dict(epochs=2, seed=2, val_fraction=0.0, augment="light")
    a = DFRNRegressor(**kw).fit(VOLS[:10], y)
    b = DFRNRegressor(**kw).fit(VOLS[:10], y)
    plain = DFRNRegressor(**{**kw, "augment": "none"}).fit(VOLS[:10], y)
    np.testing.assert_array_equal(a.predict(VOLS[10:]), b.predict(VOLS[10:]))
    assert not np.allclose(a.predict(VOLS[10:]), plain.predict(VOLS[10:]))  # it trained on it
    with torch.no_grad():
        x = torch.from_numpy(np.stack(VOLS[10:]))[:, None]
        direct = a.model_(x).numpy() * a.y_std_ + a.y_mean_
    np.testing.assert_allclose(a.predict(VOLS[10:]), direct, rtol=1e-6)
    a.augment = "none"
    np.testing.assert_array_equal(a.predict(VOLS[10:]), b.predict(VOLS[10:]))


def test_weight_decay_uses_adamw_and_cosine_anneals_the_rate() -> None:
    est = DFRNRegressor(epochs=4, val_fraction=0.0, weight_decay=0.01, lr_schedule="cosine",
                        seed=0).fit(VOLS[:6], np.arange(6.0))
    expect = [0.5e-3 * (1 + np.cos(np.pi * e / 4)) for e in range(4)]
    np.testing.assert_allclose(est.history_["lr"], expect, rtol=1e-9)
    opt, _ = est._optimizer()
    assert isinstance(opt, torch.optim.AdamW)
    est.weight_decay = 0.0
    assert type(est._optimizer()[0]) is torch.optim.Adam


@pytest.mark.parametrize(
    "section,values,message",
    [
        ("model", {"heads": "joint"}, r"heads = 'joint' .* 1 target"),
        ("final", {"mode": "refit"}, r"\[final\] mode = 'refit' .* use mode = 'ensemble'"),
        ("model", {"heads": "shared"}, r"\[model\] heads must be 'separate' or 'joint'"),
        ("training", {"augment": "heavy"}, r"\[training\] augment must be 'none' or 'light'"),
        ("training", {"augment_flip": True}, r"augment_flip need augment = 'light'"),
        ("training", {"early_stopping": "ema"}, r"\[training\] early_stopping must be"),
        ("training", {"smoothing": 1.0}, r"smoothing must be in \[0, 1\)"),
        ("training", {"n_seeds": 0}, r"n_seeds must be >= 1"),
        ("training", {"lr_schedule": "step"}, r"lr_schedule must be 'constant' or 'cosine'"),
    ],
)
def test_bad_recipe_settings_give_one_line(tmp_path, section, values, message) -> None:
    from dfrn.config import config_from_dict

    raw = {"cohort": {"table": "t.tsv", "targets": ["a"]}, section: values}
    if section == "final":  # refit with joint heads, on two targets
        raw = {"cohort": {"table": "t.tsv", "targets": ["a", "b"]}, "model": {"heads": "joint"},
               "final": values}
    with pytest.raises(DfrnInputError, match=message) as err:
        config_from_dict(raw, tmp_path)
    assert "\n" not in str(err.value)


def _signal_cohort(n: int, size: int = 12, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Noise volumes whose central cube carries the target (a learnable signal)."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n)
    vols = []
    for i in range(n):
        v = 0.5 * rng.standard_normal((size,) * 3).astype(np.float32)
        v[3:9, 3:9, 3:9] += np.float32(y[i])
        vols.append(v)
    return vols, y


SIGNAL_VOLS, SIGNAL_Y = _signal_cohort(16)


@pytest.mark.parametrize("early_stopping", ["none", "val"])
def test_mean_training_prediction_is_the_mean_target(early_stopping: str) -> None:
    """BatchNorm statistics recomputed and the output centred: no offset on the training
    subjects (the running statistics of batches of 4 shifted each fold's predictions)."""
    est = DFRNRegressor(epochs=3, early_stopping=early_stopping, val_fraction=0.25,
                        widen_factor=0.125, seed=0).fit(SIGNAL_VOLS, SIGNAL_Y)
    train = np.setdiff1d(np.arange(len(SIGNAL_Y)), est.val_ids_)
    pred = est.predict([SIGNAL_VOLS[i] for i in train])
    assert abs(pred.mean() - SIGNAL_Y[train].mean()) < 1e-3 * SIGNAL_Y[train].std()
    old = DFRNRegressor(epochs=3, early_stopping=early_stopping, val_fraction=0.25,
                        widen_factor=0.125, seed=0, bn_stats="running").fit(SIGNAL_VOLS, SIGNAL_Y)
    pred_old = old.predict([SIGNAL_VOLS[i] for i in train])
    assert abs(pred_old.mean() - SIGNAL_Y[train].mean()) > 1e-3 * SIGNAL_Y[train].std()


def test_bn_statistics_are_the_training_subjects_average() -> None:
    """After training, each BatchNorm's running mean is the mean of its batch means over
    the inner training subjects (update_bn's cumulative average), not the last batches'."""
    est = DFRNRegressor(epochs=2, early_stopping="none", widen_factor=0.125, seed=1,
                        batch_size=4).fit(SIGNAL_VOLS[:8], SIGNAL_Y[:8])
    kept = est.model_.bn1.running_mean.clone()  # before the forward passes below update it
    seen = []
    hook = est.model_.bn1.register_forward_hook(
        lambda m, inp, out: seen.append(inp[0].mean(dim=(0, 2, 3, 4)).detach()))
    est.model_.train()
    with torch.no_grad():
        for b in ([0, 1, 2, 3], [4, 5, 6, 7]):  # the batches update_bn saw, in order
            est.model_(torch.from_numpy(np.stack([SIGNAL_VOLS[i] for i in b]))[:, None])
    hook.remove()
    est.model_.eval()
    torch.testing.assert_close(kept, torch.stack(seen).mean(0),
                               rtol=1e-4, atol=1e-5)


def test_auto_trains_fixed_epochs_on_a_small_split_and_waits_for_learning() -> None:
    """``auto``: no split under min_val_subjects (every subject trains, ``epochs`` epochs);
    with a split, no epoch is kept before the training loss falls below learning_start."""
    small = DFRNRegressor(epochs=2, widen_factor=0.125, seed=0).fit(SIGNAL_VOLS, SIGNAL_Y)
    assert small.stopping_.rule == "none" and "fewer than 20" in small.stopping_.reason
    assert len(small.val_ids_) == 0 and len(small.history_) == 2 and small.best_epoch_ == 1
    stopper = EarlyStopping("auto", patience=2, learning_start=0.8, smoothing=0.0)
    # a plateau at the mean's loss: a lucky low validation epoch 1 is neither kept nor counted
    for val, train in [(1.0, 1.0), (0.2, 0.99), (1.0, 0.98), (1.0, 0.97), (0.9, 0.7),
                       (0.5, 0.5), (0.4, 0.4)]:
        step = stopper.update(val, train)
    assert stopper.started_epoch_ == 4 and not step.stop
    assert stopper.best_epoch_ == 6  # median-filtered: the lows of epochs 5-6 count, not 1
