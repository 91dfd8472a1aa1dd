"""T1 images: loading, validation, normalisation, downsampling and an on-disk cache.

Normalisation (documented choice)
---------------------------------
Each image is normalised *within its region*: the voxels of the brain mask when one is given
(``[cohort] mask``; all mask voxels, zero-valued ones included), otherwise the image's
non-zero voxels (skull-stripped or template-masked inputs are zero outside the brain).
Voxels outside the region are set to 0, so zero padding carries no information. NaN or inf
voxels outside the brain mask are therefore harmless and set to 0; inside it (or anywhere,
without a mask) they are refused with an error naming the subject, the file and the count.
``intensity`` (``[cohort] intensity``) picks what happens inside the region:

intensity : {"zscore", "none", "minmax"}, default "zscore"
    ``"zscore"``
        ``(x - mean) / sd`` over the region (``sd == 0`` divides by 1). This removes scanner
        gain and global intensity offsets, which are nuisance, while keeping local contrast,
        which is signal. The default, for T1 intensities.
    ``"none"``
        Values unchanged inside the region, 0 outside (without a mask the data are returned
        unchanged). Use it for maps whose values already mean something across subjects,
        such as binary lesion masks or probability maps: z-scoring a 0/1 map per subject
        turns "lesioned" into a number that depends on the lesion's size.
    ``"minmax"``
        ``(x - min) / (max - min)`` over the region, so the region spans [0, 1]
        (``max == min`` gives 0); 0 outside.

``"zscore"`` and ``"minmax"`` need at least 2 voxels in the region.

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
as a float16 ``<key>.npy`` file keyed by the SHA-256 of the file's bytes and the preprocessing
parameters (downsample, mask digest, intensity); training reads them back as memory maps.
5 factors × 10 folds × 5 repeats = 250 trainings never re-decode gzip.

Next to each ``<key>.npy`` a sidecar ``<key>.json`` records the SHA-256 of the ``.npy``
bytes, the source image and summary statistics of the cached volume (``min``, ``max``,
``std``) and ``n_unique_le_2`` (the input has at most 2 distinct values in its region, i.e.
looks binary). The ``.npy`` is written first and the sidecar second, both atomically, so an
entry without a sidecar is incomplete. Every :meth:`VolumeCache.prepare` re-hashes each
entry against its sidecar and rebuilds truncated, replaced or incomplete entries from their
NIfTI. It then refuses subjects whose cached volume is constant (``std == 0``, e.g. all zero)
and warns when binary-looking images are z-scored. Under ``intensity="none"`` a constant
volume is a real observation (an empty lesion map): it is only warned about, unless every
subject's volume is constant (a training cohort without variation), which is refused unless
``allow_constant`` (``dfrn predict``, where one subject's empty map is a valid input).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dfrn.config import INTENSITY_MODES
from dfrn.errors import DfrnInputError, listed
from dfrn.io import atomic_write, atomic_write_json, file_digest

__all__ = [
    "GridSpec",
    "ImageLike",
    "load_img",
    "as_3d",
    "image_name",
    "read_header",
    "load_volume",
    "check_common_grid",
    "normalise",
    "block_downsample",
    "downsampled_affine",
    "few_distinct_values",
    "VolumeCache",
    "VolumeSet",
    "INTENSITY_MODES",
]

ImageLike = nib.spatialimages.SpatialImage | str | Path
"""A nibabel image or the path of an image file."""

CACHE_VERSION = 2
"""Accepted values of ``intensity`` (see the module docstring)."""
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def image_name(img_or_path: ImageLike, fallback: str) -> str:
    """The file an image came from, for messages.

    Parameters
    ----------
    img_or_path : nibabel image, str or Path
        An image or the path of one.
    fallback : str
        Returned for an in-memory image that has no file name.

    Returns
    -------
    str
        The path, the image's file name, or ``fallback``.
    """
    if isinstance(img_or_path, str | Path):
        return str(img_or_path)
    fname = img_or_path.get_filename() if hasattr(img_or_path, "get_filename") else None
    return str(fname) if fname else fallback


def load_img(
    img_or_path: ImageLike, what: str = "image", *, noun: str = "image"
) -> nib.spatialimages.SpatialImage:
    """The one image loader of dfrn: a 3D nibabel image from a path or an image.

    Only the header is read; the voxel data stay on disk until they are accessed.

    Parameters
    ----------
    img_or_path : nibabel image, str or Path
        A file to open, or an already loaded nibabel image (returned as is once checked).
    what : str, default "image"
        What the image is (``"participant sub-01"``, ``"atlas image"``), for messages.
    noun : str, default "image"
        What a 3D image is called in the message for a wrong shape (``"T1 image"``).

    Returns
    -------
    nibabel.spatialimages.SpatialImage
        The image; its shape is 3D, or 4D with a singleton 4th axis (see :func:`as_3d`).

    Raises
    ------
    DfrnInputError
        One line naming the file when it does not exist, is not a file, cannot be read as an
        image, or is not 3D; or when ``img_or_path`` is neither a path nor an image.
    """
    if isinstance(img_or_path, str | Path):
        path = Path(img_or_path)
        if not path.exists():
            raise DfrnInputError(f"{what}: image file not found ({path} does not exist)")
        if path.is_dir():
            raise DfrnInputError(f"{what}: {path} is a folder, not a NIfTI file")
        if not path.is_file():
            raise DfrnInputError(f"{what}: not a file: {path}")
        try:
            img = nib.load(str(path))
        except Exception as exc:  # nibabel raises several types for non-image input
            raise DfrnInputError(
                f"{what}: {path} is not a readable NIfTI image ({_one_line(exc)})"
            ) from None
    elif hasattr(img_or_path, "affine") and hasattr(img_or_path, "dataobj"):
        img = img_or_path
    else:
        raise DfrnInputError(
            f"{what} is not a nibabel image or a path: {type(img_or_path).__name__}"
        )
    shape = tuple(int(s) for s in img.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DfrnInputError(
            f"{what}: {image_name(img_or_path, 'the image')} has shape {shape}; "
            f"a 3D {noun} is required ({len(shape)}D given)"
        )
    return img


def as_3d(data: np.ndarray, name: str) -> np.ndarray:
    """Drop a singleton 4th axis; refuse anything that is not then 3D.

    Parameters
    ----------
    data : np.ndarray
        Voxel data of an image (or any array).
    name : str
        The image's name or file, for the message.

    Returns
    -------
    np.ndarray
        ``data`` as a 3D array (a view when a 4th axis was dropped).

    Raises
    ------
    DfrnInputError
        When ``data`` is not 3D (nor 4D with a singleton 4th axis).
    """
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DfrnInputError(f"{name} must be a 3-D image, got shape {data.shape}")
    return data


def _load_nifti(path: str | Path, what: str) -> nib.spatialimages.SpatialImage:
    """:func:`load_img` for cohort images, which must be NIfTI files."""
    img = load_img(Path(path), what, noun="T1 image")
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DfrnInputError(f"{what}: {path} is not a NIfTI image ({type(img).__name__})")
    return img


def _grid(img: nib.spatialimages.SpatialImage) -> GridSpec:
    shape = tuple(int(s) for s in img.shape[:3])
    return GridSpec(shape=shape, affine=np.asarray(img.affine, dtype=float))  # type: ignore[arg-type]


def read_header(path: str | Path, what: str = "image") -> GridSpec:
    """Read only the header: the grid of a 3D NIfTI image (a singleton 4th axis is allowed).

    Parameters
    ----------
    path : str or Path
        The NIfTI file.
    what : str, default "image"
        What the file is, for messages.

    Returns
    -------
    GridSpec
        Shape and affine of the image.

    Raises
    ------
    DfrnInputError
        See :func:`load_img`; also for a readable image that is not NIfTI.
    """
    return _grid(_load_nifti(path, what))


def load_volume(
    path: str | Path, what: str = "image", mask: np.ndarray | None = None, *,
    nan_hint: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI as float32 data and its affine, with clear errors for bad files.

    Parameters
    ----------
    path : str or Path
        The NIfTI file.
    what : str, default "image"
        What the file is, for messages.
    mask : np.ndarray or None, optional
        Boolean brain mask of the image's shape. NaN and inf voxels outside it are set to 0
        (they are outside the region every computation uses); inside it they are refused.
        Without a mask, every NaN or inf voxel is refused.
    nan_hint : str or None, optional
        What the user can do about NaN or inf voxels in an image read without a mask, for
        the message; by default, fix them or set ``[cohort] mask``.

    Returns
    -------
    data : np.ndarray
        float32, 3D, finite.
    affine : np.ndarray
        4×4 voxel-to-world affine.

    Raises
    ------
    DfrnInputError
        See :func:`read_header`; also for truncated or corrupt data and NaN or inf voxels
        (inside ``mask`` when given).
    """
    path = Path(path)
    img = _load_nifti(path, what)
    spec = _grid(img)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise DfrnInputError(f"{what}: {path} is truncated or corrupt ({exc})") from None
    data = data.reshape(spec.shape)
    bad = ~np.isfinite(data)
    if not bad.any():
        return data, spec.affine
    if mask is None:
        hint = nan_hint or "fix them, or set [cohort] mask to a brain mask that leaves them outside"
        raise DfrnInputError(f"{what}: {path} has {int(bad.sum())} NaN or inf voxels; {hint}")
    inside = int((bad & mask).sum())
    if inside:
        raise DfrnInputError(
            f"{what}: {path} has {inside} NaN or inf voxels inside the brain mask (and "
            f"{int(bad.sum()) - inside} outside it, which are ignored); fix them"
        )
    data[bad] = 0.0
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
        named = [f"{labels[i]} ({paths[i]}, shape {specs[i].shape})" for i in bad]
        raise DfrnInputError(
            f"{len(bad)} image(s) are not on the common grid (shape {ref.shape}, the affine of "
            f"the majority): {listed(named, 10)}; register them to the template first"
        )
    return ref


def _check_intensity(intensity: str) -> str:
    if intensity not in INTENSITY_MODES:
        raise DfrnInputError(
            f"unknown intensity normalisation {intensity!r}; use one of "
            + ", ".join(repr(m) for m in INTENSITY_MODES)
        )
    return intensity


def _region(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Boolean region of ``data``: all of ``mask`` when given, else the non-zero voxels."""
    if mask is None:
        return data != 0
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape:
        raise DfrnInputError(f"brain mask has shape {mask.shape}, the image {data.shape}")
    return mask


def few_distinct_values(values: np.ndarray, limit: int = 2) -> list[float] | None:
    """The sorted distinct values of ``values`` when there are at most ``limit``, else None.

    Linear time in ``values.size`` for a small ``limit`` (no sort of the voxels): the test
    of whether an image looks binary (e.g. a 0/1 lesion map inside its brain mask).

    Parameters
    ----------
    values : np.ndarray
        Any array (e.g. an image's voxels inside its brain mask); NaN is not expected.
    limit : int, default 2
        The most distinct values to collect.

    Returns
    -------
    list of float or None
        ``[]`` for an empty array, ``[0.0, 1.0]`` for a binary map, None for more values.
    """
    found: list[float] = []
    rest = np.asarray(values).ravel()
    while rest.size:
        if len(found) == limit:
            return None
        first = rest[0]
        found.append(float(first))
        rest = rest[rest != first]
    return sorted(found)


def _at_most_two_values(values: np.ndarray) -> bool:
    """Whether ``values`` holds at most 2 distinct values (linear time, no sort)."""
    return few_distinct_values(values, 2) is not None


def _normalise(data: np.ndarray, region: np.ndarray, intensity: str) -> np.ndarray:
    """Normalise inside ``region`` (0 outside); a region under 2 voxels gives zeros."""
    out = np.zeros(data.shape, dtype=np.float32)
    values = data[region].astype(np.float64)
    if intensity == "none":
        out[region] = values
    elif values.size >= 2:
        if intensity == "zscore":
            sd = float(values.std())
            out[region] = (values - values.mean()) / (sd if sd > 0 else 1.0)
        else:  # minmax
            lo, hi = float(values.min()), float(values.max())
            out[region] = (values - lo) / (hi - lo) if hi > lo else 0.0
    return out


def normalise(
    data: np.ndarray, mask: np.ndarray | None = None, intensity: str = "zscore"
) -> np.ndarray:
    """Normalise an image inside its region and set it to 0 outside.

    Parameters
    ----------
    data : np.ndarray
        3D image.
    mask : np.ndarray or None, optional
        Brain mask of ``data``'s shape (truthy = inside). When given, the region is every
        mask voxel, zero-valued ones included; otherwise the non-zero voxels of ``data``.
    intensity : {"zscore", "none", "minmax"}, default "zscore"
        ``"zscore"``: ``(x - mean) / sd`` over the region (``sd == 0`` divides by 1);
        ``"none"``: values unchanged; ``"minmax"``: ``(x - min) / (max - min)`` (0 when
        ``max == min``). See the module docstring.

    Returns
    -------
    np.ndarray
        float32 array of ``data``'s shape.

    Raises
    ------
    DfrnInputError
        For an unknown ``intensity``, or when ``"zscore"``/``"minmax"`` get a region of
        fewer than 2 voxels.
    """
    _check_intensity(intensity)
    region = _region(data, mask)
    if intensity != "none" and int(region.sum()) < 2:
        raise DfrnInputError("image has fewer than 2 brain voxels; cannot normalise")
    return _normalise(data, region, intensity)


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
    """Cached, normalised volumes of a cohort, readable by index (memory maps).

    Attributes
    ----------
    participant_ids : list of str
        One per volume, in order.
    files : list of Path
        The cached float16 ``.npy`` files.
    shape : tuple of int
        Shape of every (possibly downsampled) volume.
    input_grid : GridSpec
        Grid of the input images.
    downsample : int
        Block-averaging factor.
    stats : list of dict
        Per-volume sidecar records (``sha256``, ``source``, ``min``, ``max``, ``std``,
        ``n_unique_le_2``, ...), in the order of ``files``.
    intensity : str
        Intensity normalisation the volumes went through.
    """

    participant_ids: list[str]
    files: list[Path]
    shape: tuple[int, int, int]
    input_grid: GridSpec
    downsample: int
    stats: list[dict[str, Any]] = field(default_factory=list)
    intensity: str = "zscore"

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


def _check_input_variation(labels: Sequence[str], stats: Sequence[dict[str, Any]],
                           intensity: str, allow_constant: bool = False) -> None:
    """Refuse constant network inputs; warn about binary maps under z-scoring.

    Under ``intensity="none"`` constant inputs (an empty lesion map) are only warned about,
    unless every subject's is, which is refused unless ``allow_constant``.

    Raises
    ------
    DfrnInputError
        One line listing the subjects whose cached volume is constant (``std == 0``).
    """
    rows = list(zip(labels, stats, strict=True))
    constant = [lab for lab, st in rows if st["std"] == 0]
    if intensity == "zscore":
        binary = [lab for lab, st in rows if st["n_unique_le_2"] and st["std"] > 0]
        if binary:
            warnings.warn(
                f"{len(binary)} image(s) look binary (at most 2 distinct values inside the "
                f"brain region): {listed(binary, 3)}; intensity='zscore' rescales each "
                'one by its own mean and SD, so set [cohort] intensity = "none" for '
                "binary maps such as lesion masks",
                UserWarning,
                stacklevel=3,
            )
    if constant and intensity == "none" and (allow_constant or len(constant) < len(rows)):
        # raw values: an empty map is a real observation (e.g. no lesion); the network
        # still sees the other subjects' variation
        warnings.warn(
            f"{len(constant)} subject(s) have constant network inputs under "
            f"intensity='none' (e.g. an empty lesion map): {listed(constant, 3)}",
            UserWarning,
            stacklevel=3,
        )
        constant = []
    if constant:
        # binary maps that z-scoring flattened (e.g. 0/1 lesion maps without a mask)
        flattened = [
            lab
            for lab, st in rows
            if st["std"] == 0 and st["n_unique_le_2"] and st["input_nonzero"] > 0
        ]
        hint = (
            f"; {len(flattened)} of them are non-empty images with at most 2 distinct "
            f"values that intensity={intensity!r} flattens: set [cohort] intensity = "
            '"none" for binary maps such as lesion masks'
            if flattened and intensity != "none"
            else ""
        )
        raise DfrnInputError(
            f"{len(constant)} subject(s) have constant or all-zero network inputs after "
            f"intensity={intensity!r} normalisation: {listed(constant, 10)}; check the "
            f"images and [cohort] mask/intensity{hint}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


def _check_prepare_args(participant_ids: Sequence[str], paths: Sequence[Path], downsample: int,
                        intensity: str, digests: Sequence[str] | None) -> list[str]:
    """Check :meth:`VolumeCache.prepare`'s arguments; return one label per image."""
    if downsample < 1:
        raise DfrnInputError(f"cohort.downsample must be a positive integer, got {downsample}")
    _check_intensity(intensity)
    if digests is not None and len(digests) != len(paths):
        raise ValueError(f"digests has {len(digests)} entries for {len(paths)} paths")
    labels = [f"participant {p}" for p in participant_ids]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} participant ids for {len(paths)} paths")
    return labels


@dataclass(frozen=True, eq=False)
class _CacheParams:
    """What a cache entry depends on besides its image: downsampling, mask and intensity."""

    downsample: int
    intensity: str
    shape: tuple[int, int, int]
    """Shape of every cached (downsampled) volume."""
    mask: np.ndarray | None = None
    mask_digest: str | None = None

    @classmethod
    def from_mask(cls, mask_path: Path | None, grid: GridSpec, downsample: int,
                  intensity: str) -> _CacheParams:
        """Read the brain mask, when given, after checking that it lies on ``grid``."""
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
        shape: tuple[int, int, int] = tuple(-(-s // downsample) for s in grid.shape)  # type: ignore[assignment]
        return cls(downsample, intensity, shape, mask, mask_digest)

    def key(self) -> dict[str, Any]:
        """The parameters in the cache key."""
        return {
            "downsample": int(self.downsample),
            "mask": self.mask_digest,
            "norm": "brain-region",
            "intensity": self.intensity,
        }

    def sidecar(self, digest: str) -> dict[str, Any]:
        """The parameters recorded in the sidecar of the entry of the image ``digest``."""
        return {
            "input_sha256": digest,
            "intensity": self.intensity,
            "downsample": int(self.downsample),
            "mask_sha256": self.mask_digest,
        }


class VolumeCache:
    """On-disk cache of preprocessed volumes (float16 ``.npy``), keyed by content and parameters.

    Each ``<key>.npy`` has a ``<key>.json`` sidecar holding ``sha256`` (of the ``.npy``
    bytes), ``source`` (the image path it was built from), ``input_sha256``, ``intensity``,
    ``downsample``, ``mask_sha256``, ``shape``, ``min``, ``max``, ``std`` (of the cached
    volume), ``n_unique_le_2`` (the input has at most 2 distinct values in its region) and
    ``input_nonzero`` (non-zero input voxels in the region).

    Parameters
    ----------
    cache_dir : str or Path
        Folder of the cache; created on first use.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    def _key(self, digest: str, params: dict) -> str:
        blob = json.dumps({"file": digest, "v": CACHE_VERSION, **params}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @staticmethod
    def _verify(
        npy: Path, sidecar: Path, shape: tuple[int, ...]
    ) -> tuple[dict[str, Any] | None, str]:
        """Check an existing entry; return ``(stats, "")`` or ``(None, reason)``."""
        if not sidecar.is_file():
            return None, f"sidecar {sidecar.name} is missing"
        try:
            stats = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"sidecar {sidecar.name} is unreadable: {exc}"
        if not (
            isinstance(stats, dict)
            and isinstance(stats.get("sha256"), str)
            and all(_is_number(stats.get(k)) for k in ("min", "max", "std"))
            and isinstance(stats.get("n_unique_le_2"), bool)
            and _is_number(stats.get("input_nonzero"))
        ):
            return None, f"sidecar {sidecar.name} lacks a field or has a bad value"
        try:
            digest = file_digest(npy)
        except OSError as exc:
            return None, f"{npy.name} is unreadable: {exc}"
        if digest != stats["sha256"]:
            return None, f"SHA-256 of {npy.name} does not match its sidecar"
        try:
            arr = np.load(npy, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            return None, f"{npy.name} cannot be loaded: {exc}"
        if tuple(arr.shape) != tuple(shape) or arr.dtype != np.float16:
            return None, f"{npy.name} holds {arr.dtype} {tuple(arr.shape)}, not float16 {shape}"
        return stats, ""

    @staticmethod
    def _build(
        npy: Path,
        path: Path,
        label: str,
        mask: np.ndarray | None,
        downsample: int,
        intensity: str,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Decode, normalise, downsample and write ``npy`` and its sidecar; return the stats."""
        data, _ = load_volume(path, label, mask)
        region = _region(data, mask)
        if intensity != "none" and int(region.sum()) < 2:
            # cached as zeros: refused below together with every other constant input
            vol = np.zeros(data.shape, dtype=np.float32)
        else:
            vol = _normalise(data, region, intensity)
        vol = block_downsample(vol, downsample)
        biggest = float(np.abs(vol).max()) if vol.size else 0.0
        if biggest > float(np.finfo(np.float16).max):
            raise DfrnInputError(
                f"{label}: {path}: intensities up to {biggest:g} overflow the float16 cache "
                f"under intensity={intensity!r}; use intensity 'zscore' or 'minmax'"
            )
        vol16 = vol.astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, vol16)
        raw = buf.getvalue()
        v64 = vol16.astype(np.float64)
        stats: dict[str, Any] = {
            "version": CACHE_VERSION,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "source": str(path),
            **extra,
            "shape": list(vol16.shape),
            "min": float(v64.min()),
            "max": float(v64.max()),
            "std": float(v64.std()),
            "n_unique_le_2": _at_most_two_values(data[region]),
            "input_nonzero": int(np.count_nonzero(data[region])),
        }
        atomic_write(npy, lambda p: p.write_bytes(raw))
        atomic_write_json(npy.with_suffix(".json"), stats)
        return stats

    def prepare(
        self, participant_ids: Sequence[str], paths: Sequence[Path], downsample: int = 1,
        mask_path: Path | None = None, progress: bool = True, intensity: str = "zscore",
        digests: Sequence[str] | None = None, log: Callable[[str], None] = print,
        allow_constant: bool = False,
    ) -> VolumeSet:
        """Validate, normalise, downsample and cache every image (each decoded at most once).

        Existing entries are checked against their sidecar (SHA-256 of the ``.npy``, loadable,
        right shape); a corrupt or incomplete one is rebuilt from its NIfTI and logged.

        Parameters
        ----------
        participant_ids : sequence of str
            One id per image.
        paths : sequence of Path
            3D NIfTI images, all on one grid.
        downsample : int, default 1
            Block-averaging factor.
        mask_path : Path or None, optional
            Brain mask on the images' grid; it defines the normalisation region.
        progress : bool, default True
            Show a progress bar.
        intensity : {"zscore", "none", "minmax"}, default "zscore"
            Intensity normalisation (see the module docstring); part of the cache key.
        digests : sequence of str or None, optional
            SHA-256 hex digests of ``paths`` (in order) if known; else :func:`dfrn.io.file_digest`.
        log : callable, default print
            Receives one line per rebuilt entry.
        allow_constant : bool, default False
            Under ``intensity="none"``, accept images whose volumes are all constant (only
            warned about): ``dfrn predict`` on one subject's empty lesion map. A training
            cohort keeps the default, which refuses a cohort with no variation at all.

        Returns
        -------
        VolumeSet
            The cached volumes, with their sidecar ``stats``.

        Raises
        ------
        DfrnInputError
            For a bad ``downsample`` or ``intensity``, images off the common grid, an unreadable
            image or mask, and (one error for all of them) subjects whose cached volume is
            constant (``std == 0``, including all zero); see :func:`_check_input_variation`.

        Warns
        -----
        UserWarning
            Once, when ``intensity="zscore"`` and images have at most 2 values in their region.
        """
        labels = _check_prepare_args(participant_ids, paths, downsample, intensity, digests)
        grid = check_common_grid(list(paths), labels)
        params = _CacheParams.from_mask(mask_path, grid, downsample, intensity)
        files, stats = self._cache_all(participant_ids, paths, labels, digests, params, log,
                                       progress)
        _check_input_variation(labels, stats, intensity, allow_constant)
        return VolumeSet(participant_ids=list(participant_ids), files=files, shape=params.shape,
                         input_grid=grid, downsample=int(downsample), stats=stats,
                         intensity=intensity)

    def _cache_all(
        self, participant_ids: Sequence[str], paths: Sequence[Path], labels: Sequence[str],
        digests: Sequence[str] | None, params: _CacheParams, log: Callable[[str], None],
        progress: bool,
    ) -> tuple[list[Path], list[dict[str, Any]]]:
        """The verified (or rebuilt) entry of every image, in order, with a progress bar."""
        from tqdm.auto import tqdm

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        all_stats: list[dict[str, Any]] = []
        for i, (path, label, pid) in enumerate(
            tqdm(
                list(zip(paths, labels, participant_ids, strict=True)),
                desc="caching volumes",
                disable=not progress,
                unit="img",
            )
        ):
            path = Path(path)
            digest = digests[i] if digests is not None else file_digest(path)
            target, stats = self._cached_or_built(path, digest, label, pid, params, log)
            files.append(target)
            all_stats.append(stats)
        return files, all_stats

    def _cached_or_built(
        self, path: Path, digest: str, label: str, pid: str, params: _CacheParams,
        log: Callable[[str], None],
    ) -> tuple[Path, dict[str, Any]]:
        """One image's entry and stats: verified when present, else (re)built and reported."""
        target = self.cache_dir / f"{self._key(digest, params.key())}.npy"
        stats: dict[str, Any] | None = None
        if target.exists():
            stats, reason = self._verify(target, target.with_suffix(".json"), params.shape)
            if stats is None:
                log(
                    f"cache entry for participant {pid} was corrupt or incomplete "
                    f"({reason}); rebuilt from {path}"
                )
        if stats is None:
            stats = self._build(target, path, label, params.mask, params.downsample,
                                params.intensity, params.sidecar(digest))
        return target, stats
