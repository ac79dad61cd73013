"""Training: SGD with momentum, the paper's two phases, history and checkpoints.

Phase 1 ("constrained") trains with every gated layer's balancing constraint
switched on and a constant learning rate. Phase 2 ("free") switches the
constraint off and anneals the learning rate linearly to 0, step by step. The
paper states only "stochastic gradient descent"; the defaults of
:class:`TrainConfig` are ours, measured on this project's machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._atomic import atomic_write
from .balance import check_margin
from .dmoe import build_model
from .gating import check_int

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Args:
        epochs: total epochs, both phases. Default: 100.
        constrained_epochs: epochs of phase 1, with the balancing constraint on.
            Default: 10.
        margin: the constraint's margin ``m`` in examples of gate mass, or
            ``None`` to train without the constraint at all. Default: 100.
        lr: learning rate of phase 1 and start of phase 2's anneal. Default: 0.1.
        momentum: SGD momentum. Default: 0.9.
        batch_size: examples per step ``B``. Default: 100.
        weight_decay: L2 penalty. Default: 0.
        anneal: anneal the learning rate linearly to 0 over phase 2. Default: True.
        seed: seeds the example order of every epoch (an integer >= 0).
            Default: 0.
        threads: ``torch.set_num_threads`` for the run, or ``None`` to leave it.
            The same seed gives different numbers with a different thread count.
            Default: 1.
        eval_every: evaluate the test error every this many epochs (and at the
            last epoch); other epochs record ``None``. Default: 1.

    Integer fields accept any integer type (``np.int64`` too) but not bools or
    floats, and are stored as ``int``; ``lr``, ``momentum``, ``weight_decay``
    and ``margin`` are stored as ``float``. A bad value raises ``ValueError``
    naming the field and the value.
    """

    epochs: int = 100
    constrained_epochs: int = 10
    margin: float | None = 100.0
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 100
    weight_decay: float = 0.0
    anneal: bool = True
    seed: int = 0
    threads: int | None = 1
    eval_every: int = 1

    def __post_init__(self) -> None:
        # Integers: any integer type (np.int64 too), stored as a plain int.
        for name in ("epochs", "batch_size", "eval_every"):
            setattr(self, name, check_int(name, getattr(self, name)))
        self.constrained_epochs = check_int(
            "constrained_epochs", self.constrained_epochs, minimum=0
        )
        if self.constrained_epochs > self.epochs:
            raise ValueError(
                f"constrained_epochs must be in [0, epochs={self.epochs}], "
                f"got {self.constrained_epochs!r}"
            )
        self.seed = check_int("seed", self.seed, minimum=0)
        if self.threads is not None:
            try:
                self.threads = check_int("threads", self.threads)
            except ValueError:
                raise ValueError(
                    f"threads must be an integer >= 1 or None, got {self.threads!r}"
                ) from None

        # Real numbers, stored as floats.
        if self.margin is not None:
            self.margin = check_margin(self.margin)
        self.lr = _check_real("lr", self.lr, "> 0", lambda v: v > 0)
        self.momentum = _check_real(
            "momentum", self.momentum, "in [0, 1)", lambda v: 0 <= v < 1
        )
        self.weight_decay = _check_real(
            "weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0
        )
        if not isinstance(self.anneal, bool):
            raise ValueError(f"anneal must be True or False, got {self.anneal!r}")

    def lr_at(self, epoch: int, fraction: float) -> float:
        """Learning rate at ``fraction`` (in [0, 1)) of 1-based ``epoch``."""
        if not self.anneal or epoch <= self.constrained_epochs:
            return self.lr
        free = self.epochs - self.constrained_epochs
        done = (epoch - 1 - self.constrained_epochs + fraction) / free
        return self.lr * (1.0 - done)


def _check_real(name: str, value: Any, condition: str,
                holds: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite real number meeting ``condition``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or not holds(float(value))):
        raise ValueError(f"{name} must be a number {condition}, got {value!r}")
    return float(value)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (the same object that was passed in).
        history: one dict per epoch: ``epoch`` (from 1), ``phase``
            (``"constrained"`` or ``"free"``), ``lr`` (at the epoch's start),
            ``loss`` (mean training cross-entropy), ``train_error`` (% of the
            epoch's training examples misclassified *during* training),
            ``test_error`` (% on the test set, or ``None`` on skipped epochs),
            ``load`` (per hidden layer: the mean gate probability of each expert
            over the epoch, or ``None`` for an ungated layer), ``masked`` (per
            gated layer: share of examples that had an expert masked).
        config: the run's :class:`TrainConfig`.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    config: TrainConfig

    @property
    def final_test_error(self) -> float | None:
        """Test error (%) of the last evaluated epoch."""
        errors = [h["test_error"] for h in self.history if h["test_error"] is not None]
        return errors[-1] if errors else None


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 1000) -> float:
    """Classification error (%) of ``model`` on ``dataset``, in eval mode.

    Args:
        model: a model returning :class:`~dmoe_edu.dmoe.ModelOutput`.
        dataset: any object with ``inputs()`` and ``targets()`` (e.g. a
            :class:`~dmoe_edu.data.JitteredSet`).
    """
    was_training = model.training
    model.eval()
    try:
        inputs, targets = dataset.inputs(), dataset.targets()
        wrong = 0
        for start in range(0, len(targets), batch_size):
            batch = slice(start, start + batch_size)
            logits = model(inputs[batch]).logits
            wrong += int((logits.argmax(1) != targets[batch]).sum())
        return 100.0 * wrong / max(len(targets), 1)
    finally:
        model.train(was_training)


def train(
    model: nn.Module,
    data,
    config: TrainConfig | None = None,
    *,
    progress: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on jittered digits with the paper's two-phase schedule.

    Runs are deterministic for a given seed, thread count and machine: the
    example order of epoch ``e`` comes from ``(seed, e)`` and the training
    shifts from ``data.train_epoch(e)``. Seed the model's initialisation
    yourself (``torch.manual_seed``) before building it.

    Args:
        model: a :class:`~dmoe_edu.dmoe.DeepMoE` or :class:`~dmoe_edu.dmoe.DNN`.
        data: a :class:`~dmoe_edu.data.JitteredMNIST` (anything with
            ``train_epoch(epoch)`` and ``test``).
        config: hyper-parameters. Default: ``TrainConfig()``.
        progress: show a tqdm progress bar over epochs. Default: False.
        checkpoint_path: if given, a checkpoint is written there after every
            epoch (atomically: a crash never leaves a half-written file).
        resume: continue from ``checkpoint_path`` if it exists. The resumed run
            ends with the same numbers as an uninterrupted one, so the
            checkpoint's :class:`TrainConfig` must equal ``config`` field by
            field (``epochs`` alone changes the learning-rate schedule; even
            ``threads`` changes the numbers). To train with other settings,
            start fresh. A checkpoint whose run already finished (stored epoch
            equal to ``config.epochs``) trains nothing and returns the stored
            history. Default: False.
        on_epoch: called with each epoch's history entry.

    Returns:
        A :class:`TrainResult` with the model and its per-epoch history.

    Raises:
        ValueError: if ``resume`` finds a checkpoint written with another
            :class:`TrainConfig` (the message lists the differing fields) or for
            another model, or a file that is not a dmoe_edu checkpoint.
        FloatingPointError: if the loss of a step is NaN or infinite (the
            message names the epoch and step); the step is not applied.

    Example:
        >>> from dmoe_edu.data import JitteredMNIST, synthetic_digits
        >>> data = JitteredMNIST(synthetic_digits(200, 100))
        >>> _ = torch.manual_seed(0)
        >>> model = DeepMoE(1296, [LayerSpec(4, 16, 8), LayerSpec(4, 16, 8)])
        >>> result = train(model, data, TrainConfig(epochs=2, constrained_epochs=1))
        >>> [h["phase"] for h in result.history]
        ['constrained', 'free']
    """
    config = config or TrainConfig()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    history: list[dict[str, Any]] = []
    start_epoch = 1
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        # Check the settings before any weight is overwritten.
        state = _read_checkpoint(checkpoint_path)
        _check_same_config(checkpoint_path, state["train_config"], config)
        loaded = _apply_checkpoint(checkpoint_path, state, model, optimizer)
        history = loaded["history"]
        start_epoch = loaded["epoch"] + 1
        logger.info("resuming from %s at epoch %d", checkpoint_path, start_epoch)

    epochs = range(start_epoch, config.epochs + 1)
    bar = tqdm(epochs, desc="epochs", disable=not progress, leave=False)
    with _threads(config.threads):
        for epoch in bar:
            record = _train_epoch(model, optimizer, data, config, epoch)
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                record["test_error"] = evaluate(model, data.test)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", test=record["test_error"])
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, model, optimizer, epoch, history,
                                config)
            if on_epoch is not None:
                on_epoch(record)
        # Leave the constraint off: it belongs to training.
        _set_balance(model, False, config.margin)
    return TrainResult(model, history, config)


def _train_epoch(model, optimizer, data, config: TrainConfig, epoch: int) -> dict:
    constrained = config.margin is not None and epoch <= config.constrained_epochs
    _set_balance(model, constrained, config.margin, reset=epoch == 1)
    model.train()

    # This epoch's jittered copy, in an order drawn from (seed, epoch).
    train_set = data.train_epoch(epoch)
    inputs, targets = train_set.inputs(), train_set.targets()
    order = torch.from_numpy(
        np.random.default_rng([config.seed, epoch]).permutation(len(targets))
    )
    num_batches = (len(targets) + config.batch_size - 1) // config.batch_size
    masked_before = [c.masked_examples for c in _constraints(model)]

    loss_sum, wrong, load_sums = 0.0, 0, None
    lr_start = config.lr_at(epoch, 0.0)
    for step in range(num_batches):
        # The learning rate falls a little every step of the free phase.
        lr = config.lr_at(epoch, step / num_batches)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        x, y = inputs[index], targets[index]

        # Forward (a gate's constraint refuses NaN logits: say where it happened),
        # cross-entropy on the class; stop before a NaN step is applied.
        try:
            out = model(x)
        except ValueError as error:
            raise ValueError(
                f"at epoch {epoch}, step {step + 1} of {num_batches}: {error}"
            ) from error
        loss = nn.functional.cross_entropy(out.logits, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss is {loss_value} at epoch {epoch}, step "
                f"{step + 1} of {num_batches} (lr {lr:.4g}); check the "
                "inputs for NaN/inf, or lower the learning rate"
            )

        # One SGD step.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Running statistics for the history.
        loss_sum += loss_value * len(y)
        wrong += int((out.logits.argmax(1) != y).sum())
        sums = [None if g is None else g.detach().sum(0) for g in out.gate_probs]
        load_sums = sums if load_sums is None else [
            None if a is None else a + b for a, b in zip(load_sums, sums)
        ]

    n = len(targets)
    masked_after = [c.masked_examples for c in _constraints(model)]
    return {
        "epoch": epoch,
        "phase": "constrained" if constrained else "free",
        "lr": lr_start,
        "loss": loss_sum / n,
        "train_error": 100.0 * wrong / n,
        "test_error": None,
        "load": [None if s is None else (s / n).tolist() for s in load_sums],
        "masked": [
            (after - before) / n if constrained else 0.0
            for before, after in zip(masked_before, masked_after)
        ],
    }


def _constraints(model: nn.Module) -> list:
    return model.constraints() if hasattr(model, "constraints") else []


def _set_balance(model, enabled: bool, margin, reset: bool = False) -> None:
    if hasattr(model, "set_balance"):
        model.set_balance(enabled, margin if enabled else None, reset=reset)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit_full_batch(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                   steps: int = 300, lr: float = 0.05, threads: int | None = 1
                   ) -> list[float]:
    """Fit a small model on a whole small data set at once, with Adam.

    For the course's toy problems (a few hundred points of the plane), where
    every step can see every example: no batches, no shuffling, no schedule,
    so the run depends only on the model's initialisation. Seed that yourself
    (``torch.manual_seed``) before building the model. Jittered MNIST goes
    through :func:`train`.

    Args:
        model: a model returning :class:`~dmoe_edu.dmoe.ModelOutput`, e.g. a
            :class:`~dmoe_edu.classic.ClassicMoE`.
        inputs: the whole training set.
        labels: its classes.
        steps: Adam steps. Default: 300.
        lr: Adam's learning rate. Default: 0.05.
        threads: ``torch.set_num_threads`` for the run, or ``None`` to leave
            it. Default: 1.

    Shape:
        - inputs: ``(B, D)``; labels: ``(B,)`` int64.

    Returns:
        list[float]: the cross-entropy before each step (``steps`` values).
        The model is left in eval mode.

    Raises:
        ValueError: on a bad ``steps`` or ``lr``, or labels that do not match
            the inputs.
        FloatingPointError: if a loss is NaN or infinite (the message names
            the step; the step is not applied).

    Example:
        >>> from dmoe_edu.classic import ClassicMoE
        >>> plane = two_rule_plane(num_points=200, seed=0)
        >>> _ = torch.manual_seed(0)
        >>> model = ClassicMoE(in_dim=2, num_classes=2, num_experts=2)
        >>> losses = fit_full_batch(model, plane.inputs, plane.labels, steps=50)
        >>> len(losses), losses[-1] < losses[0]
        (50, True)
    """
    steps = check_int("steps", steps)
    lr = _check_real("lr", lr, "> 0", lambda v: v > 0)
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"labels must have shape (B,) = ({inputs.shape[0]},), got "
            f"{tuple(labels.shape)}"
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    model.train()
    with _threads(threads):
        for step in range(steps):
            # Every example, every step; stop before a NaN step is applied.
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs).logits, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss is {loss.item()} at step {step + 1} of {steps}"
                )
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return losses


def save_checkpoint(path, model, optimizer=None, epoch: int = 0, history=None,
                    config: TrainConfig | None = None) -> Path:
    """Write a checkpoint atomically (a temporary file, then a rename).

    The checkpoint holds the model's ``config`` and weights (the balancing
    constraints' running totals included), the optimizer's state, the epoch,
    the history and the :class:`TrainConfig`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "model_config": model.config,
        "model_state": model.state_dict(),
        "optimizer_state": None if optimizer is None else optimizer.state_dict(),
        "epoch": epoch,
        "history": history or [],
        "train_config": None if config is None else dataclasses.asdict(config),
    }
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def load_checkpoint(path, model: nn.Module | None = None, optimizer=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        model: load the weights into this model; if ``None``, a model is rebuilt
            from the stored config.
        optimizer: if given, its state is restored too.

    Returns:
        A dict with ``model``, ``epoch``, ``history`` and ``train_config``
        (a :class:`TrainConfig` or ``None``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``path`` is not a dmoe_edu checkpoint, or ``model`` does
            not match the stored config.
    """
    return _apply_checkpoint(path, _read_checkpoint(path), model, optimizer)


#: Keys every checkpoint of :func:`save_checkpoint` holds.
_CHECKPOINT_KEYS = ("model_config", "model_state", "optimizer_state", "epoch",
                    "history", "train_config")


def _read_checkpoint(path) -> dict:
    """The raw dict of a checkpoint file, with its ``train_config`` rebuilt."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")

    # Anything torch cannot read is not ours (a permission error stays one).
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except OSError:
        raise
    except Exception as error:
        raise ValueError(
            f"{path} is not a dmoe_edu checkpoint: torch.load failed with "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} is not a dmoe_edu checkpoint: it holds a "
            f"{type(state).__name__}, expected a dict"
        )
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"{path} is not a dmoe_edu checkpoint: it misses the key(s) {missing}"
        )

    config = state["train_config"]
    try:
        config = None if config is None else TrainConfig(**config)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{path} is not a dmoe_edu checkpoint: its train_config is invalid: "
            f"{error}"
        ) from error
    return {**state, "train_config": config}


def _apply_checkpoint(path, state: dict, model, optimizer) -> dict:
    """Load a raw checkpoint into ``model`` (built if None) and ``optimizer``."""
    if model is None:
        model = build_model(state["model_config"])
    elif getattr(model, "config", None) != state["model_config"]:
        raise ValueError(
            f"checkpoint {path} holds a model with config {state['model_config']}, "
            f"which differs from the given model's {getattr(model, 'config', None)}"
        )
    model.load_state_dict(state["model_state"])
    if optimizer is not None and state["optimizer_state"] is not None:
        optimizer.load_state_dict(state["optimizer_state"])
    return {
        "model": model,
        "epoch": state["epoch"],
        "history": state["history"],
        "train_config": state["train_config"],
    }


def _check_same_config(path, stored: TrainConfig | None,
                       given: TrainConfig) -> None:
    """Refuse to resume a run under other settings: its numbers would not match."""
    if stored is None:
        raise ValueError(
            f"checkpoint {path} holds no TrainConfig, so resuming cannot check "
            "that it continues the same run; start fresh (resume=False)"
        )
    stored_fields, given_fields = dataclasses.asdict(stored), dataclasses.asdict(given)
    differences = [
        f"{name} (stored {stored_fields[name]!r}, given {given_fields[name]!r})"
        for name in stored_fields if stored_fields[name] != given_fields[name]
    ]
    if differences:
        raise ValueError(
            f"checkpoint {path} was written with a different TrainConfig: "
            + "; ".join(differences)
            + ". Resume with the stored settings, or start fresh (resume=False "
            "or another checkpoint_path)"
        )
