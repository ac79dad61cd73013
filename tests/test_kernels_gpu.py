"""The cupy backend on a real GPU: the reference's contract, strides and dtypes,
big batches, streams. Every test is skipped, with the reason, without CUDA + CuPy."""

import numpy as np
import pytest
import torch

from dmoe_edu import ops
from dmoe_edu.ops import cupy_backend, reference
from dmoe_edu.ops.kernels import launch_shape
from dmoe_edu.ops.selfcheck import check_backend

REASON = cupy_backend.status()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no GPU backend: {REASON}")

CUDA = torch.device("cuda")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float64: dict(rtol=1e-9, atol=1e-9)}


def on_cupy(fn, *args):
    with ops.use_backend("cupy"):
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, E, H", [(1, 1, 1), (300, 64, 600), (257, 4, 100),
                                     (1000, 16, 513)])
def test_same_contract_as_reference(B, E, H, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(B + E + H)
    logits = torch.randn(B, E, device=CUDA, dtype=dtype, generator=gen) * 3
    logits[0] = 1e4
    mask = torch.rand(B, E, device=CUDA, generator=gen) < 0.6
    mask[torch.arange(B), torch.randint(E, (B,), device=CUDA, generator=gen)] = True
    expert_out = torch.randn(B, E, H, device=CUDA, dtype=dtype, generator=gen)
    logits.requires_grad_(True)
    expert_out.requires_grad_(True)

    def run(backend):
        with ops.use_backend(backend):
            probs = ops.softmax_gate(logits, mask)
            mixed = ops.combine(probs, expert_out)
            grads = torch.autograd.grad(mixed.square().sum(), (logits, expert_out))
        return probs, mixed, *grads

    for got, want in zip(run("cupy"), run("reference")):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_auto_picks_cupy_for_cuda_tensors():
    assert ops.get_backend() == "auto"
    assert ops.resolve_backend(torch.zeros(1, device=CUDA)) == "cupy"
    assert ops.resolve_backend(torch.zeros(1)) == "reference"


def test_gradcheck_float64():
    gen = torch.Generator(device=CUDA).manual_seed(0)
    logits = torch.randn(6, 5, device=CUDA, dtype=torch.float64, generator=gen)
    mask = torch.rand(6, 5, device=CUDA, generator=gen) < 0.7
    mask[:, 0] = True
    gates = torch.softmax(torch.randn_like(logits), dim=1)
    expert_out = torch.randn(6, 5, 7, device=CUDA, dtype=torch.float64, generator=gen)

    with ops.use_backend("cupy"), launch_shape(block=4, max_blocks=3):
        assert torch.autograd.gradcheck(lambda x: ops.softmax_gate(x, mask),
                                        (logits.requires_grad_(),))
        assert torch.autograd.gradcheck(
            ops.combine, (gates.requires_grad_(), expert_out.requires_grad_()))


def test_strided_inputs_are_copied_not_misread():
    logits = torch.randn(8, 6, device=CUDA).t()  # (6, 8), strided
    expert_out = torch.randn(8, 5, 6, device=CUDA).transpose(0, 1)  # (5, 8, 6)
    gates = torch.softmax(torch.randn(8, 5, device=CUDA), dim=0).t()  # (5, 8)
    torch.testing.assert_close(on_cupy(ops.softmax_gate, logits),
                               reference.softmax_gate(logits, None))
    torch.testing.assert_close(on_cupy(ops.combine, gates, expert_out),
                               reference.combine(gates, expert_out))

    # A mask broadcast from one row of experts.
    row = torch.tensor([True, False, True, True, False, True, True, True], device=CUDA)
    probs = on_cupy(ops.softmax_gate, logits, row)
    torch.testing.assert_close(probs, reference.softmax_gate(logits, row.expand(6, 8)))


def test_wrong_dtypes_and_devices_are_rejected():
    half = torch.zeros(2, 3, device=CUDA, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32 or float64"):
        on_cupy(ops.softmax_gate, half)
    with pytest.raises(TypeError, match="share a dtype"):
        on_cupy(ops.combine, torch.zeros(2, 3, device=CUDA),
                torch.zeros(2, 3, 4, device=CUDA, dtype=torch.float64))
    with pytest.raises(ValueError, match="CUDA tensors"):
        on_cupy(ops.softmax_gate, torch.zeros(2, 3))

    # The raw kernel checks what the ops would have converted.
    kernel = cupy_backend._backend.kernel("combine", "combine_fwd_f32", CUDA)
    g, x, out = (torch.ones(2, 3, device=CUDA), torch.ones(2, 3, 4, device=CUDA),
                 torch.empty(2, 4, device=CUDA))
    sizes = (np.int64(2), np.int64(3), np.int64(4))
    with pytest.raises(ValueError, match="must be contiguous"):
        kernel((1,), (32,), (g, x.transpose(1, 2), out, *sizes))
    with pytest.raises(TypeError, match="float32, got torch.float64"):
        kernel((1,), (32,), (g.double(), x, out, *sizes))
    with pytest.raises(ValueError, match="compiled for cuda"):
        kernel((1,), (32,), (g.cpu(), x, out, *sizes))
    kernel((1,), (32,), (g, x, out, *sizes))
    torch.testing.assert_close(out, torch.full((2, 4), 3.0, device=CUDA))


def test_empty_inputs_launch_nothing(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("an empty input must not launch a kernel")

    monkeypatch.setattr(cupy_backend._backend, "launch", no_launch)
    assert on_cupy(ops.softmax_gate, torch.zeros(0, 4, device=CUDA)).shape == (0, 4)
    mixed = on_cupy(ops.combine, torch.zeros(0, 4, device=CUDA),
                    torch.zeros(0, 4, 3, device=CUDA))
    assert mixed.shape == (0, 3)


def test_seventy_thousand_rows_and_bitwise_repeats():
    gen = torch.Generator(device=CUDA).manual_seed(3)
    logits = torch.randn(70_000, 16, device=CUDA, generator=gen)
    expert_out = torch.randn(70_000, 16, 128, device=CUDA, generator=gen)
    probs = on_cupy(ops.softmax_gate, logits)
    mixed = on_cupy(ops.combine, probs, expert_out)
    torch.testing.assert_close(probs, reference.softmax_gate(logits, None))
    torch.testing.assert_close(mixed, reference.combine(probs, expert_out),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(on_cupy(ops.softmax_gate, logits), probs)
    assert torch.equal(on_cupy(ops.combine, probs, expert_out), mixed)


def test_side_stream_work_is_ordered():
    # The input is produced on a side stream by a long chain of kernels, and consumed
    # there at once: launched anywhere but torch's current stream, the kernel would
    # read the input before it is finished.
    side = torch.cuda.Stream()
    base = torch.randn(4096, 16, device=CUDA)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        logits = base.clone()
        for _ in range(200):
            logits = logits * 1.001 + 0.001
        probs = on_cupy(ops.softmax_gate, logits)
    side.synchronize()
    expected = base.clone()
    for _ in range(200):
        expected = expected * 1.001 + 0.001
    torch.testing.assert_close(probs, torch.softmax(expected, dim=1))


def test_self_check_passes():
    checks = check_backend("cupy")
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_degenerate_rows_and_row_masks():
    # Masked experts are exactly 0 even in a row whose allowed logits are all -inf;
    # a (1, E) mask broadcasts like an (E,) one.
    inf = float("inf")
    logits = torch.tensor([[-inf, -inf, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]], device=CUDA)
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]],
                        device=CUDA)
    probs = on_cupy(ops.softmax_gate, logits, mask)
    torch.testing.assert_close(probs, reference.softmax_gate(logits, mask),
                               equal_nan=True)
    assert (probs[~mask] == 0).all()
    row = mask[1:]
    torch.testing.assert_close(on_cupy(ops.softmax_gate, logits[1:].expand(3, 4), row),
                               reference.softmax_gate(logits[1:].expand(3, 4), row))


def test_second_derivatives_raise():
    logits = torch.randn(4, 3, device=CUDA, dtype=torch.float64, requires_grad=True)
    with ops.use_backend("cupy"):
        probs = ops.softmax_gate(logits)
        (grad,) = torch.autograd.grad(probs[:, 0].sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="cupy backend's backward of softmax_gate "
                                           "is first order only"):
        torch.autograd.grad(grad.sum(), logits)


def test_raw_module_takes_any_numpy_scalar_of_the_right_width():
    code = """
    extern "C" __global__ void __launch_bounds__(64) fill(long long x[], long long n,
                                                          int v) {
        long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) x[i] = v;
    }"""
    out = torch.zeros(5, dtype=torch.int64, device=CUDA)
    cupy_backend.RawModule(code.encode()).get_function("fill")(
        (1,), (8,), (out, np.longlong(5), np.intc(7)))
    assert out.tolist() == [7] * 5


@pytest.mark.slow
def test_torch_compile_runs_the_kernels_eagerly():
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    logits = torch.randn(8, 4, device=CUDA, requires_grad=True)
    expert_out = torch.randn(8, 4, 3, device=CUDA)
    compiled = torch.compile(lambda a, b: ops.combine(ops.softmax_gate(a), b))
    with ops.use_backend("cupy"):
        got = compiled(logits, expert_out)
    want = reference.combine(reference.softmax_gate(logits), expert_out)
    torch.testing.assert_close(got, want)
    dynamo.reset()
