"""Bring your own router (docs/plugins.md): a router class in the user's own package, declared as an
entry point of group libmoe.algorithms or imported with --plugin, runs in every command and every
worker process like a built-in one; ALGORITHMS sees it; a broken or clashing plugin is one line and
exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libmoe.cli import main
from libmoe.moe import (
    ALGORITHMS,
    PLUGINS_ENV,
    REGISTRY,
    PluginError,
    TopKRouter,
    build_moe,
    load_plugins,
    register_algorithm,
)

ROUTER = '''\
"""A noisy top-k router (Shazeer et al. 2017) as a libmoe plugin."""

import torch
import torch.nn.functional as F
from torch import nn

from libmoe.moe import TopKRouter


class NoisyTopKRouter(TopKRouter):
    """noisy top-k gating: learned Gaussian noise on the logits while training (Shazeer 2017)"""

    OPTIONS = {"noise_scale": 1.0}

    def init_router(self, d_model):
        super().init_router(d_model)
        self.noise = nn.Linear(d_model, self.n_slots, bias=False)
        nn.init.zeros_(self.noise.weight)

    def logits(self, x, prev_logits):
        z = super().logits(x, prev_logits)
        if self.training:
            z = z + torch.randn_like(z) * F.softplus(self.noise(x)) * self.opts.extra["noise_scale"]
        return z
'''


def write_plugin(root: Path, entry_points: dict[str, str] | None = None,
                 package: str = "mine_router") -> Path:
    """A plugin package under `root`, installed the way pip would (a *.dist-info with its entry
    points beside it) when `entry_points` is given: putting `root` on sys.path installs it."""
    pkg = root / package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "router.py").write_text(ROUTER)
    (pkg / "register.py").write_text(  # the --plugin form: importing it registers the router
        "from libmoe.moe import register_algorithm\n"
        f"from {package}.router import NoisyTopKRouter\n"
        "register_algorithm('mine', NoisyTopKRouter, 'noisy top-k (registered by its module)')\n")
    if entry_points is not None:
        info = root / f"{package}-0.1.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[libmoe.algorithms]\n{lines}")
    return root


def libmoe_cli(*args, path: Path, cwd: Path):
    """`python -m libmoe ARGS` with `path` on PYTHONPATH (and no LIBMOE_PLUGINS of ours)."""
    env = dict(os.environ)
    env.pop(PLUGINS_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "libmoe", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data cache for this module's benches (the micro corpus tokenised once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def registry(monkeypatch):
    """REGISTRY as it was after the test: its plugin algorithms and their modules removed, and
    LIBMOE_PLUGINS as it was (setenv first, so monkeypatch restores it even when it was unset)."""
    monkeypatch.setenv(PLUGINS_ENV, "")
    monkeypatch.delenv(PLUGINS_ENV)
    before, modules = list(REGISTRY), set(sys.modules)
    yield REGISTRY
    for name in [n for n in list(REGISTRY) if n not in before]:
        del REGISTRY[name]
    for name in set(sys.modules) - modules:
        if name.startswith(("mine_", "broken_")):
            del sys.modules[name]


def test_a_plugin_router_benches_against_smoe_from_its_entry_point(tmp_path, cache):
    """The end-to-end path of docs/plugins.md: installed (a dist-info with the entry point), the
    router trains in worker processes, is analysed, checked by the findings, upcycled into and
    refused by export like a built-in, with no flag."""
    site = write_plugin(tmp_path / "site", {"mine": "mine_router.router:NoisyTopKRouter"})
    listed = libmoe_cli("algorithms", path=site, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1].split(None, 1) == [
        "mine", "noisy top-k gating: learned Gaussian noise on the logits while training (Shazeer 2017)"]

    bench = tmp_path / "bench"
    done = libmoe_cli("bench", "--preset", "micro", "--algorithms", "mine,smoe,dense", "--jobs", "2",
                      "--out", bench, "train.max_steps=10", "train.eval_every=5", "train.checkpoint_every=5",
                      f"data.cache_dir={cache}", path=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((bench / "results.json").read_text())
    rows = {row["algorithm"]: row for row in results["rows"]}
    assert set(rows) == {"mine", "smoe", "dense"} and rows["mine"]["ppl"] > 0
    assert (bench / "runs" / "mine-s0" / "analysis" / "metrics.json").is_file()
    assert "| mine |" in done.stdout

    findings = libmoe_cli("findings", bench, "--dry-run", "--json", path=site, cwd=tmp_path)
    assert findings.returncode == 0, findings.stderr
    moe_beats_dense = next(f for f in json.loads(findings.stdout) if f["id"] == "a_moe_beats_dense")
    assert "mine" in [part["name"] for part in moe_beats_dense["measured"]["parts"]]

    up = libmoe_cli("upcycle", bench / "runs" / "dense-s0", "--algorithm", "mine", "--n-experts", 4,
                    "--top-k", 2, "--out", tmp_path / "up", path=site, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "-> " in up.stdout and ": mine, 4 experts, top-2" in up.stdout

    refused = libmoe_cli("export", bench / "runs" / "mine-s0", "--to", "mixtral", "--out", tmp_path / "x",
                         path=site, cwd=tmp_path)
    assert refused.returncode == 2 and "algorithm 'mine'" in one_line(refused.stderr)
    assert not (tmp_path / "x").exists()


def test_plugin_flag_reaches_the_bench_workers(tmp_path, cache):
    """--plugin MODULE without an entry point: the module is imported here and, through
    LIBMOE_PLUGINS, in every worker process (--jobs 2 trains the runs in spawned processes)."""
    path = write_plugin(tmp_path / "src")  # importable, not installed: no entry point
    bench = tmp_path / "bench"
    done = libmoe_cli("bench", "--preset", "micro", "--algorithms", "mine,smoe", "--jobs", "2",
                      "--no-analysis", "--out", bench, "--plugin", "mine_router.register",
                      "train.max_steps=4", "train.eval_every=4", "train.checkpoint_every=4",
                      f"data.cache_dir={cache}", path=path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((bench / "results.json").read_text())["rows"]
    assert [r["algorithm"] for r in rows] == ["mine", "smoe"] and all(r["status"] == "ok" for r in rows)
    without = libmoe_cli("train", "--algorithm", "mine", "--out", tmp_path / "run", path=path, cwd=tmp_path)
    assert without.returncode == 2 and "unknown MoE algorithm 'mine'" in one_line(without.stderr)


def test_algorithms_is_live():
    """ALGORITHMS is a view, not a snapshot: it sees a later registration and still behaves like
    the tuple of the names."""
    n = len(ALGORITHMS)
    assert ALGORITHMS == tuple(REGISTRY) and tuple(REGISTRY) == ALGORITHMS  # noqa: SIM300
    assert ALGORITHMS[0] == "smoe" and ALGORITHMS[-1] == "dense" and ALGORITHMS[:2] == ("smoe", "sigma_moe")
    assert repr(ALGORITHMS) == repr(tuple(REGISTRY)) and ALGORITHMS != list(REGISTRY)  # noqa: SIM300

    class LiveRouter(TopKRouter):
        """a router registered after ALGORITHMS was imported"""

    register_algorithm("live_test", LiveRouter, "registered late")
    try:
        assert "live_test" in ALGORITHMS and len(ALGORITHMS) == n + 1 and ALGORITHMS[-1] == "live_test"
        assert ALGORITHMS.index("live_test") == n and list(ALGORITHMS) == list(REGISTRY)
        import libmoe

        assert libmoe.ALGORITHMS is ALGORITHMS
        layer = build_moe("live_test", d_model=8, n_experts=4, expert_dim=8, top_k=2)
        assert isinstance(layer.router, LiveRouter)
    finally:
        del REGISTRY["live_test"]
    assert "live_test" not in ALGORITHMS and len(ALGORITHMS) == n


def test_plugin_flag_imports_the_module_and_exports_it(tmp_path, registry, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(write_plugin(tmp_path)))
    assert main(["algorithms", "--plugin", "mine_router.register", "--plugin", "mine_router.register"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "mine"
    assert os.environ[PLUGINS_ENV] == "mine_router.register"  # what worker processes import
    assert REGISTRY["mine"].source == "mine_router.router" and "mine" in ALGORITHMS


@pytest.mark.parametrize("module, message", [
    ("mine_nowhere", r"plugin 'mine_nowhere' \(--plugin\): no module named 'mine_nowhere'; install its "
                     r"package \(pip install -e DIR\) or put its directory on PYTHONPATH\."),
    ("broken_plugin", r"plugin 'broken_plugin' \(--plugin\) failed to import: RuntimeError: no GPU here"),
    ("broken_needs", r"plugin 'broken_needs' \(--plugin\) failed to import: "
                     r"No module named 'not_installed_x'"),
    ("broken_clash", r"algorithm 'smoe' is already registered \(built in\); give the new one another name\."),
])
def test_a_broken_plugin_is_one_line_and_exit_2(module, message, tmp_path, registry, monkeypatch, capsys):
    import re

    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('no GPU here\\n(on two lines)')\n")
    (tmp_path / "broken_needs.py").write_text("import not_installed_x\n")
    (tmp_path / "broken_clash.py").write_text(
        "from libmoe.moe import TopKRouter, register_algorithm\n"
        "register_algorithm('smoe', TopKRouter, 'mine')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--plugin", module, "--out", str(tmp_path / "run")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("libmoe: error: plugin") or "already registered" in line
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists() and PLUGINS_ENV not in os.environ


def test_entry_points_load_lazily_and_clashes_are_refused(tmp_path, registry, monkeypatch):
    site = write_plugin(tmp_path, {"mine_module": "mine_router.register"})  # a module's entry point
    monkeypatch.syspath_prepend(str(site))
    assert "mine_router" not in sys.modules  # nothing loaded before the first lookup
    with pytest.raises(PluginError, match=r"importing the module registered no algorithm 'mine_module'"):
        registry.refresh()  # it registers 'mine', not the entry point's name
    assert "mine_router.register" in sys.modules and registry.registered("mine") is not None
    ep_file = site / "mine_router-0.1.dist-info" / "entry_points.txt"
    ep_file.write_text("[libmoe.algorithms]\nmine = mine_router.router:NoisyTopKRouter\n")
    registry.refresh()  # the module and the entry point registered the same class: one algorithm
    assert registry["mine"].router.__name__ == "NoisyTopKRouter" and "mine" in ALGORITHMS
    del registry["mine"]

    ep_file.write_text(
        "[libmoe.algorithms]\nsmoe = mine_router.router:NoisyTopKRouter\n")
    with pytest.raises(PluginError, match=r"plugin algorithm 'smoe' \(entry point smoe = "
                       r"'mine_router.router:NoisyTopKRouter' of mine_router\) clashes with a built-in"):
        registry.refresh()
    ep_file.write_text(
        "[libmoe.algorithms]\nmine = mine_router.router:Missing\n")
    with pytest.raises(PluginError, match=r"'mine' \(entry point .*\) failed to load: AttributeError"):
        registry.refresh()
    with pytest.raises(PluginError, match="failed to load"):  # it keeps failing: never a shorter registry
        "smoe" in registry  # noqa: B015
    ep_file.write_text("[libmoe.algorithms]\n")
    registry.refresh()
    assert tuple(registry) == ALGORITHMS


def test_register_algorithm_refuses_bad_names_and_classes(registry):
    with pytest.raises(ValueError, match=r"algorithm 'smoe' is already registered \(built in\)"):
        register_algorithm("smoe", TopKRouter, "again")
    with pytest.raises(ValueError, match="use letters, digits"):
        register_algorithm("mine,smoe", TopKRouter, "a comma would split --algorithms")
    with pytest.raises(TypeError, match="not a libmoe.moe.Router subclass"):
        register_algorithm("mine_fn", lambda x: x, "not a router")  # type: ignore[arg-type]


def test_load_plugins_checks_its_argument(registry):
    with pytest.raises(PluginError, match="give one importable module name"):
        load_plugins(["a,b"])
