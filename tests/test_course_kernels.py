"""What notebook 07 (inside the kernels) adds to the library: reading the kernels'
sources (``kernel_header``, ``kernel_function``), ``cupy_backend.RawModule`` and
``viz.thread_map_figure``. Each is checked against an independent reading: the
files' raw text, the kernel signatures, a naive loop."""

import math

import numpy as np
import pytest
import torch

from dmoe_edu import viz
from dmoe_edu.ops import cupy_backend, emulate, kernels
from dmoe_edu.ops.kernels import (
    KERNEL_FILES,
    kernel_dir,
    kernel_function,
    kernel_header,
    package_kernels,
    parse_kernels,
)

SECTIONS = ["What it computes", "Thread mapping", "Layout", "Types", "Limits"]


def raw_text(file):
    return (kernel_dir() / f"{file}.cu").read_text()


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize("file", KERNEL_FILES)
def test_header_is_the_files_leading_comment(file):
    lines = raw_text(file).splitlines()
    first_code = next(i for i, line in enumerate(lines) if not line.startswith("//"))
    assert kernel_header(file) == "\n".join(lines[:first_code])
    assert kernel_header(file).startswith(f"// {file}.cu:")


@pytest.mark.parametrize("file", KERNEL_FILES)
def test_header_sections_cover_the_header_in_order(file):
    header = kernel_header(file).splitlines()
    found = []
    for section in SECTIONS:
        text = kernel_header(file, section)
        lines = text.splitlines()
        assert lines[0] == f"// {section}"
        assert all(line.startswith("//   ") for line in lines[1:])

        # The section is a run of consecutive header lines, ended by a blank "//".
        start = header.index(lines[0])
        assert header[start:start + len(lines)] == lines
        after = start + len(lines)
        assert after == len(header) or header[after] == "//"
        found.append(start)
    assert found == sorted(found)


def test_header_section_content():
    mapping = kernel_header("gating", "Thread mapping")
    assert "grid-stride loop" in mapping and "no atomics" in mapping
    assert "Layout" not in mapping
    assert "combine_bwd_gates" in kernel_header("combine", "Limits")


def test_header_errors_name_what_exists():
    with pytest.raises(ValueError, match="sections: .*'Thread mapping'"):
        kernel_header("gating", "Threads")
    with pytest.raises(ValueError, match="unknown kernel file 'shim'"):
        kernel_header("shim")


# --------------------------------------------------------------------------- functions


@pytest.mark.parametrize("file", KERNEL_FILES)
def test_every_entry_point_is_cut_out_whole(file):
    source = raw_text(file)
    for name, params in package_kernels(file).items():
        text = kernel_function(file, name)
        assert text.startswith(f'extern "C" __global__ void {name}(')
        assert text.endswith("}") and text in source
        assert text.count("{") == text.count("}") == 1

        # Read back on its own, the cut-out declares the same kernel.
        assert parse_kernels(text) == {name: params}


@pytest.mark.parametrize("file, function, last_statement", [
    ("gating", "softmax_gate_forward",
     "gate_probs[i] = exp_of(row[e] - row_max) / row_sum;"),
    ("gating", "softmax_gate_backward",
     "grad_logits[i] = gate_probs[i] * (grad_probs[i] - dot);"),
    ("combine", "combine_forward", "mixed[i] = acc;"),
    ("combine", "combine_backward_gates", "grad_gates[i] = acc;"),
])
def test_template_helpers_are_cut_from_template_to_last_brace(file, function,
                                                              last_statement):
    text = kernel_function(file, function)
    lines = text.splitlines()
    assert lines[0] == "template <typename T>"
    assert lines[1].startswith(f"__device__ void {function}(")
    assert lines[-1] == "}" and lines[-2] == "    }"
    assert lines[-3].strip() == last_statement
    assert text in raw_text(file)


def test_function_skips_braces_in_comments(monkeypatch):
    source = (
        "// a file\n"
        "__device__ int one() { return 1; }\n"
        "template <typename T>\n"
        "__device__ void body(T* x)\n"
        "{\n"
        "    // a stray } in a comment, and a { too\n"
        "    if (x) { x[0] = one(); }\n"
        "}\n"
        'extern "C" __global__ void k(float* x) { body<float>(x); }\n'
    )
    monkeypatch.setattr(kernels, "kernel_source", lambda name: source)
    assert kernel_function("gating", "body") == source[source.index("template"):
                                                       source.index('extern')
                                                       ].rstrip("\n")
    assert kernel_function("gating", "one") == "__device__ int one() { return 1; }"
    assert kernel_function("gating", "k").endswith("{ body<float>(x); }")


def test_function_errors_name_what_exists():
    with pytest.raises(ValueError, match="functions: .*'combine_forward'"):
        kernel_function("combine", "combine_backward")
    with pytest.raises(ValueError, match="unknown kernel file"):
        kernel_function("gating.cu", "exp_of")


# --------------------------------------------------------------------------- launches


@pytest.mark.skipif(emulate.status() is not None, reason=f"{emulate.status()}")
@pytest.mark.parametrize("grid, block, n", [(1, 1, 5), (2, 4, 24), (3, 8, 24),
                                            (7, 3, 100), (5, 32, 17)])
def test_the_notebooks_owner_kernel_against_a_loop(grid, block, n):
    # The grid-stride loop of notebook 07: element i is written by thread i % T.
    code = """
    extern "C" __global__ void who_wrote(long long* owner, long long n)
    {
        const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        const long long step = (long long)gridDim.x * blockDim.x;
        for (long long i = first; i < n; i += step) owner[i] = first;
    }"""
    owner = torch.full((n,), -1, dtype=torch.int64)
    emulate.RawModule(code).get_function("who_wrote")((grid,), (block,),
                                                      (owner, np.int64(n)))
    threads = grid * block
    expected = [min(i for i in range(threads) if (j - i) % threads == 0)
                for j in range(n)]
    assert owner.tolist() == expected


@pytest.mark.skipif(cupy_backend.status() is None, reason="a GPU is present")
def test_cupy_raw_module_says_why_it_cannot_run():
    with pytest.raises(RuntimeError, match=cupy_backend.status()[:20]):
        cupy_backend.RawModule('extern "C" __global__ void k(float* x) {}')


@pytest.mark.skipif(cupy_backend.status() is not None,
                    reason=f"no GPU backend: {cupy_backend.status()}")
def test_cupy_raw_module_launches_and_checks():
    code = """
    extern "C" __global__ void scale(const float* x, float* y, float a, long long n)
    {
        const long long step = (long long)gridDim.x * blockDim.x;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
             i += step)
            y[i] = a * x[i];
    }"""
    module = cupy_backend.RawModule(code)
    scale = module.get_function("scale")
    x = torch.arange(1001, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    scale((3,), (32,), (x, y, np.float32(2.5), np.int64(1001)))
    torch.testing.assert_close(y.cpu(), 2.5 * torch.arange(1001.0))
    with pytest.raises(ValueError, match="is on cpu"):
        scale((1,), (32,), (x.cpu(), y, np.float32(1), np.int64(1001)))
    with pytest.raises(KeyError, match="kernels: \\['scale'\\]"):
        module.get_function("scal")


def test_raw_modules_refuse_a_source_without_kernels():
    with pytest.raises(ValueError, match="declares no kernel"):
        emulate.RawModule("__device__ int f() { return 0; }")
    if cupy_backend.status() is None:
        with pytest.raises(ValueError, match="declares no kernel"):
            cupy_backend.RawModule("__device__ int f() { return 0; }")


# --------------------------------------------------------------------------- figure


def test_thread_map_figure_against_a_loop():
    owners = {"loop": np.array([[0, 1, 2], [3, 0, 1]]),
              "no loop": np.array([[0, 1, 2], [3, -1, -1]])}
    fig = viz.thread_map_figure(owners, title="t")
    assert [trace.type for trace in fig.data] == ["heatmap", "heatmap"]
    assert [a.text for a in fig.layout.annotations] == ["loop", "no loop"]
    for trace, owner in zip(fig.data, owners.values()):
        z = np.asarray(trace.z, dtype=float)
        for (row, col), value in np.ndenumerate(owner):
            if value < 0:
                assert math.isnan(z[row, col]) and trace.text[row][col] == "none"
            else:
                assert z[row, col] == value and trace.text[row][col] == str(value)
        assert (trace.zmin, trace.zmax) == (0, 3)
    assert [trace.showscale for trace in fig.data] == [True, False]


def test_thread_map_figure_takes_tensors_and_checks_input():
    fig = viz.thread_map_figure({"a": torch.arange(6).view(2, 3)})
    assert np.asarray(fig.data[0].z).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="at least one panel"):
        viz.thread_map_figure({})
    with pytest.raises(ValueError, match="integer array"):
        viz.thread_map_figure({"a": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="integer array"):
        viz.thread_map_figure({"a": np.arange(3)})
    with pytest.raises(ValueError, match="-1 marks"):
        viz.thread_map_figure({"a": np.array([[0, -2]])})
    with pytest.raises(ValueError, match="one shape"):
        viz.thread_map_figure({"a": np.zeros((2, 2), int),
                               "b": np.zeros((2, 3), int)})
