"""The CUDA kernels on every machine: emulated on the CPU against the reference,
compiled for GPUs where a CUDA compiler is present, and packaged in the wheel."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmoe_edu import ops
from dmoe_edu.dmoe import DeepMoE, LayerSpec
from dmoe_edu.ops import emulate, reference
from dmoe_edu.ops.kernels import (
    KERNEL_FILES,
    grid_for,
    kernel_dir,
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
    with pytest.raises(TypeError, match=r"'B'.*must be np.int64, got int"):
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
    assert "C++ compiler" in ops.backend_status()["emulate"]
    with pytest.raises(RuntimeError, match="emulate backend cannot run here"):
        ops.set_backend("emulate")

    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(emulate.CompilerNotFoundError, match="none of c"):
        emulate.find_compiler()


def test_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DMOE_EDU_CACHE", str(blocker / "cache"))
    code = SCALE.replace("scale(", "scale_again(")
    with pytest.warns(UserWarning, match="cannot create the kernel cache"):
        module = emulate.RawModule(code, "fallback.cu")
    assert not module.path.is_relative_to(blocker)
    x = torch.ones(3, dtype=torch.float64)
    y = torch.empty_like(x)
    module.get_function("scale_again")((1,), (4,), (x, y, np.float64(2), np.int64(3)))
    assert y.tolist() == [2.0, 2.0, 2.0]


def test_no_source_means_no_kernel():
    with pytest.raises(ValueError, match="declares no kernel"):
        emulate.RawModule("int x;")


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
