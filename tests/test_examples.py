"""The sinusoid example runs end to end with tiny settings, and is reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sinusoid.py"
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
