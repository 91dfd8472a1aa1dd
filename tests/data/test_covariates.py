"""Covariate columns: a typo in a numeric column, declared categories, ID-like columns, and a
covariate that copies a target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dfrn.data.covariates import CovariateEncoder, covariate_target_copies, select_covariates
from dfrn.errors import DfrnInputError


def _table(n: int = 12) -> pd.DataFrame:
    """As read from a TSV: ``age`` numbers, ``sex`` text, ``scanner`` a numeric code."""
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {"age": np.round(rng.uniform(20, 80, n), 1), "sex": ["F", "M"] * (n // 2),
         "scanner": [1, 2, 3] * (n // 3), "score": rng.normal(size=n)},
        index=pd.Index([f"sub-{i:02d}" for i in range(n)], name="participant_id"))


def test_a_typo_in_a_numeric_covariate_is_refused_naming_subject_and_value() -> None:
    table = _table().astype({"age": object})
    table.loc["sub-03", "age"] = "forty"
    with pytest.raises(DfrnInputError) as err:
        select_covariates(table, ["age", "sex"])
    assert str(err.value) == (
        "covariate column 'age' holds numbers except for 1 value(s): subject(s) sub-03 "
        "('forty'); correct them, or list 'age' in [cohort] categorical_covariates to code it "
        "as categories")
    table.loc["sub-07", "age"] = "n/a?"
    with pytest.raises(DfrnInputError, match=r"except for 2 value\(s\): subject\(s\) sub-03 "
                                              r"\('forty'\), sub-07 \('n/a\?'\)"):
        select_covariates(table, ["age", "sex"])
    # a text column with a number in it is a category (not "numeric except for a few")
    sel = select_covariates(_table().assign(sex=["F", "M"] * 5 + ["F", "1"]), ["sex"])
    assert sel is not None and list(sel.design().columns) == ["sex_F", "sex_M"]


def test_declared_categorical_covariates_are_coded_as_categories() -> None:
    plain = select_covariates(_table(), ["age", "scanner"])
    assert plain is not None and list(plain.design().columns) == ["age", "scanner"]
    sel = select_covariates(_table(), ["age", "scanner"], categorical=["scanner"])
    assert sel is not None and list(sel.design().columns) == ["age", "scanner_2", "scanner_3"]
    # any encoder fitted on the selection's columns (the ridge's ComBat covariates) agrees
    assert list(CovariateEncoder().fit_transform(sel.raw[["scanner"]]).columns) == [
        "scanner_2", "scanner_3"]
    # the saved format is unchanged, and a saved encoder codes numbers in a new cohort
    saved = sel.encoder().to_dict()
    assert saved == {"columns": ["age", "scanner"], "levels": {"scanner": ["1", "2", "3"]}}
    new = pd.DataFrame({"age": [50.0], "scanner": [3.0]}, index=["z"])
    assert CovariateEncoder.from_dict(saved).transform(new).to_dict("records") == [
        {"age": 50.0, "scanner_2": 0.0, "scanner_3": 1.0}]
    # a typo'd column declared categorical is taken as the user's categories
    typo = _table().astype({"age": object})
    typo.loc["sub-03", "age"] = "forty"
    with pytest.raises(DfrnInputError, match="'age' has 12 levels for 12 subjects"):
        select_covariates(typo, ["age"], categorical=["age"])


def test_a_categorical_covariate_with_a_level_per_subject_is_refused() -> None:
    table = _table().assign(code=[f"X{i}" for i in range(12)])
    with pytest.raises(DfrnInputError) as err:
        select_covariates(table, ["age", "code"])
    assert str(err.value) == (
        "categorical covariate 'code' has 12 levels for 12 subjects (12 of them with a level of "
        "their own): it looks like an ID or a numeric column; fix its values, or remove it from "
        "[cohort] covariates and categorical_covariates")
    with pytest.raises(DfrnInputError, match=r"'code' has .* remove it from \[cohort\] site$"):
        select_covariates(table, ["age"], site="code")
    # 7 of 12 on their own: refused; 6 of 12: kept (a margin of more than half)
    seven = table.assign(code=[f"X{i}" for i in range(7)] + ["Y"] * 5)
    with pytest.raises(DfrnInputError, match="'code' has 8 levels for 12 subjects"):
        select_covariates(seven, ["code"])
    six = table.assign(code=[f"X{i}" for i in range(6)] + ["Y"] * 6)
    assert select_covariates(six, ["code"]) is not None


def test_a_covariate_that_copies_a_target_is_found() -> None:
    table = _table()
    targets = pd.DataFrame({"mood": table["score"], "sleep": table["age"] * -0.1 + 3},
                           index=table.index)
    targets.loc["sub-05", "mood"] = np.nan  # compared on the subjects with both
    table["mood_copy"] = (2 * table["score"] + 1).round(3)  # a rounded, rescaled copy
    sel = select_covariates(table, ["age", "mood_copy", "sex"])
    assert sel is not None
    found = {(c, t): (r, n) for c, t, r, n in covariate_target_copies(sel, targets)}
    assert set(found) == {("mood_copy", "mood"), ("age", "sleep")}
    assert found["mood_copy", "mood"][0] == pytest.approx(1.0, abs=1e-3)
    assert found["mood_copy", "mood"][1] == 11
    assert found["age", "sleep"][0] == pytest.approx(-1.0)
    # a binary target copied by a categorical covariate (through its dummy column)
    binary = pd.DataFrame({"female": (table["sex"] == "F").astype(float)}, index=table.index)
    assert [c for c, *_ in covariate_target_copies(sel, binary)] == ["sex"]
    assert covariate_target_copies(sel, targets[["mood"]].assign(mood=np.arange(12.0))) == []
