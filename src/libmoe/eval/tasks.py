"""Zero-shot tasks in lm-evaluation-harness's formats, registered by name.

A task turns each record of its dataset (Hub schema) into a `Doc`: a context and the candidate
continuations with the gold index (multiple choice), several candidate contexts sharing one
continuation (the harness's "multiple input" tasks: WinoGrande), or a context and one target
(LAMBADA-style greedy word prediction). Prompts, target delimiter (" ") and preprocessing follow
the harness's task of the same name (tested against lm-eval's own request construction). Records
come from local JSON Lines, ``DIR/<task>.<split>.jsonl`` (the layout of ``../shared/data/eval``),
or from the Hub through `datasets` when no directory is given. The split is the one the harness
evaluates (its test split where it has one, else validation).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from ..files import CorruptFileError
from ..overrides import did_you_mean
from .registry import TASKS, Doc, Task, register_task
from .yaml_tasks import load_task_file

__all__ = ["BLIMP_PARADIGMS", "TASKS", "Doc", "Task", "check_limit", "get_task", "load_records", "local_file",
           "register_task"]


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

# BLiMP: each paradigm is a task (good vs bad sentence after an empty context), and "blimp"
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
                       lambda r: Doc("", [r["sentence_good"], r["sentence_bad"]], 0),
                       local_path=f"blimp/{_paradigm}.jsonl"))
register_task(Task("blimp", ("nyu-mll/blimp", None), "train", "group", None,
                   group=[f"blimp_{p}" for p in BLIMP_PARADIGMS]))


# Children's Book Test (not in the harness): the story's 20 sentences as context, and the query
# sentence with each of the 10 candidates in the blank (XXXXX) as the continuations, so the
# choice is the candidate that makes the query most likely (the paper's ALGORITHMS.md 4, as in
# GPT-2's evaluation). "cbt" is the mean of the named-entity and common-noun sets, as the paper
# reports it.
def _cbt(r: dict[str, Any]) -> Doc:
    return Doc(" ".join(s.strip() for s in r["sentences"]),
               [r["question"].replace("XXXXX", option) for option in r["options"]],
               list(r["options"]).index(r["answer"]))


for _cbt_set in ("CN", "NE"):
    register_task(Task(f"cbt_{_cbt_set.lower()}", ("cam-cst/cbt", _cbt_set), "test", "multiple_choice",
                       _cbt))
register_task(Task("cbt", ("cam-cst/cbt", None), "test", "group", None, group=["cbt_cn", "cbt_ne"]))


def _race(r: dict[str, Any]) -> Doc:
    # The harness's preprocess_race: the article, every earlier question of the passage with its
    # answer (cloze questions filled in), then the last question; its four options are the choices.
    problems = r["problems"] if isinstance(r["problems"], list) else ast.literal_eval(r["problems"])
    text = "Article: " + r["article"] + "\n\n"
    for problem in problems[:-1]:
        answer = problem["options"]["ABCD".index(problem["answer"])]
        if problem["question"][-6:] == "  _  .":
            text += problem["question"][:-5] + answer + "\n"
        else:
            text += "Question: " + problem["question"] + "\n" + "Answer: " + answer + "\n"
    last = problems[-1]
    return Doc(text + last["question"], [last["options"][i] for i in range(4)],
               "ABCD".index(last["answer"]))


def _winogrande(r: dict[str, Any]) -> Doc:
    # Partial scoring: the sentence up to the blank with each option is a context, the rest of the
    # sentence the shared continuation.
    blank = r["sentence"].index("_")
    return Doc("", [r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]],
               {"1": 0, "2": 1}[str(r["answer"])], continuation=r["sentence"][blank + 1 :].strip())


def _openbookqa(r: dict[str, Any]) -> Doc:
    return Doc(r["question_stem"], list(r["choices"]["text"]),
               list(r["choices"]["label"]).index(r["answerKey"].lstrip()))


register_task(Task("race", ("EleutherAI/race", "high"), "test", "multiple_choice", _race))
register_task(Task("winogrande", ("allenai/winogrande", "winogrande_xl"), "validation",
                   "multiple_choice", _winogrande))
register_task(Task("boolq", ("aps/super_glue", "boolq"), "validation", "multiple_choice",
                   lambda r: Doc(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"],
                                 int(r["label"]))))
register_task(Task("openbookqa", ("allenai/openbookqa", "main"), "test", "multiple_choice", _openbookqa))


def get_task(name: str) -> Task:
    """A registered task by name, or a user-defined task from a YAML file's path."""
    if name.endswith((".yaml", ".yml")) and name not in TASKS:
        return load_task_file(name)
    if name not in TASKS:
        known = sorted(t for t in TASKS if not t.startswith("blimp_"))
        raise ValueError(f"unknown task {name!r}.{did_you_mean(name, TASKS)} Known tasks: "
                         f"{', '.join(known)}, blimp_<paradigm> ({len(BLIMP_PARADIGMS)} of them), "
                         "val_ppl for `libmoe eval`, or the path of a task YAML file.")
    return TASKS[name]


def local_file(task: Task, data_dir: str | Path | None) -> Path | None:
    """The JSONL file a task reads (its YAML's file, or DIR/<task>.<split>.jsonl), checked to
    exist; None when it reads the Hub."""
    if task.data_file is None and data_dir is None:
        return None
    path = task.data_file or Path(data_dir) / (task.local_path or f"{task.name}.{task.split}.jsonl")
    if task.data_file is not None and not path.is_file():
        raise FileNotFoundError(f"task {task.name!r}: its data file {path} (named in its YAML "
                                "file) does not exist.")
    if not path.is_file():
        raise FileNotFoundError(
            f"task {task.name!r} needs {path} (JSON Lines in the schema of the Hub dataset "
            f"{task.hub[0]}{f' (config {task.hub[1]})' if task.hub[1] else ''}, split "
            f"{task.split})."
        )
    return path


def check_limit(limit: int | None, flag: str = "--limit") -> int | None:
    """`limit` (documents per task) when it is None (all) or a positive count, else ValueError."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{flag} {limit}: give a positive number of documents per task, or leave it "
                         "out to evaluate every document.")
    return limit


def load_records(task: Task, data_dir: str | Path | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` records of the task's split, from DIR/<task>.<split>.jsonl or the Hub."""
    check_limit(limit)
    path = local_file(task, data_dir)
    if path is not None:
        records = []
        number = 0  # the last line read, for the error
        with path.open(encoding="utf-8") as f:
            try:
                for number, line in enumerate(f, 1):  # noqa: B007  read in the except
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError(f"a JSON {type(record).__name__}, not an object")
                        records.append(record)
                        if limit is not None and len(records) >= limit:
                            break
            except UnicodeDecodeError:
                raise CorruptFileError(path, f"line {number + 1} or near it is not UTF-8 text",
                                       "replace it with the task's JSON Lines file") from None
            except ValueError as err:
                raise CorruptFileError(path, f"line {number} is not a JSON record: {err}",
                                       "replace it with the task's JSON Lines file (one JSON object a "
                                       "line)") from None
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
