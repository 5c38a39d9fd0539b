"""Zero-shot tasks in lm-evaluation-harness's formats, registered by name.

A task turns each record of its dataset (Hub schema) into a `Doc`: a context, the candidate
continuations and the gold index (multiple choice), or a context and one target (LAMBADA-style
greedy word prediction). Prompts, target delimiter (" ") and preprocessing follow the harness's
task of the same name. Records come from local JSON Lines, ``DIR/<task>.<split>.jsonl`` (the layout of
``../shared/data/eval``), or from the Hub through `datasets` when no directory is given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    context: str
    choices: list[str]  # continuations without the leading delimiter
    gold: int = 0


@dataclass
class Task:
    name: str
    hub: tuple[str, str | None]  # (dataset, config)
    split: str
    kind: str  # "multiple_choice" or "greedy_word"
    to_doc: Callable[[dict[str, Any]], Doc]
    delimiter: str = " "
    group: list[str] | None = None  # a group task: the mean of these tasks' metrics
    local_path: str | None = None  # under --data-dir; default "<name>.<split>.jsonl"


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: dict[str, Any]) -> Doc:
    # The harness builds ctx_a + " " + ctx_b.capitalize(); local files may carry only `ctx`.
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize() if "ctx_a" in r else r["ctx"]
    return Doc(_hellaswag_preprocess(r["activity_label"] + ": " + ctx),
               [_hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]))


def _arc(r: dict[str, Any]) -> Doc:
    return Doc(f"Question: {r['question']}\nAnswer:", list(r["choices"]["text"]),
               list(r["choices"]["label"]).index(r["answerKey"]))


def _lambada(r: dict[str, Any]) -> Doc:
    context, word = r["text"].rsplit(" ", 1)
    return Doc(context, [word], 0)


register_task(Task("piqa", ("baber/piqa", None), "validation", "multiple_choice",
                   lambda r: Doc(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]],
                                 int(r["label"]))))
register_task(Task("hellaswag", ("Rowan/hellaswag", None), "validation", "multiple_choice", _hellaswag))
register_task(Task("arc_easy", ("allenai/ai2_arc", "ARC-Easy"), "test", "multiple_choice", _arc))
register_task(Task("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge"), "test", "multiple_choice",
                   _arc))
register_task(Task("lambada_openai", ("EleutherAI/lambada_openai", "default"), "test",
                   "greedy_word", _lambada))


def _commonsense_qa(r: dict[str, Any]) -> Doc:
    texts = r["choices"]["text"]
    lettered = "".join(f"\n{label}. {text}" for label, text in zip("ABCDE", texts))
    return Doc(f"Question: {r['question'].strip()}{lettered}\nAnswer:", list("ABCDE"[: len(texts)]),
               "ABCDE".index(r["answerKey"].strip()))


register_task(Task("social_i_qa", ("lighteval/siqa", None), "validation", "multiple_choice",
                   lambda r: Doc(f"Q: {r['context']} {r['question']}\nA:",
                                 [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1)))
register_task(Task("commonsense_qa", ("tau/commonsense_qa", None), "validation", "multiple_choice",
                   _commonsense_qa))

# BLiMP: each paradigm is a task (good vs bad sentence, empty context, no delimiter), and "blimp"
# is their mean. Local files: DIR/blimp/<paradigm>.jsonl.
BLIMP_PARADIGMS = """
    adjunct_island anaphor_gender_agreement anaphor_number_agreement animate_subject_passive
    animate_subject_trans causative complex_NP_island
    coordinate_structure_constraint_complex_left_branch
    coordinate_structure_constraint_object_extraction determiner_noun_agreement_1
    determiner_noun_agreement_2 determiner_noun_agreement_irregular_1
    determiner_noun_agreement_irregular_2 determiner_noun_agreement_with_adj_2
    determiner_noun_agreement_with_adj_irregular_1
    determiner_noun_agreement_with_adj_irregular_2 determiner_noun_agreement_with_adjective_1
    distractor_agreement_relational_noun distractor_agreement_relative_clause drop_argument
    ellipsis_n_bar_1 ellipsis_n_bar_2 existential_there_object_raising
    existential_there_quantifiers_1 existential_there_quantifiers_2
    existential_there_subject_raising expletive_it_object_raising inchoative intransitive
    irregular_past_participle_adjectives irregular_past_participle_verbs
    irregular_plural_subject_verb_agreement_1 irregular_plural_subject_verb_agreement_2
    left_branch_island_echo_question left_branch_island_simple_question
    matrix_question_npi_licensor_present npi_present_1 npi_present_2 only_npi_licensor_present
    only_npi_scope passive_1 passive_2 principle_A_c_command principle_A_case_1
    principle_A_case_2 principle_A_domain_1 principle_A_domain_2 principle_A_domain_3
    principle_A_reconstruction regular_plural_subject_verb_agreement_1
    regular_plural_subject_verb_agreement_2 sentential_negation_npi_licensor_present
    sentential_negation_npi_scope sentential_subject_island superlative_quantifiers_1
    superlative_quantifiers_2 tough_vs_raising_1 tough_vs_raising_2 transitive wh_island
    wh_questions_object_gap wh_questions_subject_gap wh_questions_subject_gap_long_distance
    wh_vs_that_no_gap wh_vs_that_no_gap_long_distance wh_vs_that_with_gap
    wh_vs_that_with_gap_long_distance
""".split()
for _paradigm in BLIMP_PARADIGMS:
    register_task(Task(f"blimp_{_paradigm}", ("nyu-mll/blimp", _paradigm), "train", "multiple_choice",
                       lambda r: Doc("", [r["sentence_good"], r["sentence_bad"]], 0), delimiter="",
                       local_path=f"blimp/{_paradigm}.jsonl"))
register_task(Task("blimp", ("nyu-mll/blimp", None), "train", "group", lambda r: Doc("", []),
                   group=[f"blimp_{p}" for p in BLIMP_PARADIGMS]))


def get_task(name: str) -> Task:
    if name not in TASKS:
        from ..moe.options import did_you_mean

        known = sorted(t for t in TASKS if not t.startswith("blimp_"))
        raise ValueError(f"unknown task {name!r}.{did_you_mean(name, TASKS)} Known tasks: "
                         f"{', '.join(known)}, blimp_<paradigm> ({len(BLIMP_PARADIGMS)} of them), "
                         "and val_ppl for `libmoe eval`.")
    return TASKS[name]


def load_records(task: Task, data_dir: str | Path | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of the task's split, from DIR/<task>.<split>.jsonl or the Hub."""
    if data_dir is not None:
        path = Path(data_dir) / (task.local_path or f"{task.name}.{task.split}.jsonl")
        if not path.is_file():
            raise FileNotFoundError(
                f"task {task.name!r} needs {path} (JSON Lines in the schema of the Hub dataset "
                f"{task.hub[0]}{f' (config {task.hub[1]})' if task.hub[1] else ''}, split "
                f"{task.split})."
            )
        records = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    records.append(json.loads(line))
                    if limit is not None and len(records) >= limit:
                        break
        return records
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"task {task.name!r} without --data-dir reads the Hub through `datasets`: "
                         "pip install 'libmoe[hub]', or give --data-dir.") from err
    try:
        ds = datasets.load_dataset(task.hub[0], task.hub[1], split=task.split)
    except OSError as err:
        raise FileNotFoundError(f"task {task.name!r}: the Hub dataset {task.hub[0]!r} could not be "
                                f"read ({type(err).__name__}); give --data-dir with local files.") from err
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds[i] for i in range(n)]
