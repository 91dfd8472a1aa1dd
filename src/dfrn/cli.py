"""The ``dfrn`` command. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dfrn import __version__
from dfrn.errors import DfrnError, DfrnInputError

__all__ = ["main", "build_parser"]


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"dfrn: warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfrn",
        description="Deep Factor Regression Network: symptom factors from structural MRI.",
    )
    parser.add_argument("--version", action="version", version=f"dfrn {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_demo, _add_synth, _add_factors, _add_predict, _add_prep,
                _add_bids, _add_finished_run_commands):
        add(sub, common)
    return parser


def _add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    """``dfrn run``."""
    p = sub.add_parser(
        "run", parents=[common], help="run the pipeline configured in a study TOML file"
    )
    p.add_argument("config", type=Path, help="study TOML (see README)")
    p.add_argument("--out", type=Path, required=True, help="results folder (new, or a resume)")
    p.add_argument(
        "--permutations", type=non_negative_int, default=0, metavar="N",
        help="also permutation-test the network: N re-runs of the CV (first repeat) on "
        "shuffled targets; costs N × folds × factors trainings (default 0: no test)",
    )
    p.add_argument(
        "--executor", choices=["local", "ray", "slurm"], default=None,
        help="where tasks run (default: the config's [executor] kind, local); ray needs "
        "pip install 'dfrn[distributed]', slurm pip install 'dfrn[slurm]', and both a "
        "results folder all nodes see",
    )
    p.add_argument(
        "--strict", action="store_true",
        help="refuse the cohort instead of warning when two participants share an image file "
        "(same as [cohort] strict = true)",
    )


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    """``dfrn demo``."""
    p = sub.add_parser(
        "demo", parents=[common], help="run the pipeline on a synthetic cohort with planted effects"
    )
    p.add_argument("--out", type=Path, default=Path("dfrn-demo"), help="results folder")
    p.add_argument("--full", action="store_true", help="the paper's protocol at 1 mm (GPU)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed (default 0)")


def _add_synth(sub: Any, common: argparse.ArgumentParser) -> None:
    """``dfrn synth``."""
    p = sub.add_parser(
        "synth", parents=[common],
        help="write new synthetic subjects from the demo's generative model (for its packages)",
    )
    p.add_argument("out", type=Path, help="output folder (images, cohort.tsv, truth masks)")
    p.add_argument("--subjects", type=positive_int, default=20, metavar="N",
                   help="number of subjects (default 20)")
    p.add_argument("--seed", type=non_negative_int, default=1,
                   help="draws the subjects (default 1; the demo's cohort is seed 0)")
    p.add_argument("--full", action="store_true", help="the grid of 'dfrn demo --full' (1 mm)")


def _add_factors(sub: Any, common: argparse.ArgumentParser) -> None:
    """``dfrn factors``."""
    p = sub.add_parser(
        "factors", parents=[common], help="symptom factors (PCA + varimax) from rating-scale items"
    )
    p.add_argument("items", type=Path,
                   help="TSV/CSV: participant_id plus one column per item (without "
                   "participant_id, when every column is an item, rows are numbered p0001, ...)")
    p.add_argument(
        "--n-factors", type=_n_factors, default=5, metavar="N|parallel|map",
        help="number of factors, or the criterion that chooses it (default 5); a criterion "
        "that retains 0 factors (noise) is an error",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (required unless --suggest)")
    p.add_argument(
        "--suggest", action="store_true",
        help="only report how many factors the items support (Kaiser, parallel analysis, MAP)",
    )
    p.add_argument("--resamples", type=non_negative_int, default=50, metavar="N",
                   help="split-half resamples for the stability estimate (default 50; "
                   "0 skips the stability estimate)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of parallel analysis and resampling (default 0)")
    p.add_argument(
        "--name", action="append", default=[], metavar="FACTOR=ITEM,ITEM",
        help="name a factor by its marker items (repeatable), e.g. anhedonia=hamd_1,hamd_7",
    )
    p.add_argument("--impute", choices=["median"], default=None, help="impute missing items")
    p.add_argument("--tol", type=non_negative_float, default=1e-5,
                   help="varimax tolerance (default 1e-5, R's)")


def _add_predict(sub: Any, common: argparse.ArgumentParser) -> None:
    """``dfrn predict``."""
    p = sub.add_parser(
        "predict", parents=[common],
        help="apply a study's model packages to new scans (grid and leakage checks)",
    )
    p.add_argument("model", type=Path, help="a results folder of 'dfrn run', or models/<factor>/")
    p.add_argument("--cohort", type=Path, required=True,
                   help="TSV/CSV with participant_id and an image column, or a BIDS root")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--image-column", default="t1", help="image column of a cohort table")
    p.add_argument("--session", default=None, help="BIDS session label")
    p.add_argument("--allow-training-subjects", action="store_true",
                   help="also predict scans the models were trained on (in-sample)")
    p.add_argument("--attention", action="store_true",
                   help="also write each subject's attention map per factor")
    p.add_argument("--regions", action="store_true",
                   help="also write each subject's per-region sensitivity (|change| of the "
                   "prediction when a region is ablated; individual, not group importance)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index>")
    p.add_argument("--coverage", type=float, default=0.9,
                   help="coverage of the CV+ intervals lower/upper, in (0, 1) (default 0.9)")
    p.add_argument("--strict", action="store_true",
                   help="leave out scans the out-of-distribution check flags (one line each)")


def _add_finished_run_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``dfrn report``, ``baseline`` and ``attention``: commands on a finished run."""
    p = sub.add_parser("report", parents=[common],
                       help="write RESULTS/report.html (one self-contained page)")
    p.add_argument("results", type=Path, help="results folder of 'dfrn run'")

    for name, what in (("baseline", "ridge baselines: atlas ROI volumes and the network's input voxels"),
                       ("attention", "factor attention maps")):
        p = sub.add_parser(name, parents=[common], help=f"{what} for a finished run")
        p.add_argument("results", type=Path, help="results folder of 'dfrn run'")
        p.add_argument("--atlas", type=str, default=None, help="atlas label image (NIfTI)")
        p.add_argument("--atlas-labels", type=str, default=None, help="TSV with index, name")
        if name == "baseline":
            p.add_argument("--permutations", type=non_negative_int, default=None, metavar="N",
                           help="permutations (default: the config's, 1000; 0: no test)")
        else:
            p.add_argument(
                "--method", default=None,
                choices=["guided_backprop", "gradient", "integrated_gradients", "smoothgrad"],
                help="attribution method (default: the config's, guided_backprop)",
            )
            p.add_argument("--ablation", action="store_true", default=None,
                           help="region ablation importance out of fold (the 'where is the "
                           "signal' ranking), even if [attention] ablation = false")


def _prep_settings() -> argparse.ArgumentParser:
    """The options ``dfrn prep`` and ``dfrn bids`` share: registration, QC, executor."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--transform", choices=["syn", "affine"], default="syn",
                   help="affine then SyN (default), or affine only")
    p.add_argument("--template", default=None, help="template T1 (default: TemplateFlow)")
    p.add_argument("--template-mask", default=None, help="the template's brain mask")
    p.add_argument("--template-space", default=None, metavar="NAME",
                   help="BIDS space label of --template (default: from a TemplateFlow file "
                   "name tpl-NAME_…; required otherwise)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="subjects at once (one process each; default 1)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="ANTs random seed (default 0)")
    p.add_argument("--no-deterministic", action="store_true",
                   help="let ANTs use several threads per subject (faster, not repeatable)")
    p.add_argument("--dice-min", type=float, default=0.90, help="QC flag below this Dice")
    p.add_argument("--corr-min", type=float, default=0.40,
                   help="QC flag below this T1 correlation with the template")
    p.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                   help="local: --jobs processes here (default); ray: one Ray task per subject; "
                   "slurm: one SLURM job per subject (a job array)")
    p.add_argument("--executor-config", type=Path, default=None, metavar="TOML",
                   help="take Ray or SLURM settings (partition, mem_gb, timeout_min, …) from "
                   "this file's [executor] section; a study config will do")
    p.add_argument("--ray-address", default="",
                   help="with --executor ray: empty starts a local Ray; 'auto' or ray://… joins")
    return p


def _add_prep(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prep", parents=[common, _prep_settings()],
        help="raw T1 scans → MNI152NLin6Asym 1 mm, brain mask and GM maps (antspyx), or import "
        "fMRIPrep derivatives",
    )
    p.add_argument("input", type=Path, nargs="?", default=None,
                   help="BIDS root, or TSV/CSV with participant_id and a T1 path column")
    p.add_argument("--out", type=Path, required=True, help="derivatives folder (new, or a resume)")
    p.add_argument("--image-column", default="t1", help="T1 path column of a table")
    p.add_argument("--session", default=None, help="BIDS session label")
    p.add_argument("--from-derivatives", type=Path, default=None, metavar="DIR",
                   help="take template-space images from fMRIPrep/sMRIPrep derivatives")


def _add_bids(sub: Any, common: argparse.ArgumentParser) -> None:
    """``dfrn bids``, worded as the BIDS-Apps specification words its arguments."""
    p = sub.add_parser(
        "bids", parents=[common, _prep_settings()],
        help="the BIDS-Apps command line: participant level (dfrn prep), group level (the study)",
        description="dfrn as a BIDS App: the participant level preprocesses each subject into "
        "BIDS derivatives; the group level runs the study of --config on them.",
    )
    p.add_argument("bids_dir", type=Path, help="The directory with the input dataset formatted "
                   "according to the BIDS standard.")
    p.add_argument("output_dir", type=Path, help="The directory where the output files should "
                   "be stored. If you are running group level analysis this folder should be "
                   "prepopulated with the results of the participant level analysis.")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="Level of the analysis that will be performed. Multiple participant "
                   "level analyses can be run independently (in parallel) using the same "
                   "output_dir.")
    p.add_argument("--participant-label", "--participant_label", dest="participant_label",
                   nargs="+", default=None, metavar="LABEL",
                   help="The label(s) of the participant(s) that should be analyzed. The label "
                   "corresponds to sub-<participant_label> from the BIDS spec (so it does not "
                   "include \"sub-\"). If this parameter is not provided all subjects should be "
                   "analyzed. Multiple participants can be specified with a space separated list.")
    p.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="group level: the study config (targets, covariates, training, …); its "
                   "cohort is the participant level's cohort.tsv, and the study goes into "
                   "OUTPUT_DIR/study")


def _whole_number(text: str, minimum: int) -> int:
    """``text`` as an int of at least ``minimum``; argparse names the option in its error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a count that may be 0 (permutations, resamples, seeds)."""
    return _whole_number(text, 0)


def positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (jobs)."""
    return _whole_number(text, 1)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a tolerance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _n_factors(text: str) -> int | str:
    if text in ("parallel", "map"):
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 1, 'parallel' or 'map', got {text!r}"
        ) from None


def _parse_names(pairs: Sequence[str]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for pair in pairs:
        factor, sep, items = pair.partition("=")
        if not sep or not factor.strip() or not items.strip():
            raise DfrnInputError(f"--name {pair!r} must look like FACTOR=ITEM,ITEM")
        names[factor.strip()] = [i.strip() for i in items.split(",") if i.strip()]
    return names


def _run_prep_or_bids(args: argparse.Namespace, progress: bool) -> None:
    from dfrn.workflows.prep import prep_executor

    if args.command == "bids" and args.analysis_level == "group" and args.config is None:
        raise DfrnInputError("dfrn bids … group needs --config STUDY.toml (the study to run)")
    runner = prep_executor(args.executor, args.ray_address, args.executor_config)
    settings = {
        "transform": args.transform, "seed": args.seed,
        "deterministic": not args.no_deterministic, "template": args.template,
        "template_mask": args.template_mask, "template_space": args.template_space,
        "jobs": args.jobs, "dice_min": args.dice_min, "corr_min": args.corr_min,
    }
    try:
        if args.command == "prep":
            from dfrn.workflows.prep import run_prep

            run_prep(args.input, args.out, image_column=args.image_column, session=args.session,
                     derivatives=args.from_derivatives, progress=progress, executor=runner,
                     **settings)
        elif args.analysis_level == "participant":
            from dfrn.workflows.bids_app import run_bids_participant

            run_bids_participant(args.bids_dir, args.output_dir, args.participant_label,
                                 progress=progress, executor=runner, **settings)
        else:
            from dfrn.workflows.bids_app import run_bids_group

            run_bids_group(args.bids_dir, args.output_dir, args.config, args.participant_label,
                           progress=progress, executor=runner, **settings)
    finally:
        runner.close()


def _run_demo_or_synth(args: argparse.Namespace, progress: bool) -> None:
    """``dfrn demo`` and ``dfrn synth`` (the demo's generative model)."""
    from dfrn.workflows.demo import run_demo, synth_cohort

    if args.command == "demo":
        run_demo(args.out, full=args.full, seed=args.seed, progress=progress)
    else:
        synth_cohort(args.out, args.subjects, args.seed, full=args.full, progress=progress)


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "run":
        from dfrn.config import load_config
        from dfrn.workflows.run import run_study

        cfg = load_config(args.config)
        cfg.cohort.strict = cfg.cohort.strict or args.strict
        run_study(
            cfg, args.out, progress=progress, permutations=args.permutations,
            executor=args.executor,
        )
    elif args.command in ("demo", "synth"):
        _run_demo_or_synth(args, progress)
    elif args.command == "factors":
        from dfrn.workflows.factors import run_factors, suggest_factors

        if args.suggest:
            suggest_factors(args.items, args.out, seed=args.seed)
        elif args.out is None:
            raise DfrnInputError("dfrn factors needs --out DIR (or --suggest)")
        else:
            run_factors(
                args.items, args.n_factors, args.out, names=_parse_names(args.name),
                impute=args.impute, tol=args.tol, n_resamples=args.resamples, seed=args.seed,
            )
    elif args.command in ("prep", "bids"):
        _run_prep_or_bids(args, progress)
    elif args.command == "report":
        from dfrn.workflows.report import rewrite_report

        print(f"report: {rewrite_report(args.results)}")
    elif args.command == "predict":
        from dfrn.workflows.predict import predict_cohort

        predict_cohort(
            args.model, args.cohort, args.out, image_column=args.image_column,
            session=args.session, allow_training_subjects=args.allow_training_subjects,
            attention=args.attention, regions=args.regions, device=args.device,
            progress=progress, coverage=args.coverage, strict=args.strict,
        )
    elif args.command == "baseline":
        from dfrn.workflows.baseline import run_baseline_stage

        run_baseline_stage(
            args.results, progress=progress, atlas=args.atlas,
            atlas_labels=args.atlas_labels, n_permutations=args.permutations,
        )
    elif args.command == "attention":
        from dfrn.workflows.attention import run_attention_stage

        run_attention_stage(
            args.results, progress=progress, method=args.method, atlas=args.atlas,
            atlas_labels=args.atlas_labels, ablation=args.ablation,
        )
    return 0


def _crash_log(args: argparse.Namespace | None, text: str) -> Path | None:
    """Write a traceback to ``<results>/logs/`` when that folder exists, else the temp dir."""
    from dfrn.io import atomic_write_text

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    name = f"dfrn-error-{stamp}-{os.getpid()}.log"
    folders = []
    for attr in ("out", "results"):
        value = getattr(args, attr, None) if args is not None else None
        if isinstance(value, Path) and value.is_dir():
            from dfrn.workflows.results import ResultsFolder

            folders.append(ResultsFolder(value).logs)
    folders.append(Path(tempfile.gettempdir()))
    for folder in folders:
        try:
            return atomic_write_text(folder / name, text)
        except OSError:
            continue
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; exit status 0 on success, 2 for a dfrn error (bad input, a
    results folder in use or not intact, a full disk), 1 for anything else.

    Every error is one line on stderr. An unexpected exception is never swallowed: its line
    names the exception and the log file that holds the full traceback.
    """
    args = build_parser().parse_args(argv)
    warnings.showwarning = _warning_line
    previous = _terminate_cleanly()
    try:
        return _run(args)
    except DfrnError as exc:
        print(f"dfrn: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfrn: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _Terminated:
        print("dfrn: terminated; rerun the same command to resume", file=sys.stderr)
        return 143
    except OSError as exc:
        log = _crash_log(args, traceback.format_exc())
        where = f" {exc.filename}" if exc.filename else ""
        what = exc.strerror or str(exc)
        print(
            f"dfrn: error: cannot access{where}: {what}"
            + (f" (details in {log})" if log else ""),
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        log = _crash_log(args, traceback.format_exc())
        print(
            f"dfrn: internal error: {type(exc).__name__}: {_one_line(exc)}; the full traceback "
            f"is in {log if log else '(no writable place for a log)'}; please report it",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that locks and temporary folders are cleaned."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _terminate_cleanly() -> object:
    """Handle SIGTERM like Ctrl-C (in the main thread only); return the previous handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
