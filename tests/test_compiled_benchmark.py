"""benchmarks/compiled.py runs end to end in its --quick form and writes every row.

No timing is asserted: the numbers depend on the machine and its load. --quick runs no
torch.compile row; the JAX row runs only where jax is importable (it is not installed by
`make test`), so jax is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.compiled import main

EAGER_KEYS = {"eager_full", "eager_checkpointed", "eager_truncated", "eager_first_order", "eager_binomial3",
              "eager_implicit", "eager_tasks_full", "eager_tasks_checkpointed", "plain", "functional_full", "functional_checkpointed", "functional_tasks", "torch_func", "jax"}


def test_quick_run_writes_json_and_the_functional_rows_agree_with_full(tmp_path: Path) -> None:
    path = tmp_path / "compiled.json"
    threads = torch.get_num_threads()
    try:
        main(["--quick", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(path.read_text())
    assert data["threads"] == 1 and data["repeats"] >= 7 and data["dtype"] == "float32"
    assert data["machine"]["cpu"] and data["inductor_cache"] is None
    [case] = data["cases"]
    assert case["K"] == 2
    rows = {r["key"]: r for r in case["rows"]}
    assert set(rows) == EAGER_KEYS  # no compiled rows without --compile
    if rows["jax"]["failure"] is not None:
        assert rows["jax"]["failure"] == "jax not installed" and rows["jax"]["time_ms"] is None
    else:
        assert rows["jax"]["rel_error"] < 1e-5
    for key in EAGER_KEYS - {"jax"}:
        row = rows[key]
        assert row["failure"] is None, (key, row["failure"])
        assert len(row["times_ms"]) == data["repeats"]
        assert row["time_ms"] > 0 and row["time_ratio"] > 0
        if not key.startswith("eager_") or key in ("eager_full", "eager_checkpointed", "eager_tasks_full",
                                                   "eager_tasks_checkpointed"):  # the exact ones
            assert row["rel_error"] < 1e-5, (key, row["rel_error"])
    assert rows["eager_full"]["rel_error"] == 0.0
    assert rows["eager_full"]["time_ratio"] == 1.0
