"""Run kinds (libmoe.analysis.kinds): analyze_run asks the registered kinds, not a model family."""

import pytest

import libmoe.analysis.kinds as kinds
import libmoe.vlm as vlm  # registers the VLM's kind (as the entry point does once installed)
from libmoe.analysis import LM_RUN_KIND, RunKind, analyze_run, find_run_kind, register_run_kind


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry (entry points loaded first), so a test's kinds do not outlive it."""
    kinds.run_kinds()
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))
    return kinds._KINDS


def test_a_run_without_a_declared_kind_is_a_language_model(tmp_path, registry):
    (tmp_path / "config.yaml").write_text("model: {algorithm: smoe}\n")
    assert find_run_kind(tmp_path, default=LM_RUN_KIND) is LM_RUN_KIND
    assert find_run_kind(tmp_path / "missing", default=LM_RUN_KIND) is LM_RUN_KIND


def test_a_registered_kind_analyses_its_runs(tmp_path, registry):
    seen = []

    def analyze(run, out, options):
        seen.append((run, out, options.device, options.limit, options.interventions))
        return {"kind": "toy"}

    toy = RunKind("toy", lambda path: (path / "toy.json").is_file(), analyze)
    assert register_run_kind(toy) is toy
    register_run_kind(toy)  # the same kind again: a no-op
    with pytest.raises(ValueError, match="registered already"):
        register_run_kind(RunKind("toy", toy.detect, analyze))
    (tmp_path / "toy.json").write_text("{}")
    assert analyze_run(tmp_path, limit=3, interventions=False) == {"kind": "toy"}
    assert seen == [(tmp_path, None, "cpu", 3, False)]


def test_a_declared_kind_nobody_registered_is_refused(tmp_path, registry):
    (tmp_path / "config.yaml").write_text("kind: vlmm\n")
    with pytest.raises(ValueError, match="no analysis of that kind is registered") as err:
        find_run_kind(tmp_path, default=LM_RUN_KIND)
    assert "Known kinds: lm" in str(err.value) and kinds.RUN_KINDS_GROUP in str(err.value)


def test_the_vlm_registers_its_kind(tmp_path):
    assert kinds.run_kinds()["vlm"] is vlm.VLM_RUN_KIND
    (tmp_path / "config.yaml").write_text("kind: vlm\nstage: vit\n")
    assert find_run_kind(tmp_path, default=LM_RUN_KIND) is vlm.VLM_RUN_KIND


def test_a_broken_run_kind_entry_point_is_refused_at_every_lookup(tmp_path, registry, monkeypatch):
    """A kind whose entry point fails to load is one ValueError naming it, at every lookup until
    it loads; never a kind that silently goes missing after the first failure."""
    from importlib.metadata import EntryPoint

    broken = EntryPoint("mine", "no_such_package.kinds:KIND", kinds.RUN_KINDS_GROUP)
    monkeypatch.setattr(kinds, "entry_points", lambda group: [broken])
    monkeypatch.setattr(kinds, "_entry_points_loaded", False)
    for _ in range(2):
        with pytest.raises(kinds.RunKindError, match="'mine'.*no_such_package"):
            kinds.run_kinds()
    assert issubclass(kinds.RunKindError, ValueError)  # the CLI's one line and exit 2
    monkeypatch.setattr(kinds, "entry_points", lambda group: [])
    assert "vlm" in kinds.run_kinds() and kinds._entry_points_loaded  # loads once it can
