"""The estimator benchmark runs end to end on a tiny case and reports every column.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ESTIMATOR_LABELS = ["Full", "Checkpointed", "FirstOrder", "Truncated(2)", "Binomial(2)"]
COLUMNS = ["| method | ms / meta-gradient (min–max) | time / Full (paired) | peak memory | memory / Full "
           "| rel. error vs Full | notes |"]
ROW_KEYS = {"method", "kind", "library", "time_ms", "time_ms_min", "time_ms_max", "times_ms",
            "time_ratio", "time_ratio_paired_median", "peak_bytes", "peak_mib", "memory_ratio",
            "memory_method", "rel_error", "info", "warnings", "failure", "notes"}


def run_benchmark(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.estimators", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_help_lists_the_flags() -> None:
    result = run_benchmark("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--K", "--device", "--json", "--repeats", "--estimators", "--order",
                 "--dtype", "--baselines", "--chunk-size", "--markdown", "--meta"):
        assert flag in result.stdout, flag
    for config in ("sinusoid", "omniglot", "miniimagenet"):
        assert config in result.stdout


def test_tiny_sinusoid_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out, table = tmp_path / "out.json", tmp_path / "out.md"
    result = run_benchmark("--config", "sinusoid", "--K", "2", "--repeats", "1", "--order", "2",
                           "--json", str(out), "--markdown", str(table), "--no-progress")
    assert result.returncode == 0, result.stderr
    stdout = result.stdout

    # Header: machine, versions, date, the noise warning on the CPU.
    assert "Device: CPU" in stdout and "torch " in stdout and "UTC" in stdout
    assert "noisy" in stdout
    assert COLUMNS[0] in stdout
    assert "#### sinusoid, K = 2" in stdout

    baselines = ["plain autograd unroll"]
    if importlib.util.find_spec("higher") is not None:
        baselines.append("higher (full unroll)")
    if importlib.util.find_spec("torchopt") is not None:
        baselines.append("torchopt MetaSGD (full unroll)")
    for label in [*ESTIMATOR_LABELS, *baselines]:
        assert f"| {label} |" in stdout, label
    assert any(line.startswith("| Implicit(reg=") for line in stdout.splitlines())
    assert COLUMNS[0] in table.read_text(encoding="utf-8")

    data = json.loads(out.read_text(encoding="utf-8"))
    for key in ("config", "device", "machine", "date", "dtype", "error_dtype", "repeats", "cases",
                "memory_measure", "flags_set"):
        assert key in data, key
    assert data["config"] == "sinusoid" and data["device"] == "cpu" and data["flags_set"] == []
    assert data["machine"]["torch"]
    [case] = data["cases"]
    assert case["K"] == 2
    rows = {row["method"]: row for row in case["rows"]}
    for label in [*ESTIMATOR_LABELS, *baselines]:
        row = rows[label]
        assert ROW_KEYS <= set(row), label
        assert row["failure"] is None, (label, row["failure"])
        assert row["time_ms"] > 0 and len(row["times_ms"]) == 1
        assert row["peak_bytes"] is not None and row["peak_bytes"] >= 0
        assert row["rel_error"] is not None and row["rel_error"] >= 0
    full = rows["Full"]
    assert full["time_ratio"] == pytest.approx(1.0) and full["rel_error"] == 0
    # Exact methods agree with Full to float64 rounding; the error pass is float64.
    assert data["error_dtype"] == "float64"
    for label in ["Checkpointed", "Truncated(2)", "Binomial(2)", *baselines]:
        assert rows[label]["rel_error"] < 1e-10, label
    assert rows["FirstOrder"]["rel_error"] > 1e-6
    assert rows["Binomial(2)"]["info"]["hessian_vector_products"] >= 2  # L(K−L+1) at the fewest
    tight = rows.get("Binomial(2, monitor=False)")  # where this metagrad has the tight grouping
    if tight is not None:
        assert tight["rel_error"] < 1e-10
        assert tight["info"]["hessian_vector_products"] == 2


META_ROW_KEYS = ROW_KEYS | {"meta", "meta_rel_error", "meta_rel_error_log_wd", "meta_rel_error_step_sizes",
                            "without_meta_time_ms", "meta_time_ratio",
                            "meta_time_ratio_paired_median", "meta_parameters"}


def test_meta_flag_adds_the_eta_rows(tmp_path: Path) -> None:
    """--meta on: every estimator row and the plain unroll again with Meta-SGD step sizes and a
    captured weight decay; η-gradient errors against Full's in float64, time ratios to the
    same row without η."""
    out = tmp_path / "meta.json"
    result = run_benchmark("--config", "sinusoid", "--K", "2", "--repeats", "1", "--order", "2",
                           "--estimators", "full", "checkpointed", "first_order", "binomial",
                           "--tight", "off", "--block", "--meta", "on", "--json", str(out),
                           "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "#### sinusoid, K = 2" in result.stdout and "with η" in result.stdout
    assert "| method, with η |" in result.stdout and "η rel. error vs Full" in result.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["meta"]["weight_decay"] == 1e-4 and data["error_dtype"] == "float64"
    [case] = data["cases"]
    rows = {row["method"]: row for row in case["rows"]}
    meta = {row["method"]: row for row in case["meta_rows"]}
    assert set(meta) == {"Full", "Checkpointed", "FirstOrder", "Binomial(2)", "plain autograd unroll"}
    assert all("meta" not in row for row in case["rows"])  # the rows without η are unchanged
    for label, row in meta.items():
        assert META_ROW_KEYS <= set(row), label
        assert row["meta"] is True and row["failure"] is None, (label, row["failure"])
        assert row["time_ms"] > 0 and len(row["times_ms"]) == 1
        assert row["without_meta_time_ms"] == pytest.approx(rows[label]["time_ms"])
        assert row["meta_time_ratio"] == pytest.approx(row["time_ms"] / rows[label]["time_ms"])
        assert row["meta_time_ratio_paired_median"] > 0
        assert row["meta_rel_error"] is not None and row["rel_error"] is not None
    assert meta["Full"]["meta_rel_error"] == 0 and meta["Full"]["rel_error"] == 0
    assert meta["Full"]["meta_rel_error_log_wd"] == 0
    assert meta["Full"]["time_ratio"] == pytest.approx(1.0)
    # Exact with η too: Checkpointed, Binomial(K) and the hand-written unroll, in float64.
    for label in ("Checkpointed", "Binomial(2)", "plain autograd unroll"):
        for key in ("meta_rel_error", "meta_rel_error_log_wd", "meta_rel_error_step_sizes", "rel_error"):
            assert meta[label][key] < 1e-10, (label, key)
    assert meta["FirstOrder"]["meta_rel_error"] > 1e-6  # the step-size part only
    assert meta["FirstOrder"]["meta_rel_error_log_wd"] == pytest.approx(1.0)  # log_wd gets none
    assert any("FirstOrder" in w for w in meta["FirstOrder"]["warnings"])
    assert any("log_wd" in name for name in meta["Checkpointed"]["meta_parameters"])


def test_rejects_bad_arguments() -> None:
    result = run_benchmark("--config", "sinusoid", "--K", "0", timeout=60)
    assert result.returncode != 0 and "--K" in result.stderr


def test_products_benchmark_compares_the_formulations(tmp_path: Path) -> None:
    out = tmp_path / "products.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.products", "--config", "sinusoid",
                             "--batch", "3", "--dtype", "float64", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert "| formulation | ms (B products) |" in result.stdout
    rows = {row["method"]: row for row in json.loads(out.read_text())["cases"][0]["rows"]}
    assert set(rows) == {"vmap(vjp∘grad)", "vmap(jvp∘grad)", "loop"}
    assert rows["loop"]["ratio_to_loop"] == 1.0 and len(rows["loop"]["times_ms"]) == 5
    assert rows["vmap(vjp∘grad)"]["rel_diff"] < 1e-12  # the same products, float64
    help_text = subprocess.run([sys.executable, "-m", "benchmarks.products", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60, check=False).stdout
    for flag in ("--config", "--batch", "--device", "--json", "--repeats"):
        assert flag in help_text


def test_tiny_long_horizon_run_reports_snapshots_and_plots(tmp_path: Path) -> None:
    """The long-horizon rows, tiny: Checkpointed with and without snapshots, the blocked Binomial
    with and without, the exact iterate bytes of each, and the memory plot."""
    out, plot = tmp_path / "out.json", tmp_path / "memory.png"
    result = run_benchmark("--config", "long_horizon", "--K", "6", "12", "--repeats", "1", "--order", "2",
                           "--block", "3", "--snapshots", "sqrt", "2", "--estimators", "checkpointed", "binomial",
                           "--whole-levels", "off", "--tight", "off", "--baselines", "off", "--full-max-K", "6",
                           "--plot", str(plot), "--json", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    first, second = data["cases"]
    labels = ["Checkpointed", "Checkpointed(snapshots='sqrt')", "Checkpointed(snapshots=2)",
              "Binomial(2, block=3)", "Binomial(2, block=3, snapshots=True)"]
    assert [row["method"] for row in first["rows"]] == ["Full", *labels]
    rows = {row["method"]: row for row in second["rows"]}
    assert list(rows) == labels  # Full skipped above --full-max-K; Checkpointed is the reference
    assert rows["Checkpointed"]["rel_error"] == 0
    for label in labels:
        row = rows[label]
        assert row["failure"] is None, (label, row["failure"])
        assert row["iterate_bytes"] > 0 and "at once" in row["notes"]
    assert rows["Checkpointed(snapshots=2)"]["info"]["stored_iterates"] == 2
    assert rows["Checkpointed(snapshots=2)"]["iterate_bytes"] < rows["Checkpointed"]["iterate_bytes"]
    assert rows["Binomial(2, block=3, snapshots=True)"]["info"]["stored_iterates"] == 4
    assert rows["Binomial(2, block=3, snapshots=True)"]["rel_error"] < 1e-3
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_per_step_and_step_size_benchmarks_write_their_numbers(tmp_path: Path) -> None:
    """benchmarks/per_step.py and benchmarks/step_sizes.py on tiny cases: every row and ratio
    in the JSON (no timing asserted)."""
    out = tmp_path / "per_step.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.per_step", "--steps", "2", "--meta-batch", "1",
                             "--repeats", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(out.read_text())
    assert set(numbers["rows"]) == {"hand unroll", "hand checkpointed", "Full", "Checkpointed"}
    assert numbers["full_over_hand"] > 0 and numbers["checkpointed_over_full"] > 0
    assert numbers["hand_checkpointed_over_hand"] > 0 and numbers["checkpointed_over_hand_checkpointed"] > 0
    out = tmp_path / "step_sizes.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.step_sizes", "--K", "2", "--repeats", "1",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert {row["estimator"] for row in rows} >= {"Checkpointed()", "FirstOrder()"}
    assert all(row["peak_learned_bytes"] > 0 and row["time_ratio"] > 0 for row in rows)
