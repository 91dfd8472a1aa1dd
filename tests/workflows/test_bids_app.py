"""``dfrn bids``: the BIDS-Apps command line on three real IXI scans (affine, 4 mm template).

The participant level runs as concurrent processes into one output folder (one label
each), then the group level runs a study on their ``cohort.tsv``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("ants")

LABELS = ["IXI012", "IXI013", "IXI014"]
STUDY = """[cohort]
targets = ["age"]
covariates = ["sex"]
[model]
widen_factor = 0.125
[training]
epochs = 1
val_fraction = 0.0
[cv]
n_folds = 3
n_repeats = 1
[baseline]
enabled = false
[attention]
enabled = false
[final]
enabled = false
"""


@pytest.fixture(scope="module")
def bids_ds(ixi_4mm: Path, tmp_path_factory) -> Path:
    """A BIDS dataset of three IXI scans at 4 mm (conftest's ``ixi_4mm``), with
    participants.tsv (age, sex)."""
    ds = tmp_path_factory.mktemp("bids") / "ds"
    ds.mkdir()
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "IXI three",
                                                             "BIDSVersion": "1.9.0"}))
    ixi = pd.read_csv(ixi_4mm / "participants.tsv", sep="\t", dtype=str)
    ixi = ixi[ixi.participant_id.isin([f"sub-{x}" for x in LABELS])]
    ixi[["participant_id", "age", "sex"]].to_csv(ds / "participants.tsv", sep="\t", index=False)
    for pid in ixi.participant_id:
        (ds / pid / "anat").mkdir(parents=True)
        shutil.copy(ixi_4mm / f"{pid}_T1w.nii.gz", ds / pid / "anat" / f"{pid}_T1w.nii.gz")
    return ds


def _bids(*args: str, template: tuple[Path, Path]) -> subprocess.Popen:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    code = "import sys; from dfrn.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, "bids", *args, "--template", str(template[0]),
         "--template-mask", str(template[1]), "--transform", "affine", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, list[str]]:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err.strip().splitlines()


def test_participants_in_parallel_then_group_ends_in_a_finished_study(
    bids_ds, template_4mm, tmp_path
) -> None:
    from dfrn.errors import DfrnInputError
    from dfrn.io import verify_manifest

    out = tmp_path / "out"
    first_two = [_bids(str(bids_ds), str(out), "participant", "--participant-label", label,
                       template=template_4mm) for label in LABELS[:2]]
    for proc in first_two:
        rc, _, err = _finish(proc)
        assert rc == 0, err
    # both subjects are in the tables, whichever process wrote them last
    cohort = pd.read_csv(out / "cohort.tsv", sep="\t")
    assert sorted(cohort["participant_id"]) == ["sub-IXI012", "sub-IXI013"]
    assert sorted(pd.read_csv(out / "qc.tsv", sep="\t")["participant_id"]) == ["sub-IXI012",
                                                                                "sub-IXI013"]
    for label in LABELS[:2]:
        assert verify_manifest(out / f"sub-{label}", required=("qc.json",)) is None
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "dfrn"
    assert not list(out.glob(".prep-*.tmp"))

    config = tmp_path / "study.toml"
    config.write_text(STUDY)
    rc, _, err = _finish(_bids(str(bids_ds), str(out), "group", "--config", str(config),
                               template=template_4mm))
    assert rc == 2 and len(err) == 1, err
    assert "1 of 3 participant(s) have no finished participant level" in err[0]
    assert "sub-IXI014 (not preprocessed yet)" in err[0] and "for them first" in err[0]
    assert not (out / "study").exists()

    rc, _, err = _finish(_bids(str(bids_ds), str(out), "participant", "--participant_label",
                               LABELS[2], template=template_4mm))
    assert rc == 0, err
    rc, stdout, err = _finish(_bids(str(bids_ds), str(out), "group", "--config", str(config),
                                    template=template_4mm))
    assert rc == 0, err
    assert "the participant level of" in stdout and "is complete and verified" in stdout
    predictions = pd.read_csv(out / "study" / "cv" / "predictions.tsv", sep="\t")
    assert sorted(predictions["participant_id"]) == [f"sub-{x}" for x in LABELS]
    assert (out / "study" / "report.html").is_file()
    recorded = (out / "study" / "config.toml").read_text()
    assert f'table = "{out / "cohort.tsv"}"' in recorded

    # labels narrow the group; a damaged subject is refused by name, not preprocessed again
    from dfrn.workflows.prep import verify_prep

    kw = {"template": template_4mm[0], "template_mask": template_4mm[1], "transform": "affine"}
    table = verify_prep(bids_ds, out, participants=LABELS[:2], **kw)
    assert table.name == "group_cohort.tsv"
    assert sorted(pd.read_csv(table, sep="\t")["participant_id"]) == ["sub-IXI012", "sub-IXI013"]
    assert len(pd.read_csv(out / "group_qc.tsv", sep="\t")) == 2  # read beside it by dfrn run
    victim = next((out / "sub-IXI013" / "anat").glob("*desc-preproc_T1w.nii.gz"))
    damaged = victim.read_bytes()[:-10]
    victim.write_bytes(damaged)
    with pytest.raises(DfrnInputError, match=r"1 of 3 .*sub-IXI013 \(sub-IXI013 failed its check"):
        verify_prep(bids_ds, out, **kw)
    assert victim.read_bytes() == damaged and not list(out.glob(".prep-*"))  # not redone


def test_an_unknown_label_is_one_line(bids_ds, template_4mm, tmp_path) -> None:
    rc, _, err = _finish(_bids(str(bids_ds), str(tmp_path / "out"), "participant",
                               "--participant-label", "IXI999", template=template_4mm))
    assert rc == 2 and len(err) == 1, err
    assert "participant label 'IXI999' is not in" in err[0] and "IXI012" in err[0]
    assert not list((tmp_path / "out").glob("sub-*"))


def test_group_refuses_a_config_that_names_its_own_cohort(tmp_path) -> None:
    from dfrn.errors import DfrnInputError
    from dfrn.workflows.bids_app import group_config

    config = tmp_path / "study.toml"
    config.write_text(STUDY.replace('[cohort]\n', '[cohort]\ntable = "mine.tsv"\n'))
    with pytest.raises(DfrnInputError, match=r"\[cohort\] table is set by 'dfrn bids … group'"):
        group_config(config, tmp_path / "out" / "cohort.tsv")
    config.write_text(STUDY)
    cfg = group_config(config, tmp_path / "out" / "cohort.tsv")
    assert cfg.cohort.table == str(tmp_path / "out" / "cohort.tsv") and cfg.cohort.targets == ["age"]


def test_the_participant_level_runs_its_subjects_itself(bids_ds, template_4mm, tmp_path,
                                                          capsys) -> None:
    """One job-array element per subject: an executor of its own is refused in one line."""
    pytest.importorskip("submitit")
    from dfrn.cli import main

    settings = tmp_path / "ex.toml"
    settings.write_text('[executor]\nkind = "slurm"\ncluster = "local"\n')
    rc = main(["bids", str(bids_ds), str(tmp_path / "out"), "participant", "--participant-label",
               "IXI012", "--executor", "slurm", "--executor-config", str(settings),
               "--template", str(template_4mm[0]), "--template-mask", str(template_4mm[1]),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "the participant level preprocesses its subjects in this process" in err[0]
    assert "use 'dfrn prep --executor slurm'" in err[0]
