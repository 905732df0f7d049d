"""examples/fewshot.py and examples/fewshot_data.py: loaders, task sampling, a run, an exact resume.

The loaders read tiny folder trees made here, in each layout the example accepts, and
every malformed case gets a DataError that names what was expected and where. Task
sampling is checked for its properties. The script runs end to end on the synthetic
glyphs with every estimator and with each ``--algorithm`` (MAML, ANIL, Meta-SGD), and a
run interrupted by Ctrl-C and resumed ends with the same parameters, Meta-SGD step sizes,
Adam state and history as the uninterrupted run (CPU, float64). ANIL adapts the head only,
and its body's meta-gradient from Checkpointed equals Full's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
Image = pytest.importorskip("PIL.Image")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "fewshot.py"
sys.path.insert(0, str(EXAMPLES))
import fewshot  # noqa: E402
import fewshot_data as fd  # noqa: E402

# A run small enough for a test: 8-filter CNN4 on 16×16 glyphs, a few classes, few tasks.
TINY = ["--dataset", "synthetic", "--synthetic-classes", "12", "6", "6", "--filters", "8",
        "--ways", "3", "--queries", "2", "--eval-queries", "2", "--val-tasks", "3", "--test-tasks", "4"]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The script sets torch's thread count for the whole process; put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------- folder trees
def write_image(path: Path, size: int = 12, mode: str = "RGB", value: int = 0) -> None:
    """A small image whose top-left pixel holds ``value`` (to tell images apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size, 3) if mode == "RGB" else (size, size), 200, dtype=np.uint8)
    array[0, 0] = value
    Image.fromarray(array).convert(mode).save(path)


def make_folder_tree(root: Path, classes: int = 3, images: int = 4, ext: str = ".jpg") -> Path:
    """``root/{train,val,test}/<class>/*``: the miniImageNet/tieredImageNet layout."""
    for split in fd.SPLITS:
        for c in range(classes):
            for i in range(images):
                name = f"img{i}{ext.upper() if i % 2 else ext}"  # extensions in any case
                write_image(root / split / f"n0{c:03d}" / name, value=i)
    return root


def make_omniglot_tree(root: Path, alphabets: int = 2, characters: int = 5, drawings: int = 3) -> Path:
    """``root/images_{background,evaluation}/<alphabet>/<character>/*.png``, 105×105 drawings."""
    for half in ("images_background", "images_evaluation"):
        for a in range(alphabets):
            for c in range(characters):
                folder = root / half / f"Alphabet_{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                for d in range(drawings):
                    image = Image.new("1", (105, 105), 1)  # white, as the release is
                    image.paste(0, (10 + 5 * c, 10, 40 + 5 * c, 30))  # a black stroke
                    image.save(folder / f"{a:02d}{c:02d}_{d:02d}.png")
    return root


# ------------------------------------------------------------------ loaders
def test_folder_layout_loads_every_split_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_folder_tree(tmp_path / "mini")
    write_image(root / "train" / "n0000" / ".hidden.jpg")  # ignored, as are non-images
    (root / "train" / "n0000" / "notes.txt").write_text("not an image")
    pools = fd.load_image_folders(root, image_size=16)
    for split in fd.SPLITS:
        pool = pools[split]
        assert pool.images.shape == (12, 3, 16, 16) and pool.images.dtype == torch.uint8
        assert pool.class_names == ["n0000", "n0001", "n0002"] and pool.counts == [4, 4, 4]
        assert (root / f"fewshot_cache_{split}_16px_rgb.pt").is_file()

    # The second load reads the caches: decoding anything now would fail.
    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded although the cache matches")

    monkeypatch.setattr(fd, "decode_image", no_decoding)
    again = fd.load_image_folders(root, image_size=16)
    assert torch.equal(again["val"].images, pools["val"].images)

    # A file added to a class invalidates that split's cache.
    monkeypatch.undo()
    write_image(root / "test" / "n0001" / "img9.png", value=9)
    changed = fd.load_image_folders(root, image_size=16)
    assert changed["test"].counts == [4, 5, 4]


def test_omniglot_layout_split_rotations_and_parent_folder(tmp_path: Path) -> None:
    base = make_omniglot_tree(tmp_path / "omniglot-py")
    pools = fd.load_omniglot(base, image_size=28)
    names = {split: pool.class_names for split, pool in pools.items()}
    everything = sorted(n for split in names.values() for n in split)
    assert len(everything) == len(set(everything)) == 20  # disjoint, and every character used
    # MAML's proportions, 1100/100/423 of 1623, on 20 characters.
    assert [len(names[s]) for s in fd.SPLITS] == [14, 1, 5]
    pool = pools["train"]
    assert pool.images.shape[1:] == (1, 28, 28) and pool.rotations == 4
    assert pool.num_classes == 4 * len(names["train"])
    assert pool.images.float().mean() < 128  # inverted: the strokes are the bright part
    # --data-root may also be the parent of omniglot-py/, and the split is the same.
    from_parent = fd.load_omniglot(tmp_path, image_size=28)
    assert {s: p.class_names for s, p in from_parent.items()} == names
    assert (base / "fewshot_cache_omniglot_28px.pt").is_file()


def test_omniglot_split_of_the_full_set_has_maml_counts() -> None:
    split = fd.omniglot_split(1623)
    assert [len(split[s]) for s in fd.SPLITS] == [1100, 100, 423]
    assert len(np.unique(np.concatenate(list(split.values())))) == 1623


def test_rotated_classes_are_rotated_images() -> None:
    image = np.zeros((1, 1, 4, 4), dtype=np.uint8)
    image[0, 0, 0, 3] = 255  # top-right corner lit
    pool = fd.pool_from_lists("train", [image[0]] * 3, ["only"], [3], rotations=4)
    corners = set()
    for seed in range(20):
        task = fd.sample_task(pool, ways=4, shots=1, queries=1, generator=torch.Generator().manual_seed(seed))
        for j, c in enumerate(task.classes):
            expected = torch.rot90(pool.images[0], c % 4, dims=(-2, -1))
            assert torch.equal(task.support_images[j], expected) and torch.equal(task.query_images[j], expected)
            corners.add(tuple(torch.nonzero(task.support_images[j][0]).flatten().tolist()))
    assert len(corners) == 4


@pytest.mark.parametrize("case, expected", [
    ("missing root", ["does not exist", "train/, val/ and test/"]),
    ("missing split", ["lacks the split folder(s) val", "{train,val,test}/<class>/*.jpg"]),
    ("no classes", ["holds no class folders", "test"]),
    ("empty class", ["class folder", "n0001", "holds no images"]),
    ("corrupt image", ["could not decode image", "img0.jpg"]),
])
def test_folder_layout_errors_say_what_and_where(tmp_path: Path, case: str, expected: list[str]) -> None:
    root = tmp_path / "mini"
    if case != "missing root":
        make_folder_tree(root, images=2)
    if case == "missing split":
        for path in sorted((root / "val").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (root / "val").rmdir()
    elif case == "no classes":
        for path in sorted((root / "test").rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    elif case == "empty class":
        for path in (root / "train" / "n0001").iterdir():
            path.unlink()
    elif case == "corrupt image":
        (root / "val" / "n0002" / "img0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(fd.DataError) as error:
        fd.load_image_folders(root, image_size=16, cache=False)
    for text in expected:
        assert text in str(error.value), str(error.value)
    assert str(root) in str(error.value)


@pytest.mark.parametrize("case, expected", [
    ("missing root", ["does not exist", "images_background/ and images_evaluation/"]),
    ("missing half", ["images_evaluation/", "Found only", "images_background"]),
    ("no alphabets", ["holds no alphabet folders", "<alphabet>/<character>/*.png"]),
    ("empty alphabet", ["alphabet folder", "Alphabet_1", "holds no character folders"]),
    ("empty character", ["character folder", "character03", "holds no images"]),
    ("too few characters", ["too few for MAML's split", "gets none"]),
])
def test_omniglot_errors_say_what_and_where(tmp_path: Path, case: str, expected: list[str]) -> None:
    root = tmp_path / "omniglot"
    if case == "too few characters":
        make_omniglot_tree(root, alphabets=1, characters=1, drawings=2)
    elif case != "missing root":
        make_omniglot_tree(root, drawings=1)

    def clear(folder: Path) -> None:
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()

    if case == "missing half":
        clear(root / "images_evaluation")
        (root / "images_evaluation").rmdir()
    elif case == "no alphabets":
        clear(root / "images_background")
    elif case == "empty alphabet":
        clear(root / "images_evaluation" / "Alphabet_1")
    elif case == "empty character":
        clear(root / "images_background" / "Alphabet_0" / "character03")
    with pytest.raises(fd.DataError) as error:
        fd.load_omniglot(root, cache=False)
    for text in expected:
        assert text in str(error.value), str(error.value)
    assert str(root) in str(error.value)


def test_too_few_images_or_classes_for_the_task(tmp_path: Path) -> None:
    root = make_folder_tree(tmp_path / "mini", images=4)
    write_image(root / "val" / "n0001" / "extra.png")
    pools = fd.load_image_folders(root, image_size=16, cache=False)
    pools["val"].require(ways=3, per_class=4, why="3-way 1-shot tasks with 3 queries")  # fits exactly
    with pytest.raises(fd.DataError) as error:
        pools["val"].require(ways=3, per_class=5, why="3-way 1-shot tasks with 4 queries")
    message = str(error.value)
    assert "2 of 3 classes have fewer than the 5 images" in message
    assert "'n0000' (4 images, in " + str(root / "val" / "n0000") in message and "'n0001'" not in message
    with pytest.raises(fd.DataError, match="split 'val' has 3 classes, but .* need at least 4"):
        pools["val"].require(ways=4, per_class=1, why="4-way tasks")


def test_script_reports_data_errors_as_one_message(tmp_path: Path) -> None:
    # A SystemExit carrying a string prints it, without a traceback, and exits with status 1.
    with pytest.raises(SystemExit) as error:
        fewshot.main(["--dataset", "miniimagenet", "--data-root", str(tmp_path / "absent"),
                      "--out", str(tmp_path / "r")])
    assert str(error.value.code).startswith("error: miniimagenet: --data-root") and "does not exist" in str(
        error.value.code)
    with pytest.raises(SystemExit, match="--dataset omniglot reads images from disk: pass --data-root"):
        fewshot.main(["--dataset", "omniglot", "--out", str(tmp_path / "r")])
    root = make_folder_tree(tmp_path / "mini", classes=3, images=3)
    with pytest.raises(SystemExit, match=r"split 'train': 3 of 3 classes have fewer than the 16 images"):
        fewshot.main(["--dataset", "miniimagenet", "--data-root", str(root), "--image-size", "16", "--ways", "3",
                      "--out", str(tmp_path / "r")])


def test_synthetic_glyphs_are_reproducible_and_distinct() -> None:
    pools = fd.synthetic_glyphs(16, classes=(4, 2, 3), images_per_class=5, seed=3)
    assert [pools[s].num_classes for s in fd.SPLITS] == [4, 2, 3]
    assert pools["train"].images.shape == (20, 1, 16, 16)
    again = fd.synthetic_glyphs(16, classes=(4, 2, 3), images_per_class=5, seed=3)
    assert torch.equal(again["test"].images, pools["test"].images)
    other = fd.synthetic_glyphs(16, classes=(4, 2, 3), images_per_class=5, seed=4)
    assert not torch.equal(other["train"].images, pools["train"].images)
    # Drawings of a class vary, and every drawing has ink.
    train = pools["train"].images.float()
    assert (train.flatten(1).amax(1) > 200).all()
    assert not torch.equal(train[0], train[1])


# ------------------------------------------------------------ task sampling
def labelled_pool(counts: list[int]) -> fd.ClassPool:
    """A pool whose every image carries its class and its index: pixel (0, 0) and (0, 1)."""
    images = []
    for c, n in enumerate(counts):
        for i in range(n):
            image = np.zeros((1, 2, 2), dtype=np.uint8)
            image[0, 0, 0], image[0, 0, 1] = c, i
            images.append(image)
    return fd.pool_from_lists("train", images, [f"c{c}" for c in range(len(counts))], counts)


@settings(max_examples=60)
@given(counts=st.lists(st.integers(6, 12), min_size=2, max_size=9), data=st.data())
def test_task_sampling_properties(counts: list[int], data: st.DataObject) -> None:
    pool = labelled_pool(counts)
    ways = data.draw(st.integers(2, len(counts)), label="ways")
    shots = data.draw(st.integers(1, 3), label="shots")
    queries = data.draw(st.integers(1, 6 - shots), label="queries")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    task = fd.sample_task(pool, ways, shots, queries, torch.Generator().manual_seed(seed))

    assert len(set(task.classes)) == ways  # N distinct classes
    assert torch.equal(task.support_labels, torch.arange(ways).repeat_interleave(shots))  # labels 0..N-1
    assert torch.equal(task.query_labels, torch.arange(ways).repeat_interleave(queries))
    for images, labels in ((task.support_images, task.support_labels), (task.query_images, task.query_labels)):
        # Every image belongs to the class its label stands for.
        assert images[:, 0, 0, 0].tolist() == [task.classes[label] for label in labels.tolist()]
    ids = lambda images: {(int(x[0, 0, 0]), int(x[0, 0, 1])) for x in images}  # noqa: E731
    support, query = ids(task.support_images), ids(task.query_images)
    assert len(support) == ways * shots and len(query) == ways * queries  # no image twice
    assert not support & query  # support and query disjoint

    again = fd.sample_task(pool, ways, shots, queries, torch.Generator().manual_seed(seed))
    assert again.classes == task.classes and torch.equal(again.query_images, task.query_images)


def test_labels_are_permuted_per_task() -> None:
    pool = labelled_pool([8] * 5)
    generator = torch.Generator().manual_seed(0)
    assignments = [tuple(fd.sample_task(pool, 5, 1, 1, generator).classes) for _ in range(60)]
    assert len(set(assignments)) > 30  # a fresh class→label permutation, not a fixed one
    assert {a[0] for a in assignments} == set(range(5))  # every class gets label 0 sometimes
    other = torch.Generator().manual_seed(1)
    assert [tuple(fd.sample_task(pool, 5, 1, 1, other).classes) for _ in range(60)] != assignments


# ---------------------------------------------------------------- the script
def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        fewshot.parse_args(["--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--dataset", "--data-root", "--ways", "--shots", "--queries", "--iterations", "--meta-batch",
                 "--outer-lr", "--lr-inner", "--inner-steps", "--eval-inner-steps", "--test-tasks",
                 "--estimator", "--order", "--truncate-steps", "--chunk-size", "--reg", "--solver",
                 "--patience", "--resume", "--device", "--seed", "--out", "--filters", "--image-size",
                 "--algorithm", "anil", "metasgd"):
        assert flag in help_text, flag
    assert "default: 600" in help_text


def test_defaults_are_the_papers_protocol() -> None:
    args = fewshot.parse_args([])
    assert (args.ways, args.shots, args.queries, args.meta_batch, args.outer_lr, args.lr_inner,
            args.inner_steps, args.eval_inner_steps, args.test_tasks) == (5, 1, 15, 4, 1e-3, 0.01, 5, 10, 600)
    assert fewshot.parse_args(["--dataset", "omniglot"]).filters == 64
    mini = fewshot.parse_args(["--dataset", "miniimagenet"])
    assert (mini.filters, mini.image_size) == (32, 84)
    model = fewshot.make_model(3, 84, 32, 5)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4 and not any(m.track_running_stats for m in norms)
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    folder = tmp_path / "run"  # --out DIR: results.json, learning_curves.png, checkpoint.pt in it
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--iterations", "3", "--val-every", "2",
                             "--out", str(folder)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("Test accuracy") and "% ±" in last and "95% CI, 4 tasks" in last
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "learning_curves.png", "results.json"]
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert 0 <= results["test_accuracy_mean"] <= 1 and 0 <= results["test_accuracy_ci95"] <= 1
    assert f"{100 * results['test_accuracy_mean']:.2f}%" in last
    assert results["config"]["ways"] == 3 and results["config"]["estimator"] == "binomial"
    assert results["wall_time_seconds"] > 0 and results["iterations_completed"] == 3
    assert [v["iteration"] for v in results["history"]["validation"]] == [0, 2, 3]
    assert len(results["history"]["train_loss"]) == 3
    png = (folder / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert results["checkpoint"] == str(folder / "checkpoint.pt")


def test_out_ending_in_json_is_the_earlier_form(tmp_path: Path) -> None:
    # --out x.json, as command lines written before the folder form: that file, with the
    # PNG and the checkpoint beside it.
    out = tmp_path / "legacy" / "r.json"
    results = fewshot.main([*TINY, "--iterations", "1", "--estimator", "first_order", "--out", str(out)])
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.checkpoint.pt", "r.json", "r.png"]
    assert json.loads(out.read_text(encoding="utf-8"))["test_accuracy_mean"] == results["test_accuracy_mean"]
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    # A folder --out that names an existing file (not .json) is refused before any work.
    with pytest.raises(SystemExit):
        fewshot.parse_args(["--out", str(out.with_suffix(".png"))])


@pytest.mark.parametrize("dataset", ["omniglot", "miniimagenet", "tieredimagenet"])
def test_runs_on_folder_datasets(tmp_path: Path, dataset: str) -> None:
    if dataset == "omniglot":
        root = make_omniglot_tree(tmp_path / "data", drawings=2)
    else:
        root = make_folder_tree(tmp_path / "data", classes=3, images=2)
    results = fewshot.main(["--dataset", dataset, "--data-root", str(root), "--image-size", "16",
                            "--filters", "4", "--ways", "3", "--queries", "1", "--eval-queries", "1",
                            "--iterations", "1", "--val-tasks", "2", "--test-tasks", "2",
                            "--estimator", "first_order", "--out", str(tmp_path / "r")])
    channels = 1 if dataset == "omniglot" else 3
    assert results["data"]["train"]["image_shape"] == [channels, 16, 16]
    assert 0 <= results["test_accuracy_mean"] <= 1


@pytest.mark.parametrize("flags, expected", [
    (["--estimator", "full"], "Full()"),
    (["--estimator", "checkpointed"], "Checkpointed()"),
    (["--estimator", "first_order"], "FirstOrder()"),
    (["--estimator", "truncated", "--truncate-steps", "3"], "Truncated(steps=3"),
    (["--estimator", "binomial", "--order", "3", "--chunk-size", "2"], "Binomial(order=3, chunk_size=2"),
    (["--estimator", "binomial", "--order", "auto"], "Binomial(order='auto'"),
    (["--estimator", "implicit", "--reg", "150", "--solver", "neumann", "--max-iter", "5"], "Implicit("),
])
def test_every_estimator_runs(tmp_path: Path, flags: list[str], expected: str) -> None:
    results = fewshot.main([*TINY, "--iterations", "1", "--inner-steps", "4", "--eval-inner-steps", "2",
                            *flags, "--out", str(tmp_path / "r")])
    assert results["estimator"].startswith(expected)
    assert 0 <= results["test_accuracy_mean"] <= 1


def test_estimator_warnings_are_counted_not_printed_per_task() -> None:
    pool = fd.synthetic_glyphs(16, classes=(3, 1, 1), images_per_class=3)["train"]
    generator = torch.Generator().manual_seed(0)
    tasks = [fd.sample_task(pool, 3, 1, 1, generator) for _ in range(2)]
    model = fewshot.make_model(1, 16, 4, 3)
    seen: dict[str, Any] = {}
    # Truncated(steps=10) after 2 inner steps is clamped to 2, with a MetaGradientWarning per
    # task (an error under this suite's settings, unless the script records it).
    fewshot.meta_batch_step(model, fewshot.mg.Truncated(steps=10), tasks, 2, 0.01, torch.device("cpu"),
                            torch.float32, seen)
    fewshot.meta_batch_step(model, fewshot.mg.Truncated(steps=10), tasks, 2, 0.01, torch.device("cpu"),
                            torch.float32, seen)
    [(kind, entry)] = seen.items()
    assert entry["count"] == 4 and "Truncated" in entry["first"] and "#" in kind


RESUME = [*TINY, "--dtype", "float64", "--iterations", "6", "--val-every", "3", "--checkpoint-every", "2",
          "--inner-steps", "3", "--eval-inner-steps", "3"]


def checkpoint_of(folder: Path) -> dict[str, Any]:
    """The checkpoint of the run whose ``--out`` was ``folder``."""
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def assert_same_tensors(a: Any, b: Any) -> None:
    """Equal structure, and every tensor bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


def test_resume_after_interrupt_reproduces_the_uninterrupted_run(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    whole = fewshot.main([*RESUME, "--out", str(tmp_path / "whole")])

    # Ctrl-C during the 4th meta-iteration: it finishes, checkpoints and exits with 130.
    original, calls = fewshot.meta_batch_step, []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(fewshot, "meta_batch_step", interrupted)
    parted = tmp_path / "parted"
    with pytest.raises(SystemExit) as stop:
        fewshot.main([*RESUME, "--out", str(parted)])
    assert stop.value.code == 130 and not (parted / "results.json").exists()
    at_interrupt = checkpoint_of(parted)
    assert at_interrupt["iteration"] == 4
    monkeypatch.undo()

    resumed = fewshot.main([*RESUME, "--out", str(parted), "--resume"])
    a, b = checkpoint_of(tmp_path / "whole"), checkpoint_of(parted)
    for key in ("iteration", "model", "optimizer", "rng", "train_loss", "train_accuracy", "validation",
                "best_iteration", "best_accuracy", "best_state"):
        assert_same_tensors(a[key], b[key])
    assert not torch.equal(at_interrupt["model"]["0.weight"], b["model"]["0.weight"])  # it did train on
    assert resumed["test_accuracy_mean"] == whole["test_accuracy_mean"]
    assert resumed["history"]["train_loss"] == whole["history"]["train_loss"]


def test_resume_extends_a_finished_run_and_refuses_other_settings(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    fewshot.main([*RESUME, "--out", str(whole)])
    short = [*RESUME, "--iterations", "3"]  # the later flag wins
    parted = tmp_path / "parted"
    fewshot.main([*short, "--out", str(parted)])
    fewshot.main([*RESUME, "--out", str(parted), "--resume"])  # 3 more iterations
    assert_same_tensors(checkpoint_of(whole)["model"], checkpoint_of(parted)["model"])
    assert_same_tensors(checkpoint_of(whole)["optimizer"], checkpoint_of(parted)["optimizer"])

    with pytest.raises(SystemExit, match=r"different settings: --lr-inner 0.01 \(now 0.05\)"):
        fewshot.main([*RESUME, "--lr-inner", "0.05", "--out", str(parted), "--resume"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        fewshot.main([*RESUME, "--out", str(tmp_path / "never"), "--resume"])


def test_early_stopping_tests_the_best_validated_parameters(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation accuracy 0.5 at θ_0, best (0.6) after iteration 1, then no better: with
    # --patience 2 training stops after iteration 3, and the test sees θ of iteration 1.
    scores = iter([0.5, 0.6, 0.55, 0.55])
    seen: dict[str, Any] = {}

    def scripted(model: torch.nn.Module, pool: Any, count: int, offset: int, args: Any, device: Any,
                 dtype: Any, desc: str, **kwargs: Any) -> list[float]:
        if desc == "test":
            seen["tested"] = {k: v.clone() for k, v in model.state_dict().items()}
            return [0.7, 0.9]
        value = next(scores)
        return [value, value]

    monkeypatch.setattr(fewshot, "evaluate", scripted)
    out = tmp_path / "r"
    results = fewshot.main([*TINY, "--iterations", "10", "--val-every", "1", "--patience", "2",
                            "--out", str(out)])
    assert results["stopped_early"] and results["iterations_completed"] == 3
    assert results["best_validation"] == {"iteration": 1, "accuracy_mean": 0.6}
    assert results["test_accuracy_mean"] == pytest.approx(0.8)
    state = checkpoint_of(out)
    assert_same_tensors(seen["tested"], state["best_state"])
    assert not torch.equal(state["best_state"]["0.weight"], state["model"]["0.weight"])


# ------------------------------------------------------------- --algorithm
BODY = [f"{layer}.{kind}" for layer in (0, 1, 4, 5, 8, 9, 12, 13) for kind in ("weight", "bias")]
HEAD = ["17.weight", "17.bias"]  # CNN4's final nn.Linear, module 17 of the Sequential


@pytest.mark.parametrize("estimator", ["full", "checkpointed"])
@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_every_algorithm_runs(tmp_path: Path, algorithm: str, estimator: str) -> None:
    results = fewshot.main([*TINY, "--iterations", "2", "--inner-steps", "2", "--eval-inner-steps", "2",
                            "--algorithm", algorithm, "--estimator", estimator, "--out", str(tmp_path / "r")])
    assert results["algorithm"] == algorithm and results["iterations_completed"] == 2
    assert 0 <= results["test_accuracy_mean"] <= 1
    assert results["adapted_parameters"] == (HEAD if algorithm == "anil" else BODY + HEAD)
    assert bool(results["step_sizes_final"]) == (algorithm == "metasgd")
    assert not results["estimator_warnings"]
    if algorithm == "metasgd":
        # Two outer steps moved the conv weights' step sizes away from --lr-inner (0.01).
        moved = results["step_sizes_final"]["0.weight"]
        assert moved["min"] < 0.01 < moved["max"]


@pytest.mark.parametrize("flags", [["--estimator", "first_order"], ["--estimator", "truncated"],
                                   ["--estimator", "binomial", "--order", "auto"],
                                   ["--estimator", "binomial", "--order", "2"],
                                   ["--estimator", "implicit", "--reg", "150", "--max-iter", "5"]])
@pytest.mark.parametrize("algorithm", ["anil", "metasgd"])
def test_other_estimators_run_with_anil_and_metasgd(tmp_path: Path, algorithm: str, flags: list[str]) -> None:
    results = fewshot.main([*TINY, "--iterations", "1", "--inner-steps", "2", "--eval-inner-steps", "2",
                            "--algorithm", algorithm, *flags, "--out", str(tmp_path / "r")])
    assert 0 <= results["test_accuracy_mean"] <= 1
    messages = " ".join(w["message"] for w in results["estimator_warnings"])
    # FirstOrder keeps no second derivative: ANIL's body gets only its direct query gradient,
    # and it says so. Implicit gives step sizes nothing, and says so.
    assert ("FirstOrder: the meta-parameters" in messages) == (algorithm == "anil" and flags[1] == "first_order")
    assert ("Implicit: the step sizes" in messages) == (algorithm == "metasgd" and flags[1] == "implicit")


def test_default_out_names_the_algorithm() -> None:
    assert fewshot.parse_args([]).out.endswith("synthetic_5way1shot_binomial")  # MAML: as before
    assert fewshot.parse_args(["--algorithm", "anil", "--estimator", "full"]).out.endswith(
        "synthetic_5way1shot_anil_full")


def test_anil_adapts_the_head_only_and_meta_learns_the_body() -> None:
    model = fewshot.make_model(1, 16, 4, 3).double()
    assert fewshot.head_parameter_names(model) == HEAD
    assert fewshot.adapted_names(model, "anil") == HEAD and fewshot.adapted_names(model, "maml") is None
    assert fewshot.head_parameter_names(torch.nn.Sequential(torch.nn.Linear(2, 3))) == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="has no"):
        fewshot.head_parameter_names(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)))

    pool = fd.synthetic_glyphs(16, classes=(3, 1, 1), images_per_class=3)["train"]
    task = fd.sample_task(pool, 3, 1, 1, torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for name, estimator in (("full", fewshot.mg.Full()), ("checkpointed", fewshot.mg.Checkpointed())):
        model.zero_grad(set_to_none=True)
        infos: list[dict[str, Any]] = []
        # A large step, so that the inner loop moves the head enough to matter for the body.
        fewshot.meta_batch_step(model, estimator, [task], 3, 0.5, torch.device("cpu"), torch.float64,
                                adapt=HEAD, infos=infos)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if name == "checkpointed":
            # The body is a meta-parameter of the inner loop, not adapted by it: only the
            # head's parameters are fast weights.
            assert sorted(infos[0]["meta_parameters"]) == sorted(BODY)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # the inner loop never writes θ
    for n in BODY + HEAD:
        assert grads["full"][n] is not None
        torch.testing.assert_close(grads["checkpointed"][n], grads["full"][n], rtol=0, atol=1e-8)
    # Every body weight gets a meta-gradient (the conv biases sit before BatchNorm, which
    # cancels them, so theirs is zero up to rounding).
    for layer in (0, 1, 4, 5, 8, 9, 12, 13):
        assert grads["full"][f"{layer}.weight"].abs().max() > 1e-6

    # Through the inner loop, not only directly from the query: FirstOrder, which keeps no
    # second derivative, gives the body a different meta-gradient (and says so).
    model.zero_grad(set_to_none=True)
    seen: dict[str, Any] = {}
    fewshot.meta_batch_step(model, fewshot.mg.FirstOrder(), [task], 3, 0.5, torch.device("cpu"), torch.float64,
                            seen, adapt=HEAD)
    assert any("FirstOrder: the meta-parameters" in entry["first"] for entry in seen.values())
    assert not torch.allclose(model.get_parameter("0.weight").grad, grads["full"]["0.weight"], rtol=0, atol=1e-8)


METASGD = [*RESUME, "--algorithm", "metasgd", "--estimator", "checkpointed"]


def test_metasgd_learns_step_sizes_and_resume_restores_them(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    whole = tmp_path / "whole"
    fewshot.main([*METASGD, "--out", str(whole)])
    finished = checkpoint_of(whole)
    sizes = finished["step_sizes"]
    assert sorted(sizes) == sorted(BODY + HEAD)
    for name, param in finished["model"].items():
        assert sizes[name].shape == param.shape  # one step size per parameter entry
    assert not torch.equal(sizes["0.weight"], torch.full_like(sizes["0.weight"], 0.01))  # learned
    assert all(bool((value >= 0).all()) for value in sizes.values())
    # Adam's second group holds exactly the step sizes.
    assert len(finished["optimizer"]["param_groups"]) == 2
    assert len(finished["optimizer"]["param_groups"][1]["params"]) == len(sizes)

    # Interrupted after its 4th meta-iteration and resumed: the same step sizes as the whole run.
    original, calls = fewshot.meta_batch_step, []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(fewshot, "meta_batch_step", interrupted)
    parted = tmp_path / "parted"
    with pytest.raises(SystemExit):
        fewshot.main([*METASGD, "--out", str(parted)])
    at_interrupt = checkpoint_of(parted)
    assert at_interrupt["iteration"] == 4
    monkeypatch.undo()
    resumed = fewshot.main([*METASGD, "--out", str(parted), "--resume"])
    again = checkpoint_of(parted)
    for key in ("model", "step_sizes", "best_step_sizes", "optimizer", "train_loss", "validation"):
        assert_same_tensors(finished[key], again[key])
    assert not torch.equal(at_interrupt["step_sizes"]["0.weight"], again["step_sizes"]["0.weight"])
    assert resumed["step_sizes_final"] == summarize(sizes)

    # Another algorithm cannot resume it.
    with pytest.raises(SystemExit, match=r"different settings: --algorithm 'metasgd' \(now 'maml'\)"):
        fewshot.main([*METASGD, "--algorithm", "maml", "--out", str(parted), "--resume"])


def summarize(sizes: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    return fewshot.summarize_step_sizes(sizes)


def test_metasgd_step_sizes_are_clamped_at_zero() -> None:
    args = fewshot.parse_args([*TINY, "--algorithm", "metasgd"])
    training = fewshot.Training(fewshot.make_model(1, 16, 4, 3), args)
    with torch.no_grad():
        training.step_sizes["0.weight"].view(-1)[0] = -0.5
    training.project_step_sizes()
    value = training.step_sizes["0.weight"]
    assert value.view(-1)[0] == 0 and bool((value.view(-1)[1:] == 0.01).all()) and value.requires_grad


def test_checkpoint_from_before_the_flag_resumes_as_maml(tmp_path: Path) -> None:
    out = tmp_path / "r"
    fewshot.main([*RESUME, "--iterations", "2", "--out", str(out)])
    state = checkpoint_of(out)
    del state["config"]["algorithm"], state["step_sizes"], state["best_step_sizes"]  # an earlier checkpoint
    torch.save(state, out / "checkpoint.pt")
    results = fewshot.main([*RESUME, "--iterations", "3", "--out", str(out), "--resume"])
    assert results["iterations_completed"] == 3
    with pytest.raises(SystemExit, match=r"--algorithm 'maml' \(now 'anil'\)"):
        fewshot.main([*RESUME, "--iterations", "4", "--algorithm", "anil", "--out", str(out), "--resume"])


def test_implicit_gives_metasgd_step_sizes_no_gradient_and_says_so(tmp_path: Path) -> None:
    results = fewshot.main([*TINY, "--iterations", "1", "--inner-steps", "2", "--eval-inner-steps", "2",
                            "--algorithm", "metasgd", "--estimator", "implicit", "--reg", "150",
                            "--out", str(tmp_path / "r")])
    messages = [w["message"] for w in results["estimator_warnings"]]
    assert any(m.startswith("Implicit: the step sizes") for m in messages), messages
    for stats in results["step_sizes_final"].values():
        # Untouched: Adam skips a .grad of None. (0.01 in float32.)
        assert stats["min"] == stats["max"] == torch.tensor(0.01, dtype=torch.float32).item()


@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_a_meta_batch_in_one_block_equals_a_block_per_task(algorithm: str) -> None:
    """meta_batch_step with one_block (the script's default: MetaGradient(tasks=...)) gives the
    meta-gradient, loss and accuracy of a block per task, in float64, for MAML, ANIL (the head
    adapted, the body a meta-parameter) and Meta-SGD (learned step sizes)."""
    pool = fd.synthetic_glyphs(16, classes=(3, 1, 1), images_per_class=4)["train"]
    generator = torch.Generator().manual_seed(1)
    tasks = [fd.sample_task(pool, 3, 1, 2, generator) for _ in range(3)]
    torch.manual_seed(0)
    model = fewshot.make_model(1, 16, 4, 3).double()
    adapt = HEAD if algorithm == "anil" else None
    lr: Any = 0.3
    if algorithm == "metasgd":
        lr = {n: torch.full_like(p, 0.3, requires_grad=True) for n, p in model.named_parameters()}
    leaves = [*model.parameters(), *(lr.values() if isinstance(lr, dict) else [])]
    results = []
    for one_block in (True, False):
        for p in leaves:
            p.grad = None
        loss, accuracy = fewshot.meta_batch_step(model, fewshot.mg.Checkpointed(), tasks, 2, lr, torch.device("cpu"),
                                                 torch.float64, adapt=adapt, one_block=one_block)
        results.append((loss, accuracy, torch.cat([p.grad.reshape(-1) for p in leaves])))
    (loss_one, acc_one, grad_one), (loss_each, acc_each, grad_each) = results
    assert abs(loss_one - loss_each) <= 1e-12 * abs(loss_each) and abs(acc_one - acc_each) <= 1e-12
    assert float((grad_one - grad_each).norm() / grad_each.norm()) < 1e-10
