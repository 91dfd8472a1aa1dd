"""A cohort: participant IDs, one T1 image each, target scores and optional covariates.

Two sources are accepted:

* a TSV or CSV **table** with a ``participant_id`` column, an image-path column (paths are
  relative to the table's folder unless absolute) and score columns;
* a **BIDS** root: ``participants.tsv`` plus ``sub-<label>/[ses-<label>/]anat/*_T1w.nii.gz``.

Everything is validated up front, with one-line errors that name the participant, file or
column at fault (:class:`dfrn.errors.DfrnInputError`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dfrn.errors import DfrnInputError
from dfrn.io import check_safe_id

__all__ = [
    "Cohort",
    "read_table",
    "load_cohort_table",
    "load_bids_cohort",
    "find_bids_t1",
    "numeric_columns",
]


@dataclass
class Cohort:
    """A validated cohort.

    Attributes
    ----------
    table:
        Every column of the input table, indexed by ``participant_id`` (strings).
    images:
        Absolute path of each participant's T1 image, in ``table`` order.
    target_columns:
        The score columns (may hold NaN: those subjects are dropped per factor).
    covariate_columns:
        Optional covariates (age, sex, TIV …), used by the baseline.
    """

    table: pd.DataFrame
    images: list[Path]
    target_columns: list[str]
    covariate_columns: list[str]
    source: Path

    @property
    def participant_ids(self) -> list[str]:
        return [str(p) for p in self.table.index]

    @property
    def targets(self) -> pd.DataFrame:
        return self.table[self.target_columns].astype(float)

    def __len__(self) -> int:
        return len(self.table)

    def path_column(self, column: str) -> list[Path] | None:
        """Absolute paths from an optional path column (e.g. ``gm``), or None if absent."""
        if column not in self.table.columns:
            return None
        base = self.source.parent if self.source.is_file() else self.source
        out = []
        for pid, value in self.table[column].items():
            if pd.isna(value) or str(value).strip() == "":
                raise DfrnInputError(f"participant {pid}: column {column!r} is empty")
            p = Path(str(value))
            out.append(p if p.is_absolute() else base / p)
        return out


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a TSV (or ``.csv``) with ``participant_id`` as string index; check the IDs."""
    path = Path(path)
    if not path.is_file():
        raise DfrnInputError(f"cohort table not found: {path}")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype={"participant_id": str})
    except Exception as exc:
        raise DfrnInputError(f"cannot read table {path}: {exc}") from None
    if "participant_id" not in df.columns:
        raise DfrnInputError(
            f"table {path} has no 'participant_id' column (columns: {', '.join(map(str, df.columns))})"
        )
    if df["participant_id"].isna().any():
        row = int(np.flatnonzero(df["participant_id"].isna().to_numpy())[0]) + 2
        raise DfrnInputError(f"table {path}: empty participant_id on line {row}")
    df["participant_id"] = df["participant_id"].astype(str).str.strip()
    dup = df["participant_id"][df["participant_id"].duplicated()].unique().tolist()
    if dup:
        raise DfrnInputError(f"table {path}: duplicate participant_id {', '.join(dup[:5])}")
    for pid in df["participant_id"]:
        check_safe_id(pid)
    return df.set_index("participant_id")


def numeric_columns(
    table: pd.DataFrame, columns: Sequence[str], what: str, source: Path | str
) -> pd.DataFrame:
    """Check that ``columns`` exist and are numeric; return them as float (NaN allowed)."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DfrnInputError(
            f"{what} column {missing[0]!r} is not in {source} "
            f"(available: {', '.join(map(str, table.columns))})"
        )
    out = {}
    for c in columns:
        converted = pd.to_numeric(table[c], errors="coerce")
        bad = converted.isna() & table[c].notna() & (table[c].astype(str).str.strip() != "")
        if bad.any():
            pid = bad.index[bad.to_numpy()][0]
            raise DfrnInputError(
                f"{what} column {c!r} has a non-numeric value {table.at[pid, c]!r} "
                f"for participant {pid} (and {int(bad.sum()) - 1} more)"
            )
        converted = converted.astype(float)
        inf = np.isinf(converted.to_numpy())
        if inf.any():
            pid = converted.index[inf][0]
            more = f" (and {int(inf.sum()) - 1} more)" if inf.sum() > 1 else ""
            raise DfrnInputError(
                f"{what} column {c!r} has an infinite value '{table.at[pid, c]}' for participant "
                f"{pid}{more}; use a finite number or leave it empty"
            )
        out[c] = converted
    return pd.DataFrame(out, index=table.index)


def _warn_missing_targets(targets: pd.DataFrame) -> None:
    for c in targets.columns:
        n = int(targets[c].isna().sum())
        if n:
            warnings.warn(
                f"target {c!r}: {n} of {len(targets)} subjects have no value and are dropped "
                "for that factor",
                UserWarning,
                stacklevel=3,
            )


def _finish(
    df: pd.DataFrame,
    images: list[Path],
    targets: Sequence[str],
    covariates: Sequence[str],
    source: Path,
) -> Cohort:
    numeric = numeric_columns(df, targets, "target", source)
    for c in targets:
        df[c] = numeric[c]
    _warn_missing_targets(numeric)
    missing_cov = [c for c in covariates if c not in df.columns]
    if missing_cov:
        raise DfrnInputError(
            f"covariate column {missing_cov[0]!r} is not in {source} "
            f"(available: {', '.join(map(str, df.columns))})"
        )
    for pid, p in zip(df.index, images, strict=True):
        if not p.is_file():
            raise DfrnInputError(f"participant {pid}: image file not found: {p}")
    return Cohort(
        table=df,
        images=images,
        target_columns=list(targets),
        covariate_columns=list(covariates),
        source=source,
    )


def load_cohort_table(
    path: str | Path,
    targets: Sequence[str],
    image_column: str = "t1",
    covariates: Sequence[str] = (),
) -> Cohort:
    """Load a cohort from a table with ``participant_id``, an image column and score columns."""
    path = Path(path).resolve()
    df = read_table(path)
    if image_column not in df.columns:
        raise DfrnInputError(
            f"image column {image_column!r} is not in {path} "
            f"(available: {', '.join(map(str, df.columns))})"
        )
    images = []
    for pid, value in df[image_column].items():
        if pd.isna(value) or str(value).strip() == "":
            raise DfrnInputError(f"participant {pid}: no image path in column {image_column!r}")
        p = Path(str(value).strip())
        images.append(p if p.is_absolute() else path.parent / p)
    return _finish(df, images, targets, covariates, path)


def find_bids_t1(root: str | Path, pid: str, session: str | None = None) -> Path:
    """The one ``anat/*_T1w.nii[.gz]`` of a participant (in ``ses-<session>`` if given).

    Raises
    ------
    DfrnInputError
        When the subject's folder or T1 is missing, or several T1 images match.
    """
    root = Path(root)
    sub = pid if pid.startswith("sub-") else f"sub-{pid}"
    sub_dir = root / sub
    if not sub_dir.is_dir():
        raise DfrnInputError(f"participant {pid}: BIDS folder {sub_dir} not found")
    patterns = ["anat/*_T1w.nii.gz", "anat/*_T1w.nii"]
    ses_glob = f"ses-{session}" if session else "ses-*"
    found = [] if session else sorted({p for pat in patterns for p in sub_dir.glob(pat)})
    found += sorted({p for pat in patterns for p in sub_dir.glob(f"{ses_glob}/{pat}")})
    if not found:
        raise DfrnInputError(f"participant {pid}: no *_T1w.nii[.gz] under {sub_dir}")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found[:4])
        raise DfrnInputError(
            f"participant {pid}: {len(found)} T1 images ({names}); choose one with "
            "cohort.session or use a cohort table"
        )
    return found[0]


def load_bids_cohort(
    root: str | Path,
    targets: Sequence[str],
    covariates: Sequence[str] = (),
    session: str | None = None,
) -> Cohort:
    """Load a cohort from a BIDS root (``participants.tsv`` + ``anat/*_T1w.nii[.gz]``).

    With several sessions or runs, pass ``session``; otherwise more than one T1 per subject is
    an error naming the subject.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DfrnInputError(f"BIDS root not found: {root}")
    df = read_table(root / "participants.tsv")
    images = [find_bids_t1(root, pid, session) for pid in df.index]
    return _finish(df, images, targets, covariates, root)
