"""The results folder: its identity, its resolved config and its environment.

A results folder holds ``run.json`` (the config fingerprint and the SHA-256 of every input
file: cohort table, images, mask, GM maps, atlases), ``config.toml`` (the resolved config)
and ``environment.json`` (Python, platform and package versions). The identity depends on
content, not on location: a moved or copied folder still resumes.

:func:`check_results_dir` accepts an empty or absent folder, or a run of the *same* config
and input files, and refuses anything else (naming the changed files), so no result is
ever silently overwritten or left stale. :func:`write_run_identity` is called only after
every input check has passed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from dfrn.config import StudyConfig
from dfrn.data.cohort import read_delimited
from dfrn.errors import DfrnInputError, ResultsFolderError, listed
from dfrn.io import atomic_write_json, atomic_write_text, file_digest

__all__ = [
    "ResultsFolder",
    "InputFile",
    "SCRATCH",
    "check_results_dir",
    "write_run_identity",
    "verify_inputs",
    "record_resume",
    "environment",
    "file_digest",
    "read_run_info",
]

PACKAGES = (
    "dfrn",
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "nibabel",
    "nilearn",
    "scikit-learn",
    "statsmodels",
    "captum",
    "matplotlib",
)



def environment() -> dict[str, Any]:
    """Versions of Python, the platform, key packages and the accelerator."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        import torch

        env["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name(0)
            env["cuda_version"] = torch.version.cuda
    except Exception:  # pragma: no cover - torch is a hard dependency
        pass
    return env


def read_run_info(out: Path) -> dict[str, Any] | None:
    p = ResultsFolder(Path(out)).run_json
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsFolderError(f"{p} is unreadable ({exc}); this folder cannot be resumed") from None


@dataclass(frozen=True)
class InputFile:
    """One input file of a study, as it enters the run's identity.

    Attributes
    ----------
    label : str
        What the file is, for messages (``"participant s01 T1"``).
    path : Path
        Where it is now.
    digest : str
        SHA-256 of its bytes.
    """

    label: str
    path: Path
    digest: str


#: Entries of a results folder that may exist before its run.json: the volume cache (content
#: keyed, so safe to reuse), the lock and error logs.
SCRATCH = ("cache", ".dfrn.lock", "logs")


def _changed_inputs(recorded: dict[str, str], inputs: dict[str, InputFile]) -> list[str]:
    changed = []
    for key, item in inputs.items():
        old = recorded.get(key)
        if old is None:
            changed.append(f"{item.label} is new ({item.path})")
        elif old != item.digest:
            changed.append(f"{item.label} changed ({item.path})")
    for key in recorded:
        if key not in inputs:
            changed.append(f"{key} is gone")
    return changed


def verify_inputs(out: str | Path, inputs: dict[str, InputFile]) -> None:
    """Refuse when an input file differs from the one the run in ``out`` was made with.

    Raises
    ------
    ResultsFolderError
        Naming the changed, added or removed files (at most five, then a count).
    """
    out = Path(out)
    info = read_run_info(out)
    if info is None:
        raise ResultsFolderError(f"{out} is not a results folder of 'dfrn run' (no run.json)")
    recorded = info.get("inputs")
    if not isinstance(recorded, dict):
        raise ResultsFolderError(
            f"results folder {out} was made by an older dfrn that did not record its input "
            "files; rerun with a new --out"
        )
    changed = _changed_inputs(recorded, inputs)
    if changed:
        raise ResultsFolderError(
            f"results folder {out} was made from other input data: {len(changed)} file(s) "
            f"differ: {listed(changed, sep='; ')}; restore them, or start a new run with "
            "another --out"
        )


def check_results_dir(
    out: str | Path,
    cfg: StudyConfig,
    inputs: dict[str, InputFile] | None,
    allow_existing: tuple[str, ...] = (),
) -> bool:
    """Whether ``out`` can hold this run; True when it resumes an earlier one. Writes nothing.

    A folder is usable when it is absent, empty (apart from :data:`SCRATCH` entries and
    ``allow_existing``), or holds a run of the same config fingerprint and the same input
    files (by content, so a moved or copied folder still resumes). ``inputs = None`` checks
    only the config and the folder (before a prep stage writes into it).

    Raises
    ------
    ResultsFolderError
        For a foreign non-empty folder, a run of another config, or changed input files.
    """
    out = Path(out)
    info = read_run_info(out)
    if info is not None:
        fingerprint = cfg.fingerprint()
        if info.get("fingerprint") != fingerprint:
            raise ResultsFolderError(
                f"results folder {out} holds a run of a different config "
                f"(fingerprint {info.get('fingerprint')} vs {fingerprint}); "
                "choose another --out, or rerun with the config saved in its config.toml"
            )
        if inputs is not None:
            verify_inputs(out, inputs)
        return True
    if out.exists() and not out.is_dir():
        raise ResultsFolderError(f"results path {out} exists and is not a folder")
    if out.is_dir():
        allowed = set(SCRATCH) | set(allow_existing)
        extra = sorted(p.name for p in out.iterdir() if p.name not in allowed)
        if extra:
            raise ResultsFolderError(
                f"results folder {out} is not empty and holds no dfrn run "
                f"(found {', '.join(extra[:3])}); choose another --out"
            )
    return False


def write_run_identity(out: str | Path, cfg: StudyConfig, inputs: dict[str, InputFile]) -> None:
    """Write ``run.json`` (fingerprint and input digests), ``config.toml`` and the environment.

    Call this only after every input check has passed, so a refused run leaves no identity
    behind. ``run.json`` is written last: its presence marks the folder as a run.
    """
    folder = ResultsFolder(Path(out))
    folder.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.config_toml, cfg.to_toml())
    atomic_write_json(folder.environment_json, environment())
    digests = {k: v.digest for k, v in sorted(inputs.items())}
    blob = json.dumps(digests, sort_keys=True).encode()
    atomic_write_json(
        folder.run_json,
        {
            "fingerprint": cfg.fingerprint(),
            "inputs": digests,
            "data_digest": hashlib.sha256(blob).hexdigest(),
            "dfrn_version": _version("dfrn"),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def record_resume(out: str | Path) -> None:
    """Keep the first environment; record the resuming one beside it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    root = ResultsFolder(Path(out)).root
    atomic_write_json(root / f"environment-resume-{stamp}.json", environment())


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class ResultsFolder:
    """Every path of a results folder, and validated readers of its tables.

    No other module spells a results path: stages ask this object. Readers check what they
    read (columns, the fold plan's coverage) and raise one-line errors naming the file.

    Parameters
    ----------
    root : Path
        The results folder.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # identity and scratch
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def config_toml(self) -> Path:
        return self.root / "config.toml"

    @property
    def environment_json(self) -> Path:
        return self.root / "environment.json"

    @property
    def synth(self) -> Path:
        """The demo's synthetic cohort."""
        return self.root / "synth"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def prep(self) -> Path:
        """``dfrn prep``'s derivatives folder when the study has ``[prep]`` or derivatives."""
        return self.root / "prep"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    # cross-validation
    @property
    def cv(self) -> Path:
        return self.root / "cv"

    @property
    def tasks(self) -> Path:
        return self.cv / "tasks"

    @property
    def folds(self) -> Path:
        return self.cv / "folds.tsv"

    @property
    def predictions(self) -> Path:
        return self.cv / "predictions.tsv"

    @property
    def metrics(self) -> Path:
        return self.cv / "metrics.tsv"

    @property
    def table1(self) -> Path:
        return self.cv / "table1.tsv"

    @property
    def confounds(self) -> Path:
        """Every model's value beyond the covariates, per repeat and factor."""
        return self.cv / "confounds.tsv"

    @property
    def confounds_summary(self) -> Path:
        """``confounds.tsv`` summarised over repeats, with the verdicts."""
        return self.cv / "confounds_summary.tsv"

    @property
    def comparison(self) -> Path:
        """Each pair of models run on the same folds: Δr with its CI, the corrected t-test
        and a verdict (:mod:`dfrn.workflows.comparison`)."""
        return self.cv / "comparison.tsv"

    @property
    def covariates_predictions(self) -> Path:
        """Out-of-fold predictions of the covariates-only model."""
        return self.cv / "covariates_predictions.tsv"

    @property
    def covariates_metrics(self) -> Path:
        return self.cv / "covariates_metrics.tsv"

    @property
    def network_permutation(self) -> Path:
        return self.cv / "permutation.tsv"

    def permutation_cv(self, index: int) -> Path:
        """The CV folder of network permutation ``index``."""
        return self.root / "permutations" / f"perm-{index:04d}"

    # later stages
    @property
    def factors(self) -> Path:
        return self.root / "factors"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    @property
    def roi_features(self) -> Path:
        return self.baseline / "roi_features.tsv"

    @property
    def baseline_predictions(self) -> Path:
        return self.baseline / "predictions.tsv"

    @property
    def baseline_metrics(self) -> Path:
        return self.baseline / "metrics.tsv"

    @property
    def baseline_permutation(self) -> Path:
        return self.baseline / "permutation.tsv"

    def attention(self, method: str | None = None) -> Path:
        """``attention/``, or ``attention/method-<m>/`` for a method other than the config's."""
        base = self.root / "attention"
        return base if method is None else base / f"method-{method}"

    def fam(self, factor: str, method: str | None = None, absolute: bool = False) -> Path:
        """A factor attention map: ``attention[/method-<m>]/<factor>_fam[_abs].nii.gz``."""
        return self.attention(method) / f"{factor}_fam{'_abs' if absolute else ''}.nii.gz"

    def attention_table(self, name: str, method: str | None = None) -> Path:
        """``regions``, ``localisation`` or ``sanity`` table of the attention stage."""
        return self.attention(method) / f"{name}.tsv"

    @property
    def region_ablation(self) -> Path:
        """Region ablation importance: ``attention/region_ablation.tsv``."""
        return self.attention() / "region_ablation.tsv"

    @property
    def ablation_tasks(self) -> Path:
        """One folder per (repeat, fold, factor) of region ablation: ``attention/ablation/``."""
        return self.attention() / "ablation"

    def ablation_map(self, factor: str) -> Path:
        """Each region filled with its ``delta_r``: ``attention/<factor>_ablation_dseg.nii.gz``."""
        return self.attention() / f"{factor}_ablation_dseg.nii.gz"

    def task_dir(self, task_name: str) -> Path:
        """The folder of one finished CV task."""
        return self.tasks / task_name

    def model_package(self, factor: str) -> Path:
        """``models/<factor>/``: the factor's model package."""
        return self.root / "models" / factor

    def figure(self, name: str) -> Path:
        """``figures/<name>.png``."""
        return self.root / "figures" / f"{name}.png"

    # readers
    def is_run(self) -> bool:
        return self.run_json.is_file() and self.config_toml.is_file()

    def read_folds(self, participant_ids: list[str] | None = None) -> pd.DataFrame:
        """The fold plan, checked to cover ``participant_ids`` once per repeat."""
        from dfrn.evaluation.folds import validate_fold_plan

        plan = self._read(self.folds, ("participant_id", "repeat", "fold"))
        if participant_ids is not None:
            validate_fold_plan(plan, participant_ids)
        return plan

    def read_predictions(self, path: Path | None = None) -> pd.DataFrame:
        """A long predictions table (``cv/predictions.tsv`` by default), columns checked."""
        from dfrn.evaluation.metrics import PREDICTION_COLUMNS

        return self._read(path or self.predictions, tuple(PREDICTION_COLUMNS))

    def read_metrics(self, path: Path | None = None) -> pd.DataFrame:
        """A metrics table (``cv/metrics.tsv`` by default), columns checked."""
        from dfrn.evaluation.metrics import METRIC_COLUMNS

        return self._read(path or self.metrics, tuple(METRIC_COLUMNS))

    def _read(self, path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
        if not path.is_file():
            raise ResultsFolderError(
                f"{path} is missing; rerun 'dfrn run' with the same config and --out"
            )
        try:
            # a factor may be called "NA" (negative affect) or "null": names are text
            df = read_delimited(path, path.name, ("participant_id", "factor"), allow_empty=True)
        except DfrnInputError as exc:
            raise ResultsFolderError(f"{path} is unreadable ({exc})") from None
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ResultsFolderError(f"{path} lacks the column(s) {', '.join(missing)}")
        return df
