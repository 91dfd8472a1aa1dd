"""Study configuration: a TOML file with ``cohort``, ``model``, ``training`` and ``cv`` sections.

Later stages add their own sections (``factors``, ``baseline``, ``attention``). An unknown
section or key is an error that names it. Relative paths are resolved against the folder of
the TOML file. The resolved config is written into every results folder as ``config.toml``.

Example::

    [cohort]
    table = "participants.tsv"      # or: bids = "/data/bids"
    image_column = "t1"
    targets = ["anhedonia", "appetite", "sleep", "suicidality", "anxiety"]
    downsample = 1

    [model]
    block_strides = [1, 2, 2, 2]

    [training]
    epochs = 50

    [cv]
    n_folds = 10
    n_repeats = 5
    seed = 0
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from dfrn.errors import DfrnInputError

#: Valid ``[training] device`` values (availability is checked when a run starts).
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
#: Valid ``[cohort] intensity`` values.
INTENSITY_MODES = ("zscore", "none", "minmax")
#: Valid ``[training] data`` values: how batches reach the network.
DATA_MODES = ("auto", "memory", "prefetch", "sync")
#: Valid ``[executor] kind`` values.
EXECUTOR_KINDS = ("local", "ray", "slurm")

__all__ = [
    "CohortConfig",
    "ModelConfig",
    "TrainingConfig",
    "CVConfig",
    "FactorsConfig",
    "BaselineConfig",
    "ConfoundsConfig",
    "CompareConfig",
    "AttentionConfig",
    "FinalConfig",
    "PrepConfig",
    "ExecutorConfig",
    "StudyConfig",
    "load_config",
    "load_executor_config",
    "DEVICE_PATTERN",
    "MAX_BOOTSTRAP",
    "INTENSITY_MODES",
    "DATA_MODES",
    "EXECUTOR_KINDS",
]


@dataclass
class CohortConfig:
    """Where the cohort comes from and how images are preprocessed."""

    table: str = ""
    """TSV/CSV with participant_id, an image column and score columns."""
    bids: str = ""
    """A BIDS root, instead of ``table``."""
    session: str = ""
    """BIDS session label to use when subjects have several."""
    image_column: str = "t1"
    targets: list[str] = field(default_factory=list)
    """Score columns to predict (one network each). Empty when ``[factors]`` derives them."""
    covariates: list[str] = field(default_factory=list)
    """Covariates (e.g. age, sex, head size): numeric columns, or categorical ones (one-hot
    coded). The one covariates list of a study: the covariates-only model, the "beyond the
    covariates" analysis (``cv/confounds.tsv``, ``cv/comparison.tsv``) and ``[confounds] target =
    "residualize"`` use it. No model's features are adjusted for them: every model of a
    comparison sees its inputs as they are (like for like)."""
    site: str = ""
    """The site (scanner) column: a categorical covariate, and ComBat's batch."""
    categorical_covariates: list[str] = field(default_factory=list)
    """Covariates to code as categories even when they hold numbers (e.g. a numeric scanner
    code). A covariate column that is numeric except for a few values is refused, naming
    them, unless it is listed here."""
    missing_covariates: str = "refuse"
    """A subject missing a covariate: ``"refuse"`` (naming it) or ``"drop"`` (leave it out of
    the study; the log lists who)."""
    gm_column: str = "gm"
    """Optional column of maps (usually gray-matter probability) that the ridge baseline sums
    per atlas region; its files are checked like the images."""
    mask: str = ""
    """Optional brain mask on the images' grid: normalisation uses all its voxels and
    everything outside it is set to 0."""
    intensity: str = "zscore"
    """Intensity normalisation of each image: ``"zscore"`` (inside the mask, or the non-zero
    voxels without one), ``"minmax"`` (to [0, 1] in the same region) or ``"none"`` (values as
    they are; use it for binary maps such as lesion masks)."""
    downsample: int = 1
    """Integer block-average factor (1 = full resolution)."""
    cache_dir: str = ""
    """Volume cache; defaults to ``<results>/cache``."""
    derivatives: str = ""
    """fMRIPrep/sMRIPrep derivatives folder: the images come from its
    ``space-MNI152NLin6Asym[_res-<r>]_desc-preproc_T1w``, ``desc-brain_mask`` and
    ``label-GM_probseg`` files (resampled by world coordinates onto the template grid, into
    ``<results>/prep/``); ``table`` or ``bids`` still names the participants and scores."""
    strict: bool = False
    """Refuse, instead of warning about, participants that share one image or GM file (a
    copy-paste error in the table, usually). Changes no result: left out of the fingerprint."""


@dataclass
class ModelConfig:
    block_strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    heads: str = "separate"
    """``"separate"``: one network per factor (the paper's choice). ``"joint"``: one network
    with one output per factor, trained on the sum of the factors' SSE (the paper's ablation);
    a subject's missing factor masks that factor's term only."""
    widen_factor: float = 1.0
    """Multiplies every layer's channels (MONAI's ``ResNet`` ``widen_factor``). 1.0 is the
    paper's network (64 … 512 channels); 0.125 gives 8 … 64, about 1/60 of the weights."""
    init: str = ""
    """Pretrained weights to start every network from: a dfrn model package folder, a
    MedicalNet checkpoint or a state dict of dfrn's network (:mod:`dfrn.models.pretrained`).
    Its content (SHA-256) is part of the run's identity."""
    init_member: int = 0
    """Which network of a package ``init`` starts from."""
    freeze: str = "none"
    """``"stem"`` (``conv1``, ``bn1``) or ``"backbone"`` (all but the output layer): those
    layers, BatchNorm statistics included, keep ``init``'s values."""
    backbone_lr_scale: float = 1.0
    """The backbone's learning rate as a fraction of ``[training] lr`` (e.g. 0.1)."""


@dataclass
class TrainingConfig:
    """Training of one network. The paper fixes loss, optimiser, lr and batch size only.

    Defaults chosen here (the paper is silent): 50 epochs at most; targets z-scored with the
    training fold's mean and sd (predictions are mapped back); no weight decay; no
    augmentation (left-right flips would destroy lateralised effects); early stopping on an
    inner validation split of 10% of the training subjects (stratified on the target) with a
    patience of 10 epochs, keeping the weights of the best validation epoch (the recipe
    benchmark, ``benchmarks/bench_recipe.py``, found no option reliably better). Since the
    learning benchmark (``benchmarks/bench_learning.py``, README "Why these defaults"):
    ``early_stopping = "auto"`` (fixed epochs under 20 validation subjects) and
    ``bn_stats = "recompute"``.
    """

    epochs: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    target_scaling: str = "zscore"
    val_fraction: float = 0.1
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    data: str = "auto"
    """How batches reach the network: ``"memory"`` (the cohort held once per process, on the
    GPU when it fits), ``"prefetch"`` (the next batch read by a background thread while the
    current one trains), ``"sync"`` (read when needed), or ``"auto"`` (memory when the cohort
    takes at most a quarter of the RAM, else prefetch). All give the same numbers."""
    channels_last_3d: bool = False
    """Train in the channels-last 3D memory format (can be faster on GPUs with tensor cores;
    may change results in the last digits)."""
    compile: bool = False
    """Train through ``torch.compile`` (may change results in the last digits)."""
    early_stopping: str = "auto"
    """``"auto"`` (default): train exactly ``epochs`` epochs on all training subjects when the
    inner validation split would hold fewer than ``min_val_subjects``; otherwise the
    ``"smoothed"`` rule, with no epoch kept or counted before the training loss has fallen
    below ``learning_start`` (training has begun). ``"val"``: keep the epoch with the lowest
    raw validation loss, stop after ``patience`` epochs without a new lowest (the paper's
    rule, dfrn's default before). ``"smoothed"``: the same on an exponential moving average
    of the validation loss, never before ``min_epochs``. ``"none"``: train exactly ``epochs``
    epochs on all training subjects (no validation split)."""
    min_epochs: int = 10
    """``early_stopping = "smoothed"``: the fewest epochs trained."""
    min_val_subjects: int = 20
    """``early_stopping = "auto"``: the smallest validation split that may stop training."""
    learning_start: float = 0.8
    """``early_stopping = "auto"``: training has begun once the training loss (mean squared
    error of the z-scored targets; 1.0 is predicting the mean) is below this."""
    bn_stats: str = "recompute"
    """BatchNorm statistics for prediction: ``"recompute"`` (default) averages them over the
    network's training subjects after training (and before each validation epoch), with
    no gradient, then sets the output bias so that the mean prediction on those subjects is
    their mean target (the least-squares intercept); ``"running"`` keeps PyTorch's running
    averages of the last batches (dfrn before; they offset the predictions of a network
    trained with batches of 4, differently in each fold)."""
    smoothing: float = 0.8
    """``early_stopping = "smoothed"``: weight of the past in the moving average, in [0, 1)."""
    val_split: str = "stratified"
    """The inner validation subjects: ``"stratified"`` (one drawn from each of
    ``n_val`` quantile bins of the target, so they span its range) or ``"random"``
    (a random draw, as dfrn did before; it reproduces older runs)."""
    augment: str = "none"
    """``"light"``: TorchIO random affine (±3°, ±2 voxels, ±3% scale) on training batches only,
    seeded per task; never a left-right flip unless ``augment_flip`` (needs ``dfrn[augment]``)."""
    augment_bias_field: bool = False
    """``augment = "light"``: add a random bias field (for T1 scans not z-scored)."""
    augment_flip: bool = False
    """``augment = "light"``: add random left-right flips (destroys lateralised effects)."""
    lr_schedule: str = "constant"
    """``"constant"`` or ``"cosine"`` (cosine annealing to 0 over ``epochs``)."""
    n_seeds: int = 1
    """Networks trained per task with different seeds; their predictions are averaged. Each
    seed is a task of its own (``…_seed-<s>``), so the executor can spread them."""


@dataclass
class CVConfig:
    n_folds: int = 10
    n_repeats: int = 5
    seed: int = 0
    groups: str = ""
    """A column whose groups (site, family, subject with several sessions) stay inside one
    fold. Leave-one-site-out: ``groups = "site"`` with ``n_folds`` = the number of sites."""
    stratify: bool = False
    """Balance the first target across folds (quantile bins)."""


@dataclass
class FactorsConfig:
    """Derive the targets from rating-scale items (PCA + varimax)."""

    items: list[str] = field(default_factory=list)
    n_factors: int | str = 5
    """A number, or ``"parallel"`` / ``"map"`` to let that criterion choose it."""
    align: str = "hungarian"
    """How fold fits are matched to the full fit: ``"hungarian"`` (permute and flip the
    fold's varimax factors) or ``"procrustes"`` (rotate the fold's components onto the full
    fit; for items whose varimax solution is unstable)."""
    n_resamples: int = 50
    """Split-half resamples for the stability estimate when ``fit_on = "all"`` (0 skips it)."""
    names: dict[str, list[str]] = field(default_factory=dict)
    fit_on: str = "all"
    impute: str = ""
    tol: float = 1e-5


@dataclass
class BaselineConfig:
    enabled: bool = True
    atlas: str = ""
    atlas_labels: str = ""
    n_permutations: int = 1000
    alphas: list[float] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["roi_ridge", "voxel_ridge"])
    """The classic models cross-validated on the network's folds: ``"roi_ridge"`` (ridge on
    atlas-region sums of the GM maps) and ``"voxel_ridge"`` (ridge on exactly the network's
    inputs, solved in the dual)."""
    harmonize: str = "none"
    """``"combat"``: ComBat on the ROI features inside each fold (fitted on the training
    subjects, keeping the covariates' effects; batch = ``[cohort] site``)."""


@dataclass
class ConfoundsConfig:
    """What the brain adds beyond ``[cohort] covariates`` and ``site``.

    Whenever covariates are set, a covariates-only model is cross-validated in the same folds
    and every model's out-of-fold predictions are judged by what they add beyond the
    covariates (partial r, ΔR², Freedman–Lane permutation p): ``cv/confounds.tsv``.
    """

    target: str = "none"
    """``"residualize"``: in every training fold, regress the covariates out of the target
    (fitted on the training subjects, applied to the test subjects); the network and the ridge
    then train and are evaluated on the residuals."""
    n_permutations: int = 1000
    """Freedman–Lane permutations for the ΔR² p-value (no network is retrained)."""


@dataclass
class CompareConfig:
    """How models run on the same folds are compared (``cv/comparison.tsv``, Table 1's CIs)."""

    bootstrap: int = 2000
    """Paired bootstrap resamples over subjects for the 95% CI of every r and every Δr,
    seeded from ``[cv] seed``; 0: no CIs (and no verdicts)."""


@dataclass
class AttentionConfig:
    enabled: bool = True
    method: str = "guided_backprop"
    mode: str = "oof"
    atlas: str = ""
    atlas_labels: str = ""
    template: str = ""
    truth: dict[str, str] = field(default_factory=dict)
    sanity: bool = True
    top_regions: int = 10
    ablation: bool = True
    """Region ablation importance, out of fold (needs an atlas): the headline "where is the
    signal" ranking (``attention/region_ablation.tsv``)."""
    ablation_baseline: str = "train_mean"
    """The neutral value of an ablated region: the training subjects' mean input, or
    ``"zero"``."""
    bootstrap: int = 1000
    """Bootstrap resamples of the subjects for the CI of ``delta_r`` (0: no CI; at most
    :data:`MAX_BOOTSTRAP`)."""


@dataclass
class FinalConfig:
    """The model packages ``dfrn run`` writes to ``models/<factor>/`` after cross-validation.

    ``mode = "ensemble"`` (default) packages the fold models of the first repeat, with no
    extra training; ``"refit"`` trains one network on all subjects for the median number of
    epochs the folds' early stopping chose.
    """

    enabled: bool = True
    mode: str = "ensemble"


@dataclass
class PrepConfig:
    """``dfrn prep`` inside ``dfrn run``: raw T1 scans → template space, into ``<results>/prep/``.

    With this section, ``[cohort]`` names raw scans (native space, with skull); the study
    then uses ``<results>/prep/cohort.tsv`` (preprocessed T1, modulated GM and mask).
    """

    transform: str = "syn"
    """``"syn"`` (affine then SyN) or ``"affine"`` (linear only)."""
    template: str = ""
    """Template T1 (MNI152NLin6Asym 1 mm); empty: TemplateFlow (see dfrn.data.templates)."""
    template_mask: str = ""
    template_space: str = ""
    """BIDS space label of ``template``; empty: read from a TemplateFlow name ``tpl-<label>_…``."""
    seed: int = 0
    deterministic: bool = True
    """One ITK thread per subject: the only setting in which ANTs repeats exactly."""
    jobs: int = 1
    """Subjects preprocessed in parallel processes."""
    dice_min: float = 0.90
    """A subject whose brain-mask Dice with the template's is lower is flagged."""
    corr_min: float = 0.40
    """A subject whose T1 correlation with the template in the brain is lower is flagged."""


@dataclass
class ExecutorConfig:
    """Where the study's tasks run; it never changes results (left out of the fingerprint).

    ``kind = "local"`` (default) runs them one after another in this process; ``"ray"``
    runs them as Ray tasks (``pip install 'dfrn[distributed]'``), on this machine or a
    cluster; ``"slurm"`` as the jobs of a SLURM job array (``pip install 'dfrn[slurm]'``).
    With Ray or SLURM, the results folder must be on storage that every node sees.
    """

    kind: str = "local"
    address: str = ""
    """Ray only: empty starts a local Ray; ``"auto"`` or ``"ray://host:port"`` joins a
    cluster."""
    num_cpus: int = 0
    """Ray only: CPUs a local Ray may use (0: all of this machine's)."""
    cpus_per_task: float = 1.0
    """Ray only: CPUs per task (also the task's torch threads)."""
    gpus_per_task: float = 0.0
    """Ray only: GPUs per task; fractions share a GPU (0.2 puts 5 networks on one)."""
    max_retries: int = 3
    """Re-runs of a task whose worker (Ray) or job (SLURM) died, was preempted or timed out,
    or hit a transient error."""
    cluster: str = "slurm"
    """SLURM only: ``"slurm"`` submits with sbatch; ``"local"`` runs the same jobs as local
    processes (submitit's LocalExecutor), to try a config or test without a cluster."""
    partition: str = ""
    """SLURM only: the partition (empty: the cluster's default)."""
    mem_gb: float = 0.0
    """SLURM only: memory per job in GB (0: the partition's default)."""
    timeout_min: int = 720
    """SLURM only: each job's time limit in minutes (a job that hits it is resubmitted)."""
    array_parallelism: int = 32
    """SLURM only: jobs of the array that run at once (``--array=…%N``)."""
    slurm_additional_parameters: dict[str, Any] = field(default_factory=dict)
    """SLURM only: further sbatch options, e.g. ``{account = "lab", qos = "normal"}``."""


@dataclass
class StudyConfig:
    cohort: CohortConfig = field(default_factory=CohortConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    factors: FactorsConfig | None = None
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    confounds: ConfoundsConfig = field(default_factory=ConfoundsConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    prep: PrepConfig | None = None
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for optional in ("factors", "prep"):
            if d[optional] is None:
                del d[optional]
        return d

    def fingerprint(self) -> str:
        """Hash of every setting that changes results.

        Device and worker settings are left out (``[training] device`` and ``data``, the
        whole ``[executor]`` section), and so are ``[cohort] strict`` (it only refuses) and
        ``[baseline] models`` (each model writes its own rows; a missing one is added on
        resume). So
        are file paths: the files' contents enter a run's identity through their digests
        (``run.json``), so a moved cohort or a moved results folder is still the same run.
        ``channels_last_3d`` and ``compile`` count only when on (they may change the last
        digits), so older runs keep their identity.
        """
        d = self.to_dict()
        d.pop("executor", None)
        d["cohort"].pop("strict", None)
        # which classic models run adds or leaves out baseline tables, no number of another
        d["baseline"].pop("models", None)
        d["training"].pop("device", None)
        if "prep" in d:
            d["prep"].pop("jobs", None)
        d["training"].pop("data", None)
        for (section, key), default in LATER_DEFAULTS.items():  # older runs keep their identity
            if section in d and d[section].get(key) == default:
                d[section].pop(key, None)
        if d["confounds"] == asdict(ConfoundsConfig()):
            del d["confounds"]
        if d["compare"] == asdict(CompareConfig()):  # older runs keep their identity
            del d["compare"]
        for key in ("channels_last_3d", "compile"):
            if not d["training"].get(key):
                d["training"].pop(key, None)
        # the split changes results only where there is one; "random" is the older draw
        if d["training"]["val_split"] == "random" or self._no_val_split():
            d["training"].pop("val_split")
        if self.training.weight_decay > 0:  # AdamW since the key became decoupled
            d["training"]["optimizer"] = "adamw"
        for section, keys in PATH_KEYS.items():
            if section in d:
                for k in keys:
                    d[section].pop(k, None)
        d["cohort"]["source"] = "bids" if self.cohort.bids else "table"
        d["cohort"]["derivatives"] = bool(self.cohort.derivatives)
        if self.model.init:  # which file: its SHA-256 in run.json; that there is one: here
            d["model"]["init"] = "pretrained"
        d["attention"]["truth"] = sorted(self.attention.truth)
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _no_val_split(self) -> bool:
        t = self.training
        return t.val_fraction == 0 or t.early_stopping == "none"

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.to_dict()))


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


SECTIONS: dict[str, type] = {
    "cohort": CohortConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "cv": CVConfig,
    "factors": FactorsConfig,
    "baseline": BaselineConfig,
    "confounds": ConfoundsConfig,
    "compare": CompareConfig,
    "attention": AttentionConfig,
    "final": FinalConfig,
    "prep": PrepConfig,
    "executor": ExecutorConfig,
}
#: Keys of earlier versions, with what to do instead.
REMOVED_KEYS = {
    ("baseline", "covariates"): "list covariates once, in [cohort] covariates",
    ("training", "num_workers"): "it had no effect; delete it",
}
#: Keys added after runs existed: left out of the fingerprint at these defaults, so that
#: those runs keep their identity.
LATER_DEFAULTS: dict[tuple[str, str], Any] = {
    ("prep", "template_space"): "",
    ("cohort", "site"): "",
    ("cohort", "missing_covariates"): "refuse",
    ("cv", "groups"): "",
    ("cv", "stratify"): False,
    ("baseline", "harmonize"): "none",
    ("attention", "ablation"): True,
    ("attention", "ablation_baseline"): "train_mean",
    ("attention", "bootstrap"): 1000,
    ("model", "heads"): "separate",
    ("model", "widen_factor"): 1.0,
    ("model", "init_member"): 0,
    ("model", "freeze"): "none",
    ("model", "backbone_lr_scale"): 1.0,
    ("training", "early_stopping"): "val",  # dfrn's rule before "auto": old runs keep theirs
    ("training", "min_epochs"): 10,
    ("training", "min_val_subjects"): 20,
    ("training", "learning_start"): 0.8,
    ("training", "bn_stats"): "running",  # before "recompute"
    ("cohort", "categorical_covariates"): [],
    ("training", "smoothing"): 0.8,
    ("training", "augment"): "none",
    ("training", "augment_bias_field"): False,
    ("training", "augment_flip"): False,
    ("training", "lr_schedule"): "constant",
    ("training", "n_seeds"): 1,
}
PATH_KEYS = {
    "cohort": ("table", "bids", "mask", "cache_dir", "derivatives"),
    "model": ("init",),
    "prep": ("template", "template_mask"),
    "baseline": ("atlas", "atlas_labels"),
    "attention": ("atlas", "atlas_labels", "template"),
}


def _check_type(section: str, key: str, value: Any, hint: Any) -> Any:
    origin = getattr(hint, "__origin__", None)
    where = f"[{section}] {key}"
    if isinstance(hint, types.UnionType):
        for member in hint.__args__:
            try:
                return _check_type(section, key, value, member)
            except DfrnInputError:
                continue
        names = " or ".join(getattr(m, "__name__", str(m)) for m in hint.__args__)
        raise DfrnInputError(f"config {where} must be {names}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise DfrnInputError(f"config {where} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DfrnInputError(f"config {where} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DfrnInputError(f"config {where} must be a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise DfrnInputError(f"config {where} must be a string, got {value!r}")
    elif origin is list:
        if not isinstance(value, list):
            raise DfrnInputError(f"config {where} must be a list, got {value!r}")
        (item_hint,) = hint.__args__
        value = [_check_type(section, f"{key}[{i}]", v, item_hint) for i, v in enumerate(value)]
    elif origin is dict:
        if not isinstance(value, dict):
            raise DfrnInputError(f"config {where} must be a table, got {value!r}")
    return value


def _build(section: str, cls: type, raw: Any, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise DfrnInputError(f"config [{section}] must be a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if (section, key) in REMOVED_KEYS:
            raise DfrnInputError(f"config [{section}] {key} was removed: {REMOVED_KEYS[section, key]}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DfrnInputError(
            f"unknown config key [{section}] {unknown[0]!r} (known keys: {', '.join(sorted(known))})"
        )
    values = {k: _check_type(section, k, v, hints[k]) for k, v in raw.items()}
    for k in PATH_KEYS.get(section, ()):
        if values.get(k):
            p = Path(values[k]).expanduser()
            values[k] = str(p if p.is_absolute() else (base / p).resolve())
    return cls(**values)


def load_executor_config(path: str | Path) -> ExecutorConfig:
    """The ``[executor]`` section of a TOML file (other sections are ignored), checked."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DfrnInputError(f"cannot read {path}: {exc}") from None
    e = _build("executor", ExecutorConfig, raw.get("executor", {}), path.parent)
    _check_executor(e)
    return e


def config_from_dict(raw: dict[str, Any], base: Path) -> StudyConfig:
    """Build a :class:`StudyConfig` from parsed TOML, resolving paths against ``base``."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise DfrnInputError(
            f"unknown config section [{unknown[0]}] (known: {', '.join(SECTIONS)})"
        )
    parts = {
        name: _build(name, cls, raw[name], base) for name, cls in SECTIONS.items() if name in raw
    }
    cfg = StudyConfig(**parts)
    validate(cfg)
    return cfg


#: The whole-number settings and their smallest meaningful value (a negative count is
#: always an error; a zero one where nothing would run).
COUNT_MINIMUMS: dict[str, dict[str, int]] = {
    "cohort": {"downsample": 1},
    "training": {"epochs": 1, "batch_size": 1, "patience": 1, "seed": 0, "min_epochs": 1,
                 "n_seeds": 1, "min_val_subjects": 2},
    "cv": {"n_folds": 2, "n_repeats": 1, "seed": 0},
    "model": {"init_member": 0},
    "baseline": {"n_permutations": 0},
    "confounds": {"n_permutations": 0},
    "attention": {"top_regions": 1, "bootstrap": 0},
    "compare": {"bootstrap": 0},
    "factors": {"n_resamples": 0, "n_factors": 1},
    "prep": {"jobs": 1, "seed": 0},
    "executor": {"num_cpus": 0, "max_retries": 0, "timeout_min": 1, "array_parallelism": 1},
}


#: The most bootstrap resamples ``[attention] bootstrap`` may ask for (a CI's percentiles
#: are stable long before; a typo such as 10**9 would otherwise run for days).
MAX_BOOTSTRAP = 100_000


def _check_counts(cfg: StudyConfig) -> None:
    """Every count of :data:`COUNT_MINIMUMS` is at least its minimum (one-line error)."""
    for section in COUNT_MINIMUMS:
        _check_section_counts(section, getattr(cfg, section))
    for section, n in (("attention", cfg.attention.bootstrap),
                       ("compare", cfg.compare.bootstrap)):
        if n > MAX_BOOTSTRAP:
            raise DfrnInputError(
                f"config [{section}] bootstrap must be <= {MAX_BOOTSTRAP:,}, got {n:,} "
                "(1000 to 10,000 resamples give a stable 95% CI)"
            )


def _check_section_counts(section: str, sub: Any) -> None:
    if sub is None:
        return
    for key, minimum in COUNT_MINIMUMS[section].items():
        value = getattr(sub, key)
        if isinstance(value, int) and value < minimum:
            raise DfrnInputError(f"config [{section}] {key} must be >= {minimum}, got {value}")


def _check_init(m: ModelConfig) -> None:
    """``[model] freeze`` and ``backbone_lr_scale`` make sense, and need ``init``."""
    _check_choice("model", "freeze", m.freeze, ("none", "stem", "backbone"))
    if not m.backbone_lr_scale > 0:
        raise DfrnInputError(
            f"config [model] backbone_lr_scale must be > 0, got {m.backbone_lr_scale!r} "
            "(use freeze = 'backbone' to keep the backbone fixed)"
        )
    if not m.init and (m.freeze != "none" or m.backbone_lr_scale != 1.0):
        raise DfrnInputError(
            "config [model] freeze and backbone_lr_scale need [model] init (pretrained "
            "weights): a frozen or slowed random backbone learns less, not better"
        )


def _check_unique(section: str, key: str, values: list[str]) -> None:
    """A list of column names must not name a column twice."""
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise DfrnInputError(f"config [{section}] {key} lists {v!r} twice")
        seen.add(v)


def validate(cfg: StudyConfig) -> None:
    """Cross-field checks with one-line errors."""
    c = cfg.cohort
    if bool(c.table) == bool(c.bids):
        raise DfrnInputError("config [cohort] needs exactly one of 'table' or 'bids'")
    if not c.targets and cfg.factors is None:
        raise DfrnInputError("config [cohort] targets is empty and there is no [factors] section")
    _check_unique("cohort", "targets", c.targets)
    _check_unique("cohort", "covariates", c.covariates)
    _check_confounds(cfg)
    _check_counts(cfg)
    _check_recipe(cfg)
    if len(cfg.model.block_strides) != 4 or any(s < 1 for s in cfg.model.block_strides):
        raise DfrnInputError("config [model] block_strides must be four positive integers")
    _check_init(cfg.model)
    if not 64 * cfg.model.widen_factor >= 1:
        raise DfrnInputError(
            f"config [model] widen_factor must be at least 1/64, got {cfg.model.widen_factor!r}"
        )
    t = cfg.training
    if t.lr <= 0:
        raise DfrnInputError(f"config [training] lr must be positive, got {t.lr:g}")
    if t.target_scaling not in ("zscore", "none"):
        raise DfrnInputError("config [training] target_scaling must be 'zscore' or 'none'")
    if not 0 <= t.val_fraction < 0.5:
        raise DfrnInputError("config [training] val_fraction must be in [0, 0.5)")
    if not DEVICE_PATTERN.match(t.device):
        raise DfrnInputError(
            f"config [training] device {t.device!r} is not valid: use 'auto', 'cpu', 'cuda' or "
            "'cuda:<index>'"
        )
    if c.intensity not in INTENSITY_MODES:
        raise DfrnInputError(
            f"config [cohort] intensity {c.intensity!r} is not one of {', '.join(INTENSITY_MODES)}"
        )
    if t.data not in DATA_MODES:
        raise DfrnInputError(
            f"config [training] data {t.data!r} is not one of {', '.join(DATA_MODES)}"
        )
    _check_executor(cfg.executor)
    if cfg.final.mode not in ("ensemble", "refit"):
        raise DfrnInputError("config [final] mode must be 'ensemble' or 'refit'")
    _check_prep_and_factors(cfg)


def _check_prep_and_factors(cfg: StudyConfig) -> None:
    """The optional ``[prep]`` and ``[factors]`` sections' choices and ranges."""
    if cfg.prep is not None:
        p = cfg.prep
        if p.transform not in ("syn", "affine"):
            raise DfrnInputError(
                f"config [prep] transform {p.transform!r} must be 'syn' or 'affine'"
            )
        if not (0 <= p.dice_min <= 1 and -1 <= p.corr_min <= 1):
            raise DfrnInputError("config [prep] dice_min must be in [0, 1], corr_min in [-1, 1]")
        if bool(p.template) != bool(p.template_mask):
            raise DfrnInputError("config [prep] needs both template and template_mask, or neither")
    if cfg.factors is not None:
        f = cfg.factors
        if f.fit_on not in ("all", "train"):
            raise DfrnInputError("config [factors] fit_on must be 'all' or 'train'")
        if f.align not in ("hungarian", "procrustes"):
            raise DfrnInputError("config [factors] align must be 'hungarian' or 'procrustes'")
        if isinstance(f.n_factors, str) and f.n_factors not in ("parallel", "map"):
            raise DfrnInputError(
                f"config [factors] n_factors must be a number, 'parallel' or 'map', got "
                f"{f.n_factors!r}"
            )


def _check_executor(e: ExecutorConfig) -> None:
    """``[executor]``: a known kind and cluster, and resources a scheduler can grant."""
    if e.kind not in EXECUTOR_KINDS:
        raise DfrnInputError(
            f"config [executor] kind {e.kind!r} is not one of {', '.join(EXECUTOR_KINDS)}"
        )
    _check_choice("executor", "cluster", e.cluster, ("slurm", "local"))
    _check_section_counts("executor", e)
    if e.cpus_per_task <= 0 or e.gpus_per_task < 0 or e.mem_gb < 0:
        raise DfrnInputError(
            "config [executor] cpus_per_task must be > 0, and gpus_per_task and mem_gb >= 0"
        )
    if e.gpus_per_task > 1 and e.gpus_per_task != int(e.gpus_per_task):
        raise DfrnInputError(
            f"config [executor] gpus_per_task {e.gpus_per_task:g}: above 1 it must be whole"
        )
    if e.kind == "slurm":
        for key in ("cpus_per_task", "gpus_per_task"):
            value = getattr(e, key)
            if value != int(value):
                raise DfrnInputError(
                    f"config [executor] {key} = {value:g}: SLURM grants whole CPUs and GPUs"
                )


def _check_choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices`` (one-line error naming the key)."""
    if value not in choices:
        allowed = " or ".join(repr(c) for c in choices)
        raise DfrnInputError(f"config [{section}] {key} must be {allowed}, got {value!r}")


def _check_recipe(cfg: StudyConfig) -> None:
    """The training recipe's choices (heads, early stopping, augmentation, schedule)."""
    import importlib.util

    t = cfg.training
    _check_choice("model", "heads", cfg.model.heads, ("separate", "joint"))
    _check_choice("training", "early_stopping", t.early_stopping,
                  ("auto", "val", "smoothed", "none"))
    _check_choice("training", "val_split", t.val_split, ("stratified", "random"))
    _check_choice("training", "augment", t.augment, ("none", "light"))
    _check_choice("training", "lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _check_choice("training", "bn_stats", t.bn_stats, ("recompute", "running"))
    if not 0 <= t.smoothing < 1:
        raise DfrnInputError(f"config [training] smoothing must be in [0, 1), got {t.smoothing:g}")
    if t.early_stopping == "smoothed" and t.min_epochs > t.epochs:
        raise DfrnInputError(
            f"config [training] min_epochs ({t.min_epochs}) > epochs ({t.epochs}): "
            "early_stopping = 'smoothed' would keep no epoch; lower min_epochs or raise epochs"
        )
    if t.early_stopping == "auto" and t.target_scaling != "zscore":
        raise DfrnInputError(
            "config [training] early_stopping = 'auto' judges the training loss of z-scored "
            "targets (learning_start); with target_scaling = 'none' use 'val', 'smoothed' or "
            "'none'"
        )
    if not 0 < t.learning_start <= 1:
        raise DfrnInputError(
            f"config [training] learning_start must be in (0, 1], got {t.learning_start:g}"
        )
    if t.weight_decay < 0:
        raise DfrnInputError(f"config [training] weight_decay must be >= 0, got {t.weight_decay:g}")
    if t.augment == "none" and (t.augment_bias_field or t.augment_flip):
        raise DfrnInputError(
            "config [training] augment_bias_field / augment_flip need augment = 'light'"
        )
    if t.augment == "light" and importlib.util.find_spec("torchio") is None:
        raise DfrnInputError(
            "config [training] augment = 'light' needs TorchIO: pip install 'dfrn[augment]'"
        )
    if cfg.model.heads == "joint":
        n = len(cfg.cohort.targets) if cfg.factors is None else cfg.factors.n_factors
        if cfg.final.mode == "refit":
            raise DfrnInputError(
                "config [final] mode = 'refit' trains one network per factor; with [model] "
                "heads = 'joint' use mode = 'ensemble' (the fold networks)"
            )
        if isinstance(n, int) and n < 2:
            raise DfrnInputError(
                f"config [model] heads = 'joint' trains one network for several factors, but "
                f"the study has {n} target; use heads = 'separate'"
            )


def _check_confounds(cfg: StudyConfig) -> None:
    """The covariate, site, fold-group and harmonisation settings agree."""
    c = cfg.cohort
    _check_choice("cohort", "missing_covariates", c.missing_covariates, ("refuse", "drop"))
    _check_choice("confounds", "target", cfg.confounds.target, ("none", "residualize"))
    _check_choice("attention", "ablation_baseline", cfg.attention.ablation_baseline,
                  ("train_mean", "zero"))
    _check_choice("baseline", "harmonize", cfg.baseline.harmonize, ("none", "combat"))
    if cfg.confounds.target == "residualize" and not (c.covariates or c.site):
        raise DfrnInputError(
            "config [confounds] target = 'residualize' needs [cohort] covariates or site"
        )
    if cfg.baseline.harmonize == "combat" and not c.site:
        raise DfrnInputError(
            "config [baseline] harmonize = 'combat' needs [cohort] site (ComBat's batch column)"
        )
    _check_unique("cohort", "categorical_covariates", c.categorical_covariates)
    loose = [v for v in c.categorical_covariates if v not in c.covariates and v != c.site]
    if loose:
        raise DfrnInputError(
            f"config [cohort] categorical_covariates names {loose[0]!r}, which is not in "
            "[cohort] covariates"
        )
    for model in cfg.baseline.models:
        _check_choice("baseline", "models", model, ("roi_ridge", "voxel_ridge"))
    _check_unique("baseline", "models", cfg.baseline.models)
    if c.site and c.site in c.targets:
        raise DfrnInputError(f"config [cohort] site {c.site!r} is also a target")
    overlap = [t for t in c.targets if t in c.covariates]
    if overlap:
        raise DfrnInputError(f"config [cohort] covariates lists the target {overlap[0]!r}")


def _fill_saved(raw: dict[str, Any]) -> dict[str, Any]:
    """A results folder's saved config with the keys it predates set as they ran then.

    ``config.toml`` spells out every key of its time, so a key of :data:`LATER_DEFAULTS`
    that it lacks did not exist when the run was made: the run used that key's old value
    (e.g. ``bn_stats = "running"``), not today's default.
    """
    for (section, key), old in LATER_DEFAULTS.items():
        if isinstance(raw.get(section), dict) and key not in raw[section]:
            raw[section][key] = old
    return raw


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file.

    A results folder's own ``config.toml`` (beside its ``run.json``) is read as the run was
    made: keys added to dfrn since then take their old values (:func:`_fill_saved`), so a
    folder made before a default changed still resumes with its saved config.
    """
    path = Path(path)
    if not path.is_file():
        raise DfrnInputError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DfrnInputError(f"config {path} is not valid TOML: {exc}") from None
    if path.name == "config.toml" and (path.parent / "run.json").is_file():
        raw = _fill_saved(raw)
    return config_from_dict(raw, path.resolve().parent)
