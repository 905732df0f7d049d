"""examples/hypercleaning.py: the data hyper-cleaning example.

Its reference, Full's gradient with respect to the per-example weights w that the inner closure
captures, is checked against a hand-unrolled autograd loop written here. The script runs end to
end with --quick on the bundled digits; Full's first-step hypergradient error is 0 and, where
Checkpointed is reported as supported, it matches Full to 1e-8 (float64). Estimators that do
not yet give a gradient for a captured tensor are reported, not fatal. The IDX reader is checked
on files written here, and on the real Fashion-MNIST files where they are installed.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("sklearn")

import metagrad as mg  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import hypercleaning as hc  # noqa: E402

#: Where Debian's dataset-fashion-mnist package puts the IDX files.
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The script sets torch's thread count for the whole process; put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_split(train: int = 12, features: int = 5, classes: int = 3, seed: int = 0) -> hc.Split:
    """Random float64 data in the shape of a hyper-cleaning split."""
    generator = torch.Generator().manual_seed(seed)

    def inputs(n: int) -> torch.Tensor:
        return torch.randn(n, features, generator=generator, dtype=torch.float64)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, classes, (n,), generator=generator)

    y_clean = labels(train)
    corrupted = torch.arange(train) % 2 == 0
    y_train = torch.where(corrupted, (y_clean + 1) % classes, y_clean)
    return hc.Split(inputs(train), y_train, y_clean, corrupted, inputs(8), labels(8), inputs(8), labels(8), classes)


def hand_unrolled_w_gradient(model: torch.nn.Module, data: hc.Split, w: torch.Tensor, steps: int,
                             lr: float) -> torch.Tensor:
    """d L_val(φ_K(w)) / dw by plain autograd through K SGD steps (create_graph=True)."""
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}  # θ_0, a leaf
    for _ in range(steps):
        logits = torch.func.functional_call(model, params, (data.x_train,))
        loss = (torch.sigmoid(w) * F.cross_entropy(logits, data.y_train, reduction="none")).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    val = F.cross_entropy(torch.func.functional_call(model, params, (data.x_val,)), data.y_val)
    (grad,) = torch.autograd.grad(val, w)
    return grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_full_w_gradient_matches_a_hand_unrolled_loop(kind: str) -> None:
    data = tiny_split()
    torch.manual_seed(1)
    model = hc.make_model(5, 3, kind, hidden=4).double()
    w = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    reference = hand_unrolled_w_gradient(model, data, w, steps=7, lr=0.3)
    _, grad = hc.hypergradient(model, mg.Full(), data, w, steps=7, lr_inner=0.3)
    assert grad is w.grad and reference.abs().max() > 0
    assert relative_error(grad, reference) < 1e-10
    torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())  # θ_0's gradient is discarded


@pytest.mark.parametrize("estimator", [mg.Checkpointed(), mg.Truncated(steps=7), mg.Binomial(order=7)],
                         ids=repr)
def test_exact_estimators_match_full_where_supported(estimator: mg.Estimator) -> None:
    """Checkpointed, and Truncated(K) and Binomial(K) (MATH.md's identities), equal Full for w."""
    data = tiny_split()
    torch.manual_seed(1)
    model = hc.make_model(5, 3, "linear", hidden=4).double()
    w = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    _, full = hc.hypergradient(model, mg.Full(), data, w, steps=7, lr_inner=0.3)
    full = full.clone()
    try:
        _, grad = hc.hypergradient(model, estimator, data, w, steps=7, lr_inner=0.3)
    except hc.NotSupported as why:
        pytest.skip(f"{estimator!r}: not supported: {why}")
    assert relative_error(grad, full) < 1e-8


def test_quick_run_writes_rows_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = hc.main(["--quick", "--out", str(tmp_path)])
    assert "torch CPU threads: 1 (--threads)" in capsys.readouterr().err
    written = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {row["name"]: row for row in written["rows"]}
    assert list(rows) == list(hc.DEFAULT_ESTIMATORS)
    assert written["data"] == {**written["data"], "train": 200, "val": 100, "test": 200, "corrupted": 100,
                               "classes": 10}
    for key in ("uniform_test_accuracy", "oracle_test_accuracy"):
        assert 0 < written["baselines"][key] <= 1

    full = rows["full"]
    assert full["supported"] and full["hypergradient_error"] == 0.0
    for row in rows.values():
        if not row["supported"]:
            assert row["message"] and row["test_accuracy"] is None
            continue
        assert 0 <= row["test_accuracy"] <= 1 and row["ms_per_outer_step"] > 0
        assert 0 <= row["f1"] <= 1 and 0 <= row["recall"] <= 1
        assert row["hypergradient_error"] >= 0 and len(row["val_loss"]) == 4 and len(row["weights"]) == 200
    if rows["checkpointed"]["supported"]:
        assert rows["checkpointed"]["hypergradient_error"] < 1e-8

    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    for name in ("uniform weights", "clean-only oracle", "Full", "Checkpointed", "Truncated(5)",
                 "Binomial(3, block=10)"):
        assert f"| {name} |" in table, name
    png = (tmp_path / "weights.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_first_order_row_where_it_warns_of_no_gradient_through_the_inner_loop(tmp_path: Path) -> None:
    """FirstOrder keeps no second derivative, so w, which only the inner loss uses, gets none (MATH.md):
    where metagrad says so, the row is a zero hypergradient (error 1, nothing flagged), not an error."""
    results = hc.main(["--quick", "--estimators", "first_order", "--outer-steps", "2", "--out", str(tmp_path)])
    [row] = results["rows"]
    if not row["supported"]:
        pytest.skip(f"FirstOrder: not supported: {row['message']}")
    assert row["hypergradient_error"] == pytest.approx(1.0) and row["flagged"] == 0
    assert row["precision"] is None and row["f1"] == 0 and set(row["weights"]) == {0.5}
    json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))  # strict JSON: no NaN


def test_snapshots_run_measures_time_and_memory(tmp_path: Path) -> None:
    """``--snapshots 3``: Checkpointed and the blocked Binomial store few iterates and give Full's
    and Binomial's own hypergradients; the comparison table has one row per configuration."""
    results = hc.main(["--quick", "--estimators", "checkpointed", "binomial", "--snapshots", "3",
                       "--outer-steps", "2", "--out", str(tmp_path)])
    rows = {row["name"]: row for row in results["rows"]}
    assert rows["checkpointed"]["estimator"] == "Checkpointed(snapshots=3)"
    assert rows["binomial"]["estimator"] == "Binomial(3, block=10, snapshots)"
    memory = {row["estimator"]: row for row in results["memory"]}
    assert list(memory) == ["Full", "Checkpointed", "Checkpointed(snapshots=3)", "Binomial(3, block=10)",
                            "Binomial(3, block=10, snapshots)"]
    assert memory["Checkpointed"]["stored_iterates"] == 20 and memory["Checkpointed"]["recomputed_steps"] == 0
    lean = memory["Checkpointed(snapshots=3)"]
    assert lean["stored_iterates"] <= 3 and lean["recomputed_steps"] == 20 and lean["error_vs_full"] < 1e-5
    assert lean["iterate_mib"] < memory["Checkpointed"]["iterate_mib"]
    assert memory["Binomial(3, block=10, snapshots)"]["stored_iterates"] == 2
    assert "## Time and memory of one hypergradient" in (tmp_path / "results.md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        hc.parse_args(["--snapshots", "0"])


def test_quick_defaults_yield_to_explicit_flags() -> None:
    args = hc.parse_args(["--quick", "--inner-steps", "7"])
    assert args.inner_steps == 7 and args.outer_steps == hc.QUICK["outer_steps"]
    assert (args.train_size, args.val_size, args.test_size) == (200, 100, 200)
    assert hc.parse_args([]).train_size == 1000
    assert hc.parse_args(["--dataset", "fashion-mnist"]).train_size == 5000


def test_corruption_replaces_the_chosen_labels_by_another_class() -> None:
    labels = np.arange(1000) % 10
    noisy, mask = hc.corrupt_labels(labels, 0.5, 10, np.random.default_rng(0))
    assert mask.sum() == 500
    assert np.all(noisy[mask] != labels[mask]) and np.all(noisy[~mask] == labels[~mask])
    assert set(np.unique(noisy[mask])) == set(range(10))


def test_flag_scores() -> None:
    weights = torch.tensor([0.1, 0.2, 0.9, 0.4, 0.8])
    corrupted = torch.tensor([True, True, True, False, False])
    scores = hc.flag_scores(weights, corrupted)  # flags 0, 1, 3: two of three right, two of three found
    assert scores["flagged"] == 3
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    nothing = hc.flag_scores(torch.full((5,), 0.5), corrupted)  # the initial weights flag nothing
    assert math.isnan(nothing["precision"]) and nothing["recall"] == 0 and nothing["f1"] == 0


# ------------------------------------------------------------------------------ IDX files
def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_fashion_mnist(root: Path, train: int = 60, test: int = 30, side: int = 6) -> None:
    """IDX files in Fashion-MNIST's layout: images gzipped, labels not (the reader takes both)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, size=(count, side, side)) + 20 * labels[:, None, None]
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, compress=False)


def test_fashion_mnist_reader_and_run_on_files_written_here(tmp_path: Path) -> None:
    root = tmp_path / "fashion"
    root.mkdir()
    write_fashion_mnist(root)
    images = hc.read_idx(str(root / "train-images-idx3-ubyte.gz"))
    assert images.shape == (60, 6, 6) and images.dtype == np.uint8
    results = hc.main(["--quick", "--dataset", "fashion-mnist", "--data-root", str(root), "--train-size", "40",
                       "--val-size", "20", "--test-size", "30", "--estimators", "full", "--inner-steps", "5",
                       "--outer-steps", "2", "--out", str(tmp_path / "out")])
    assert results["data"]["train"] == 40 and results["data"]["corrupted"] == 20
    assert results["rows"][0]["supported"] and (tmp_path / "out" / "weights.png").exists()


def test_fashion_mnist_reader_names_what_is_missing_or_malformed(tmp_path: Path) -> None:
    with pytest.raises(hc.DataError, match=r"train-images-idx3-ubyte\.gz nor train-images-idx3-ubyte"):
        hc.load_fashion_mnist(str(tmp_path))
    bad = tmp_path / "bad"
    bad.write_bytes(b"not an idx file")
    with pytest.raises(hc.DataError, match="not an IDX file"):
        hc.read_idx(str(bad))
    short = tmp_path / "short"
    write_idx(short, np.zeros((3, 4), dtype=np.uint8), compress=False)
    short.write_bytes(short.read_bytes()[:-2])
    with pytest.raises(hc.DataError, match="header says shape"):
        hc.read_idx(str(short))
    with pytest.raises(SystemExit, match="--data-root"):
        hc.main(["--quick", "--dataset", "fashion-mnist", "--out", str(tmp_path / "out")])


@pytest.mark.skipif(not (FASHION_MNIST / "train-labels-idx1-ubyte.gz").exists(),
                    reason=f"no Fashion-MNIST in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files_load() -> None:
    args = hc.parse_args(["--dataset", "fashion-mnist", "--data-root", str(FASHION_MNIST), "--train-size", "500",
                          "--val-size", "100", "--test-size", "100"])
    data = hc.load_split(args)
    assert data.x_train.shape == (500, 784) and data.x_test.shape == (100, 784) and data.classes == 10
    assert int(data.corrupted.sum()) == 250
    assert abs(data.x_train.mean().item()) < 1e-9  # centred with the training mean
