"""The ``moray`` commands: one handler per command of :func:`cluster.cli.parser.build_parser`, looked up
in :data:`COMMANDS` by :func:`cluster.cli.main`. Each checks its input before Ray starts."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from cluster.cli.parser import moray_command
from cluster.ops import ray_jobs
from cluster.ops.metrics import final_samples, node_metrics_urls, read_metrics
from cluster.recipes.demo import run_demo
from cluster.recipes.study import run_study
from reward_models.batch import score_file
from reward_models.evaluate import EvalSettings, evaluate, front_report, plot, write_json
from reward_models.objectives import check_objectives
from reward_models.pairs import make_pairs, make_wrpo_pairs
from reward_models.prompts import load_prompts
from serving.config import ServeConfig
from serving.deploy import load_serve_file, run_serve_file, serve_file, write_serve_file
from serving.offline.mpo import compute_mpo_weights
from serving.offline.soup import soup_policies
from serving.policies import parse_policies
from trainers.checkpoints import FINAL_TASK_STATE
from trainers.core.config import describe, load_config, parse_assignments, parse_dotted, parse_numbers
from trainers.core.models import Placement
from trainers.core.runtime import init_ray
from trainers.core.weights import check_weights
from trainers.job_config import config_from
from trainers.jobs import JOBS, get_job
from trainers.ratings import RatingsMapping, pairs_from_ratings

KEPT_LABELS = ("run", "method", "objective", "route", "mixing", "status", "result", "le", "replica")


def objective_list(text: str):
    """``a,b`` -> ``["a", "b"]``, every name checked against the objective table."""
    objectives = [o for o in text.split(",") if o]
    check_objectives(objectives)
    return objectives


def print_metrics(metrics: Dict[str, Any]) -> None:
    """A training job's final metrics as JSON (the per-step history, probe logits and task state left out)."""
    left_out = ("history", "probe_logits", FINAL_TASK_STATE)
    print(json.dumps({k: v for k, v in metrics.items() if k not in left_out}, indent=2, default=str))


def train(args: argparse.Namespace) -> None:
    """``moray train <job>``: the job's config from defaults, ``--config``, flags and ``--set``; its run."""
    job = get_job(args.method)
    cfg = config_from(job, args.config, args, args.overrides)
    print_metrics(job.run(cfg))


def placement(args: argparse.Namespace) -> Placement:
    """The inference actors' placement from ``--gpus-per-actor`` and ``--dtype`` (checked here, before Ray)."""
    return Placement(args.gpus_per_actor, args.dtype)


def pairs(args: argparse.Namespace) -> None:
    """``moray pairs``: on-policy pairs and candidates, WRPO rows (``--wrpo``), or pairs and
    candidates from a rated dataset (``--from-ratings``)."""
    if args.from_ratings:
        if not args.ratings:
            raise ValueError("--from-ratings needs --ratings objective=path[,objective=path...]")
        mapping = RatingsMapping(parse_assignments(args.ratings), args.prompt_column, args.responses,
                                 args.response_field)
        print(json.dumps(pairs_from_ratings(args.from_ratings, mapping, args.out, args.min_margin,
                                            split=args.split, skip_invalid=args.skip_invalid), indent=2))
        return
    if not args.prompts or not args.objectives:
        raise ValueError("moray pairs needs --prompts and --objectives (or --from-ratings)")
    objectives = objective_list(args.objectives)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, actors=args.actors, placement=placement(args))
    if args.wrpo:
        target, sources = args.target or args.model, [m for m in (args.sources or "").split(",") if m]
        if not target or not sources:
            raise ValueError("--wrpo needs --target (or --model) and --sources M1,M2,...")
        weights = None
        if args.weights:
            weights = dict(zip(objectives, check_weights(parse_numbers(args.weights), objectives)))
        prompts = load_prompts(args.prompts, args.prompt_column, args.split)
        init_ray(args.address)
        made = make_wrpo_pairs(target, sources, prompts, objectives, args.n, args.out, seed=args.seed,
                               weights=weights, **sampling)
    else:
        if not args.model:
            raise ValueError("moray pairs needs --model")
        prompts = load_prompts(args.prompts, args.prompt_column, args.split)
        init_ray(args.address)
        made = make_pairs(args.model, prompts, objectives, args.n, args.out, seed=args.seed, **sampling)
    print(json.dumps(made, indent=2))


def score(args: argparse.Namespace) -> None:
    """``moray score``: one score column per objective, on Ray Data."""
    objectives = objective_list(args.objectives)
    where = placement(args)
    init_ray(args.address)
    n = score_file(objectives, args.data, args.out, tokenizer_path=args.tokenizer, actors=args.actors, placement=where)
    print(f"scored {n} rows -> {args.out}")


def mix(args: argparse.Namespace) -> None:
    """``moray mix mpo`` (max-min weights) and ``moray mix soup`` (a merged checkpoint)."""
    policies = parse_policies(args.policies)
    if args.method == "mpo":
        result = compute_mpo_weights(policies, args.ref, load_prompts(args.prompts, args.prompt_column, args.split),
                                     args.out, samples_per_prompt=args.m, prompt_batch=args.prompt_batch,
                                     steps=args.steps, c=args.c, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, seed=args.seed, actors=args.actors,
                                     force=args.force, address=args.address, allow_rename=args.allow_rename,
                                     placement=placement(args))
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
        return
    weights: Any = (parse_numbers(args.weights) if "=" in args.weights
                    else [float(w) for w in args.weights.split(",") if w.strip()])
    print(soup_policies(policies, weights, args.out, lora=args.lora, force=args.force,
                        allow_rename=args.allow_rename))


def demo(args: argparse.Namespace) -> None:
    run_demo(tiny=args.tiny, out=args.out, workers=args.workers, zero_stage=args.zero_stage)


def study(args: argparse.Namespace) -> None:
    run_study(tiny=args.tiny, out=args.out, workers=args.workers, zero_stage=args.zero_stage, docs=args.docs)


def metrics(args: argparse.Namespace) -> None:
    """``moray metrics``: Moray's metrics on every node of the cluster, now, then the last values of
    the training jobs that have ended."""
    import ray

    ray.init(address=args.address or "auto", logging_level=logging.WARNING)
    print("\n".join(metrics_lines()))


def metrics_lines() -> List[str]:
    """``moray metrics``' lines: every node's samples, then the finished jobs' last gauges."""
    def line(name: str, labels: Dict[str, str], value: float, final: str = "") -> str:
        tags = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k in KEPT_LABELS)
        return f"{name}{{{tags}}} {value:g}{final}"

    live = [line(*s) for url in node_metrics_urls() for s in read_metrics(url)]
    return live + [line(*s, "  # last value of a finished job") for s in final_samples()]


def config(args: argparse.Namespace) -> None:
    """``moray config <job|serve>``: every option, its default and its documentation."""
    print("\n".join(describe(ServeConfig if args.job == "serve" else JOBS[args.job].config)))


def eval_(args: argparse.Namespace) -> None:
    """``moray eval``: JSON, PNG and a table of the policies' per-objective means."""
    objectives = objective_list(args.objectives)
    policies = parse_policies(args.policies)
    for name, path in policies.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"policy {name}: {path} is not a directory")
    reference = None
    if args.reference:
        ref = parse_numbers(args.reference)
        if sorted(ref) != sorted(objectives):
            raise ValueError(f"--reference needs one value per objective {objectives}, got {sorted(ref)}")
        reference = [ref[k] for k in objectives]
    prompts = load_prompts(args.prompts, args.prompt_column, args.split)
    settings = EvalSettings(args.samples, args.max_new_tokens, args.temperature, args.seed, args.actors, args.top_k,
                            placement(args))
    init_ray(args.address)
    results = evaluate(policies, prompts, objectives, next(iter(policies.values())), settings)
    if reference is None:
        reference = [min(r["objectives"][k]["mean"] for r in results.values()) for k in objectives]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"objectives": objectives, "prompts": len(prompts), "samples": args.samples, "policies": results,
           **front_report(results, objectives, reference)}
    write_json(str(out / "eval.json"), doc)
    if len(objectives) >= 2:
        plot(results, objectives, str(out / "eval.png"))
    width = max(len(n) for n in results) + 2
    print(f"{'policy':<{width}}" + "".join(f"{k:>24}" for k in objectives) + "  front")
    for name, r in results.items():
        cells = "".join(f"{r['objectives'][k]['mean']:>15.3f} ± {r['objectives'][k]['ci95']:<6.3f}" for k in objectives)
        print(f"{name:<{width}}{cells}  {'*' if name in doc['front'] else ''}")
    print(f"hypervolume {doc['hypervolume']:.4g} against {dict(zip(objectives, reference))}; wrote {out / 'eval.json'}")


def submit_and_jobs(args: argparse.Namespace) -> int:
    """``moray submit`` and ``moray jobs``."""
    if args.command == "submit":
        cmd = moray_command(args.cmd)
        made = ray_jobs.submit(cmd, args.address, ray_jobs.runtime_env(args.working_dir, args.pip, args.env),
                               args.submission_id)
        print(f"submitted {made['job_id']}: moray {' '.join(cmd)}")
        print(f"dashboard: {made['dashboard']}")
        print(f"logs: moray jobs logs {made['job_id']} --follow" + (f" --address {args.address}" if args.address else ""),
              flush=True)
        if args.wait:
            status = ray_jobs.follow(made["job_id"], args.address)
            print(f"job {made['job_id']} {status}")
            return 0 if status == "SUCCEEDED" else 1
    elif args.action == "list":
        print(ray_jobs.format_jobs(ray_jobs.list_jobs(args.address)))
    elif args.action == "status":
        print(json.dumps(ray_jobs.status(args.job_id, args.address), indent=2))
    elif args.action == "logs":
        if args.follow:
            return 0 if ray_jobs.follow(args.job_id, args.address) == "SUCCEEDED" else 1
        print(ray_jobs.logs(args.job_id, args.address), end="")
    else:
        print(f"job {args.job_id} {ray_jobs.stop(args.job_id, args.address, wait_s=30)}")
    return 0


def serve(args: argparse.Namespace) -> None:
    """``moray serve``: a Serve config file, or one built from the flags; runs until interrupted."""
    if args.config:
        if args.policies or args.overrides or args.allow_rename:
            raise ValueError("give either --config or --policies/--set/--allow-rename, not both")
        doc = load_serve_file(args.config)
    else:
        if not args.policies:
            raise ValueError("moray serve needs --config FILE or --policies NAME=DIR,...")
        overrides: Dict[str, Any] = {"policies": parse_policies(args.policies)}
        if args.mpo_weights:
            overrides["mpo_weights"] = args.mpo_weights
        if args.allow_rename:
            overrides["allow_rename"] = True
        overrides.update(parse_dotted(args.overrides))
        doc = serve_file(load_config(ServeConfig, overrides=overrides), args.host, args.port)
    if args.write_config:
        print(write_serve_file(doc, args.write_config))
        return
    from ray import serve

    url = run_serve_file(doc, args.address)
    # a supervisor's SIGTERM stops the server as Ctrl-C does (Ray's own handler would dump a stack)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"serving at {url}/v1 (objectives: GET {url}/v1/objectives); Ctrl-C or SIGTERM stops", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("stopping: requests in flight get up to graceful_shutdown_timeout_s to finish", flush=True)
    serve.shutdown()


COMMANDS: Dict[str, Callable[[argparse.Namespace], Optional[int]]] = {
    "train": train, "pairs": pairs, "score": score, "mix": mix, "serve": serve, "demo": demo, "eval": eval_,
    "study": study, "submit": submit_and_jobs, "jobs": submit_and_jobs, "metrics": metrics, "config": config,
}
