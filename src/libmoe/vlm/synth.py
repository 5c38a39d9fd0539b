"""libmoe-synth: a small procedurally generated multimodal dataset in the LLaVA formats.

`write_synth_dataset(out)` draws one image per example for each subtask in `SUBTASKS` and writes, under
`out`::

    images/train/<subtask>_<i>.png   images/test/<subtask>_<i>.png   (RGB, image_size square)
    pt.json        LLaVA-Pretrain format: one caption per training image (dense stage 1)
    instruct.json  LLaVA-665K format: three questions per training image, one answered "Yes", one
                   "No" and one open question answered with one lowercase word or number; one
                   record per question (default), or one three-turn record per image (`multi_turn`).
                   Single-turn is the default because in a multi-turn record the later yes/no
                   question can be answered from the model's own earlier open answer ("white" ->
                   "Is the triangle blue?" -> No), a text shortcut: a small model trained on such
                   records reaches a low loss and chance accuracy on held-out single questions.
    mme.json       MME-style held-out split: two records per test image, one "Yes" and one "No"
    open.json      held-out open questions, one per test image
    dataset.json   the manifest (also returned)

Everything is offline: shapes, words and sums are drawn with Pillow (text in its built-in bitmap font),
digits come from ``sklearn.datasets.load_digits()`` and textures from photographs shipped inside
scikit-image (``skimage.data.brick/grass/gravel``). The output is a function of the seed alone: each
subtask draws from its own random streams (``[seed, subtask index, split]``), so choosing a subset of
subtasks does not change the images of the others, and files are byte-identical across runs.

Train and test images are disjoint: digits come from disjoint sklearn indices, texture crops from
disjoint rows of the source photograph (train above, test below), and every image is checked by content
hash against all earlier ones and redrawn on a collision. The answers are easy to read off the image
(well separated colours, shapes of at least a fifth of the image, positions far from the centre,
textures tinted in their natural colours) so that a small model trained briefly can learn them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..overrides import did_you_mean

SUBTASKS: tuple[str, ...] = (
    "existence", "colour", "count", "position", "texture", "ocr", "digits", "arithmetic",
)
SUBTASK_GROUPS: dict[str, str] = {
    "existence": "perception", "colour": "perception", "count": "perception", "position": "perception",
    "texture": "perception", "ocr": "reading", "digits": "reading", "arithmetic": "reading",
}
_ALIASES = {"color": "colour", "digit": "digits", "textures": "texture", "counting": "count"}

NAME = "libmoe-synth"
VERSION = "2"  # 2: single-turn instruct records by default

YES_NO_SUFFIX = " Please answer yes or no."
OPEN_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the image.",
    "Summarize the visual content of the image.",
    "Write a terse but informative summary of the picture.",
    "What is in the image?",
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 90, 235),
    "yellow": (240, 220, 40), "purple": (150, 50, 200), "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top",
                             "bottom": "at the bottom"}
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "star", "moon", "rain",
                          "ship", "milk", "frog", "lamp", "door", "king")
INK: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "dark blue": (20, 30, 150),
                                        "dark red": (150, 20, 20), "dark green": (20, 100, 30)}
TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")  # skimage.data images shipped in the wheel
_TEXTURE_TINT = {"brick": (1.25, 0.62, 0.45), "grass": (0.6, 1.15, 0.45), "gravel": (1.0, 1.0, 1.0)}
_TEXTURE_SPLIT = 0.7  # train crops lie above this fraction of the photograph's height, test crops below
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SUPERSAMPLE = 4
_MAX_REDRAWS = 1000
_N_DIGITS = 1797  # len(sklearn.datasets.load_digits().target)


@dataclass
class _Example:
    image: Any  # PIL.Image.Image, RGB
    caption: str
    yes: str  # a question answered "Yes" (without the yes/no suffix)
    no: str  # a question answered "No"
    open_q: str
    open_a: str


# ---------------------------------------------------------------------------------------------- drawing


def _shape_canvas(size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    grey = int(rng.integers(16, 65))
    image = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), (grey, grey, grey))
    return image, ImageDraw.Draw(image)


def _finish(image, size: int):
    from PIL import Image

    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(draw, kind: str, cx: float, cy: float, d: float, fill) -> None:
    """A `kind` shape of diameter `d` centred at (cx, cy), coordinates in output pixels."""
    s = _SUPERSAMPLE
    cx, cy, r = cx * s, cy * s, d * s / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.98, cy + r * 0.8), (cx - r * 0.98, cy + r * 0.8)],
                     fill=fill)
    elif kind == "cross":
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # pragma: no cover - internal
        raise ValueError(kind)


def _grid_cells(size: int, n: int, rng: np.random.Generator, k: int, dmin: float, dmax: float):
    """`n` (cx, cy, d) in distinct cells of a k x k grid, jittered inside their cells."""
    cell = size / k
    cells = rng.choice(k * k, size=n, replace=False)
    out = []
    for c in sorted(int(c) for c in cells):  # row-major order: captions list shapes in reading order
        row, col = divmod(c, k)
        d = float(rng.uniform(dmin, dmax)) * size
        slack = max(cell - d, 0.0) / 2
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
        out.append((cx, cy, d))
    return out


def _other(rng: np.random.Generator, options, exclude) -> Any:
    rest = [o for o in options if o not in set(exclude)]
    return rest[int(rng.integers(len(rest)))]


def _pick(rng: np.random.Generator, options) -> Any:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def _text_image(text: str, size: int, rng: np.random.Generator):
    """`text` in Pillow's built-in bitmap font, scaled up by a whole factor, on a light background."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") \
        else ImageFont.load_default()
    x0, y0, x1, y1 = font.getbbox(text)
    w, h = x1 - x0, y1 - y0
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, font=font, fill=255)
    scale = max(1, int(0.85 * size // max(w, 6 * 4)))  # one scale for every word of up to 4 letters
    mask = mask.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    grey = int(rng.integers(200, 256))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    ink_name = _pick(rng, INK)
    ox = int(rng.integers(0, max(size - mask.width, 0) + 1))
    oy = int(rng.integers(0, max(size - mask.height, 0) + 1))
    image.paste(Image.new("RGB", mask.size, INK[ink_name]), (ox, oy), mask)
    return image, ink_name


# --------------------------------------------------------------------------------------------- subtasks


def _existence(rng, size, split, state) -> _Example:
    n = int(rng.integers(1, 4))
    kinds = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=n, replace=False)]
    image, draw = _shape_canvas(size, rng)
    for (cx, cy, d), kind, colour in zip(_grid_cells(size, n, rng, 2, 0.24, 0.34), kinds, colours):
        _draw_shape(draw, kind, cx, cy, d, COLOURS[colour])
    present = _pick(rng, kinds)
    absent = _other(rng, SHAPES, kinds)
    asked = _pick(rng, range(n))
    return _Example(
        _finish(image, size),
        f"{_join([_a(f'{c} {k}') for c, k in zip(colours, kinds)]).capitalize()} on a dark background.",
        f"Is there a {present} in the image?", f"Is there a {absent} in the image?",
        f"Which shape is {colours[asked]}?", kinds[asked],
    )


def _colour(rng, size, split, state) -> _Example:
    kind, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
    image, draw = _shape_canvas(size, rng)
    d = float(rng.uniform(0.36, 0.5)) * size
    cx, cy = (float(rng.uniform(d / 2, size - d / 2)) for _ in range(2))
    _draw_shape(draw, kind, cx, cy, d, COLOURS[colour])
    return _Example(
        _finish(image, size), f"{_a(f'{colour} {kind}').capitalize()} on a dark background.",
        f"Is the {kind} {colour}?", f"Is the {kind} {_other(rng, COLOURS, [colour])}?",
        f"What colour is the {kind}?", colour,
    )


def _count(rng, size, split, state) -> _Example:
    n = int(rng.integers(1, 6))
    kinds = [_pick(rng, SHAPES) for _ in range(n)]
    colours = [_pick(rng, COLOURS) for _ in range(n)]
    image, draw = _shape_canvas(size, rng)
    for (cx, cy, d), kind, colour in zip(_grid_cells(size, n, rng, 3, 0.2, 0.27), kinds, colours):
        _draw_shape(draw, kind, cx, cy, d, COLOURS[colour])
    things = _join([_a(f"{c} {k}") for c, k in zip(colours, kinds)])
    caption = (f"One shape on a dark background: {things}." if n == 1
               else f"{_NUMBER_WORDS[n].capitalize()} shapes on a dark background: {things}.")
    wrong = _other(rng, range(1, 6), [n])
    return _Example(
        _finish(image, size), caption,
        f"Are there {n} shapes in the image?" if n > 1 else "Is there exactly 1 shape in the image?",
        f"Are there {wrong} shapes in the image?" if wrong > 1 else "Is there exactly 1 shape in the image?",
        "How many shapes are there in the image?", str(n),
    )


def _position(rng, size, split, state) -> _Example:
    kind, colour, where = _pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, POSITIONS)
    image, draw = _shape_canvas(size, rng)
    d = float(rng.uniform(0.26, 0.32)) * size
    near = float(rng.uniform(0.17, 0.23)) * size  # centre this far from its side: the shape stays clear
    mid = float(rng.uniform(0.42, 0.58)) * size  # of the middle third; the other axis stays central
    cx, cy = {"left": (near, mid), "right": (size - near, mid), "top": (mid, near),
              "bottom": (mid, size - near)}[where]
    _draw_shape(draw, kind, cx, cy, d, COLOURS[colour])
    wrong = _other(rng, POSITIONS, [where])
    return _Example(
        _finish(image, size), f"{_a(f'{colour} {kind}').capitalize()} {POSITIONS[where]} of the image.",
        f"Is the {kind} {POSITIONS[where]}?", f"Is the {kind} {POSITIONS[wrong]}?",
        f"Where is the {kind}: left, right, top or bottom?", where,
    )


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed `package`, located without importing the package (importing
    scikit-learn or scikit-image costs seconds); None when the package or the file is missing."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root, *parts)
        if path.is_file():
            return path
    return None


def _texture_sources() -> dict[str, np.ndarray]:
    """The grey-level photographs `skimage.data.<name>()` returns, read from the files scikit-image ships
    (skimage/data/<name>.png) so that no download is ever attempted."""
    from PIL import Image

    sources = {}
    for name in TEXTURES:
        path = _package_file("skimage", "data", f"{name}.png")
        if path is None:  # an unusual install: let scikit-image find it
            try:
                import skimage.data
            except ImportError as err:
                raise ImportError("the texture subtask needs scikit-image: "
                                  "pip install 'libmoe[vlm]'") from err
            pixels = getattr(skimage.data, name)()
        else:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("L"))
        sources[name] = np.asarray(pixels, dtype=np.float32)
    return sources


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] in 0..16, targets) exactly as ``sklearn.datasets.load_digits()`` gives them,
    read from the digits.csv.gz scikit-learn ships (sklearn/datasets/data/) without importing scikit-learn."""
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("the digits subtask needs scikit-learn: pip install 'libmoe[vlm]'") from err
        digits = load_digits()
        return np.asarray(digits.images), np.asarray(digits.target)
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _texture(rng, size, split, state) -> _Example:
    from PIL import Image

    name = _pick(rng, TEXTURES)
    src = state["sources"][name]
    h, w = src.shape[:2]
    crop = min(h, w) // 4
    cut = int(h * _TEXTURE_SPLIT)
    lo, hi = (0, cut - crop) if split == "train" else (cut, h - crop)
    y, x = int(rng.integers(lo, hi + 1)), int(rng.integers(0, w - crop + 1))
    patch = src[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    rgb = np.clip(patch[..., None] * np.asarray(_TEXTURE_TINT[name], dtype=np.float32), 0, 255)
    image = Image.fromarray(rgb.astype(np.uint8), "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return _Example(
        image, f"A close-up photograph of a {name} texture.",
        f"Is this a {name} texture?", f"Is this a {_other(rng, TEXTURES, [name])} texture?",
        "What texture is shown in the image?", name,
    )


def _ocr(rng, size, split, state) -> _Example:
    word = _pick(rng, WORDS)
    image, ink = _text_image(word, size, rng)
    return _Example(
        image, f"The word '{word}' written in {ink} on a light background.",
        f"Does the image say '{word}'?", f"Does the image say '{_other(rng, WORDS, [word])}'?",
        "What word is written in the image?", word,
    )


def _digits(rng, size, split, state) -> _Example:
    from PIL import Image

    if "images" not in state:
        state["images"], state["targets"] = _load_digits()
        n = len(state["targets"])
        state["order"] = [int(i) for i in np.random.default_rng(state["pool_seed"]).permutation(n)]
        state["next"] = {"test": 0, "train": n - 1}  # test indices from the front, train from the back
    nxt = state["next"]
    if nxt["test"] > nxt["train"]:
        raise ValueError(f"digits: sklearn's load_digits() has only {len(state['order'])} images; ask for "
                         "fewer (n_per_task + n_test_per_task, plus any redrawn duplicates)")
    index = state["order"][nxt[split]]
    nxt[split] += 1 if split == "test" else -1
    digit = int(state["targets"][index])
    pixels = (state["images"][index] * (255.0 / 16.0)).astype(np.uint8)
    side = int(round(float(rng.uniform(0.72, 0.9)) * size))
    glyph = Image.fromarray(pixels, "L").resize((side, side), Image.Resampling.BICUBIC)
    image = Image.new("RGB", (size, size), (0, 0, 0))
    ox, oy = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    image.paste(Image.merge("RGB", (glyph, glyph, glyph)), (ox, oy))
    return _Example(
        image, f"A handwritten digit {digit}, white on a black background.",
        f"Is this the digit {digit}?", f"Is this the digit {_other(rng, range(10), [digit])}?",
        "What digit is this?", str(digit),
    )


def _arithmetic(rng, size, split, state) -> _Example:
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    op = "+" if rng.random() < 0.5 else "-"
    if op == "-" and a < b:
        a, b = b, a
    result = a + b if op == "+" else a - b
    text = f"{a}{op}{b}"
    image, ink = _text_image(text, size, rng)
    near = [r for r in range(max(0, result - 3), result + 4) if r != result]
    return _Example(
        image, f"The expression '{text}' written in {ink} on a light background.",
        f"Is the result of the expression {result}?", f"Is the result of the expression {_pick(rng, near)}?",
        "What is the result of the expression in the image?", str(result),
    )


_GENERATORS: dict[str, Callable[..., _Example]] = {
    "existence": _existence, "colour": _colour, "count": _count, "position": _position,
    "texture": _texture, "ocr": _ocr, "digits": _digits, "arithmetic": _arithmetic,
}


# ---------------------------------------------------------------------------------------------- writing


def resolve_subtasks(subtasks: str | Iterable[str] | None) -> list[str]:
    """Valid subtask names in `SUBTASKS` order (None: all; a string may list several, comma-separated);
    an unknown name raises ValueError with the valid ones."""
    if subtasks is None:
        return list(SUBTASKS)
    names = [s for s in re.split(r"[,\s]+", subtasks) if s] if isinstance(subtasks, str) else list(subtasks)
    chosen = set()
    for name in names:
        key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
        if key not in SUBTASKS:
            raise ValueError(f"unknown synth subtask {name!r}.{did_you_mean(name, SUBTASKS)} "
                             f"Valid subtasks: {', '.join(SUBTASKS)}.")
        chosen.add(key)
    if not chosen:
        raise ValueError(f"no synth subtasks given; valid subtasks: {', '.join(SUBTASKS)}.")
    return [s for s in SUBTASKS if s in chosen]


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def write_synth_dataset(
    out: str | Path,
    subtasks: str | Iterable[str] | None = None,
    n_per_task: int = 200,
    n_test_per_task: int = 50,
    seed: int = 0,
    image_size: int = 64,
    log: Callable[[str], Any] | None = print,
    multi_turn: bool = False,
) -> dict:
    """Write the libmoe-synth dataset under `out` (see the module docstring) and return its manifest.

    `subtasks`: names from `SUBTASKS` (None: all); `n_per_task` training and `n_test_per_task` test images
    per subtask, each `image_size` pixels square; `log` gets one line per subtask (None: silent);
    `multi_turn`: one three-turn instruct record per image instead of one record per question.
    """
    names = resolve_subtasks(subtasks)
    n_train = _check_int("n_per_task", n_per_task, 1)
    n_test = _check_int("n_test_per_task", n_test_per_task, 0)
    size = _check_int("image_size", image_size, 32)
    seed = _check_int("seed", seed, 0)
    if "digits" in names and n_train + n_test > _N_DIGITS:
        raise ValueError(f"digits: sklearn's load_digits() has only {_N_DIGITS} images; ask for at most that "
                         f"many in all (n_per_task + n_test_per_task = {n_train + n_test})")
    log = log or (lambda _line: None)
    out = Path(out)
    _clear_images(out)
    files: dict[str, list[dict]] = {"pt.json": [], "instruct.json": [], "mme.json": [], "open.json": []}
    seen: set[bytes] = set()
    for name in names:
        k = SUBTASKS.index(name)
        state: dict[str, Any] = {"pool_seed": [seed, k, 2]}
        if name == "texture":
            state["sources"] = _texture_sources()
        for split, n in (("train", n_train), ("test", n_test)):
            # The test split's generator is seeded [seed, 2, 1] for every subtask: the first version
            # reused `k` as the instruct turn index (0..2) before seeding it. Kept, so the dataset (and
            # every result on it) stays the same for a given VERSION.
            rng = np.random.default_rng([seed, k, 0] if split == "train" else [seed, 2, 1])
            for i in range(n):
                ex = _distinct_example(name, rng, size, split, state, seen)
                rel = f"images/{split}/{name}_{i}.png"
                (out / rel).write_bytes(_png_bytes(ex.image))
                image_id = f"{name}_{split}_{i}"
                if split == "train":
                    files["pt.json"].append(_caption_record(ex, rel, image_id, name, rng))
                    files["instruct.json"] += _instruct_records(ex, rel, image_id, name, rng, multi_turn)
                else:
                    files["mme.json"] += _mme_pair(ex, rel, image_id, name, rng)
                    files["open.json"].append({"question_id": image_id, "image": rel,
                                               "question": ex.open_q + OPEN_SUFFIX, "answer": ex.open_a,
                                               "category": name})
        log(f"synth: {name} ({SUBTASK_GROUPS[name]}): {n_train} train + {n_test} test images, "
            f"{2 * n_train} + {2 * n_test} yes/no questions, half answered Yes")
    for filename, records in files.items():
        _dump(out / filename, records)
    manifest = {
        "name": NAME, "version": VERSION, "subtasks": names,
        "groups": {name: SUBTASK_GROUPS[name] for name in names},
        "seed": seed, "n_per_task": n_train, "n_test_per_task": n_test, "image_size": size,
        "multi_turn": bool(multi_turn),
        "counts": {"images/train": n_train * len(names), "images/test": n_test * len(names),
                   **{filename: len(records) for filename, records in files.items()}},
    }
    _dump(out / "dataset.json", manifest)
    return manifest


def _clear_images(out: Path) -> None:
    """OUT/images/{train,test}, without earlier runs' images: the folders hold exactly this dataset."""
    pattern = re.compile(rf"^({'|'.join(SUBTASKS)})_\d+\.png$")
    for split in ("train", "test"):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if pattern.match(stale.name):
                stale.unlink()


def _distinct_example(name: str, rng: np.random.Generator, size: int, split: str, state: dict[str, Any],
                      seen: set[bytes]) -> _Example:
    """A new example of subtask `name` whose RGB image no earlier example of the dataset has."""
    for _ in range(_MAX_REDRAWS):
        ex = _GENERATORS[name](rng, size, split, state)
        ex.image = ex.image.convert("RGB")
        digest = hashlib.sha256(ex.image.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            return ex
    raise RuntimeError(f"{name}: no new distinct image after {_MAX_REDRAWS} tries")  # pragma: no cover


def _caption_record(ex: _Example, rel: str, image_id: str, name: str, rng: np.random.Generator) -> dict:
    """The PT record of a training image: a caption prompt and its caption."""
    return {"id": image_id, "image": rel, "conversations": [
        {"from": "human", "value": "<image>\n" + _pick(rng, CAPTION_PROMPTS)},
        {"from": "gpt", "value": ex.caption}], "subtask": name}


def _instruct_records(ex: _Example, rel: str, image_id: str, name: str, rng: np.random.Generator,
                      multi_turn: bool) -> list[dict]:
    """The instruct records of a training image: its yes, no and open question in a random order, one
    record each, or one three-turn record with `multi_turn`."""
    turns = [(ex.yes + YES_NO_SUFFIX, "Yes"), (ex.no + YES_NO_SUFFIX, "No"),
             (ex.open_q + OPEN_SUFFIX, ex.open_a)]
    records, conversations = [], []
    for t, j in enumerate(rng.permutation(len(turns))):
        question, answer = turns[int(j)]
        if not multi_turn:
            records.append({"id": f"{image_id}_q{t}", "image": rel, "subtask": name, "conversations": [
                {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
            continue
        conversations += [{"from": "human", "value": ("<image>\n" if not conversations else "") + question},
                          {"from": "gpt", "value": answer}]
    if multi_turn:
        records.append({"id": image_id, "image": rel, "conversations": conversations, "subtask": name})
    return records


def _mme_pair(ex: _Example, rel: str, image_id: str, name: str, rng: np.random.Generator) -> list[dict]:
    """The two MME questions of a test image (answered Yes and No), in a random order."""
    pair = [(ex.yes, "Yes"), (ex.no, "No")]
    if rng.random() < 0.5:
        pair.reverse()
    return [{"question_id": f"{image_id}_{j}", "image": rel, "question": question + YES_NO_SUFFIX,
             "answer": answer, "category": name, "pair": image_id}
            for j, (question, answer) in enumerate(pair)]
