"""lmms-eval task code of libmoe's synthetic MME tasks (libmoe_synth_mme, libmoe_synth_mme_ll).

The dataset folder is `libmoe.vlm.lmms.synth_dir()`: ``LIBMOE_SYNTH_DIR``, else the synthetic dataset
of the libmoe_vlm run being evaluated, else the default synthetic dataset in the cache. Its mme.json
is read with the `json` builder of `datasets` (no Hub); images are opened from the folder.

Metrics are MME's, computed by `libmoe.vlm.evaluate.score_mme` (the same code as ``libmoe vlm eval``):
``acc`` per question, ``acc_plus`` per image (both questions right), ``score`` = sum over categories of
100 * (acc + acc+), and ``<category>_acc`` / ``<category>_acc_plus`` for each category evaluated.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from lmms_eval.api.task import ConfigurableTask

from libmoe.vlm.evaluate import score_mme
from libmoe.vlm.lmms import synth_dir
from libmoe.vlm.synth import SUBTASKS

CHOICES = ("Yes", "No")


class SynthImage:
    """doc_to_visual: the document's image (a path relative to the dataset folder) as RGB PIL."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __call__(self, doc):
        from PIL import Image

        with Image.open(self.folder / doc["image"]) as im:
            return [im.convert("RGB")]


class SynthMMETask(ConfigurableTask):
    """A YAML task whose dataset is mme.json of `synth_dir()` (resolved when the task is built)."""

    def __init__(self, config=None, **kwargs):
        config = {k: v for k, v in dict(config or {}).items() if k != "class"}
        folder = synth_dir()
        config["dataset_path"] = "json"
        split = config.get("test_split") or "test"
        config["dataset_kwargs"] = {"data_files": {split: str(folder / "mme.json")}}
        config["doc_to_visual"] = SynthImage(folder)
        super().__init__(config=config, **kwargs)


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def parse_yes_no(text: str) -> str:
    """"Yes", "No" or "other" (MME's rule: the answer, or yes/no among its first four letters)."""
    t = str(text).lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t.capitalize()
    if len(t) == 1:
        return {"y": "Yes", "n": "No"}.get(t, "other")
    head = t[:4]
    return "Yes" if "yes" in head else "No" if "no" in head else "other"


def _payload(doc, pred: str) -> dict:
    record = {"question_id": doc["question_id"], "category": doc["category"], "image": doc["image"],
              "pair": str(doc.get("pair") or doc["image"]), "answer": doc["answer"], "pred": pred}
    out = {"acc": record, "acc_plus": record, "score": record}
    out[f"{doc['category']}_acc"] = record
    out[f"{doc['category']}_acc_plus"] = record
    return out


def process_results(doc, results):
    """generate_until: the generated text parsed to Yes / No / other."""
    return _payload(doc, parse_yes_no(results[0]))


def _loglikelihood(value) -> float:
    if isinstance(value, str):  # lmms-eval 0.7.3 stringifies (ll, is_greedy) unless patched
        value = ast.literal_eval(value)
    if isinstance(value, list | tuple):
        value = value[0]
    return float(value)


def process_results_ll(doc, results):
    """multiple_choice over ("Yes", "No"): the choice of the higher log-likelihood (ties: Yes), as
    ``libmoe vlm eval``. lmms-eval's built-in scoring would take the argmin."""
    lls = [_loglikelihood(r) for r in results[: len(CHOICES)]]
    return _payload(doc, CHOICES[int(np.argmax(lls))])


def _score(results: list[dict]) -> dict:
    return score_mme(results, [r["pred"] for r in results])


def aggregate_acc(results):
    return _score(results)["acc"]


def aggregate_acc_plus(results):
    return _score(results)["acc_plus"]


def aggregate_score(results):
    return _score(results)["score"]


def _category_aggregation(category: str, key: str):
    def aggregate(results):
        return _score([r for r in results if r["category"] == category])["by_category"][category][key]

    aggregate.__name__ = f"aggregate_{category}_{key}"
    return aggregate


for _cat in SUBTASKS:  # aggregate_<category>_acc, aggregate_<category>_acc_plus (named in the YAML)
    for _key in ("acc", "acc_plus"):
        globals()[f"aggregate_{_cat}_{_key}"] = _category_aggregation(_cat, _key)
