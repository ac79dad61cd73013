"""The CUDA kernels on every machine: emulated on the CPU against the reference,
compiled for GPUs where a CUDA compiler is present, and packaged in the wheel."""

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmoe_edu import ops
from dmoe_edu.dmoe import DeepMoE, LayerSpec
from dmoe_edu.ops import cupy_backend, emulate, reference
from dmoe_edu.ops.kernels import (
    KERNEL_FILES,
    current_launch_shape,
    grid_for,
    kernel_dir,
    kernel_header,
    kernel_source,
    launch_shape,
    package_kernels,
    parse_kernels,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    emulate.status() is not None,
    reason=f"emulate backend unavailable: {emulate.status()}",
)

# float32 sums run in a different order than torch's (up to 600 terms here).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float64: dict(rtol=1e-9, atol=1e-9)}


def emulated(fn, *args, block=256, max_blocks=None):
    with ops.use_backend("emulate"), launch_shape(block=block, max_blocks=max_blocks):
        return fn(*args)


# --------------------------------------------------------------------------- inputs

dtypes = st.sampled_from([torch.float32, torch.float64])
# Small blocks and capped grids make the grid-stride loop do the covering.
launches = st.tuples(st.sampled_from([1, 3, 32, 100, 256]),
                     st.sampled_from([1, 2, 7, None]))


@st.composite
def gate_inputs(draw):
    B = draw(st.integers(0, 300))
    E = draw(st.integers(1, 64))
    dtype = draw(dtypes)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    # Ordinary logits, huge ones (+-1e4: exp overflows without the max subtraction),
    # or rows whose logits are all equal.
    kind = draw(st.sampled_from(["normal", "huge", "equal"]))
    logits = torch.randn(B, E, generator=gen, dtype=dtype) * 3
    if kind == "huge":
        logits = torch.where(torch.rand(B, E, generator=gen) < 0.5, -1e4, 1e4)
        logits = logits.to(dtype) + torch.randn(B, E, generator=gen, dtype=dtype)
    elif kind == "equal":
        logits = torch.randn(B, 1, generator=gen, dtype=dtype).expand(B, E).clone()

    # No mask, one row for the whole batch, or a mask per example; some rows are left
    # with a single expert.
    mask_kind = draw(st.sampled_from(["none", "row", "full", "one_left"]))
    mask = None
    if mask_kind == "row":
        mask = torch.rand(E, generator=gen) < 0.6
        mask[draw(st.integers(0, E - 1))] = True
    elif mask_kind in ("full", "one_left"):
        mask = torch.rand(B, E, generator=gen) < 0.6
        keep = torch.randint(E, (B,), generator=gen)
        if mask_kind == "one_left":
            mask[:] = False
        mask[torch.arange(B), keep] = True
    return logits, mask


@st.composite
def combine_inputs(draw):
    B = draw(st.integers(0, 300))
    E = draw(st.integers(1, 64))
    H = draw(st.integers(1, 600))
    dtype = draw(dtypes)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    gate_probs = torch.softmax(torch.randn(B, E, generator=gen, dtype=dtype), dim=1)
    expert_out = torch.randn(B, E, H, generator=gen, dtype=dtype)
    return gate_probs, expert_out


# --------------------------------------------------------------------------- contract


@settings(max_examples=60, deadline=None)
@given(gate_inputs(), launches)
def test_softmax_gate_matches_reference(inputs, launch):
    logits, mask = inputs
    logits.requires_grad_(True)
    expected = reference.softmax_gate(logits, mask)
    got = emulated(ops.softmax_gate, logits, mask,
                   block=launch[0], max_blocks=launch[1])
    torch.testing.assert_close(got, expected, **TOL[logits.dtype])
    if mask is not None:
        assert (got.detach()[~mask.expand_as(got)] == 0).all()

    # Backward through both, with the same incoming gradient.
    grad_probs = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, logits, grad_probs)
    (have,) = torch.autograd.grad(got, logits, grad_probs)
    torch.testing.assert_close(have, want, **TOL[logits.dtype])


@settings(max_examples=40, deadline=None)
@given(combine_inputs(), launches)
def test_combine_matches_reference(inputs, launch):
    gate_probs, expert_out = (t.requires_grad_(True) for t in inputs)
    expected = reference.combine(gate_probs, expert_out)
    got = emulated(ops.combine, gate_probs, expert_out,
                   block=launch[0], max_blocks=launch[1])
    torch.testing.assert_close(got, expected, **TOL[expert_out.dtype])

    grad_mixed = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (gate_probs, expert_out), grad_mixed)
    with launch_shape(block=launch[0], max_blocks=launch[1]):
        have = torch.autograd.grad(got, (gate_probs, expert_out), grad_mixed)
    for h, w in zip(have, want):
        torch.testing.assert_close(h, w, **TOL[expert_out.dtype])


def test_hand_computed_case():
    # Row 0: logits (0, ln 3) -> (1/4, 3/4). Row 1: expert 1 masked -> (1, 0).
    logits = torch.tensor([[0.0, float(np.log(3.0))], [5.0, 9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    probs = emulated(ops.softmax_gate, logits, mask)
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75], [1.0, 0.0]]))

    expert_out = torch.tensor([[[1.0, 2.0], [5.0, 6.0]], [[3.0, 4.0], [7.0, 8.0]]])
    mixed = emulated(ops.combine, probs, expert_out)
    torch.testing.assert_close(mixed, torch.tensor([[4.0, 5.0], [3.0, 4.0]]))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(6, 5, generator=gen) < 0.7
    mask[:, 0] = True
    gate_probs = torch.softmax(torch.randn(6, 5, dtype=torch.float64, generator=gen), 1)
    expert_out = torch.randn(6, 5, 7, dtype=torch.float64, generator=gen)

    with ops.use_backend("emulate"), launch_shape(block=4, max_blocks=3):
        assert torch.autograd.gradcheck(lambda x: ops.softmax_gate(x, mask), (logits,))
        assert torch.autograd.gradcheck(
            ops.combine, (gate_probs.requires_grad_(), expert_out.requires_grad_())
        )


def test_repeated_calls_are_bitwise_identical():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(257, 16, generator=gen, requires_grad=True)
    expert_out = torch.randn(257, 16, 130, generator=gen, requires_grad=True)

    def run():
        probs = emulated(ops.softmax_gate, logits)
        mixed = emulated(ops.combine, probs, expert_out)
        with ops.use_backend("emulate"):
            grads = torch.autograd.grad(mixed.square().sum(), (logits, expert_out))
        return (probs, mixed, *grads)

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_and_strided_inputs():
    # An empty batch returns empty results (no launch); views are copied, not misread.
    assert emulated(ops.softmax_gate, torch.zeros(0, 4)).shape == (0, 4)
    mixed = emulated(ops.combine, torch.zeros(0, 4), torch.zeros(0, 4, 3))
    assert mixed.shape == (0, 3)

    logits = torch.randn(8, 6).t()  # (6, 8), not contiguous
    expert_out = torch.randn(8, 5, 6).transpose(0, 1)  # (5, 8, 6), strided
    gate_probs = torch.softmax(torch.randn(8, 5), dim=0).t()  # (5, 8), strided
    torch.testing.assert_close(emulated(ops.softmax_gate, logits),
                               reference.softmax_gate(logits, None))
    torch.testing.assert_close(emulated(ops.combine, gate_probs, expert_out),
                               reference.combine(gate_probs, expert_out))

    # sum() hands the backward an expanded gradient with zero strides.
    x = torch.randn(4, 3, requires_grad=True)
    with ops.use_backend("emulate"):
        (emulated(ops.softmax_gate, x)[:, 0]).sum().backward()
    y = x.detach().clone().requires_grad_()
    reference.softmax_gate(y, None)[:, 0].sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


# --------------------------------------------------------------------------- models


def test_model_trained_on_emulate_matches_reference():
    from dmoe_edu.data import JitteredMNIST, synthetic_digits
    from dmoe_edu.train import TrainConfig, train

    data = JitteredMNIST(synthetic_digits(n_train=200, n_test=50, seed=0), seed=0)
    config = TrainConfig(epochs=2, constrained_epochs=1, margin=5.0, batch_size=50,
                         lr=0.05, threads=1)
    results = {}
    for backend in ("reference", "emulate"):
        torch.manual_seed(0)
        model = DeepMoE(1296, [LayerSpec(4, 16, 8), LayerSpec(3, 12, 8)])
        with ops.use_backend(backend):
            results[backend] = train(model, data, config)

    ref, emu = results["reference"], results["emulate"]
    for (name, p), q in zip(ref.model.named_parameters(), emu.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    for h_ref, h_emu in zip(ref.history, emu.history):
        assert h_emu["loss"] == pytest.approx(h_ref["loss"], rel=1e-4)
        assert h_emu["masked"] == pytest.approx(h_ref["masked"], abs=0.02)


def test_every_model_runs_on_emulate():
    from dmoe_edu.baselines import KINDS, build_baseline

    x = torch.randn(5, 1296)
    layers = [LayerSpec(4, 16, 8), LayerSpec(3, 12, 8)]
    for kind in KINDS:
        torch.manual_seed(0)
        model = build_baseline(kind, layers)
        want = model(x).logits
        with ops.use_backend("emulate"):
            got = model(x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=kind)


# --------------------------------------------------------------------------- launches


def test_grid_for_caps_and_covers():
    assert grid_for(1000, default_max_blocks=100) == (4, 256)
    assert grid_for(1000, default_max_blocks=2) == (2, 256)
    assert grid_for(0, default_max_blocks=10) == (1, 256)
    with launch_shape(block=32, max_blocks=3):
        assert grid_for(10**6, default_max_blocks=100) == (3, 32)
    with pytest.raises(ValueError, match="block must be 1 to 1024"):
        with launch_shape(block=2048):
            pass


def kernel(file, name):
    return emulate._backend.kernel(file, name, torch.device("cpu"))


def test_launch_checks_every_argument():
    fwd = kernel("combine", "combine_fwd_f32")
    g, x, out = torch.ones(2, 3), torch.ones(2, 3, 4), torch.empty(2, 4)
    sizes = (np.int64(2), np.int64(3), np.int64(4))

    with pytest.raises(TypeError, match="takes 6 arguments"):
        fwd((1,), (32,), (g, x, out))
    with pytest.raises(TypeError, match=r"'gate_probs'.*float32, got torch.float64"):
        fwd((1,), (32,), (g.double(), x, out, *sizes))
    with pytest.raises(ValueError, match=r"'expert_out'.*must be contiguous"):
        fwd((1,), (32,), (g, x.transpose(1, 2), out, *sizes))
    with pytest.raises(TypeError, match=r"'B'.*like np.int64\(\.\.\.\); got int 2"):
        fwd((1,), (32,), (g, x, out, 2, *sizes[1:]))
    with pytest.raises(ValueError, match="CPU emulation reads host memory"):
        fwd((1,), (32,), (g, x.to("meta"), out, *sizes))
    with pytest.raises(ValueError, match="block must be one-dimensional"):
        fwd((1,), (32, 2), (g, x, out, *sizes))
    with pytest.raises(ValueError, match="block size must be 1 to 1024"):
        fwd((1,), (2048,), (g, x, out, *sizes))

    fwd((1,), (32,), (g, x, out, *sizes))
    torch.testing.assert_close(out, torch.full((2, 4), 3.0))


def test_backends_refuse_tensors_they_cannot_reach():
    meta = torch.zeros(2, 3, device="meta")
    with ops.use_backend("emulate"), pytest.raises(ValueError, match="CPU tensors"):
        ops.softmax_gate(meta)

    # A meta tensor is no CUDA tensor: the message points at 'reference' alone.
    with pytest.raises(ValueError) as refused:
        emulate.softmax_gate(meta)
    assert "'reference'" in str(refused.value) and "cupy" not in str(refused.value)
    with pytest.raises(ValueError) as refused:
        kernel("gating", "softmax_gate_bwd_f32")((1,), (1,), (
            meta, meta, meta, np.int64(2), np.int64(3)))
    assert "cupy" not in str(refused.value)
    with pytest.raises(ValueError, match="unknown ops backend 'gpu'"):
        ops.set_backend("gpu")
    if ops.backend_status()["cupy"] is not None:
        with pytest.raises(RuntimeError, match="cupy backend cannot run here"):
            ops.set_backend("cupy")
    assert ops.get_backend() == "auto"
    assert ops.resolve_backend(torch.zeros(1)) == "reference"


def test_signatures_are_read_from_the_sources():
    gating = package_kernels("gating")
    assert sorted(gating) == ["softmax_gate_bwd_f32", "softmax_gate_bwd_f64",
                              "softmax_gate_fwd_f32", "softmax_gate_fwd_f64"]
    assert [p.describe() for p in gating["softmax_gate_fwd_f64"]] == [
        "double* gate_logits", "unsigned char* mask", "long long mask_row_stride",
        "double* gate_probs", "long long B", "long long E"]
    assert len(package_kernels("combine")) == 6
    with pytest.raises(ValueError, match="cannot pass"):
        parse_kernels('extern "C" __global__ void k(float** x) {}')


# --------------------------------------------------------------------------- emulation


SCALE = textwrap.dedent("""
    extern "C" __global__ void scale(const double* x, double* y, double a,
                                     long long n) {
        long long step = (long long)gridDim.x * blockDim.x;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
             i += step)
            y[i] = a * x[i];
    }
""")


def test_raw_module_runs_a_kernel_of_your_own(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    module = emulate.RawModule(SCALE, "scale.cu")
    x = torch.arange(1000, dtype=torch.float64)
    y = torch.empty_like(x)
    module.get_function("scale")((3,), (7,), (x, y, np.float64(0.5), np.int64(1000)))
    torch.testing.assert_close(y, x / 2)

    # Compiled once: a second module reuses the cached library.
    assert list((tmp_path / "emulate").glob("scale-*.so")) == [module.path]
    assert emulate.RawModule(SCALE, "scale.cu").path == module.path
    with pytest.raises(KeyError, match="no kernel 'shift'"):
        module.get_function("shift")


@pytest.mark.parametrize("feature, message", [
    ("__syncthreads();", "__syncthreads"),
    ("__shared__ float tile[32];", "__shared__"),
    ("atomicAdd(out, 1.0f);", "atomicAdd"),
])
def test_shim_refuses_threads_that_talk(tmp_path, monkeypatch, feature, message):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    code = f'extern "C" __global__ void k(float* out) {{ {feature} }}'
    with pytest.raises(emulate.KernelCompileError, match=message):
        emulate.RawModule(code, "talk.cu")


def test_clear_error_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(emulate.CompilerNotFoundError, match="apt-get install g"):
        emulate.RawModule(SCALE)
    reason = ops.backend_status()["emulate"]
    assert "C++ compiler" in reason
    # CXX is set: the advice is to fix it, not to set it.
    assert "Fix CXX" in reason and "or set CXX" not in reason
    with pytest.raises(RuntimeError, match="emulate backend cannot run here"):
        ops.set_backend("emulate")

    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(emulate.CompilerNotFoundError, match="none of c"):
        emulate.find_compiler()
    assert "or set CXX" in ops.backend_status()["emulate"]


def test_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DMOE_EDU_CACHE", str(blocker / "cache"))
    code = SCALE.replace("scale(", "scale_again(")
    with pytest.warns(UserWarning, match="kernel cache .* cannot be written") as caught:
        module = emulate.RawModule(code, "fallback.cu")
    assert caught[0].filename == __file__  # the warning points at the caller
    assert not module.path.is_relative_to(blocker)
    x = torch.ones(3, dtype=torch.float64)
    y = torch.empty_like(x)
    module.get_function("scale_again")((1,), (4,), (x, y, np.float64(2), np.int64(3)))
    assert y.tolist() == [2.0, 2.0, 2.0]


def test_no_source_means_no_kernel():
    with pytest.raises(ValueError, match="declares no kernel"):
        emulate.RawModule("int x;")


# --------------------------------------------------------------------------- the cache


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder that exists but in which no file can be created, as on a read-only
    mount: chmod 0555 for a normal user; root ignores modes, so for root every
    os.open that would create a file under it fails with EROFS instead."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    (folder / "emulate").mkdir()
    if os.geteuid() != 0:
        for path in (folder / "emulate", folder):
            path.chmod(0o555)
        yield folder
        for path in (folder, folder / "emulate"):
            path.chmod(0o755)
        return
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).is_relative_to(folder):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    yield folder


def test_cache_that_exists_but_cannot_be_written(read_only_folder, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(read_only_folder))
    code = SCALE.replace("scale(", "scale_read_only(")
    with pytest.warns(UserWarning) as caught:
        module = emulate.RawModule(code, "read_only.cu")
    message = str(caught[0].message)
    assert str(read_only_folder / "emulate") in message
    assert "cannot be written" in message
    assert "Read-only file system" in message or "Permission denied" in message
    assert caught[0].filename == __file__

    # The library went to a private folder: this user's, mode 0700, not predictable.
    fallback = module.path.parent
    assert not module.path.is_relative_to(read_only_folder)
    assert fallback.stat().st_uid == os.getuid()
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700
    assert emulate.cache_dir() == fallback
    x = torch.ones(3, dtype=torch.float64)
    y = torch.empty_like(x)
    module.get_function("scale_read_only")((1,), (4,), (x, y, np.float64(2),
                                                       np.int64(3)))
    assert y.tolist() == [2.0, 2.0, 2.0]


def test_cache_setting_expands_home_and_is_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DMOE_EDU_CACHE", "~/kernel-cache")
    assert emulate.configured_cache_dir() == tmp_path / "kernel-cache" / "emulate"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMOE_EDU_CACHE", "relative")
    assert emulate.configured_cache_dir() == tmp_path / "relative" / "emulate"
    monkeypatch.delenv("DMOE_EDU_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert emulate.configured_cache_dir() == tmp_path / "xdg" / "dmoe_edu" / "emulate"


DAMAGED_PROBE = textwrap.dedent("""
    import warnings, numpy as np, torch, sys
    from dmoe_edu.ops import emulate
    code = open(sys.argv[1]).read()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = emulate.RawModule(code, "scale.cu")
    x = torch.arange(4, dtype=torch.float64)
    y = torch.empty_like(x)
    module.get_function("scale")((1,), (4,), (x, y, np.float64(2), np.int64(4)))
    print(y.tolist(), module.path)
    print(*(str(w.message) for w in caught), sep="\\n")
""")


def test_damaged_cached_library_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path / "cache"))
    path = emulate.RawModule(SCALE, "scale.cu").path
    size = path.stat().st_size
    # Truncated, as by a full disk. Written to a new file and renamed over the old
    # one: this process has the library mapped, and shrinking a mapped file in place
    # would crash it with a bus error when it touches the lost pages.
    damaged = path.with_name(path.name + ".damaged")
    damaged.write_bytes(path.read_bytes()[: size // 2])
    os.replace(damaged, path)

    # In a child process: loading a truncated library can kill it with a bus error.
    (tmp_path / "scale.cu").write_text(SCALE)
    command = [sys.executable, "-c", DAMAGED_PROBE, str(tmp_path / "scale.cu")]
    done = subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr
    values, _, warning = done.stdout.partition("\n")
    assert values.startswith("[0.0, 2.0, 4.0, 6.0]")
    assert f"cached kernel library {path} cannot be used" in warning
    assert path.stat().st_size == size  # rebuilt in place


# --------------------------------------------------------------------------- compiler


def _false_and_true():
    return [pytest.param(shutil.which("false"), "exit status 1", id="false"),
            pytest.param(shutil.which("true"), "produced no library", id="true")]


@pytest.mark.parametrize("program, words", _false_and_true())
def test_status_says_when_the_compiler_cannot_build(program, words, tmp_path,
                                                    monkeypatch):
    if program is None:
        pytest.skip("no false/true programs on the PATH")
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", program)
    reason = ops.backend_status()["emulate"]
    assert reason is not None and words in reason, reason
    assert f"{program} (from $CXX)" in reason and "fix CXX or unset it" in reason
    assert "or set CXX" not in reason
    with pytest.raises(RuntimeError, match=f"emulate backend cannot run here.*{words}"):
        ops.set_backend("emulate")
    with pytest.raises(RuntimeError, match=f"emulate backend cannot run here.*{words}"):
        with ops.use_backend("emulate"):
            pass
    with pytest.raises(emulate.KernelCompileError, match=words):
        emulate.RawModule(SCALE)
    assert ops.get_backend() == "auto"


def test_status_shows_the_compilers_output(tmp_path, monkeypatch):
    # A "compiler" that prints an error and fails: CXX with arguments, run by sh.
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "sh -c 'echo no licence for it >&2; exit 3' sh")
    reason = emulate.status()
    assert "exit status 3" in reason and "no licence for it" in reason


@pytest.mark.parametrize("template", ["{cxx} -O1", "env {cxx}"])
def test_compiler_with_arguments(template, tmp_path, monkeypatch):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no g++ on the PATH")
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", template.format(cxx=cxx))
    assert emulate.compiler_command()[1:] == template.format(cxx=cxx).split()[1:]
    assert emulate.status() is None
    x = torch.arange(5, dtype=torch.float64)
    y = torch.empty_like(x)
    emulate.RawModule(SCALE).get_function("scale")((1,), (8,), (
        x, y, np.float64(3), np.int64(5)))
    assert y.tolist() == [0.0, 3.0, 6.0, 9.0, 12.0]
    with ops.use_backend("emulate"):
        probs = ops.softmax_gate(torch.zeros(2, 4))
    torch.testing.assert_close(probs, torch.full((2, 4), 0.25))


# --------------------------------------------------------------------------- sources


# Valid CUDA declarations RawModule must read; each also compiles under NVRTC below.
DECLARATIONS = {
    "launch bounds after void": (
        'extern "C" __global__ void __launch_bounds__(256) k(float* x, int n) '
        "{ x[0] = n; }", ["float* x", "int n"]),
    "launch bounds with two values before void": (
        'extern "C" __global__ __launch_bounds__(128, 2) void k(float* x, int n) '
        "{ x[0] = n; }", ["float* x", "int n"]),
    "no parameters, void": (
        'extern "C" __global__ void k(void) { }', []),
    "comments with parentheses": (
        'extern "C" __global__ void k(float* x /* (input) */, // n (count), here\n'
        "    int n) { x[0] = n; }", ["float* x", "int n"]),
    "extern C block": (
        'extern "C" {\n__global__ void k(float* x, int n) { x[0] = n; }\n'
        "__device__ int helper() { return 1; }\n"
        "__global__ void k2(double* y) { y[0] = 2; }\n}",
        ["float* x", "int n"]),
    "array parameter": (
        'extern "C" __global__ void k(float x[], int n) { x[0] = n; }',
        ["float* x", "int n"]),
    "string with a comment marker": (
        'extern "C" __global__ void k(float* x, int n) { printf("// (%d)\\n", n); }',
        ["float* x", "int n"]),
}


@pytest.mark.parametrize("label", DECLARATIONS)
def test_parse_kernels_reads_valid_declarations(label):
    code, params = DECLARATIONS[label]
    kernels = parse_kernels(code)
    assert [p.describe() for p in kernels["k"]] == params
    assert [p.describe() for p in parse_kernels(code.encode())["k"]] == params
    if label == "extern C block":
        assert sorted(kernels) == ["k", "k2"]


def test_parse_kernels_skips_and_refuses():
    # A kernel with C++ linkage has a mangled name: no launcher could find it.
    assert parse_kernels("__global__ void k(float* x) {}") == {}
    with pytest.raises(TypeError, match="must be str or bytes, got int"):
        parse_kernels(42)
    with pytest.raises(ValueError, match="cannot pass"):
        parse_kernels('extern "C" __global__ void k(float* x[]) {}')


def test_raw_module_runs_those_declarations(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    for label in ("launch bounds after void", "extern C block", "array parameter"):
        code, _ = DECLARATIONS[label]
        x = torch.zeros(2)
        emulate.RawModule(code.encode(), "decl.cu").get_function("k")(
            (1,), (1,), (x, np.int32(7)))
        assert x.tolist() == [7.0, 0.0], label
    emulate.RawModule(DECLARATIONS["no parameters, void"][0]).get_function("k")(
        (1,), (1,), ())

    # float x[] is a pointer: a scalar is refused before any launch, not read.
    k = emulate.RawModule(DECLARATIONS["array parameter"][0]).get_function("k")
    with pytest.raises(TypeError, match=r"'x' \(float\* x\) must be a tensor"):
        k((1,), (1,), (np.float32(1), np.int32(7)))


def test_declarations_are_valid_cuda():
    nvrtc = _nvrtc()
    for label, (code, _) in DECLARATIONS.items():
        ok, log = _nvrtc_compiles(nvrtc, code)
        assert ok, f"{label}: {log}"


# --------------------------------------------------------------------------- launches


def test_numpy_scalars_of_the_right_width_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    code = textwrap.dedent("""
        extern "C" __global__ void k(long long* out, long long a, int b, unsigned int c,
                                     float d, double e) {
            out[0] = a; out[1] = b; out[2] = c; out[3] = (long long)d;
            out[4] = (long long)e;
        }""")
    k = emulate.RawModule(code).get_function("k")
    out = torch.zeros(5, dtype=torch.int64)
    k((1,), (1,), (out, np.longlong(10), np.intc(-2), np.uintc(3), np.single(4),
                   np.double(5)))
    assert out.tolist() == [10, -2, 3, 4, 5]
    k((1,), (1,), (out, np.int64(1), np.int32(2), np.uint32(3), np.float32(4),
                   np.float64(5)))
    assert out.tolist() == [1, 2, 3, 4, 5]

    # The wrong width or signedness is refused, and the message never contradicts
    # itself: it names what was passed and what the C type needs.
    good = (out, np.int64(1), np.int32(2), np.uint32(3), np.float32(4), np.float64(5))
    wrongs = ((1, np.int32(1)), (1, 1), (2, np.uint32(2)), (3, np.int32(3)),
              (4, np.float64(4)), (5, np.longdouble(5)), (2, np.bool_(True)))
    for index, wrong in wrongs:
        args = list(good)
        args[index] = wrong
        with pytest.raises(TypeError) as refused:
            k((1,), (1,), args)
        message = str(refused.value)
        assert f"got {type(wrong).__name__}" in message or \
            f"got np.{type(wrong).__name__}" in message
        assert "must be a NumPy scalar of" in message


@pytest.mark.parametrize("bad", [2.5, "2", True, np.bool_(True), 2.0, None])
def test_grid_and_block_sizes_must_be_integers(bad):
    fwd = kernel("combine", "combine_fwd_f32")
    g, x, out = torch.ones(2, 3), torch.ones(2, 3, 4), torch.empty(2, 4)
    sizes = (np.int64(2), np.int64(3), np.int64(4))
    with pytest.raises(TypeError, match="must be an integer"):
        fwd((bad,), (32,), (g, x, out, *sizes))
    with pytest.raises(TypeError, match="must be an integer"):
        fwd((1,), (bad,), (g, x, out, *sizes))
    with pytest.raises(TypeError, match="must be an integer"):
        fwd((1, bad), (32,), (g, x, out, *sizes))
    with pytest.raises(TypeError, match="launch_shape: block must be an integer"):
        with launch_shape(block=bad):
            pass
    if bad is not None:
        with pytest.raises(TypeError, match="max_blocks must be an integer"):
            with launch_shape(max_blocks=bad):
                pass
    fwd((np.int64(1),), (np.int32(32),), (g, x, out, *sizes))
    with launch_shape(block=np.int64(8), max_blocks=np.int32(2)):
        assert grid_for(1000, default_max_blocks=100) == (2, 8)


# --------------------------------------------------------------------------- compilers


ARCHES = ["sm_80", "sm_90"]


def _nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # not installed, or libnvrtc missing
        pytest.skip(f"NVRTC unavailable ({exc}); pip install cupy-cuda12x "
                    "nvidia-cuda-nvrtc-cu12")


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("file", KERNEL_FILES)
def test_kernels_compile_with_nvrtc(file, arch):
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(kernel_source(file), f"{file}.cu", [], [])
    try:
        nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", "-std=c++17"])
    except nvrtc.NVRTCError as exc:
        pytest.fail(f"{file}.cu does not compile for {arch}: {exc}\n"
                    f"{nvrtc.getProgramLog(program)}")
    cubin = nvrtc.getCUBIN(program)
    for name in package_kernels(file):
        assert name.encode() in cubin, f"{name} missing from the {arch} binary"


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("file", KERNEL_FILES)
def test_kernels_compile_with_nvcc(file, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH")
    out = tmp_path / f"{file}.cubin"
    done = subprocess.run([nvcc, "--cubin", f"-arch={arch}", "-o", str(out),
                           str(kernel_dir() / f"{file}.cu")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower(), done.stderr
    cubin = out.read_bytes()
    for name in package_kernels(file):
        assert name.encode() in cubin


# --------------------------------------------------------------------------- the shim


def _nvrtc_compiles(nvrtc, code: str, arch: str = "sm_80") -> tuple[bool, str]:
    program = nvrtc.createProgram(code, "snippet.cu", [], [])
    try:
        nvrtc.compileProgram(program, [f"--gpu-architecture={arch}", "-std=c++17"])
        return True, ""
    except nvrtc.NVRTCError:
        return False, nvrtc.getProgramLog(program)


def _emulate_compiles(code: str) -> tuple[bool, str]:
    try:
        emulate.RawModule(code, "snippet.cu")
        return True, ""
    except emulate.KernelCompileError as exc:
        return False, str(exc)


# Expressions a kernel might write into y[0] (x: const float*, y: float*), and whole
# statements. Each compiles under both NVRTC and the emulation, or under neither.
SHIM_EXPRESSIONS = [
    # Host-only names NVRTC lacks without headers: the emulation must lack them too.
    "INFINITY", "HUGE_VALF", "NAN", "M_PI", "FLT_MAX", "INT_MAX", "CUDART_INF_F",
    "std::exp(x[0])", "(float)sizeof(int64_t)", "(float)sizeof(std::size_t)",
    "__float2half(x[0])",
    # The math library, float and double, with CUDA's float overloads.
    "expf(x[0])", "exp(x[0])", "exp(1.0f)", "sqrt(x[0])", "powf(x[0], 2.0f)",
    "pow(x[0], 2)", "pow(x[0], 2.0)", "pow(2.0, 3.0)", "fabs(-1.0)", "abs(-x[0])",
    "abs(-1)", "abs(-1ll)", "tanhf(x[0])", "erfcf(x[0])", "lgammaf(x[0])",
    "log1pf(x[0])", "exp2f(x[0])", "atan2f(x[0], 1.0f)", "hypotf(x[0], 1.0f)",
    "fmodf(x[0], 1.0f)", "copysignf(x[0], -1.0f)", "fmaf(x[0], 2.0f, 1.0f)",
    "fma(1.0, 2.0, 3.0)", "ldexpf(x[0], 2)", "(float)lroundf(x[0])",
    "(float)ilogbf(x[0])", "nextafterf(x[0], 2.0f)", "rintf(x[0])",
    "isnan(x[0]) ? 1.0f : 0.0f", "isinf(1.0) ? 1.0f : 0.0f",
    "signbit(x[0]) ? 1.0f : 0.0f", "(float)__isnanf(x[0])", "(float)__finitef(x[0])",
    # CUDA's own functions and intrinsics.
    "fminf(x[0], 0.5f)", "fmaxf(x[0], 0.f)", "min(x[0], 1.0f)", "max(1, 2)",
    "min(1, 2u)", "min(1ll, 2ll)", "min(1.0, 2.0f)", "min(1, 2.0f)", "max(x[0], 1.0)",
    "umin(1u, 2u)", "umax(1u, 2u)", "llmin(1ll, 2ll)", "llmax(1ll, 2ll)",
    "ullmin(1ull, 2ull)", "rsqrtf(x[0])", "rsqrt(1.0)", "rcbrtf(x[0])",
    "exp10f(x[0])", "sinpif(x[0])", "normcdff(x[0])", "__expf(x[0])", "__logf(x[0])",
    "__sinf(x[0])", "__powf(x[0], 2.0f)", "__fdividef(x[0], 2.0f)",
    "__saturatef(x[0])", "__fmaf_rn(x[0], 2.0f, 1.0f)", "__fadd_rn(x[0], 1.0f)",
    "__frcp_rn(x[0])", "(float)__dmul_rn(1.0, 2.0)", "__int_as_float(0x7f800000)",
    "(float)__float_as_int(x[0])", "__uint_as_float(1u)",
    "(float)__double_as_longlong(1.0)", "__ldg(x)", "(float)warpSize",
    "(float)__float2int_rn(x[0])", "(float)__float2uint_rz(x[0])",
    "(float)__double2ll_rd(1.5)", "__int2float_rn(3)", "__double2float_rn(1.5)",
    "(float)__popc(7u)", "(float)__clz(1)", "(float)__ffs(8)", "(float)__brev(1u)",
    "(float)__mulhi(2, 3)", "(float)__umul64hi(2ull, 3ull)", "(float)__mul24(2, 3)",
    "(float)__sad(1, 2, 3u)",
    # Built-in types and indices.
    "(float)sizeof(size_t)", "(float)sizeof(ptrdiff_t)", "(float)(NULL == 0)",
    "(float)sizeof(float4)", "make_float2(1.f, 2.f).x", "make_double3(1, 2, 3).z",
    "(float)make_int4(1, 2, 3, 4).w", "(float)make_uchar4(1, 2, 3, 4).w",
    "(float)threadIdx.y", "(float)blockIdx.z", "(float)gridDim.y",
    # Left alone by design or not provided (see SHIM_DIFFERENCES).
    "__shfl_down_sync(0xffffffff, x[0], 1)", "(float)__ballot_sync(0xffffffffu, 1)",
    "atomicAdd(y, 1.0f)", "(float)atomicCAS((int*)y, 0, 1)", "(float)clock64()",
    "erfinvf(x[0])", "__fadd_rz(x[0], 1.0f)", "(float)__CUDA_ARCH__",
]
SHIM_STATEMENTS = [
    'printf("%f\\n", x[0]);', "assert(x[0] > 0);", "__trap();", "__threadfence();",
    "sincosf(x[0], y, y + 1);", "int e; y[0] = frexpf(x[0], &e);",
    "int4 v = make_int4(1, 2, 3, 4); y[0] = v.w;", "uint3 t = threadIdx; y[0] = t.x;",
    "dim3 d(1, 2, 3); y[0] = d.y;", "threadIdx.x = 1;",
    "float4 v = reinterpret_cast<const float4*>(x)[0]; y[0] = v.x;",
    "int n = (int)x[0]; float a[n]; a[0] = 1; y[0] = a[0];",
    "unsigned __int128 v = 1; y[0] = (float)v;",
    "std::size_t n = 0; (void)n;", "__syncwarp();", "__syncthreads();",
    "__shared__ float s[32]; s[0] = x[0]; y[0] = s[0];",
]
# Where the two compilers disagree on purpose, and why. The test fails when an entry
# stops differing, so the list stays true.
SHIM_DIFFERENCES = {
    "__shfl_down_sync(0xffffffff, x[0], 1)": "warp shuffles: refused by design",
    "(float)__ballot_sync(0xffffffffu, 1)": "warp votes: refused by design",
    "atomicAdd(y, 1.0f)": "atomics: refused by design",
    "(float)atomicCAS((int*)y, 0, 1)": "atomics: refused by design",
    "__syncwarp();": "warp barrier: refused by design",
    "__syncthreads();": "block barrier: refused by design",
    "__shared__ float s[32]; s[0] = x[0]; y[0] = s[0];": "shared memory: by design",
    "(float)clock64()": "no cycle counter on the emulation",
    "erfinvf(x[0])": "rare special functions (erfinv, normcdfinv) not provided",
    "__fadd_rz(x[0], 1.0f)": "only round-to-nearest (_rn) arithmetic intrinsics",
    "(float)__CUDA_ARCH__": "the emulation defines no __CUDA_ARCH__ or __CUDACC_RTC__",
}


def _snippet_code(snippet: str) -> str:
    body = snippet if snippet.endswith(";") else f"y[0] = {snippet};"
    return f'extern "C" __global__ void k(const float* x, float* y) {{ {body} }}'


@pytest.mark.slow
def test_the_shim_accepts_what_nvrtc_accepts(tmp_path, monkeypatch):
    nvrtc = _nvrtc()
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    snippets = SHIM_EXPRESSIONS + SHIM_STATEMENTS
    assert set(SHIM_DIFFERENCES) <= set(snippets)
    codes = [_snippet_code(snippet) for snippet in snippets]
    with ThreadPoolExecutor(max_workers=4) as pool:  # the compiler runs release the GIL
        on_cpu = list(pool.map(_emulate_compiles, codes))
    mismatches = []
    for snippet, code, (emulated_ok, emulate_log) in zip(snippets, codes, on_cpu):
        gpu_ok, gpu_log = _nvrtc_compiles(nvrtc, code)
        differs = gpu_ok != emulated_ok
        if differs != (snippet in SHIM_DIFFERENCES):
            verdict = {True: "accepts", False: "rejects"}
            mismatches.append(f"{snippet!r}: NVRTC {verdict[gpu_ok]}, the emulation "
                              f"{verdict[emulated_ok]}\n{gpu_log or emulate_log}")
    assert not mismatches, "\n\n".join(mismatches)


BUILTINS = textwrap.dedent("""
    extern "C" __global__ void builtins(const float* x, float* f, long long* i) {
        f[0] = min(x[0], 1.0f);          f[1] = max(2, 3);
        f[2] = rsqrtf(4.0f);             f[3] = __expf(1.0f);
        f[4] = __fdividef(1.0f, 4.0f);   f[5] = __saturatef(-1.0f);
        f[6] = __saturatef(0.25f);       f[7] = __saturatef(7.0f);
        f[8] = __int_as_float(0x3f800000);  f[9] = __ldg(x + 1);
        f[10] = fminf(x[2], 1.0f);       f[11] = fmaxf(x[2], 1.0f);
        f[12] = min(x[2], 1.0f);         f[13] = exp(1.0f);
        f[14] = __logf(8.0f);            f[15] = pow(2.0f, 3);
        float s, c;
        sincosf(0.0f, &s, &c);           f[16] = s + 2 * c;
        f[17] = make_float4(1, 2, 3, 4).w;  f[18] = normcdff(0.0f);
        f[19] = exp10f(2.0f);            f[20] = sinpif(0.5f);
        i[0] = warpSize;                 i[1] = umin(3u, 7u);
        i[2] = llmin(-5ll, 2ll);         i[3] = min(-1, 1u);
        i[4] = __float_as_int(1.0f);     i[5] = __popc(0xF0F0u);
        i[6] = __clz(0);                 i[7] = __clz(1);
        i[8] = __ffs(8);                 i[9] = __brev(1u);
        i[10] = __umulhi(0x80000000u, 4u);  i[11] = __mul64hi(1ll << 62, 8ll);
        i[12] = __float2int_rn(2.5f);    i[13] = __float2int_rn(3.5f);
        i[14] = __float2int_rz(-2.7f);   i[15] = __float2int_rd(-2.5f);
        i[16] = __float2int_ru(2.1f);    i[17] = __float2uint_rn(-1.0f);
        i[18] = __float2int_rz(1e10f);   i[19] = __float2int_rn(x[2]);
        i[20] = __float2ll_rz(-1e30f);   i[21] = __mul24(0x1000001, 2);
        i[22] = sizeof(float4);          i[23] = alignof(double2);
        i[24] = ullmax(1ull, 2ull);      i[25] = abs(-7ll);
    }
""")


def test_the_shims_builtins_compute_what_cuda_documents(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    x = torch.tensor([1.5, 6.0, float("nan")])
    f = torch.zeros(21)
    i = torch.zeros(26, dtype=torch.int64)
    emulate.RawModule(BUILTINS).get_function("builtins")((1,), (1,), (x, f, i))
    e = float(np.float32(np.e))
    expected_f = [1.0, 3.0, 0.5, e, 0.25, 0.0, 0.25, 1.0, 1.0, 6.0, 1.0, 1.0, 1.0, e,
                  float(np.float32(np.log(8))), 8.0, 2.0, 4.0, 0.5, 100.0, 1.0]
    torch.testing.assert_close(f, torch.tensor(expected_f), rtol=1e-6, atol=1e-6)
    expected_i = [32, 3, -5, 1, 0x3F800000, 8, 32, 31, 4, 2**31, 2, 2, 2, 4, -2, -3,
                  3, 0, 2**31 - 1, 0, -(2**63), 2, 16, 16, 2, 7]
    assert i.tolist() == expected_i


def test_printf_assert_and_trap(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    code = textwrap.dedent("""
        extern "C" __global__ void talk(const float* x, long long n) {
            long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) printf("thread %lld sees %.1f\\n", i, x[i]);
        }
        extern "C" __global__ void check(const float* x, long long n) {
            long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) assert(x[i] > 0);
        }
        extern "C" __global__ void stop(float* x) { if (threadIdx.x == 1) __trap(); }
    """)
    module = emulate.RawModule(code, "talk.cu")
    x = torch.tensor([1.0, 2.0, -3.0])
    module.get_function("talk")((2,), (2,), (x, np.int64(3)))
    assert capfd.readouterr().out == ("thread 0 sees 1.0\nthread 1 sees 2.0\n"
                                      "thread 2 sees -3.0\n")
    with pytest.raises(RuntimeError, match=r"assertion failed: x\[i\] > 0 "
                                           r"\(talk.cu:8, block 1, thread 0\)"):
        module.get_function("check")((2,), (2,), (x, np.int64(3)))
    with pytest.raises(RuntimeError, match=r"__trap\(\) called .*block 0, thread 1"):
        module.get_function("stop")((1,), (4,), (x,))
    module.get_function("check")((1,), (2,), (x, np.int64(2)))  # still usable


def test_cu_files_follow_the_style():
    # Header comment first, lines within 100 columns, and none of the features the
    # emulation (and determinism) rule out.
    for file in KERNEL_FILES:
        text = kernel_source(file)
        assert text.startswith(f"// {file}.cu:"), file
        assert max(map(len, text.splitlines())) <= 100, file
        code = "\n".join(line.split("//")[0] for line in text.splitlines())
        for banned in ("__shared__", "__syncthreads", "atomic", "__shfl", "#include"):
            assert banned not in code, (file, banned)


# --------------------------------------------------------------------------- backends


BACKEND_MODULES = [pytest.param(m, id=m.__name__.rsplit(".", 1)[1])
                   for m in (reference, emulate, cupy_backend)]


@pytest.mark.parametrize("module", BACKEND_MODULES)
def test_each_backend_checks_its_inputs(module):
    # Called directly, a backend checks what ops.* checks, before touching memory
    # (the cupy one too, before it looks for a GPU).
    logits, probs = torch.zeros(5, 4), torch.full((5, 4), 0.25)
    with pytest.raises(ValueError, match="no expert"):
        module.softmax_gate(logits, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask shape must be .*got \(3,\)"):
        module.softmax_gate(logits, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        module.softmax_gate(logits.half())
    with pytest.raises(TypeError, match="bool tensor"):
        module.softmax_gate(logits, torch.ones(4))
    with pytest.raises(ValueError, match=r"expert_out must be \(B, E, H\)"):
        module.combine(probs[:4], torch.zeros(5, 4, 3))
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        module.combine(probs.half(), torch.zeros(5, 4, 3).half())
    with pytest.raises(TypeError, match="share a dtype"):
        module.combine(probs, torch.zeros(5, 4, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_rows_agree_across_backends(dtype):
    # Row 0: every allowed logit is -inf. Row 1: an allowed NaN. Row 2: a masked NaN
    # and a masked +inf, which must not matter. Masked experts are exactly 0 always;
    # a row with no finite allowed logit is NaN on its allowed experts.
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[-inf, -inf, 2.0, 0.0], [nan, 1.0, 2.0, 0.0],
                           [inf, 1.0, 2.0, nan]], dtype=dtype)
    mask = torch.tensor([[True, True, False, False], [True, True, False, True],
                         [False, True, True, False]])
    expected = torch.tensor([[nan, nan, 0.0, 0.0], [nan, nan, 0.0, nan],
                             [0.0, 0.2689414213699951, 0.7310585786300049, 0.0]],
                            dtype=dtype)
    for backend in ("reference", "emulate"):
        probs = emulated(ops.softmax_gate, logits, mask) if backend == "emulate" \
            else reference.softmax_gate(logits, mask)
        torch.testing.assert_close(probs, expected, equal_nan=True, msg=backend)
        assert (probs[~mask] == 0).all(), backend


def test_a_one_row_mask_broadcasts_like_an_expert_mask():
    logits = torch.randn(6, 4, dtype=torch.float64)
    row = torch.tensor([True, False, True, True])
    want = reference.softmax_gate(logits, row.expand(6, 4).clone())
    for mask in (row, row[None], row[None].expand(6, 4)):
        torch.testing.assert_close(emulated(ops.softmax_gate, logits, mask), want)
        torch.testing.assert_close(ops.softmax_gate(logits, mask), want)


# --------------------------------------------------------------------------- autograd


def test_second_derivatives_raise_instead_of_being_wrong():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    expert_out = torch.randn(4, 3, 2, dtype=torch.float64, generator=gen,
                             requires_grad=True)

    def mixed(a, b):
        with ops.use_backend("emulate"):
            return ops.combine(ops.softmax_gate(a), b)

    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.gradgradcheck(mixed, (logits, expert_out))
    with ops.use_backend("emulate"):
        probs = ops.softmax_gate(logits)
        (grad,) = torch.autograd.grad(probs[:, 0].sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="emulate backend's backward of "
                                           "softmax_gate is first order only"):
        torch.autograd.grad(grad.sum(), logits)
    with ops.use_backend("emulate"):
        out = ops.combine(torch.softmax(logits, 1), expert_out)
        grads = torch.autograd.grad(out.square().sum(), (logits, expert_out),
                                    create_graph=True)
    with pytest.raises(RuntimeError, match="backward of combine is first order"):
        torch.autograd.grad(grads[1].sum(), expert_out)

    # A first-order gradient under create_graph=True is still right.
    want = torch.autograd.grad(reference.softmax_gate(logits)[:, 0].sum(), logits)[0]
    torch.testing.assert_close(grad, want)


@pytest.mark.slow
def test_torch_compile_runs_the_kernels_eagerly():
    dynamo = pytest.importorskip("torch._dynamo")
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=gen, requires_grad=True)
    expert_out = torch.randn(8, 4, 3, generator=gen)
    compiled = torch.compile(lambda a, b: ops.combine(ops.softmax_gate(a), b))
    with ops.use_backend("emulate"):
        try:
            got = compiled(logits, expert_out)
        except Exception as exc:  # no C compiler for inductor, and the like
            if "emulate" in str(exc) or "np.int64" in str(exc):
                raise
            pytest.skip(f"torch.compile cannot run here: {exc}")
        (grad,) = torch.autograd.grad(got.sum(), logits)
    want = reference.combine(reference.softmax_gate(logits), expert_out)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    dynamo.reset()


# --------------------------------------------------------------------------- threads


def test_use_backend_and_launch_shape_are_per_thread():
    inside, seen, released = threading.Event(), {}, threading.Event()

    def in_a_block():
        with ops.use_backend("emulate"), launch_shape(block=8, max_blocks=1):
            inside.set()
            released.wait(10)
            seen["a"] = (ops.get_backend(), current_launch_shape().block)

    def outside():
        inside.wait(10)
        seen["b"] = (ops.get_backend(), ops.resolve_backend(torch.zeros(1)),
                     current_launch_shape().block)
        with ops.use_backend("reference"):
            released.set()
            seen["b inside"] = ops.get_backend()
        seen["b after"] = ops.get_backend()

    threads = [threading.Thread(target=in_a_block), threading.Thread(target=outside)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"a": ("emulate", 8), "b": ("auto", "reference", 256),
                    "b inside": "reference", "b after": "auto"}
    assert ops.get_backend() == "auto"

    # set_backend is the process default: every thread sees it.
    try:
        ops.set_backend("reference")
        other = []
        thread = threading.Thread(target=lambda: other.append(ops.get_backend()))
        thread.start()
        thread.join(10)
        assert other == ["reference"]
        with ops.use_backend("emulate"):
            assert ops.get_backend() == "emulate"
        assert ops.get_backend() == "reference"
    finally:
        ops.set_backend("auto")


def test_backward_uses_the_launch_shape_of_its_forward(monkeypatch):
    shapes = []
    launch = emulate.EmulateBackend.launch

    def spy(self, file, name, work, args, shape=None):
        shapes.append((name, shape.block))
        return launch(self, file, name, work, args, shape)

    monkeypatch.setattr(emulate.EmulateBackend, "launch", spy)
    logits = torch.randn(5, 3, requires_grad=True)
    with ops.use_backend("emulate"), launch_shape(block=4):
        probs = ops.softmax_gate(logits)
    probs.sum().backward()  # outside the block
    assert shapes == [("softmax_gate_fwd_f32", 4), ("softmax_gate_bwd_f32", 4)]


# --------------------------------------------------------------------------- cupy


def test_cupy_status_names_a_missing_nvrtc(monkeypatch):
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import nvrtc

    def missing():
        raise RuntimeError("CuPy failed to load libnvrtc.so.12")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cupy.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nvrtc, "getVersion", missing)
    reason = cupy_backend._status()
    assert "NVRTC" in reason and "libnvrtc.so.12" in reason
    assert "nvidia-cuda-nvrtc-cu12" in reason


def test_the_gpu_extra_brings_nvrtc():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = [r.split(">")[0].split("=")[0].strip() for r in extras["gpu"]]
    assert "cupy-cuda12x" in names and "nvidia-cuda-nvrtc-cu12" in names


# --------------------------------------------------------------------------- the docs


def test_the_gating_header_counts_reads_as_its_limits_do():
    # Each thread reads its row twice (max, then sum): 2E values, in both sections.
    mapping = kernel_header("gating", "Thread mapping")
    assert "2E" in " ".join(mapping.split()) and "(E values)" not in mapping
    assert "reads 2E values" in kernel_header("gating", "Limits")


def test_readme_benchmarks_names_every_benchmark_script():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    for script in sorted((ROOT / "bench").glob("[!_]*.py")):
        assert f"bench/{script.name}" in section, script.name


# --------------------------------------------------------------------------- the wheel


@pytest.mark.slow
def test_wheel_ships_the_kernels(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("dmoe_edu-*.whl")
    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr

    # Run from the installed copy only, far from the source tree.
    probe = textwrap.dedent("""
        import torch, dmoe_edu
        from dmoe_edu import ops
        from dmoe_edu.ops.kernels import kernel_dir
        print(dmoe_edu.__file__)
        print(kernel_dir())
        with ops.use_backend("emulate"):
            print(ops.softmax_gate(torch.zeros(2, 4)).sum().item())
    """)
    env = {"PYTHONPATH": str(site), "DMOE_EDU_CACHE": str(tmp_path / "cache"),
           "PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module_file, folder, total = done.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert Path(folder) == site / "dmoe_edu" / "kernels"
    assert {p.name for p in Path(folder).iterdir()} >= {"gating.cu", "combine.cu",
                                                         "cpu_shim.h"}
    assert float(total) == pytest.approx(2.0)


# ------------------------------------------------------------- a new user's kernels

WIDE_TYPES = textwrap.dedent("""
    extern "C" __global__ void flags(const bool* keep, unsigned int* counts,
                                     size_t n, unsigned step, long offset) {
        for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
             i += gridDim.x * blockDim.x)
            counts[i] = keep[i] ? step + (unsigned)offset : 0u;
    }
""")


def test_common_spellings_of_the_c_types_are_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    kernel = emulate.RawModule(WIDE_TYPES, "flags.cu").get_function("flags")
    keep = torch.tensor([True, False, True, True, False])
    counts = torch.full((5,), 7, dtype=torch.uint32)
    kernel((2,), (2,), (keep, counts, np.uint64(5), np.uint32(3), np.int64(1)))
    assert counts.tolist() == [4, 0, 4, 4, 0]

    # size_t is 64 bits unsigned: a 32-bit or signed scalar is refused, not misread.
    with pytest.raises(TypeError, match="'n'"):
        kernel((1,), (1,), (keep, counts, np.int32(5), np.uint32(3), np.int64(1)))


@pytest.mark.parametrize("params", ["int", "unsigned int", "const float*"])
def test_a_parameter_without_a_name_is_named_as_the_problem(params):
    code = f'extern "C" __global__ void k({params}) {{}}'
    with pytest.raises(ValueError, match="every parameter needs a name"):
        parse_kernels(code)


@pytest.mark.parametrize("name", ["sub/dir/mine.cu", 'we"ird.cu', "", "../x.cu",
                                  "a b.cu"])
def test_source_names_must_be_plain_file_names(name):
    with pytest.raises(ValueError, match="plain file name"):
        emulate.RawModule(SCALE, name)


INTERRUPTED = textwrap.dedent("""
    import sys, time, torch
    from dmoe_edu.ops import emulate
    kernel = emulate.RawModule(
        'extern "C" __global__ void spin(float* y) { y[0] += 1.0f; }',
        "spin.cu").get_function("spin")
    print("launching", flush=True)
    start = time.monotonic()
    try:
        kernel((2**31 - 1,), (1024,), (torch.zeros(1),))
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - start:.1f} s", flush=True)
        sys.exit(3)
""")


@pytest.mark.slow
def test_ctrl_c_stops_a_runaway_emulated_launch(tmp_path):
    # 2**41 threads would run for hours; SIGINT must end the launch within seconds.
    import signal
    import time

    env = dict(os.environ, DMOE_EDU_CACHE=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "launching"
        time.sleep(1.0)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 3, err
    assert out.startswith("interrupted after")
