"""Gates, experts, mixture layers, the Deep MoE and the baselines."""

import json

import numpy as np
import pytest
import torch

from dmoe_edu.balance import MarginConstraint
from dmoe_edu.baselines import (
    KINDS,
    build_baseline,
    concat_last,
    matched_dnn,
    matched_dnn_width,
    single_expert,
)
from dmoe_edu.dmoe import DNN, DeepMoE, LayerSpec, build_model
from dmoe_edu.experts import ExpertLayer
from dmoe_edu.gating import LinearGate, ReLUGate
from dmoe_edu.moe import ConcatLayer, MixtureLayer
from dmoe_edu.paper import TABLE1


@pytest.mark.parametrize(
    "layers, expected",
    [
        ([LayerSpec(4, 100, 50), LayerSpec(4, 100, 50)], 630_518),
        ([LayerSpec(4, 50, 20), LayerSpec(4, 20, 20)], 290_818),
    ],
)
def test_paper_parameter_counts(layers, expected):
    assert DeepMoE(1296, layers).num_parameters() == expected


def test_paper_rows_build_with_the_paper_sizes():
    assert DeepMoE(1296, TABLE1[1].layers).num_parameters() == 630_518
    assert DeepMoE(1296, TABLE1[4].layers).num_parameters() == 290_818


def naive_dmoe_forward(model: DeepMoE, x: torch.Tensor) -> torch.Tensor:
    """The paper's equations with a Python loop over experts, in float64."""
    hidden = x.double()
    for layer in model.layers:
        W = layer.experts.weight.double()
        b = layer.experts.bias.double()
        outputs = [torch.relu(hidden @ W[e].T + b[e]) for e in range(W.shape[0])]
        if isinstance(layer, ConcatLayer):
            hidden = torch.cat(outputs, dim=1)
            continue
        if layer.gate is None:
            hidden = outputs[0]
            continue
        A, a = layer.gate.hidden_layer.weight.double(), layer.gate.hidden_layer.bias
        Bw, bb = layer.gate.out.weight.double(), layer.gate.out.bias.double()
        scores = torch.relu(hidden @ A.T + a.double()) @ Bw.T + bb
        gates = torch.exp(scores) / torch.exp(scores).sum(1, keepdim=True)
        hidden = sum(gates[:, e : e + 1] * outputs[e] for e in range(len(outputs)))
    head = model.head
    return hidden @ head.weight.double().T + head.bias.double()


@pytest.mark.parametrize(
    "layers",
    [
        [LayerSpec(4, 7, 5), LayerSpec(3, 6, 4)],
        [LayerSpec(3, 5, 4), LayerSpec(1, 6)],
        [LayerSpec(2, 5, 3), LayerSpec(3, 4, kind="concat")],
        [LayerSpec(5, 9, 3)],
        [LayerSpec(2, 4, 3), LayerSpec(2, 4, 3), LayerSpec(3, 5, 2)],
    ],
)
def test_forward_and_gradients_match_a_float64_loop(layers):
    torch.manual_seed(0)
    model = DeepMoE(13, layers, num_classes=4)
    x = torch.rand(11, 13)
    y = torch.randint(0, 4, (11,))

    # The library in float32 ...
    logits = model(x).logits
    torch.nn.functional.cross_entropy(logits, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # ... against the naive equations in float64, through the same parameters.
    ref_logits = naive_dmoe_forward(model, x)
    torch.nn.functional.cross_entropy(ref_logits, y).backward()
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_gradcheck_whole_model_float64():
    torch.manual_seed(1)
    model = DeepMoE(6, [LayerSpec(3, 4, 3), LayerSpec(2, 3, None)], num_classes=3)
    model.double()
    x = torch.rand(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: model(z).logits, (x,))


def test_gate_rows_sum_to_one_and_shapes():
    torch.manual_seed(0)
    model = DeepMoE(1296, [LayerSpec(4, 10, 5), LayerSpec(3, 8, None)])
    out = model(torch.rand(9, 1296))
    assert out.logits.shape == (9, 10)
    for gate_probs, E in zip(out.gate_probs, (4, 3)):
        assert gate_probs.shape == (9, E)
        torch.testing.assert_close(gate_probs.sum(1), torch.ones(9))
        assert (gate_probs >= 0).all()


def test_single_expert_layer_has_no_gate():
    layer = MixtureLayer(5, 3, num_experts=1)
    x = torch.rand(4, 5)
    mixed, gate_probs = layer(x)
    assert layer.gate is None and gate_probs.tolist() == [[1.0]] * 4
    torch.testing.assert_close(mixed, layer.experts(x)[:, 0])


def test_expert_layer_equals_a_loop_of_linear_layers():
    torch.manual_seed(0)
    experts = ExpertLayer(8, 5, 3)
    x = torch.randn(6, 8)
    out = experts(x)
    for e in range(3):
        torch.testing.assert_close(out[:, e], torch.relu(x @ experts.weight[e].T
                                                         + experts.bias[e]))


def test_gates_shapes_and_parameter_counts():
    assert LinearGate(10, 4)(torch.rand(3, 10)).shape == (3, 4)
    gate = ReLUGate(100, 4, hidden=50)
    assert gate(torch.rand(3, 100)).shape == (3, 4)
    assert sum(p.numel() for p in gate.parameters()) == 100 * 50 + 50 + 50 * 4 + 4


def test_baselines_follow_the_paper():
    layers = TABLE1[1].layers
    dmoe = build_baseline("dmoe", layers)
    single = build_baseline("single", layers)
    concat = build_baseline("concat", layers)
    dnn = build_baseline("dnn", layers)

    # Single: layer 2 is one expert of width 100 and has no gate.
    assert single.layers[1].num_experts == 1 and single.layers[1].gate is None
    assert single(torch.rand(2, 1296)).gate_probs[1].shape == (2, 1)
    # Concat: layer 2's four experts feed the head side by side.
    assert isinstance(concat.layers[1], ConcatLayer)
    assert concat.head.in_features == 400
    assert concat(torch.rand(2, 1296)).gate_probs[1] is None
    # DNN: last hidden width 100, first widened to match the parameter count.
    assert dnn.hidden[1] == 100
    assert abs(dnn.num_parameters() - dmoe.num_parameters()) <= 1297 + 100
    assert set(KINDS) == {"single", "dmoe", "concat", "dnn"}


def test_matched_dnn_width_is_the_best_integer():
    target = 630_518
    h1 = matched_dnn_width(target, 1296, 100)

    def count(h):
        return DNN(1296, [h, 100]).num_parameters()

    assert abs(count(h1) - target) <= min(abs(count(h1 - 1) - target),
                                          abs(count(h1 + 1) - target))


def test_matched_dnn_needs_two_layers():
    with pytest.raises(ValueError, match=">= 2 layers, got 1"):
        matched_dnn(DeepMoE(1296, TABLE1[5].layers))


def test_build_model_round_trips_configs():
    for model in (DeepMoE(20, [LayerSpec(3, 4, None), LayerSpec(2, 5, kind="concat")],
                          num_classes=3, margin=7),
                  DNN(20, [9, 4], num_classes=3)):
        rebuilt = build_model(model.config)
        assert rebuilt.config == model.config
        assert type(rebuilt) is type(model)
    with pytest.raises(ValueError, match="config type"):
        build_model({"type": "Transformer"})


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.rand(4, 784), ValueError, r"shape \(B, 1296\), got \(4, 784\)"),
        (torch.rand(0, 1296), ValueError, "empty"),
        (torch.rand(4, 1296, dtype=torch.float64), TypeError, "dtype"),
        (torch.zeros(4, 1296, dtype=torch.uint8), TypeError, "dtype"),
        (torch.rand(1296), ValueError, r"got \(1296,\)"),
    ],
)
def test_bad_batches_are_named(x, error, words):
    model = DeepMoE(1296, TABLE1[4].layers)
    with pytest.raises(error, match=words):
        model(x)
    with pytest.raises(error, match=words):
        DNN(1296, [5, 5])(x)


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: MixtureLayer(10, 5, num_experts=0),
         "num_experts must be an integer >= 1, got 0"),
        (lambda: ExpertLayer(10, 0, 2), "width must be an integer >= 1, got 0"),
        (lambda: LayerSpec(0, 10), "num_experts must be an integer >= 1, got 0"),
        (lambda: LayerSpec(2, 10, kind="sum"), "kind must be"),
        (lambda: DeepMoE(10, []), "at least one"),
        (lambda: DeepMoE(10, [LayerSpec(2, 3)], margin=-1), "margin must be >= 0"),
        (lambda: ReLUGate(10, 2, hidden=0), "hidden must be"),
    ],
)
def test_bad_sizes_are_named(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_numpy_integer_sizes_are_accepted_and_stored_as_int():
    spec = LayerSpec(np.int64(4), np.int32(10), np.int64(5))
    assert spec == LayerSpec(4, 10, 5)
    assert [type(v) for v in (spec.num_experts, spec.width, spec.gate_hidden)] \
        == [int, int, int]

    model = DeepMoE(np.int64(20), [spec, LayerSpec(np.int16(2), 3)],
                    num_classes=np.int64(3))
    json.dumps(model.config)  # plain ints all the way down
    assert model(torch.rand(2, 20)).logits.shape == (2, 3)

    dnn = DNN(np.int64(20), [np.int64(7), 4], num_classes=np.uint8(3))
    json.dumps(dnn.config)
    assert dnn.hidden == (7, 4) and type(dnn.hidden[0]) is int
    assert type(ExpertLayer(np.int64(5), 3, 2).in_dim) is int
    assert type(ReLUGate(5, np.int64(2), hidden=np.int64(4)).hidden) is int
    assert type(LinearGate(np.int64(5), 2).in_dim) is int


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: LayerSpec(True, 10), "num_experts must be an integer >= 1, got True"),
        (lambda: LayerSpec(4.0, 10), "num_experts must be an integer >= 1, got 4.0"),
        (lambda: LayerSpec("4", 10), "num_experts must be an integer >= 1, got '4'"),
        (lambda: LayerSpec(4, 10, np.float64(5)), "gate_hidden must be an integer"),
        (lambda: DeepMoE(10.0, [LayerSpec(2, 3)]), "input_dim must be an integer"),
        (lambda: DNN(10, [2.5]), "hidden_width must be an integer >= 1, got 2.5"),
        (lambda: MarginConstraint(False), "num_experts must be an integer >= 1"),
    ],
)
def test_non_integer_sizes_are_named(build, words):
    with pytest.raises(ValueError, match=words):
        build()


@pytest.mark.parametrize("build", [single_expert, concat_last])
def test_baselines_of_no_layers_are_named(build):
    with pytest.raises(ValueError, match="at least one LayerSpec, got none"):
        build([])
    with pytest.raises(ValueError, match="at least one LayerSpec, got none"):
        build_baseline(build.__name__.split("_")[0], [])
