"""Everything a short GPU lease should measure, in one command and one JSON file.

Parts (each a child process with its own time box, run one after another: parts running at once
on different GPUs would still share the host's CPUs, and one part's inductor compilation would
skew another's host-bound tokens/s; a part that fails or runs out of time is recorded as failed
with its error and the others go on; the script exits non-zero at the end when any part failed):

* ``prepare_data``    the packed data of paper-158m on the embedded corpus (CPU, once, cached);
* ``moe_layer``       forward+backward of one MoE layer (benchmarks/moe_layer.py's cases: dense FFN,
                      transformers' OLMoE block eager and grouped_mm, every libmoe backend and
                      algorithm) at the paper-158m layer shape, bf16 autocast, median ms and ratio to
                      dense;
* ``train_eager``     100 steps of paper-158m, train.compile=false: tokens/s, step time, MFU, peak
                      memory (metrics.jsonl and train_summary.json);
* ``train_compile``   30 steps of the same with train.compile=true (fewer steps: compilation takes
                      most of its time box); its tokens/s, step time and MFU are the logged windows
                      after the first (warm-up and compilation), as for every training part;
* ``train_ep2``       with two GPUs or more: 20 steps under torchrun on 2 GPUs, train.expert_parallel=2;
* ``train_ddp_all``   with two GPUs or more: 20 steps data-parallel over the most visible GPUs that
                      divide the batch (64 sequences: 3 GPUs train on 2, 5-7 on 4), recorded as
                      ``processes`` with ``gpus_visible``.

The time boxes (full run: 60 + 70 + 100 + 130 s, and 50 + 50 s with two GPUs or more) add up to
the default budget of 460 s, so the whole check fits in 8 minutes with its start-up; a part is
given at most what is left of the budget.

    python benchmarks/gpu_check.py --out gpu_check.json            # under 8 minutes on one H100
    python benchmarks/gpu_check.py --smoke --out smoke.json        # CPU: tiny sizes, a few steps

The JSON is rewritten after every part, so an interrupted check keeps the figures it has.
``--fail PART`` makes that part raise (to test the failure path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

# part: (GPUs it needs: 0, 1, 2 or "all"; time box in seconds, full run; smoke run). The parts run
# one at a time; the full boxes sum to the default --budget-s (460 s: 8 minutes with start-up).
PARTS = {
    "prepare_data": (0, 60, 120),
    "moe_layer": (1, 70, 90),
    "train_eager": (1, 100, 120),
    "train_compile": (1, 130, 120),
    "train_ep2": (2, 50, 120),
    "train_ddp_all": ("all", 50, 120),
}
# training steps (full run) and the logging window: tokens/s etc. are the windows after the first
STEPS = {"train_eager": (100, 10), "train_compile": (30, 5), "train_ep2": (20, 5), "train_ddp_all": (20, 5)}


def log(start: float, text: str) -> None:
    print(f"[gpu_check {time.perf_counter() - start:5.0f}s] {text}", flush=True)


# ----------------------------------------------------------------------------- the parts (children)


def train_args(args, work: Path, steps: int, compile_: bool, extra: list[str],
               log_every: int = 10) -> list[str]:
    """`libmoe train` arguments: paper-158m (micro with --smoke) on the embedded corpus, `steps`
    steps, no periodic validation or checkpoint, a small final validation, the shared data cache."""
    preset = "micro" if args.smoke else "paper-158m"
    return ["--preset", preset, "--data", "embedded", "--max-steps", str(steps),
            f"data.cache_dir={work / 'cache'}", "data.min_val_tokens=65536", "data.hub={}",
            f"train.log_every={1 if args.smoke else log_every}", "train.eval_every=1000000",
            "train.checkpoint_every=1000000", "train.eval_tokens=16384",
            f"train.compile={'true' if compile_ else 'false'}", *extra]


def part_prepare_data(args, work: Path) -> dict:
    preset = "micro" if args.smoke else "paper-158m"
    cmd = [sys.executable, "-m", "libmoe", "prepare", "--preset", preset, "--data", "embedded",
           f"data.cache_dir={work / 'cache'}", "data.min_val_tokens=65536", "data.hub={}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
    return {"seconds": time.perf_counter() - start, "preset": preset}


def part_moe_layer(args, work: Path) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import moe_layer  # noqa: PLC0415  benchmarks/moe_layer.py: its cases and dense baseline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        argv = ["--tokens", "64", "--seq-len", "32", "--d-model", "32", "--experts", "4",
                "--expert-dim", "16", "--top-k", "2", "--threads", "1"]
        warmup, repeats = 1, 2
    else:  # paper-158m's layer; 16 sequences of 1024 tokens (a GPU's micro-batch)
        argv = ["--tokens", "16384", "--seq-len", "1024", "--threads", "4"]
        warmup, repeats = 3, 20
    margs = moe_layer.parse_args(argv)
    torch.manual_seed(margs.seed)
    shape = (margs.tokens // margs.seq_len, margs.seq_len, margs.d_model)
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.randn(shape, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    rows = []
    for case in moe_layer.make_cases(margs):
        row = {"case": case.name, "activation": case.activation, "ms": None, "error": case.error}
        rows.append(row)
        if case.error is not None:
            continue
        try:
            torch.manual_seed(margs.seed + 1)
            module = case.build().to(device)
            times = []
            for i in range(warmup + repeats):
                module.zero_grad(set_to_none=True)
                x.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if autocast is not None:
                    with autocast:
                        out = module(x)
                else:
                    out = module(x)
                moe_layer.objective(out, g).float().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(1e3 * (time.perf_counter() - t0))
            row["ms"] = statistics.median(times)
            del module
        except Exception as exc:  # noqa: BLE001  one broken case must not stop the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    dense = {r["activation"]: r["ms"] for r in rows if r["case"].startswith("dense FFN") and r["ms"]}
    for r in rows:
        base = dense.get(r["activation"])
        r["ratio_vs_dense"] = r["ms"] / base if r["ms"] and base else None
    return {"shape": {k: getattr(margs, k) for k in ("tokens", "seq_len", "d_model", "experts",
                                                     "expert_dim", "top_k")},
            "dtype": "bf16 autocast" if device.type == "cuda" else "float32", "warmup": warmup,
            "repeats": repeats, "rows": rows,
            "failed_cases": [r["case"] for r in rows if r["error"]]}


def run_training(args, work: Path, name: str, compile_: bool, nproc: int = 1,
                 extra: list[str] = ()) -> dict:
    """Train in a child (`libmoe train`, under torchrun for `nproc` > 1) for the part's STEPS
    (3 with --smoke) and read its figures."""
    steps, log_every = (3, 1) if args.smoke else STEPS[name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    entry = ["-m", "libmoe", "train", *train_args(args, work, steps, compile_, list(extra), log_every),
             "--out", str(out)]
    cmd = [sys.executable, *entry] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
    wall = time.perf_counter() - start
    summary = json.loads((out / "train_summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "tokens_per_s" in r]
    steady = train_rows[1:] if len(train_rows) > 2 else train_rows  # the first window: warm-up, compile

    def mean(key):
        values = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.fmean(values) if values else None

    figures = {"steps": summary.get("step"), "processes": nproc, "wall_s": wall, "log_every": log_every,
               "windows_averaged": len(steady),
               "train_time_s": summary.get("train_time_s"), "tokens_per_s": mean("tokens_per_s"),
               "step_time_s": mean("step_time_s"), "mfu": mean("mfu"),
               "peak_mem_mb": summary.get("peak_mem_mb"), "params_total": summary.get("params_total"),
               "params_active": summary.get("params_active"),
               "final_loss": train_rows[-1].get("loss") if train_rows else None,
               "first_window_step_s": train_rows[0].get("step_time_s") if train_rows else None}
    figures["mfu_source"] = "metrics.jsonl" if figures["mfu"] is not None else None
    if figures["mfu"] is None and figures["tokens_per_s"] and figures["params_active"]:
        figures["mfu"] = estimated_mfu(args, figures["tokens_per_s"], figures["params_active"], nproc)
        if figures["mfu"] is not None:
            figures["mfu_source"] = "estimate: flops_per_token x tokens/s / (bf16 peak x processes)"
    return figures


def preset_config(args):
    from libmoe.train import resolve_config

    return resolve_config(preset="micro" if args.smoke else "paper-158m")


def estimated_mfu(args, tokens_per_s: float, active: int, nproc: int) -> float | None:
    """libmoe.train.trainer.flops_per_token x tokens/s over the GPUs' bf16 dense peak
    (libmoe.train.throughput's table, as the trainer's own MFU)."""
    import torch

    from libmoe.train.throughput import mfu, run_peak_flops
    from libmoe.train.trainer import flops_per_token

    if not torch.cuda.is_available():
        return None
    peak = run_peak_flops(None, torch.device("cuda", 0), torch.bfloat16)
    return mfu(tokens_per_s, flops_per_token(preset_config(args), active), peak, nproc)


def part_train_eager(args, work):
    return run_training(args, work, "train_eager", False)


def part_train_compile(args, work):
    return run_training(args, work, "train_compile", True)


def part_train_ep2(args, work):
    return run_training(args, work, "train_ep2", False, nproc=2, extra=["train.expert_parallel=2"])


def dividing_count(gpus: int, batch: int) -> int:
    """The most of `gpus` processes that split `batch` sequences evenly (at least 1)."""
    return max(n for n in range(1, max(1, gpus) + 1) if batch % n == 0)


def part_train_ddp_all(args, work):
    visible = len(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(","))
    batch = preset_config(args).train.batch_size
    n = dividing_count(visible, batch)  # torchrun's ranks take the first n visible GPUs
    return {**run_training(args, work, "train_ddp_all", False, nproc=n), "gpus_visible": visible,
            "batch_size": batch}


def run_part(args) -> int:
    """In the child: run one part, write its figures (or its error) to --part-out."""
    work = Path(args.work)
    result: dict = {}
    try:
        if args.fail == args.part:
            raise RuntimeError(f"--fail {args.part}: failure injected")
        import torch

        if torch.cuda.is_available():
            result["device_name"] = torch.cuda.get_device_name(0)
        result.update(globals()[f"part_{args.part}"](args, work))
        if torch.cuda.is_available():
            result["part_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["status"] = "ok"
        code = 0
    except BaseException as exc:  # noqa: BLE001  recorded; the parent goes on with the other parts
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc(limit=6)[-3000:])
        code = 1
    Path(args.part_out).write_text(json.dumps(result, indent=1, default=str))
    return code


# ----------------------------------------------------------------------------- the schedule (parent)


def visible_gpus() -> list[str]:
    sys.path.insert(0, str(HERE.parent / "src"))
    from libmoe.bench import visible_gpus as visible

    return visible()


def device_info(gpus: list[str]) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "visible_gpus": gpus,
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = out.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"failed: {err}"
    return info


def write(path: Path, report: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)


def plan(gpus: list[str], smoke: bool) -> list[tuple[str, int, int]]:
    """(part, GPUs it takes, time box) of every part, in order ("all": every visible GPU)."""
    return [(name, len(gpus) if need == "all" else need, small if smoke else full)
            for name, (need, full, small) in PARTS.items()]


def start_part(args, work: Path, name: str, mine: list[str], place: bool, timeout: float):
    """Start part `name` in a child on the GPUs `mine` (its CUDA_VISIBLE_DEVICES when `place`);
    (process, GPUs, start time, time box, its result file)."""
    env = dict(os.environ)
    if place:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    part_out = work / f"{name}.json"
    part_out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(part_out),
           "--work", str(work), *(["--smoke"] if args.smoke else []),
           *(["--fail", args.fail] if args.fail else [])]
    with (work / f"{name}.log").open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, mine, time.perf_counter(), timeout, part_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON file with every figure")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (runs on a CPU)")
    p.add_argument("--budget-s", type=float, default=460, help="the whole check's time box (default 460)")
    p.add_argument("--parts", default=None, help="comma-separated parts to run (default: all)")
    p.add_argument("--fail", default=None, metavar="PART", help="make PART fail (tests the failure path)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_part(args)

    start = time.perf_counter()
    out = Path(args.out)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus()
    report = {"device": device_info(gpus), "smoke": args.smoke, "budget_s": args.budget_s,
              "schedule": "sequential: one part at a time (no two parts share the host's CPUs)",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
    chosen = set(args.parts.split(",")) if args.parts else set(PARTS)
    log(start, f"{len(gpus)} GPU(s) visible ({','.join(gpus) or 'none: CPU'}); parts: "
        f"{', '.join(n for n in PARTS if n in chosen)}; JSON -> {out}")
    pending = []
    for name, need, box in plan(gpus, args.smoke):
        if name not in chosen:
            continue
        if (need >= 2 or PARTS[name][0] == "all") and len(gpus) < 2:
            why = f"needs 2 GPUs or more, {len(gpus)} visible"
            report["parts"][name] = {"status": "skipped", "why": why}
            log(start, f"{name}: skipped ({why})")
            continue
        pending.append((name, need, box))
    write(out, report)

    free = list(gpus)
    running: dict[str, tuple[subprocess.Popen, list[str], float, float, Path]] = {}
    while pending or running:
        for item in list(pending):
            name, need, box = item
            if running:
                break  # one part at a time: parts at once share the host's CPUs and skew each other
            pending.remove(item)
            left = args.budget_s - (time.perf_counter() - start)
            if left < 15:
                report["parts"][name] = {"status": "failed", "error": "not run: the time budget was spent"}
                log(start, f"{name}: FAILED (not run: the time budget was spent)")
                continue
            mine = [free.pop(0) for _ in range(need)] if gpus else []
            running[name] = start_part(args, work, name, mine, bool(gpus), min(box, left))
            log(start, f"{name}: started on {('GPU ' + ','.join(mine)) if mine else 'CPU'} "
                f"(time box {min(box, left):.0f}s; log {work / (name + '.log')})")
        time.sleep(0.5)
        for name, (proc, mine, t0, timeout, part_out) in list(running.items()):
            elapsed = time.perf_counter() - t0
            if proc.poll() is None and elapsed < timeout:
                continue
            if proc.poll() is None:  # the part and its children (libmoe train, torchrun): one session
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                result = {"status": "failed", "error": f"timed out after {timeout:.0f}s (time box)"}
            elif part_out.is_file():
                result = json.loads(part_out.read_text())
            else:
                tail = (work / f"{name}.log").read_text()[-1500:]
                result = {"status": "failed", "error": f"exit code {proc.returncode}, no result: {tail}"}
            result.update(seconds=round(elapsed, 1), gpus=mine, started_s=round(t0 - start, 1))
            report["parts"][name] = result
            free.extend(mine)
            del running[name]
            write(out, report)
            log(start, f"{name}: {result['status'].upper()} in {elapsed:.0f}s" + summary_line(result))
    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    failed = [n for n, r in report["parts"].items() if r.get("status") == "failed"]
    report["failed"] = failed
    report["ok"] = not failed
    write(out, report)
    verdict = f"FAILED: {', '.join(failed)}" if failed else "every part ok"
    log(start, f"done in {report['elapsed_s']:.0f}s; {verdict}; wrote {out}")
    return 1 if failed else 0


def summary_line(result: dict) -> str:
    if result.get("status") != "ok":
        return f": {str(result.get('error'))[:300]}"
    bits = []
    if result.get("tokens_per_s"):
        bits.append(f"{result['tokens_per_s']:,.0f} tokens/s")
    if result.get("mfu") is not None:
        bits.append(f"MFU {100 * result['mfu']:.1f}%")
    if result.get("peak_mem_mb"):
        bits.append(f"peak {result['peak_mem_mb']:,.0f} MB")
    if result.get("rows"):
        ok = [r for r in result["rows"] if r.get("ms")]
        bits.append(f"{len(ok)}/{len(result['rows'])} cases timed")
    return (" (" + ", ".join(bits) + ")") if bits else ""


if __name__ == "__main__":
    sys.exit(main())
