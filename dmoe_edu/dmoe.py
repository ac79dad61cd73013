"""The Deep Mixture of Experts: stacked mixture layers and a final linear layer.

    z1 = sum_i g1_i(x)  f1_i(x)
    z2 = sum_j g2_j(z1) f2_j(z1)
    y  = softmax(W3 z2 + b3)

Each layer's gate reads that layer's input, so with ``N`` experts in layer 1 and
``M`` in layer 2 an input takes one of ``N * M`` expert combinations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .balance import MarginConstraint, check_margin
from .gating import _check_positive
from .moe import ConcatLayer, MixtureLayer


class ModelOutput(NamedTuple):
    """What every model of the package returns.

    Attributes:
        logits: class scores before the softmax, ``(B, C)``.
        gate_probs: one entry per hidden layer: the ``(B, E)`` gate
            probabilities of a mixture layer, or ``None`` for a layer with no
            gate (a concat layer or a plain fully connected layer).
    """

    logits: Tensor
    gate_probs: tuple[Tensor | None, ...]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One hidden layer of a :class:`DeepMoE`.

    Args:
        num_experts: experts ``E`` in the layer (1 gives a single expert, no gate).
        width: expert width ``H``.
        gate_hidden: hidden width of the two-layer ReLU gate, or ``None`` for a
            linear gate. Default: 50.
        kind: ``"mix"`` (a mixture layer) or ``"concat"`` (expert outputs
            concatenated, no gate). Default: ``"mix"``.
    """

    num_experts: int
    width: int
    gate_hidden: int | None = 50
    kind: str = "mix"

    def __post_init__(self) -> None:
        # Store plain ints (np.int64 is accepted), so configs stay JSON-friendly.
        sizes = {"num_experts": self.num_experts, "width": self.width}
        if self.gate_hidden is not None:
            sizes["gate_hidden"] = self.gate_hidden
        for name, value in zip(sizes, _check_positive(**sizes)):
            object.__setattr__(self, name, value)
        if self.kind not in ("mix", "concat"):
            raise ValueError(f"kind must be 'mix' or 'concat', got {self.kind!r}")


class DeepMoE(nn.Module):
    """A stack of mixture layers of any depth, then a linear layer to ``C`` classes.

    Args:
        input_dim: input width ``D`` (1296 for a 36x36 jittered digit).
        layers: one :class:`LayerSpec` (or a dict of its fields) per layer ``L``.
        num_classes: number of classes ``C``. Default: 10.
        margin: margin ``m`` of every gated layer's balancing constraint, in
            examples of gate mass. It only acts in training mode while switched
            on (see :meth:`set_balance`; :func:`~dmoe_edu.train.train` does it
            for the constrained phase). Default: 100.

    Shape:
        - Input: ``(B, D)``, float32 (or the dtype of the parameters).
        - Output: :class:`ModelOutput` with ``logits`` ``(B, C)`` and one
          ``gate_probs`` entry ``(B, E_L)`` per layer.

    Example:
        >>> model = DeepMoE(1296, [LayerSpec(4, 100, 50), LayerSpec(4, 100, 50)])
        >>> model.num_parameters()
        630518
        >>> out = model(torch.rand(2, 1296))
        >>> out.logits.shape, [tuple(g.shape) for g in out.gate_probs]
        (torch.Size([2, 10]), [(2, 4), (2, 4)])
    """

    def __init__(
        self,
        input_dim: int,
        layers: Sequence[LayerSpec | dict],
        num_classes: int = 10,
        margin: float = 100.0,
    ) -> None:
        super().__init__()
        input_dim, num_classes = _check_positive(
            input_dim=input_dim, num_classes=num_classes
        )
        specs = [s if isinstance(s, LayerSpec) else LayerSpec(**s) for s in layers]
        if not specs:
            raise ValueError("layers must hold at least one LayerSpec, got none")
        self.input_dim = input_dim
        self.num_classes = num_classes
        self.specs = tuple(specs)
        self.margin = check_margin(margin)

        # Each layer reads the previous layer's output width.
        self.layers = nn.ModuleList()
        width = input_dim
        for spec in specs:
            if spec.kind == "concat":
                layer = ConcatLayer(width, spec.width, spec.num_experts)
            else:
                layer = MixtureLayer(
                    width, spec.width, spec.num_experts, spec.gate_hidden, margin
                )
            self.layers.append(layer)
            width = layer.out_dim
        self.head = nn.Linear(width, num_classes)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model with :func:`build_model`."""
        return {
            "type": "DeepMoE",
            "input_dim": self.input_dim,
            "layers": [dataclasses.asdict(s) for s in self.specs],
            "num_classes": self.num_classes,
            "margin": self.margin,
        }

    def forward(self, x: Tensor) -> ModelOutput:
        check_input(x, self.input_dim, self.head.weight.dtype)

        # Every layer returns its output and its gate probabilities (or None).
        gate_probs = []
        hidden = x
        for layer in self.layers:
            hidden, probs = layer(hidden)
            gate_probs.append(probs)
        return ModelOutput(self.head(hidden), tuple(gate_probs))

    def constraints(self) -> list[MarginConstraint]:
        """The balancing constraint of every gated layer, in layer order."""
        return [m for m in self.modules() if isinstance(m, MarginConstraint)]

    def set_balance(
        self, enabled: bool, margin: float | None = None, reset: bool = False
    ) -> None:
        """Switch every layer's balancing constraint on or off.

        Args:
            enabled: whether the constraint masks experts in training mode.
            margin: if given, the new margin ``m`` of every layer's constraint
                (the margin this model was built with stays in :attr:`config`).
            reset: forget the running totals, as at the start of a constrained
                phase. Default: False.
        """
        if margin is not None:
            margin = check_margin(margin)
        for constraint in self.constraints():
            if margin is not None:
                constraint.margin = margin
            if reset:
                constraint.reset()
            constraint.enabled = enabled

    def num_parameters(self) -> int:
        """Number of trainable parameters, gates included."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class DNN(nn.Module):
    """A plain fully connected ReLU network: the paper's parameter-matched baseline.

    Args:
        input_dim: input width ``D``.
        hidden: widths of the hidden layers.
        num_classes: number of classes ``C``. Default: 10.

    Shape:
        - Input: ``(B, D)``.
        - Output: :class:`ModelOutput` with ``logits`` ``(B, C)`` and a
          ``gate_probs`` entry of ``None`` per hidden layer.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int = 10):
        super().__init__()
        input_dim, num_classes = _check_positive(
            input_dim=input_dim, num_classes=num_classes
        )
        self.input_dim = input_dim
        self.hidden = tuple(_check_positive(hidden_width=width)[0] for width in hidden)
        self.num_classes = num_classes
        widths = [input_dim, *self.hidden]
        self.layers = nn.ModuleList(
            nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model with :func:`build_model`."""
        return {
            "type": "DNN",
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "num_classes": self.num_classes,
        }

    def forward(self, x: Tensor) -> ModelOutput:
        check_input(x, self.input_dim, self.head.weight.dtype)
        hidden = x
        for layer in self.layers:
            hidden = torch.relu(layer(hidden))
        return ModelOutput(self.head(hidden), (None,) * len(self.layers))

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``config`` (as stored in checkpoints).

    Raises:
        ValueError: if ``config["type"]`` names no model of the package.
    """
    kwargs = dict(config)
    kind = kwargs.pop("type", None)
    if kind == "DeepMoE":
        return DeepMoE(**kwargs)
    if kind == "DNN":
        return DNN(**kwargs)
    raise ValueError(f"config type must be 'DeepMoE' or 'DNN', got {kind!r}")


def check_input(x: Tensor, input_dim: int, dtype: torch.dtype) -> None:
    """Raise a clear error unless ``x`` is a non-empty ``(B, input_dim)`` batch."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != input_dim:
        raise ValueError(
            f"input must have shape (B, {input_dim}), got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("input batch is empty (B = 0); pass at least one example")
    if x.dtype != dtype:
        raise TypeError(
            f"input dtype must match the model's parameters ({dtype}), got {x.dtype}; "
            "convert images with dataset.inputs() or x.to(dtype)"
        )
