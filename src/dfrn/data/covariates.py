"""The study's covariates (age, sex, site, head size …): chosen, checked and encoded.

``[cohort] covariates`` lists numeric and categorical columns of the cohort table and
``[cohort] site`` names the site (scanner) column, which is always categorical, even when
it holds numbers. :func:`select_covariates` checks them on a cohort table (a subject missing
a value is refused by name, or dropped under ``missing = "drop"``) and
:class:`CovariateEncoder` turns them into a float design matrix: numeric columns as they are,
categorical ones one-hot coded with their first level (in sorted order) dropped. The encoder
is fitted once on the study's cohort (coding uses no target information) and saved in model
packages, so a new cohort is coded with the training cohort's levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dfrn.errors import DfrnInputError

__all__ = [
    "CovariateEncoder", "CovariateSelection", "select_covariates", "describe_covariates",
    "covariate_names",
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

    @property
    def feature_names_(self) -> list[str]:
        """The encoded columns, in order."""
        names: list[str] = []
        for c in self.columns_:
            if c in self.levels_:
                names += [f"{c}_{lv}" for lv in self.levels_[c][1:]]
            else:
                names.append(c)
        return names

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
    """

    raw: pd.DataFrame
    site: str = ""
    dropped: list[str] = field(default_factory=list)

    def encoder(self) -> CovariateEncoder:
        """An encoder fitted on these subjects (site coded as categories)."""
        return CovariateEncoder(categorical=(self.site,) if self.site else ()).fit(self.raw)

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
    table: pd.DataFrame, covariates: Sequence[str], site: str = "", missing: str = "refuse"
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

    Returns
    -------
    CovariateSelection or None
        None when there are no covariates and no site.

    Raises
    ------
    DfrnInputError
        For an absent column, a missing value (under ``"refuse"``), or a site column with a
        single level.
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
    incomplete = raw.index[raw.isna().any(axis=1).to_numpy()]
    if len(incomplete) and missing == "refuse":
        pid = incomplete[0]
        col = raw.columns[raw.loc[pid].isna().to_numpy()][0]
        raise DfrnInputError(
            f"subject {pid}: covariate {col!r} is missing ({len(incomplete)} subject(s) lack a "
            'covariate); fill it in, or set [cohort] missing_covariates = "drop" to leave them out'
        )
    raw = raw.drop(index=incomplete)
    if site:
        levels = {_level(v) for v in raw[site]}
        if len(levels) < 2:
            raise DfrnInputError(
                f"site column {site!r} has a single level ({next(iter(levels), '')!r}) for all "
                f"{len(raw)} subjects: a site covariate needs at least two sites; remove "
                "[cohort] site"
            )
    return CovariateSelection(raw, site, [str(p) for p in incomplete])
