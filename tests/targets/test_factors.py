"""Symptom factors (psych::principal with varimax) against independent implementations."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import data_dir
from scipy.optimize import linear_sum_assignment
from sklearn.base import clone
from sklearn.model_selection import KFold

from dfrn.errors import DfrnInputError
from dfrn.targets.factors import (
    SymptomFactors,
    align_factors,
    assign_factor_names,
    fold_factor_scores,
    read_items_table,
    varimax,
)
from dfrn.workflows.factors import write_factor_outputs

DATA = data_dir()
EHD = DATA / "items" / "ehd20.tsv"
BDI = DATA / "items" / "bdi13_wsc.tsv"
needs_ehd = pytest.mark.skipif(not EHD.is_file(), reason=f"{EHD} not found")
needs_bdi = pytest.mark.skipif(not BDI.is_file(), reason=f"{BDI} not found")


# -- helpers -----------------------------------------------------------------------------------


def _pca_loadings(items: pd.DataFrame, k: int) -> np.ndarray:
    """Unrotated principal-component loadings, computed independently of dfrn."""
    corr = np.corrcoef(items.to_numpy(dtype=float), rowvar=False)
    evals, evecs = np.linalg.eigh(corr)
    top = np.argsort(evals)[::-1][:k]
    return evecs[:, top] * np.sqrt(evals[top])


def _match(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """``theirs`` with columns permuted and sign-flipped to best match ``ours``."""
    sim = ours.T @ theirs
    rows, cols = linear_sum_assignment(np.abs(sim), maximize=True)
    out = theirs[:, cols[np.argsort(rows)]]
    return out * np.sign(np.sum(out * ours, axis=0))


def _planted(n: int = 600, seed: int = 0) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Items driven by three latent traits of distinct strengths, 4 items each."""
    rng = np.random.default_rng(seed)
    groups = {"mood": 0.9, "sleep": 0.75, "appetite": 0.6}
    latent = rng.normal(size=(n, len(groups)))
    cols, markers = {}, {}
    for g, (name, strength) in enumerate(groups.items()):
        markers[name] = [f"{name}_{j}" for j in range(4)]
        for item in markers[name]:
            cols[item] = strength * latent[:, g] + np.sqrt(1 - strength**2) * rng.normal(size=n)
    ids = pd.Index([f"s{i:03d}" for i in range(n)], name="participant_id")
    return pd.DataFrame(cols, index=ids), markers


def _error(match: str) -> AbstractContextManager[pytest.ExceptionInfo[DfrnInputError]]:
    return pytest.raises(DfrnInputError, match=match)


def _one_line(exc: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def ehd() -> pd.DataFrame:
    if not EHD.is_file():
        pytest.skip(f"{EHD} not found")
    return read_items_table(EHD)


@pytest.fixture(scope="module")
def ehd_model(ehd: pd.DataFrame) -> SymptomFactors:
    return SymptomFactors(n_factors=5).fit(ehd)


# -- agreement with independent implementations ------------------------------------------------


@needs_ehd
def test_loadings_match_factor_analyzer_rotator(ehd: pd.DataFrame) -> None:
    rotator = pytest.importorskip("factor_analyzer.rotator")
    unrotated = _pca_loadings(ehd, 5)
    theirs = rotator.Rotator(method="varimax", normalize=True).fit_transform(unrotated)
    ours = SymptomFactors(n_factors=5).fit(ehd).loadings_.to_numpy()
    np.testing.assert_allclose(_match(ours, theirs), ours, atol=2e-3)

    tight = rotator.Rotator(method="varimax", normalize=True, max_iter=100_000, tol=1e-14)
    theirs = tight.fit_transform(unrotated)
    ours = SymptomFactors(n_factors=5, tol=1e-12, max_iter=100_000).fit(ehd).loadings_.to_numpy()
    np.testing.assert_allclose(_match(ours, theirs), ours, atol=1e-5)


@needs_ehd
def test_loadings_match_statsmodels_gpa_with_kaiser(ehd: pd.DataFrame) -> None:
    """A different algorithm (gradient projection) converging to the same varimax optimum."""
    from statsmodels.multivariate.factor_rotation import rotate_factors

    unrotated = _pca_loadings(ehd, 5)
    h = np.sqrt(np.sum(unrotated**2, axis=1, keepdims=True))
    rotated, _ = rotate_factors(unrotated / h, "varimax", max_tries=1000, tol=1e-7)
    theirs = rotated * h
    ours = SymptomFactors(n_factors=5, tol=1e-12, max_iter=100_000).fit(ehd).loadings_.to_numpy()
    np.testing.assert_allclose(_match(ours, theirs), ours, atol=1e-5)


@needs_ehd
def test_psych_principal_literals(ehd_model: SymptomFactors) -> None:
    """Values printed by R psych::principal(ehd, 5, rotate="varimax")."""
    loadings = ehd_model.loadings_.round(2)
    first = loadings.loc["e5"].abs().idxmax()
    assert loadings.loc["e5", first] == 0.87 and loadings.loc["e6", first] == 0.83
    second = loadings.loc["e19"].abs().idxmax()
    assert second != first
    assert loadings.loc[["e19", "e15", "e20"], second].tolist() == [0.86, 0.80, 0.81]


@needs_ehd
def test_variance_table(ehd_model: SymptomFactors) -> None:
    table = ehd_model.variance_table()
    print("\nEHD variance explained:\n" + table.round(4).to_string(index=False))
    np.testing.assert_allclose(table["variance"], (ehd_model.loadings_**2).sum(axis=0))
    np.testing.assert_allclose(table["proportion"], table["variance"] / 20)
    np.testing.assert_allclose(table["cumulative"], np.cumsum(table["proportion"]))
    # a rotation redistributes, but keeps, the variance of the first 5 components
    np.testing.assert_allclose(table["variance"].sum(), ehd_model.eigenvalues_[:5].sum())


# -- scores ------------------------------------------------------------------------------------


@needs_ehd
def test_transform_reproduces_fit_scores(ehd: pd.DataFrame) -> None:
    model = SymptomFactors(n_factors=5)
    fitted = model.fit_transform(ehd)
    pd.testing.assert_frame_equal(model.transform(ehd), fitted, atol=1e-12, rtol=0)
    assert fitted.index.name == "participant_id" and list(fitted.columns) == model.factor_names_
    # regression-method weights are R^-1 @ loadings; loadings = unrotated @ rotation
    corr = np.corrcoef(ehd.to_numpy(dtype=float), rowvar=False)
    np.testing.assert_allclose(
        model.weights_, np.linalg.solve(corr, model.loadings_.to_numpy()), atol=1e-10
    )
    np.testing.assert_allclose(
        model.unrotated_loadings_.to_numpy() @ model.rotation_, model.loadings_, atol=1e-12
    )
    # a participant_id column works like the index
    as_column = ehd.reset_index()
    pd.testing.assert_frame_equal(model.transform(as_column), fitted, atol=1e-12, rtol=0)


@needs_ehd
def test_scores_are_orthogonal(ehd_model: SymptomFactors) -> None:
    corr = np.corrcoef(ehd_model.scores_.to_numpy(), rowvar=False)
    np.testing.assert_allclose(corr, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(ehd_model.scores_.std(ddof=1), 1.0, atol=1e-10)


def test_deterministic_order_and_sign() -> None:
    items, _ = _planted()
    model = SymptomFactors(n_factors=3).fit(items)
    loadings = model.loadings_.to_numpy()
    variance = model.explained_variance_.to_numpy()
    assert np.all(np.diff(variance) < 0)
    peaks = loadings[np.argmax(np.abs(loadings), axis=0), np.arange(3)]
    assert np.all(peaks > 0)
    # shuffled participants and items (eigh's vector signs and order may change): same result
    rng = np.random.default_rng(1)
    shuffled = items.iloc[rng.permutation(len(items)), rng.permutation(items.shape[1])]
    again = SymptomFactors(n_factors=3).fit(shuffled)
    pd.testing.assert_frame_equal(again.loadings_.loc[items.columns], model.loadings_, atol=1e-10)
    pd.testing.assert_frame_equal(again.transform(items), model.scores_, atol=1e-10)
    np.testing.assert_allclose(again.rotation_.T @ again.rotation_, np.eye(3), atol=1e-12)
    assert model.factor_names_ == ["factor_1", "factor_2", "factor_3"]


def test_varimax_single_factor_is_unrotated() -> None:
    x = np.array([[0.5], [0.7], [0.2]])
    res = varimax(x)
    np.testing.assert_array_equal(res.loadings, x)
    assert res.rotation.shape == (1, 1)


# -- naming ------------------------------------------------------------------------------------


def test_names_by_markers_hungarian() -> None:
    items, markers = _planted()
    # name two of the three factors; give them in an order unlike the variance order
    names = {"appetite": markers["appetite"][:2], "mood": [markers["mood"][3]]}
    model = SymptomFactors(n_factors=3, names=names).fit(items)
    assert model.factor_names_ == ["mood", "factor_2", "appetite"]
    assert model.loadings_.loc[markers["mood"], "mood"].min() > 0.8
    assert model.loadings_.loc[markers["appetite"], "appetite"].min() > 0.6
    assert list(model.transform(items).columns) == ["mood", "factor_2", "appetite"]
    # the assignment is global: name by name, "x" would take "a" (0.9 > 0.8) and leave "y" "b"
    loadings = pd.DataFrame({"a": [0.9, 0.9], "b": [0.8, 0.0]}, index=["i1", "i2"])
    assert assign_factor_names(loadings, {"x": ["i1"], "y": ["i2"]}) == ["y", "x"]


def test_unknown_marker_is_an_error() -> None:
    items, _ = _planted(n=50)
    with _error("marker item 'hamd_99' of factor name 'anhedonia'") as exc:
        SymptomFactors(n_factors=3, names={"anhedonia": ["mood_0", "hamd_99"]}).fit(items)
    _one_line(exc)


def test_top_items() -> None:
    items, markers = _planted()
    model = SymptomFactors(n_factors=3).fit(items)
    top = model.top_items(n=4)
    assert list(top.columns) == ["factor", "rank", "item", "loading"]
    assert len(top) == 12
    assert set(top.loc[top["factor"] == "factor_1", "item"]) == set(markers["mood"])
    assert set(top.loc[top["factor"] == "factor_3", "item"]) == set(markers["appetite"])


# -- bad input ---------------------------------------------------------------------------------


def test_missing_value_names_participant_and_item() -> None:
    items, _ = _planted(n=40)
    items.loc["s007", "sleep_2"] = np.nan
    with _error(r"item 'sleep_2' is missing for participant 's007'") as exc:
        SymptomFactors(n_factors=3).fit(items)
    _one_line(exc)


def test_median_imputation_uses_fit_data() -> None:
    items, _ = _planted(n=60)
    train, test = items.iloc[:40].copy(), items.iloc[40:].copy()
    train.loc["s003", "mood_1"] = np.nan
    model = SymptomFactors(n_factors=3, impute="median").fit(train)
    median = train["mood_1"].median()
    assert model.item_medians_["mood_1"] == median
    filled = test.copy()
    test.loc["s045", "mood_1"] = np.nan
    filled.loc["s045", "mood_1"] = median
    pd.testing.assert_frame_equal(model.transform(test), model.transform(filled))
    with _error("item 'mood_1' is missing for participant 's045'"):
        SymptomFactors(n_factors=3).fit(items).transform(test)


def test_constant_item_is_an_error() -> None:
    items, _ = _planted(n=40)
    items["sleep_1"] = 2.0
    with _error("item 'sleep_1' has the same value") as exc:
        SymptomFactors(n_factors=3).fit(items)
    _one_line(exc)


def test_non_numeric_value_names_item_and_participant(tmp_path: Path) -> None:
    items, _ = _planted(n=40)
    bad = items.astype(object)
    bad.loc["s012", "mood_2"] = "often"
    with _error(r"item 'mood_2' of participant 's012' is not numeric: 'often'") as exc:
        SymptomFactors(n_factors=3).fit(bad)
    _one_line(exc)
    path = tmp_path / "items.tsv"
    bad.reset_index().to_csv(path, sep="\t", index=False)
    with _error(r"item 'mood_2' of participant 's012' is not numeric"):
        read_items_table(path)


def test_too_many_factors_is_an_error() -> None:
    items, _ = _planted(n=40)
    with _error(r"n_factors=13 is more than the number of items \(12\)") as exc:
        SymptomFactors(n_factors=13).fit(items)
    _one_line(exc)


def test_fewer_participants_than_items_warns() -> None:
    items, _ = _planted(n=10)
    with pytest.warns(UserWarning, match="fewer participants"):
        model = SymptomFactors(n_factors=3).fit(items)
    corr = np.corrcoef(model.scores_.to_numpy(), rowvar=False)
    np.testing.assert_allclose(corr, np.eye(3), atol=1e-8)


# -- fold-wise mode ----------------------------------------------------------------------------


@needs_ehd
def test_align_recovers_reference(ehd: pd.DataFrame, ehd_model: SymptomFactors) -> None:
    reordered = ehd.iloc[::-1, ::-1]  # other item order: eigh signs and order may differ
    fold = SymptomFactors(n_factors=5).fit(reordered)
    fold.loadings_.iloc[:, 0] *= -1  # make sure a flip is needed
    fold.weights_.iloc[:, 0] *= -1
    fold.rotation_[:, 0] *= -1
    fold.scores_.iloc[:, 0] *= -1
    fold.loadings_ = fold.loadings_.iloc[:, ::-1]
    fold.weights_ = fold.weights_.iloc[:, ::-1]
    fold.rotation_ = fold.rotation_[:, ::-1]
    fold.scores_ = fold.scores_.iloc[:, ::-1]
    fold.factor_names_ = list(fold.loadings_.columns)
    for method in ("hungarian", "procrustes"):
        aligned = align_factors(fold, ehd_model, method=method)
        assert aligned.factor_names_ == ehd_model.factor_names_
        pd.testing.assert_frame_equal(
            aligned.loadings_.loc[ehd.columns], ehd_model.loadings_, atol=1e-10
        )
        pd.testing.assert_frame_equal(aligned.transform(ehd), ehd_model.scores_, atol=1e-10)
        np.testing.assert_allclose(aligned.congruence_, 1.0, atol=1e-12)
    assert fold.factor_names_ == ["factor_5", "factor_4", "factor_3", "factor_2", "factor_1"]


def _fold_correlations(
    items: pd.DataFrame, reference: SymptomFactors, method: str, seed: int = 0
) -> pd.DataFrame:
    """r(test-fold scores, all-data scores) per fold (rows) and factor (columns)."""
    rows = []
    for train, test in KFold(10, shuffle=True, random_state=seed).split(items):
        scores = fold_factor_scores(
            items, items.index[train], items.index[test], reference, method=method
        )
        full = reference.scores_.loc[scores.index]
        rows.append([np.corrcoef(scores[c], full[c])[0, 1] for c in scores.columns])
    return pd.DataFrame(rows, columns=reference.factor_names_)


@pytest.fixture(scope="module")
def bdi() -> pd.DataFrame:
    if not BDI.is_file():
        pytest.skip(f"{BDI} not found")
    return read_items_table(BDI)


@pytest.fixture(scope="module")
def bdi_fold_r(bdi: pd.DataFrame) -> dict[str, pd.DataFrame]:
    reference = SymptomFactors(n_factors=5).fit(bdi)
    out = {m: _fold_correlations(bdi, reference, m) for m in ("hungarian", "procrustes")}
    for method, r in out.items():
        print(f"\nbdi13 5 factors, 10-fold (seed 0), align={method}")
        print("  min r:    " + "  ".join(f"{v:.3f}" for v in r.min()))
        print("  median r: " + "  ".join(f"{v:.3f}" for v in r.median()))
    return out


def test_fold_mode_bdi13_five_factors(bdi_fold_r: dict[str, pd.DataFrame]) -> None:
    """Fold-wise scores track the all-data scores.

    bdi13 has one dominant eigenvalue and near-equal ones at ranks 4-6 (0.563, 0.551, 0.521),
    so the 5-factor varimax optimum itself moves between 90 % subsamples: with Hungarian
    alignment two of ten folds fall below r = 0.95 on some factors (the optimum found there is
    the global one, not a convergence failure). Procrustes alignment keeps every factor above
    0.95 for this seed (not for every seed).
    """
    hungarian = bdi_fold_r["hungarian"]
    assert (hungarian.median() > 0.95).all()
    assert ((hungarian > 0.95).sum() >= 8).all()
    assert (bdi_fold_r["procrustes"].min() > 0.95).all()


@pytest.mark.xfail(strict=True, reason="5-factor varimax on bdi13 is unstable across folds")
def test_fold_mode_bdi13_every_fold_above_095(bdi_fold_r: dict[str, pd.DataFrame]) -> None:
    assert (bdi_fold_r["hungarian"].min() > 0.95).all()


def test_fold_mode_bdi13_three_factors(bdi: pd.DataFrame) -> None:
    """With well separated eigenvalues every fold matches the reference closely."""
    r = _fold_correlations(bdi, SymptomFactors(n_factors=3).fit(bdi), "hungarian")
    print("\nbdi13 3 factors, min r: " + "  ".join(f"{v:.3f}" for v in r.min()))
    assert (r.min() > 0.95).all()


def test_fold_factor_scores_checks_ids() -> None:
    items, _ = _planted(n=60)
    reference = SymptomFactors(n_factors=3).fit(items)
    ids = list(items.index)
    both = fold_factor_scores(items, ids[:40], ids[40:], reference, include_train=True)
    assert list(both.index) == ids and list(both.columns) == reference.factor_names_
    with _error("participant 's010' is in both the training and the test fold"):
        fold_factor_scores(items, ids[:40], ids[10:11], reference)
    with _error("participant 'zz' of the fold is not in the items table"):
        fold_factor_scores(items, ids[:40], ["zz"], reference)


# -- tables and figures ------------------------------------------------------------------------


def test_write_outputs_and_read_table(tmp_path: Path) -> None:
    items, markers = _planted(n=80)
    model = SymptomFactors(n_factors=3, names={"mood": markers["mood"]}).fit(items)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_factor_outputs(model, items, tmp_path)
    assert paths["figure"] == tmp_path / "figures" / "factor_loadings.png"
    assert paths["figure"].stat().st_size > 5000
    loadings = pd.read_csv(paths["loadings"], sep="\t")
    assert list(loadings.columns) == ["item", *model.factor_names_]
    scores = pd.read_csv(paths["scores"], sep="\t", dtype={"participant_id": str})
    assert list(scores.columns) == ["participant_id", *model.factor_names_]
    np.testing.assert_allclose(scores.iloc[:, 1:], model.scores_, atol=1e-12)
    variance = pd.read_csv(paths["variance"], sep="\t")
    assert list(variance.columns) == ["factor", "variance", "proportion", "cumulative"]

    # reading: CSV by extension, ids kept as text, numbered ids when the column is absent
    csv = tmp_path / "items.csv"
    items.set_axis([f"0{i}" for i in range(80)]).reset_index(names="participant_id").to_csv(
        csv, index=False
    )
    table = read_items_table(csv)
    assert table.index[0] == "00" and table.index.name == "participant_id"
    bare = tmp_path / "bare.tsv"
    items.to_csv(bare, sep="\t", index=False)
    table = read_items_table(bare)
    assert list(table.index[:2]) == ["p0001", "p0002"] and list(table.columns) == list(items)
    with _error("items table not found"):
        read_items_table(tmp_path / "nope.tsv")


def test_sklearn_conventions() -> None:
    names = {"mood": ["mood_0"]}
    model = SymptomFactors(n_factors=2, names=names)
    assert model.get_params()["names"] is names
    copy = clone(model)
    assert copy.get_params()["n_factors"] == 2 and not hasattr(copy, "loadings_")
    with _error("rotation must be one of"):
        SymptomFactors(n_factors=2, rotation="promax").fit(_planted(n=30)[0])
