"""Every built-in task against lm-evaluation-harness's own task of the same name.

The installed harness builds its requests from the same records (its YAML included from its
package, the data pointed at a local JSONL file), and its `process_results` scores them under
random log-likelihoods; libmoe's requests and its acc/acc_norm must be the same, document by
document. Records: the first rows of ../shared/data/eval where the file is in the Hub schema,
else small fixtures in the Hub schema written here.
"""

import json
import random
from pathlib import Path

import pytest

from libmoe.eval import get_task, load_records, score_task

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
HARNESS = Path(lm_eval.__file__).parent / "tasks"

HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the "
     "snow covering the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
     "ctx": "", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a "
     "ski lift, while two men supporting the head of the person wearing winter clothes snow as the "
     "we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man "
     "continues removing the snow on his car."], "source_id": "activitynet~v_-1IBHYS3L-Y",
     "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 9, "activity_label": "Baking cookies", "ctx_a": "A female chef in white uniform shows a "
     "stack of baking pans in a large kitchen [title] presenting them.", "ctx_b": "the pans",
     "ctx": "", "endings": ["contain egg yolks and baking soda.", "are then sprinkled with brown "
     "sugar.", "are placed in a strainer on the counter.", "are filled with pastries and loaded into "
     "the oven."], "source_id": "activitynet~v_-2dxp-mv2zo", "split": "val",
     "split_type": "indomain", "label": "3"},
]
RACE = [
    {"article": "Tom lives in a small town. Every morning he walks to school with his dog.",
     "problems": str([
         {"answer": "B", "options": ["by bus", "on foot", "by bike", "by car"],
          "question": "How does Tom go to school?"},
         {"answer": "C", "options": ["cat", "bird", "dog", "fish"],
          "question": "Tom walks to school with his  _  ."},
         {"answer": "A", "options": ["small", "big", "new", "old"],
          "question": "Tom's town is  _  ."}]),
     "example_id": "high1.txt"},
    {"article": "The library opens at nine and closes at five on weekdays.",
     "problems": str([{"answer": "D", "options": ["8", "10", "4", "9"],
                       "question": "When does the library open?"}]),
     "example_id": "high2.txt"},
]
WINOGRANDE = [
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ "
     "despised eating intestine.", "option1": "Ian", "option2": "Dennis", "answer": "2"},
]
BOOLQ = [
    {"question": "is windows movie maker part of windows essentials", "passage": "Windows Movie "
     "Maker is a discontinued video editing software by Microsoft. It was part of Windows Essentials.",
     "idx": 0, "label": 1},
    {"question": "is the sun a planet", "passage": "The Sun is the star at the center of the Solar "
     "System.", "idx": 1, "label": 0},
]
OPENBOOKQA = [
    {"id": "7-980", "question_stem": "The sun is responsible for",
     "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                          "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    {"id": "7-584", "question_stem": "When standing miles away from Mount Rushmore",
     "choices": {"text": ["the mountains seem very close", "the mountains are boring",
                          "the mountains look the same as from up close",
                          "the mountains seem smaller than in photographs"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": " D"},
]


def shared(name, n=12):
    if not (EVAL / name).is_file():
        pytest.skip(f"../shared/data/eval/{name} not present")
    with (EVAL / name).open() as f:
        return [json.loads(next(f)) for _ in range(n)]


# libmoe task -> (harness YAML under lm_eval/tasks, records)
CASES = {
    "piqa": ("piqa/piqa.yaml", lambda: shared("piqa.validation.jsonl")),
    "hellaswag": ("hellaswag/hellaswag.yaml", lambda: HELLASWAG),
    "arc_easy": ("arc/arc_easy.yaml", lambda: shared("arc_easy.test.jsonl")),
    "arc_challenge": ("arc/arc_challenge.yaml", lambda: shared("arc_easy.test.jsonl")),
    "lambada_openai": ("lambada/lambada_openai.yaml", lambda: shared("lambada_openai.test.jsonl")),
    "social_i_qa": ("siqa/siqa.yaml", lambda: shared("social_i_qa.validation.jsonl")),
    "commonsense_qa": ("commonsense_qa/default.yaml", lambda: shared("commonsense_qa.validation.jsonl")),
    "blimp_adjunct_island": ("blimp/adjunct_island.yaml", lambda: shared("blimp/adjunct_island.jsonl")),
    "blimp_wh_vs_that_with_gap": ("blimp/wh_vs_that_with_gap.yaml",
                                  lambda: shared("blimp/wh_vs_that_with_gap.jsonl")),
    "race": ("race/race.yaml", lambda: RACE),
    "winogrande": ("winogrande/default.yaml", lambda: WINOGRANDE),
    "boolq": ("super_glue/boolq/default.yaml", lambda: BOOLQ),
    "openbookqa": ("openbookqa/openbookqa.yaml", lambda: OPENBOOKQA),
}


def harness_task(tmp_path, name, records):
    """The harness's own task `name`, reading `records` from a local JSONL file."""
    yaml_path, _ = CASES[name]
    split = get_task(name).split
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    other = "validation_split" if split == "test" else "test_split"
    (tmp_path / f"check_{name}.yaml").write_text(
        f"include: {HARNESS / yaml_path}\ntask: check_{name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {data}\ntraining_split: null\n"
        f"fewshot_split: null\n{other}: null\n")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = manager.load([f"check_{name}"])["tasks"][f"check_{name}"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return task


class TableScorer:
    def __init__(self, lls):
        self.lls = lls

    def loglikelihood(self, requests, desc=None):
        return [self.lls[r] for r in requests]


@pytest.mark.parametrize("name", sorted(CASES))
def test_requests_and_metrics_match_the_harness(tmp_path, name):
    records = CASES[name][1]()
    task = harness_task(tmp_path, name, records)
    ours = get_task(name)
    docs = [ours.to_doc(r) for r in records]
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    assert sorted(by_doc) == list(range(len(records)))
    rng = random.Random(0)
    for i, doc in enumerate(docs):
        instances = sorted(by_doc[i], key=lambda x: x.idx)
        assert [inst.args for inst in instances] == ours.requests(doc)
        if task.OUTPUT_TYPE != "multiple_choice":
            continue
        for _ in range(5):  # random log-likelihoods: the same choice must win under both
            lls = [(rng.uniform(-30, -1), False) for _ in instances]
            theirs = task.process_results(task.eval_docs[i], lls)
            mine = score_task(TableScorer(dict(zip(ours.requests(doc), lls))), ours, [doc])
            assert mine["acc"] == theirs["acc"]
            if "acc_norm" in theirs:
                assert mine["acc_norm"] == theirs["acc_norm"]


def test_records_load_through_datasets_in_the_hub_layout(tmp_path):
    """Without --data-dir the Hub path runs `datasets.load_dataset(name, config, split)`; a local
    dataset directory in the Hub's layout stands in for the Hub here."""
    pytest.importorskip("datasets")
    hub = tmp_path / "hub-openbookqa"
    hub.mkdir()
    (hub / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OPENBOOKQA))
    task = get_task("openbookqa")
    local = type(task)(**{**task.__dict__, "hub": (str(hub), None)})
    records = load_records(local, data_dir=None, limit=1)
    assert len(records) == 1 and records[0]["question_stem"] == OPENBOOKQA[0]["question_stem"]
    assert local.to_doc(records[0]).gold == 3
