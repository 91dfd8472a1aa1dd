"""Self-describing model packages: a factor's networks as safetensors plus validated metadata.

A package is a folder ``models/<factor>/`` holding

* ``model-<k>.safetensors``: the weights of each network (no pickle, so loading runs no code);
* ``metadata.json``: what the networks expect and what they were trained on (modelled on
  MONAI bundle metadata): dfrn, torch and numpy versions; the network's ``block_strides``;
  the input grid (template name, shape, affine, downsample factor), its normalisation
  (``intensity``, and the brain mask's SHA-256 with the mask itself in the package; for
  binary maps read as they are, ``values``, the training scans' values inside the mask); the
  target (name, each network's scaling mean and sd); the preprocessing; the SHA-256 of every
  training scan's file and of its content (:func:`scan_content_digest`, for the leakage
  check); the cross-validated performance; the intended use;
* ``brain_mask.nii.gz`` when training normalised inside a mask;
* ``ood.safetensors`` (schema 3): what describes the training inputs for the
  out-of-distribution check (:mod:`dfrn.models.ood`), with ``ood`` in the metadata; the
  metadata's ``conformal`` holds each fold's out-of-fold absolute residuals (participant IDs
  hashed) for CV+ intervals (:mod:`dfrn.evaluation.conformal`);
* ``README.md`` generated from the metadata;
* ``manifest.json``: size and SHA-256 of every other file (:func:`dfrn.io.write_manifest`).

:func:`load_package` checks the folder against its manifest (any edited, added or removed
file is refused by name), validates the metadata against :data:`METADATA_SCHEMA` (JSON
Schema), checks every weight file's SHA-256, and refuses packages written by a newer dfrn and
packages of schema 1 (no manifest, training scans known by file bytes only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dfrn.errors import DfrnInputError
from dfrn.io import MANIFEST_NAME, file_digest, verify_manifest

__all__ = [
    "METADATA_SCHEMA",
    "SCHEMA_VERSION",
    "ModelPackage",
    "load_package",
    "validate_metadata",
    "package_readme",
    "INTENDED_USE",
    "dfrn_version",
    "scan_content_digest",
    "hash_participant_id",
    "OOD_FILE",
    "UNCERTAINTY_SINCE",
]

#: 2: ``manifest.json`` and ``training_scans_content_sha256`` (1 had neither); 3:
#: ``conformal`` and ``ood`` (intervals and the out-of-distribution check).
SCHEMA_VERSION = 3
#: The dfrn version whose packages first carry ``conformal`` and ``ood``.
UNCERTAINTY_SINCE = "0.2.0"
OOD_FILE = "ood.safetensors"

INTENDED_USE = (
    "Research use only. Predicts a symptom-factor score from a T1-weighted MRI registered to "
    "the package's template grid, for group-level research on cohorts like the training "
    "cohort. Not a diagnostic device; not validated for individual clinical decisions."
)

_NUMBER = {"type": "number"}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

_CONFOUND_FIT = {
    "type": "object", "required": ["intercept", "coef", "columns"],
    "properties": {"intercept": _NUMBER, "coef": {"type": "array", "items": _NUMBER},
                   "columns": {"type": "array", "items": {"type": "string"}}},
}
_ADJUSTMENT = {
    "type": "object", "required": ["method", "covariates"],
    "properties": {
        "method": {"const": "residualize"},
        "covariates": {"type": "object", "required": ["columns", "levels"],
                       "properties": {"columns": {"type": "array", "items": {"type": "string"}},
                                      "levels": {"type": "object"}}},
    },
}

_CONFORMAL = {
    "type": "object", "required": ["method", "repeat", "folds"],
    "properties": {
        "method": {"const": "cv+"}, "repeat": {"type": "integer"},
        "folds": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["fold", "models", "ids_sha256", "abs_residuals"],
            "properties": {"fold": {"type": "integer"},
                           "models": {"type": "array", "minItems": 1,
                                      "items": {"type": "integer", "minimum": 0}},
                           "ids_sha256": {"type": "array", "items": _SHA},
                           "abs_residuals": {"type": "array",
                                             "items": {"type": "number", "minimum": 0}}}}},
    },
}
_OOD = {
    "type": "object", "required": ["file", "sha256", "n_calibration", "percentile"],
    "properties": {"file": {"type": "string", "pattern": r"^[A-Za-z0-9._-]+$"},
                   "sha256": _SHA, "n_calibration": {"type": "integer", "minimum": 1},
                   "percentile": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}},
}

METADATA_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "dfrn_version", "versions", "factor", "mode", "network",
                 "input", "models", "training_scans_sha256", "training_scans_content_sha256",
                 "performance", "intended_use", "preprocessing"],
    "properties": {
        "schema_version": {"type": "integer", "minimum": 1},
        "dfrn_version": {"type": "string", "pattern": r"^\d+\.\d+"},
        "versions": {"type": "object"},
        "factor": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
        "mode": {"enum": ["ensemble", "refit"]},
        "network": {
            "type": "object",
            "required": ["name", "block_strides"],
            "properties": {
                "name": {"const": "DFRN"},
                "block_strides": {"type": "array", "items": {"type": "integer", "minimum": 1},
                                  "minItems": 4, "maxItems": 4},
                "widen_factor": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "input": {
            "type": "object",
            "required": ["template", "shape", "affine", "downsample", "intensity", "mask"],
            "properties": {
                "template": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 1},
                          "minItems": 3, "maxItems": 3},
                "affine": {"type": "array", "minItems": 4, "maxItems": 4,
                           "items": {"type": "array", "items": _NUMBER, "minItems": 4,
                                     "maxItems": 4}},
                "downsample": {"type": "integer", "minimum": 1},
                "intensity": {"enum": ["zscore", "none", "minmax"]},
                "mask": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["file", "sha256"],
                    "properties": {"file": {"type": "string"}, "sha256": _SHA}}]},
                # optional (packages before it lack it): binary training maps' values
                "values": {"type": "array", "items": _NUMBER, "minItems": 1, "maxItems": 2},
            },
        },
        "models": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["file", "sha256", "y_mean", "y_std"],
                "properties": {"file": {"type": "string", "pattern": r"^[A-Za-z0-9._-]+$"},
                               "sha256": _SHA, "y_mean": _NUMBER,
                               "y_std": {"type": "number", "exclusiveMinimum": 0},
                               "confound_fit": {"oneOf": [{"type": "null"}, _CONFOUND_FIT]}},
            },
        },
        "regions": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["file", "sha256", "indices", "names", "baseline"],
            "properties": {"file": {"type": "string", "pattern": r"^[A-Za-z0-9._-]+$"},
                           "sha256": _SHA,
                           "indices": {"type": "array", "items": {"type": "integer"}},
                           "names": {"type": "array", "items": {"type": "string"}},
                           "baseline": {"enum": ["train_mean", "zero"]}}}]},
        # optional (packages before schema 3 lack them): intervals and the OOD check
        "conformal": {"oneOf": [{"type": "null"}, _CONFORMAL]},
        "ood": {"oneOf": [{"type": "null"}, _OOD]},
        "target": {"type": "object", "properties": {
            "adjustment": {"oneOf": [{"type": "null"}, _ADJUSTMENT]}}},
        "training_scans_sha256": {"type": "array", "items": _SHA},
        "training_scans_content_sha256": {"type": "array", "items": _SHA},
        "performance": {"type": "object"},
        "preprocessing": {"type": "object"},
        "intended_use": {"type": "string"},
    },
}


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def dfrn_version() -> str:
    """The installed dfrn's version."""
    from importlib import metadata

    try:
        return metadata.version("dfrn")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def validate_metadata(meta: Any, where: str = "metadata.json") -> dict[str, Any]:
    """Validate package metadata against :data:`METADATA_SCHEMA`; a one-line error if not."""
    import jsonschema

    try:
        jsonschema.validate(meta, METADATA_SCHEMA)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise DfrnInputError(
            f"{where} fails validation at {path}: {exc.message}"
        ) from None
    adjustment = (meta.get("target") or {}).get("adjustment")
    if adjustment and any(not m.get("confound_fit") for m in meta["models"]):
        raise DfrnInputError(
            f"{where} fails validation at models: a residualised package needs every model's "
            "confound_fit"
        )
    if meta["schema_version"] > SCHEMA_VERSION:
        raise DfrnInputError(
            f"{where} has schema version {meta['schema_version']}; this dfrn reads up to "
            f"{SCHEMA_VERSION}: upgrade dfrn"
        )
    current = dfrn_version()
    if _version_tuple(meta["dfrn_version"]) > _version_tuple(current):
        raise DfrnInputError(
            f"{where} was written by dfrn {meta['dfrn_version']}, newer than this dfrn "
            f"{current}: upgrade dfrn to use it"
        )
    return meta


def scan_content_digest(data: np.ndarray, affine: np.ndarray) -> str:
    """SHA-256 of a scan's content, the same for any file that holds the same image.

    The scan is brought to its closest canonical (RAS+) orientation with nibabel's
    ``as_closest_canonical``; the digest covers the shape, the float32 voxel values (after
    the header's scaling) and the affine rounded to 1e-4 mm. Re-saving (``.nii`` or
    ``.nii.gz``, any compression, another header description) or reorienting and back keeps
    the digest; a changed voxel or grid changes it.

    Parameters
    ----------
    data : np.ndarray
        The decoded voxels, e.g. from :func:`dfrn.data.images.load_volume`.
    affine : np.ndarray
        The 4x4 voxel-to-world affine.
    """
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=float))
    canon = nib.as_closest_canonical(img)
    h = hashlib.sha256()
    h.update(np.asarray(canon.shape, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(canon.dataobj, dtype="<f4").tobytes())
    h.update((np.round(canon.affine, 4) + 0.0).astype("<f8").tobytes())  # + 0.0: no -0.0
    return h.hexdigest()


def hash_participant_id(participant_id: str) -> str:
    """The SHA-256 of a participant ID's UTF-8 text: packages keep no raw IDs."""
    return hashlib.sha256(str(participant_id).encode("utf-8")).hexdigest()


def _check_files(folder: Path, meta: Any) -> None:
    """Refuse a package of schema 1, or one whose files differ from its manifest, by name."""
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and version < 2:
        raise DfrnInputError(
            f"{folder} is a model package of schema {version} (dfrn "
            f"{meta.get('dfrn_version')}): it has no manifest and knows its training scans by "
            "file bytes only; rebuild it by re-running 'dfrn run' with its study's config and "
            "--out (finished trainings are reused)"
        )
    reason = verify_manifest(folder, required=("metadata.json",))
    if reason is None:
        listed = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
        added = sorted(p.name for p in folder.iterdir()
                       if p.name != MANIFEST_NAME and p.name not in listed)
        reason = f"{added[0]} is not in the manifest (added)" if added else None
    if reason is not None:
        raise DfrnInputError(
            f"{folder}: {reason}; the package differs from what dfrn wrote: restore it, or "
            "rebuild it by re-running 'dfrn run' on its results folder"
        )


@dataclass
class ModelPackage:
    """A loaded, verified package: its metadata and its networks (as DFRNRegressor)."""

    folder: Path
    metadata: dict[str, Any]
    estimators: list[Any]

    @property
    def factor(self) -> str:
        return str(self.metadata["factor"])

    @property
    def mask_path(self) -> Path | None:
        mask = self.metadata["input"]["mask"]
        return None if mask is None else self.folder / mask["file"]

    def regions(self) -> tuple[np.ndarray, Any, list[np.ndarray | float]]:
        """The packaged atlas on the input grid and each network's ablation baseline.

        Returns
        -------
        (labels, table, baselines)
            Region labels on the input grid (int64), their ``index``/``name``/``n_voxels``
            table, and per network its neutral input (an array, or 0.0).

        Raises
        ------
        DfrnInputError
            When the package was written without an atlas.
        """
        import pandas as pd
        from safetensors.numpy import load_file

        regions = self.metadata.get("regions")
        if not regions:
            raise DfrnInputError(
                f"model {self.factor} holds no region atlas (its study ran without [attention] "
                "atlas and ablation): rerun 'dfrn run' with one to predict --regions"
            )
        arrays = load_file(str(self.folder / regions["file"]))
        labels = arrays["labels"].astype(np.int64)
        table = pd.DataFrame({"index": regions["indices"], "name": regions["names"]})
        table["n_voxels"] = [int((labels == i).sum()) for i in table["index"]]
        base: list[np.ndarray | float] = [
            arrays[f"baseline-{k}"].astype(np.float32) if regions["baseline"] == "train_mean"
            else 0.0 for k in range(len(self.estimators))]
        return labels, table, base

    def ood_arrays(self) -> dict[str, np.ndarray] | None:
        """The arrays of ``ood.safetensors`` (:mod:`dfrn.models.ood`); None without one."""
        from safetensors.numpy import load_file

        ood = self.metadata.get("ood")
        return None if not ood else load_file(str(self.folder / ood["file"]))


def load_package(folder: str | Path, device: str = "cpu") -> ModelPackage:
    """Load and verify a model package (manifest, schema, version, weight and mask digests).

    Raises
    ------
    DfrnInputError
        One line naming the file at fault.
    """
    import torch
    from safetensors.torch import load_file

    from dfrn.models.network import DFRN
    from dfrn.models.regressor import DFRNRegressor, resolve_device

    folder = Path(folder)
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        raise DfrnInputError(f"{folder} is not a dfrn model package (no metadata.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DfrnInputError(f"{meta_path} is not valid JSON ({exc})") from None
    _check_files(folder, meta)
    validate_metadata(meta, str(meta_path))
    mask = meta["input"]["mask"]
    if mask is not None:
        mpath = folder / mask["file"]
        if not mpath.is_file() or file_digest(mpath) != mask["sha256"]:
            raise DfrnInputError(f"{mpath}: missing, or not the mask the networks were trained with")
    dev = resolve_device(device)
    widen = float(meta["network"].get("widen_factor", 1.0))  # packages before the key: 1.0
    estimators = []
    for entry in meta["models"]:
        wpath = folder / entry["file"]
        if not wpath.is_file():
            raise DfrnInputError(f"{wpath}: weight file missing from the package")
        if file_digest(wpath) != entry["sha256"]:
            raise DfrnInputError(f"{wpath}: SHA-256 differs from metadata.json (file changed)")
        net = DFRN(block_strides=meta["network"]["block_strides"], widen_factor=widen)
        state = load_file(str(wpath))
        try:
            net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                 for k, v in state.items()})
        except RuntimeError as exc:
            raise DfrnInputError(f"{wpath}: weights do not fit the network ({exc})") from None
        est = DFRNRegressor(block_strides=tuple(meta["network"]["block_strides"]),
                            widen_factor=widen, device=device)
        est.device_ = dev
        est.model_ = net.to(dev).eval()
        est.y_mean_ = float(entry["y_mean"])
        est.y_std_ = float(entry["y_std"])
        est.best_epoch_ = int(entry.get("best_epoch", -1))
        estimators.append(est)
    return ModelPackage(folder, meta, estimators)


def package_readme(meta: dict[str, Any]) -> str:
    """The package's README.md, generated from its metadata."""
    inp = meta["input"]
    perf = meta["performance"]
    r = perf.get("mean_r")
    perm = perf.get("permutation_p")
    lines = [
        f"# dfrn model package: {meta['factor']}",
        "",
        f"{len(meta['models'])} network(s) ({meta['mode']}) predicting the symptom factor "
        f"**{meta['factor']}** from a T1-weighted MRI. Written by dfrn {meta['dfrn_version']}.",
        "",
        "## Input",
        f"- grid: {inp['template']}, shape {tuple(inp['shape'])}, affine rows "
        f"{inp['affine']}",
        f"- preprocessing: {meta['preprocessing'].get('kind', 'user-registered')}; "
        f"normalisation `{inp['intensity']}`"
        + (" inside the packaged brain mask" if inp["mask"] else "")
        + f"; downsample {inp['downsample']}",
        *([f"- binary maps with the values {' and '.join(f'{v:g}' for v in inp['values'])}: "
           "`dfrn predict` refuses scans with other values"] if inp.get("values") else []),
        *([f"- fine-tuned from the {meta['init']['fine_tuned_from']} (SHA-256 "
           f"{meta['init']['sha256']})"] if meta.get("init") else []),
        "",
        *_adjustment_lines(meta),
        *_uncertainty_lines(meta),
        "## Performance (cross-validated)",
        f"- mean Pearson r over repeats: {r:.3f}" if r is not None else "- not recorded",
    ]
    if perm is not None:
        lines.append(f"- permutation p: {perm:.4g}")
    lines += [
        f"- training scans: {len(meta['training_scans_sha256'])} (the SHA-256 of their files "
        "and of their content are in metadata.json; `dfrn predict` refuses them, however "
        "re-saved, unless `--allow-training-subjects`)",
        "",
        "`manifest.json` lists the size and SHA-256 of every file: `dfrn predict` refuses a "
        "package with an edited, added or removed file.",
        "",
        "## Intended use",
        meta["intended_use"],
        "",
        "## Use",
        "```bash",
        "dfrn predict MODEL_OR_RESULTS --cohort new_subjects.tsv --out predictions/",
        "```",
        "",
    ]
    return "\n".join(lines)


def _uncertainty_lines(meta: dict[str, Any]) -> list[str]:
    """The README's "Intervals and out-of-distribution check" section."""
    conformal, ood = meta.get("conformal"), meta.get("ood")
    if not conformal and not ood:
        return []
    adjusted = (meta.get("target") or {}).get("adjustment")
    lines = ["## Intervals and out-of-distribution check"]
    if conformal:
        n = sum(len(f["abs_residuals"]) for f in conformal["folds"])
        lines.append(
            f"- `lower`, `upper`: CV+ intervals (Barber et al. 2021) at `--coverage` (default "
            f"0.9) from the {len(conformal['folds'])} fold networks of repeat "
            f"{conformal['repeat']} and the out-of-fold residuals of their {n} held-out "
            "subjects: each training subject is held out once, the setting of the CV+ "
            "guarantee (coverage at least 1 - 2 alpha, about 1 - alpha in practice), in target "
            "units" + (" of the residualised score (the covariates regressed out)" if adjusted
                       else ""))
    else:
        lines.append("- no intervals: a refit package holds no fold networks")
    if ood:
        lines.append(
            f"- `ood_score`, `ood`, `ood_reason`: how a scan compares with the "
            f"{ood['n_calibration']} training scans, each judged without itself (leave one out) "
            "or by a network that did not train on it: intensity (mean and sd of the network "
            "input inside the mask), image correlation (with the training mean input) and, "
            "with fold networks, features (Mahalanobis distance of the penultimate features, "
            f"Ledoit-Wolf covariance); flagged above their {ood['percentile']:g}th percentile")
    return [*lines, ""]


def _adjustment_lines(meta: dict[str, Any]) -> list[str]:
    adjustment = (meta.get("target") or {}).get("adjustment")
    if not adjustment:
        return []
    names = ", ".join(adjustment["covariates"]["columns"])
    return [
        "## Target",
        f"The networks predict the factor **residualised on {names}** (regressed out inside "
        "each training fold). `dfrn predict` writes that residual prediction, and the full "
        "prediction (covariate part + residual) when the new cohort's table has these columns.",
        "",
    ]
