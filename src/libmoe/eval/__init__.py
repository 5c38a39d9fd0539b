"""Evaluation (in progress): log-likelihood scoring with lm-evaluation-harness request
semantics, the first zero-shot tasks (piqa, hellaswag, arc_easy, arc_challenge, lambada_openai,
social_i_qa, commonsense_qa, blimp) and their metrics. The remaining tasks, user-defined YAML
tasks, the `libmoe eval` CLI, the comparison table and the harness adapter are still to come
(see the evaluation issue)."""

from .evaluator import evaluate_tasks, score_task
from .scoring import LMScorer
from .tasks import TASKS, Doc, Task, get_task, load_records, register_task

__all__ = [
    "TASKS",
    "Doc",
    "LMScorer",
    "Task",
    "evaluate_tasks",
    "get_task",
    "load_records",
    "register_task",
    "score_task",
]
