"""``dfrn bids BIDS_DIR OUTPUT_DIR {participant,group}``: the BIDS-Apps command line.

* **participant** runs ``dfrn prep`` for ``--participant-label`` (all subjects when absent)
  and writes BIDS derivatives into ``OUTPUT_DIR`` (``dataset_description.json``,
  ``sub-<label>/anat/…``, ``qc.tsv``, ``cohort.tsv``). Each subject is locked on its own, so
  one process per subject may run at once into the same ``OUTPUT_DIR`` (a job array).
* **group** checks that every subject (or every labelled one) has a finished, verified
  participant level, rebuilds ``cohort.tsv`` from them, and runs the study configured in
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
    """The group level: verify the participant level, then the study on its ``cohort.tsv``.

    ``prep`` holds the participant level's settings (the same template and transform, which
    the derivatives folder's ``prep.json`` must match). The study runs where its config's
    ``[executor]`` says.

    Raises
    ------
    DfrnInputError
        When a subject has no finished participant level (naming the first ones), or the
        config sets what the group level sets (``[cohort] table``, ``bids``, ``[prep]``).
    """
    from dfrn.workflows.prep import run_prep
    from dfrn.workflows.run import run_study

    bids, out = _bids_root(bids_dir), Path(output_dir).resolve()
    cfg = group_config(config, out / "cohort.tsv")
    if not (out / "prep.json").is_file():
        raise DfrnInputError(
            f"{out} holds no participant level (no prep.json); run 'dfrn bids {bids} {out} "
            "participant' first"
        )
    _check_participants_done(bids, out, labels, prep)
    # every subject is done, so this only verifies them and rewrites qc.tsv and cohort.tsv
    run_prep(bids, out, participants=labels, progress=False, log=log, changed_input="refuse",
             **prep)
    return run_study(cfg, out / STUDY_FOLDER, progress=progress, log=log)


def _check_participants_done(bids: Path, out: Path, labels: Sequence[str] | None,
                             prep: dict[str, Any]) -> None:
    """A one-line error naming the subjects without a finished participant level."""
    from dfrn.data.templates import resolve_template
    from dfrn.workflows.prep import plan_prep_subjects, select_participants

    tpl = resolve_template(prep.get("template"), prep.get("template_mask"),
                           prep.get("template_space"))
    _, subjects = plan_prep_subjects(bids, space=tpl.space)
    chosen = select_participants(subjects, labels, bids)
    missing = [s.stem for s in chosen if not (out / s.folder / "qc.json").is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DfrnInputError(
            f"group level: {len(missing)} of {len(chosen)} participant(s) have no finished "
            f"participant level in {out}: {listed}; run 'dfrn bids {bids} {out} participant' "
            "for them first"
        )


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
