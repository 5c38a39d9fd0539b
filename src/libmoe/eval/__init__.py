"""Evaluation: perplexity and zero-shot tasks, comparable with lm-evaluation-harness.

Log-likelihood scoring with the harness's request semantics (`LMScorer`), a registry of the
paper's tasks and more in the harness's formats (`TASKS`, `get_task`), user-defined YAML tasks
(`load_task_file`), metrics (`evaluate_tasks`, `evaluate_model`), the paper's comparison table
(`libmoe.eval.table`) and the harness model ``libmoe`` (`libmoe.eval.harness`). See
docs/evaluation.md.
"""

from .evaluator import evaluate_model, evaluate_tasks, score_task, validation_perplexity
from .scoring import LMScorer
from .tasks import TASKS, Doc, Task, get_task, load_records, register_task
from .yaml_tasks import load_task_file

__all__ = [
    "TASKS",
    "Doc",
    "LMScorer",
    "Task",
    "evaluate_model",
    "evaluate_tasks",
    "get_task",
    "load_records",
    "load_task_file",
    "register_task",
    "score_task",
    "validation_perplexity",
]
