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


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_help_lists_the_flags() -> None:
    result = run_script("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--steps", "--lr-inner", "--order", "--iterations", "--meta-batch", "--shots",
                 "--test-tasks", "--device", "--dtype", "--seed", "--estimators", "--out"):
        assert flag in result.stdout
    assert "default" in result.stdout


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
        assert row["ms_per_iteration"] > 0 and row["peak_memory_bytes"] >= 0
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
