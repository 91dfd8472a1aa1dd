"""What a user sees from the ``dfrn`` command: argument checks and ``dfrn factors`` messages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dfrn.cli import build_parser, main
from dfrn.config import FactorsConfig
from dfrn.errors import DfrnInputError

# -- helpers -----------------------------------------------------------------------------------


def _noise(n: int = 200, p: int = 10, seed: int = 1) -> pd.DataFrame:
    """Pure-noise items: independent standard normals (no factor at all)."""
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"p{i:03d}" for i in range(n)], name="participant_id")
    return pd.DataFrame(rng.standard_normal((n, p)), index=ids,
                        columns=[f"i{j + 1}" for j in range(p)])


def _planted(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """9 items, 3 per factor, loading 0.8 on three independent factors."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, 3))
    items = {f"i{j + 1}": 0.8 * f[:, j // 3] + 0.6 * rng.standard_normal(n) for j in range(9)}
    return pd.DataFrame(items, index=pd.Index([f"p{i:03d}" for i in range(n)],
                                              name="participant_id"))


def _write(items: pd.DataFrame, path: Path, index: bool = True) -> Path:
    items.to_csv(path, sep="\t", index=index)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# -- item 5: every count option refuses negative (and, where meaningless, zero) values ---------

_BAD_COUNTS = [
    (["run", "s.toml", "--out", "o", "--permutations", "-1"], "--permutations"),
    (["demo", "--seed", "-1"], "--seed"),
    (["factors", "i.tsv", "--out", "o", "--resamples", "-1"], "--resamples"),
    (["factors", "i.tsv", "--out", "o", "--seed", "-3"], "--seed"),
    (["factors", "i.tsv", "--out", "o", "--resamples", "2.5"], "--resamples"),
    (["factors", "i.tsv", "--out", "o", "--n-factors", "-2"], "--n-factors"),
    (["factors", "i.tsv", "--out", "o", "--tol", "-0.5"], "--tol"),
    (["prep", "raw", "--out", "o", "--jobs", "0"], "--jobs"),
    (["prep", "raw", "--out", "o", "--jobs", "-4"], "--jobs"),
    (["prep", "raw", "--out", "o", "--seed", "-1"], "--seed"),
    (["baseline", "res", "--permutations", "-1"], "--permutations"),
]


@pytest.mark.parametrize("argv, option", _BAD_COUNTS, ids=[" ".join(a) for a, _ in _BAD_COUNTS])
def test_count_options_refuse_bad_values(argv: list[str], option: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and argv[-1] in err


def test_count_options_accept_zero_where_it_means_none() -> None:
    parser = build_parser()
    assert parser.parse_args(["run", "s.toml", "--out", "o", "--permutations", "0"]).permutations == 0
    assert parser.parse_args(["baseline", "r", "--permutations", "0"]).permutations == 0
    args = parser.parse_args(["factors", "i.tsv", "--resamples", "0", "--seed", "0"])
    assert (args.resamples, args.seed) == (0, 0)
    assert parser.parse_args(["prep", "raw", "--out", "o", "--jobs", "2"]).jobs == 2


def test_factors_help_says_what_zero_resamples_means(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["factors", "--help"])
    assert exc.value.code == 0
    assert "0 skips the stability estimate" in " ".join(capsys.readouterr().out.split())


# -- item 4: a criterion that retains no factor is refused ------------------------------------


@pytest.mark.parametrize("criterion", ["parallel", "map"])
def test_criterion_on_noise_refuses(criterion: str, tmp_path: Path, capsys) -> None:
    items = _write(_noise(), tmp_path / "noise.tsv")
    out = tmp_path / "out"
    assert main(["factors", str(items), "--n-factors", criterion, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert f"{'parallel analysis' if criterion == 'parallel' else 'MAP'} retained 0 factors" in line
    assert "noise" in line and "--n-factors N" in line
    assert not (out / "factors").exists()


def test_suggest_on_noise_reports_zero(tmp_path: Path, capsys) -> None:
    items = _write(_noise(), tmp_path / "noise.tsv")
    assert main(["factors", str(items), "--suggest"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: int(line.split()[1]) for line in table.splitlines()
            if line.split() and line.split()[0] in ("parallel", "map")}
    assert rows == {"parallel": 0, "map": 0}


@pytest.mark.parametrize("criterion", ["parallel", "map"])
def test_criterion_on_planted_structure_still_fits(criterion: str, tmp_path: Path) -> None:
    items = _write(_planted(), tmp_path / "planted.tsv")
    out = tmp_path / "out"
    assert main(["factors", str(items), "--n-factors", criterion, "--out", str(out),
                 "--resamples", "3"]) == 0
    loadings = pd.read_csv(out / "factors/loadings.tsv", sep="\t")
    assert loadings.shape == (9, 4)


def test_config_criterion_on_noise_names_the_config_key() -> None:
    from dfrn.targets.providers import fit_factor_model

    cohort = SimpleNamespace(table=_noise())
    cfg = FactorsConfig(items=list(_noise().columns), n_factors="parallel")
    with pytest.raises(DfrnInputError, match=r"retained 0 factors.*\[factors\] n_factors = N"):
        fit_factor_model(cohort, cfg)


# -- item 9: --resamples 0 means no stability estimate -----------------------------------------


def test_zero_resamples_skips_stability(tmp_path: Path, capsys) -> None:
    items = _write(_planted(), tmp_path / "planted.tsv")
    out = tmp_path / "out"
    assert main(["factors", str(items), "--n-factors", "3", "--out", str(out),
                 "--resamples", "0"]) == 0
    text = capsys.readouterr().out
    assert "stability not estimated (--resamples 0)" in text
    for name in ("loadings", "scores", "variance"):
        assert (out / f"factors/{name}.tsv").is_file()
    assert not (out / "factors/stability.tsv").exists()


def test_split_half_stability_with_no_resamples_is_empty() -> None:
    from dfrn.targets.factors import SymptomFactors
    from dfrn.targets.stability import STABILITY_COLUMNS, split_half_stability
    from dfrn.workflows.factors import write_stability

    items = _planted(n=60)
    ref = SymptomFactors(n_factors=3).fit(items)
    table = split_half_stability(items, ref, n_resamples=0)
    assert table.empty and list(table.columns) == STABILITY_COLUMNS
    lines: list[str] = []
    assert write_stability(table, Path("never-written"), lines.append) is None
    assert "not estimated" in lines[0] and not Path("never-written").exists()
    with pytest.raises(DfrnInputError, match="n_resamples must be"):
        split_half_stability(items, ref, n_resamples=-1)


# -- item 13: an items table without participant_id --------------------------------------------


def test_missing_id_column_is_named(tmp_path: Path, capsys) -> None:
    items = _planted(n=40).reset_index().rename(columns={"participant_id": "subject"})
    path = _write(items, tmp_path / "items.tsv", index=False)
    assert main(["factors", str(path), "--out", str(tmp_path / "o"), "--n-factors", "2"]) == 2
    line = _error_line(capsys)
    assert "items.tsv has no participant_id column" in line
    assert "columns found: subject, i1, i2" in line


def test_numeric_id_like_column_is_not_taken_for_an_item(tmp_path: Path, capsys) -> None:
    items = _planted(n=40).reset_index(drop=True)
    items.insert(0, "ID", np.arange(1001, 1041))
    path = _write(items, tmp_path / "items.tsv", index=False)
    assert main(["factors", str(path), "--out", str(tmp_path / "o"), "--n-factors", "2"]) == 2
    line = _error_line(capsys)
    assert "no participant_id column" in line and "'ID'" in line


def test_all_numeric_table_without_ids_numbers_the_rows(tmp_path: Path, capsys) -> None:
    path = _write(_planted(n=40), tmp_path / "bare.tsv", index=False)
    out = tmp_path / "o"
    assert main(["factors", str(path), "--out", str(out), "--n-factors", "3",
                 "--resamples", "2"]) == 0
    assert "bare.tsv has no participant_id column: participants are numbered p0001" \
        in capsys.readouterr().err
    scores = pd.read_csv(out / "factors/scores.tsv", sep="\t")
    assert scores["participant_id"].iloc[0] == "p0001"


def test_bad_item_cell_without_ids_still_names_the_item(tmp_path: Path, capsys) -> None:
    items = _planted(n=40).reset_index(drop=True).astype(object)
    items.loc[5, "i3"] = "often"
    path = _write(items, tmp_path / "bare.tsv", index=False)
    assert main(["factors", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "item 'i3' of participant 'p0006' is not numeric: 'often'" in _error_line(capsys)


# -- item 14: messages name the user's option and the user's count ------------------------------


def test_missing_cell_names_the_cli_option(tmp_path: Path, capsys) -> None:
    items = _planted(n=40)
    items.iloc[3, 2] = np.nan
    path = _write(items, tmp_path / "items.tsv")
    assert main(["factors", str(path), "--out", str(tmp_path / "o"), "--n-factors", "3"]) == 2
    line = _error_line(capsys)
    assert "item 'i3' is missing for participant 'p003'" in line
    assert "--impute median" in line and "impute='median'" not in line
    assert main(["factors", str(path), "--out", str(tmp_path / "o2"), "--n-factors", "3",
                 "--impute", "median", "--resamples", "2"]) == 0


def test_missing_cell_names_the_config_key() -> None:
    from dfrn.targets.providers import fit_factor_model

    items = _planted(n=40)
    items.iloc[3, 2] = np.nan
    cfg = FactorsConfig(items=list(items.columns), n_factors=3)
    with pytest.raises(DfrnInputError, match=r'set \[factors\] impute = "median"'):
        fit_factor_model(SimpleNamespace(table=items), cfg)


def test_few_participants_warning_states_the_users_count(tmp_path: Path, capsys) -> None:
    path = _write(_noise(n=6), tmp_path / "six.tsv")
    assert main(["factors", str(path), "--out", str(tmp_path / "o"), "--n-factors", "2",
                 "--resamples", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("fewer participants (6) than items (10)") == 1
    assert "(3)" not in err
    assert err.count("split halves of 3 of the 6 participants are fewer than the 10 items") == 1


def test_items_table_shares_the_cohort_reader(tmp_path: Path) -> None:
    """A tab-separated file named .csv is read as such, and an ID "NA" stays an ID."""
    from dfrn.targets.factors import read_items_table

    items = _planted(n=40)
    items.index = pd.Index(["NA", "None", *items.index[2:]], name="participant_id")
    path = _write(items, tmp_path / "items.csv")  # tabs, although the name says comma
    with pytest.warns(UserWarning, match="tab"):
        got = read_items_table(path)
    assert list(got.index[:2]) == ["NA", "None"]
    np.testing.assert_allclose(got.to_numpy(), items.to_numpy())
