"""The GPU smoke run: every step that the visible GPUs allow, each checking a number against a CPU
float64 reference, then one table of steps (passed, failed, or skipped and why).

Steps come from ``STEPS`` lists of ``(name, min_gpus, fn)`` in :mod:`bench.gpu_smoke_serving` and,
when present, :mod:`bench.gpu_smoke_training`; ``fn(out, base_model, gpus)`` returns a one-line
summary of the number it checked and raises AssertionError when the number is off.

    python bench/gpu_smoke.py [OUT_DIR] [--base-model DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)  # run as a script from anywhere; the steps' subprocesses find this checkout too
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

Step = Tuple[str, int, Callable[[Path, str, int], str]]
STEP_MODULES = ("bench.gpu_smoke_serving", "bench.gpu_smoke_training")


@dataclass
class Result:
    name: str
    status: str  # passed | failed | skipped
    detail: str  # the summary, the failure, or why it was skipped
    seconds: float = 0.0


def collect(modules: Sequence[str] = STEP_MODULES) -> List[Step]:
    """Every module's ``STEPS``, in order; a module not written yet is left out (and said so)."""
    steps: List[Step] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise  # the module is there but something it imports is not: that is a failure
            print(f"({name} not found: its steps are not in this run)")
            continue
        steps += list(module.STEPS)
    return steps


def run_steps(steps: Sequence[Step], out: Path, base_model: Callable[[], str], gpus: int) -> List[Result]:
    """Each step whose ``min_gpus`` the visible GPUs meet, failures caught per step.
    ``base_model`` is asked only when a step runs (finding it may need a package)."""
    results = []
    for name, min_gpus, fn in steps:
        if min_gpus > gpus:
            results.append(Result(name, "skipped", f"needs {min_gpus} GPU{'s' * (min_gpus != 1)}, {gpus} visible"))
            continue
        print(f"== {name}", flush=True)
        tic = time.perf_counter()
        try:
            summary = fn(out, base_model(), gpus)
            results.append(Result(name, "passed", summary, time.perf_counter() - tic))
        except Exception as e:  # one step's failure is reported, the others still run
            traceback.print_exc()
            results.append(Result(name, "failed", f"{type(e).__name__}: {e}".splitlines()[0][:300],
                                  time.perf_counter() - tic))
        print(f"   {results[-1].status}: {results[-1].detail}", flush=True)
    return results


def table(results: Sequence[Result]) -> str:
    width = max([len(r.name) for r in results] + [4])
    lines = [f"{'step':<{width}}  {'result':<7}  {'time':>6}  detail", "-" * (width + 60)]
    for r in results:
        t = f"{r.seconds:5.0f}s" if r.status != "skipped" else ""
        lines.append(f"{r.name:<{width}}  {r.status:<7}  {t:>6}  {r.detail}")
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: Optional[Sequence[str]] = None, modules: Sequence[str] = STEP_MODULES) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="moray_runs/gpu_smoke", help="where every step writes")
    ap.add_argument("--base-model", default=None, help="the model the steps start from (SmolLM2-135M-Instruct)")
    ap.add_argument("--only", nargs="*", default=None, help="run only the steps whose name contains one of these")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus()
    steps = collect(modules)
    if args.only:
        steps = [s for s in steps if any(o in s[0] for o in args.only)]

    def base_model() -> str:
        if args.base_model is None:
            from cluster.recipes.base_models import smollm2_dir

            args.base_model = smollm2_dir()
        return args.base_model

    print(f"{len(steps)} steps, {gpus} GPU(s) visible; logs and outputs in {out}", flush=True)
    results = run_steps(steps, out, base_model, gpus)
    report = table(results)
    print("\n" + report)
    (out / "smoke_table.txt").write_text(report + "\n")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
