"""Gate statistics: which expert takes which inputs ("where" and "what").

Everything here reads the gate probabilities a trained model returns and
summarises them the way the paper's Figs. 2, 3 and 5 do. The functions take
numpy arrays (torch tensors are converted) and return numpy arrays or plain
Python numbers, so they work the same on a laptop and after a GPU run.

Notation: ``N`` examples, ``E`` experts of a layer (``E1``, ``E2`` for two
layers), ``C`` classes. Translations are the jitter shifts ``(dx, dy)``, each
in ``-4..4``, stored with ``dx`` in column 0 and ``dy`` in column 1; a shift's
flat index is ``(dy + 4) * 9 + (dx + 4)`` in ``[0, 81)``.

Limitations: the scores are plug-in estimates from a finite test set, so they
carry a positive bias; compare them with :func:`chance_score`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data.jitter import NUM_SHIFTS, check_shifts, shift_index

_MODES = ("argmax", "soft")


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _to_numpy(array: Any, name: str) -> np.ndarray:
    """Return ``array`` as a numpy array (torch tensors are detached to CPU)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _gates(gate_probs: Any, name: str = "gate_probs") -> np.ndarray:
    """Check a ``(N, E)`` gate matrix and return it as float64."""
    gates = _to_numpy(gate_probs, name)
    if gates.ndim != 2 or gates.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape (N, E) with E >= 1, got {gates.shape}"
        )
    if not np.issubdtype(gates.dtype, np.number) or gates.dtype.kind == "c":
        raise TypeError(f"{name} must hold real numbers, got dtype {gates.dtype}")
    gates = gates.astype(np.float64, copy=False)
    if not np.all(np.isfinite(gates)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if gates.size and gates.min() < 0:
        raise ValueError(f"{name} must be non-negative, got minimum {gates.min()}")
    return gates


def _int_vector(values: Any, name: str, num_rows: int) -> np.ndarray:
    """Check a ``(N,)`` integer vector with ``num_rows`` entries."""
    vector = _to_numpy(values, name)
    if vector.shape != (num_rows,):
        raise ValueError(
            f"{name} must have shape ({num_rows},), got {vector.shape}"
        )
    if num_rows and not np.issubdtype(vector.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {vector.dtype}")
    return vector.astype(np.int64, copy=False)


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


# ---------------------------------------------------------------------------
# Collecting gates from a model
# ---------------------------------------------------------------------------


@dataclass
class GateRecord:
    """Gate probabilities and predictions of a model on a whole data set.

    Args:
        gate_probs: one entry per model layer: a ``(N, E_l)`` float64 array of
            gate probabilities, or ``None`` for a layer without a gate.
        labels: ``(N,)`` int64 true classes.
        shifts: ``(N, 2)`` int64 jitter shifts, ``dx`` then ``dy``.
        predictions: ``(N,)`` int64 predicted classes (argmax of the logits).
        images: ``(N, 36, 36)`` uint8 images, kept to draw Fig. 3.

    Example:
        >>> record = GateRecord([np.full((2, 2), 0.5), None],
        ...                     np.array([1, 2]), np.zeros((2, 2), np.int64),
        ...                     np.array([1, 0]), np.zeros((2, 36, 36), np.uint8))
        >>> record.gated_layers, record.error
        ([0], 50.0)
    """

    gate_probs: list[np.ndarray | None]
    labels: np.ndarray
    shifts: np.ndarray
    predictions: np.ndarray
    images: np.ndarray

    @property
    def num_examples(self) -> int:
        """Number of examples ``N``."""
        return int(len(self.labels))

    @property
    def gated_layers(self) -> list[int]:
        """Indices (in model order) of the layers that have a gate."""
        return [i for i, probs in enumerate(self.gate_probs) if probs is not None]

    @property
    def error(self) -> float:
        """Classification error in percent (0.0 for an empty record)."""
        if self.num_examples == 0:
            return 0.0
        wrong = np.asarray(self.predictions) != np.asarray(self.labels)
        return float(100.0 * wrong.mean())


def collect_gates(model: torch.nn.Module, dataset: Any, batch_size: int = 1000
                  ) -> GateRecord:
    """Run ``model`` over ``dataset`` and keep every layer's gate probabilities.

    The model runs in eval mode under ``torch.no_grad()`` (so a balancing
    constraint, active only in training, does not touch the gates); its
    previous train/eval mode is restored afterwards, even on error.

    Args:
        model: a module whose ``forward(x)`` returns an object with ``logits``
            ``(B, C)`` and ``gate_probs`` (a tuple with one ``(B, E_l)`` tensor
            or ``None`` per layer).
        dataset: an object with ``images``, ``labels``, ``shifts`` and
            ``inputs()`` returning the ``(N, 1296)`` float inputs.
        batch_size: examples per forward pass. Default: 1000.

    Shape:
        - ``dataset.inputs()``: ``(N, D)``.
        - Output ``gate_probs[l]``: ``(N, E_l)`` or ``None``.

    Returns:
        GateRecord: gates, labels, shifts, predictions and images as numpy.

    Example:
        >>> record = collect_gates(model, test_set)  # doctest: +SKIP
        >>> record.gated_layers  # doctest: +SKIP
        [0, 1]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    # Inputs go to the device and float dtype of the model's parameters
    inputs = dataset.inputs()
    if not isinstance(inputs, torch.Tensor):
        inputs = torch.as_tensor(np.asarray(inputs))
    if inputs.ndim != 2 or inputs.shape[0] == 0:
        raise ValueError(
            f"dataset.inputs() must have shape (N, D) with N >= 1, "
            f"got {tuple(inputs.shape)}"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() \
        else torch.float32

    # Forward in batches with the model in eval mode, then restore its mode
    was_training = model.training
    gate_batches: list[list[np.ndarray]] | None = None
    has_gate: list[bool] = []
    prediction_batches = []
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                x = inputs[start:start + batch_size].to(device=device, dtype=dtype)
                out = model(x)
                prediction_batches.append(out.logits.argmax(dim=1).cpu().numpy())
                layer_probs = list(out.gate_probs)
                if gate_batches is None:
                    has_gate = [p is not None for p in layer_probs]
                    gate_batches = [[] for _ in layer_probs]
                if [p is not None for p in layer_probs] != has_gate:
                    raise RuntimeError(
                        "model returned a different set of gated layers in "
                        "different batches"
                    )
                for store, probs in zip(gate_batches, layer_probs):
                    if probs is not None:
                        store.append(probs.detach().double().cpu().numpy())
    finally:
        model.train(was_training)

    # Stack the batches: (N, E_l) per gated layer
    assert gate_batches is not None  # at least one batch ran
    gate_probs = [
        np.concatenate(store, axis=0) if gated else None
        for store, gated in zip(gate_batches, has_gate)
    ]
    return GateRecord(
        gate_probs=gate_probs,
        labels=_to_numpy(dataset.labels, "labels").astype(np.int64),
        shifts=_to_numpy(dataset.shifts, "shifts").astype(np.int64),
        predictions=np.concatenate(prediction_batches).astype(np.int64),
        images=_to_numpy(dataset.images, "images"),
    )


# ---------------------------------------------------------------------------
# Mean gate per translation, per class, per pair of experts (Figs. 2, 3, 5)
# ---------------------------------------------------------------------------


def gate_by_translation(gate_probs: Any, shifts: Any) -> np.ndarray:
    """Mean gate probability of each expert for each translation (Fig. 2, top).

    Args:
        gate_probs: ``(N, E)`` gate probabilities of one layer.
        shifts: ``(N, 2)`` integer shifts, ``dx`` in column 0, ``dy`` in
            column 1.

    Shape:
        - ``gate_probs``: ``(N, E)``; ``shifts``: ``(N, 2)``.
        - Output: ``(E, 9, 9)``; row ``r`` is
          ``dy = r - 4``, column ``c`` is ``dx = c - 4``.

    Returns:
        np.ndarray: float64 maps, NaN where no example has that shift.

    Example:
        >>> maps = gate_by_translation(np.array([[1.0, 0.0]]), np.array([[2, -1]]))
        >>> float(maps[0, -1 + 4, 2 + 4]), bool(np.isnan(maps[0, 0, 0]))
        (1.0, True)
    """
    gates = _gates(gate_probs)
    num_examples, num_experts = gates.shape
    shift_array = check_shifts(_to_numpy(shifts, "shifts"), num_examples)
    side = NUM_SHIFTS

    # Sum the gates and count the examples of each translation cell
    flat = shift_index(shift_array)  # (N,)
    sums = np.zeros((side * side, num_experts))  # (81, E)
    np.add.at(sums, flat, gates)
    counts = np.bincount(flat, minlength=side * side).astype(np.float64)  # (81,)

    # Mean per cell; empty cells become NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]  # (81, E)
    means[counts == 0] = np.nan
    return means.T.reshape(num_experts, side, side)  # (E, 9, 9)


def gate_by_class(gate_probs: Any, labels: Any, num_classes: int = 10) -> np.ndarray:
    """Mean gate probability of each expert for each class (Fig. 2, bottom).

    Args:
        gate_probs: ``(N, E)`` gate probabilities of one layer.
        labels: ``(N,)`` integer classes in ``[0, C)``.
        num_classes: the number of classes ``C``. Default: 10.

    Shape:
        - ``gate_probs``: ``(N, E)``; ``labels``: ``(N,)``.
        - Output: ``(E, C)``.

    Returns:
        np.ndarray: float64 matrix, NaN in the column of a class with no example.

    Example:
        >>> gate_by_class(np.array([[0.2, 0.8], [0.4, 0.6]]), np.array([1, 1]),
        ...               num_classes=2)
        array([[nan, 0.3],
               [nan, 0.7]])
    """
    gates = _gates(gate_probs)
    num_examples, num_experts = gates.shape
    label_vector = _int_vector(labels, "labels", num_examples)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_examples and (label_vector.min() < 0 or label_vector.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values from "
            f"{label_vector.min()} to {label_vector.max()}"
        )

    # Sum per class, then divide by the class counts
    sums = np.zeros((num_classes, num_experts))  # (C, E)
    np.add.at(sums, label_vector, gates)
    counts = np.bincount(label_vector, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]  # (C, E)
    means[counts == 0] = np.nan
    return means.T  # (E, C)


def joint_assignment(p1: Any, p2: Any, normalise_rows: bool = True) -> np.ndarray:
    """Mean product gate of each pair of experts in two layers (Fig. 5).

    Entry ``(i, j)`` is the mean over examples of ``g1_i(x) * g2_j(z1)``. With
    ``normalise_rows`` each row is divided by its sum, giving how a layer-1
    expert's inputs spread over the layer-2 experts; a row of zeros stays zero.
    Well-mixed rows mean every combination of experts is in use.

    Args:
        p1: ``(N, E1)`` gate probabilities of the first layer.
        p2: ``(N, E2)`` gate probabilities of the second layer.
        normalise_rows: divide each row by its sum. Default: ``True``.

    Shape:
        - ``p1``: ``(N, E1)``; ``p2``: ``(N, E2)``.
        - Output: ``(E1, E2)``.

    Returns:
        np.ndarray: float64 matrix; rows sum to 1 when normalised.

    Example:
        >>> joint_assignment(np.array([[1.0, 0.0]]), np.array([[0.25, 0.75]]))
        array([[0.25, 0.75],
               [0.  , 0.  ]])
    """
    gates1, gates2 = _pair(p1, p2)

    # Mean outer product over examples
    joint = gates1.T @ gates2 / max(len(gates1), 1)  # (E1, E2)

    # Optional row normalisation, leaving empty rows at zero
    if normalise_rows:
        row_sums = joint.sum(axis=1, keepdims=True)  # (E1, 1)
        joint = np.divide(joint, row_sums, out=np.zeros_like(joint),
                          where=row_sums > 0)
    return joint


def top_examples(p1: Any, p2: Any, k: int = 9) -> np.ndarray:
    """Indices of the ``k`` examples with the highest product gate per pair (Fig. 3).

    For every layer-1 expert ``i`` and layer-2 expert ``j``, the examples are
    ranked by ``g1_i(x) * g2_j(z1)``, highest first; ties go to the lower index,
    so the result is deterministic.

    Args:
        p1: ``(N, E1)`` gate probabilities of the first layer.
        p2: ``(N, E2)`` gate probabilities of the second layer.
        k: examples per pair, ``1 <= k <= N``. Default: 9.

    Shape:
        - ``p1``: ``(N, E1)``; ``p2``: ``(N, E2)``.
        - Output: ``(E1, E2, k)``.

    Returns:
        np.ndarray: int64 example indices.

    Example:
        >>> top_examples(np.array([[0.9, 0.1], [0.2, 0.8]]),
        ...              np.array([[1.0], [1.0]]), k=1)[:, 0, 0]
        array([0, 1])
    """
    gates1, gates2 = _pair(p1, p2)
    num_examples = len(gates1)
    if not 1 <= k <= num_examples:
        raise ValueError(f"k must be in [1, N={num_examples}], got {k}")

    # Product gate of every example for every pair
    product = gates1[:, :, None] * gates2[:, None, :]  # (N, E1, E2)

    # A stable sort of the negated products: descending, ties by lower index
    order = np.argsort(-product, axis=0, kind="stable")[:k]  # (k, E1, E2)
    return np.ascontiguousarray(order.transpose(1, 2, 0)).astype(np.int64)


def _pair(p1: Any, p2: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check two layers' gates over the same examples."""
    gates1, gates2 = _gates(p1, "p1"), _gates(p2, "p2")
    if len(gates1) != len(gates2):
        raise ValueError(
            f"p1 and p2 must cover the same examples, got p1 {gates1.shape} "
            f"and p2 {gates2.shape}"
        )
    return gates1, gates2


# ---------------------------------------------------------------------------
# Scores: how much does the expert choice say about a factor?
# ---------------------------------------------------------------------------


def _entropy(probs: np.ndarray) -> float:
    """Entropy in nats of a probability vector (zeros contribute nothing)."""
    positive = probs[probs > 0]
    return float(-(positive * np.log(positive)).sum())


def factorisation_score(gate_probs: Any, factor: Any, mode: str = "argmax") -> float:
    """Normalised mutual information ``I(F; Z) / H(Z)`` between a factor and experts.

    ``F`` is a discrete factor of each example (the translation index from
    :func:`shift_index`, or the class) and ``Z`` the expert of one layer. The
    score is 1 when the expert is a function of the factor (knowing the
    translation tells you the expert) and 0 when the two are independent.

    Two ways to turn gates into a joint distribution ``p(f, z)``:

    - ``"soft"``: ``p(f, z) = mean_x 1[F(x) = f] * g_z(x)``, the gate as a soft
      assignment. Trained gates stay soft (a mean top gate of 0.35-0.6 on
      jittered MNIST), so soft scores are small (0.04-0.26) even when the split
      is clear.
    - ``"argmax"``: ``Z = argmax_z g_z(x)`` (ties to the lower expert), a hard
      assignment; the score that shows the split.

    ``H(Z)`` is the entropy of the marginal expert distribution of the same
    mode. If ``H(Z)`` is 0 (below 1e-12: one expert takes everything) the
    score is undefined and **0.0 is returned**. Natural logarithms throughout.
    The score is computed as ``sum_f p(f) (1 - H(Z | F=f) / H(Z))``, so the
    perfectly factorised and the exactly independent cases give exactly 1.0 and
    0.0; rounding below 0 or above 1 is clipped.

    Limitations: this is a plug-in estimate with a positive finite-sample bias.
    With 81 translations and 1,000 examples the argmax score of an expert
    choice that ignores the translation is about 0.10, not 0: report it next
    to :func:`chance_score`.

    Args:
        gate_probs: ``(N, E)`` gate probabilities of one layer (rows summing
            to 1; the soft joint is renormalised to total mass 1).
        factor: ``(N,)`` integer factor values (any integers; only equality
            matters).
        mode: ``"argmax"`` or ``"soft"``. Default: ``"argmax"``.

    Shape:
        - ``gate_probs``: ``(N, E)``; ``factor``: ``(N,)``.

    Returns:
        float: the score in ``[0, 1]``.

    Example:
        >>> gates = np.eye(2)[[0, 0, 1, 1]]
        >>> factorisation_score(gates, np.array([5, 5, 7, 7]))
        1.0
        >>> factorisation_score(gates, np.array([5, 7, 5, 7]))
        0.0
    """
    _check_mode(mode)
    gates = _gates(gate_probs)
    num_examples, num_experts = gates.shape
    factor_vector = _int_vector(factor, "factor", num_examples)
    if num_examples == 0:
        raise ValueError("gate_probs must hold at least one example, got N = 0")

    # Joint mass of (factor value, expert): counts or summed gates
    _, factor_codes = np.unique(factor_vector, return_inverse=True)
    factor_codes = factor_codes.reshape(-1)  # (N,)
    num_values = int(factor_codes.max()) + 1
    if mode == "argmax":
        assignment = np.zeros_like(gates)  # (N, E) one-hot
        assignment[np.arange(num_examples), gates.argmax(axis=1)] = 1.0
    else:
        assignment = gates
    joint_mass = np.zeros((num_values, num_experts))  # (F, E)
    np.add.at(joint_mass, factor_codes, assignment)

    # Marginal expert entropy H(Z); a single used expert gives no score
    expert_mass = joint_mass.sum(axis=0)  # (E,)
    total_mass = expert_mass.sum()
    if total_mass <= 0:
        raise ValueError("gate_probs must have positive total mass")
    expert_entropy = _entropy(expert_mass / total_mass)
    if expert_entropy < 1e-12:
        return 0.0

    # I(F; Z) / H(Z) = sum_f p(f) * (1 - H(Z | F = f) / H(Z))
    value_mass = joint_mass.sum(axis=1)  # (F,)
    score = 0.0
    for f in np.flatnonzero(value_mass > 0):
        conditional = joint_mass[f] / value_mass[f]  # (E,) p(z | f)
        score += value_mass[f] * (1.0 - _entropy(conditional) / expert_entropy)
    score /= value_mass.sum()
    return float(min(max(score, 0.0), 1.0))


def chance_score(gate_probs: Any, factor: Any, mode: str = "argmax",
                 n_permutations: int = 20, seed: int = 0) -> float:
    """Score of :func:`factorisation_score` when the factor is shuffled.

    Randomly permuting the factor over the examples breaks any link to the
    experts while keeping both marginals, so the mean score over permutations
    is the level a finite test set reaches by chance (about 0.10 for 81
    translations on 1,000 examples in argmax mode).

    Args:
        gate_probs: ``(N, E)`` gate probabilities of one layer.
        factor: ``(N,)`` integer factor values.
        mode: ``"argmax"`` or ``"soft"``. Default: ``"argmax"``.
        n_permutations: number of random permutations. Default: 20.
        seed: seed of the ``numpy.random.Generator``. Default: 0.

    Shape:
        - ``gate_probs``: ``(N, E)``; ``factor``: ``(N,)``.

    Returns:
        float: the mean permuted score, deterministic for a given seed.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> gates = rng.dirichlet(np.ones(4), size=1000)
        >>> chance_score(gates, rng.integers(0, 81, size=1000)) < 0.2
        True
    """
    _check_mode(mode)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    gates = _gates(gate_probs)
    factor_vector = _int_vector(factor, "factor", len(gates))

    # Average the score over seeded shuffles of the factor
    rng = np.random.default_rng(seed)
    scores = [
        factorisation_score(gates, rng.permutation(factor_vector), mode=mode)
        for _ in range(n_permutations)
    ]
    return float(np.mean(scores))


def expert_usage(gate_probs: Any) -> dict[str, np.ndarray]:
    """How much each expert is used, softly and by argmax.

    Args:
        gate_probs: ``(N, E)`` gate probabilities of one layer.

    Shape:
        - Input: ``(N, E)``.
        - Output: two ``(E,)`` arrays.

    Returns:
        dict: ``soft``, the mean gate per expert, and ``argmax``, the share of
        examples whose largest gate is each expert (ties to the lower expert).

    Example:
        >>> usage = expert_usage(np.array([[0.6, 0.4], [0.2, 0.8]]))
        >>> usage["soft"], usage["argmax"]
        (array([0.4, 0.6]), array([0.5, 0.5]))
    """
    gates = _gates(gate_probs)
    num_examples, num_experts = gates.shape
    if num_examples == 0:
        raise ValueError("gate_probs must hold at least one example, got N = 0")
    winners = np.bincount(gates.argmax(axis=1), minlength=num_experts)  # (E,)
    return {"soft": gates.mean(axis=0), "argmax": winners / num_examples}


def where_what_scores(record: GateRecord, n_permutations: int = 20, seed: int = 0
                      ) -> dict[str, dict[str, Any]]:
    """Translation ("where") and class ("what") scores of every gated layer.

    Keys are ``"layer1"``, ``"layer2"``, ... counting the **gated** layers from
    1 in model order (a concat or plain layer gets no key); each value holds
    ``model_layer``, the layer's index in ``record.gate_probs``.

    Args:
        record: the output of :func:`collect_gates`.
        n_permutations: permutations for the chance level. Default: 20.
        seed: seed of the chance level's permutations. Default: 0.

    Returns:
        dict: for each gated layer ``{"model_layer": int, "translation":
        {"soft", "argmax", "chance"}, "class": {"soft", "argmax", "chance"},
        "usage": {"soft": list, "argmax": list}}``; ``chance`` is the argmax
        chance level from :func:`chance_score`. Plain Python numbers, so the
        result can be written with ``json.dump``.

    Example:
        >>> scores = where_what_scores(record)  # doctest: +SKIP
        >>> scores["layer1"]["translation"]["argmax"]  # doctest: +SKIP
        0.52
    """
    if not record.gated_layers:
        raise ValueError("record has no gated layer: every gate_probs entry is None")
    factors = {
        "translation": shift_index(record.shifts),  # (N,) in [0, 81)
        "class": _to_numpy(record.labels, "labels").astype(np.int64),  # (N,)
    }

    # One block of scores per gated layer
    scores: dict[str, dict[str, Any]] = {}
    for position, layer in enumerate(record.gated_layers, start=1):
        gates = _gates(record.gate_probs[layer], f"gate_probs[{layer}]")
        entry: dict[str, Any] = {"model_layer": int(layer)}
        for name, factor in factors.items():
            entry[name] = {
                "soft": factorisation_score(gates, factor, mode="soft"),
                "argmax": factorisation_score(gates, factor, mode="argmax"),
                "chance": chance_score(gates, factor, mode="argmax",
                                       n_permutations=n_permutations, seed=seed),
            }
        usage = expert_usage(gates)
        entry["usage"] = {key: [float(v) for v in usage[key]] for key in usage}
        scores[f"layer{position}"] = entry
    return scores
