"""The paper's baselines, built from the same layer specs as the DMoE.

* **Single Expert**: the last layer is one expert and has no gate.
* **Concat Layer2**: the last layer's expert outputs are concatenated, not
  mixed (no gate), so the head sees ``E * H`` features.
* **DNN**: fully connected, with the DMoE's last hidden width and its first
  hidden layer widened until the parameter count matches the DMoE's, gates
  included.
* **One-layer mixture**: one mixture layer, then the linear head. For it the
  Single and Concat baselines change layer 1, its only layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from .dmoe import DNN, DeepMoE, LayerSpec
from .paper import JITTERED_INPUT_DIM

#: Model kinds understood by :func:`build_baseline`.
KINDS = ("single", "dmoe", "concat", "dnn")


def single_expert(layers: Sequence[LayerSpec], **kwargs) -> DeepMoE:
    """The DMoE with its last layer replaced by one expert of the same width ``H``."""
    first, last = _split_last(layers)
    return DeepMoE(layers=[*first, LayerSpec(1, last.width)], **_defaults(kwargs))


def concat_last(layers: Sequence[LayerSpec], **kwargs) -> DeepMoE:
    """The DMoE with its last layer's experts concatenated instead of mixed."""
    first, last = _split_last(layers)
    concat = LayerSpec(last.num_experts, last.width, None, kind="concat")
    return DeepMoE(layers=[*first, concat], **_defaults(kwargs))


def one_layer(num_experts: int = 4, width: int = 100, gate_hidden: int = 50,
              **kwargs) -> DeepMoE:
    """The paper's one-layer mixture: one mixture layer, then the linear head."""
    return DeepMoE(layers=[LayerSpec(num_experts, width, gate_hidden)],
                   **_defaults(kwargs))


def matched_dnn_width(target_params: int, input_dim: int, last_width: int,
                      num_classes: int = 10) -> int:
    """First hidden width of a 2-hidden-layer DNN with about ``target_params``.

    The DNN ``D -> h1 -> H -> C`` has ``(D + 1) h1 + (h1 + 1) H + (H + 1) C``
    parameters; this solves for ``h1`` and rounds to the nearest integer.

    Raises:
        ValueError: if even ``h1 = 1`` exceeds ``target_params``.
    """
    fixed = last_width + (last_width + 1) * num_classes
    h1 = round((target_params - fixed) / (input_dim + 1 + last_width))
    if h1 < 1:
        raise ValueError(
            f"no DNN with last width {last_width} fits {target_params} parameters"
        )
    return h1


def matched_dnn(dmoe: DeepMoE) -> DNN:
    """A DNN with ``dmoe``'s last hidden width and (nearly) its parameter count.

    Raises:
        ValueError: if ``dmoe`` has fewer than two layers (the paper defines no
            DNN for the one-layer model).
    """
    if len(dmoe.specs) < 2:
        raise ValueError(
            f"the matched DNN needs a DMoE of >= 2 layers, got {len(dmoe.specs)}"
        )
    last_width = dmoe.layers[-1].out_dim
    h1 = matched_dnn_width(
        dmoe.num_parameters(), dmoe.input_dim, last_width, dmoe.num_classes
    )
    return DNN(dmoe.input_dim, [h1, last_width], dmoe.num_classes)


def build_baseline(kind: str, layers: Sequence[LayerSpec], **kwargs):
    """Build the model of one Table 1 column for the given DMoE layers.

    Args:
        kind: one of :data:`KINDS`.
        layers: the DMoE's layer specs.
        **kwargs: passed to :class:`~dmoe_edu.dmoe.DeepMoE` (``input_dim``
            defaults to 1296, ``num_classes`` to 10, ``margin``).

    Example:
        >>> from dmoe_edu.paper import TABLE1
        >>> build_baseline("dnn", TABLE1[1].layers).hidden
        (451, 100)
    """
    if kind == "dmoe":
        return DeepMoE(layers=list(layers), **_defaults(kwargs))
    if kind == "single":
        return single_expert(layers, **kwargs)
    if kind == "concat":
        return concat_last(layers, **kwargs)
    if kind == "dnn":
        return matched_dnn(DeepMoE(layers=list(layers), **_defaults(kwargs)))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _split_last(layers: Sequence[LayerSpec | dict]
                ) -> tuple[list[LayerSpec], LayerSpec]:
    """All layers but the last, and the last, as :class:`LayerSpec` objects."""
    specs = [s if isinstance(s, LayerSpec) else LayerSpec(**s) for s in layers]
    if not specs:
        raise ValueError("layers must hold at least one LayerSpec, got none")
    return specs[:-1], specs[-1]


def _defaults(kwargs: dict) -> dict:
    return {"input_dim": JITTERED_INPUT_DIM, **kwargs}
