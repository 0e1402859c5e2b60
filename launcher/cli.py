"""Command line: `launcher validate|prepare|run|slurm|predict|sweep JOB.yaml [key=value ...]`, `launcher workers N G`.

Run as: launcher run jobs/demo.yaml --local
Thin: parses arguments and calls the spec, data and coordinator layers. User errors exit 2 with one
line naming the field or file.
"""

from __future__ import annotations

import argparse
import os
import sys

from launcher.errors import RunError, UserError
from launcher.hooks import VERBOSE_ENV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description="Pre-train then fine-tune from one YAML job spec.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "check the spec and print the resolved plan (no training)"),
        ("prepare", "tokenize and pack every stage's data (cached)"),
        ("run", "run every stage in order (resumes where it stopped)"),
        ("slurm", "print an sbatch script for the job (from cluster.slurm), or submit it"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("spec", help="job spec YAML file")
        command.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.0.max_steps=20")
        if name == "slurm":
            command.add_argument("--submit", action="store_true", help="write the script and sbatch it")
        else:
            command.add_argument("--local", action="store_true", help="one process, one device, no Ray")
        if name == "run":
            command.add_argument("--stage", metavar="NAME", help="run only this stage (what it reads must be done)")
            command.add_argument(
                "--verbose", action="store_true",
                help="also show Ray's, DeepSpeed's and the libraries' own lines (else in logs/ and Ray's log files)",
            )  # fmt: skip
    predict = commands.add_parser(
        "predict",
        help="run a stage's export over files of new text or images (Ray Data on a cluster, one process with --local)",
        description="Writes one file per input (same name and format: jsonl, csv or parquet) under --output: "
        "the input's rows in order with predicted_label, predicted_score and score_<label> columns (a token "
        "classifier: predicted_tags and predicted_entities). An image classifier reads the image file each row's "
        "--image-field names (relative to the table's folder), or takes a folder or glob of image files (png, "
        "jpg, ...) as --input and writes one predictions.jsonl with a path column, in sorted order.",
    )
    predict.add_argument("spec", help="job spec YAML file, or an exported model folder")
    predict.add_argument("overrides", nargs="*", help="dotted overrides of the job spec, e.g. cluster.num_workers=4")
    predict.add_argument("--stage", metavar="NAME", help="the stage whose export predicts (default: the last "
                         "classification, token_classification or image_classification stage)")  # fmt: skip
    predict.add_argument("--input", required=True, metavar="FILE_OR_GLOB",
                         help="jsonl, csv or parquet file(s); for an image classifier also a folder or glob of "
                         "image files")  # fmt: skip
    predict.add_argument(
        "--image-field",
        default="image",
        metavar="NAME",
        help="image classification: the tables' column of image file paths (default image)",
    )
    predict.add_argument("--output", required=True, metavar="DIR", help="folder for the prediction files")
    predict.add_argument("--batch-size", type=int, default=64, help="rows per forward pass (default 64)")
    predict.add_argument("--local", action="store_true", help="one process, no Ray")
    predict.add_argument("--aggregation", choices=("first", "max", "average", "simple"), default="first",
                         help="token classification: how sub-tokens join into words and entities (transformers' "
                         "aggregation_strategy; default first)")  # fmt: skip
    sweep = commands.add_parser(
        "sweep",
        help="trials of one stage over its sweep section on Ray Tune; the best trial's export becomes the stage's",
        description="Runs the stage once per trial of its `sweep:` section (or the job's), each under "
        "<stage>/trials/, chooses the best by the sweep's metric, makes its export the stage's model/ and writes "
        "the table of all trials to <stage>/sweep.csv and sweep.json.",
    )
    sweep.add_argument("spec", help="job spec YAML file")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.1.sweep.num_samples=4")
    sweep.add_argument("--stage", required=True, metavar="NAME", help="the stage to sweep")
    sweep.add_argument("--local", action="store_true", help="each trial trains in one process (Tune still runs them)")
    workers = commands.add_parser("workers", help="training workers of a SLURM allocation (slurm/ray_job.sh asks)")
    workers.add_argument("nodes", type=int)
    workers.add_argument("gpus_per_node", type=int)
    return parser


def _workers(args: argparse.Namespace) -> int:
    """`launcher workers NODES GPUS_PER_NODE`: prints `WORKERS USE_GPU` (e.g. `8 true`) for the shell."""
    from launcher.coordinator.slurm import allocation_workers

    workers, use_gpu = allocation_workers(args.nodes, args.gpus_per_node)
    print(workers, "true" if use_gpu else "false")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "workers":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            return _workers(args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # Overrides may follow options (`run JOB.yaml --local a.b=1`); anything else is a usage error.
    if any("=" not in item or item.startswith("-") for item in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from launcher.coordinator.signals import Interrupted

    try:
        from launcher.jobspec.load import load_spec

        if args.command == "predict":
            from launcher.coordinator.predict import resolve_request, run_predict

            if args.batch_size < 1:
                raise UserError(f"--batch-size: {args.batch_size} is not a positive number")
            request = resolve_request(
                args.spec, args.overrides, args.stage, args.input, args.output, args.batch_size, args.aggregation,
                args.image_field,
            )  # fmt: skip
            return run_predict(request, args.local)
        if args.command == "sweep":
            from launcher.coordinator.sweep import run_sweep

            return run_sweep(args.spec, args.overrides, args.stage, args.local)
        spec = load_spec(args.spec, args.overrides)
        if args.command == "slurm":
            return _slurm(spec, args)
        local = args.local or spec.cluster.num_workers == 0
        if args.command == "validate":
            from launcher.coordinator.driver import check_devices
            from launcher.jobspec.plan import check_fit, plan_job, render_plan
            from launcher.models.count import param_counts

            check_devices(spec, local)
            counts = param_counts(spec)
            plans = plan_job(spec, local, param_counts=counts)
            print(render_plan(spec, plans, local))
            check_fit(spec, plans, counts)
            return 0
        if args.command == "prepare":
            from launcher.coordinator.driver import claim_job_dir, resolve
            from launcher.coordinator.ray import cluster_address, prepare_on_cluster

            address = None if local else cluster_address(spec)
            if address:
                prepare_on_cluster(spec, address)  # Ray Data tasks across the cluster's nodes
                return 0
            claim_job_dir(spec)
            resolve(spec, local)  # worker processes on this machine's cores
            return 0
        from launcher.coordinator.driver import check_devices

        check_devices(spec, local, args.stage)  # before a private Ray starts
        if spec.cluster.gpu_memory_gb is not None:  # the memory plan needs the models' sizes (meta device)
            from launcher.jobspec.plan import check_fit, plan_job
            from launcher.models.count import param_counts

            counts = param_counts(spec)
            check_fit(spec, plan_job(spec, local, param_counts=counts), counts)
        if local:
            from launcher.coordinator.local import run_local

            return run_local(spec, args.stage)
        from launcher.jobspec.plan import single_host_warning

        warning = single_host_warning(spec, local)
        if warning is not None:
            print(warning, flush=True)
        from launcher.coordinator.ray import run_ray

        return run_ray(spec, args.stage)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # a second SIGTERM/SIGINT: stopped at once, cleaned up
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _slurm(spec, args: argparse.Namespace) -> int:  # noqa: ANN001
    from launcher.coordinator.slurm import render_sbatch, submit, workers_for
    from launcher.jobspec.load import load_spec
    from launcher.jobspec.plan import plan_job

    # Check the batch arithmetic for the worker count the allocation will give, before submitting.
    at_scale = load_spec(args.spec, [*args.overrides, f"cluster.num_workers={workers_for(spec)}"])
    plan_job(at_scale, local=False)
    script = render_sbatch(spec, args.spec, args.overrides)
    print(submit(spec, script) if args.submit else script, end="" if not args.submit else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
