"""Benchmarks of the two hot ops, ``softmax_gate`` and ``combine``, on CPU and GPU.

Usage:
    python bench/ops.py [--quick] [--max-gib 3] [--max-gpu-gib N]
                        [--only cpu|gpu] [--out bench/RESULTS.md]

Four measurements, each reported as ratios of medians taken round-robin
(A, B, A, B, ...) in one process, so that drift from other work on the machine
hits both sides alike:

1. **CPU bandwidth**: the ``reference`` backend's combine forward, combine
   backward (both gradients), softmax_gate forward and softmax_gate
   forward+backward at B = 65,536, E = 4, 16, 64 and H = 128, 512 (float32),
   as effective bandwidth (the bytes an op must read and write over its time)
   against a copy of the same tensor into a preallocated buffer. No goal.
2. **CPU per call**: the same ops at the paper's sizes (B = 256, 512, 1024;
   E = 4, 16; H = 100), ``reference`` against ``emulate`` (the CUDA kernels
   run thread by thread on the CPU). No goal: the ratio is for information.
3. **GPU bandwidth** (only where the ``cupy`` backend runs): the CUDA kernels
   against torch eager (``reference`` on CUDA tensors) and a device copy, at
   the sizes of 1. Goals: combine forward >= 75 % of the copy's bandwidth,
   the other ops >= 60 %, and never slower than torch eager.
4. **GPU per call**: each op at the paper's sizes against empty kernels
   launched with the same grids on the same stream. Goals: within 1.5x of
   the empty launches, and never slower than torch eager.

The CPU parts run on one torch thread. Sizes whose working set exceeds
``--max-gib`` (host) or ``--max-gpu-gib`` (device; default 80 % of the free
device memory) are reported as skipped rows. ``--quick`` takes few samples and
B = 4,096 instead of 65,536 (for the test suite; its numbers are only
indicative). ``--only`` runs one part. The script always prints the markdown
report; with ``--out`` it writes it into that file's ``ops`` section (see
``bench/_report.py``; ``ops-cpu`` or ``ops-gpu`` with ``--only``), leaving the
rest of the file as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
from _report import write_section
from train_step import machine, quartiles, verdict

from dmoe_edu import ops

B_LARGE, B_QUICK = 65_536, 4_096
LARGE_E, LARGE_H = (4, 16, 64), (128, 512)
PAPER_B, PAPER_E, PAPER_H = (256, 512, 1024), (4, 16), 100
FLOAT = 4  # bytes per float32

GOAL_COMBINE_FWD_PCT = 75.0
GOAL_OTHER_PCT = 60.0
GOAL_LAUNCH_RATIO = 1.5

OPS = {
    "combine_fwd": "combine forward",
    "combine_bwd": "combine backward",
    "gate_fwd": "softmax_gate forward",
    "gate_fwd_bwd": "softmax_gate fwd+bwd",
}
COMBINE_OPS = ("combine_fwd", "combine_bwd")
GATE_OPS = ("gate_fwd", "gate_fwd_bwd")
MAX_ITERS = 10_000

EMPTY_KERNEL = 'extern "C" __global__ void empty_kernel() {}'


def log(message: str) -> None:
    """Progress on stderr, so that a cut-off run still shows how far it got."""
    print(f"[bench/ops] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sizes


def op_bytes(op: str, B: int, E: int, H: int) -> int:
    """The fewest bytes ``op`` must read and write (float32).

    combine forward reads expert_out and the gates, writes mixed: BEH + BE + BH.
    combine backward reads grad_mixed, the gates and expert_out, writes both
    gradients: 2BEH + 2BE + BH. softmax_gate forward reads the logits and writes
    the probabilities: 2BE; its backward reads the saved probabilities and the
    incoming gradient and writes the logits' gradient: 3BE, so 5BE for both.
    """
    elements = {
        "combine_fwd": B * E * H + B * E + B * H,
        "combine_bwd": 2 * B * E * H + 2 * B * E + B * H,
        "gate_fwd": 2 * B * E,
        "gate_fwd_bwd": 5 * B * E,
    }[op]
    return FLOAT * elements


def working_set(group: str, B: int, E: int, H: int) -> int:
    """Bytes held at the peak of one size's measurement (an upper estimate).

    combine: expert_out, the copy's buffer and grad_expert (3BEH), the gates,
    their gradient and a spare (3BE), grad_mixed and two mixed outputs (3BH).
    softmax_gate: eight (B, E) tensors.
    """
    if group == "combine":
        return FLOAT * (3 * B * E * H + 3 * B * E + 3 * B * H)
    return FLOAT * 8 * B * E


def gib(nbytes: float) -> float:
    return nbytes / 2**30


# ---------------------------------------------------------------- timing


def cpu_timer(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` back-to-back calls (wall clock)."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def gpu_timer(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of ``fn`` on the current stream, by CUDA events.

    The device is idle when the start event is recorded and the end event is
    waited for, so a call that is bound by its launch cost on the host is timed
    at that cost.
    """
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def calibrate(fn: Callable[[], object], target_s: float, timer) -> int:
    """Calls of ``fn`` per sample so that one sample lasts about ``target_s``."""
    per_call = timer(fn, 1)
    if per_call < target_s / 3:
        n = min(MAX_ITERS, max(3, int(target_s / 3 / per_call)))
        per_call = timer(fn, n)
    return max(1, min(MAX_ITERS, round(target_s / max(per_call, 1e-9))))


def interleaved(
    fns: dict[str, Callable[[], object]],
    samples: int,
    target_s: float,
    timer=cpu_timer,
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager]]
    | None = None,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round-robin sample.

    Each function gets its own number of calls per sample (about ``target_s``
    of work). ``contexts`` maps a name to a context entered around that
    function's warm-up and each of its samples, outside the timed region (for
    example the ops backend it runs on).
    """
    contexts = contexts or {}

    def within(name: str) -> contextlib.AbstractContextManager:
        return contexts[name]() if name in contexts else contextlib.nullcontext()

    iters = {}
    for name, fn in fns.items():
        with within(name):
            for _ in range(warmup):
                fn()
            iters[name] = calibrate(fn, target_s, timer)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            with within(name):
                times[name].append(timer(fn, iters[name]))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- workloads


def make_tensors(B: int, E: int, H: int, device: torch.device,
                 group: str) -> SimpleNamespace:
    """Inputs (and preallocated kernel outputs) for one size, seeded."""
    torch.manual_seed(0)
    t = SimpleNamespace()
    if group == "combine":
        t.x = torch.randn(B, E, H, device=device)  # expert_out (B, E, H)
        t.g = torch.softmax(torch.randn(B, E, device=device), dim=1)  # (B, E)
        t.gm = torch.randn(B, H, device=device)  # grad_mixed (B, H)
        t.src = t.x
    else:
        t.logits = torch.randn(B, E, device=device)  # (B, E)
        t.gp = torch.randn(B, E, device=device)  # grad_probs (B, E)
        t.src = t.logits
    t.dst = torch.empty_like(t.src)
    return t


def make_op(op: str, t: SimpleNamespace, backend: str) -> Callable[[], object]:
    """One call of ``op`` through :mod:`dmoe_edu.ops`.

    Forward calls run on the backend that is active when they are called (see
    the contexts of :func:`interleaved`); a backward is bound to the backend
    its graph was built on, here, once: every call reruns that backward alone
    (``retain_graph``) and returns the gradients without accumulating them.
    """
    if op == "combine_fwd":
        return partial(ops.combine, t.g, t.x)
    if op == "gate_fwd":
        return partial(ops.softmax_gate, t.logits)
    if op == "combine_bwd":
        g = t.g.detach().requires_grad_(True)
        x = t.x.detach().requires_grad_(True)  # shares expert_out's storage
        with ops.use_backend(backend):
            mixed = ops.combine(g, x)
        return partial(torch.autograd.grad, mixed, (g, x), t.gm, retain_graph=True)
    logits = t.logits.detach().requires_grad_(True)

    def forward_backward() -> None:
        probs = ops.softmax_gate(logits)
        torch.autograd.grad(probs, logits, t.gp)

    return forward_backward


def on_backend(backend: str) -> Callable[[], contextlib.AbstractContextManager]:
    return partial(ops.use_backend, backend)


def bandwidth_row(op: str, B: int, E: int, H: int | None,
                  raw: dict[str, list[float]], name: str, copied: int) -> dict:
    """Effective bandwidth of ``raw[name]`` against ``raw['copy']``.

    ``copied`` is the size of the copy's source in bytes (read, then written).
    """
    moved = op_bytes(op, B, E, H or 0)
    copy_bytes = 2 * copied
    t_op, t_copy = median(raw[name]), median(raw["copy"])
    paired = [100 * (moved / a) / (copy_bytes / c)
              for a, c in zip(raw[name], raw["copy"])]
    return {
        "op": op, "E": E, "H": H, "moved": moved, "t_copy": t_copy, "t_op": t_op,
        "copy_gbs": copy_bytes / t_copy / 1e9, "op_gbs": moved / t_op / 1e9,
        "pct": 100 * (moved / t_op) / (copy_bytes / t_copy),
        "pct_q": quartiles(paired),
    }


def large_sizes(B: int, limit: int, device: torch.device, quick: bool,
                backends: tuple[str, ...], timer) -> list[dict]:
    """Section 1 (CPU: ``reference``) or 3 (GPU: ``reference`` and ``cupy``).

    Per size, the ops of one group and a copy of their largest input, round
    robin. Each row holds, per backend, the bandwidth figures of
    :func:`bandwidth_row`; a size over ``limit`` bytes gives skipped rows.
    """
    samples = 3 if quick else 11
    target = (0.003 if quick else 0.03) if device.type == "cpu" else (
        0.002 if quick else 0.005)
    jobs = [("combine", E, H) for E in LARGE_E for H in LARGE_H]
    jobs += [("gate", E, None) for E in LARGE_E]
    rows = []
    for group, E, H in jobs:
        group_ops = COMBINE_OPS if group == "combine" else GATE_OPS
        need = working_set(group, B, E, H or 0)
        base = {"E": E, "H": H}
        if need > limit:
            rows += [{**base, "op": op, "skipped": need} for op in group_ops]
            continue
        log(f"{device.type}: {group} B={B} E={E} H={H}")
        try:
            t = make_tensors(B, E, H or 0, device, group)
            fns: dict[str, Callable[[], object]] = {
                "copy": partial(t.dst.copy_, t.src)}
            contexts = {}
            for backend in backends:
                for op in group_ops:
                    fns[f"{backend}:{op}"] = make_op(op, t, backend)
                    contexts[f"{backend}:{op}"] = on_backend(backend)
            raw = interleaved(fns, samples, target, timer, contexts,
                              warmup=1 if B * E * (H or 1) > 2**24 else 2)
            copied = t.src.numel() * t.src.element_size()
            for op in group_ops:
                row = {**base, "op": op}
                for backend in backends:
                    row[backend] = bandwidth_row(op, B, E, H, raw,
                                                 f"{backend}:{op}", copied)
                rows.append(row)
        except Exception as exc:  # report it in the table, go on with the rest
            log(f"error: {exc!r}")
            rows += [{**base, "op": op, "error": exc} for op in group_ops]
        finally:
            t = fns = raw = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    order = list(OPS)
    return sorted(rows, key=lambda r: (order.index(r["op"]), r["E"], r["H"] or 0))


def cpu_paper_sizes(quick: bool) -> tuple[list[dict], str | None]:
    """Section 2: time per call, ``reference`` against ``emulate``, on the CPU."""
    emulate_reason = ops.backend_status()["emulate"]
    backends = ("reference",) if emulate_reason else ("reference", "emulate")
    samples = 3 if quick else 11
    target = 0.002 if quick else 0.02
    rows = []
    cpu = torch.device("cpu")
    for B in PAPER_B:
        for E in PAPER_E:
            log(f"cpu: paper size B={B} E={E} H={PAPER_H}")
            tensors = {group: make_tensors(B, E, PAPER_H, cpu, group)
                       for group in ("combine", "gate")}
            fns, contexts = {}, {}
            for op in OPS:
                t = tensors["combine" if op in COMBINE_OPS else "gate"]
                for backend in backends:
                    fns[f"{backend}:{op}"] = make_op(op, t, backend)
                    contexts[f"{backend}:{op}"] = on_backend(backend)
            t_med = {name: median(v) for name, v in
                     interleaved(fns, samples, target, cpu_timer, contexts).items()}
            for op in OPS:
                rows.append({
                    "op": op, "B": B, "E": E,
                    "H": PAPER_H if op in COMBINE_OPS else None,
                    "reference": t_med[f"reference:{op}"],
                    "emulate": t_med.get(f"emulate:{op}"),
                })
    order = list(OPS)
    rows.sort(key=lambda r: (order.index(r["op"]), r["B"], r["E"]))
    return rows, emulate_reason


# ---------------------------------------------------------------- GPU only


def launch_plans(t: SimpleNamespace, B: int, E: int, H: int) -> dict[str, list]:
    """The kernel launches of each op: ``(file, kernel, work, args)``, in order.

    The same kernels, work sizes and arguments as :mod:`dmoe_edu.ops.kernels`
    launches, on preallocated outputs.
    """
    sizes = (np.int64(B), np.int64(E), np.int64(H))
    b, e = np.int64(B), np.int64(E)
    gate_fwd = ("gating", "softmax_gate_fwd_f32", B * E,
                (t.logits, None, np.int64(0), t.probs, b, e))
    return {
        "combine_fwd": [("combine", "combine_fwd_f32", B * H,
                         (t.g, t.x, t.mixed, *sizes))],
        "combine_bwd": [
            ("combine", "combine_bwd_gates_f32", B * E, (t.x, t.gm, t.gg, *sizes)),
            ("combine", "combine_bwd_expert_f32", B * E * H,
             (t.g, t.gm, t.gx, *sizes)),
        ],
        "gate_fwd": [gate_fwd],
        "gate_fwd_bwd": [gate_fwd, ("gating", "softmax_gate_bwd_f32", B * E,
                                    (t.probs, t.gp, t.glog, b, e))],
    }


def gpu_paper_sizes(device: torch.device, quick: bool) -> list[dict]:
    """Section 4: each op against empty launches with its grids, and torch eager.

    Per op, four functions timed round-robin: the empty kernel launched with
    each of the op's grids, the op's kernels alone (the package's checked
    launcher on preallocated outputs), the op through ``dmoe_edu.ops`` on the
    ``cupy`` backend, and the same op on ``reference`` (torch eager).
    """
    import cupy

    from dmoe_edu.ops import cupy_backend
    from dmoe_edu.ops.kernels import grid_for

    backend = cupy_backend._backend
    index = device.index if device.index is not None else torch.cuda.current_device()
    max_blocks = backend.max_blocks(torch.device("cuda", index))
    with cupy.cuda.Device(index):
        empty = cupy.RawKernel(EMPTY_KERNEL, "empty_kernel")

    @contextlib.contextmanager
    def torch_stream():
        # Launch on PyTorch's current stream, as the cupy backend does.
        with cupy.cuda.Device(index), cupy_backend._cupy_stream(index):
            yield

    samples = 5 if quick else 11
    target = 0.001 if quick else 0.002
    rows = []
    for B in PAPER_B:
        for E in PAPER_E:
            H = PAPER_H
            log(f"gpu: paper size B={B} E={E} H={H}")
            try:
                t = make_tensors(B, E, H, device, "combine")
                t.__dict__.update(vars(make_tensors(B, E, H, device, "gate")))
                t.src = t.dst = None
                t.mixed = torch.empty(B, H, device=device)
                t.gg = torch.empty(B, E, device=device)
                t.gx = torch.empty(B, E, H, device=device)
                t.probs = torch.empty(B, E, device=device)
                t.glog = torch.empty(B, E, device=device)
                fns, contexts = {}, {}
                for op, plan in launch_plans(t, B, E, H).items():
                    grids = [grid_for(work, max_blocks) for _, _, work, _ in plan]
                    kernels = [(backend.kernel(f, k, device), grid, args)
                               for (f, k, _, args), grid in zip(plan, grids)]

                    def run_empty(grids=grids) -> None:
                        for grid, block in grids:
                            empty((grid,), (block,), ())

                    def run_kernels(kernels=kernels) -> None:
                        for kernel, (grid, block), args in kernels:
                            kernel((grid,), (block,), args)

                    fns[f"empty:{op}"] = run_empty
                    contexts[f"empty:{op}"] = torch_stream
                    fns[f"kernels:{op}"] = run_kernels
                    for name in ("cupy", "reference"):
                        fns[f"{name}:{op}"] = make_op(op, t, name)
                        contexts[f"{name}:{op}"] = on_backend(name)
                t_med = {name: median(v) for name, v in interleaved(
                    fns, samples, target, gpu_timer, contexts).items()}
                for op, plan in launch_plans(t, B, E, H).items():
                    rows.append({
                        "op": op, "B": B, "E": E,
                        "H": H if op in COMBINE_OPS else None,
                        "launches": len(plan), "empty": t_med[f"empty:{op}"],
                        "kernels": t_med[f"kernels:{op}"],
                        "cupy": t_med[f"cupy:{op}"],
                        "reference": t_med[f"reference:{op}"],
                    })
            except Exception as exc:
                log(f"error: {exc!r}")
                rows += [{"op": op, "B": B, "E": E,
                          "H": H if op in COMBINE_OPS else None, "error": exc}
                         for op in OPS]
            finally:
                t = fns = kernels = None
                torch.cuda.empty_cache()
    order = list(OPS)
    rows.sort(key=lambda r: (order.index(r["op"]), r["B"], r["E"]))
    return rows


def gpu_part(quick: bool, max_gpu_gib: float | None) -> dict:
    """Sections 3 and 4, or ``{"reason": ...}`` where they cannot run."""
    reason = ops.backend_status()["cupy"]
    if reason:
        return {"reason": reason}
    try:
        import cupy

        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        free, _ = torch.cuda.mem_get_info(device)
        limit = int(max_gpu_gib * 2**30) if max_gpu_gib else int(0.8 * free)
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        info = (f"{props.name} ({props.multi_processor_count} SMs, "
                f"{gib(props.total_memory):.0f} GiB), CuPy {cupy.__version__}, "
                f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}, "
                f"size limit {gib(limit):.1f} GiB")
        started = time.perf_counter()
        large = large_sizes(B_QUICK if quick else B_LARGE, limit, device, quick,
                            ("reference", "cupy"), gpu_timer)
        paper = gpu_paper_sizes(device, quick)
        log(f"gpu part took {time.perf_counter() - started:.1f} s")
        return {"info": info, "large": large, "paper": paper}
    except Exception as exc:
        traceback.print_exc()
        return {"reason": f"the GPU benchmark failed: {exc!r}"}


# ---------------------------------------------------------------- report


def table(head: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A markdown table; ``align`` holds one ``l`` or ``r`` per column."""
    assert len(align) == len(head) and all(len(r) == len(head) for r in rows)
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (head, rule, *rows)]


def cell(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def error_text(exc: Exception) -> str:
    return cell(f"error: {type(exc).__name__}: {str(exc)[:100]}")


def skipped_text(need: int) -> str:
    return f"skipped (needs {gib(need):.3g} GiB)"


def fmt_h(h: int | None) -> str:
    return "-" if h is None else str(h)


def bw_goal(op: str) -> float:
    return GOAL_COMBINE_FWD_PCT if op == "combine_fwd" else GOAL_OTHER_PCT


def gpu_large_ok(row: dict) -> bool:
    cupy, ref = row["cupy"], row["reference"]
    return cupy["pct"] >= bw_goal(row["op"]) and cupy["t_op"] <= ref["t_op"]


def gpu_paper_ok(row: dict) -> bool:
    return (row["cupy"] <= GOAL_LAUNCH_RATIO * row["empty"]
            and row["cupy"] <= row["reference"])


def span(values: list[float], unit: str = "", digits: int = 0) -> str:
    if not values:
        return "none measured"
    lo, hi = (f"{v:.{digits}f}" for v in (min(values), max(values)))
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def report(cpu: dict | None, gpu: dict, argv: list[str], args) -> str:
    m = machine()
    now = datetime.datetime.now(datetime.timezone.utc)
    B = B_QUICK if args.quick else B_LARGE
    gpu_line = (f"- GPU: {gpu['info']}; figures in sections 3 and 4."
                if "info" in gpu else f"- GPU figures not measured: {gpu['reason']}")
    out = [
        "# Benchmarks: the hot ops `softmax_gate` and `combine` (CPU and GPU)",
        "",
        f"- Date: {now:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {m['nproc']} CPUs (`nproc`), {m['cpu']}; load average "
        f"{m['load']} when the report was written",
        f"- torch {m['torch']}, Python {m['python']}, "
        f"torch threads: {m['threads']}",
        f"- Command: `python {' '.join(['bench/ops.py', *argv])}`",
        "- Method: medians of round-robin samples (A, B, A, B, ...) in one "
        "process, each sample a calibrated number of back-to-back calls; every "
        "figure below is a ratio of two such medians. The quartiles are those "
        "of the ratio within each back-to-back pair. CPU: wall clock. GPU: "
        "CUDA events around each sample, after warm-up, synchronised.",
        gpu_line,
    ]
    if args.quick:
        out.append(f"- **Quick mode**: B = {B:,} for the large sizes, few samples; "
                   "indicative only.")
    summary = []

    if cpu is not None:
        out += [
            "",
            f"## 1. CPU: `reference` ops against a memory copy (B = {B:,})",
            "",
            "Effective bandwidth = the fewest bytes an op must read and write, "
            "over its time (float32, 4 bytes an element): combine forward "
            "`4 (BEH + BE + BH)` (reads expert_out and the gates, writes "
            "mixed); combine backward, both gradients, `4 (2BEH + 2BE + BH)` "
            "(reads grad_mixed, the gates and expert_out, writes grad_expert "
            "and grad_gates); softmax_gate forward `4 * 2BE`; softmax_gate "
            "forward+backward `4 * 5BE` (the backward reads the saved "
            "probabilities and the incoming gradient, writes the logits' "
            "gradient). The copy is `dst.copy_(src)` into a preallocated "
            "buffer, `src` being expert_out for combine and the logits for "
            "softmax_gate; it counts `2 * src` bytes. The ops allocate their "
            "outputs at every call, as in training (from 32 MB each is a fresh "
            "`mmap`, whose page faults count in the op's time). A backward is "
            "timed alone, rerun on a retained graph. Sizes whose working set "
            f"exceeds `--max-gib` = {args.max_gib:g} are skipped. No goal: the "
            "CPU reference is the oracle, and `bench/train_step.py` holds its "
            "combine to one.",
            "",
        ]
        head = ["op", "E", "H", "moved (MB)", "copy (ms)", "op (ms)", "copy GB/s",
                "op GB/s", "op % of copy", "pairs' quartiles", "goal", "result"]
        rows = []
        for r in cpu["large"]:
            lead = [OPS[r["op"]], str(r["E"]), fmt_h(r["H"])]
            if "skipped" in r or "error" in r:
                text = (skipped_text(r["skipped"]) if "skipped" in r
                        else error_text(r["error"]))
                rows.append(lead + [text] + [""] * 6 + ["-", "(no goal)"])
                continue
            b = r["reference"]
            rows.append(lead + [
                f"{b['moved'] / 1e6:.1f}", f"{b['t_copy'] * 1e3:.3f}",
                f"{b['t_op'] * 1e3:.3f}", f"{b['copy_gbs']:.1f}",
                f"{b['op_gbs']:.1f}", f"{b['pct']:.0f}",
                f"{b['pct_q'][0]:.0f}-{b['pct_q'][1]:.0f}", "-", "(no goal)"])
        out += table(head, "lrr" + "r" * 7 + "ll", rows)

        out += [
            "",
            "## 2. CPU: time per call at the paper's sizes, `reference` and "
            "`emulate`",
            "",
            f"B = {', '.join(map(str, PAPER_B))}; E = "
            f"{', '.join(map(str, PAPER_E))}; H = {PAPER_H} (float32). Here a "
            "fixed cost per call dominates. `emulate` runs the CUDA kernels "
            "compiled for the CPU, one simulated thread after another: it is "
            "expected to be much slower, and its ratio to `reference` is given "
            "for information, with no goal.",
        ]
        if cpu["emulate_reason"]:
            out.append(f"`emulate` not measured: {cell(cpu['emulate_reason'])}")
        out.append("")
        head = ["op", "B", "E", "H", "reference (us)", "emulate (us)",
                "emulate / reference", "goal", "result"]
        rows = []
        for r in cpu["paper"]:
            emu = r["emulate"]
            rows.append([
                OPS[r["op"]], str(r["B"]), str(r["E"]), fmt_h(r["H"]),
                f"{r['reference'] * 1e6:.1f}",
                "not measured" if emu is None else f"{emu * 1e6:.1f}",
                "" if emu is None else f"{emu / r['reference']:.1f}x",
                "-", "(no goal)"])
        out += table(head, "lrrrrrrll", rows)

        for op in OPS:
            done = [r["reference"]["pct"] for r in cpu["large"]
                    if r["op"] == op and "reference" in r]
            total = sum(r["op"] == op for r in cpu["large"])
            summary.append(
                f"- CPU `reference` {OPS[op]}: {span(done, ' %')} of the copy's "
                f"bandwidth ({len(done)} of {total} sizes measured; no goal).")
        ratios = [r["emulate"] / r["reference"] for r in cpu["paper"]
                  if r["emulate"] is not None]
        per_call = [r["reference"] * 1e6 for r in cpu["paper"]]
        summary.append(
            f"- Paper sizes, CPU: `reference` {span(per_call, ' us', 1)} per "
            f"call; `emulate` {span(ratios, 'x', 1)} its time (no goal).")

    if "info" in gpu:
        out += [
            "",
            f"## 3. GPU: `cupy` kernels against torch eager and a device copy "
            f"(B = {B:,})",
            "",
            "The ops through `dmoe_edu.ops` on CUDA tensors, on the `cupy` "
            "backend (the package's kernels) and on `reference` (torch eager), "
            "with the byte counts of section 1, against `dst.copy_(src)` on the "
            f"device. Goals: combine forward >= {GOAL_COMBINE_FWD_PCT:.0f} % of "
            f"the copy's bandwidth, the others >= {GOAL_OTHER_PCT:.0f} %, and "
            "`cupy` never slower than torch eager; `pass` needs both.",
            "",
        ]
        head = ["op", "E", "H", "moved (MB)", "copy GB/s", "torch GB/s",
                "cupy GB/s", "cupy % of copy", "pairs' quartiles",
                "cupy / torch time", "goal", "result"]
        rows = []
        for r in gpu["large"]:
            lead = [OPS[r["op"]], str(r["E"]), fmt_h(r["H"])]
            goal = f">= {bw_goal(r['op']):.0f} %, <= torch"
            if "skipped" in r:
                rows.append(lead + [skipped_text(r["skipped"])] + [""] * 6
                            + ["not measured", "(no goal)"])
                continue
            if "error" in r:
                rows.append(lead + [error_text(r["error"])] + [""] * 6
                            + [goal, "FAIL"])
                continue
            c, ref = r["cupy"], r["reference"]
            rows.append(lead + [
                f"{c['moved'] / 1e6:.1f}", f"{c['copy_gbs']:.0f}",
                f"{ref['op_gbs']:.0f}", f"{c['op_gbs']:.0f}", f"{c['pct']:.0f}",
                f"{c['pct_q'][0]:.0f}-{c['pct_q'][1]:.0f}",
                f"{c['t_op'] / ref['t_op']:.2f}", goal,
                verdict(gpu_large_ok(r))])
        out += table(head, "lrr" + "r" * 7 + "ll", rows)

        out += [
            "",
            "## 4. GPU: time per call at the paper's sizes against an empty launch",
            "",
            "`empty` launches `extern \"C\" __global__ void empty_kernel() {}` "
            "(a `cupy.RawKernel`) once per kernel of the op, with the op's "
            "grids (`grid_for`), on torch's current stream; `kernels` launches "
            "the op's kernels through the package's checked launcher on "
            "preallocated outputs; `cupy op` is the op through `dmoe_edu.ops` "
            "(checks, allocations, autograd); `torch` the `reference` backend. "
            f"Goals: `cupy op` <= {GOAL_LAUNCH_RATIO}x `empty`, and <= `torch`.",
            "",
        ]
        head = ["op", "B", "E", "H", "launches", "empty (us)", "kernels (us)",
                "cupy op (us)", "op / empty", "torch (us)", "goal", "result"]
        goal = f"<= {GOAL_LAUNCH_RATIO}x empty, <= torch"
        rows = []
        for r in gpu["paper"]:
            lead = [OPS[r["op"]], str(r["B"]), str(r["E"]), fmt_h(r["H"])]
            if "error" in r:
                rows.append(lead + [error_text(r["error"])] + [""] * 5
                            + [goal, "FAIL"])
                continue
            rows.append(lead + [
                str(r["launches"]), f"{r['empty'] * 1e6:.1f}",
                f"{r['kernels'] * 1e6:.1f}", f"{r['cupy'] * 1e6:.1f}",
                f"{r['cupy'] / r['empty']:.2f}", f"{r['reference'] * 1e6:.1f}",
                goal, verdict(gpu_paper_ok(r))])
        out += table(head, "lrrrrrrrrrll", rows)

        for op in OPS:
            measured = [r for r in gpu["large"] if r["op"] == op and "skipped" not in r]
            passed = sum("cupy" in r and gpu_large_ok(r) for r in measured)
            summary.append(
                f"- GPU {OPS[op]}, large sizes (>= {bw_goal(op):.0f} % of copy, "
                f"<= torch): {verdict(passed == len(measured) > 0)} ({passed} of "
                f"{len(measured)} sizes measured).")
        passed = sum("cupy" in r and gpu_paper_ok(r) for r in gpu["paper"])
        summary.append(
            f"- GPU paper sizes (<= {GOAL_LAUNCH_RATIO}x empty launch, <= torch): "
            f"{verdict(passed == len(gpu['paper']))} ({passed} of "
            f"{len(gpu['paper'])} rows).")
    else:
        summary.append(f"- GPU figures not measured: {gpu['reason']}")

    out += ["", "## Summary", "", *summary]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"few samples, B = {B_QUICK:,} (for the test suite)")
    parser.add_argument("--max-gib", type=float, default=3.0,
                        help="skip CPU sizes whose working set exceeds this "
                        "(GiB; default 3)")
    parser.add_argument("--max-gpu-gib", type=float, default=None,
                        help="skip GPU sizes whose working set exceeds this "
                        "(GiB; default 80%% of the free device memory)")
    parser.add_argument("--only", choices=("cpu", "gpu"),
                        help="run one part only")
    parser.add_argument("--out", help="write the report into this file's section")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    torch.set_num_threads(1)
    cpu = None
    if args.only != "gpu":
        started = time.perf_counter()
        large = large_sizes(B_QUICK if args.quick else B_LARGE,
                            int(args.max_gib * 2**30), torch.device("cpu"),
                            args.quick, ("reference",), cpu_timer)
        paper, emulate_reason = cpu_paper_sizes(args.quick)
        cpu = {"large": large, "paper": paper, "emulate_reason": emulate_reason}
        log(f"cpu part took {time.perf_counter() - started:.1f} s")
    gpu = (gpu_part(args.quick, args.max_gpu_gib) if args.only != "cpu"
           else {"reason": "--only cpu"})
    text = report(cpu, gpu, argv, args)
    print(text)
    if args.out:
        write_section(args.out, "ops" if args.only is None else f"ops-{args.only}",
                      text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
