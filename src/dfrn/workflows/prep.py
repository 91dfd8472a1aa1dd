"""``dfrn prep``: raw T1 scans (or fMRIPrep derivatives) → a BIDS-derivatives folder.

Output layout (``OUT``)::

    dataset_description.json        DatasetType "derivative", GeneratedBy dfrn <version>
    prep.json                       the settings that make the outputs (refused if they differ)
    qc.tsv                          participant_id, dice, corr, gm_ml, runtime_s, status, note …
    cohort.tsv                      participant_id, the input table's other columns as they
                                    are (less the image column), source_t1 (absolute path of
                                    the scan), t1, gm, gm_unmodulated, mask (preprocessed,
                                    relative paths), prep_status: usable as [cohort] table
    desc-dseg.tsv                   the segmentation's labels (1 CSF, 2 GM, 3 WM)
    sub-<l>[/ses-<l>]/
        manifest.json, qc.json      size and SHA-256 of every file; the subject's QC row
        anat/sub-<l>[_ses-<l>]_space-<S>_res-<r>_desc-preproc_T1w.nii.gz
             …_space-<S>_res-<r>_desc-brain_mask.nii.gz
             …_space-<S>_res-<r>_label-GM_probseg.nii.gz
             …_space-<S>_res-<r>_label-GM_desc-modulated_probseg.nii.gz
             …_desc-preproc_T1w.nii.gz, …_desc-brain_mask.nii.gz, …_dseg.nii.gz (native, RAS)
             …_from-T1w_to-<S>_mode-image_xfm.mat (+ desc-warp_xfm.nii.gz and
             the inverse warp for SyN)
        figures/…_space-<S>_desc-qc_T1w.png

``<S>`` is the template's space label (MNI152NLin6Asym by default; see
:mod:`dfrn.data.templates`), ``<r>`` its voxel size in mm.

Each subject is an independent task in its own process (``jobs`` at a time), or a Ray task
with ``--executor ray`` (the output folder must then be on storage every worker sees). Its files are
written into a hidden temporary folder, listed in ``manifest.json`` and renamed into place
when complete, so a finished subject is all there or absent. A re-run skips subjects whose
manifest verifies and whose input file is unchanged; a failed subject gets ``status =
failed`` and its one-line error in ``qc.tsv`` while the others go on.

QC thresholds (``dice_min = 0.90``, ``corr_min = 0.40`` by default, and a GM share of the
brain mask between 0.2 and 0.7): a subject outside any is ``flagged``, kept in ``cohort.tsv`` with ``prep_status = flagged``, and ``dfrn run`` warns
about it. ``dice`` is the Dice of the subject's brain mask in template space with the
template's mask (field-of-view coverage, inverse consistency); ``corr`` is the correlation of
the warped T1 with the template inside the brain (alignment).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dfrn.config import ExecutorConfig
from dfrn.data.templates import Template, resolve_template
from dfrn.errors import DfrnInputError, PrepFailedError, ResultsFolderError, listed
from dfrn.executors import Executor, make_executor
from dfrn.io import (
    atomic_write_json,
    atomic_write_text,
    atomic_write_tsv,
    file_digest,
    make_temp_dir,
    verify_manifest,
    write_manifest,
)

if TYPE_CHECKING:
    from dfrn.data.prep import PrepParams

__all__ = [
    "PrepSubject",
    "PrepSummary",
    "plan_prep_subjects",
    "run_prep",
    "prep_task",
    "select_participants",
    "verify_prep",
    "QC_COLUMNS",
    "GM_FRACTION",
]

#: Columns of ``qc.tsv`` (``session`` only when a subject has one).
QC_COLUMNS = (
    "participant_id", "session", "dice", "corr", "gm_ml", "gm_fraction", "runtime_s", "status",
    "note",
    "t1_mean_csf", "t1_mean_gm", "t1_mean_wm",
)
#: Columns that ``cohort.tsv`` adds after the input table's own (the image column excepted).
COHORT_COLUMNS = ("source_t1", "t1", "gm", "gm_unmodulated", "mask", "prep_status")
#: Plausible share of GM in the brain mask; outside it the segmentation is flagged.
GM_FRACTION = (0.2, 0.7)
_TMP_PREFIX = "prep-"
_LABEL = re.compile(r"[^A-Za-z0-9]")
_DSEG_TSV = "index\tname\n1\tCSF\n2\tGM\n3\tWM\n"


@dataclass(frozen=True)
class PrepSubject:
    """One unit of ``dfrn prep``: a participant (and session) and where its images are."""

    participant_id: str
    label: str
    session: str
    t1: Path | None
    derivatives: dict[str, Path] | None = None

    @property
    def stem(self) -> str:
        """``sub-<label>[_ses-<session>]``: the prefix of every file name."""
        return f"sub-{self.label}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def folder(self) -> Path:
        """The subject's folder relative to the output root."""
        base = Path(f"sub-{self.label}")
        return base / f"ses-{self.session}" if self.session else base

    def source_files(self) -> list[Path]:
        if self.derivatives is not None:
            return [self.derivatives[k] for k in ("t1", "mask", "gm")]
        assert self.t1 is not None
        return [self.t1]


@dataclass
class PrepSummary:
    """What :func:`run_prep` did."""

    out: Path
    qc: pd.DataFrame
    cohort_table: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return self.qc.loc[self.qc["status"] == "failed", "participant_id"].tolist()

    @property
    def flagged(self) -> list[str]:
        return self.qc.loc[self.qc["status"] == "flagged", "participant_id"].tolist()

    def failure_message(self) -> str:
        rows = self.qc[self.qc["status"] == "failed"]
        notes = [str(r.note) for r in rows.itertuples()]
        return (
            f"dfrn prep: {len(rows)} of {len(self.qc)} subject(s) failed: {listed(notes, 3, '; ')} "
            f"(see {self.out / 'qc.tsv'}); fix the files and rerun, or remove the subjects"
        )


def _bids_label(pid: str) -> str:
    raw = pid[4:] if pid.startswith("sub-") else pid
    label = _LABEL.sub("", raw)
    if not label:
        raise DfrnInputError(f"participant {pid}: no letters or digits to use as a BIDS label")
    return label


def plan_prep_subjects(
    source: str | Path | None,
    image_column: str = "t1",
    session: str | None = None,
    derivatives: str | Path | None = None,
    space: str = "MNI152NLin6Asym",
) -> tuple[pd.DataFrame, list[PrepSubject]]:
    """The participants table and one :class:`PrepSubject` per participant.

    Parameters
    ----------
    source : str or Path or None
        A BIDS root or a TSV/CSV table with ``participant_id`` (and ``image_column`` unless
        the images come from ``derivatives``). None with ``derivatives``: every ``sub-*``
        folder of the derivatives (and its ``participants.tsv`` when present).
    image_column : str
        Table column of raw T1 paths (relative to the table's folder unless absolute).
    session : str, optional
        BIDS session label to use when subjects have several.
    derivatives : str or Path, optional
        An fMRIPrep/sMRIPrep derivatives root to take template-space images from.
    space : str
        The template's space label: the ``space-`` entity of the derivatives' images.
    """
    deriv = Path(derivatives).resolve() if derivatives else None
    if deriv is not None and not deriv.is_dir():
        raise DfrnInputError(f"derivatives folder not found: {deriv}")
    inputs = _read_inputs(source, image_column, session, deriv, space)
    _check_table_columns(inputs.table, image_column,
                         Path(source) if source is not None else deriv)
    subjects: list[PrepSubject] = []
    labels: dict[str, str] = {}
    for pid in inputs.table.index:
        label = _bids_label(str(pid))
        if label in labels:
            raise DfrnInputError(
                f"participants {labels[label]} and {pid} give the same BIDS label sub-{label}"
            )
        labels[label] = str(pid)
        subjects.append(_plan_subject(inputs, pid, label))
    if not subjects:
        raise DfrnInputError("dfrn prep: the input lists no participants")
    return inputs.table, subjects


@dataclass(frozen=True)
class _PrepInputs:
    """Where :func:`plan_prep_subjects` finds each participant's images."""

    table: pd.DataFrame
    image_column: str
    session: str | None
    space: str
    derivatives: Path | None
    bids_root: Path | None = None
    base: Path | None = None
    """The table's folder, for relative image paths."""


def _read_inputs(source: str | Path | None, image_column: str, session: str | None,
                 deriv: Path | None, space: str) -> _PrepInputs:
    """The participants table of ``source`` (or of the derivatives), and where images are."""
    from dfrn.data.cohort import read_table

    if source is None:
        if deriv is None:
            raise DfrnInputError("dfrn prep needs INPUT (a BIDS root or a table), or --from-derivatives")
        table = _folder_table(deriv, f"no sub-* folders in the derivatives folder {deriv}")
        return _PrepInputs(table, image_column, session, space, deriv)
    src = Path(source).resolve()
    if src.is_dir():
        table = _folder_table(src, f"{src} has no participants.tsv and no sub-* folders")
        return _PrepInputs(table, image_column, session, space, deriv, bids_root=src)
    if not src.is_file():
        raise DfrnInputError(f"dfrn prep input not found: {src}")
    table = read_table(src)
    if deriv is None and image_column not in table.columns:
        raise DfrnInputError(
            f"image column {image_column!r} is not in {src} "
            f"(available: {', '.join(map(str, table.columns))})"
        )
    return _PrepInputs(table, image_column, session, space, deriv, base=src.parent)


def _folder_table(folder: Path, none_found: str) -> pd.DataFrame:
    """A folder's ``participants.tsv``, else its ``sub-*`` folders (``none_found``: the error
    when there are none)."""
    from dfrn.data.cohort import read_table

    if (folder / "participants.tsv").is_file():
        return read_table(folder / "participants.tsv")
    ids = sorted(p.name for p in folder.glob("sub-*") if p.is_dir())
    if not ids:
        raise DfrnInputError(none_found)
    return pd.DataFrame(index=pd.Index(ids, name="participant_id"))


def _plan_subject(inputs: _PrepInputs, pid: Any, label: str) -> PrepSubject:
    """One participant's :class:`PrepSubject`: its derivatives, BIDS T1 or table T1."""
    from dfrn.data.cohort import find_bids_t1
    from dfrn.data.derivatives import find_derivative_images

    ses = inputs.session or ""
    if inputs.derivatives is not None:
        imgs = find_derivative_images(inputs.derivatives, str(pid), inputs.session, inputs.space)
        found = re.search(r"_ses-([A-Za-z0-9]+)_", imgs.t1.name)
        return PrepSubject(str(pid), label, found.group(1) if found else ses, None,
                           {"t1": imgs.t1, "mask": imgs.mask, "gm": imgs.gm})
    if inputs.bids_root is not None:
        t1 = find_bids_t1(inputs.bids_root, str(pid), inputs.session)
        found = re.search(r"_ses-([A-Za-z0-9]+)_", t1.name)
        ses = found.group(1) if found else ses
    else:
        t1 = _table_t1(inputs, pid)
    if t1.is_dir():
        raise DfrnInputError(
            f"participant {pid}: column {inputs.image_column!r} names a folder, not a NIfTI file: {t1}"
        )
    if not t1.is_file():
        raise DfrnInputError(f"participant {pid}: image file not found: {t1}")
    return PrepSubject(str(pid), label, ses, t1.resolve())


def _table_t1(inputs: _PrepInputs, pid: Any) -> Path:
    """The T1 path in the table's image column (relative to the table's folder)."""
    value = inputs.table.at[pid, inputs.image_column]
    if pd.isna(value) or str(value).strip() == "":
        raise DfrnInputError(f"participant {pid}: no image path in column {inputs.image_column!r}")
    t1 = Path(str(value).strip())
    assert inputs.base is not None
    return t1 if t1.is_absolute() else inputs.base / t1


def _source_digest(subject: PrepSubject) -> str:
    h = hashlib.sha256()
    for p in subject.source_files():
        h.update(file_digest(p).encode())
    return h.hexdigest()


def _identity(kind: str, transform: str, seed: int, deterministic: bool,
              template: Template) -> dict[str, Any]:
    """The settings that make a prep folder's outputs; another run into it must match."""
    return {
        "kind": kind,
        "transform": transform if kind == "raw" else None,
        "seed": seed if kind == "raw" else None,
        "deterministic": deterministic if kind == "raw" else None,
        "template_sha256": file_digest(template.t1),
        "template_mask_sha256": file_digest(template.mask),
        "space": template.space,
    }


def _check_out(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a folder that is not empty and is not a prep of the same settings."""
    info_path = out / "prep.json"
    if info_path.is_file():
        try:
            recorded = json.loads(info_path.read_text(encoding="utf-8")).get("identity")
        except Exception:
            recorded = None
        if recorded != identity:
            diff = sorted(k for k in identity if (recorded or {}).get(k) != identity[k])
            raise ResultsFolderError(
                f"{out} holds a dfrn prep made with other settings ({', '.join(diff) or 'unreadable prep.json'}); "
                "choose another --out"
            )
        return
    if out.exists() and not out.is_dir():
        raise ResultsFolderError(f"output path {out} exists and is not a folder")
    if out.is_dir():
        # lock files and temporary folders of a process that is starting in it too
        ours = (".dfrn", f".{_TMP_PREFIX}", ".storage-check")
        extra = sorted(p.name for p in out.iterdir() if not p.name.startswith(ours))
        if extra:
            raise ResultsFolderError(
                f"output folder {out} is not empty and holds no dfrn prep (found "
                f"{', '.join(extra[:3])}); choose another --out"
            )


def _res_entity(mm: float) -> str:
    return f"res-{mm:g}".replace(".", "p")


def _names(subject: PrepSubject, res: str, tpl: str) -> dict[str, str]:
    """File names of a subject's outputs, relative to its folder (``tpl``: the space label)."""
    s, space = subject.stem, f"space-{tpl}_{res}"
    return {
        "t1": f"anat/{s}_{space}_desc-preproc_T1w.nii.gz",
        "mask": f"anat/{s}_{space}_desc-brain_mask.nii.gz",
        "gm_unmodulated": f"anat/{s}_{space}_label-GM_probseg.nii.gz",
        "gm": f"anat/{s}_{space}_label-GM_desc-modulated_probseg.nii.gz",
        "t1_native": f"anat/{s}_desc-preproc_T1w.nii.gz",
        "mask_native": f"anat/{s}_desc-brain_mask.nii.gz",
        "dseg_native": f"anat/{s}_dseg.nii.gz",
        "affine": f"anat/{s}_from-T1w_to-{tpl}_mode-image_xfm.mat",
        "warp": f"anat/{s}_from-T1w_to-{tpl}_mode-image_desc-warp_xfm.nii.gz",
        "inverse_warp": f"anat/{s}_from-{tpl}_to-T1w_mode-image_desc-warp_xfm.nii.gz",
        "qc_png": f"figures/{s}_space-{tpl}_desc-qc_T1w.png",
    }


def _one_line(subject: PrepSubject, exc: BaseException) -> str:
    if isinstance(exc, DfrnInputError):
        text = str(exc)
        return text if subject.participant_id in text else f"participant {subject.participant_id}: {text}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"participant {subject.participant_id}: {type(exc).__name__}: {first}"


def _init_worker(env: dict[str, str]) -> None:
    os.environ.update(env)


def _process_subject(job: dict[str, Any]) -> dict[str, Any]:
    """Preprocess one subject into its final folder; return its QC row (never raises)."""
    import nibabel as nib

    from dfrn.plotting import plot_registration_qc

    subject: PrepSubject = job["subject"]
    out = Path(job["out"])
    names = _names(subject, job["res"], job["space"])
    start = time.perf_counter()
    tmp = make_temp_dir(out, _TMP_PREFIX + subject.stem)
    try:
        (tmp / "anat").mkdir()
        (tmp / "figures").mkdir()
        template = nib.load(job["template"])
        if subject.derivatives is None:
            metrics, note = _preprocess_raw(subject, job, tmp, names)
        else:
            metrics, note = _import_derivatives(subject, template, job["template_mask"], tmp, names)
        metrics["runtime_s"] = time.perf_counter() - start
        plot_registration_qc(
            tmp / names["t1"], job["template_mask"], tmp / names["qc_png"],
            title=f"{subject.stem}  Dice {metrics['dice']:.3f}  r {metrics['corr']:.3f}",
        )
        row = {"participant_id": subject.participant_id, "session": subject.session,
               **metrics, "note": note, "source_sha256": job["source_sha256"],
               "files": {k: v for k, v in names.items() if (tmp / v).is_file()}}
        atomic_write_json(tmp / "qc.json", row)
        write_manifest(tmp, recursive=True)
        _move_into_place(tmp, out, subject)
        return row
    except BaseException as exc:  # a failed subject must not stop the others
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return {"participant_id": subject.participant_id, "session": subject.session,
                "status": "failed", "note": _one_line(subject, exc),
                "runtime_s": time.perf_counter() - start}


def _preprocess_raw(subject: PrepSubject, job: dict[str, Any], tmp: Path,
                    names: dict[str, str]) -> tuple[dict[str, float], str]:
    """Preprocess a raw T1 into ``tmp`` (ANTs); its QC metrics and note (none)."""
    from dfrn.data.prep import PrepParams, preprocess_t1
    from dfrn.io import atomic_write_nifti

    work = tmp / ".work"
    work.mkdir()
    result = preprocess_t1(subject.t1, job["template"], job["template_mask"],
                           PrepParams(job["transform"], job["seed"]), work,
                           label=f"participant {subject.participant_id}")
    images = {
        "t1": result.t1_template, "mask": result.mask_template,
        "gm_unmodulated": result.gm_template, "gm": result.gm_modulated,
        "t1_native": result.t1_native, "mask_native": result.mask_native,
        "dseg_native": result.dseg_native,
    }
    for key, img in images.items():
        atomic_write_nifti(img, tmp / names[key])
    for key, src in result.transforms.items():
        shutil.copyfile(src, tmp / names[key])
    shutil.rmtree(work)
    return dict(result.metrics), ""


def _move_into_place(tmp: Path, out: Path, subject: PrepSubject) -> None:
    """Rename a complete subject folder into place, replacing (then removing) an old one."""
    final = out / subject.folder
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        trash = make_temp_dir(out, _TMP_PREFIX + "old-" + subject.stem)
        os.replace(final, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


def _import_derivatives(subject: PrepSubject, template: Any, template_mask: str, tmp: Path,
                        names: dict[str, str]) -> tuple[dict[str, float], str]:
    import nibabel as nib

    from dfrn.data.derivatives import resample_to_template
    from dfrn.data.images import load_img
    from dfrn.data.prep import registration_qc
    from dfrn.io import atomic_write_nifti

    assert subject.derivatives is not None
    imgs = {}
    for key, interp in (("t1", "continuous"), ("mask", "nearest"), ("gm", "continuous")):
        img = load_img(subject.derivatives[key], f"participant {subject.participant_id} {key}")
        imgs[key] = resample_to_template(img, template, interp)
    mask_data = (imgs["mask"].get_fdata() > 0.5).astype(np.uint8)
    mask_img = nib.Nifti1Image(mask_data, template.affine)
    atomic_write_nifti(imgs["t1"], tmp / names["t1"])
    atomic_write_nifti(mask_img, tmp / names["mask"])
    atomic_write_nifti(imgs["gm"], tmp / names["gm_unmodulated"])
    tpl_mask = np.asarray(nib.load(template_mask).dataobj)
    qc = registration_qc(mask_data, tpl_mask, imgs["t1"].get_fdata(),
                         np.asarray(template.dataobj, dtype=np.float32))
    metrics = {**qc, "gm_ml": float("nan")}
    return metrics, "GM from fMRIPrep is not modulated (concentration, not volume)"


def _finished_row(
    out: Path, subject: PrepSubject, digest: str
) -> tuple[dict[str, Any] | None, str, bool]:
    """The subject's QC row when its folder is intact and made from this input; else None,
    why not, and whether the reason is a changed input."""
    folder = out / subject.folder
    if not folder.exists():
        return None, "", False
    problem = verify_manifest(folder, required=("qc.json",))
    if problem is not None:
        return None, f"{subject.stem} failed its check ({problem}); re-running it", False
    row = json.loads((folder / "qc.json").read_text(encoding="utf-8"))
    if row.get("source_sha256") != digest:
        return None, f"{subject.stem}: its input changed since it was preprocessed", True
    return row, "", False


def _status(row: dict[str, Any], dice_min: float, corr_min: float) -> tuple[str, str]:
    if row.get("status") == "failed":
        return "failed", str(row.get("note", ""))
    flags = []
    if not row.get("dice", 0.0) >= dice_min:
        flags.append(f"dice {row.get('dice', float('nan')):.3f} < {dice_min:g}")
    if not row.get("corr", 0.0) >= corr_min:
        flags.append(f"corr {row.get('corr', float('nan')):.3f} < {corr_min:g}")
    fraction = row.get("gm_fraction")
    if fraction is not None and np.isfinite(fraction) and not GM_FRACTION[0] <= fraction <= GM_FRACTION[1]:
        flags.append(f"GM fraction {fraction:.2f} outside {GM_FRACTION[0]:g}–{GM_FRACTION[1]:g}")
    note = "; ".join(filter(None, [*flags, str(row.get("note") or "")]))
    return ("flagged" if flags else "ok"), note


def run_prep(
    source: str | Path | None, out: str | Path, *, image_column: str = "t1",
    session: str | None = None, derivatives: str | Path | None = None, transform: str = "syn",
    seed: int = 0, deterministic: bool = True, template: str | Path | None = None,
    template_mask: str | Path | None = None, template_space: str | None = None, jobs: int = 1,
    dice_min: float = 0.90, corr_min: float = 0.40, progress: bool = True,
    log: Callable[[str], None] = print, changed_input: str = "rerun",
    raise_on_failure: bool = True, executor: Executor | None = None,
    participants: Sequence[str] | None = None,
) -> PrepSummary:
    """Preprocess a cohort into ``out`` (see the module docstring); resumable.

    Parameters
    ----------
    source : str or Path or None
        BIDS root or table (see :func:`plan_prep_subjects`).
    out : str or Path
        The derivatives folder.
    transform, seed, deterministic : str, int, bool
        Registration settings (:class:`dfrn.data.prep.PrepParams`); deterministic runs one ITK
        thread per subject.
    template, template_mask : str or Path, optional
        See :func:`dfrn.data.templates.resolve_template`.
    template_space : str, optional
        The BIDS space label of ``template`` (required unless its file name is TemplateFlow's
        ``tpl-<label>_…``); the outputs are named ``space-<label>``.
    jobs : int
        Subjects preprocessed at once, each in its own process.
    dice_min, corr_min : float
        QC thresholds below which a subject is flagged.
    changed_input : {"rerun", "refuse"}
        What to do with a finished subject whose input file changed.
    raise_on_failure : bool
        Raise :class:`dfrn.errors.PrepFailedError` naming the failed subjects, after
        ``qc.tsv`` and ``cohort.tsv`` are written.
    executor : Executor, optional
        A Ray or SLURM executor (:func:`dfrn.executors.make_executor`) runs each
        subject as a Ray task or a SLURM job (``jobs`` is then the executor's business); None
        or a local executor uses ``jobs`` spawned processes on this machine.
    participants : sequence of str, optional
        The BIDS-Apps participant level: only these labels (without ``sub-``), each under a
        lock of its own, so that one process per subject can write into ``out`` at once;
        ``qc.tsv`` and ``cohort.tsv`` then list every subject whose folder is there.

    Returns
    -------
    PrepSummary
        Failed subjects are listed in it and in ``qc.tsv``.
    """
    args = _PrepArgs(image_column, session, derivatives, transform, seed, deterministic,
                     template, template_mask, template_space, jobs, dice_min, corr_min, progress,
                     log, changed_input, raise_on_failure, executor, participants)
    run = _start_prep(source, Path(out).resolve(), args)
    with _prep_locks(run.out, run.locked, log):
        summary = _prep_locked(run, args)
    return _report(summary, raise_on_failure, log)


@dataclass(frozen=True)
class _PrepArgs:
    """The arguments of :func:`run_prep` after ``source`` and ``out``, in its order."""

    image_column: str
    session: str | None
    derivatives: str | Path | None
    transform: str
    seed: int
    deterministic: bool
    template: str | Path | None
    template_mask: str | Path | None
    template_space: str | None
    jobs: int
    dice_min: float
    corr_min: float
    progress: bool
    log: Callable[[str], None]
    changed_input: str
    raise_on_failure: bool
    executor: Executor | None
    participants: Sequence[str] | None


@dataclass(frozen=True)
class _PrepRun:
    """What one :func:`run_prep` call prepares before it takes the locks."""

    out: Path
    kind: str
    """``"raw"`` or ``"derivatives"``."""
    params: PrepParams
    tpl: Template
    identity: dict[str, Any]
    table: pd.DataFrame
    subjects: list[PrepSubject]
    chosen: list[PrepSubject]
    locked: list[PrepSubject] | None
    """The participant level's subjects, each under a lock of its own (None: the whole folder)."""


def _start_prep(source: str | Path | None, out: Path, args: _PrepArgs) -> _PrepRun:
    """Check the arguments, the template, the folder and the subjects (nothing is written)."""
    from dfrn.data.prep import PrepParams, require_ants

    if args.jobs < 1:
        raise DfrnInputError(f"--jobs must be at least 1, got {args.jobs}")
    if args.changed_input not in ("rerun", "refuse"):
        raise ValueError(args.changed_input)
    kind = "derivatives" if args.derivatives else "raw"
    params = PrepParams(args.transform, args.seed)
    tpl = resolve_template(args.template, args.template_mask, args.template_space)
    identity = _identity(kind, params.transform, params.seed, args.deterministic, tpl)
    _check_out(out, identity)
    table, subjects = plan_prep_subjects(source, args.image_column, args.session,
                                         args.derivatives, tpl.space)
    chosen = select_participants(subjects, args.participants, source or args.derivatives)
    executor = args.executor
    if args.participants is not None and executor is not None and executor.name != "local":
        raise DfrnInputError(
            "the participant level preprocesses its subjects in this process (run one job-array "
            f"element per subject); for one {executor.name} task per subject use 'dfrn prep "
            f"--executor {executor.name}'"
        )
    if kind == "raw":
        require_ants()
    return _PrepRun(out, kind, params, tpl, identity, table, subjects, chosen,
                    chosen if args.participants is not None else None)


def _prep_locked(run: _PrepRun, args: _PrepArgs) -> PrepSummary:
    """Under the locks: write the folder's files, preprocess the subjects to do, write the
    tables."""
    out, executor = run.out, args.executor
    if executor is not None and getattr(executor, "folder", "") is None:
        executor.attach(out / "logs" / executor.name, args.log)  # not yet attached to a study's
    _remove_stale(out, run.locked)
    with _tables_lock(out):  # a process with other settings may have started meanwhile
        _check_out(out, run.identity)
        _write_folder_files(out, run.identity, run.tpl, run.kind, run.params.transform)
    rows, todo, digests = _finished_rows(out, run.chosen, args.changed_input, args.log)
    jobs_list = [{
        "subject": s, "out": str(out), "res": _res_entity(run.tpl.resolution_mm),
        "template": str(run.tpl.t1), "template_mask": str(run.tpl.mask), "space": run.tpl.space,
        "transform": run.params.transform, "seed": run.params.seed,
        "source_sha256": digests[s.stem],
    } for s in todo]
    for row in _run_subjects(jobs_list, args.jobs, args.deterministic, executor, out,
                             args.progress):
        rows[_stem_of(row, run.subjects)] = row
    with _tables_lock(out):  # participant processes of one folder take turns here
        if args.participants is not None:  # the other subjects, as their folders say
            _record_failures(out, run.chosen, rows)
            rows = _recorded_rows(out, run.subjects, exclude=rows) | rows
        present = [s for s in run.subjects if s.stem in rows]
        qc = _write_tables(out, run.table, present, rows, args.dice_min, args.corr_min,
                           args.image_column)
    skipped = [s.participant_id for s in run.chosen if s not in todo]
    return PrepSummary(out, qc, out / "cohort.tsv", processed=[s.participant_id for s in todo],
                       skipped=skipped)


def _run_subjects(jobs_list: list[dict[str, Any]], jobs: int, deterministic: bool,
                  executor: Executor | None, out: Path, progress: bool) -> list[dict[str, Any]]:
    """Preprocess the subjects to do: as executor tasks, else ``jobs`` local processes."""
    from dfrn.data.prep import ants_environment

    threads = max(1, (os.cpu_count() or 1) // min(jobs, max(1, len(jobs_list))))
    env = ants_environment(deterministic, threads)
    if executor is not None and executor.name != "local":
        return _run_on_executor(executor, jobs_list, env, out, progress)
    return _run_pool(jobs_list, jobs, env, progress)


def _report(summary: PrepSummary, raise_on_failure: bool, log: Callable[[str], None]) -> PrepSummary:
    """Log QC flags; raise for failed subjects (when asked); log where the cohort is."""
    if summary.flagged:
        log(f"dfrn prep: {len(summary.flagged)} subject(s) flagged by QC: "
            f"{', '.join(summary.flagged[:5])} (see qc.tsv and the figures)")
    if summary.failed and raise_on_failure:
        raise PrepFailedError(summary.failure_message())
    log(f"dfrn prep: {len(summary.qc) - len(summary.failed)} subject(s) in {summary.cohort_table}")
    return summary


def select_participants(subjects: list[PrepSubject], labels: Sequence[str] | None,
                        source: Any) -> list[PrepSubject]:
    """The subjects named by BIDS ``labels`` (without ``sub-``; a participant_id also works),
    in the dataset's order; all of them for None. An unknown label is a one-line error."""
    if labels is None:
        return list(subjects)
    known = {s.label: s for s in subjects} | {s.participant_id: s for s in subjects}
    wanted = [str(x).removeprefix("sub-") if str(x) not in known else str(x) for x in labels]
    unknown = [x for x in wanted if x not in known]
    if unknown:
        some = ", ".join(s.label for s in subjects[:5]) + (" …" if len(subjects) > 5 else "")
        raise DfrnInputError(
            f"participant label {unknown[0]!r} is not in {source} (its labels: {some}); give "
            "labels without 'sub-'"
        )
    picked = {known[x].stem for x in wanted}
    return [s for s in subjects if s.stem in picked]


@contextlib.contextmanager
def _prep_locks(out: Path, participants: list[PrepSubject] | None,
                log: Callable[[str], None]) -> Iterator[None]:
    """The whole folder's lock (``dfrn prep``), or the folder's lock shared plus one lock per
    subject (the participant level: one process per subject can run at once, e.g. from a
    job array). A whole-folder run and participant processes exclude each other.
    """
    from dfrn.workflows.lock import ResultsLock, shared_lock

    with contextlib.ExitStack() as stack:
        if participants is None:
            stack.enter_context(ResultsLock(out, command="dfrn prep", log=log))
        else:
            stack.enter_context(shared_lock(out))
            for s in participants:
                stack.enter_context(_subject_lock(out, s, log))
        yield


def _subject_lock(out: Path, subject: PrepSubject | str, log: Callable[[str], None]) -> Any:
    from dfrn.workflows.lock import ResultsLock

    stem = subject if isinstance(subject, str) else subject.stem
    return ResultsLock(out, command="dfrn prep (participant level)", log=log,
                       name=f".dfrn-{stem}.lock", what=f"participant {stem} of {out}")


@contextlib.contextmanager
def _tables_lock(out: Path) -> Iterator[None]:
    """A blocking lock around reading the subjects' folders and writing the tables."""
    import fcntl

    fd = os.open(out / ".dfrn-tables.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale(out: Path, participants: list[PrepSubject] | None) -> None:
    """Remove temporary folders a killed run left (only the locked subjects' at the
    participant level: another process may be writing the others')."""
    if participants is None:
        stale = list(out.glob(f".{_TMP_PREFIX}*.tmp"))
    else:
        stale = [p for s in participants for pattern in (s.stem, "old-" + s.stem)
                 for p in out.glob(f".{_TMP_PREFIX}{pattern}.*.tmp")]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)


def _write_folder_files(out: Path, identity: dict[str, Any], tpl: Template, kind: str,
                        transform: str) -> None:
    """``prep.json``, ``dataset_description.json`` and ``desc-dseg.tsv`` (the same bytes from
    every process of the same settings)."""
    from dfrn.models.package import dfrn_version

    atomic_write_json(out / "prep.json", {"identity": identity, "dfrn_version": dfrn_version(),
                                          "template": str(tpl.t1), "template_source": tpl.source})
    atomic_write_json(out / "dataset_description.json", {
        "Name": "dfrn prep",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "dfrn", "Version": dfrn_version(),
                         "Description": f"dfrn prep ({kind}; transform {transform})"}],
    })
    atomic_write_text(out / "desc-dseg.tsv", _DSEG_TSV)


def _finished_rows(out: Path, subjects: list[PrepSubject], changed_input: str,
                   log: Callable[[str], None]
                   ) -> tuple[dict[str, dict[str, Any]], list[PrepSubject], dict[str, str]]:
    """QC rows of the subjects already done (verified, same input), the ones to do, and
    every subject's input digest. A changed input is refused under ``"refuse"``."""
    rows: dict[str, dict[str, Any]] = {}
    todo: list[PrepSubject] = []
    digests: dict[str, str] = {}
    for s in subjects:
        digests[s.stem] = _source_digest(s)
        row, why, changed = _finished_row(out, s, digests[s.stem])
        if row is not None:
            rows[s.stem] = row
            continue
        if changed and changed_input == "refuse":
            raise ResultsFolderError(
                f"participant {s.participant_id}: {why}; restore it or start a new run"
            )
        if why:
            log(why)
        todo.append(s)
    if rows:
        log(f"dfrn prep: {len(rows)} of {len(subjects)} subject(s) already done; "
            f"{len(todo)} to do")
    return rows, todo, digests


def _recorded_rows(out: Path, subjects: list[PrepSubject],
                   exclude: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The QC rows that other subjects' folders hold (``qc.json``; not re-verified here:
    the group level and ``dfrn run`` verify them), or their recorded failure."""
    rows = {}
    for s in subjects:
        if s.stem in exclude:
            continue
        for path in (out / s.folder / "qc.json", _failure_path(out, s)):
            if path.is_file():
                rows[s.stem] = json.loads(path.read_text(encoding="utf-8"))
                break
    return rows


def _failure_path(out: Path, subject: PrepSubject) -> Path:
    return out / "logs" / "prep-failed" / f"{subject.stem}.json"


def _record_failures(out: Path, subjects: list[PrepSubject], rows: dict[str, Any]) -> None:
    """Keep the participant level's failed rows (other processes rewrite the tables), and
    forget a failure once the subject succeeded."""
    for s in subjects:
        path, row = _failure_path(out, s), rows.get(s.stem, {})
        if row.get("status") == "failed":
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, row)
        else:
            path.unlink(missing_ok=True)


def verify_prep(
    source: str | Path, out: str | Path, *, participants: Sequence[str] | None = None,
    transform: str = "syn", seed: int = 0, deterministic: bool = True,
    template: str | Path | None = None, template_mask: str | Path | None = None,
    template_space: str | None = None, dice_min: float = 0.90, corr_min: float = 0.40,
) -> Path:
    """The BIDS-Apps group level's check: every chosen subject's folder is intact, made from
    its current scan with these settings; nothing is preprocessed.

    Writes ``qc.tsv`` and ``cohort.tsv`` of every subject (or, for ``participants``,
    ``group_qc.tsv`` and ``group_cohort.tsv`` of those) and returns the cohort table's path.

    Raises
    ------
    DfrnInputError
        Naming the subjects that are missing, failed, damaged or made from another scan.
    """
    out = Path(out).resolve()
    if not (out / "prep.json").is_file():
        raise DfrnInputError(f"{out} holds no participant level (no prep.json); run the "
                             "participant level first")
    tpl = resolve_template(template, template_mask, template_space)
    identity = _identity("raw", transform, seed, deterministic, tpl)
    table, subjects = plan_prep_subjects(source, space=tpl.space)
    chosen = select_participants(subjects, participants, source)
    with _tables_lock(out):
        _check_out(out, identity)
        rows, problems = {}, []
        for s in chosen:
            row, why, _ = _finished_row(out, s, _source_digest(s))
            if row is not None:
                rows[s.stem] = row
            elif _failure_path(out, s).is_file():
                note = json.loads(_failure_path(out, s).read_text(encoding="utf-8"))["note"]
                problems.append(f"{s.stem} (failed: {note})")
            else:
                problems.append(f"{s.stem} ({why or 'not preprocessed yet'})")
        if problems:
            raise DfrnInputError(
                f"group level: {len(problems)} of {len(chosen)} participant(s) have no finished "
                f"participant level in {out}: {listed(problems, 3, '; ')}; run the "
                "participant level for them first"
            )
        prefix = "" if participants is None else "group_"
        _write_tables(out, table, chosen, rows, dice_min, corr_min, "t1", prefix)
    return out / f"{prefix}cohort.tsv"


def prep_executor(kind: str, address: str = "", settings: Path | None = None) -> Executor:
    """The executor of ``dfrn prep --executor KIND [--ray-address A] [--executor-config F]``.

    ``settings`` is a TOML file whose ``[executor]`` section gives the Ray or SLURM options
    (default: one CPU per subject). A Ray that cannot start or be joined is a one-line
    error naming ``--ray-address``, the option of this command (the study's equivalent is
    ``[executor] address``).
    """
    from dfrn.config import load_executor_config

    e = load_executor_config(settings) if settings is not None else ExecutorConfig()
    if address:
        e = dataclasses.replace(e, address=address)
    try:
        return make_executor(kind, e)
    except DfrnInputError as exc:
        raise DfrnInputError(str(exc).replace("[executor] address", "--ray-address")) from None


def _stem_of(row: dict[str, Any], subjects: list[PrepSubject]) -> str:
    for s in subjects:
        if s.participant_id == row["participant_id"] and s.session == (row.get("session") or ""):
            return s.stem
    raise KeyError(row["participant_id"])


def _run_pool(jobs_list: list[dict[str, Any]], jobs: int, env: dict[str, str],
              progress: bool) -> list[dict[str, Any]]:
    """Run each subject in a fresh spawned process, ``jobs`` at a time."""
    from tqdm.auto import tqdm

    if not jobs_list:
        return []
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=min(jobs, len(jobs_list)), mp_context=ctx,
                                  initializer=_init_worker, initargs=(env,),
                                  max_tasks_per_child=1)
    results: list[dict[str, Any]] = []
    clean = False
    try:
        futures = {pool.submit(_process_subject, job): job for job in jobs_list}
        bar = tqdm(total=len(futures), desc="dfrn prep", unit="subject", disable=not progress)
        for fut in cf.as_completed(futures):
            job = futures[fut]
            try:
                results.append(fut.result())
            except cf.process.BrokenProcessPool:
                s = job["subject"]
                results.append({"participant_id": s.participant_id, "session": s.session,
                                "status": "failed",
                                "note": f"participant {s.participant_id}: its worker process died "
                                        "(out of memory, or killed); rerun to retry"})
            bar.update(1)
        bar.close()
        clean = True
    finally:
        pool.shutdown(wait=clean, cancel_futures=True)
        if not clean:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
    return results


def prep_task(common: dict[str, Any], job: dict[str, Any]) -> str:
    """One subject as an executor task: check the shared storage, set ANTs' environment,
    preprocess; return the QC row as JSON (a few numbers; the images stay in the folder)."""
    from dfrn.executors import check_storage_probe

    check_storage_probe(*common["probe"])
    os.environ.update(common["env"])
    return json.dumps(_process_subject(job), default=str)


def _run_on_executor(executor: Executor, jobs_list: list[dict[str, Any]], env: dict[str, str],
                     out: Path, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from dfrn.executors import remove_storage_probe, write_storage_probe

    if not jobs_list:
        return []
    probe = write_storage_probe(out)
    rows = []
    try:
        bar = tqdm(total=len(jobs_list), desc="dfrn prep", unit="subject", disable=not progress)
        for text in executor.map(prep_task, {"env": env, "probe": probe}, jobs_list):
            rows.append(json.loads(text))
            bar.update(1)
        bar.close()
    finally:
        remove_storage_probe(*probe)
    return rows


def _write_tables(out: Path, table: pd.DataFrame, subjects: list[PrepSubject],
                  rows: dict[str, dict[str, Any]], dice_min: float, corr_min: float,
                  image_column: str, prefix: str = "") -> pd.DataFrame:
    """``qc.tsv`` and ``cohort.tsv`` of ``subjects`` (``prefix``: the group level's own)."""
    qc_rows, cohort_rows = [], []
    for s in subjects:
        row = rows[s.stem]
        status, note = _status(row, dice_min, corr_min)
        qc_rows.append({c: row.get(c, np.nan) for c in QC_COLUMNS} | {"status": status, "note": note})
        if status == "failed":
            continue
        cohort_rows.append(_cohort_row(table, s, row.get("files", {}), status, image_column))
    qc = pd.DataFrame(qc_rows, columns=list(QC_COLUMNS))
    if not any(s.session for s in subjects):
        qc = qc.drop(columns="session")
    atomic_write_tsv(qc, out / f"{prefix}qc.tsv")
    columns = ["participant_id", *(c for c in table.columns if c != image_column), *COHORT_COLUMNS]
    atomic_write_tsv(pd.DataFrame(cohort_rows, columns=columns), out / f"{prefix}cohort.tsv")
    return qc


def _cohort_row(table: pd.DataFrame, subject: PrepSubject, files: dict[str, str], status: str,
                image_column: str) -> dict[str, Any]:
    """A subject's row of ``cohort.tsv``: the input table's values as they are (less the image
    column), ``source_t1`` (the absolute path of the image that was preprocessed), then the
    outputs' paths relative to the prep folder, and ``prep_status``."""
    entry: dict[str, Any] = {"participant_id": subject.participant_id}
    if subject.participant_id in table.index:
        entry |= {k: v for k, v in table.loc[subject.participant_id].items() if k != image_column}
    source = subject.t1 if subject.derivatives is None else subject.derivatives["t1"]
    entry["source_t1"] = str(source)
    for key in ("t1", "gm", "gm_unmodulated", "mask"):
        name = files.get(key) or (files.get("gm_unmodulated") if key == "gm" else None)
        entry[key] = (subject.folder / name).as_posix() if name else ""
    entry["prep_status"] = status
    return entry


def _check_table_columns(table: pd.DataFrame, image_column: str, source: Path | None) -> None:
    """Refuse a participants table column that ``cohort.tsv`` would overwrite."""
    taken = [c for c in table.columns if c in COHORT_COLUMNS and c != image_column]
    if taken:
        raise DfrnInputError(
            f"column {taken[0]!r} of the participants table ({source}) has the name of a dfrn prep output column "
            f"({', '.join(COHORT_COLUMNS)}); rename it"
        )

