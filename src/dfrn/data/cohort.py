"""A cohort: participant IDs, one T1 image each, target scores and optional covariates.

Two sources are accepted:

* a TSV or CSV **table** with a ``participant_id`` column, an image-path column (paths are
  relative to the table's folder unless absolute) and score columns;
* a **BIDS** root: ``participants.tsv`` plus ``sub-<label>/[ses-<label>/]anat/*_T1w.nii.gz``.

Everything is validated up front, with one-line errors that name the participant, file or
column at fault (:class:`dfrn.errors.DfrnInputError`).
"""

from __future__ import annotations

import csv
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
    "read_delimited",
    "load_cohort_table",
    "load_bids_cohort",
    "find_bids_t1",
    "numeric_columns",
    "check_shared_files",
]

ID_COLUMN = "participant_id"


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

    def without(self, participant_ids: Sequence[str]) -> Cohort:
        """This cohort less some participants (same columns and sources)."""
        drop = {str(p) for p in participant_ids}
        keep = [str(p) not in drop for p in self.table.index]
        return Cohort(
            table=self.table[keep],
            images=[p for p, k in zip(self.images, keep, strict=True) if k],
            target_columns=self.target_columns,
            covariate_columns=self.covariate_columns,
            source=self.source,
        )

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


_SEPARATORS = {"\t": "tab", ",": "comma", ";": "semicolon"}


def _separator(path: Path, what: str) -> str:
    """The table's separator: the one its name implies, unless its header says otherwise.

    A ``.csv`` is comma-separated and anything else tab-separated, unless the header line
    does not contain that separator but another one: then the header's separator is used,
    with a warning that names the file.
    """
    declared = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = fh.readline()
    except (OSError, UnicodeDecodeError):
        return declared  # pandas reports the problem, with the file's name
    if declared in header:
        return declared
    try:
        found = csv.Sniffer().sniff(header, delimiters="".join(_SEPARATORS)).delimiter
    except csv.Error:
        return declared
    warnings.warn(
        f"{what} {path} is {_SEPARATORS[found]}-separated, not {_SEPARATORS[declared]}-separated "
        f"as its name says; read it as {_SEPARATORS[found]}-separated",
        UserWarning,
        stacklevel=3,
    )
    return found


def read_delimited(
    path: str | Path,
    what: str = "table",
    text_columns: Sequence[str] = (ID_COLUMN,),
    *,
    allow_empty: bool = False,
) -> pd.DataFrame:
    """The one reader of user tables (cohort tables, ``participants.tsv``, label tables).

    The separator follows the name (``.csv``: comma, else tab) unless the header line shows
    another one (see :func:`_separator`). The ``text_columns`` (by default
    ``participant_id``) are read as text with no NA conversion, so ``NA``, ``None`` or
    ``001`` are IDs; every other column keeps pandas' NA handling (empty cells and ``NA``
    are missing values).

    Parameters
    ----------
    path : str or Path
        The table.
    what : str, default "table"
        What the table is, for messages (``"cohort table"``, ``"atlas label table"``).
    text_columns : sequence of str, default ("participant_id",)
        Columns read as stripped text, ``""`` for an empty cell, when the table has them.
    allow_empty : bool, default False
        Accept a header with no rows (dfrn's own tables); user tables must have rows.

    Returns
    -------
    pd.DataFrame
        The table with a default index.

    Raises
    ------
    DfrnInputError
        When the file is missing, unreadable, empty, or has a header but no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DfrnInputError(f"{what} not found: {path}")
    sep = _separator(path, what)
    try:
        df = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
        text = [c for c in dict.fromkeys(text_columns) if c in df.columns]
        if text:
            raw = pd.read_csv(
                path, sep=sep, encoding="utf-8-sig", usecols=text, dtype=str,
                keep_default_na=False,
            )
            for c in text:
                df[c] = raw[c].str.strip().to_numpy()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        raise DfrnInputError(f"cannot read {what} {path}: {msg}") from None
    if df.empty and not allow_empty:
        rows = "participants" if ID_COLUMN in df.columns else "rows"
        raise DfrnInputError(f"{what} {path} has a header but no {rows}")
    return df


def read_table(path: str | Path, what: str = "cohort table") -> pd.DataFrame:
    """Read a cohort table with ``participant_id`` as string index; check the IDs.

    See :func:`read_delimited` for the separator and the reading of IDs.
    """
    path = Path(path)
    df = read_delimited(path, what)
    if ID_COLUMN not in df.columns:
        raise DfrnInputError(
            f"{what} {path} has no 'participant_id' column (columns: "
            f"{', '.join(map(str, df.columns))})"
        )
    empty = df[ID_COLUMN] == ""
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0]) + 2
        raise DfrnInputError(f"{what} {path}: empty participant_id on line {row}")
    dup = df[ID_COLUMN][df[ID_COLUMN].duplicated()].unique().tolist()
    if dup:
        raise DfrnInputError(f"{what} {path}: duplicate participant_id {', '.join(dup[:5])}")
    for pid in df[ID_COLUMN]:
        check_safe_id(pid)
    return df.set_index(ID_COLUMN)


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


def _check_files(
    pids: Sequence[str], paths: Sequence[Path], column: str, what: str, must_exist: bool = True
) -> None:
    """No path may be a folder, nor (``must_exist``) missing: one line naming the participant."""
    for pid, p in zip(pids, paths, strict=True):
        if p.is_dir():
            raise DfrnInputError(
                f"participant {pid}: column {column!r} names a folder, not a NIfTI file: {p}"
            )
        if must_exist and not p.is_file():
            raise DfrnInputError(f"participant {pid}: {what} not found: {p}")


def check_shared_files(
    pids: Sequence[str], paths: Sequence[Path], column: str, strict: bool = False
) -> None:
    """Warn (refuse when ``strict``) when participants name one file (after resolving links).

    Two participants with one image is almost always a copy-paste error in the table; their
    scores would be predicted from the same brain.

    Parameters
    ----------
    pids : sequence of str
        The participants, in the order of ``paths``.
    paths : sequence of Path
        Their files (relative paths already made absolute).
    column : str
        The table column the paths come from, for the message.
    strict : bool, default False
        Raise instead of warning.

    Raises
    ------
    DfrnInputError
        With ``strict``, when a file is shared.
    """
    owners: dict[Path, list[str]] = {}
    for pid, p in zip(pids, paths, strict=True):
        owners.setdefault(Path(p).resolve(), []).append(str(pid))
    shared = [(p, ids) for p, ids in owners.items() if len(ids) > 1]
    if not shared:
        return
    path, ids = shared[0]
    names = ", ".join(ids[:-1]) + f" and {ids[-1]}"
    more = f" (and {len(shared) - 1} more shared file(s))" if len(shared) > 1 else ""
    msg = f"participants {names} share one file in column {column!r}: {path}{more}"
    if strict:
        raise DfrnInputError(f"{msg}; give each participant their own file")
    warnings.warn(
        f"{msg}; a copy-paste error in the table? ([cohort] strict = true or 'dfrn run "
        "--strict' refuses it)",
        UserWarning,
        stacklevel=4,
    )


def _finish(
    df: pd.DataFrame,
    images: list[Path],
    targets: Sequence[str],
    covariates: Sequence[str],
    source: Path,
    image_column: str,
    file_columns: Sequence[str] = (),
    strict: bool = False,
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
    pids = [str(p) for p in df.index]
    _check_files(pids, images, image_column, "image file")
    check_shared_files(pids, images, image_column, strict)
    cohort = Cohort(
        table=df,
        images=images,
        target_columns=list(targets),
        covariate_columns=list(covariates),
        source=source,
    )
    for column in dict.fromkeys(file_columns):
        paths = cohort.path_column(column)
        if paths is not None:
            # their existence is checked where they are read (the baseline, the input digests)
            _check_files(pids, paths, column, f"file of column {column!r}", must_exist=False)
            check_shared_files(pids, paths, column, strict)
    return cohort


def load_cohort_table(
    path: str | Path,
    targets: Sequence[str],
    image_column: str = "t1",
    covariates: Sequence[str] = (),
    *,
    file_columns: Sequence[str] = (),
    strict: bool = False,
) -> Cohort:
    """Load a cohort from a table with ``participant_id``, an image column and score columns.

    Parameters
    ----------
    path : str or Path
        The table (see :func:`read_delimited`).
    targets : sequence of str
        Score columns; must be numeric (empty cells are missing values).
    image_column : str, default "t1"
        The column of T1 image paths (relative to the table's folder unless absolute).
    covariates : sequence of str, optional
        Columns that must exist.
    file_columns : sequence of str, optional
        Other columns of file paths (e.g. the GM maps), when the table has them: a folder
        is refused and shared files are warned about (refused when ``strict``) as for the
        images; missing files are left to the code that reads them.
    strict : bool, default False
        Refuse, instead of warning about, participants that share one file.

    Raises
    ------
    DfrnInputError
        One line naming the participant, column or file at fault.
    """
    path = Path(path).resolve()
    df = read_table(path, "cohort table")
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
    return _finish(df, images, targets, covariates, path, image_column, file_columns, strict)


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
    *,
    file_columns: Sequence[str] = (),
    strict: bool = False,
) -> Cohort:
    """Load a cohort from a BIDS root (``participants.tsv`` + ``anat/*_T1w.nii[.gz]``).

    With several sessions or runs, pass ``session``; otherwise more than one T1 per subject is
    an error naming the subject. ``file_columns`` and ``strict`` as in
    :func:`load_cohort_table`.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DfrnInputError(f"BIDS root not found: {root}")
    df = read_table(root / "participants.tsv", "participants table")
    images = [find_bids_t1(root, pid, session) for pid in df.index]
    return _finish(df, images, targets, covariates, root, "T1w", file_columns, strict)
