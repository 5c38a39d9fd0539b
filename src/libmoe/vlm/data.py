"""LLaVA-format vision-language data: conversations for training, MME-style and open questions for
evaluation, and images as tensors.

`load_conversations(source)` reads a LLaVA JSON list (LLaVA-Pretrain's captions, LLaVA-665K's
instructions, or `libmoe.vlm.synth`'s pt.json/instruct.json) from a file, a folder or the Hugging Face Hub
and returns records normalised to ``{"id", "image", "conversations", "subtask"}`` with absolute image
paths, every record validated and every image checked to exist before anything is trained.
`load_mme`/`load_open` read the held-out files `libmoe.vlm.synth` writes; `load_image` gives a
normalised ``[3, size, size]`` float32 tensor (Pillow only, no torchvision).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class HubDataset:
    """A LLaVA dataset on the Hub: its JSON `file` and where its images come from."""

    repo_id: str
    file: str
    images_zip: str | None = None  # a zip in the same repository, extracted into images/ beside the JSON
    images_note: str = ""  # where the images come from when the repository does not hold them


HUB_DATASETS: dict[str, HubDataset] = {
    "liuhaotian/LLaVA-Pretrain": HubDataset(
        "liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", images_zip="images.zip"),
    "liuhaotian/LLaVA-Instruct-150K": HubDataset(
        "liuhaotian/LLaVA-Instruct-150K", "llava_v1_5_mix665k.json",
        images_note="LLaVA-665K's images are not in the Hub repository: they come from COCO (train2017), "
                    "GQA, OCR-VQA, TextVQA and Visual Genome; download them as LLaVA's README describes "
                    "and pass image_folder= the folder holding coco/, gqa/, ocr_vqa/, textvqa/ and vg/."),
}
HUB_ALIASES: dict[str, str] = {
    "llava-pretrain": "liuhaotian/LLaVA-Pretrain", "llava-558k": "liuhaotian/LLaVA-Pretrain",
    "llava-665k": "liuhaotian/LLaVA-Instruct-150K", "llava-instruct": "liuhaotian/LLaVA-Instruct-150K",
}
FOLDER_FILES = {"instruct": "instruct.json", "pt": "pt.json", "pretrain": "pt.json", "mme": "mme.json",
                "open": "open.json"}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


# -------------------------------------------------------------------------------------------- utilities


def _read_json_list(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _resolve_image(image: Any, folder: Path) -> str:
    image = os.path.expanduser(str(image))
    return os.path.abspath(image if os.path.isabs(image) else os.path.join(folder, image))


def _check_images_exist(records: list[dict], key: str, folder: Path) -> None:
    """FileNotFoundError naming the first record whose image is missing (and how many are)."""
    missing = [r for r in records if r["image"] is not None and not os.path.exists(r["image"])]
    if missing:
        first = missing[0]
        more = f" ({len(missing)} of {len(records)} records' images are missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"record {first[key]!r}: image {first['image']} not found "
                                f"(image_folder={folder}){more}")


def _json_file(source: str | os.PathLike, file: str | None, default: str) -> Path:
    """The JSON file `source` names: the file itself, or `file` (default `default`) inside a folder."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        name = file or default
        name = FOLDER_FILES.get(name, name)
        path = path / name
        if not path.exists() and not name.endswith(".json"):
            path = path.with_name(name + ".json")
    elif file is not None:
        raise ValueError(f"file={file!r} is only for a folder or Hub source; {source} is a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


# ---------------------------------------------------------------------------------------- conversations


def _validate_conversations(record: Any, index: int, has_image: bool) -> tuple[str, list[dict]]:
    rid = str(record.get("id", index)) if isinstance(record, dict) else str(index)
    where = f"record {rid!r} (#{index})"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: no conversations")
    out = []
    for t, turn in enumerate(turns):
        expected = ROLES[t % 2]
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {t} is not a {{'from', 'value'}} object with a text value")
        if turn.get("from") != expected:
            raise ValueError(f"{where}: roles must alternate human/gpt starting with human; turn {t} is "
                             f"from {turn.get('from')!r}, expected {expected!r}")
        out.append({"from": turn["from"], "value": turn["value"]})
    if len(out) % 2:
        raise ValueError(f"{where}: the last human turn has no gpt answer")
    n_tokens = sum(turn["value"].count(IMAGE_TOKEN) for turn in out)
    if has_image and n_tokens != 1:
        raise ValueError(f"{where}: has an image, so its conversation needs exactly one {IMAGE_TOKEN} token "
                         f"(found {n_tokens})")
    if not has_image and n_tokens:
        raise ValueError(f"{where}: has no image but {n_tokens} {IMAGE_TOKEN} token(s)")
    return rid, out


def normalise_conversations(records: list, image_folder: str | os.PathLike, check_images: bool = True,
                            source: str = "") -> list[dict]:
    """Validated `{"id", "image", "conversations", "subtask"}` records from raw LLaVA records, images
    resolved against `image_folder`; see `load_conversations`."""
    folder = Path(os.path.abspath(os.path.expanduser(str(image_folder))))
    out = []
    for index, record in enumerate(records):
        image = record.get("image") if isinstance(record, dict) else None
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{source}record #{index}: 'image' must be a path string, got {image!r}")
        rid, turns = _validate_conversations(record, index, bool(image))
        subtask = record.get("subtask")
        out.append({"id": rid, "image": _resolve_image(image, folder) if image else None,
                    "conversations": turns, "subtask": None if subtask is None else str(subtask)})
    if check_images:
        _check_images_exist(out, "id", folder)
    return out


def _extract_zip(zip_path: str | os.PathLike, target: Path) -> None:
    """Extract `zip_path` into `target`, atomically (a half-extracted folder is never left as `target`);
    an archive whose only top-level entry is a folder named like `target` is unwrapped."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(partial)
    inner = list(partial.iterdir())
    root = inner[0] if len(inner) == 1 and inner[0].is_dir() and inner[0].name == target.name else partial
    root.rename(target)
    shutil.rmtree(partial, ignore_errors=True)


def _from_hub(name: str, image_folder, file: str | None, revision: str | None,
              download_images: bool) -> tuple[Path, Path]:
    """(JSON path, image folder) for a Hub dataset, downloading what is needed."""
    repo_id = HUB_ALIASES.get(name.lower(), name)
    known = HUB_DATASETS.get(repo_id)
    if known is None and file is None:
        raise ValueError(f"{name!r}: not a file or folder, nor a known Hub dataset "
                         f"({', '.join(HUB_DATASETS)}); for another Hub dataset pass file= its JSON file")
    if image_folder is None and known is not None and known.images_note:
        raise ValueError(f"{repo_id}: {known.images_note}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with transformers
        raise ImportError("reading a Hub dataset needs huggingface_hub: pip install 'libmoe[vlm]'") from err
    filename = file or known.file
    json_path = Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))
    if image_folder is not None:
        return json_path, Path(image_folder)
    folder = json_path.parent
    if known is not None and known.images_zip and (file is None or file == known.file):
        folder = json_path.parent / "images"
        if not folder.is_dir():
            if not download_images:
                raise FileNotFoundError(f"{repo_id}: images not found at {folder}; pass image_folder= or "
                                        f"download_images=True to fetch and extract {known.images_zip}")
            zip_path = hf_hub_download(repo_id, known.images_zip, repo_type="dataset", revision=revision)
            _extract_zip(zip_path, folder)
    return json_path, folder


def load_conversations(
    source: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    *,
    file: str | None = None,
    check_images: bool = True,
    revision: str | None = None,
    download_images: bool = True,
) -> list[dict]:
    """LLaVA-format training records as ``{"id": str, "image": absolute path or None (text-only records),
    "conversations": [{"from": "human"|"gpt", "value": str}, ...], "subtask": str or None}``.

    `source` is a JSON file; a folder (its `file`, default ``instruct.json``; ``file="pt"`` reads pt.json);
    or a Hub dataset: ``liuhaotian/LLaVA-Pretrain`` (LLaVA-558K captions; its images.zip is downloaded and
    extracted beside the JSON unless `image_folder` is given), ``liuhaotian/LLaVA-Instruct-150K``
    (LLaVA-665K; its images come from other datasets, so `image_folder` is required), an alias from
    `HUB_ALIASES`, or any other dataset repository with ``file=`` its JSON file. Images are resolved against
    `image_folder` (default: the JSON's folder).

    Raises ValueError for a malformed record (no conversations, roles not alternating human/gpt from a
    human turn to a gpt answer, not exactly one ``<image>`` token in a record with an image, any in one
    without) and, with `check_images`, FileNotFoundError naming the first record whose image is missing.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        json_path = _json_file(path, file, "instruct.json")
        folder = Path(image_folder) if image_folder is not None else json_path.parent
    elif isinstance(source, str) and (_HUB_NAME.match(source) or source.lower() in HUB_ALIASES) \
            and not source.endswith(".json"):
        json_path, folder = _from_hub(source, image_folder, file, revision, download_images)
    else:
        raise FileNotFoundError(f"{source}: no such file or folder (nor a Hub dataset name)")
    return normalise_conversations(_read_json_list(json_path), folder, check_images, source=f"{json_path}: ")


# ------------------------------------------------------------------------------------ held-out questions


def _load_questions(path, image_folder, default: str, required: tuple[str, ...]) -> tuple[list[dict], Path]:
    json_path = _json_file(path, None, default)
    folder = Path(os.path.abspath(image_folder if image_folder is not None else json_path.parent))
    out, ids = [], set()
    for index, record in enumerate(_read_json_list(json_path)):
        if not isinstance(record, dict):
            raise ValueError(f"{json_path}: record #{index} is not a JSON object")
        qid = str(record.get("question_id", index))
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{json_path}: question {qid!r} lacks {', '.join(missing)}")
        if qid in ids:
            raise ValueError(f"{json_path}: question_id {qid!r} appears twice")
        ids.add(qid)
        if not isinstance(record["question"], str) or not isinstance(record["answer"], str) \
                or not record["answer"].strip():
            raise ValueError(f"{json_path}: question {qid!r} needs a text question and a non-empty answer")
        out.append({**record, "question_id": qid, "image": _resolve_image(record["image"], folder),
                    "category": str(record.get("category", ""))})
    _check_images_exist(out, "question_id", folder)
    return out, json_path


def load_mme(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> list[dict]:
    """MME-style yes/no records ``{"question_id", "image" (absolute), "question", "answer": "Yes"|"No",
    "category", "pair"}`` from a JSON file or a folder holding mme.json. Each pair (records sharing
    ``pair``, by default the image) must hold exactly one "Yes" and one "No" record (ValueError otherwise);
    a missing image raises FileNotFoundError."""
    records, json_path = _load_questions(path, image_folder, "mme.json", ("image", "question", "answer"))
    pairs: dict[str, list[str]] = {}
    for r in records:
        if r["answer"] not in ("Yes", "No"):
            raise ValueError(f"{json_path}: question {r['question_id']!r}: answer must be 'Yes' or 'No', "
                             f"got {r['answer']!r}")
        r["pair"] = str(r.get("pair", r["image"]))
        pairs.setdefault(r["pair"], []).append(r["answer"])
    for pair, answers in pairs.items():
        if sorted(answers) != ["No", "Yes"]:
            raise ValueError(f"{json_path}: pair {pair!r} must hold one 'Yes' and one 'No' record, "
                             f"got {answers}")
    return records


def load_open(path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> list[dict]:
    """Open questions ``{"question_id", "image" (absolute), "question", "answer", "category"}`` from a JSON
    file or a folder holding open.json; answers are stripped and lower-cased (one word or number)."""
    records, _ = _load_questions(path, image_folder, "open.json", ("image", "question", "answer"))
    for r in records:
        r["answer"] = r["answer"].strip().lower()
    return records


# ---------------------------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, size: int, mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """The image at `path` as a float32 tensor [3, size, size]: RGB, resized (bicubic) to size x size,
    scaled to [0, 1] and normalised per channel, ``(x - mean) / std`` (SigLIP's 0.5/0.5 by default, giving
    [-1, 1])."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(im, dtype=np.float32) / 255.0
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


@lru_cache(maxsize=65536)
def cached_image(path: str, size: int) -> torch.Tensor:
    """`load_image`, remembered: training reads each image once per epoch, evaluation once per
    answer."""
    return load_image(path, size)


def probe_images(folder, size: int, per_subtask: int) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """Held-out images (the MME split), up to `per_subtask` per category, for routing traces."""
    if not isinstance(folder, Path) or not (folder / "mme.json").is_file():
        return None
    rows, seen, counts = load_mme(folder / "mme.json"), set(), {}
    chosen: list[tuple[str, str]] = []
    for r in rows:
        cat = r["category"]
        if r["image"] in seen or counts.get(cat, 0) >= per_subtask:
            continue
        seen.add(r["image"])
        counts[cat] = counts.get(cat, 0) + 1
        chosen.append((r["image"], cat))
    names = sorted(counts)
    pixels = torch.stack([cached_image(img, size) for img, _ in chosen])
    labels = torch.tensor([names.index(c) for _, c in chosen])
    return pixels, labels, names
