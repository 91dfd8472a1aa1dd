"""Training one DFRN for one factor (or jointly for several): a scikit-learn style regressor.

``DFRNRegressor(...).fit(volumes, y)`` trains a fresh :class:`dfrn.models.network.DFRN` with the
method's loss (sum of squared errors), Adam (lr 0.001) and batch size 4. What the paper
leaves open is set by parameters whose defaults are documented in
:class:`dfrn.config.TrainingConfig`: targets z-scored with the *training* data's mean and sd,
at most 50 epochs, early stopping on an inner validation split (10% of the training
subjects, stratified on the target, patience 10, best weights kept), no weight decay, no
augmentation. The recipe's options: the stopping rule (:mod:`dfrn.models.early_stopping`),
TorchIO augmentation (:mod:`dfrn.models.augment`), AdamW when ``weight_decay`` > 0, and a
cosine learning-rate schedule. A 2D ``y`` trains one network with one output per factor
(``[model] heads = "joint"``).

``volumes`` is any sequence of 3D arrays (e.g. :class:`dfrn.data.images.VolumeSet`, or a list of
arrays); only the subjects given are trained on. Batches reach the network by one of the paths
of :mod:`dfrn.models.feed` (``data``: the cohort held in memory once per process, prefetched by a
background thread, or read when needed); all give the same numbers. ``history.tsv`` logs per
epoch the seconds the loop waited for data (``data_wait_s``) and the epoch's seconds
(``epoch_s``). Within an epoch that runs longer than 2 s a per-step progress bar is shown
(when ``progress``).

Determinism: weights, the inner split and batch order come from ``seed``. On CUDA, cuDNN is
put in deterministic mode and autocast runs in bfloat16 where supported (float16 with a
gradient scaler otherwise); on the CPU, training is float32. ``cudnn.benchmark`` stays off
(benchmark mode picks convolution algorithms by timing, which can change the numbers from run
to run). ``channels_last_3d`` and ``compile`` are off by default; they may change the last
digits and count in a run's identity when on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, RegressorMixin

from dfrn.config import DEVICE_PATTERN, ModelConfig, TrainingConfig
from dfrn.errors import DfrnInputError
from dfrn.models.augment import Augmenter
from dfrn.models.early_stopping import EarlyStopping, StoppingPlan, plan_stopping
from dfrn.models.feed import BatchFeeder
from dfrn.models.network import DFRN
from dfrn.models.pretrained import apply_init, cached_init, freeze, param_groups

__all__ = [
    "DFRNRegressor",
    "resolve_device",
    "seed_everything",
    "stratified_holdout",
    "masked_sse",
]


# the defaults live in the config dataclasses only
_TRAIN = TrainingConfig()
_MODEL = ModelConfig()


def resolve_device(device: str = "auto", option: str = "config [training] device") -> torch.device:
    """The torch device for a device setting, checked on this machine.

    Parameters
    ----------
    device : str
        ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:<index>"``.
    option : str, default "config [training] device"
        Where the value came from, as messages name it (``"--device"`` for ``dfrn predict``).

    Raises
    ------
    DfrnInputError
        For a malformed value, or a CUDA device this machine does not have.
    """
    text = str(device).strip()
    if not DEVICE_PATTERN.match(text):
        raise DfrnInputError(
            f"{option} {device!r} is not valid: use 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
        )
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            fix = (f"pass {option} auto or {option} cpu" if option.startswith("--") else
                   "set device = 'auto' or 'cpu' (device does not change a run's identity)")
            raise DfrnInputError(
                f"{option} {text!r} but CUDA is not available on this machine; {fix}"
            )
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise DfrnInputError(
                f"{option} {text!r} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return torch.device(text)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and make cuDNN deterministic."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@dataclass
class _Loop:
    """What the epochs of one :meth:`DFRNRegressor.fit` share."""

    feeder: BatchFeeder
    step_model: torch.nn.Module
    opt: torch.optim.Optimizer
    schedule: Any
    stopper: EarlyStopping
    augmenter: Augmenter
    rng: np.random.Generator
    train_idx: np.ndarray
    ys: torch.Tensor
    volumes: Sequence[np.ndarray]


def _batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    """Split ``order`` into consecutive batches of ``size``.

    A last batch of one item joins the previous batch (BatchNorm needs two samples in
    training mode), so every item appears exactly once, in order.
    """
    order = np.asarray(order)
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    out = [order[i : i + size] for i in range(0, len(order), size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] = np.concatenate([out[-1], last])
    return out


def stratified_holdout(score: np.ndarray, n_val: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``n_val`` validation subjects spread over the range of ``score``.

    The subjects are sorted by ``score`` and cut into ``n_val`` consecutive bins of (nearly)
    equal size; one subject is drawn at random from each bin. The validation subjects so
    span the target's range, instead of a random draw that can miss a tail.
    """
    order = np.argsort(np.asarray(score, dtype=float), kind="stable")
    picks = [int(rng.choice(b)) for b in np.array_split(order, n_val)]
    return np.sort(np.asarray(picks, dtype=int))


def masked_sse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the targets that have a value (NaN: no value).

    A missing target adds nothing to the loss and sends no gradient to its output.
    """
    present = torch.isfinite(target)
    diff = torch.where(present, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    return torch.sum(diff**2)


class DFRNRegressor(RegressorMixin, BaseEstimator):
    """One Deep Factor Regression Network for one factor score (or, jointly, for several).

    Parameters mirror :class:`dfrn.config.TrainingConfig` plus ``block_strides`` and
    ``widen_factor`` (:class:`dfrn.config.ModelConfig`). ``fit``
    with a 2D ``y`` (subjects × factors) trains one network with one output per factor (the
    paper's joint-training ablation); its loss is the sum of the factors' SSE, and a
    missing value (NaN) of one factor masks that factor's term only.

    Fitted attributes: ``model_`` (the network, in eval mode, on ``device_``), ``y_mean_``,
    ``y_std_`` (target scaling from the training data; arrays for a 2D ``y``), ``history_``
    (per-epoch train loss, raw and smoothed validation loss, learning rate), ``best_epoch_``
    and ``val_ids_`` (positions of the inner-validation subjects within the training data).

    ``schedule_epochs`` (default: ``epochs``) is the cosine schedule's horizon: a refit that
    trains for the folds' median best epoch keeps the schedule the folds trained under.
    ``voxel_mm`` is the network input's voxel size (augmentation shifts are set in mm).
    """

    def __init__(
        self,
        block_strides: Sequence[int] = tuple(_MODEL.block_strides),
        epochs: int = _TRAIN.epochs,
        batch_size: int = _TRAIN.batch_size,
        lr: float = _TRAIN.lr,
        weight_decay: float = _TRAIN.weight_decay,
        target_scaling: str = _TRAIN.target_scaling,
        val_fraction: float = _TRAIN.val_fraction,
        patience: int = _TRAIN.patience,
        seed: int = _TRAIN.seed,
        device: str = _TRAIN.device,
        amp: bool = _TRAIN.amp,
        data: str = _TRAIN.data,
        channels_last_3d: bool = _TRAIN.channels_last_3d,
        compile: bool = _TRAIN.compile,
        progress: bool = False,
        desc: str = "",
        early_stopping: str = _TRAIN.early_stopping,
        min_epochs: int = _TRAIN.min_epochs,
        smoothing: float = _TRAIN.smoothing,
        min_val_subjects: int = _TRAIN.min_val_subjects,
        learning_start: float = _TRAIN.learning_start,
        bn_stats: str = _TRAIN.bn_stats,
        augment: str = _TRAIN.augment,
        augment_bias_field: bool = _TRAIN.augment_bias_field,
        augment_flip: bool = _TRAIN.augment_flip,
        lr_schedule: str = _TRAIN.lr_schedule,
        val_split: str = _TRAIN.val_split,
        schedule_epochs: int | None = None,
        voxel_mm: float = 1.0,
        widen_factor: float = _MODEL.widen_factor,
        init: str = _MODEL.init,
        init_member: int = _MODEL.init_member,
        freeze: str = _MODEL.freeze,
        backbone_lr_scale: float = _MODEL.backbone_lr_scale,
    ) -> None:
        self.block_strides, self.widen_factor = block_strides, widen_factor
        self.init, self.init_member = init, init_member
        self.freeze, self.backbone_lr_scale = freeze, backbone_lr_scale
        self.epochs, self.batch_size = epochs, batch_size
        self.lr, self.weight_decay = lr, weight_decay
        self.target_scaling = target_scaling
        self.val_fraction, self.patience = val_fraction, patience
        self.seed, self.device = seed, device
        self.amp, self.data = amp, data
        self.channels_last_3d, self.compile = channels_last_3d, compile
        self.progress, self.desc = progress, desc
        self.early_stopping = early_stopping
        self.min_epochs = min_epochs
        self.smoothing = smoothing
        self.min_val_subjects = min_val_subjects
        self.learning_start = learning_start
        self.bn_stats = bn_stats
        self.augment = augment
        self.augment_bias_field, self.augment_flip = augment_bias_field, augment_flip
        self.lr_schedule = lr_schedule
        self.val_split = val_split
        self.schedule_epochs = schedule_epochs
        self.voxel_mm = voxel_mm

    # -- helpers -----------------------------------------------------------------------
    def _what(self) -> str:
        return f"{self.desc}: " if self.desc else ""

    def _autocast(self) -> tuple[Any, torch.amp.GradScaler | None]:
        dev = self.device_
        if dev.type == "cuda" and self.amp:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
            return (lambda: torch.autocast("cuda", dtype=dtype)), scaler
        return (lambda: torch.autocast(dev.type, enabled=False)), None

    def _predict_scaled(
        self,
        volumes: Sequence[np.ndarray],
        idx: Sequence[int],
        feeder: BatchFeeder | None = None,
        model: torch.nn.Module | None = None,
    ) -> np.ndarray:
        """Scaled predictions, one row per item of ``idx`` (``(n, n_outputs)``)."""
        autocast, _ = self._autocast()
        self.model_.eval()
        model = model if model is not None else self.model_
        own = feeder is None
        if feeder is None:
            feeder = BatchFeeder(volumes, self.device_, "sync", bool(self.channels_last_3d))
        out = []
        try:
            with torch.no_grad():
                batches = _batches(np.asarray(idx), max(self.batch_size, 2))
                for b, x in zip(batches, feeder.batches(batches), strict=True):
                    with autocast():
                        out.append(model(x).float().reshape(len(b), -1).cpu().numpy())
        finally:
            if own:
                feeder.close()
        return np.concatenate(out) if out else np.zeros((0, self.model_.n_outputs))

    def _check_targets(self, volumes: Sequence[np.ndarray], y: Any) -> np.ndarray:
        """``y`` as subjects × outputs; one-line errors for what cannot be trained on."""
        y = np.asarray(y, dtype=np.float64)
        if y.ndim not in (1, 2):
            raise DfrnInputError(f"{self._what()}targets must be 1D or 2D, got shape {y.shape}")
        y2 = y.reshape(len(y), -1)
        n = len(y2)
        if n != len(volumes):
            raise DfrnInputError(f"{self._what()}{len(volumes)} volumes but {n} targets")
        if np.isinf(y2).any() or (y.ndim == 1 and np.isnan(y2).any()):
            raise DfrnInputError(f"{self._what()}training targets contain NaN or inf")
        counts = np.isfinite(y2).sum(axis=0)
        if n < 2 or counts.min() < 2:
            raise DfrnInputError(
                f"{self._what()}{int(counts.min()) if n else 0} training subject(s) with a "
                "value; at least 2 are needed"
            )
        empty = np.flatnonzero(~np.isfinite(y2).any(axis=1))
        if len(empty):
            raise DfrnInputError(
                f"{self._what()}training subject at position {int(empty[0])} has no target value"
            )
        return y2

    def _split(self, y2: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Inner (train, validation) positions: a holdout of ``val_fraction`` of the subjects.

        ``val_split = "stratified"`` draws one subject from each quantile bin of the target
        (the mean z-score over factors for a joint network) from its own random stream;
        ``"random"`` is the first ``n_val`` of a permutation (dfrn's earlier draw). The
        permutation is drawn either way, so the batch order after it does not depend on
        the split.
        """
        n = len(y2)
        order = rng.permutation(n)
        self.stopping_: StoppingPlan = plan_stopping(
            self.early_stopping, n, self.val_fraction, self.min_val_subjects)
        n_val = self.stopping_.n_val
        if self.stopping_.rule == "none":
            return np.arange(n), np.zeros(0, dtype=int)
        if self.val_split == "random":
            val_idx = np.sort(order[:n_val])
        else:
            sd = np.nanstd(y2, axis=0)
            z = (y2 - np.nanmean(y2, axis=0)) / np.where(sd > 0, sd, 1.0)
            score = np.nanmean(z, axis=1)
            val_idx = stratified_holdout(score, n_val, np.random.default_rng([self.seed, 1]))
        return np.setdiff1d(np.arange(n), val_idx), val_idx

    def _scale(self, y2: np.ndarray, train_idx: np.ndarray) -> torch.Tensor:
        """Set ``y_mean_``/``y_std_`` from the inner training subjects; the scaled targets."""
        counts = np.isfinite(y2[train_idx]).sum(axis=0)
        if counts.min() < 2:
            raise DfrnInputError(
                f"{self._what()}target column {int(np.argmin(counts))} has {int(counts.min())} "
                "value(s) among the subjects left for training after the validation split; at "
                "least 2 are needed (lower val_fraction)"
            )
        if self.target_scaling == "zscore":
            mean = np.nanmean(y2[train_idx], axis=0)
            sd = np.nanstd(y2[train_idx], axis=0)
            sd = np.where(sd > 0, sd, 1.0)
        else:
            mean, sd = np.zeros(y2.shape[1]), np.ones(y2.shape[1])
        self.y_mean_, self.y_std_ = (mean, sd) if self.joint_ else (float(mean[0]), float(sd[0]))
        return torch.tensor((y2 - mean) / sd, dtype=torch.float32)

    def _optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """Adam (AdamW when ``weight_decay`` > 0) and the learning-rate schedule."""
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.device_.type in ("cpu", "cuda"):
            kwargs["fused"] = True
        cls = torch.optim.AdamW if self.weight_decay > 0 else torch.optim.Adam
        opt = cls(param_groups(self.model_, self.lr, self.backbone_lr_scale), **kwargs)
        if self.lr_schedule == "cosine":
            horizon = self.schedule_epochs or self.epochs
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=horizon)
        if self.lr_schedule != "constant":
            raise DfrnInputError(
                f"config [training] lr_schedule {self.lr_schedule!r} is not one of constant, cosine"
            )
        return opt, None

    # -- estimator API -----------------------------------------------------------------
    def fit(self, volumes: Sequence[np.ndarray], y: Any) -> DFRNRegressor:
        """Train on ``volumes[i]`` with targets ``y[i]`` (a row of factors for a 2D ``y``)."""
        y2 = self._check_targets(volumes, y)
        self.joint_ = np.asarray(y).ndim == 2
        self.device_ = resolve_device(self.device)
        augmenter = Augmenter(self.augment, self.seed, self.augment_bias_field,
                              self.augment_flip, self.voxel_mm)
        seed_everything(self.seed)
        rng = np.random.default_rng(self.seed)
        train_idx, self.val_ids_ = self._split(y2, rng)
        stopper = EarlyStopping(self.stopping_.rule, self.patience, self.min_epochs,
                                self.smoothing, self.learning_start)
        ys = self._scale(y2, train_idx)
        self.model_ = self._network(y2.shape[1])
        if self.channels_last_3d:
            self.model_ = self.model_.to(memory_format=torch.channels_last_3d)
        step_model: torch.nn.Module = (
            torch.compile(self.model_) if self.compile else self.model_  # type: ignore[assignment]
        )
        opt, schedule = self._optimizer()
        feeder = BatchFeeder(volumes, self.device_, self.data, bool(self.channels_last_3d))
        try:
            history = self._train(_Loop(feeder, step_model, opt, schedule, stopper, augmenter,
                                        rng, train_idx, ys, volumes))
        finally:
            feeder.close()
        self.history_ = pd.DataFrame(history)
        self.model_.eval()
        return self

    def _network(self, n_outputs: int) -> DFRN:
        """A new network (seeded), started from ``init`` where given, with ``freeze``'s
        layers fixed; ``init_report_`` says what was loaded."""
        net = DFRN(block_strides=self.block_strides, n_outputs=n_outputs,
                   widen_factor=self.widen_factor)
        self.init_report_ = None
        if self.init:
            self.init_report_ = apply_init(net, cached_init(self.init, self.init_member))
        self.frozen_bn_ = freeze(net, self.freeze)
        return net.to(self.device_)

    def _epoch(self, loop: _Loop, epoch: int) -> float:
        """One pass over the inner training subjects; the epoch's loss per target value."""
        from tqdm.auto import tqdm

        autocast, scaler = self._autocast()
        loop.step_model.train()
        for bn in self.frozen_bn_:  # frozen: normalise with, and keep, the init's statistics
            bn.eval()
        total = 0.0
        batches = _batches(loop.rng.permutation(loop.train_idx), self.batch_size)
        steps = tqdm(
            loop.feeder.batches(batches), total=len(batches), desc=f"epoch {epoch}", unit="step",
            leave=False, delay=2.0, disable=not self.progress,
        )
        for k, (b, x) in enumerate(zip(batches, steps, strict=True)):
            x = loop.augmenter(x, epoch, k)
            target = loop.ys[b].to(self.device_)
            loop.opt.zero_grad(set_to_none=True)
            with autocast():
                pred = loop.step_model(x)
            loss = masked_sse(pred.float().reshape(target.shape), target)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(loop.opt)
                scaler.update()
            else:
                loss.backward()
                loop.opt.step()
            total += float(loss.detach())
        return total / max(int(torch.isfinite(loop.ys[loop.train_idx]).sum()), 1)

    def _recompute_bn(self, loop: _Loop) -> None:
        """BatchNorm statistics averaged over the inner training subjects (no gradient).

        In training mode BatchNorm normalises with each batch's own statistics, and keeps
        running averages (momentum 0.1) for prediction: after batches of 4 those reflect
        the last few batches, and shift every prediction of the network. With
        ``bn_stats = "recompute"`` they are replaced by the cumulative average over the
        subjects the network trains on (``torch.optim.swa_utils.update_bn``), before each
        validation epoch and after training; training itself is unchanged. After training
        the output is then centred (:meth:`_centre_output`).
        """
        if self.bn_stats != "recompute":
            return
        from torch.optim.swa_utils import update_bn

        autocast, _ = self._autocast()
        batches = _batches(np.asarray(loop.train_idx), max(self.batch_size, 2))
        kept = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in self.frozen_bn_]
        with autocast():
            update_bn(loop.feeder.batches(batches), self.model_)
        for bn, state in zip(self.frozen_bn_, kept, strict=True):  # frozen layers stay fixed
            bn.load_state_dict(state)

    def _centre_output(self, loop: _Loop) -> None:
        """Shift the output bias so the mean training prediction is the mean training target.

        The least-squares intercept on the subjects the network trained on (no other
        subject is seen): with BatchNorm's statistics recomputed, the remaining offset of
        a network that is not at its optimum is removed, so the fold networks' predictions
        are not shifted against each other (``bn_stats = "recompute"`` only).
        """
        if self.bn_stats != "recompute":
            return
        pred = self._predict_scaled(loop.volumes, loop.train_idx, loop.feeder, loop.step_model)
        truth = loop.ys[loop.train_idx].numpy()
        resid = np.where(np.isfinite(truth), pred - np.nan_to_num(truth), np.nan)
        offset = np.nanmean(resid, axis=0)
        with torch.no_grad():
            self.model_.fc.bias -= torch.as_tensor(offset, dtype=self.model_.fc.bias.dtype,
                                                   device=self.model_.fc.bias.device)

    def _val_loss(self, loop: _Loop) -> float:
        if not len(self.val_ids_):
            return float("nan")
        self._recompute_bn(loop)
        pv = self._predict_scaled(loop.volumes, self.val_ids_, loop.feeder, loop.step_model)
        truth = loop.ys[self.val_ids_].numpy()
        present = np.isfinite(truth)
        return float(np.mean((pv[present] - truth[present]) ** 2))

    def _train(self, loop: _Loop) -> list[dict[str, float]]:
        """The epochs of :meth:`fit`; the stopping rule decides the kept weights."""
        from tqdm.auto import tqdm

        history: list[dict[str, float]] = []
        best_state: dict[str, torch.Tensor] | None = None
        bar = tqdm(range(self.epochs), desc=self.desc or "epochs", leave=False,
                   disable=not self.progress)
        for epoch in bar:
            t_epoch = time.perf_counter()
            loop.feeder.reset_wait()
            lr = float(loop.opt.param_groups[0]["lr"])
            train_loss = self._epoch(loop, epoch)
            if loop.schedule is not None:
                loop.schedule.step()
            val_loss = self._val_loss(loop)
            step = loop.stopper.update(val_loss, train_loss)
            history.append({
                "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                "val_loss_smoothed": step.smoothed, "lr": lr,
                "data_wait_s": loop.feeder.reset_wait(),
                "epoch_s": time.perf_counter() - t_epoch,
            })
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if step.improved and loop.stopper.mode != "none":
                best_state = {k: v.detach().clone() for k, v in self.model_.state_dict().items()}
            if step.stop:
                break
        if best_state is not None:
            self.model_.load_state_dict(best_state)
        if best_state is None or not len(self.val_ids_):
            self._recompute_bn(loop)  # the kept weights' statistics (already set otherwise)
        self._centre_output(loop)
        best = loop.stopper.best_epoch_
        self.best_epoch_ = best if best >= 0 else len(history) - 1
        return history

    def predict(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted scores in the targets' units: ``(n,)``, or ``(n, n_factors)`` if joint."""
        scaled = self._predict_scaled(volumes, range(len(volumes)))
        out = scaled * np.asarray(self.y_std_) + np.asarray(self.y_mean_)
        return out if getattr(self, "joint_", False) else out[:, 0]

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        joint = getattr(self, "joint_", False)
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.model_.state_dict().items()},
            "y_mean": [float(v) for v in self.y_mean_] if joint else float(self.y_mean_),
            "y_std": [float(v) for v in self.y_std_] if joint else float(self.y_std_),
            "block_strides": [int(s) for s in self.model_.block_strides],
            "widen_factor": float(self.model_.widen_factor),
            "best_epoch": int(self.best_epoch_),
            "n_outputs": int(self.model_.n_outputs),
        }

    def save(self, path: str | Path) -> None:
        from dfrn.io import atomic_write

        ckpt = self.checkpoint()
        size = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
        atomic_write(path, lambda p: torch.save(ckpt, p), size_hint=size + (1 << 16))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", output: int | None = None) -> DFRNRegressor:
        """Load a checkpoint written by :meth:`save` (``weights_only=True``: no code runs).

        ``output`` picks one factor of a joint network: the result is a one-output
        regressor that predicts exactly that factor (see :meth:`DFRN.select_output`).
        """
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        n_outputs = int(ckpt.get("n_outputs", 1))
        if output is not None and not 0 <= output < n_outputs:
            raise DfrnInputError(f"{path}: output {output} of a network with {n_outputs} output(s)")
        widen = float(ckpt.get("widen_factor", 1.0))  # checkpoints before the key: 1.0
        est = cls(block_strides=tuple(ckpt["block_strides"]), device=device, widen_factor=widen)
        est.device_ = resolve_device(device)
        model = DFRN(block_strides=ckpt["block_strides"], n_outputs=n_outputs, widen_factor=widen)
        model.load_state_dict(ckpt["state_dict"])
        mean, sd = np.atleast_1d(ckpt["y_mean"]), np.atleast_1d(ckpt["y_std"])
        est.joint_ = n_outputs > 1 and output is None
        if n_outputs > 1 and output is not None:
            model, mean, sd = model.select_output(output), mean[output : output + 1], sd[output : output + 1]
        est.model_ = model.to(est.device_).eval()
        est.y_mean_, est.y_std_ = (mean, sd) if est.joint_ else (float(mean[0]), float(sd[0]))
        est.best_epoch_ = int(ckpt["best_epoch"])
        return est
