"""The sinusoid example runs end to end with tiny settings, and is reproducible; every script
in examples/ and benchmarks/ answers --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "sinusoid.py"
TINY = ["--iterations", "3", "--meta-batch", "2", "--test-tasks", "5", "--gradient-tasks", "2",
        "--steps", "3", "--order", "2"]
ESTIMATOR_LABELS = ["Full", "Checkpointed", "FirstOrder", "Truncated(2)", "Binomial(2)"]


def run_example(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python examples/<name>.py *args``, its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_example(SCRIPT.stem, *args, timeout=timeout)


def test_help_lists_the_flags() -> None:
    result = run_script("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--steps", "--lr-inner", "--order", "--iterations", "--meta-batch", "--shots",
                 "--test-tasks", "--device", "--dtype", "--seed", "--estimators", "--one-block", "--out"):
        assert flag in result.stdout
    assert "default" in result.stdout


@pytest.mark.parametrize("estimator", ["full", "checkpointed", "truncated"])
def test_sinusoid_meta_batch_in_one_block_equals_a_block_per_task(estimator: str) -> None:
    """The demo's default meta-training (the meta-batch in one block, tasks=4) accumulates the
    same meta-gradient and query MSE as a block per task (float64)."""
    import torch

    sinusoid = import_example("sinusoid")
    tasks = sinusoid.sample_tasks(4, 5, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
    torch.manual_seed(0)
    model = sinusoid.make_model().double()
    results = []
    for one_block in (True, False):
        model.zero_grad(set_to_none=True)
        mse = sinusoid.meta_gradient_step(model, sinusoid.make_estimator(estimator, 3), tasks, 3, 0.01,
                                          one_block=one_block)
        results.append((mse, torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    (mse_one, grad_one), (mse_each, grad_each) = results
    assert abs(mse_one - mse_each) <= 1e-12 * abs(mse_each)
    assert float((grad_one - grad_each).norm() / grad_each.norm()) < 1e-10


def test_tiny_run_writes_table_json_and_plot_and_is_reproducible(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    result = run_script(*TINY, "--out", str(first))
    assert result.returncode == 0, result.stderr

    table = result.stdout
    assert "| estimator | meta-test MSE" in table
    for name in ["no meta-training", *ESTIMATOR_LABELS]:
        assert f"| {name} |" in table, name

    assert (first / "results.md").read_text(encoding="utf-8").count("|") > 20
    png = (first / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000

    results = json.loads((first / "results.json").read_text(encoding="utf-8"))
    rows = {row["estimator"]: row for row in results["rows"]}
    assert list(rows) == ["no meta-training", *ESTIMATOR_LABELS]
    for name in ESTIMATOR_LABELS:
        row = rows[name]
        assert row["test_mse_mean"] > 0 and row["test_mse_ci95"] >= 0
        assert row["gradient_error_median"] >= 0
        # On the CPU the memory column is measured only with --memory on (it is allocator overhead here).
        assert row["ms_per_iteration"] > 0 and row["peak_memory_bytes"] is None
    # Exact estimators agree with Full to rounding; FirstOrder does not.
    assert rows["Checkpointed"]["gradient_error_median"] < 1e-4
    assert rows["Binomial(2)"]["gradient_error_median"] < rows["FirstOrder"]["gradient_error_median"]
    assert rows["Full"]["time_vs_full"] == pytest.approx(1.0)
    assert set(results["learning_curves"]) == {"full", "checkpointed", "first_order", "truncated", "binomial"}
    assert all(len(curve) == 3 for curve in results["learning_curves"].values())

    # Same seed, same numbers: only timings and memory may differ.
    # The second run also takes Implicit, which runs only on request (--estimator implicit).
    again = run_script(*TINY, "--estimator", "full", "binomial", "implicit", "--out", str(second))
    assert again.returncode == 0, again.stderr
    repeat = {row["estimator"]: row for row in json.loads((second / "results.json").read_text())["rows"]}
    assert repeat["Implicit"]["test_mse_mean"] > 0 and "Implicit (iMAML" in again.stdout
    for name in ("no meta-training", "Full", "Binomial(2)"):
        assert repeat[name]["test_mse_mean"] == rows[name]["test_mse_mean"]
        assert repeat[name]["gradient_error_median"] == rows[name]["gradient_error_median"]
    assert results["learning_curves"]["binomial"] == json.loads(
        (second / "results.json").read_text())["learning_curves"]["binomial"]


def test_memory_on_measures_the_process_on_the_cpu(tmp_path: Path) -> None:
    result = run_script(*TINY, "--estimator", "full", "checkpointed", "--memory", "on", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["memory_method"] and all(row["peak_memory_bytes"] >= 0 for row in results["rows"][1:])
    assert "not measured" not in results["caption"]


def test_order_auto_runs(tmp_path: Path) -> None:
    result = run_script("--iterations", "2", "--meta-batch", "1", "--test-tasks", "2", "--gradient-tasks", "1",
                        "--steps", "3", "--order", "auto", "--estimators", "full", "binomial",
                        "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "| Binomial(auto) |" in result.stdout


def test_warnings_are_counted_and_reported_once_per_estimator(tmp_path: Path) -> None:
    # α = 0.05 puts K·α·ℓ well above 1 within a few meta-iterations: Binomial(2) warns on most tasks.
    result = run_script("--iterations", "4", "--meta-batch", "2", "--test-tasks", "2", "--gradient-tasks", "1",
                        "--lr-inner", "0.05", "--order", "2", "--estimators", "full", "binomial",
                        "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "MetaGradientWarning" not in result.stderr  # none printed into the progress bars
    assert "torch CPU threads: 1 (--threads)" in result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: Binomial(2) warned in ")]
    assert notes and all(" of 8 meta-training tasks and " in line for line in notes)
    assert len(notes) == len(set(line.split("; the first:")[0] for line in notes))  # one line per kind
    [row] = [r for r in json.loads((tmp_path / "results.json").read_text())["rows"] if r["name"] == "binomial"]
    assert {w["phase"] for w in row["warnings"]} <= {"meta-training", "evaluation"} and row["warnings"]


def test_fewshot_out_is_a_folder_like_every_other_script(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fewshot.py"), "--dataset", "synthetic", "--synthetic-classes",
         "12", "6", "6", "--filters", "4", "--ways", "3", "--queries", "1", "--eval-queries", "1",
         "--val-tasks", "2", "--test-tasks", "2", "--iterations", "1", "--estimator", "first_order",
         "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.pt", "learning_curves.png", "results.json"]
    assert "torch CPU threads: 1 (--threads)" in completed.stderr


# ------------------------------------------------------------------------------ --help everywhere
#: Modules the scripts import; they are not scripts themselves.
HELPERS = {"examples/cli.py", "examples/fewshot_data.py", "benchmarks/__init__.py"}
SCRIPTS = sorted(path.relative_to(ROOT).as_posix() for folder in ("examples", "benchmarks")
                 for path in (ROOT / folder).glob("*.py") if path.relative_to(ROOT).as_posix() not in HELPERS)


@pytest.mark.parametrize("how", ["file", "module"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script: str, how: str) -> None:
    """``python examples/x.py --help`` and ``python -m examples.x --help`` from the repository root."""
    command = ([sys.executable, script, "--help"] if how == "file"
               else [sys.executable, "-m", script[:-len(".py")].replace("/", "."), "--help"])
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]
    assert "--threads" in result.stdout  # every script sets torch's thread count explicitly


def test_gpu_script_answers_help_without_side_effects(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "OUTDIR" in result.stdout and "THREADS" in result.stdout
    assert not (ROOT / "--help").exists() and not list(tmp_path.iterdir())  # no OUTDIR named --help
    wrong = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--bogus"], capture_output=True,
                           text=True, timeout=60, check=False)
    assert wrong.returncode == 2 and "--help" in wrong.stderr


# ------------------------------------------------------------------------------ dataset distillation


def run_distillation(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_example("distillation", *args, timeout=timeout)


def test_distillation_help_lists_the_flags() -> None:
    result = run_distillation("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--dataset", "--data-root", "--inner-steps", "--lr-inner", "--learn-labels", "--outer-steps",
                 "--outer-lr", "--estimator", "--snapshots", "--eval-inits", "--quick", "--threads", "--seed",
                 "--out", "--json"):
        assert flag in result.stdout, flag
    assert "(default: checkpointed)" in result.stdout and "'sqrt'" in result.stdout


@pytest.mark.parametrize("extra", [[], ["--learn-labels", "--estimator", "full"]], ids=["default", "labels-full"])
def test_distillation_quick_run_writes_table_json_and_images(tmp_path: Path, extra: list[str]) -> None:
    pytest.importorskip("sklearn")
    out, copy = tmp_path / "run", tmp_path / "copy.json"
    result = run_distillation("--quick", "--inner-steps", "4", "--outer-steps", "2", "--out", str(out),
                              "--json", str(copy), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch CPU threads: 1 (--threads)" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["images.png", "results.json", "results.md"]
    assert (out / "images.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| trained on | images | step size | test accuracy (mean ± std) |" in table
    assert "| real images, one per class at random | 10 |" in table
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert json.loads(copy.read_text(encoding="utf-8"))["rows"] == results["rows"]
    rows = results["rows"]
    assert [r["lr_from"] for r in rows] == ["learned", "validation", "validation"]
    assert all(len(r["test_accuracies"]) == 2 and 0 <= r["test_accuracy_mean"] <= 1 for r in rows)
    assert len(results["outer_loss"]) == 2 and results["learned_lr"] > 0
    assert results["estimator"] == ("Full" if "full" in extra else "Checkpointed(snapshots=sqrt)")
    labels = results["labels"]
    if "--learn-labels" in extra:  # a probability vector per image
        assert len(labels) == 10 and all(abs(sum(row) - 1) < 1e-5 for row in labels)
    else:
        assert labels == list(range(10))


def test_distillation_reads_fashion_mnist_idx_files(tmp_path: Path) -> None:
    import gzip
    import struct

    import numpy as np

    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("t10k", 30)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, size=(count, 6, 6)) + 20 * labels[:, None, None]
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (root / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    result = run_distillation("--quick", "--dataset", "fashion-mnist", "--data-root", str(root), "--train-size", "40",
                              "--val-size", "20", "--test-size", "30", "--inner-steps", "3", "--outer-steps", "1",
                              "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["data"] == {"train": 40, "val": 20, "test": 30, "classes": 10, "image_shape": [6, 6]}
    missing = run_distillation("--dataset", "fashion-mnist", "--data-root", str(tmp_path / "nowhere"),
                               "--out", str(tmp_path / "out2"), timeout=60)
    assert missing.returncode != 0 and "--data-root" in missing.stderr


# ------------------------------------------------------------------------------ bilevel workloads
EXAMPLES = ROOT / "examples"




def import_example(name: str):
    """An example script as a module (its folder on sys.path, as the scripts put it)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import importlib

    return importlib.import_module(name)


@pytest.mark.parametrize("name,flags", [
    ("reweighting", ("--corruption", "--val-size", "--steps", "--batch-size", "--lr", "--repeats")),
    ("hyperparameters", ("--inner-steps", "--outer-steps", "--outer-lr", "--lr-init", "--wd-init", "--lr-range",
                         "--wd-range", "--repeats")),
    ("nested", ("--inner-steps", "--alpha-init", "--maml-steps", "--beta", "--meta-batch", "--iterations",
                "--outer-estimator", "--inner-estimator", "--grid")),
])
def test_bilevel_examples_help_lists_the_flags(name: str, flags: tuple[str, ...]) -> None:
    result = run_example(name, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in (*flags, "--quick", "--threads", "--seed", "--dtype", "--out", "--json"):
        assert flag in result.stdout, flag
    assert "default" in result.stdout


@pytest.mark.parametrize("name,args,flag,accepted", [
    ("reweighting", ["--corruption", "1.5"], "--corruption", "a number in [0, 1)"),
    ("reweighting", ["--steps", "0"], "--steps", "an integer >= 1"),
    ("hyperparameters", ["--lr-range", "3,1"], "--lr-range", "0 < LOW <= HIGH"),
    ("hyperparameters", ["--outer-lr", "-1"], "--outer-lr", "a finite number > 0"),
    ("nested", ["--inner-estimator", "binomial"], "--inner-estimator", "choose from"),
])
def test_bilevel_examples_name_the_flag_of_bad_input(name: str, args: list[str], flag: str, accepted: str) -> None:
    result = run_example(name, *args, timeout=60)
    assert result.returncode == 2
    assert f"argument {flag}:" in result.stderr and accepted in result.stderr and repr(args[1]) in result.stderr


def check_outputs(out: Path, png: str, copy: Path) -> dict:
    """The folder holds exactly the table, the results and the figure; --json wrote the same results."""
    assert sorted(p.name for p in out.iterdir()) == sorted([png, "results.json", "results.md"])
    assert (out / png).read_bytes().startswith(b"\x89PNG")
    assert (out / "results.md").read_text(encoding="utf-8").count("|") > 10
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert json.loads(copy.read_text(encoding="utf-8"))["config"] == results["config"]
    return results


def test_reweighting_quick_run(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    result = run_example("reweighting", "--quick", "--out", str(tmp_path / "run"), "--json", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch CPU threads: 1 (--threads)" in result.stderr
    results = check_outputs(tmp_path / "run", "reweighting.png", tmp_path / "c.json")
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["plain", "reweighted", "clean-only"]
    for row in rows.values():
        assert len(row["values"]) == 2 and 0 <= row["mean"] <= 1 and row["std"] >= 0
    assert rows["clean-only"]["early_mean"] is None and 0 <= rows["plain"]["early_mean"] <= 1
    shares = [run["curve"]["corrupted_weight"] for run in results["runs"] if run["method"] == "reweighted"]
    assert all(0 <= share <= 1 for curve in shares for share in curve) and shares[0]
    assert "| reweighted (lookahead) |" in result.stdout


def test_reweighting_weights_equal_a_hand_written_virtual_step() -> None:
    """Ren et al.'s weights by mg.MetaGradient + torch.autograd.grad equal a hand-written one-step
    lookahead (float64), and the model's .grad is left untouched."""
    import torch
    import torch.nn.functional as F

    rw = import_example("reweighting")
    generator = torch.Generator().manual_seed(0)
    x, x_clean = (torch.randn(n, 5, generator=generator, dtype=torch.float64) for n in (12, 7))
    y, y_clean = (torch.randint(0, 3, (n,), generator=generator) for n in (12, 7))
    torch.manual_seed(1)
    model = rw.make_model(5, 3, hidden=6).double()
    got = rw.example_weights(model, x, y, x_clean, y_clean, lr=0.3)
    assert all(p.grad is None for p in model.parameters())

    eps = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())
    loss = (eps * F.cross_entropy(torch.func.functional_call(model, params, (x,)), y, reduction="none")).sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    ahead = {n: p - 0.3 * g for (n, p), g in zip(params.items(), grads)}
    (grad,) = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, ahead, (x_clean,)), y_clean), eps)
    want = torch.clamp(-grad, min=0)
    want = want / want.sum()
    assert (want > 0).any() and (want == 0).any()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_hyperparameters_quick_run(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    result = run_example("hyperparameters", "--quick", "--out", str(tmp_path / "run"),
                         "--json", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = check_outputs(tmp_path / "run", "hyperparameters.png", tmp_path / "c.json")
    assert [row["method"] for row in results["rows"]] == ["hypergradient", "random"]
    for row in results["rows"]:
        assert row["trainings"] == 3 and len(row["val_losses"]) == 2
    for run in results["runs"]:  # three layers: a step size and a weight decay each, every trial
        assert all(len(t["lr"]) == len(t["wd"]) == 3 for m in ("hypergradient", "random") for t in run[m]["trials"])
    assert 0 <= results["hypergradient_wins"] <= 2
    assert "| random search |" in result.stdout
    assert "lower validation loss than random search on " in result.stdout


def test_hyperparameters_hypergradient_equals_a_hand_unroll() -> None:
    """The per-layer step sizes' and weight decays' hypergradients (Checkpointed, float64) equal
    plain autograd through the unrolled steps, and the validation loss equals the plain training's."""
    import argparse

    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    hp = import_example("hyperparameters")
    generator = torch.Generator().manual_seed(0)
    data = argparse.Namespace(x_train=torch.randn(10, 4, generator=generator, dtype=torch.float64),
                              y_train=torch.randint(0, 3, (10,), generator=generator),
                              x_val=torch.randn(8, 4, generator=generator, dtype=torch.float64),
                              y_val=torch.randint(0, 3, (8,), generator=generator),
                              x_test=torch.randn(8, 4, generator=generator, dtype=torch.float64),
                              y_test=torch.randint(0, 3, (8,), generator=generator))
    torch.manual_seed(2)
    model = hp.make_model(4, 3, hidden=5).double()
    log_lr = torch.log(torch.tensor([0.3, 0.2, 0.4], dtype=torch.float64)).requires_grad_(True)
    log_wd = torch.log(torch.tensor([1e-2, 3e-3, 1e-3], dtype=torch.float64)).requires_grad_(True)
    val_loss, _, grad_lr, grad_wd = hp.hypergradient(model, data, log_lr, log_wd, steps=4)
    assert all(p.grad is None for p in model.parameters()) and log_lr.grad is None

    index = hp.layer_index(model)
    params = {n: p.view_as(p) for n, p in model.named_parameters()}
    for _ in range(4):
        loss = hp.inner_loss(functional_call(model, params, (data.x_train,)), data.y_train, params, log_wd.exp(), index)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - log_lr.exp()[index[n]] * g for (n, p), g in zip(params.items(), grads)}
    want_loss = F.cross_entropy(functional_call(model, params, (data.x_val,)), data.y_val)
    want_lr, want_wd = torch.autograd.grad(want_loss, [log_lr, log_wd])
    torch.testing.assert_close(grad_lr, want_lr, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(grad_wd, want_wd, rtol=1e-9, atol=1e-14)
    plain_loss, _ = hp.train_and_evaluate(model, data, log_lr.exp().tolist(), log_wd.exp().tolist(), steps=4)
    assert val_loss == pytest.approx(want_loss.item(), rel=1e-10) == pytest.approx(plain_loss, rel=1e-10)


def test_nested_quick_run_is_exact(tmp_path: Path) -> None:
    result = run_example("nested", "--quick", "--out", str(tmp_path / "run"), "--json", str(tmp_path / "c.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = check_outputs(tmp_path / "run", "nested.png", tmp_path / "c.json")
    assert results["exactness"]["alpha_error"] < 1e-10 and results["exactness"]["theta_error"] < 1e-10
    assert len(results["learning"]["alpha"]) == 4 and all(a > 0 for a in results["learning"]["alpha"])
    assert len(results["grid"]["alpha"]) == 3
    assert "| verdict (threshold 1e-08) | exact |" in result.stdout


@pytest.mark.parametrize("outer,inner", [("full", "full"), ("checkpointed", "full")])
def test_nested_meta_meta_gradient_equals_a_hand_written_double_unroll(outer: str, inner: str) -> None:
    """d L_val / d log α and d L_val / d θ_0 through J MAML steps, each through K adaptation steps
    in a nested block, against plain torch.autograd.grad with create_graph=True (float64)."""
    import math

    import torch

    nested = import_example("nested")
    generator = torch.Generator().manual_seed(3)
    train = [nested.sample_tasks(2, 4, generator, torch.float64) for _ in range(2)]
    val = nested.sample_tasks(2, 4, generator, torch.float64)
    torch.manual_seed(4)
    net = nested.make_model().double()
    log_alpha = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)
    settings = {"beta": 0.1, "inner_steps": 2}
    loss, got = nested.meta_meta_gradient(net, log_alpha, train, val, outer=nested.make_estimator(outer),
                                          inner=nested.make_estimator(inner), wrt_theta=True, **settings)
    want_loss, want = nested.double_unroll(net, log_alpha, train, val, **settings)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert want[0].abs() > 0 and all(p.grad is None for p in net.parameters()) and log_alpha.grad is None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    assert nested.relative_error(got, want) < 1e-10
