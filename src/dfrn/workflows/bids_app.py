"""``dfrn bids BIDS_DIR OUTPUT_DIR {participant,group}``: the BIDS-Apps command line.

* **participant** runs ``dfrn prep`` for ``--participant-label`` (all subjects when absent)
  and writes BIDS derivatives into ``OUTPUT_DIR`` (``dataset_description.json``,
  ``sub-<label>/anat/…``, ``qc.tsv``, ``cohort.tsv``). Each subject is locked on its own, so
  one process per subject may run at once into the same ``OUTPUT_DIR`` (a job array).
* **group** checks that every subject (or every labelled one) has a finished, verified
  participant level (it preprocesses nothing), rewrites ``cohort.tsv`` from them (for
  labels: ``group_cohort.tsv`` of those only), and runs the study configured in
  ``--config`` on it, into ``OUTPUT_DIR/study/``.

See the BIDS-Apps specification (Gorgolewski et al. 2017, PLoS Comput Biol 13: e1005209).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfrn.errors import DfrnInputError

__all__ = ["run_bids_participant", "run_bids_group", "group_config", "STUDY_FOLDER"]

#: Where the group level writes the study, inside ``OUTPUT_DIR``.
STUDY_FOLDER = "study"
#: ``[cohort]`` keys the group level sets itself (to ``OUTPUT_DIR/cohort.tsv``).
_SET_BY_GROUP = ("table", "bids", "image_column", "derivatives", "session")


def run_bids_participant(
    bids_dir: str | Path, output_dir: str | Path, labels: Sequence[str] | None = None,
    **prep: Any,
) -> Any:
    """The participant level: :func:`dfrn.workflows.prep.run_prep` on ``labels``.

    ``prep`` holds run_prep's settings (template, transform, seed, executor, …).
    """
    from dfrn.workflows.prep import run_prep

    bids = _bids_root(bids_dir)
    return run_prep(bids, output_dir, participants=labels, **prep)


def run_bids_group(
    bids_dir: str | Path, output_dir: str | Path, config: str | Path,
    labels: Sequence[str] | None = None, progress: bool = True,
    log: Callable[[str], None] = print, **prep: Any,
) -> Any:
    """The group level: verify the participant level, then the study on its cohort table.

    ``prep`` holds the participant level's settings (template, transform, seed,
    deterministic, QC thresholds), which the derivatives' ``prep.json`` must match; nothing
    is preprocessed here. With ``labels`` the study has those subjects only
    (``group_cohort.tsv``). The study runs where its config's ``[executor]`` says.

    Raises
    ------
    DfrnInputError
        When a subject has no finished participant level (naming the first ones), or the
        config sets what the group level sets (``[cohort] table``, ``bids``, ``[prep]``).
    """
    from dfrn.workflows.prep import verify_prep
    from dfrn.workflows.run import run_study

    bids, out = _bids_root(bids_dir), Path(output_dir).resolve()
    group_config(config, out / "cohort.tsv")  # its errors before the (longer) verification
    keys = ("transform", "seed", "deterministic", "template", "template_mask",
            "template_space", "dice_min", "corr_min")
    table = verify_prep(bids, out, participants=labels, **{k: prep[k] for k in keys if k in prep})
    log(f"group level: the participant level of {out} is complete and verified ({table.name})")
    return run_study(group_config(config, table), out / STUDY_FOLDER, progress=progress, log=log)


def group_config(config: str | Path, cohort_table: Path) -> Any:
    """The study config of ``--config``, its cohort read from the participant level's table."""
    from dfrn.config import config_from_dict

    path = Path(config)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DfrnInputError(f"cannot read the study config {path}: {exc}") from None
    cohort = raw.setdefault("cohort", {})
    taken = [f"[cohort] {k}" for k in _SET_BY_GROUP if k in cohort]
    taken += ["[prep]"] if "prep" in raw else []
    if taken:
        raise DfrnInputError(
            f"{path}: {taken[0]} is set by 'dfrn bids … group' (the cohort is the participant "
            "level's cohort.tsv); remove it from the config"
        )
    cohort["table"] = str(cohort_table)
    return config_from_dict(raw, path.resolve().parent)


def _bids_root(bids_dir: str | Path) -> Path:
    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise DfrnInputError(f"BIDS_DIR {root} is not a folder")
    if not (root / "dataset_description.json").is_file():
        raise DfrnInputError(
            f"BIDS_DIR {root} has no dataset_description.json: it is not a BIDS dataset"
        )
    return root
