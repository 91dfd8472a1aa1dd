"""Preprocessing of one raw T1 scan with ANTsPy: template space, brain mask, gray matter.

Steps, per subject (:func:`preprocess_t1`):

1. reorient to RAS (nibabel's axis codes; ITK calls the same orientation ``LPI``);
2. N4 bias-field correction;
3. registration to the template: affine, then SyN (``antsRegistrationSyNQuick[s]``), or
   affine only (``transform = "affine"``, like Clinica's ``t1-linear``);
4. brain mask: the template's mask carried back through the inverse transform;
5. three-class k-means (Atropos, MRF 0.1) inside the mask, on intensities clipped at the
   mask's 98th percentile (so bright fat and vessels do not take a class), classes **ordered
   by mean T1 intensity**, so that 1 = CSF, 2 = GM, 3 = WM whatever order the clustering
   returns;
6. GM probability warped to the template, and **modulated GM**: warped GM × the Jacobian
   determinant of the full template→native transform (affine part included), computed from
   the composed displacement field. Its sum × the template's voxel volume is the subject's
   native GM volume.

Temporary files: ANTsPy writes some intermediates (Atropos' probability images, the
Jacobian's field) to the system's temporary folder and leaves them there. Each subject's ANTs
work runs with a private temporary folder (:func:`_private_tempdir`) that is removed
afterwards, on failure too.

Reproducibility: ANTs registration is only repeatable single-threaded (two-thread runs of the
same seed differ), so :func:`ants_environment` sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``
to 1 in deterministic mode; the sampling seed is fixed with ``random_seed``. ANTs takes a
seed of 0 as "no seed" (two processes then sample differently), so dfrn's seed ``s`` is passed
to ANTs as ``s + 1`` (:attr:`PrepParams.ants_seed`).

antspyx is an optional extra (``pip install 'dfrn[prep]'``); it is imported only here, when
needed. Nothing is downloaded at run time.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dfrn.errors import DfrnInputError

__all__ = [
    "PREP_TRANSFORMS",
    "PrepParams",
    "PrepResult",
    "require_ants",
    "ants_environment",
    "check_t1",
    "order_classes",
    "preprocess_t1",
    "registration_qc",
    "set_ants_threads",
]

#: ``transform`` choices and the ANTsPy ``type_of_transform`` each one runs.
PREP_TRANSFORMS: dict[str, str] = {
    "syn": "antsRegistrationSyNQuick[s]",
    "affine": "Affine",
}
_CLASSES = ("CSF", "GM", "WM")


def require_ants() -> Any:
    """Import antspyx, or raise a one-line error saying how to install it."""
    try:
        import ants  # type: ignore[import-not-found]
    except ImportError:
        raise DfrnInputError(
            "dfrn prep needs antspyx: pip install 'dfrn[prep]'"
        ) from None
    return ants


def ants_environment(deterministic: bool, threads: int) -> dict[str, str]:
    """Environment variables for ANTs/ITK: thread count and the random seed.

    Parameters
    ----------
    deterministic : bool
        One ITK thread, the only setting under which ANTs registration repeats exactly.
    threads : int
        Threads per subject when not deterministic.
    """
    n = 1 if deterministic else max(1, int(threads))
    return {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(n)}


@dataclass(frozen=True)
class PrepParams:
    """Settings of :func:`preprocess_t1` (validated on construction).

    Attributes
    ----------
    transform : str
        ``"syn"`` (affine then SyN) or ``"affine"``.
    seed : int
        ANTs' random seed (metric sampling).
    """

    transform: str = "syn"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.transform not in PREP_TRANSFORMS:
            raise DfrnInputError(
                f"prep transform {self.transform!r} is not one of {', '.join(PREP_TRANSFORMS)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DfrnInputError(f"prep seed must be a non-negative integer, not {self.seed!r}")

    @property
    def ants_seed(self) -> int:
        """The seed given to ANTs: ``seed + 1``, since ANTs treats 0 as unseeded."""
        return self.seed + 1


@dataclass
class PrepResult:
    """Everything :func:`preprocess_t1` computes for one subject.

    Template-space images are on the template's grid with the template's affine; native-space
    images carry the reoriented input's affine.
    """

    t1_template: nib.Nifti1Image
    mask_template: nib.Nifti1Image
    gm_template: nib.Nifti1Image
    gm_modulated: nib.Nifti1Image
    t1_native: nib.Nifti1Image
    mask_native: nib.Nifti1Image
    dseg_native: nib.Nifti1Image
    transforms: dict[str, Path]
    """``affine`` (.mat), and for SyN ``warp`` and ``inverse_warp`` (.nii.gz), in a work folder."""
    metrics: dict[str, float] = field(default_factory=dict)


def check_t1(path: str | Path, label: str) -> nib.Nifti1Image:
    """Load a T1 and refuse what cannot be one, with a one-line error naming the subject.

    Refused: unreadable files, non-3D images (a singleton 4th axis is allowed), non-finite
    values, empty or constant images, and label/mask images (fewer than 16 distinct values).
    """
    path = Path(path)
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel and gzip raise many types
        raise DfrnInputError(f"{label}: cannot read {path} as NIfTI ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DfrnInputError(f"{label}: {path.name} is {data.ndim}D {data.shape}, not a 3D T1 image")
    if min(data.shape) < 8:
        raise DfrnInputError(f"{label}: {path.name} has shape {data.shape}, too small for a T1")
    if not np.isfinite(data).all():
        raise DfrnInputError(f"{label}: {path.name} has NaN or infinite values")
    if not data.any():
        raise DfrnInputError(f"{label}: {path.name} is empty (all zeros)")
    if float(data.max()) == float(data.min()):
        raise DfrnInputError(f"{label}: {path.name} is constant ({float(data.max()):g})")
    sample = data[:: max(1, data.shape[0] // 64), :: max(1, data.shape[1] // 64)]
    if len(np.unique(sample)) < 16:
        raise DfrnInputError(
            f"{label}: {path.name} has fewer than 16 distinct values: it looks like a mask or "
            "label image, not a T1"
        )
    return nib.Nifti1Image(data, img.affine)


def order_classes(intensity: np.ndarray, labels: np.ndarray, n: int = 3) -> np.ndarray:
    """Permutation that orders segmentation classes 1..n by their mean intensity.

    Returns ``order`` such that ``order[k]`` is the original label of the k-th darkest class:
    on T1, CSF < GM < WM.
    """
    means = []
    for k in range(1, n + 1):
        sel = labels == k
        means.append(float(intensity[sel].mean()) if sel.any() else np.inf)
    return np.argsort(means, kind="stable") + 1


@contextmanager
def _private_tempdir(parent: str | Path) -> Iterator[Path]:
    """A fresh folder in ``parent`` as this process' temporary folder, removed on exit.

    ANTsPy names its intermediate files with :func:`tempfile.mktemp` and
    :class:`tempfile.NamedTemporaryFile` (``delete=False``) and never removes some of them;
    within this context they go into the private folder (``tempfile.tempdir`` and
    ``$TMPDIR`` point there), which is deleted however the block ends. Both settings are
    restored afterwards.
    """
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="ants-", dir=parent,
                                     ignore_cleanup_errors=True) as private:
        tempfile.tempdir = private
        os.environ["TMPDIR"] = private
        try:
            yield Path(private)
        finally:
            tempfile.tempdir = saved_tempdir
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env


def _checked_call(fn: Callable[..., Any], cli_options: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Call an ANTsPy function after checking that each keyword is a named parameter.

    ``ants.registration`` and ``ants.apply_transforms`` take ``**kwargs`` and ignore unknown
    keywords silently; a renamed parameter in another antspyx version must fail instead.
    ``cli_options`` names the keywords that are meant to pass through ``**kwargs`` to the
    ANTs command line (e.g. Atropos' ``r``).
    """
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        named |= set(cli_options)
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise RuntimeError(
            f"ants.{fn.__name__} in this antspyx has no parameter {', '.join(unknown)}; "
            "install a supported antspyx (pip install 'dfrn[prep]')"
        )
    return fn(**kwargs)


def _seed_registration(ants: Any, seed: int) -> dict[str, Any]:
    """Fix the registration's sampling seed, whichever way this antspyx takes it.

    antspyx <= 0.6.1 has a ``random_seed`` argument; 0.6.3 replaced it by the global
    ``ants.config.set_ants_deterministic(on, seed_value)`` (which also sets one ITK thread
    when on). Returns the keyword arguments to add to ``ants.registration``.
    """
    if "random_seed" in inspect.signature(ants.registration).parameters:
        return {"random_seed": seed}
    config = getattr(ants, "config", None)
    setter = getattr(config, "set_ants_deterministic", None)
    if setter is None:
        raise RuntimeError(
            "this antspyx takes no registration seed (neither random_seed nor "
            "ants.config.set_ants_deterministic); install a supported antspyx "
            "(pip install 'dfrn[prep]')"
        )
    one_thread = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS") == "1"
    setter(one_thread, seed)
    return {}


def _kmeans_segmentation(ants: Any, image: Any, mask: Any, k: int = 3, mrf: float = 0.1) -> Any:
    """``ants.kmeans_segmentation`` with Atropos' constant seed (``-r 0``).

    The wrapper leaves Atropos' default, a random seed per call, so two runs of one scan
    differ; this is the same call (normalised image, hole-filled mask, k-means start, MRF
    smoothing, 5 iterations) with the random seed switched off.
    """
    normalised = ants.iMath(image, "Normalize")
    kmask = ants.iMath(mask, "FillHoles").threshold_image(1, 2)
    nhood = "x".join(["1"] * image.dimension)
    return _checked_call(ants.atropos, a=normalised, x=kmask, i=f"kmeans[{k}]",
                         m=f"[{mrf},{nhood}]", c="[5,0]", r=0, cli_options=("r",))


def _to_nifti(ants_mod: Any, image: Any, affine: np.ndarray, dtype: Any) -> nib.Nifti1Image:
    """An ANTs image as NIfTI with the given affine (the grid's own, not a re-derived one)."""
    data = np.asarray(image.numpy(), dtype=dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    return img


def registration_qc(
    mask_template: np.ndarray, template_mask: np.ndarray, t1_template: np.ndarray,
    template_t1: np.ndarray,
) -> dict[str, float]:
    """Dice of the subject's brain mask with the template's, and T1 correlation in the brain.

    Dice measures how much of the template's brain the subject's image covers after the
    round trip (clipped field of view, failed inverse); the correlation measures alignment.
    """
    a, b = mask_template > 0.5, template_mask > 0.5
    denom = a.sum() + b.sum()
    dice = float(2.0 * (a & b).sum() / denom) if denom else 0.0
    x, y = t1_template[b].astype(float), template_t1[b].astype(float)
    corr = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0
    return {"dice": dice, "corr": corr}


def preprocess_t1(
    t1: str | Path,
    template_t1: str | Path,
    template_mask: str | Path,
    params: PrepParams,
    workdir: str | Path,
    label: str = "subject",
) -> PrepResult:
    """Run the full preprocessing of one T1 (see the module docstring).

    Parameters
    ----------
    t1 : str or Path
        Raw T1 image, any orientation, with or without skull.
    template_t1, template_mask : str or Path
        Registration target and its brain mask.
    params : PrepParams
        Transform and seed.
    workdir : str or Path
        Folder for ANTs' transform files (the caller renames them into place) and for the
        private temporary folder of ANTs' intermediates (removed before returning).
    label : str
        Subject label for error messages.

    Returns
    -------
    PrepResult
    """
    ants = require_ants()
    with _private_tempdir(workdir):
        return _preprocess(ants, t1, template_t1, template_mask, params, Path(workdir), label)


def _preprocess(ants: Any, t1: str | Path, template_t1: str | Path, template_mask: str | Path,
                params: PrepParams, workdir: Path, label: str) -> PrepResult:
    """The steps of :func:`preprocess_t1`, in the temporary folder it sets."""
    # Atropos (the k-means segmentation) seeds its random numbers from this variable, and
    # from the clock without it
    os.environ["ANTS_RANDOM_SEED"] = str(params.ants_seed)
    start = time.perf_counter()
    native = check_t1(t1, label)
    tpl_nib = nib.load(template_t1)
    img, aff_n = _read_ras(ants, native, workdir)
    tpl = ants.image_read(str(template_t1)).astype("float32")
    tpl_mask = ants.image_read(str(template_mask)).astype("float32")

    n4 = _checked_call(ants.n4_bias_field_correction, image=img)
    reg = _register(ants, tpl, n4, params, workdir)
    mask_native = _checked_call(
        ants.apply_transforms, fixed=n4, moving=tpl_mask, transformlist=reg.inverse,
        whichtoinvert=[p.endswith(".mat") for p in reg.inverse], interpolator="nearestNeighbor",
    )
    if float(mask_native.numpy().sum()) == 0:
        raise DfrnInputError(f"{label}: registration failed (the brain mask maps outside the image)")
    tissues = _segment_tissues(ants, n4, mask_native)
    warped = _warp_to_template(ants, tpl, n4, tissues.gm_native, mask_native, reg, workdir)

    aff_t = tpl_nib.affine
    out = PrepResult(
        t1_template=_to_nifti(ants, warped.t1, aff_t, np.float32),
        mask_template=_to_nifti(ants, warped.mask, aff_t, np.uint8),
        gm_template=nib.Nifti1Image(warped.gm, aff_t),
        gm_modulated=nib.Nifti1Image(warped.modulated, aff_t),
        t1_native=_to_nifti(ants, n4, aff_n, np.float32),
        mask_native=_to_nifti(ants, mask_native, aff_n, np.uint8),
        dseg_native=nib.Nifti1Image(tissues.dseg, aff_n),
        transforms=reg.transform_files(),
    )
    qc = registration_qc(out.mask_template.get_fdata(), np.asarray(tpl_mask.numpy()),
                         out.t1_template.get_fdata(), np.asarray(tpl.numpy()))
    out.metrics = _prep_metrics(qc, tissues, warped, start)
    return out


def _read_ras(ants: Any, native: nib.Nifti1Image, workdir: Path) -> tuple[Any, np.ndarray]:
    """``native`` reoriented to RAS, as a float32 ANTs image, and its affine."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        native_path = Path(tmp) / "native.nii.gz"
        ras = nib.as_closest_canonical(native)
        nib.save(ras, native_path)
        img = ants.image_read(str(native_path)).astype("float32")
    return img, ras.affine


@dataclass(frozen=True)
class _Registration:
    """The transform files of a registration to the template."""

    forward: list[str]
    """Native → template (``transformlist`` of :func:`ants.apply_transforms`)."""
    inverse: list[str]
    """Template → native."""

    def transform_files(self) -> dict[str, Path]:
        """``affine``, and for SyN ``warp`` and ``inverse_warp``, by their ANTs file names."""
        files: dict[str, Path] = {}
        for p in self.forward + self.inverse:
            name = Path(p).name
            if name.endswith("GenericAffine.mat"):
                files["affine"] = Path(p)
            elif name.endswith("InverseWarp.nii.gz"):
                files["inverse_warp"] = Path(p)
            elif name.endswith("Warp.nii.gz"):
                files["warp"] = Path(p)
        return files


def _register(ants: Any, tpl: Any, n4: Any, params: PrepParams, workdir: Path) -> _Registration:
    """Register the bias-corrected T1 to the template (transform and seed of ``params``)."""
    reg = _checked_call(
        ants.registration,
        fixed=tpl,
        moving=n4,
        type_of_transform=PREP_TRANSFORMS[params.transform],
        outprefix=str(workdir / "xfm_"),
        verbose=False,
        **_seed_registration(ants, params.ants_seed),
    )
    return _Registration(list(reg["fwdtransforms"]), list(reg["invtransforms"]))


@dataclass(frozen=True, eq=False)
class _Tissues:
    """The native-space segmentation and the numbers taken from it."""

    dseg: np.ndarray
    """1 = CSF, 2 = GM, 3 = WM (ordered by mean T1 intensity)."""
    gm_native: Any
    """GM probability (ANTs image)."""
    class_means: dict[str, float]
    """Mean bias-corrected T1 intensity per class."""
    gm_ml: float
    brain_ml: float


def _segment_tissues(ants: Any, n4: Any, mask_native: Any) -> _Tissues:
    """Three-class k-means inside the mask, on intensities clipped at its 98th percentile."""
    # bright fat and vessels inside the carried-back mask would otherwise take a class of
    # their own (on IXI034 GM fell to 269 ml): cluster intensities clipped at the mask's 98th
    # percentile
    inside = mask_native.numpy() > 0
    n4_np = n4.numpy()
    ceiling = float(np.percentile(n4_np[inside], 98))
    seg_input = n4.new_image_like(np.minimum(n4_np, ceiling).astype(np.float32))
    seg = _kmeans_segmentation(ants, seg_input, mask_native)
    labels = seg["segmentation"].numpy()
    order = order_classes(n4.numpy(), labels)
    probs = [seg["probabilityimages"][int(k) - 1] for k in order]
    dseg = np.zeros(labels.shape, dtype=np.uint8)
    for new, old in enumerate(order, start=1):
        dseg[labels == old] = new
    intensity = n4.numpy()
    class_means = {c: float(intensity[dseg == i].mean()) if (dseg == i).any() else float("nan")
                   for i, c in enumerate(_CLASSES, start=1)}
    gm_native = probs[1]
    native_voxel_ml = float(np.prod(n4.spacing)) / 1000.0
    gm_ml = float(gm_native.numpy().sum()) * native_voxel_ml
    brain_ml = float(inside.sum()) * native_voxel_ml
    return _Tissues(dseg, gm_native, class_means, gm_ml, brain_ml)


@dataclass(frozen=True, eq=False)
class _TemplateImages:
    """The subject's images warped to the template."""

    t1: Any
    """Bias-corrected T1 (ANTs image)."""
    mask: Any
    """Brain mask (ANTs image)."""
    gm: np.ndarray
    """GM probability, clipped to [0, 1]."""
    modulated: np.ndarray
    """``gm`` × the Jacobian determinant of the template → native transform."""
    voxel_ml: float
    """The template's voxel volume."""


def _warp_to_template(ants: Any, tpl: Any, n4: Any, gm_native: Any, mask_native: Any,
                      reg: _Registration, workdir: Path) -> _TemplateImages:
    """Warp T1, GM and mask to the template; modulate GM by the transform's Jacobian."""
    fwd = reg.forward
    t1_tpl = _checked_call(ants.apply_transforms, fixed=tpl, moving=n4, transformlist=fwd,
                           interpolator="linear")
    gm_tpl = _checked_call(ants.apply_transforms, fixed=tpl, moving=gm_native, transformlist=fwd,
                           interpolator="linear")
    mask_tpl = _checked_call(ants.apply_transforms, fixed=tpl, moving=mask_native,
                             transformlist=fwd, interpolator="nearestNeighbor")
    field_path = _checked_call(ants.apply_transforms, fixed=tpl, moving=n4, transformlist=fwd,
                               compose=str(workdir / "composed_"))
    jac = _checked_call(ants.create_jacobian_determinant_image, domain_image=tpl,
                        tx=str(field_path), do_log=False, geom=False)
    Path(field_path).unlink(missing_ok=True)
    gm_t = np.clip(gm_tpl.numpy(), 0.0, 1.0).astype(np.float32)
    jac_np = jac.numpy().astype(np.float32)
    modulated = (gm_t * jac_np).astype(np.float32)
    tpl_voxel_ml = float(np.prod(tpl.spacing)) / 1000.0
    return _TemplateImages(t1_tpl, mask_tpl, gm_t, modulated, tpl_voxel_ml)


def _prep_metrics(qc: dict[str, float], tissues: _Tissues, warped: _TemplateImages,
                  start: float) -> dict[str, float]:
    """The QC metrics of one subject: registration QC, volumes, class means and runtime."""
    gm_ml, brain_ml = tissues.gm_ml, tissues.brain_ml
    return {
        **qc,
        "gm_ml": gm_ml,
        "gm_fraction": gm_ml / brain_ml if brain_ml else float("nan"),
        "gm_modulated_ml": float(warped.modulated.sum()) * warped.voxel_ml,
        "t1_mean_csf": tissues.class_means["CSF"],
        "t1_mean_gm": tissues.class_means["GM"],
        "t1_mean_wm": tissues.class_means["WM"],
        "runtime_s": time.perf_counter() - start,
    }


def set_ants_threads(deterministic: bool, threads: int) -> None:
    """Apply :func:`ants_environment` to this process (before ANTs runs anything)."""
    os.environ.update(ants_environment(deterministic, threads))
