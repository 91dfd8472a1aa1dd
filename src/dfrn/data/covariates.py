"""The study's covariates (age, sex, site, head size …): chosen, checked and encoded.

``[cohort] covariates`` lists numeric and categorical columns of the cohort table and
``[cohort] site`` names the site (scanner) column, which is always categorical, even when
it holds numbers; so is each column of ``[cohort] categorical_covariates``. A column is
otherwise categorical when it holds text. :func:`select_covariates` checks them on a cohort
table: a subject missing a value is refused by name (or dropped under ``missing = "drop"``),
a column that is numeric except for a few values is refused naming them (a typo such as
``"forty"`` would otherwise make it a category with a level per subject), and so is a
categorical column with nearly one level per subject (an ID or a numeric column).
:class:`CovariateEncoder` turns them into a float design matrix: numeric columns as they are,
categorical ones one-hot coded with their first level (in sorted order) dropped. The encoder
is fitted once on the study's cohort (coding uses no target information) and saved in model
packages, so a new cohort is coded with the training cohort's levels.
:func:`covariate_target_copies` finds a covariate that copies a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dfrn.errors import DfrnInputError, listed

__all__ = [
    "CovariateEncoder", "CovariateSelection", "select_covariates", "describe_covariates",
    "covariate_names", "covariate_target_copies",
]

MISSING_POLICIES = ("refuse", "drop")


def _is_categorical(values: pd.Series) -> bool:
    return bool(
        pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values)
    )


def _level(value: Any) -> str:
    """A category level as text (``1`` and ``1.0`` in a numeric site column are one level)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@dataclass
class CovariateEncoder:
    """Codes covariates as floats with the levels seen in :meth:`fit`.

    Parameters
    ----------
    categorical : sequence of str, optional
        Columns to code as categories even when they hold numbers (the site column).

    Attributes
    ----------
    columns_ : list of str
        The raw covariate columns, in order.
    levels_ : dict of str to list of str
        The sorted levels of each categorical column; its first level is the reference
        (coded by zeros) and each other level gets a ``<column>_<level>`` column.
    """

    categorical: Sequence[str] = ()
    columns_: list[str] = field(default_factory=list)
    levels_: dict[str, list[str]] = field(default_factory=dict)

    def fit(self, table: pd.DataFrame) -> CovariateEncoder:
        """Learn the columns and the categorical levels of ``table`` (complete, checked)."""
        _check_complete(table)
        self.columns_ = [str(c) for c in table.columns]
        self.levels_ = {}
        for c in self.columns_:
            if c in self.categorical or _is_categorical(table[c]):
                self.levels_[c] = sorted({_level(v) for v in table[c]})
        return self

    def encoded_columns(self, column: str) -> list[str]:
        """The encoded columns of raw ``column``: itself, or its ``<column>_<level>`` dummies."""
        if column in self.levels_:
            return [f"{column}_{lv}" for lv in self.levels_[column][1:]]
        return [column]

    @property
    def feature_names_(self) -> list[str]:
        """The encoded columns, in order."""
        return [name for c in self.columns_ for name in self.encoded_columns(c)]

    def transform(self, table: pd.DataFrame, what: str = "the cohort") -> pd.DataFrame:
        """The float design of ``table``, indexed like it.

        Raises
        ------
        DfrnInputError
            When a column is absent, a value is missing or not a number, or a level was
            not seen in :meth:`fit` (naming the subject, the column and the value).
        """
        absent = [c for c in self.columns_ if c not in table.columns]
        if absent:
            raise DfrnInputError(
                f"covariate {absent[0]!r} is not a column of {what} (the model was trained "
                f"with covariates {', '.join(self.columns_)})"
            )
        _check_complete(table[self.columns_])
        out: dict[str, np.ndarray] = {}
        for c in self.columns_:
            values = table[c]
            if c not in self.levels_:
                out[c] = _numeric(values, c)
                continue
            levels = self.levels_[c]
            text = values.map(_level)
            unknown = text[~text.isin(levels)]
            if len(unknown):
                raise DfrnInputError(
                    f"subject {unknown.index[0]}: covariate {c!r} is {unknown.iloc[0]!r}, a level "
                    f"the model was not trained with (known: {', '.join(levels)})"
                )
            for lv in levels[1:]:
                out[f"{c}_{lv}"] = (text == lv).to_numpy(float)
        return pd.DataFrame(out, index=table.index, columns=self.feature_names_)

    def fit_transform(self, table: pd.DataFrame) -> pd.DataFrame:
        return self.fit(table).transform(table)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (for model packages)."""
        return {"columns": list(self.columns_), "levels": {k: list(v) for k, v in self.levels_.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CovariateEncoder:
        levels = {str(k): [str(x) for x in v] for k, v in d["levels"].items()}
        return cls(categorical=tuple(levels), columns_=[str(c) for c in d["columns"]],
                   levels_=levels)


def _numeric(values: pd.Series, column: str) -> np.ndarray:
    converted = pd.to_numeric(values, errors="coerce")
    bad = converted.isna() | ~np.isfinite(converted.astype(float))
    if bad.any():
        pid = values.index[bad.to_numpy()][0]
        raise DfrnInputError(
            f"subject {pid}: covariate {column!r} is {values.loc[pid]!r}, not a number"
        )
    return converted.to_numpy(float)


def _check_complete(table: pd.DataFrame) -> None:
    missing = table.isna().to_numpy()
    if missing.any():
        i, j = np.argwhere(missing)[0]
        raise DfrnInputError(
            f"subject {table.index[i]}: covariate {table.columns[j]!r} is missing"
        )


@dataclass(frozen=True)
class CovariateSelection:
    """The covariates of a study's subjects.

    Attributes
    ----------
    raw : DataFrame
        The covariate columns (site last), indexed by participant_id, complete.
    site : str
        The site column ("" without one).
    dropped : list of str
        Subjects left out because a covariate was missing (``missing = "drop"``).
    categorical : tuple of str
        ``[cohort] categorical_covariates``: coded as categories even when numeric (their
        values in ``raw`` are already text levels).
    """

    raw: pd.DataFrame
    site: str = ""
    dropped: list[str] = field(default_factory=list)
    categorical: tuple[str, ...] = ()

    def encoder(self) -> CovariateEncoder:
        """An encoder fitted on these subjects (site and declared columns as categories)."""
        declared = (*self.categorical, self.site) if self.site else tuple(self.categorical)
        return CovariateEncoder(categorical=declared).fit(self.raw)

    def design(self) -> pd.DataFrame:
        """The encoded covariates (site one-hot coded), indexed by participant_id."""
        return self.encoder().transform(self.raw)

    @property
    def names(self) -> list[str]:
        return [str(c) for c in self.raw.columns]

    def words(self) -> str:
        """The covariates in words: ``"age, sex and site"``."""
        return describe_covariates(self.names)


def covariate_names(covariates: Sequence[str], site: str = "") -> list[str]:
    """``[cohort] covariates`` then ``site`` (once): the study's covariate columns."""
    names = [str(c) for c in covariates]
    return names + ([site] if site and site not in names else [])


def describe_covariates(names: Sequence[str]) -> str:
    """``["age", "sex", "site"]`` → ``"age, sex and site"``."""
    names = list(names)
    if len(names) <= 1:
        return "".join(names)
    return f"{', '.join(names[:-1])} and {names[-1]}"


def select_covariates(
    table: pd.DataFrame, covariates: Sequence[str], site: str = "", missing: str = "refuse",
    categorical: Sequence[str] = (),
) -> CovariateSelection | None:
    """Check the covariate and site columns of a cohort table.

    Parameters
    ----------
    table : DataFrame
        The cohort table, indexed by participant_id.
    covariates : sequence of str
        ``[cohort] covariates``.
    site : str, optional
        ``[cohort] site``; it joins the covariates as a categorical column.
    missing : {"refuse", "drop"}
        What to do with a subject missing a covariate.
    categorical : sequence of str, optional
        ``[cohort] categorical_covariates``: columns coded as categories even when numeric.

    Returns
    -------
    CovariateSelection or None
        None when there are no covariates and no site.

    Raises
    ------
    DfrnInputError
        For an absent column, a missing value (under ``"refuse"``), a column that is numeric
        except for a few values (unless declared categorical), a site column with a single
        level, or a categorical column with nearly one level per subject.
    """
    if missing not in MISSING_POLICIES:
        raise DfrnInputError(f"config [cohort] missing_covariates must be 'refuse' or 'drop', got {missing!r}")
    names = covariate_names(covariates, site)
    if not names:
        return None
    absent = [c for c in names if c not in table.columns]
    if absent:
        key = "site" if absent[0] == site else "covariates"
        raise DfrnInputError(
            f"[cohort] {key} names column {absent[0]!r}, which is not in the cohort table "
            f"(available: {', '.join(map(str, table.columns))})"
        )
    raw = table[names].copy()
    raw.index = raw.index.astype(str)
    incomplete = _incomplete(raw, missing)
    raw = raw.drop(index=incomplete)
    declared = tuple(str(c) for c in categorical if str(c) in names)
    for c in names:
        if c != site and c not in declared:
            _check_mostly_numeric(raw[c], c)
    if site:
        _check_site_levels(raw[site], site)
    for c in names:
        if c == site or c in declared or _is_categorical(raw[c]):
            _check_not_an_id(raw[c], c, "site" if c == site else "covariates")
    for c in declared:
        if c != site:  # levels as text: any encoder fitted on raw codes them as categories
            raw[c] = raw[c].map(_level)
    return CovariateSelection(raw, site, [str(p) for p in incomplete], declared)


def _incomplete(raw: pd.DataFrame, missing: str) -> pd.Index:
    """The subjects missing a covariate; refused by name under ``missing = "refuse"``."""
    incomplete = raw.index[raw.isna().any(axis=1).to_numpy()]
    if len(incomplete) and missing == "refuse":
        pid = incomplete[0]
        col = raw.columns[raw.loc[pid].isna().to_numpy()][0]
        raise DfrnInputError(
            f"subject {pid}: covariate {col!r} is missing ({len(incomplete)} subject(s) lack a "
            'covariate); fill it in, or set [cohort] missing_covariates = "drop" to leave them out'
        )
    return incomplete


def _check_mostly_numeric(values: pd.Series, column: str) -> None:
    """Refuse a column of numbers with a few values that are not (a typo such as "forty")."""
    converted = pd.to_numeric(values, errors="coerce")
    bad = converted.isna().to_numpy()
    n_bad = int(bad.sum())
    if n_bad == 0 or n_bad * 2 >= len(values):
        return
    found = [f"{pid} ({v!r})" for pid, v in values[bad].items()]
    raise DfrnInputError(
        f"covariate column {column!r} holds numbers except for {n_bad} value(s): subject(s) "
        f"{listed(found)}; correct them, or list {column!r} in [cohort] categorical_covariates "
        "to code it as categories"
    )


def _check_site_levels(values: pd.Series, site: str) -> None:
    levels = {_level(v) for v in values}
    if len(levels) < 2:
        raise DfrnInputError(
            f"site column {site!r} has a single level ({next(iter(levels), '')!r}) for all "
            f"{len(values)} subjects: a site covariate needs at least two sites; remove "
            "[cohort] site"
        )


def _check_not_an_id(values: pd.Series, column: str, key: str) -> None:
    """Refuse a categorical column in which most subjects have a level of their own."""
    counts = values.map(_level).value_counts()
    alone = int((counts == 1).sum())
    if alone * 2 > len(values):
        raise DfrnInputError(
            f"categorical covariate {column!r} has {len(counts)} levels for {len(values)} "
            f"subjects ({alone} of them with a level of their own): it looks like an ID or a "
            f"numeric column; fix its values, or remove it from [cohort] {key}"
            + (" and categorical_covariates" if key == "covariates" else "")
        )


def covariate_target_copies(
    selection: CovariateSelection, targets: pd.DataFrame, threshold: float = 0.999
) -> list[tuple[str, str, float, int]]:
    """Covariates that copy a target: ``|r| > threshold`` on the subjects with both.

    A categorical covariate is compared through each of its encoded (dummy) columns.

    Parameters
    ----------
    selection : CovariateSelection
    targets : DataFrame
        One column per target, indexed by participant_id (NaN for a missing value).
    threshold : float, default 0.999

    Returns
    -------
    list of (covariate, target, r, n)
        One entry per (covariate, target) pair, with the correlation and its subjects.
    """
    encoder = selection.encoder()
    design = encoder.transform(selection.raw)
    y_all = targets.set_axis(targets.index.astype(str)).reindex(design.index)
    found: list[tuple[str, str, float, int]] = []
    for c in encoder.columns_:
        for t in map(str, targets.columns):
            y = pd.to_numeric(y_all[t], errors="coerce").to_numpy(float)
            for name in encoder.encoded_columns(c):
                x = design[name].to_numpy(float)
                both = np.isfinite(x) & np.isfinite(y)
                if both.sum() < 3 or np.ptp(x[both]) == 0 or np.ptp(y[both]) == 0:
                    continue
                r = float(np.corrcoef(x[both], y[both])[0, 1])
                if abs(r) > threshold:
                    found.append((c, t, r, int(both.sum())))
                    break
    return found
