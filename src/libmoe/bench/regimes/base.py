"""The regime interface of `libmoe bench` and what a regime plans from (`PlanContext`).

A regime says how the runs of a study start and what its tables show; the runner, launchers,
resuming and skipping, findings, studies and output files are shared (`libmoe.bench.runner`,
`libmoe.bench.study`). Its methods, by when they run:

- before any work: `check_request` (the arguments this regime cannot honour), `plan` (the study
  as stages of RunSpecs: each stage runs after the one before, the last holds the table's rows),
  `check_spec` (what is knowable about one run without data), `stale_runs` (runs in --out made
  with another config) and `prepare_data` (data every run reads, built once);
- in the process that trains a run: `stamp` (what a finished run's saved row must match to be
  skipped), `prepare` (e.g. upcycle the source model), `train` and `evaluate` (fill the row);
- after the runs: `results` (the regime's own keys of results.json, the cross-run analysis and
  figures; the study adds the keys every regime has, `Study.shared_results`, and lays them out in
  `results_layout`), `write_outputs` (tables and report through the shared writers
  `libmoe.bench.write_tables` and `libmoe.bench.write_report`), `rewrite_outputs` (the same for an
  existing output, e.g. with new findings) and `score_table`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...models import RunConfig, resolve_config
from ...overrides import did_you_mean
from ..presets import BenchPreset
from ..spec import RunSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from ...analysis import FigureInfo
    from ..study import Study


@dataclass
class PlanContext:
    """What every regime plans from: the preset, the study's shape, and what every run of the
    study shares (`run_fields`: the evaluation, launcher and regime fields of its RunSpecs, which
    `spec` fills in)."""

    out: Path
    preset: BenchPreset
    algorithms: list[str]
    seeds: int
    common: list[str]  # overrides of every run: the preset's, --data, the user's key=value
    run_fields: dict[str, Any] = field(default_factory=dict)  # RunSpec fields of every run: tasks,
    # limits, data_dir, val_tokens, launcher, nproc, threads, analysis, interventions, regime
    source_overrides: list[str] = field(default_factory=list)  # the user's `source.KEY=VALUE`, for
    # the runs the rows start from (the upcycle regime's dense source)
    jobs: int = 1  # runs at a time (a regime may split the threads between them)
    user: list[str] = field(default_factory=list)  # the user's own key=value overrides (in `common` too)

    @property
    def analysis(self) -> bool:
        """Whether each run's routing is analysed where it ran."""
        return self.run_fields.get("analysis", True)

    @property
    def interventions(self) -> bool | list[str]:
        """The intervention studies of each run's analysis (True, False or their names)."""
        return self.run_fields.get("interventions", True)

    def resolve(self, *extra: str) -> RunConfig:
        """The RunConfig of the preset's training preset with the common and `extra` overrides."""
        return resolve_config(overrides=[*self.common, *extra], preset=self.preset.train_preset)

    def algorithm_overrides(self, algorithm: str) -> list[str]:
        """The preset's `algorithm_options` of `algorithm`, then the user's overrides again, so that
        what the user typed wins over what the preset gives one algorithm."""
        options = self.preset.algorithm_override_list(algorithm)
        return [*options, *self.user] if options else []

    def spec(self, name: str, algorithm: str, seed: int, run_dir: str | Path, config: dict[str, Any],
             **fields: Any) -> RunSpec:
        """A RunSpec of this study (`run_fields` filled in; `fields` replace them)."""
        common = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                  for k, v in self.run_fields.items()}
        return RunSpec(name, algorithm, seed, str(run_dir), config, **{**common, **fields})


class Regime:
    """A training regime of the bench (see the module docstring). Subclasses set the class
    attributes and implement `plan`, `train`, `evaluate`, `results`, `write_outputs` and
    `score_table`; the other methods have defaults."""

    name: ClassVar[str]
    default_preset: ClassVar[str]  # the preset `--regime NAME` uses without --preset
    description: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # regime_options and their defaults
    studies: ClassVar[tuple[str, ...]] = ("droptop", "temperature")  # the extra studies it can run
    results_layout: ClassVar[tuple[str, ...]] = ()  # results.json's keys in this order first (the
    # shared ones and the regime's), the others after them

    def options(self, preset: BenchPreset) -> dict[str, Any]:
        """The preset's regime_options over the defaults (a preset of another regime: the defaults)."""
        given = preset.regime_options if preset.regime == self.name else {}
        unknown = set(given) - set(self.defaults)
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(f"bench preset {preset.name}: regime_options {sorted(unknown)} are not "
                             f"options of the {self.name} regime.{did_you_mean(key, list(self.defaults))} "
                             f"Valid: {', '.join(self.defaults) or 'none'}.")
        return {**self.defaults, **given}

    # ------------------------------------------------------------------ before any work

    def check_request(self, preset: BenchPreset, launcher: str, data: str | None, tasks: list[str] | None,
                      data_dir: str | Path | None) -> None:
        """Refuse the arguments this regime cannot honour (ValueError), before anything is read."""

    def plan(self, ctx: PlanContext) -> list[list[RunSpec]]:
        """Stages of runs; the last one is the table's rows (role "row")."""
        raise NotImplementedError

    def check_spec(self, spec: RunSpec) -> None:
        """Everything about one run knowable without data (ValueError naming the run)."""

    def stale_runs(self, specs: list[RunSpec]) -> list[tuple[RunSpec, list[str]]]:
        """The runs of `specs` whose directory holds a run made with another config, each with
        its differences."""
        return []

    def prepare_data(self, specs: list[RunSpec], log: Callable[[str], None]) -> None:
        """Build what every run reads, once, before --out is touched (a bad source writes nothing)."""

    # ------------------------------------------------------------------ one run

    def stamp(self, spec: RunSpec) -> dict[str, Any]:
        """What a run's saved row (RUN/bench_run.json) must hold to count as this run finished."""
        return {"config_hash": spec.config_hash}

    def prepare(self, spec: RunSpec, row: dict[str, Any]) -> None:
        """Before `spec` trains, in the process that trains it; may add keys to its row."""

    def train(self, spec: RunSpec, progress: bool | None) -> dict[str, Any]:
        """Train (or resume) the run; its training summary."""
        raise NotImplementedError

    def evaluate(self, spec: RunSpec, summary: dict[str, Any], row: dict[str, Any]) -> None:
        """Fill the row of a trained run (status "ok" and its numbers)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the study's outputs

    def results(self, study: Study) -> tuple[dict[str, Any], dict[str, dict], list[FigureInfo]]:
        """(this regime's keys of results.json, with the figures a finding links to drawn: the
        study adds the shared ones, `Study.shared_results`, "regime_comparison", "elapsed_s" and
        "findings"; a key given here replaces a shared one; the cross-run routing analysis
        {name: metrics}; the figures for the report)."""
        raise NotImplementedError

    def write_outputs(self, out: Path, results: dict[str, Any], analysis: dict[str, dict],
                      figures: list[FigureInfo]) -> None:
        """results.json, results.md, results.csv and report.html (`libmoe.bench.write_tables` and
        `libmoe.bench.write_report` lay out the regime's sections)."""
        raise NotImplementedError

    def rewrite_outputs(self, out: Path, results: dict[str, Any]) -> None:
        """Write the tables and report of an existing output again from its files (e.g. with new
        findings)."""
        self.write_outputs(out, results, {}, [])

    def score_table(self, results: dict[str, Any]) -> list[list[str]]:
        """The scores as a header row and rows of cells (what `libmoe bench` prints)."""
        raise NotImplementedError
