"""The dmoe-edu command and the reproduce job, at smoke scale."""

import json

import pytest

from dmoe_edu.cli import main
from dmoe_edu.data import write_idx
from dmoe_edu.paper import TABLE1


def test_reproduce_smoke_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["reproduce", "--preset", "smoke", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out

    assert code == 0
    # The table prints our numbers beside the paper's.
    assert "Table 1" in printed and "4x100-4x100 (gates 50-50)" in printed
    for kind in ("single", "dmoe", "concat", "dnn"):
        assert f"{TABLE1[1].test_error[kind]:.2f}" in printed
    assert "layer1" in printed and "layer2" in printed

    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["runs"]] == ["single", "dmoe", "concat", "dnn"]
    assert {e["model"] for e in results["table"]} == {"single", "dmoe", "concat", "dnn"}
    dmoe = next(e for e in results["table"] if e["model"] == "dmoe")
    assert dmoe["parameters"] == 630_518 and dmoe["paper_test_error"] == 1.42
    scores = results["analysis"]["1"]["scores"]
    assert set(scores) == {"layer1", "layer2"}
    for layer in scores.values():
        for factor in ("translation", "class"):
            assert 0.0 <= layer[factor]["argmax"] <= 1.0
    assert len(results["analysis"]["1"]["by_translation"]["layer1"]) == 4  # E maps
    assert len(results["runs"][0]["history"]) == 15
    # Smoke data is easy: every model must have learnt it.
    assert all(e["test_error"] < 20 for e in results["table"])

    report = (out / "report.html").read_text()
    assert "Fig. 3" in report and "Fig. 2" in report and "joint assignment" in report
    assert "<script src=" not in report  # plotly.js is inline, no CDN
    assert len(list((out / "checkpoints").glob("*.pt"))) == 4


def test_reproduce_on_an_idx_directory_with_chosen_rows_and_models(tmp_path, capsys):
    # A tiny MNIST in IDX form, as a user's --data-dir would hold.
    data_dir = tmp_path / "mnist"
    _write_tiny_mnist(data_dir, n_train=200, n_test=100)

    code = main(["reproduce", "--preset", "paper", "--data-dir", str(data_dir),
                 "--rows", "4,5", "--models", "dmoe,dnn", "--epochs", "2",
                 "--constrained-epochs", "1", "--seeds", "0,1",
                 "--out", str(tmp_path / "out"), "--no-progress"])

    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # The one-layer row has no DNN in the paper, so none is trained.
    assert sorted((r["row"], r["model"], r["seed"]) for r in results["runs"]) == [
        (4, "dmoe", 0), (4, "dmoe", 1), (4, "dnn", 0), (4, "dnn", 1), (5, "dmoe", 0),
        (5, "dmoe", 1)]
    assert results["data"] == {"source": str(data_dir), "train": 200, "test": 100}
    assert all(e["seeds"] == 2 for e in results["table"])
    assert results["train_config"]["epochs"] == 2


def test_resume_reuses_finished_runs_and_refuses_other_settings(tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["reproduce", "--preset", "smoke", "--models", "dmoe", "--epochs", "3",
            "--out", out, "--no-progress"]
    assert main(base) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())

    # Resuming a finished job trains nothing new and gives the same numbers.
    assert main([*base, "--resume"]) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["runs"][0]["history"] == first["runs"][0]["history"]
    assert again["table"] == first["table"]

    # Other settings cannot continue these checkpoints.
    capsys.readouterr()
    assert main([*base[:-3], "--epochs", "4", "--out", out, "--resume"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_resume_refuses_checkpoints_trained_on_other_data(tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["reproduce", "--preset", "smoke", "--models", "dnn", "--epochs", "1",
            "--out", out, "--no-progress"]
    assert main(base) == 0

    # The same settings on other digits must not reuse the synthetic model.
    other = tmp_path / "digits"
    _write_tiny_mnist(other)
    capsys.readouterr()
    assert main([*base, "--data-dir", str(other), "--resume"]) == 2
    assert "another job" in capsys.readouterr().err

    # Without --resume the job replaces the earlier one, and says so.
    with pytest.warns(UserWarning, match="replaces them"):
        assert main([*base, "--data-dir", str(other)]) == 0


def _write_tiny_mnist(data_dir, n_train=100, n_test=50):
    """Random digits in IDX form (images gzipped, labels raw), as MNIST ships."""
    import numpy as np

    rng = np.random.default_rng(0)
    data_dir.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(data_dir / f"{prefix}-labels-idx1-ubyte",
                  (np.arange(n) % 10).astype(np.uint8))


def test_an_interrupted_job_says_what_is_saved(tmp_path, capsys, monkeypatch):
    import dmoe_edu.reproduce as reproduce_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce_module, "train", interrupted)
    code = main(["reproduce", "--preset", "smoke", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 130
    assert "--resume" in capsys.readouterr().err


def test_stale_checkpoints_are_reported(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "row4_dnn_seed3.pt").write_bytes(b"old")
    with pytest.warns(UserWarning, match="row4_dnn_seed3.pt"):
        main(["reproduce", "--preset", "smoke", "--models", "dnn", "--epochs", "1",
              "--out", str(tmp_path), "--no-progress"])


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "--rows", ""],
        ["reproduce", "--models", ","],
        ["reproduce", "--epochs", "0"],
        ["reproduce", "--epochs", "1000000000000000000000"],
        ["reproduce", "--threads", "x"],
        ["reproduce", "--threads", "100000"],
    ],
)
def test_bad_option_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["reproduce", "--preset", "paper"], "--data-dir"),
        (["reproduce", "--preset", "smoke", "--rows", "5", "--models", "dnn"],
         "nothing to train"),
        (["reproduce", "--preset", "smoke", "--seeds=-1"], "seeds must be integers"),
        (["reproduce", "--preset", "smoke", "--seeds", "99999999999999999999"],
         "seeds must be integers"),
        (["reproduce", "--preset", "smoke", "--constrained-epochs", "99"],
         "constrained_epochs"),
        (["reproduce", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["reproduce", "--preset", "smoke", "--rows", "9"], "Table 1 rows"),
        (["reproduce", "--preset", "smoke", "--models", "moe"], "models must be"),
        (["reproduce", "--preset", "smoke", "--margin", "-3"], "margin must be >= 0"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, words, tmp_path, capsys):
    code = main([*argv, "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert words in capsys.readouterr().err


def test_unwritable_outputs_are_reported_not_raised(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["reproduce", "--preset", "smoke", "--models", "dnn", "--epochs",
                 "1", "--out", str(blocker), "--no-progress"]) == 2
    assert str(blocker) in capsys.readouterr().err
    assert main(["download", str(blocker)]) == 2
    assert main(["download", ""]) == 2


def test_duplicates_count_once_and_the_skipped_dnn_is_said(tmp_path, capsys):
    from dmoe_edu.reproduce import plan

    job = plan("smoke", rows=[1, 5, 1], models=["dnn", "dmoe", "dnn"], seeds=[0, 0])
    assert job.runs == ((1, "dnn", 0), (1, "dmoe", 0), (5, "dmoe", 0))
    assert job.skipped == ((5, "dnn"),)


def test_info_names_the_backend(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "ops backend: auto (available: reference" in printed
    assert "torch" in printed


def test_kernels_reports_backends_and_checks_them(capsys):
    from dmoe_edu import ops

    assert main(["kernels"]) == 0
    printed = capsys.readouterr().out
    assert "gating.cu, combine.cu" in printed
    for name, reason in ops.backend_status().items():
        if reason is None:
            assert f"{name:<10} ok" in printed
            # Five checks (both ops, forward and backward) per dtype, all passing.
            rows = [line for line in printed.splitlines()
                    if line.strip().startswith(name) and line.endswith("pass")]
            assert len(rows) == 10, printed
        else:
            assert f"{name:<10} unavailable: {reason}" in printed
    assert "all checks passed on: reference" in printed


def test_kernels_fails_when_a_check_fails(capsys, monkeypatch):
    import torch

    import dmoe_edu.ops.selfcheck as selfcheck

    # Tolerances no float32 computation meets: every float32 row must fail.
    monkeypatch.setitem(selfcheck.TOLERANCE, torch.float32, -1.0)
    assert main(["kernels"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "check(s) FAILED" in printed


def test_kernels_without_a_compiler(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    assert main(["kernels"]) == 0
    printed = capsys.readouterr().out
    assert "emulate    unavailable: the emulate backend compiles" in printed
    assert "all checks passed on: reference." in printed


def test_kernels_with_a_compiler_that_fails(capsys, monkeypatch, tmp_path):
    import shutil

    false = shutil.which("false")
    if false is None:
        pytest.skip("no false program on the PATH")
    monkeypatch.setenv("DMOE_EDU_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", false)
    assert main(["kernels"]) == 0
    printed = capsys.readouterr().out
    assert (f"emulate    unavailable: the C++ compiler {false} (from $CXX) cannot "
            "build the kernels") in printed
    assert "exit status 1" in printed
    assert "all checks passed on: reference." in printed


def test_kernels_prints_the_cache_in_use(capsys, monkeypatch, tmp_path):
    from dmoe_edu.ops import emulate

    if emulate.status() is not None:
        pytest.skip(f"emulate backend unavailable: {emulate.status()}")
    # A cache below a plain file cannot be created: the command must name the
    # private folder the kernels really go to, not the one asked for.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DMOE_EDU_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot be written"):
        assert main(["kernels"]) == 0
    printed = capsys.readouterr().out
    used = emulate.cache_dir()
    assert not used.is_relative_to(blocker)
    assert f"cache {used})" in printed and str(blocker) not in printed


def test_a_closed_pipe_ends_the_command_quietly():
    # `dmoe-edu info | head -1`: the reader leaves early; no error message.
    import subprocess
    import sys

    command = (f"{sys.executable} -c 'from dmoe_edu.cli import main; "
               f"raise SystemExit(main([\"kernels\"]))' | head -c 1 > /dev/null; "
               f"echo ${{PIPESTATUS[0]}}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          timeout=300)
    assert "error" not in done.stderr.lower(), done.stderr
    assert done.stdout.strip() in {"0", "141"}, done.stdout
