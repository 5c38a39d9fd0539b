"""What the findings checks read from a bench output directory, and nothing else:

- ``results.json``: the regime, the runs (algorithm, seed, status, where each run is), the rows'
  scores (validation perplexity), the studies that ran, the regime comparison and the environment
  record (what decides the numbers across machines; absent from outputs of older versions);
- per run: ``eval/val_windows.json`` (each validation window's loss), ``analysis/metrics.json``
  (routing metrics and the DropTop / temperature results), ``analysis/intervention_units.json``
  (each validation window's or question's metric under each intervention) and its routing traces
  (``checkpoints/step_N``, ``traces/step_N``: the probe set's top-k choices at every checkpoint);
- ``studies/init_std/init_std.json`` (the router init-std study's balance-loss curves).

A run directory is looked up beside results.json (``OUT/runs/NAME``) first and at its recorded
path second, so a moved or merged output is judged on what it holds.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..analysis import INIT_STD_FILE
from ..files import CorruptFileError, read_json, read_json_object
from ..moe.trace import Trace, list_traces

# Where a bench output keeps the router init-std study (its `studies/init_std/init_std.json`; the
# bench writes it, the findings read it).
INIT_STD_DIR = Path("studies") / "init_std"

# What every bench output's results.json holds (pretraining, upcycling and VLM regimes alike):
# the checks read the runs; rewriting the tables and report needs the rest too.
BENCH_KEYS = {"runs": list, "preset": str, "algorithms": list, "seeds": int, "rows": list}


def read_bench_results(path: str | Path, full: bool = False) -> dict[str, Any]:
    """A bench output's results.json; one clear error (CorruptFileError / ValueError naming the
    file) when it is damaged or is not what `libmoe bench` writes (its "runs", and with `full`
    everything its tables and report are made from)."""
    fix = "give the directory of a finished `libmoe bench` (or run it again with --out DIR)"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{Path(path).parent} has no results.json; give a `libmoe bench` output "
                                "directory.")
    data = read_json_object(path, fix)
    needed = BENCH_KEYS if full else {"runs": list}
    wrong = [k for k, kind in needed.items() if not isinstance(data.get(k), kind)]
    if wrong:
        raise ValueError(f"{str(path)!r} is not a `libmoe bench` results file (it lacks "
                         f"{', '.join(repr(k) for k in wrong)}); {fix}.")
    rows = data["rows"] if isinstance(data.get("rows"), list) else []
    if not all(isinstance(r, dict) for r in data["runs"] + rows):
        raise CorruptFileError(path, "its runs or rows are not objects", fix)
    problem = _field_problem(data)
    if problem:
        raise CorruptFileError(path, problem, fix)
    return data


def _field_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the fields the checks read (their types), or None."""
    def kind(value: Any, *types: type) -> bool:
        return value is None or (isinstance(value, types) and not isinstance(value, bool))

    for key, types in (("algorithms", (list,)), ("studies", (dict,)), ("regime", (str,)),
                       ("environment", (dict,)), ("environment_comparison", (dict,))):
        if not kind(data.get(key), *types):
            return f"{key!r} is a {type(data[key]).__name__}"
    if not all(isinstance(a, str) for a in data.get("algorithms") or []):
        return "'algorithms' holds something other than names"
    if not kind((data.get("studies") or {}).get("run"), list):
        return "'studies.run' is not a list"
    for i, run in enumerate(data["runs"]):
        for key, types in (("name", (str,)), ("algorithm", (str,)), ("run", (str,)), ("seed", (int,)),
                           ("status", (str,))):
            if not kind(run.get(key), *types):
                return f"runs[{i}].{key} is a {type(run[key]).__name__}"
        if len(str(run.get("run") or "")) > 4096 or len(str(run.get("name") or "")) > 255:
            return f"runs[{i}] names a path longer than a file system allows"
    return None


def _read(path: Path) -> Any:
    """A run's JSON file (None when absent); a damaged one names itself (the check that reads it
    then reports it as inconclusive, the other claims still run)."""
    if not path.is_file():
        return None
    return read_json(path, "rerun `libmoe analyze` / `libmoe eval` on the run, or `libmoe bench` "
                     "with the same --out, to write it again")


class Run:
    """One finished run of a bench output (a row's run)."""

    def __init__(self, bench: Bench, entry: dict[str, Any]):
        self.bench, self.entry = bench, entry
        self.name, self.algorithm = str(entry.get("name")), str(entry.get("algorithm"))
        self.seed = int(entry.get("seed") or 0)
        here = bench.dir / "runs" / self.name
        self.dir = here if here.is_dir() else Path(str(entry.get("run")))

    def __repr__(self) -> str:
        return f"Run({self.name})"

    @property
    def ppl(self) -> float | None:
        value = self.entry.get("ppl")
        if value is None:  # a VLM row has no perplexity
            return None
        return float(value)

    @cached_property
    def val_windows(self) -> Tensor | None:
        """Each validation window's mean loss (the table's perplexity is exp of their mean)."""
        data = _read(self.dir / "eval" / "val_windows.json")
        return None if not data else torch.tensor(data["window_nll"], dtype=torch.float64)

    @cached_property
    def analysis(self) -> dict[str, Any] | None:
        return _read(self.dir / "analysis" / "metrics.json")

    @cached_property
    def units(self) -> dict[str, Any] | None:
        """RUN/analysis/intervention_units.json: {"unit", "runs": {measurement: {metric: [...]}}}."""
        return _read(self.dir / "analysis" / "intervention_units.json")

    @cached_property
    def traces(self) -> list[Trace]:
        """The run's routing traces of its probe set, in step order."""
        return [Trace.load(path) for _, path in list_traces(self.dir)]


class Bench:
    """A bench output directory, as the checks see it."""

    def __init__(self, directory: str | Path, results: dict[str, Any] | None = None):
        """`results`: results.json's content when the caller holds it (a bench finishing), else
        read from the directory."""
        self.dir = Path(directory)
        path = self.dir / "results.json"
        if results is None and not path.is_file():
            raise FileNotFoundError(f"{self.dir} has no results.json; give a `libmoe bench` output "
                                    "directory.")
        self.results: dict[str, Any] = results if results is not None else read_bench_results(path)
        self.regime: str = self.results.get("regime", "pretrain")
        self.runs = [Run(self, r) for r in self.results.get("runs") or [] if r.get("status") == "ok"]

    @property
    def environment(self) -> dict[str, Any] | None:
        """results.json's environment record (`libmoe.environment`: the data's hashes, software,
        machine, threads), None for an output written before libmoe recorded one."""
        value = self.results.get("environment")
        return value if isinstance(value, dict) else None

    def by_algorithm(self) -> dict[str, list[Run]]:
        """{algorithm: its finished runs, by seed}, in the bench's algorithm order."""
        out: dict[str, list[Run]] = {}
        for run in sorted(self.runs, key=lambda r: r.seed):
            out.setdefault(run.algorithm, []).append(run)
        order = list(self.results.get("algorithms") or [])
        return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))

    def moe(self) -> dict[str, list[Run]]:
        return {a: runs for a, runs in self.by_algorithm().items() if a != "dense"}

    @property
    def studies(self) -> list[str]:
        """The extra studies the bench ran (an output from before studies existed: its
        interventions, if any run has them)."""
        studies = self.results.get("studies")
        if studies is not None:
            return list(studies.get("run") or [])
        has = any((r.analysis or {}).get("droptop") for r in self.runs)
        return ["droptop", "temperature"] if has else []

    @cached_property
    def init_std(self) -> dict[str, Any] | None:
        return load_init_std(self.dir)

    def figure(self, name: str | None) -> str | None:
        """The figure's path relative to the bench directory, when the output holds it."""
        if not name:
            return None
        path = self.dir / "analysis" / "figures" / name
        return str(path.relative_to(self.dir)) if path.is_file() else None


def load_init_std(out: str | Path) -> dict[str, Any] | None:
    """OUT/studies/init_std/init_std.json of a bench output, None when the study did not run."""
    path = Path(out) / INIT_STD_DIR / INIT_STD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def sequence_ids(trace: Trace) -> Tensor:
    """[N] the probe sequence (or image) each token of the trace belongs to, 0..S-1: a new one
    starts where the position restarts at 0 (every token its own unit when positions are absent)."""
    pos = trace.position.reshape(-1)
    if pos.numel() == 0 or not bool((pos == 0).any()):
        return torch.arange(trace.n_tokens)
    starts = (pos == 0).long()
    starts[0] = 1
    return torch.cumsum(starts, 0) - 1


def unit_sums(values: Tensor, ids: Tensor, n_units: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum of `values` per unit [S], count per unit [S]) over the tokens where `mask` holds."""
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    sums = torch.zeros(n_units, dtype=torch.float64).index_add_(0, ids[keep], values[keep].double())
    cnt = torch.zeros(n_units, dtype=torch.float64).index_add_(0, ids[keep], torch.ones(int(keep.sum()),
                                                                                     dtype=torch.float64))
    return sums, cnt


def same_units(traces: list[Trace]) -> bool:
    """Whether the traces cover the same tokens (so their statistics resample pairwise)."""
    first = traces[0]
    return all(t.n_tokens == first.n_tokens and torch.equal(t.tokens, first.tokens) for t in traces[1:])


def finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)
