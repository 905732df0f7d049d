"""Data for ``examples/fewshot.py``: image folders, procedurally drawn glyphs, and N-way K-shot tasks.

Every source ends as one :class:`ClassPool` per split (``train``, ``val``, ``test``): all
images of the split in one ``uint8`` tensor, grouped by class. Tasks are drawn from a
pool by :func:`sample_task`.

Sources:

- :func:`load_omniglot`: the official Omniglot release, ``images_background/`` and
  ``images_evaluation/`` holding ``<alphabet>/<character>/*.png``. The class split is
  MAML's (Finn et al. 2017, after Vinyals et al. 2016): see :func:`omniglot_split`.
- :func:`load_image_folders`: miniImageNet and tieredImageNet as
  ``<root>/{train,val,test}/<class>/*.{jpg,jpeg,png}``.
- :func:`synthetic_glyphs`: classes of procedurally drawn glyphs, made in-process, so the
  example runs anywhere without data.

Images are decoded with Pillow once and cached as a tensor file beside the data
(:func:`decode_cached`); a later run whose file list is unchanged loads the cache.

Anything missing or malformed raises :class:`DataError`, whose message says what was
expected and where.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1

# MAML's Omniglot split (Finn et al. 2017, data_generator.py; the counts of Vinyals et al.
# 2016): of the 1623 characters, 1100 meta-train, 100 validate, 423 meta-test.
OMNIGLOT_SPLIT = {"train": 1100, "val": 100, "test": 423}
OMNIGLOT_SPLIT_SEED = 1  # fixed, independent of --seed: the split is part of the dataset


class DataError(Exception):
    """Missing or malformed data; the message says what was expected and where."""


# --------------------------------------------------------------------------- pools
@dataclass
class ClassPool:
    """The images of one split, grouped by class.

    Class ``c`` (of the stored classes) owns ``images[starts[c] : starts[c] + counts[c]]``.
    With ``rotations = 4`` every stored class also appears rotated by 90°, 180° and 270°,
    each rotation a class of its own (Vinyals et al. 2016): pool class ``c`` is stored
    class ``c // rotations`` turned ``c % rotations`` quarter turns.
    """

    split: str
    images: torch.Tensor  # (images, channels, height, width), uint8
    class_names: list[str]
    starts: list[int]
    counts: list[int]
    rotations: int = 1
    #: where each stored class came from (a folder), for error messages; "" if generated
    class_sources: Optional[list[str]] = None

    @property
    def num_classes(self) -> int:
        """Classes a task can draw from, rotations included."""
        return len(self.class_names) * self.rotations

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def require(self, ways: int, per_class: int, why: str) -> None:
        """Raise :class:`DataError` unless a task of ``ways`` classes × ``per_class`` images fits.

        Args:
            ways: classes per task.
            per_class: images each class must hold (shots + queries).
            why: what asks for them, for the message, e.g. ``"5-way 1-shot tasks with 15 queries"``.
        """
        if self.num_classes < ways:
            raise DataError(
                f"split {self.split!r} has {self.num_classes} classes, but {why} need at least {ways} "
                f"(--ways {ways})."
            )
        short = [c for c, n in enumerate(self.counts) if n < per_class]
        if short:
            listed = ", ".join(
                f"{self.class_names[c]!r} ({self.counts[c]} images"
                + (f", in {self.class_sources[c]}" if self.class_sources and self.class_sources[c] else "")
                + ")"
                for c in short[:5]
            )
            more = f" and {len(short) - 5} more" if len(short) > 5 else ""
            raise DataError(
                f"split {self.split!r}: {len(short)} of {len(self.counts)} classes have fewer than the "
                f"{per_class} images per class that {why} need (shots + queries): {listed}{more}. "
                "Lower --shots or --queries/--eval-queries, or remove those classes."
            )


@dataclass
class Task:
    """One N-way K-shot task; images are uint8 ``(count, channels, height, width)``.

    Labels are ``0 … N−1``, class ``classes[j]`` of the pool having label ``j``. The
    support holds ``shots`` images per class and the query ``queries``, both ordered by
    label.
    """

    support_images: torch.Tensor
    support_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    classes: list[int]


def sample_task(pool: ClassPool, ways: int, shots: int, queries: int,
                generator: torch.Generator) -> Task:
    """Draw one task from ``pool``: ``ways`` distinct classes, disjoint support and query.

    The classes are a uniformly random ordered subset of the pool, so which class gets
    which label is a fresh random permutation every task (the head of the model cannot
    memorize classes). Within each class, ``shots + queries`` distinct images are drawn;
    the first ``shots`` are the support. Everything comes from ``generator``, so a task
    stream is reproducible from its seed.
    """
    classes = torch.randperm(pool.num_classes, generator=generator)[:ways].tolist()
    support, query = [], []
    for c in classes:
        stored, turns = divmod(c, pool.rotations)
        chosen = torch.randperm(pool.counts[stored], generator=generator)[: shots + queries]
        images = pool.images[pool.starts[stored] + chosen]
        if turns:
            images = torch.rot90(images, turns, dims=(-2, -1))
        support.append(images[:shots])
        query.append(images[shots:])
    labels = torch.arange(ways)
    return Task(torch.cat(support), labels.repeat_interleave(shots),
                torch.cat(query), labels.repeat_interleave(queries), classes)


def starts_of(counts: Sequence[int]) -> list[int]:
    """Where each class's images begin, for classes stored one after another."""
    return [int(x) for x in np.concatenate([[0], np.cumsum(counts)[:-1]])] if len(counts) else []


def pool_from_lists(split: str, images: Sequence[np.ndarray], class_names: list[str],
                    counts: list[int], rotations: int = 1,
                    class_sources: Optional[list[str]] = None) -> ClassPool:
    """Stack per-image ``(channels, height, width)`` arrays, grouped by class, into a pool."""
    return ClassPool(split, torch.from_numpy(np.stack(images)), class_names, starts_of(counts), list(counts),
                     rotations, class_sources)


# ------------------------------------------------------------------- image folders
def list_class_folder(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted; hidden files and other types ignored."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def subfolders(folder: Path) -> list[Path]:
    """The visible subfolders, sorted by name (the order classes get their indices in)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_classes(folder: Path, what: str) -> tuple[list[str], list[list[Path]]]:
    """Class names and image files of ``folder/<class>/*``; errors name the folder at fault."""
    if not folder.is_dir():
        raise DataError(f"{what}: expected a folder at {folder}, but it does not exist.")
    classes = subfolders(folder)
    if not classes:
        raise DataError(f"{what}: {folder} holds no class folders; expected {folder}/<class>/*.png or *.jpg.")
    files = []
    for class_dir in classes:
        images = list_class_folder(class_dir)
        if not images:
            raise DataError(
                f"{what}: class folder {class_dir} holds no images; expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)} (any case)."
            )
        files.append(images)
    return [c.name for c in classes], files


def load_image_folders(root: Path, image_size: int, *, cache: bool = True,
                       dataset: str = "miniimagenet") -> dict[str, ClassPool]:
    """miniImageNet or tieredImageNet from ``<root>/{train,val,test}/<class>/*.{jpg,png}``.

    Images are converted to RGB and resized to ``image_size`` × ``image_size`` (Lanczos), as
    in the scripts that produced the 84×84 distributions. Each split is cached in
    ``<root>/fewshot_cache_<split>_<size>px_rgb.pt``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{dataset}: --data-root {root} does not exist; expected a folder holding train/, val/ "
            "and test/, each with one folder of images per class."
        )
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"{dataset}: {root} lacks the split folder(s) {', '.join(missing)}; expected "
            f"{root}/{{train,val,test}}/<class>/*.jpg (see docs/fewshot.md for converting the "
            "pickle and CSV distributions)."
        )
    pools = {}
    for split in SPLITS:
        names, files = scan_classes(root / split, f"{dataset} {split}")
        pools[split] = decode_cached(
            split, names, files, [str(root / split / n) for n in names], image_size, "RGB", root=root,
            cache_path=root / f"fewshot_cache_{split}_{image_size}px_rgb.pt" if cache else None,
            label=f"{dataset} {split}")
    return pools


def find_omniglot(root: Path) -> Path:
    """The folder holding ``images_background/`` and ``images_evaluation/``.

    ``root`` may be that folder or its ``omniglot-py/`` parent (the layout torchvision
    downloads into).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"omniglot: --data-root {root} does not exist; expected the folder holding "
            "images_background/ and images_evaluation/ (the official release, unzipped), or its "
            "omniglot-py/ parent."
        )
    for candidate in (root, root / "omniglot-py"):
        if (candidate / "images_background").is_dir() and (candidate / "images_evaluation").is_dir():
            return candidate
    found = [str(c / n) for c in (root, root / "omniglot-py")
             for n in ("images_background", "images_evaluation") if (c / n).is_dir()]
    raise DataError(
        f"omniglot: expected {root}/images_background/ and {root}/images_evaluation/ (or the same "
        f"under {root}/omniglot-py/), each holding <alphabet>/<character>/*.png. "
        + (f"Found only {', '.join(found)}." if found else "Neither was found.")
    )


def scan_omniglot(base: Path) -> tuple[list[str], list[list[Path]]]:
    """Every character of both halves, named ``<half>/<alphabet>/<character>``, sorted."""
    names, files = [], []
    for half in ("images_background", "images_evaluation"):
        alphabets = subfolders(base / half)
        if not alphabets:
            raise DataError(f"omniglot: {base / half} holds no alphabet folders; expected "
                            f"{base / half}/<alphabet>/<character>/*.png.")
        for alphabet in alphabets:
            characters = subfolders(alphabet)
            if not characters:
                raise DataError(f"omniglot: alphabet folder {alphabet} holds no character folders; "
                                f"expected {alphabet}/<character>/*.png.")
            for character in characters:
                images = list_class_folder(character)
                if not images:
                    raise DataError(f"omniglot: character folder {character} holds no images; "
                                    "expected 20 PNG drawings (105×105) per character.")
                names.append(f"{half}/{alphabet.name}/{character.name}")
                files.append(images)
    return names, files


def omniglot_split(num_characters: int) -> dict[str, np.ndarray]:
    """Indices (into the sorted character list) of each split: MAML's convention.

    MAML pools the characters of both halves, shuffles them with a fixed seed, and takes
    1100 for meta-training, the next 100 for validation and the remaining 423 for
    meta-test. MAML's own shuffle followed ``os.listdir`` order, which differs between
    file systems, so its exact split cannot be reproduced anywhere; this one shuffles the
    sorted list with a fixed NumPy seed, so it is the same on every machine. A tree with
    a number of characters other than 1623 is split in the same proportions.
    """
    order = np.random.default_rng(OMNIGLOT_SPLIT_SEED).permutation(num_characters)
    total = sum(OMNIGLOT_SPLIT.values())
    if num_characters == total:
        sizes = OMNIGLOT_SPLIT
    else:
        test = round(num_characters * OMNIGLOT_SPLIT["test"] / total)
        val = round(num_characters * OMNIGLOT_SPLIT["val"] / total)
        sizes = {"train": num_characters - val - test, "val": val, "test": test}
    train_end = sizes["train"]
    val_end = train_end + sizes["val"]
    return {"train": np.sort(order[:train_end]), "val": np.sort(order[train_end:val_end]),
            "test": np.sort(order[val_end:])}


def load_omniglot(root: Path, image_size: int = 28, *, rotations: int = 4,
                  cache: bool = True) -> dict[str, ClassPool]:
    """Omniglot from the official release layout, split as MAML splits it.

    Drawings (black strokes on white, 105×105) are resized to ``image_size`` (Lanczos)
    and inverted so that strokes are bright, as MAML loads them. With ``rotations = 4``
    each character gives four classes, rotated by multiples of 90° (Vinyals et al. 2016).
    The decoded images are cached in ``<folder>/fewshot_cache_omniglot_<size>px.pt``.
    """
    base = find_omniglot(Path(root))
    names, files = scan_omniglot(base)
    everything = decode_cached(
        "all", names, files, [str(base / n) for n in names], image_size, "L", root=base,
        cache_path=(base / f"fewshot_cache_omniglot_{image_size}px.pt") if cache else None,
        label="omniglot", invert=True)
    pools = {}
    for split, indices in omniglot_split(len(names)).items():
        if not indices.size:
            raise DataError(
                f"omniglot: {base} holds {len(names)} characters, too few for MAML's split "
                f"(1100/100/423 of 1623): split {split!r} gets none."
            )
        images = [everything.images[everything.starts[i]: everything.starts[i] + everything.counts[i]]
                  for i in indices]
        counts = [everything.counts[i] for i in indices]
        pools[split] = ClassPool(split, torch.cat(images), [names[i] for i in indices], starts_of(counts),
                                 counts, rotations, [str(base / names[i]) for i in indices])
    return pools


# ----------------------------------------------------------------- decode + cache
def fingerprint(files: Sequence[Sequence[Path]], root: Path, image_size: int, mode: str, invert: bool) -> str:
    """A hash of the file list (paths below ``root``, sizes, modification times) and the decoding settings.

    A cache whose fingerprint matches was decoded from exactly these files, the same way.
    Paths are taken relative to ``root``, so a moved data folder keeps its cache.
    """
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size} {mode} {invert}\n".encode())
    for class_files in files:
        for path in class_files:
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        digest.update(b"--\n")
    return digest.hexdigest()


def decode_image(path: Path, image_size: int, mode: str, invert: bool) -> np.ndarray:
    """One image as ``(channels, image_size, image_size)`` uint8."""
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), resample=Image.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as error:  # Pillow's UnidentifiedImageError is an OSError
        raise DataError(f"could not decode image {path}: {error}") from None
    if invert:
        array = 255 - array
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_cached(split: str, class_names: list[str], files: list[list[Path]], sources: list[str],
                  image_size: int, mode: str, *, root: Path, cache_path: Optional[Path], label: str,
                  invert: bool = False) -> ClassPool:
    """Decode every image once, or load them from ``cache_path`` if it matches the files.

    The cache is a ``torch.save`` file of the uint8 image tensor, the class names and
    counts, and the :func:`fingerprint` of the files it was made from. A cache that does
    not match (files added, removed or changed) is rebuilt. If the folder is read-only
    the images are decoded every run, and a note says so.
    """
    key = fingerprint(files, root, image_size, mode, invert)
    counts = [len(f) for f in files]
    if cache_path is not None and cache_path.is_file():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # a truncated or foreign file: rebuild it
            print(f"note: ignoring unreadable cache {cache_path} ({error}); decoding again.", file=sys.stderr)
        else:
            if cached.get("fingerprint") == key:
                return ClassPool(split, cached["images"], class_names, starts_of(counts), counts, 1, sources)
            print(f"note: the files under {cache_path.parent} changed since {cache_path.name} was "
                  "written; decoding again.", file=sys.stderr)
    channels = 3 if mode == "RGB" else 1
    total = sum(counts)
    images = np.empty((total, channels, image_size, image_size), dtype=np.uint8)
    index = 0
    with tqdm(total=total, desc=f"decoding {label}", unit="img", file=sys.stderr,
              mininterval=1.0, disable=total < 2000) as bar:
        for class_files in files:
            for path in class_files:
                images[index] = decode_image(path, image_size, mode, invert)
                index += 1
                bar.update()
    tensor = torch.from_numpy(images)
    if cache_path is not None:
        temporary = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
        try:
            torch.save({"fingerprint": key, "images": tensor, "class_names": class_names,
                        "counts": counts}, temporary)
            os.replace(temporary, cache_path)  # atomic: a reader never sees half a cache
        except OSError as error:
            temporary.unlink(missing_ok=True)
            print(f"note: could not write the image cache {cache_path} ({error}); the images will be "
                  "decoded again next run.", file=sys.stderr)
    return ClassPool(split, tensor, class_names, starts_of(counts), counts, 1, sources)


# --------------------------------------------------------------- synthetic glyphs
@dataclass
class Glyph:
    """A class prototype: strokes, each a quadratic Bézier curve given by 3 control points."""

    strokes: np.ndarray  # (strokes, 3, 2), in [0, 1]² image coordinates
    width: float  # stroke width, as a fraction of the image side


def bezier(strokes: np.ndarray, samples: int) -> np.ndarray:
    """Points along quadratic Bézier curves: ``(strokes, 3, 2)`` control points → ``(strokes, samples, 2)``."""
    t = np.linspace(0.0, 1.0, samples)[None, :, None]
    p0, p1, p2 = strokes[:, 0, None], strokes[:, 1, None], strokes[:, 2, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def random_glyph(rng: np.random.Generator) -> Glyph:
    """Two to four random strokes, spread over at least 40% of the image in some direction.

    The spread rule rejects the occasional glyph that would be a dot: a class should be
    identifiable from its shape.
    """
    while True:
        count = int(rng.integers(2, 5))
        strokes = rng.uniform(0.15, 0.85, size=(count, 3, 2))
        ink = bezier(strokes, 9).reshape(-1, 2)  # a curve does not reach its middle control point
        if (ink.max(0) - ink.min(0)).max() >= 0.4:
            return Glyph(strokes, float(rng.uniform(0.07, 0.11)))


def render_glyph(glyph: Glyph, image_size: int, rng: np.random.Generator, *,
                 supersample: int = 4) -> np.ndarray:
    """One drawing of ``glyph`` as ``(1, image_size, image_size)`` uint8: jittered strokes, small affine map.

    A person writing the same character twice varies stroke shape, thickness, slant,
    size and position; so does this: control points move by about 3% of the image, the
    width by ±15%, and the drawing rotates by up to ±15°, scales by 0.85–1.1 and shifts
    by up to 8%. Drawn at ``supersample`` times the resolution and reduced with a box
    filter, for anti-aliased strokes.
    """
    side = image_size * supersample
    points = glyph.strokes + rng.normal(0.0, 0.03, size=glyph.strokes.shape)
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.85, 1.1)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = (points - 0.5) @ rotation.T + 0.5 + rng.uniform(-0.08, 0.08, size=2)
    curves = bezier(points, 9) * side
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    width = glyph.width * side * rng.uniform(0.85, 1.15)
    radius = width / 2
    for curve in curves.tolist():
        draw.line([tuple(xy) for xy in curve], fill=255, width=max(1, round(width)))
        # Round joints and caps. ImageDraw's joint="curve" does the same in Python and
        # made generation 3x slower.
        for x, y in curve:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    small = canvas.resize((image_size, image_size), resample=Image.BOX)
    return np.asarray(small, dtype=np.uint8)[None]


def synthetic_glyphs(image_size: int = 28, classes: Sequence[int] = (300, 50, 100),
                     images_per_class: int = 20, seed: int = 0) -> dict[str, ClassPool]:
    """Procedurally drawn glyph classes, ``classes`` per split, generated in-process.

    Each class is a random glyph of two to four strokes, and each of its
    ``images_per_class`` images a new drawing of it (:func:`render_glyph`). Classes differ
    in stroke layout, so a few examples identify a class, but drawings of one class vary
    enough that memorizing pixels does not. Splits have disjoint classes. ``seed`` fixes
    the dataset: it is part of the data, not of the training run.
    """
    if len(classes) != 3 or min(classes) < 1:
        raise DataError(f"synthetic: expected three class counts >= 1 (train val test), got {list(classes)}.")
    rng = np.random.default_rng(seed)
    pools = {}
    for split, count in zip(SPLITS, classes):
        glyphs = [random_glyph(rng) for _ in range(count)]
        images = [render_glyph(g, image_size, rng) for g in glyphs for _ in range(images_per_class)]
        pools[split] = pool_from_lists(split, images, [f"glyph-{split}-{c:04d}" for c in range(count)],
                                       [images_per_class] * count)
    return pools


if __name__ == "__main__":
    print("examples/fewshot_data.py holds the data loaders of examples/fewshot.py; it is not a script. "
          "Run python examples/fewshot.py --help.")
