"""T1 images: loading, validation, normalisation, downsampling and an on-disk cache.

Normalisation (documented choice)
---------------------------------
Each image is z-scored *within the brain*: voxels inside a brain mask when one is given
(``cohort.mask``), otherwise inside the image's non-zero voxels (skull-stripped or
template-masked inputs are zero outside the brain). Voxels outside stay 0, so zero padding
carries no information. This removes scanner gain and global intensity offsets, which are
nuisance, while keeping local contrast, which is signal.

Downsampling
------------
An integer ``downsample`` factor *f* block-averages the normalised volume: the volume is
zero-padded at the end of each axis to a multiple of *f*, and each f×f×f block becomes one
voxel. Downsampled voxel (i, j, k) covers input voxels [i·f, (i+1)·f) on each axis, so its
affine is the input affine with the voxel axes scaled by *f* and the origin moved to the
block centre (:func:`downsampled_affine`).

Cache
-----
Every NIfTI is decoded once. :class:`VolumeCache` stores each normalised, downsampled volume
as a float16 ``.npy`` file keyed by the SHA-256 of the file's bytes and the preprocessing
parameters; training reads them back as memory maps. 5 factors × 10 folds × 5 repeats = 250
trainings never re-decode gzip.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dfrn.errors import DfrnInputError
from dfrn.io import atomic_write, file_digest

__all__ = [
    "GridSpec",
    "read_header",
    "load_volume",
    "check_common_grid",
    "normalise",
    "block_downsample",
    "downsampled_affine",
    "VolumeCache",
    "VolumeSet",
]

CACHE_VERSION = 1
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class GridSpec:
    """Shape and affine of an image grid."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def matches(self, other: GridSpec, atol: float = AFFINE_ATOL) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "affine": np.asarray(self.affine).round(6).tolist()}


def _open(path: Path, what: str) -> nib.spatialimages.SpatialImage:
    if not path.exists():
        raise DfrnInputError(f"{what}: image file not found: {path}")
    if not path.is_file():
        raise DfrnInputError(f"{what}: not a file: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for non-NIfTI input
        raise DfrnInputError(f"{what}: {path} is not a readable NIfTI image ({exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DfrnInputError(f"{what}: {path} is not a NIfTI image ({type(img).__name__})")
    return img


def read_header(path: str | Path, what: str = "image") -> GridSpec:
    """Read only the header: the grid of a 3D image (a trailing singleton 4th axis is allowed)."""
    img = _open(Path(path), what)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DfrnInputError(
            f"{what}: {path} has shape {shape}; a 3D T1 image is required (4D or 2D given)"
        )
    return GridSpec(shape=shape, affine=np.asarray(img.affine, dtype=float))  # type: ignore[arg-type]


def load_volume(path: str | Path, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI as float32 data and its affine, with clear errors for bad files."""
    path = Path(path)
    spec = read_header(path, what)
    img = _open(path, what)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise DfrnInputError(f"{what}: {path} is truncated or corrupt ({exc})") from None
    data = data.reshape(spec.shape)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DfrnInputError(
            f"{what}: {path} has {int(bad.sum())} NaN or inf voxels; fix or mask them first"
        )
    return data, spec.affine


def check_common_grid(
    paths: Sequence[Path], labels: Sequence[str], atol: float = AFFINE_ATOL
) -> GridSpec:
    """Check that all images share one grid (shape and affine within ``atol``).

    The reference grid is the most common one. Raises a one-line error listing the offending
    files otherwise.
    """
    specs = [read_header(p, lab) for p, lab in zip(paths, labels, strict=True)]
    groups: list[tuple[GridSpec, list[int]]] = []
    for i, s in enumerate(specs):
        for ref, members in groups:
            if ref.matches(s, atol):
                members.append(i)
                break
        else:
            groups.append((s, [i]))
    groups.sort(key=lambda g: -len(g[1]))
    ref = groups[0][0]
    if len(groups) > 1:
        bad = [i for _, members in groups[1:] for i in members]
        listed = ", ".join(f"{labels[i]} ({paths[i]}, shape {specs[i].shape})" for i in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DfrnInputError(
            f"{len(bad)} image(s) are not on the common grid (shape {ref.shape}, the affine of "
            f"the majority): {listed}{more}; register them to the template first"
        )
    return ref


def normalise(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Z-score inside ``mask`` (or inside non-zero voxels); zero outside."""
    inside = (data != 0) if mask is None else (mask & (data != 0))
    out = np.zeros_like(data, dtype=np.float32)
    values = data[inside]
    if values.size < 2:
        raise DfrnInputError("image has fewer than 2 brain voxels; cannot normalise")
    sd = float(values.std())
    out[inside] = (values - values.mean()) / (sd if sd > 0 else 1.0)
    return out


def block_downsample(data: np.ndarray, factor: int) -> np.ndarray:
    """Block-average by an integer factor (zero-padding each axis at its end)."""
    if factor == 1:
        return data.astype(np.float32, copy=False)
    pad = [(0, (-s) % factor) for s in data.shape]
    d = np.pad(data, pad)
    n = [s // factor for s in d.shape]
    return d.reshape(n[0], factor, n[1], factor, n[2], factor).mean(
        axis=(1, 3, 5), dtype=np.float32
    )


def downsampled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the block-averaged grid: voxel axes ×factor, origin at the first block's centre."""
    out = np.array(affine, dtype=float)
    out[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + affine[:3, 3]
    out[:3, :3] = affine[:3, :3] * factor
    return out




@dataclass
class VolumeSet:
    """Cached, normalised volumes of a cohort, readable by index (memory maps)."""

    participant_ids: list[str]
    files: list[Path]
    shape: tuple[int, int, int]
    input_grid: GridSpec
    downsample: int

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.load(self.files[i], mmap_mode="r")

    def index_of(self, ids: Sequence[str]) -> list[int]:
        pos = {p: i for i, p in enumerate(self.participant_ids)}
        return [pos[p] for p in ids]

    @property
    def affine(self) -> np.ndarray:
        """Affine of the (possibly downsampled) volumes."""
        return downsampled_affine(self.input_grid.affine, self.downsample)


class VolumeCache:
    """On-disk cache of preprocessed volumes (float16 ``.npy``), keyed by content and parameters."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    def _key(self, digest: str, params: dict) -> str:
        blob = json.dumps({"file": digest, "v": CACHE_VERSION, **params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def prepare(
        self,
        participant_ids: Sequence[str],
        paths: Sequence[Path],
        downsample: int = 1,
        mask_path: Path | None = None,
        progress: bool = True,
    ) -> VolumeSet:
        """Validate, normalise, downsample and cache every image (each decoded at most once)."""
        from tqdm.auto import tqdm

        if downsample < 1:
            raise DfrnInputError(f"cohort.downsample must be a positive integer, got {downsample}")
        labels = [f"participant {p}" for p in participant_ids]
        grid = check_common_grid(list(paths), labels)
        mask = None
        mask_digest = None
        if mask_path is not None:
            mask_spec = read_header(mask_path, "brain mask")
            if not mask_spec.matches(grid):
                raise DfrnInputError(
                    f"brain mask {mask_path} is not on the images' grid (shape {grid.shape})"
                )
            mask = load_volume(mask_path, "brain mask")[0] > 0
            mask_digest = file_digest(Path(mask_path))
        params = {"downsample": int(downsample), "mask": mask_digest, "norm": "zscore-brain"}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        shape: tuple[int, int, int] | None = None
        for path, label in tqdm(
            list(zip(paths, labels, strict=True)),
            desc="caching volumes",
            disable=not progress,
            unit="img",
        ):
            target = self.cache_dir / f"{self._key(file_digest(Path(path)), params)}.npy"
            if not target.exists():
                data, _ = load_volume(path, label)
                try:
                    vol = block_downsample(normalise(data, mask), downsample)
                except DfrnInputError as exc:
                    raise DfrnInputError(f"{label}: {path}: {exc}") from None
                atomic_write(target, lambda p, v=vol: np.save(p, v.astype(np.float16)))
            files.append(target)
            if shape is None:
                shape = tuple(np.load(target, mmap_mode="r").shape)  # type: ignore[assignment]
        assert shape is not None
        return VolumeSet(
            participant_ids=list(participant_ids),
            files=files,
            shape=shape,
            input_grid=grid,
            downsample=int(downsample),
        )
