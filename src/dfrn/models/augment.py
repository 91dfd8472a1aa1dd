"""Training-time augmentation with TorchIO: small random affine changes, never a flip.

``[training] augment = "light"`` applies to every training batch, subject by subject,

- :class:`torchio.RandomAffine` with rotations up to ±3°, shifts up to ±2 mm and scaling
  within ±3% (background padded with 0, linear interpolation); the shift is converted to
  voxels of the network input (``voxel_mm``: 2 mm is a quarter voxel at 8 mm);
- :class:`torchio.RandomBiasField` (coefficients up to 0.2) when ``augment_bias_field``
  (for unnormalised or min-max scaled T1 scans);
- a left-right flip only when ``augment_flip`` is set: a flip swaps the hemispheres, so it
  destroys lateralised effects and is off unless asked for.

Evaluation, validation and attribution never see it. Each batch's random draw comes from its
own seed (task seed, epoch, step) inside :func:`torch.random.fork_rng`, so a rerun gives the
same augmented batches and the rest of training (weights, batch order) is not disturbed.
TorchIO is an optional dependency (``pip install 'dfrn[augment]'``).
"""

from __future__ import annotations

import numpy as np
import torch

from dfrn.errors import DfrnInputError

__all__ = ["AUGMENT_MODES", "Augmenter"]

#: Valid ``[training] augment`` values.
AUGMENT_MODES = ("none", "light")
#: The largest random shift of ``"light"``, in mm.
SHIFT_MM = 2.0


def _transform(bias_field: bool, flip: bool, voxel_mm: float):  # -> torchio.Transform
    try:
        import torchio as tio
    except ImportError as exc:
        raise DfrnInputError(
            "config [training] augment = 'light' needs TorchIO: pip install 'dfrn[augment]'"
        ) from exc
    # a bare tensor has 1-unit voxels, so TorchIO's translation is in voxels here
    steps = [tio.RandomAffine(scales=0.03, degrees=3, translation=SHIFT_MM / voxel_mm,
                              default_pad_value=0.0, image_interpolation="linear")]
    if bias_field:
        steps.append(tio.RandomBiasField(coefficients=0.2))
    if flip:
        steps.append(tio.RandomFlip(axes=(0,), flip_probability=0.5))
    return tio.Compose(steps)


class Augmenter:
    """Augment training batches ``(B, 1, D, H, W)``, reproducibly.

    Parameters
    ----------
    mode : {"none", "light"}
    seed : int
        The task's seed; each batch draws from ``(seed, epoch, step)``.
    bias_field, flip : bool
        Add a random bias field / a random left-right flip (first axis of the grid).
    voxel_mm : float, default 1.0
        Voxel size of the network input in mm (the shift is set in mm).
    """

    def __init__(self, mode: str, seed: int, bias_field: bool = False, flip: bool = False,
                 voxel_mm: float = 1.0) -> None:
        if mode not in AUGMENT_MODES:
            raise DfrnInputError(
                f"config [training] augment {mode!r} is not one of {', '.join(AUGMENT_MODES)}"
            )
        self.mode = mode
        self.seed = int(seed)
        if not voxel_mm > 0:
            raise DfrnInputError(f"voxel size must be positive, got {voxel_mm}")
        self.transform = _transform(bias_field, flip, voxel_mm) if mode != "none" else None

    @property
    def active(self) -> bool:
        return self.transform is not None

    def __call__(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The augmented batch (on ``x``'s device); ``x`` itself when mode is ``"none"``."""
        if self.transform is None:
            return x
        state = np.random.SeedSequence([self.seed, epoch, step]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(state))  # the CPU stream only
            cpu = x.detach().float().cpu()
            out = torch.stack([self.transform(cpu[i]) for i in range(cpu.shape[0])])
        return out.to(device=x.device, dtype=x.dtype)
