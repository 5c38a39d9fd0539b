"""Evaluation: perplexity and zero-shot tasks, comparable with lm-evaluation-harness.

Log-likelihood scoring with the harness's request semantics (`LMScorer`), a registry of the
paper's tasks and more in the harness's formats (`TASKS`, `get_task`), user-defined YAML tasks
(`load_task_file`), metrics (`evaluate_tasks`, `evaluate_model`), validation perplexity (the one
computation training and evaluation share: `validation_loss`, `validation_perplexity`), the
paper's comparison table (`libmoe.eval.table`) and the harness model ``libmoe``
(`libmoe.eval.harness`). See docs/evaluation.md.
"""

from .evaluator import check_evaluation, evaluate_model, evaluate_tasks, score_task
from .perplexity import run_data_available, validation_loss, validation_perplexity
from .results import read_existing, results_path, write_results
from .scoring import LMScorer
from .table import LABELS, comparison_csv, comparison_markdown, comparison_rows, read_results, results_table
from .tasks import TASKS, Doc, Task, get_task, load_records, local_file, register_task
from .yaml_tasks import load_task_file

__all__ = [
    "LABELS",
    "TASKS",
    "Doc",
    "LMScorer",
    "Task",
    "check_evaluation",
    "comparison_csv",
    "comparison_markdown",
    "comparison_rows",
    "evaluate_model",
    "evaluate_tasks",
    "get_task",
    "load_records",
    "load_task_file",
    "local_file",
    "read_existing",
    "read_results",
    "register_task",
    "results_path",
    "results_table",
    "run_data_available",
    "score_task",
    "validation_loss",
    "validation_perplexity",
    "write_results",
]
