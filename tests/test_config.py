"""The study config: unknown and removed keys, element types, and a location-free fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import study_config

from dfrn.config import config_from_dict
from dfrn.errors import DfrnInputError


def test_unknown_section_and_bad_values(tiny_cohort) -> None:
    with pytest.raises(DfrnInputError, match=r"unknown config section \[trainig\]"):
        config_from_dict({"cohort": {"table": "x", "targets": ["a"]}, "trainig": {}}, Path("."))
    with pytest.raises(DfrnInputError, match=r"\[training\] epochs must be an integer"):
        study_config(tiny_cohort, training={"epochs": "ten"})


def test_block_strides_must_be_integers(tiny_cohort) -> None:
    with pytest.raises(DfrnInputError, match=r"\[model\] block_strides\[1\] must be an integer"):
        study_config(tiny_cohort, model={"block_strides": [1, 2.5, 2, 2]})


def test_removed_keys_say_what_to_do(tiny_cohort) -> None:
    with pytest.raises(DfrnInputError, match=r"\[baseline\] covariates was removed: list covariates once, in \[cohort\] covariates"):
        study_config(tiny_cohort, baseline={"covariates": ["age"]})
    with pytest.raises(DfrnInputError, match=r"\[training\] num_workers was removed"):
        study_config(tiny_cohort, training={"num_workers": 2})


def test_fingerprint_ignores_paths_and_device_but_not_settings(tiny_cohort, tmp_path: Path) -> None:
    import dataclasses

    a = study_config(tiny_cohort)
    moved = dataclasses.replace(tiny_cohort, root=tmp_path, table=tmp_path / "t.tsv",
                                brain_mask=tmp_path / "m.nii.gz")
    b = study_config(moved, training={"device": "cpu"})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != study_config(tiny_cohort, cohort={"intensity": "none"}).fingerprint()
    assert a.fingerprint() != study_config(tiny_cohort, training={"epochs": 3}).fingerprint()


def test_defaults_live_in_the_config() -> None:
    import inspect

    from dfrn.config import ModelConfig, TrainingConfig
    from dfrn.models.network import DFRN
    from dfrn.models.regressor import DFRNRegressor

    params = inspect.signature(DFRNRegressor).parameters
    t = TrainingConfig()
    for name in ("epochs", "batch_size", "lr", "weight_decay", "val_fraction", "patience", "seed"):
        assert params[name].default == getattr(t, name), name
    assert list(params["block_strides"].default) == ModelConfig().block_strides
    assert list(inspect.signature(DFRN).parameters["block_strides"].default) == ModelConfig().block_strides


def test_prep_section_is_validated_and_enters_the_fingerprint(tiny_cohort) -> None:
    base = study_config(tiny_cohort)
    syn = study_config(tiny_cohort, prep={"transform": "syn"})
    assert syn.prep is not None and syn.prep.transform == "syn" and syn.prep.dice_min == 0.90
    assert base.prep is None and "[prep]" not in base.to_toml() and "[prep]" in syn.to_toml()
    affine = study_config(tiny_cohort, prep={"transform": "affine"})
    more_jobs = study_config(tiny_cohort, prep={"transform": "syn", "jobs": 8})
    assert len({base.fingerprint(), syn.fingerprint(), affine.fingerprint()}) == 3
    assert more_jobs.fingerprint() == syn.fingerprint()  # parallelism does not change results
    with pytest.raises(DfrnInputError, match=r"\[prep\] transform 'rigid' must be 'syn' or 'affine'"):
        study_config(tiny_cohort, prep={"transform": "rigid"})
    with pytest.raises(DfrnInputError, match=r"\[prep\] needs both template and template_mask"):
        study_config(tiny_cohort, prep={"template": "t.nii.gz"})
    deriv = study_config(tiny_cohort, cohort={"table": str(tiny_cohort.table), "targets": ["sleep"],
                                              "derivatives": "/data/fmriprep"})
    assert deriv.fingerprint() != study_config(
        tiny_cohort, cohort={"table": str(tiny_cohort.table), "targets": ["sleep"]}).fingerprint()


def test_duplicated_targets_and_covariates_are_refused(tiny_cohort) -> None:
    with pytest.raises(DfrnInputError, match=r"config \[cohort\] targets lists 'sleep' twice"):
        study_config(tiny_cohort, cohort={"targets": ["sleep", "anhedonia", "sleep"]})
    with pytest.raises(DfrnInputError, match=r"config \[cohort\] covariates lists 'age' twice"):
        study_config(tiny_cohort, cohort={"covariates": ["age", "sex", "age"]})


@pytest.mark.parametrize(
    ("section", "key", "value", "minimum"),
    [
        ("baseline", "n_permutations", -1, 0),
        ("training", "patience", -1, 1),
        ("training", "patience", 0, 1),
        ("training", "seed", -1, 0),
        ("cv", "seed", -3, 0),
        ("attention", "top_regions", -1, 1),
        ("attention", "top_regions", 0, 1),
    ],
)
def test_negative_counts_are_refused_naming_section_and_key(
    tiny_cohort, section: str, key: str, value: int, minimum: int
) -> None:
    with pytest.raises(
        DfrnInputError, match=rf"^config \[{section}\] {key} must be >= {minimum}, got {value}$"
    ):
        study_config(tiny_cohort, **{section: {key: value}})


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("confounds", {"target": "residualize"},
         r"\[confounds\] target = 'residualize' needs \[cohort\] covariates or site"),
        ("confounds", {"target": "regress"}, r"\[confounds\] target must be 'none' or 'residualize'"),
        ("baseline", {"harmonize": "combat"}, r"harmonize = 'combat' needs \[cohort\] site"),
        ("cohort", {"missing_covariates": "impute"}, "missing_covariates must be 'refuse' or 'drop'"),
        ("confounds", {"n_permutations": -1}, r"\[confounds\] n_permutations must be >= 0"),
        ("cohort", {"covariates": ["a"]}, r"\[cohort\] covariates lists the target 'a'"),
        ("model", {"widen_factor": 0.01}, r"\[model\] widen_factor must be at least 1/64, got 0.01"),
    ],
)
def test_confound_settings_give_one_line(tmp_path, section, values, message) -> None:
    from dfrn.config import config_from_dict

    raw = {"cohort": {"table": "t.tsv", "targets": ["a"]}}
    raw.setdefault(section, {}).update(values)
    with pytest.raises(DfrnInputError, match=message):
        config_from_dict(raw, tmp_path)


def test_new_keys_at_their_defaults_keep_old_run_identities(tmp_path) -> None:
    """Fingerprints computed by dfrn before [confounds], site, groups and harmonize existed.

    Since ``early_stopping = "auto"`` and ``bn_stats = "recompute"`` became the defaults
    (they change the numbers), an old run keeps its identity when its config spells out
    the old rule and statistics; the new defaults are a new identity.
    """
    from dfrn.config import config_from_dict

    # the inner split dfrn drew before it was stratified, dfrn's stopping rule and BN
    # statistics before the learning issue
    old = {"val_split": "random", "early_stopping": "val", "bn_stats": "running"}
    raw = {"cohort": {"table": "t.tsv", "targets": ["a"], "covariates": ["age"]}, "prep": {},
           "training": dict(old)}
    assert config_from_dict(raw, tmp_path).fingerprint() == "641b9abb3518e728"
    raw = {"cohort": {"table": "t.tsv", "targets": ["a"]}, "training": dict(old)}
    assert config_from_dict(raw, tmp_path).fingerprint() == "38bff881f1eb4135"
    raw["model"] = {"widen_factor": 1.0}  # the paper's width, written out
    assert config_from_dict(raw, tmp_path).fingerprint() == "38bff881f1eb4135"
    raw["model"] = {"widen_factor": 0.125}
    assert config_from_dict(raw, tmp_path).fingerprint() != "38bff881f1eb4135"
    del raw["model"]
    raw["confounds"] = {"n_permutations": 10}
    assert config_from_dict(raw, tmp_path).fingerprint() != "38bff881f1eb4135"
    del raw["confounds"]
    for new in ({"early_stopping": "auto"}, {"bn_stats": "recompute"}):  # the new defaults
        raw["training"] = {**old, **new}
        assert config_from_dict(raw, tmp_path).fingerprint() != "38bff881f1eb4135"
    raw["training"] = dict(old)
    raw["baseline"] = {"models": ["roi_ridge"]}  # the one baseline model before voxel ridge
    raw["cohort"]["categorical_covariates"] = []
    assert config_from_dict(raw, tmp_path).fingerprint() == "38bff881f1eb4135"
    # the stratified split changes the numbers, so it changes the identity where there is one
    raw = {"cohort": {"table": "t.tsv", "targets": ["a"]}}
    assert config_from_dict(raw, tmp_path).fingerprint() != "38bff881f1eb4135"
    raw["training"] = {"val_fraction": 0.0}  # no split: the same numbers as before
    assert config_from_dict(raw, tmp_path).fingerprint() == config_from_dict(
        {**raw, "training": {"val_fraction": 0.0, "val_split": "random"}}, tmp_path).fingerprint()


@pytest.mark.parametrize(("training", "message"), [
    ({"early_stopping": "smoothed", "min_epochs": 30, "epochs": 20},
     r"min_epochs \(30\) > epochs \(20\): early_stopping = 'smoothed' would keep no epoch"),
    ({"early_stopping": "soon"}, "early_stopping must be 'auto' or 'val'"),
    ({"bn_stats": "batch"}, "bn_stats must be 'recompute' or 'running'"),
    ({"learning_start": 0.0}, r"learning_start must be in \(0, 1\]"),
    ({"min_val_subjects": 1}, "min_val_subjects must be >= 2"),
    ({"target_scaling": "none"}, "early_stopping = 'auto' judges the training loss of z-scored"),
])
def test_training_settings_that_cannot_work_are_refused_at_config_time(
        tmp_path, training, message) -> None:
    """Issue 26.3: min_epochs above epochs trained ``epochs`` and recorded an epoch the
    rule never keeps; now it is one line before anything runs."""
    from dfrn.config import config_from_dict

    raw = {"cohort": {"table": "t.tsv", "targets": ["a"]}, "training": training}
    with pytest.raises(DfrnInputError, match=message):
        config_from_dict(raw, tmp_path)
    # the default min_epochs (10) above a short run is fine: only "smoothed" uses it
    config_from_dict({"cohort": {"table": "t.tsv", "targets": ["a"]},
                      "training": {"epochs": 5}}, tmp_path)


def test_a_bootstrap_typo_is_refused_before_any_work(tmp_path) -> None:
    from dfrn.config import MAX_BOOTSTRAP, config_from_dict

    raw = {"cohort": {"table": "t.tsv", "targets": ["a"]}, "attention": {"bootstrap": 10**9}}
    with pytest.raises(DfrnInputError, match=r"bootstrap must be <= 100,000, got 1,000,000,000"):
        config_from_dict(raw, tmp_path)
    raw["attention"]["bootstrap"] = MAX_BOOTSTRAP
    assert config_from_dict(raw, tmp_path).attention.bootstrap == MAX_BOOTSTRAP


def test_a_folder_made_before_new_defaults_resumes_with_its_saved_config(tmp_path) -> None:
    """A results folder's config.toml lacks the keys added since: they take the values the
    run was made with (bn_stats = "running"), so the saved config keeps the run's identity;
    the same file outside a results folder gets today's defaults."""
    import tomllib

    import tomli_w

    from dfrn.config import config_from_dict, load_config

    old = {"cohort": {"table": "t.tsv", "targets": ["a"]},
           "training": {"early_stopping": "val", "bn_stats": "running"}}
    made_then = config_from_dict(old, tmp_path)
    saved = tomllib.loads(made_then.to_toml())
    for section, key in (("training", "bn_stats"), ("training", "min_val_subjects"),
                         ("training", "learning_start"), ("cohort", "categorical_covariates")):
        del saved[section][key]  # the keys dfrn did not have when the folder was made
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "config.toml").write_text(tomli_w.dumps(saved), encoding="utf-8")
    assert load_config(folder / "config.toml").training.bn_stats == "recompute"  # no run.json
    (folder / "run.json").write_text("{}", encoding="utf-8")
    resumed = load_config(folder / "config.toml")
    assert resumed.training.bn_stats == "running"
    assert resumed.fingerprint() == made_then.fingerprint()
