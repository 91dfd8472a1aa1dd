"""Training one DFRN for one factor: a scikit-learn style regressor.

``DFRNRegressor(...).fit(volumes, y)`` trains a fresh :class:`dfrn.models.network.DFRN` with the
method's loss (sum of squared errors), Adam (lr 0.001) and batch size 4. What the paper
leaves open is set by parameters whose defaults are documented in
:class:`dfrn.config.TrainingConfig`: targets z-scored with the *training* data's mean and sd,
at most 50 epochs, early stopping on an inner validation split (10% of the training
subjects, patience 10, best weights kept), no weight decay, no augmentation.

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

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, RegressorMixin

from dfrn.config import DEVICE_PATTERN, ModelConfig, TrainingConfig
from dfrn.errors import DfrnInputError
from dfrn.models.feed import BatchFeeder
from dfrn.models.network import DFRN

__all__ = ["DFRNRegressor", "resolve_device", "seed_everything"]


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


class DFRNRegressor(RegressorMixin, BaseEstimator):
    """One Deep Factor Regression Network for one factor score.

    Parameters mirror :class:`dfrn.config.TrainingConfig` plus ``block_strides``.

    Fitted attributes: ``model_`` (the network, in eval mode, on ``device_``), ``y_mean_``,
    ``y_std_`` (target scaling from the training data), ``history_`` (per-epoch train and
    validation loss), ``best_epoch_`` and ``val_ids_`` (positions of the inner-validation
    subjects within the training data).
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
    ) -> None:
        self.block_strides = block_strides
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.target_scaling = target_scaling
        self.val_fraction = val_fraction
        self.patience = patience
        self.seed = seed
        self.device = device
        self.amp = amp
        self.data = data
        self.channels_last_3d = channels_last_3d
        self.compile = compile
        self.progress = progress
        self.desc = desc

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
                for x in feeder.batches(batches):
                    with autocast():
                        out.append(model(x).float().cpu().numpy())
        finally:
            if own:
                feeder.close()
        return np.concatenate(out) if out else np.zeros(0)

    # -- estimator API -----------------------------------------------------------------
    def fit(self, volumes: Sequence[np.ndarray], y: Sequence[float]) -> DFRNRegressor:
        """Train on ``volumes[i]`` with targets ``y[i]``."""
        from tqdm.auto import tqdm

        y = np.asarray(y, dtype=np.float64)
        n = len(y)
        if n != len(volumes):
            raise DfrnInputError(f"{self._what()}{len(volumes)} volumes but {n} targets")
        if n < 2:
            raise DfrnInputError(
                f"{self._what()}{n} training subject(s) with a value; at least 2 are needed"
            )
        if not np.all(np.isfinite(y)):
            raise DfrnInputError(f"{self._what()}training targets contain NaN or inf")
        self.device_ = resolve_device(self.device)
        seed_everything(self.seed)
        rng = np.random.default_rng(self.seed)

        order = rng.permutation(n)
        n_val = int(math.floor(n * self.val_fraction))
        if n_val < 2 or n - n_val < 2:
            n_val = 0
        val_idx = np.sort(order[:n_val])
        train_idx = np.sort(order[n_val:])
        self.val_ids_ = val_idx

        if self.target_scaling == "zscore":
            self.y_mean_ = float(y[train_idx].mean())
            sd = float(y[train_idx].std())
            self.y_std_ = sd if sd > 0 else 1.0
        else:
            self.y_mean_, self.y_std_ = 0.0, 1.0
        ys = torch.tensor((y - self.y_mean_) / self.y_std_, dtype=torch.float32)

        self.model_ = DFRN(block_strides=self.block_strides).to(self.device_)
        if self.channels_last_3d:
            self.model_ = self.model_.to(memory_format=torch.channels_last_3d)
        step_model: torch.nn.Module = (
            torch.compile(self.model_) if self.compile else self.model_  # type: ignore[assignment]
        )
        opt_kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.device_.type in ("cpu", "cuda"):
            opt_kwargs["fused"] = True
        opt = torch.optim.Adam(self.model_.parameters(), **opt_kwargs)
        autocast, scaler = self._autocast()

        history: list[dict[str, float]] = []
        bar = tqdm(
            range(self.epochs), desc=self.desc or "epochs", leave=False, disable=not self.progress
        )
        feeder = BatchFeeder(volumes, self.device_, self.data, bool(self.channels_last_3d))
        try:
            self._train(
                bar, feeder, step_model, opt, autocast, scaler, rng, train_idx, val_idx, ys,
                volumes, history, tqdm,
            )
        finally:
            feeder.close()
        self.history_ = pd.DataFrame(history)
        self.model_.eval()
        return self

    def _train(self, bar, feeder, step_model, opt, autocast, scaler, rng, train_idx, val_idx, ys,
               volumes, history, tqdm) -> None:
        """The epochs of :meth:`fit` (early stopping keeps the best validation weights)."""
        n_val = len(val_idx)
        best = (math.inf, -1)
        best_state: dict[str, torch.Tensor] | None = None
        stale = 0
        for epoch in bar:
            t_epoch = time.perf_counter()
            feeder.reset_wait()
            step_model.train()
            total = 0.0
            batches = _batches(rng.permutation(train_idx), self.batch_size)
            steps = tqdm(
                feeder.batches(batches), total=len(batches), desc=f"epoch {epoch}", unit="step",
                leave=False, delay=2.0, disable=not self.progress,
            )
            for b, x in zip(batches, steps, strict=True):
                target = ys[b].to(self.device_)
                opt.zero_grad(set_to_none=True)
                with autocast():
                    pred = step_model(x)
                loss = torch.sum((pred.float() - target) ** 2)  # sum of squared errors
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                total += float(loss.detach())
            train_loss = total / len(train_idx)
            val_loss = float("nan")
            if n_val:
                pv = self._predict_scaled(volumes, val_idx, feeder, step_model)
                val_loss = float(np.mean((pv - ys[val_idx].numpy()) ** 2))
            history.append({
                "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                "data_wait_s": feeder.reset_wait(), "epoch_s": time.perf_counter() - t_epoch,
            })
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if n_val:
                if val_loss < best[0]:
                    best = (val_loss, epoch)
                    best_state = {
                        k: v.detach().clone() for k, v in self.model_.state_dict().items()
                    }
                    stale = 0
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
        if best_state is not None:
            self.model_.load_state_dict(best_state)
            self.best_epoch_ = best[1]
        else:
            self.best_epoch_ = len(history) - 1

    def predict(self, volumes: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted scores (in the target's original units) for every volume."""
        scaled = self._predict_scaled(volumes, range(len(volumes)))
        return scaled * self.y_std_ + self.y_mean_

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.model_.state_dict().items()},
            "y_mean": self.y_mean_,
            "y_std": self.y_std_,
            "block_strides": [int(s) for s in self.model_.block_strides],
            "best_epoch": int(self.best_epoch_),
        }

    def save(self, path: str | Path) -> None:
        from dfrn.io import atomic_write

        ckpt = self.checkpoint()
        size = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
        atomic_write(path, lambda p: torch.save(ckpt, p), size_hint=size + (1 << 16))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> DFRNRegressor:
        """Load a checkpoint written by :meth:`save` (``weights_only=True``: no code runs)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        est = cls(block_strides=tuple(ckpt["block_strides"]), device=device)
        est.device_ = resolve_device(device)
        est.model_ = DFRN(block_strides=ckpt["block_strides"])
        est.model_.load_state_dict(ckpt["state_dict"])
        est.model_.to(est.device_).eval()
        est.y_mean_ = float(ckpt["y_mean"])
        est.y_std_ = float(ckpt["y_std"])
        est.best_epoch_ = int(ckpt["best_epoch"])
        return est
