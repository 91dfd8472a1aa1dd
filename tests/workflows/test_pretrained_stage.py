"""``[model] init`` through ``dfrn run``: a study started from another study's package."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import study_config

from dfrn.errors import DfrnInputError
from dfrn.io import file_digest
from dfrn.workflows.run import run_study


def _history(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "cv/tasks/repeat-0_fold-0_anhedonia/history.tsv", sep="\t")


@pytest.fixture(scope="module")
def source(tiny_cohort, tmp_path_factory) -> Path:
    """A finished study with model packages, on another 12 subjects of the tiny cohort's
    generator and grid (a package of the study's own subjects would leak: see below)."""
    from dfrn.data.synth import make_synthetic_cohort

    root = tmp_path_factory.mktemp("pretrained")
    other = make_synthetic_cohort(root / "cohort", n_subjects=12, voxel_size=8.0, effect=0.4,
                                  radius=14.0, seed=4)
    run_study(study_config(other, final={"enabled": True}), root / "source", progress=False,
              log=lambda s: None)
    return root / "source"


def _cohort_of(source: Path):
    """The source study's own cohort, as the tests' config helper takes it."""
    from types import SimpleNamespace

    root = source.parent / "cohort"
    return SimpleNamespace(table=root / "participants.tsv", brain_mask=root / "brain_mask.nii.gz",
                           root=root)


def test_a_package_of_the_studys_own_scans_is_refused_or_warned_about(source: Path,
                                                                        tmp_path) -> None:
    """Fine-tuning from a network that trained on the study's own subjects and target would
    let every test fold's target into training: refused before the folder is a run. Another
    target of the same subjects is a warning."""
    own = _cohort_of(source)
    package = str(source / "models" / "anhedonia")
    leaky = study_config(own, model={"init": package})
    with pytest.raises(DfrnInputError, match=r"trained on 'anhedonia' with 12 of this study's "
                       r"scans, so every test fold's target was seen before training"):
        run_study(leaky, tmp_path / "leak", progress=False, log=lambda s: None)
    assert not (tmp_path / "leak" / "run.json").exists()
    other = study_config(own, cohort={"targets": ["appetite"]}, model={"init": package})
    logs: list[str] = []
    run_study(other, tmp_path / "other", progress=False, log=logs.append)
    assert any(x.startswith(f"warning: [model] init {package} was trained (on 'anhedonia') "
                            "with 12 of this study's scans") for x in logs), logs


def test_a_study_starts_from_another_studys_package(source: Path, tiny_cohort, tmp_path) -> None:
    """The log names what was loaded, training starts from it (the first epoch's loss differs
    from the same seeded study from scratch), the run resumes like any other, and other
    weights are another run: a rerun into the same folder is refused."""
    package = source / "models" / "anhedonia"
    cfg = study_config(tiny_cohort, model={"init": str(package)}, final={"enabled": True})
    out = tmp_path / "tuned"
    logs: list[str] = []
    run_study(cfg, out, progress=False, log=logs.append)
    line = next(x for x in logs if x.startswith("init: "))
    assert line.startswith("init: loaded ") and line.endswith(
        f" tensors from dfrn package (anhedonia) {package}; re-initialised fc"), line
    scratch = tmp_path / "scratch"  # the same study, seeded the same, from random weights
    run_study(study_config(tiny_cohort, final={"enabled": True}), scratch, progress=False,
              log=lambda s: None)
    assert float(_history(out)["train_loss"].iloc[0]) != float(
        _history(scratch)["train_loss"].iloc[0])
    meta = json.loads((out / "models/sleep/metadata.json").read_text())  # provenance
    assert meta["init"] == {"fine_tuned_from": f"dfrn package (anhedonia) {package}",
                            "kind": "package", "sha256": file_digest(package / "model-0.safetensors")}
    assert f"fine-tuned from the dfrn package (anhedonia) {package}" in (
        out / "models/sleep/README.md").read_text()
    report = (out / "report.html").read_text()  # the report explains the packages' extras
    section = report.split('id="packages"', 1)[1].split("<h2", 1)[0]
    assert "anhedonia, sleep" in section and "by CV+" in section and "--strict" in section
    before = (out / "cv/predictions.tsv").read_text()
    task = out / "cv/tasks/repeat-0_fold-0_anhedonia/model.pt"
    stamp = task.stat().st_mtime_ns
    run_study(cfg, out, progress=False, log=lambda s: None)  # resumes: nothing retrained
    assert task.stat().st_mtime_ns == stamp and (out / "cv/predictions.tsv").read_text() == before
    other = study_config(tiny_cohort, model={"init": str(source / "models" / "sleep")},
                         final={"enabled": True})
    with pytest.raises(DfrnInputError, match=r"was made from other input data: .*\[model\] init"):
        run_study(other, out, progress=False, log=lambda s: None)


def test_a_package_for_other_inputs_is_refused_or_warned_about(source: Path, tiny_cohort,
                                                               tmp_path) -> None:
    package = str(source / "models" / "anhedonia")
    minmax = study_config(tiny_cohort, cohort={"intensity": "minmax"}, model={"init": package})
    with pytest.raises(DfrnInputError, match=r"package's networks were trained on intensity "
                       r"'zscore' inputs, this study's are 'minmax'"):
        run_study(minmax, tmp_path / "a", progress=False, log=lambda s: None)
    assert not (tmp_path / "a" / "run.json").exists()  # refused before the folder is a run
    coarser = study_config(tiny_cohort, cohort={"downsample": 2}, model={"init": package})
    logs: list[str] = []
    run_study(coarser, tmp_path / "b", progress=False, log=logs.append)
    assert any(x.startswith(f"warning: [model] init {package} was trained on 8 mm network "
                            "inputs, this study's are 16 mm: the convolutions apply at any "
                            "grid") for x in logs), logs
