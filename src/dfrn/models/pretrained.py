"""Start a network from pretrained weights, and freeze part of it.

``[model] init`` names one of three sources, never downloaded at run time:

* a dfrn model package (``models/<factor>/`` of another ``dfrn run``): its network
  ``init_member`` (0, the first, by default), verified as ``dfrn predict`` verifies it;
* a MedicalNet checkpoint (Chen, Ma & Zheng 2019; ``resnet_10.pth`` or
  ``resnet_10_23dataset.pth``): a dict with ``state_dict``, keys prefixed ``module.``. Its
  ResNet-10 uses dfrn's (and MONAI's) parameter names, so the backbone loads by name;
* a plain PyTorch state dict of dfrn's network (``.pt``/``.pth``, or ``.safetensors``).

Weights are matched by name and shape. The backbone (every tensor but the output layer
``fc``) must match completely: another architecture, ``widen_factor`` or block layout is one
line naming the first tensor that differs and both shapes. The output layer is kept only
from a plain state dict with the same shape; a package's ``fc`` predicts its own cohort's
z-scored target and MedicalNet has none, so it is re-initialised. Convolutions do not depend
on the input grid, so weights learned at another grid or voxel size still load (with a
warning from the study); BatchNorm's running statistics come with them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfrn.errors import DfrnInputError
from dfrn.io import file_digest

__all__ = ["FREEZE_CHOICES", "InitSource", "InitReport", "read_init", "cached_init", "apply_init",
           "frozen_names", "freeze", "param_groups"]

FREEZE_CHOICES = ("none", "stem", "backbone")
_HEAD = "fc."
_STEM = ("conv1.", "bn1.")


@dataclass(frozen=True, eq=False)
class InitSource:
    """Pretrained weights read from ``[model] init``."""

    path: Path
    kind: str
    """``"package"``, ``"medicalnet"`` or ``"state_dict"``."""
    state: dict[str, torch.Tensor]
    sha256: str
    """Of the file (of the member's weight file for a package)."""
    meta: dict[str, Any] | None = None
    """A package's metadata (its input grid, intensity and factor)."""

    def describe(self) -> str:
        """The source in words, for the log and a package's provenance."""
        what = {"package": f"dfrn package ({self.meta['factor']})" if self.meta else "dfrn package",
                "medicalnet": "MedicalNet checkpoint", "state_dict": "state dict"}[self.kind]
        return f"{what} {self.path}"


@dataclass(frozen=True)
class InitReport:
    """What :func:`apply_init` loaded: ``loaded`` of ``total`` tensors; ``reinitialised``
    names the layers left at their random initialisation."""

    loaded: int
    total: int
    reinitialised: tuple[str, ...]

    def line(self, source: InitSource) -> str:
        redo = f"; re-initialised {', '.join(self.reinitialised)}" if self.reinitialised else ""
        return f"init: loaded {self.loaded} of {self.total} tensors from {source.describe()}{redo}"


def _strip_module(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """DataParallel's ``module.`` prefix removed; only tensors kept."""
    return {(k[len("module."):] if k.startswith("module.") else k): v
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_file(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint file's kind and tensors (``weights_only``: no code runs on load)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return "state_dict", _strip_module(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise DfrnInputError(f"config [model] init {path}: not a PyTorch checkpoint ({exc})"
                             ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return "medicalnet", _strip_module(obj["state_dict"])
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict", _strip_module(obj)
    raise DfrnInputError(f"config [model] init {path}: neither a state dict nor a dict with "
                         "'state_dict' (MedicalNet's layout)")


def _read_package(folder: Path, member: int) -> InitSource:
    """Network ``member`` of a dfrn package: its weights, checked against the SHA-256 that
    ``metadata.json`` records (``dfrn predict`` verifies the rest of a package)."""
    meta_path = folder / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        entries = meta["models"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DfrnInputError(f"config [model] init {folder}: not a dfrn model package "
                             f"({meta_path.name}: {exc})") from None
    if not 0 <= member < len(entries):
        raise DfrnInputError(f"config [model] init_member = {member}, but the package {folder} "
                             f"has {len(entries)} network(s)")
    weights = folder / Path(entries[member]["file"]).name
    digest = file_digest(weights) if weights.is_file() else ""
    if digest != entries[member]["sha256"]:
        raise DfrnInputError(f"config [model] init {weights}: missing, or its SHA-256 differs "
                             "from the package's metadata.json (file changed)")
    from safetensors.torch import load_file

    state = {k: v.to(torch.float32) if v.is_floating_point() else v
             for k, v in load_file(str(weights)).items()}
    return InitSource(folder, "package", state, digest, meta)


def read_init(path: str | Path, member: int = 0) -> InitSource:
    """Read ``[model] init``: a package folder, a MedicalNet checkpoint or a state dict.

    Raises
    ------
    DfrnInputError
        One line: a missing path, an unreadable file, a package that fails verification or
        has no network ``member``.
    """
    p = Path(path)
    if p.is_dir():
        return _read_package(p, member)
    if not p.is_file():
        raise DfrnInputError(f"config [model] init: file not found: {p}")
    kind, state = _read_file(p)
    return InitSource(p, kind, state, file_digest(p))


@functools.lru_cache(maxsize=2)
def _cached(path: str, member: int, stamp: tuple[int, int]) -> InitSource:
    return read_init(path, member)


def cached_init(path: str | Path, member: int = 0) -> InitSource:
    """:func:`read_init`, read once per process while the file is unchanged (every CV task
    of a study starts from the same weights)."""
    p = Path(path)
    target = p / "metadata.json" if p.is_dir() else p
    st = target.stat() if target.exists() else None
    return _cached(str(p), member, (st.st_mtime_ns, st.st_size) if st else (0, 0))


def _backbone_mismatch(name: str, want: torch.Tensor, have: torch.Tensor | None,
                       source: InitSource) -> DfrnInputError:
    """The one-line error for the first backbone tensor that does not fit."""
    got = "is missing" if have is None else f"has shape {tuple(have.shape)}"
    return DfrnInputError(
        f"config [model] init {source.path}: tensor {name} {got} in the checkpoint but "
        f"{tuple(want.shape)} in this network (another architecture, block_strides or "
        "widen_factor?)"
    )


def apply_init(model: nn.Module, source: InitSource) -> InitReport:
    """Load ``source`` into ``model`` by name and shape (see the module docstring).

    Raises
    ------
    DfrnInputError
        When a backbone tensor is missing or has another shape, naming the first one.
    """
    target = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    head_kept = source.kind == "state_dict" and all(
        k in source.state and source.state[k].shape == v.shape
        for k, v in target.items() if k.startswith(_HEAD))
    for name, want in target.items():
        have = source.state.get(name)
        if name.startswith(_HEAD):
            if head_kept:
                new[name] = have  # type: ignore[assignment]
            continue
        if have is None and name.endswith("num_batches_tracked"):
            continue  # a counter older checkpoints lack; it changes no output
        if have is None or have.shape != want.shape:
            raise _backbone_mismatch(name, want, have, source)
        new[name] = have
    model.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in new.items()}})
    redo = () if head_kept else ("fc",)
    return InitReport(len(new), len(target), redo)


def frozen_names(model: nn.Module, how: str) -> set[str]:
    """Parameter and buffer names ``[model] freeze`` keeps fixed: none, the stem
    (``conv1``, ``bn1``) or the whole backbone (all but ``fc``)."""
    if how not in FREEZE_CHOICES:
        raise DfrnInputError(f"config [model] freeze {how!r} is not one of "
                             f"{', '.join(FREEZE_CHOICES)}")
    names = set(model.state_dict())
    if how == "stem":
        return {n for n in names if n.startswith(_STEM)}
    if how == "backbone":
        return {n for n in names if not n.startswith(_HEAD)}
    return set()


def freeze(model: nn.Module, how: str) -> list[nn.Module]:
    """Stop the gradients of the frozen parameters; return the frozen BatchNorm layers,
    which the training loop keeps in eval mode (their running statistics do not move)."""
    names = frozen_names(model, how)
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return [m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{n}.weight" in names]


def param_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the backbone at ``lr × backbone_lr_scale``, the
    output layer at ``lr``; frozen parameters left out."""
    backbone = [p for n, p in model.named_parameters()
                if p.requires_grad and not n.startswith(_HEAD)]
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(_HEAD)]
    groups = [{"params": head, "lr": lr}]  # first: the lr the history records
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_scale})
    return groups
