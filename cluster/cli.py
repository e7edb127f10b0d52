"""The ``moray`` command line.

    moray train dpo --objective NAME --data PATH_OR_HUB_NAME --model NAME_OR_PATH --out DIR
                    [--config FILE.yaml] [--workers N] [--zero-stage S] [--lora] [--set KEY=VALUE ...]
    moray train gapo --objectives a,b --data pairs_multi.jsonl --model M --out DIR [--preference a=0.7,b=0.3]
    moray train gapo --online --objectives a,b --data demo:64 --model M --out DIR
    moray train mopo --objective a --constraints b=0.5 --data candidates.jsonl --model M --out DIR
    moray train wrpo --objective a --data wrpo.jsonl --model M --out DIR [--alpha-max 0.1]
    moray pairs --model M --prompts FILE|demo:N --objectives a,b --samples-per-prompt n --out DIR
    moray pairs --wrpo --target M --sources M1,M2 --prompts P --objectives a[,b] --out DIR
    moray score --objectives a,b --data FILE --out FILE
    moray mix mpo --policies a=DIR,b=DIR --ref DIR --prompts P --out weights.json
    moray mix soup --policies a=DIR,b=DIR --weights 0.3,0.7 --out DIR [--lora]
    moray serve --config serve.yaml | --policies a=DIR,b=DIR [--mpo-weights F] [--allow-rename] [--write-config F]
    moray demo [--tiny] [--out DIR]
    moray eval --policies a=DIR,b=DIR --prompts P --objectives a,b --out DIR [--reference a=-1,b=-64]
    moray study [--tiny] [--out DIR]      # every method on the demo task: table, JSON, Pareto plot
    moray submit [--address URL] [--working-dir D] [--pip PKG] [--env K=V] [--wait] -- train dpo ...
    moray jobs list | status ID | logs ID [--follow] | stop ID      [--address URL]
    moray metrics [--address ADDR]        # Moray's metrics as every node exports them now
    moray config dpo|gapo|mopo|wrpo|serve   # every option with its default and documentation

Values come from the dataclass defaults, then ``--config``, then the flags; ``--set`` takes any
dotted key (``--set train.lr=1e-5 --set data.skip_invalid=true``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

log = logging.getLogger("moray")

# flag -> dotted config key
DPO_FLAGS = {
    "objective": "objective", "data": "data.path", "model": "model.name_or_path", "out": "out",
    "workers": "train.workers", "zero_stage": "train.zero_stage", "lora": "model.lora",
    "loss": "train.loss", "beta": "train.beta", "lr": "train.lr", "epochs": "train.epochs",
    "micro_batch_size": "train.micro_batch_size", "grad_accum": "train.grad_accum",
    "use_gpu": "train.use_gpu", "seed": "train.seed", "max_failures": "train.max_failures",
}


GAPO_FLAGS = {"objectives": "objectives", "p": "p", "preference": "preference", "balance_params": "balance_params",
              "online": "online", "samples_per_prompt": "samples_per_prompt", "kl_coef": "kl_coef",
              "max_new_tokens": "max_new_tokens"}
MOPO_FLAGS = {"constraints": "constraints", "tau": "tau", "dual_lr": "dual_lr", "lambda_bound": "lambda_bound",
              "dual_init": "dual_init", "accept_unmet": "accept_unmet"}
WRPO_FLAGS = {"alpha_max": "alpha_max", "alpha_steps": "alpha_steps"}


def _job_classes() -> Dict[str, type]:
    from reward_models.learned import RewardJobConfig
    from trainers.config import DPOJobConfig
    from trainers.gapo import GAPOJobConfig
    from trainers.mopo_job import MOPOJobConfig
    from trainers.wrpo import WRPOJobConfig

    return {"dpo": DPOJobConfig, "gapo": GAPOJobConfig, "mopo": MOPOJobConfig, "wrpo": WRPOJobConfig,
            "reward": RewardJobConfig}


def _print_metrics(metrics: Dict[str, Any]) -> None:
    """A training job's final metrics as JSON (the per-step history and probe logits left out)."""
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "probe_logits")}, indent=2,
                     default=str))


def _weights_arg(text: str) -> Dict[str, float]:
    """``a=0.7,b=0.3`` -> ``{"a": 0.7, "b": 0.3}``, naming a value that is not a number."""
    from serving.policies import parse_policies

    out = {}
    for k, v in parse_policies(text).items():
        try:
            out[k] = float(v)
        except ValueError:
            raise ValueError(f"{k}={v}: not a number") from None
    return out


def _add_dpo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with model:, data:, train: sections")
    p.add_argument("--objective", help="objective this policy is aligned to, e.g. sentiment")
    p.add_argument("--data", help="jsonl/parquet file or directory, HF save_to_disk dir, or hub dataset name")
    p.add_argument("--model", help="HF hub name or local path of the base (and reference) causal LM")
    p.add_argument("--out", help="output directory for the exported HF policy")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--zero-stage", dest="zero_stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--lora", action="store_const", const=True, help="train LoRA adapters (merged on export)")
    p.add_argument("--loss", choices=["dpo", "ipo"])
    p.add_argument("--beta", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--micro-batch-size", dest="micro_batch_size", type=int)
    p.add_argument("--grad-accum", dest="grad_accum", type=int)
    p.add_argument("--use-gpu", dest="use_gpu", action="store_const", const=True)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-failures", dest="max_failures", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field by dotted key, e.g. train.checkpoint_every=20")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or an embedded local Ray)")


def dpo_config_from_args(args: argparse.Namespace, cls: Optional[type] = None, extra: Optional[Dict[str, str]] = None):
    """A job config from the shared training flags plus ``extra`` (flag -> config key) of a job kind."""
    from trainers.config import DPOJobConfig, load_config, parse_dotted

    flags = dict(DPO_FLAGS, **(extra or {}))
    overrides: Dict[str, Any] = {key: getattr(args, flag) for flag, key in flags.items()
                                 if getattr(args, flag, None) is not None}
    overrides.update(parse_dotted(args.overrides))
    return load_config(cls or DPOJobConfig, args.config, overrides).validate()


def describe(cls: type, prefix: str = "") -> List[str]:
    """One line per config field: dotted key, default, documentation."""
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            sub = f.default_factory()  # type: ignore[misc]
            lines += describe(type(sub), prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{prefix}{f.name} = {default!r}\n    {f.metadata.get('help', '')}")
    return lines


RENAME_HELP = "accept NAMEs that differ from the objectives recorded in the policies' moray.json"


def build_parser() -> argparse.ArgumentParser:
    """Every ``moray`` command and flag (also used to check command lines in cluster configs)."""
    from reward_models import GENERATE_TOP_K

    parser = argparse.ArgumentParser(prog="moray", description="Multi-objective preference alignment on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy").add_subparsers(dest="method", required=True)
    _add_dpo_args(train.add_parser("dpo", help="per-objective DPO/IPO on Ray Train + DeepSpeed"))
    reward = train.add_parser("reward", help="Bradley-Terry reward model on Ray Train + DeepSpeed")
    _add_dpo_args(reward)
    reward.add_argument("--backbone", dest="model", help="HF name or path, or 'minilm' (offline, default)")
    reward.add_argument("--eval-fraction", dest="eval_fraction", type=float, help="pairs held out for accuracy")

    gapo = train.add_parser("gapo", help="GAPO / P-GAPO: balance per-objective DPO gradients (MGDA)")
    _add_dpo_args(gapo)
    gapo.add_argument("--objectives", help="comma-separated objectives, each labelled in the pair file")
    gapo.add_argument("--p", type=float, help="gradient-norm exponent (default 1)")
    gapo.add_argument("--preference", help="P-GAPO preference, e.g. sentiment=0.7,conciseness=0.3")
    gapo.add_argument("--balance-params", dest="balance_params", choices=["head", "all"])
    gapo.add_argument("--online", action="store_const", const=True,
                      help="sample from the policy each step (--data: prompts, e.g. demo:64) and balance "
                           "per-objective policy-gradient losses")
    gapo.add_argument("--samples-per-prompt", dest="samples_per_prompt", type=int, help="online: samples per prompt")
    gapo.add_argument("--kl-coef", dest="kl_coef", type=float, help="online: KL penalty to the reference")
    gapo.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="online: tokens per sample")

    mopo = train.add_parser("mopo", help="MOPO: maximise --objective with the --constraints held (§4)")
    _add_dpo_args(mopo)
    mopo.add_argument("--constraints", help="secondary objectives' win-rate thresholds, e.g. sentiment=0.5")
    mopo.add_argument("--tau", type=float, help="KL weight τ (default 0.1)")
    mopo.add_argument("--dual-lr", dest="dual_lr", type=float, help="dual step size on λ (default 1)")
    mopo.add_argument("--lambda-bound", dest="lambda_bound", type=float, help="stop when a multiplier passes this")
    mopo.add_argument("--dual-init", dest="dual_init", choices=["solve", "zero"],
                      help="start λ at the dual's minimiser on the candidates (solve, default) or at 0")
    mopo.add_argument("--accept-unmet", dest="accept_unmet", action="store_const", const=True,
                      help="exit 0 even if a constraint's final estimate misses its threshold (moray.json says so)")
    wrpo = train.add_parser("wrpo", help="WRPO: fuse source models' chosen responses into the target (§7)")
    _add_dpo_args(wrpo)
    wrpo.add_argument("--alpha-max", dest="alpha_max", type=float, help="largest source weight (default 0.1)")
    wrpo.add_argument("--alpha-steps", dest="alpha_steps", type=int, help="steps of the α ramp (default: all)")

    pairs = sub.add_parser("pairs", help="on-policy preference pairs: sample, score, best vs worst")
    pairs.add_argument("--model", help="policy to sample from (HF name or path)")
    pairs.add_argument("--wrpo", action="store_true", help="WRPO rows: the target's best and worst sample and "
                       "the best of the --sources' samples")
    pairs.add_argument("--target", help="--wrpo: the model to be trained (default --model)")
    pairs.add_argument("--sources", help="--wrpo: comma-separated source models (HF names or paths)")
    pairs.add_argument("--weights", help="--wrpo with several objectives: a=0.5,b=0.5 over standardised scores")
    pairs.add_argument("--prompts", required=True, help="a .txt file (one per line), a jsonl or parquet "
                       "file, an HF dataset directory or hub name, or demo:N (built-in prompts)")
    pairs.add_argument("--prompt-column", dest="prompt_column", default="prompt",
                       help="column holding prompts (jsonl, parquet, HF datasets)")
    pairs.add_argument("--split", default="train", help="split of an HF dataset")
    pairs.add_argument("--objectives", required=True, help="comma-separated objective names")
    pairs.add_argument("--samples-per-prompt", dest="n", type=int, default=4)
    pairs.add_argument("--out", required=True, help="directory for pairs_<objective>.jsonl and candidates.jsonl")
    pairs.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    pairs.add_argument("--temperature", type=float, default=1.0)
    pairs.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    pairs.add_argument("--top-k", dest="top_k", type=int, default=GENERATE_TOP_K,
                       help="0: no top-k (default: HF generate's)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--actors", type=int, default=1, help="Ray Data sampling actors")
    pairs.add_argument("--address", help="Ray cluster address")

    score = sub.add_parser("score", help="add one score column per objective to a prompt/response file")
    score.add_argument("--objectives", required=True, help="comma-separated objective names")
    score.add_argument("--data", required=True, help="jsonl or parquet with prompt and response columns")
    score.add_argument("--out", required=True, help="output .jsonl or .parquet")
    score.add_argument("--tokenizer", help="tokenizer for token counts (conciseness); default: words")
    score.add_argument("--actors", type=int, default=1)
    score.add_argument("--address", help="Ray cluster address")

    mix = sub.add_parser("mix", help="post-hoc mixing of per-objective policies").add_subparsers(dest="method", required=True)
    mpo = mix.add_parser("mpo", help="MPO max-min weights by batch stochastic mirror descent (§3b)")
    mpo.add_argument("--policies", required=True, help="NAME=DIR,NAME=DIR: one policy per objective")
    mpo.add_argument("--ref", required=True, help="the reference model the policies were trained from")
    mpo.add_argument("--prompts", required=True, help="prompt file, HF dataset, or demo:N (as for `moray pairs`)")
    mpo.add_argument("--prompt-column", dest="prompt_column", default="prompt")
    mpo.add_argument("--split", default="train")
    mpo.add_argument("--samples-per-prompt", dest="m", type=int, default=8, help="responses sampled from --ref per prompt")
    mpo.add_argument("--prompt-batch", dest="prompt_batch", type=int, default=8, help="prompts per mirror-descent step")
    mpo.add_argument("--steps", type=int, default=None, help="mirror-descent steps (default: 10 passes, at least 50)")
    mpo.add_argument("--step-scale", dest="c", type=float, default=1.0, help="c in the step size c/sqrt(T)")
    mpo.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=48)
    mpo.add_argument("--temperature", type=float, default=1.0)
    mpo.add_argument("--seed", type=int, default=0)
    mpo.add_argument("--actors", type=int, default=1, help="Ray Data actors per stage")
    mpo.add_argument("--out", required=True, help="weights.json")
    mpo.add_argument("--force", action="store_true", help="mix even if reference, beta or tokenizer differ")
    mpo.add_argument("--allow-rename", dest="allow_rename", action="store_true", help=RENAME_HELP)
    mpo.add_argument("--address", help="Ray cluster address")
    soup = mix.add_parser("soup", help="Personalized Soups: weighted merge into one HF checkpoint (§6)")
    soup.add_argument("--policies", required=True, help="NAME=DIR,NAME=DIR")
    soup.add_argument("--weights", required=True, help="0.3,0.7 (policy order) or NAME=W,NAME=W; normalised to sum 1")
    soup.add_argument("--out", required=True, help="output directory (HF checkpoint)")
    soup.add_argument("--lora", action="store_true", help="merge the policies' LoRA adapters (B·A products) on the base")
    soup.add_argument("--force", action="store_true")
    soup.add_argument("--allow-rename", dest="allow_rename", action="store_true", help=RENAME_HELP)

    srv = sub.add_parser("serve", help="serve any objective-weight vector (Ray Serve, OpenAI-compatible)")
    srv.add_argument("--config", help="a Ray Serve config file whose app is serving.app:build_app")
    srv.add_argument("--policies", help="NAME=DIR,NAME=DIR (instead of --config)")
    srv.add_argument("--mpo-weights", dest="mpo_weights", help="weights.json from `moray mix mpo` (default weights)")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="any serve option, e.g. max_replicas=4 (see `moray config serve`)")
    srv.add_argument("--allow-rename", dest="allow_rename", action="store_true", help=RENAME_HELP)
    srv.add_argument("--write-config", dest="write_config", help="write the Serve config file and exit")
    srv.add_argument("--address", help="Ray cluster address")

    for name, text, tiny in (("demo", "end-to-end demo on an embedded local Ray", "about 4 minutes"),
                             ("study", "every method on the demo task: table, JSON, Pareto plot, hypervolume",
                              "about 6 minutes; 3 on a demo directory")):
        run = sub.add_parser(name, help=text)
        run.add_argument("--tiny", action="store_true", help=f"the tiny model built here ({tiny})")
        run.add_argument("--out", default=f"moray_runs/{name}", help="output directory (steps already done "
                         "there with the same settings are reused)")
        run.add_argument("--workers", type=int, default=None, help="Ray Train workers per training job")
        run.add_argument("--zero-stage", dest="zero_stage", type=int, default=2, choices=[0, 1, 2, 3])

    ev = sub.add_parser("eval", help="score policies on held-out prompts: means, 95%% intervals, Pareto front, plot")
    ev.add_argument("--policies", required=True, help="NAME=DIR,NAME=DIR (policies, soups, any HF causal LM)")
    ev.add_argument("--prompts", required=True, help="prompt file, HF dataset, or demo:N (as for `moray pairs`)")
    ev.add_argument("--prompt-column", dest="prompt_column", default="prompt")
    ev.add_argument("--split", default="test")
    ev.add_argument("--objectives", required=True, help="comma-separated objectives (all maximised)")
    ev.add_argument("--samples", type=int, default=2, help="samples per prompt and policy")
    ev.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-k", dest="top_k", type=int, default=GENERATE_TOP_K,
                       help="0: no top-k (default: HF generate's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--reference", help="hypervolume reference point, e.g. sentiment=-1,conciseness=-64 "
                    "(default: each objective's worst mean)")
    ev.add_argument("--actors", type=int, default=1, help="Ray Data sampling actors")
    ev.add_argument("--out", required=True, help="directory for eval.json and eval.png")
    ev.add_argument("--address", help="Ray cluster address")

    submit = sub.add_parser("submit", help="run a moray command as a Ray Job on a cluster",
                            usage="moray submit [options] -- <moray command>")
    submit.add_argument("--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265 "
                        "(default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, or a local cluster)")
    submit.add_argument("--working-dir", dest="working_dir", help="directory uploaded as the job's working dir")
    submit.add_argument("--pip", action="append", default=[], help="pip package for the job (repeat), or one "
                        "requirements .txt")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable (repeat)")
    submit.add_argument("--submission-id", dest="submission_id", help="job id to use (default: Ray's)")
    submit.add_argument("--wait", action="store_true", help="stream the logs until the job ends; exit 1 unless it "
                        "succeeded")
    submit.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the moray command, e.g. -- train dpo ...")
    jobs = sub.add_parser("jobs", help="Ray Jobs of a cluster").add_subparsers(dest="action", required=True)
    for action, text in (("list", "every job"), ("status", "one job's status"), ("logs", "one job's logs"),
                         ("stop", "stop one job")):
        a = jobs.add_parser(action, help=text)
        if action != "list":
            a.add_argument("job_id")
        a.add_argument("--address", help="the cluster's dashboard URL")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends")
    metrics = sub.add_parser("metrics", help="Moray's training and serving metrics on every node, now")
    metrics.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")

    cfg = sub.add_parser("config", help="print every option of a job with its default and meaning")
    cfg.add_argument("job", choices=["dpo", "gapo", "mopo", "wrpo", "reward", "serve"])

    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train" and args.method == "reward":
            from reward_models.learned import DEFAULT_BACKBONE, RewardJobConfig, run_reward

            args.model = args.model or DEFAULT_BACKBONE
            metrics = run_reward(dpo_config_from_args(args, RewardJobConfig, {"eval_fraction": "eval_fraction"}),
                                 address=args.address)
            _print_metrics(metrics)
        elif args.command == "train" and args.method == "gapo":
            from trainers.gapo import GAPOJobConfig, run_gapo

            if args.preference:
                args.preference = _weights_arg(args.preference)
            metrics = run_gapo(dpo_config_from_args(args, GAPOJobConfig, GAPO_FLAGS), address=args.address)
            _print_metrics(metrics)
        elif args.command == "train" and args.method in ("mopo", "wrpo"):
            from trainers.mopo_job import MOPOJobConfig, run_mopo
            from trainers.wrpo import WRPOJobConfig, run_wrpo

            if args.method == "mopo":
                if args.constraints:
                    args.constraints = _weights_arg(args.constraints)
                metrics = run_mopo(dpo_config_from_args(args, MOPOJobConfig, MOPO_FLAGS), address=args.address)
            else:
                metrics = run_wrpo(dpo_config_from_args(args, WRPOJobConfig, WRPO_FLAGS), address=args.address)
            _print_metrics(metrics)
        elif args.command == "train":
            from trainers.launcher import run_dpo

            metrics = run_dpo(dpo_config_from_args(args), address=args.address)
            _print_metrics(metrics)
        elif args.command == "pairs":
            from reward_models.pairs import make_pairs
            from reward_models.prompts import load_prompts
            from reward_models.rules import check_objectives
            from trainers.launcher import init_ray

            objectives = [o for o in args.objectives.split(",") if o]
            check_objectives(objectives)
            sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, actors=args.actors)
            if args.wrpo:
                from reward_models.pairs import make_wrpo_pairs
                from serving.mixing import check_weights

                target, sources = args.target or args.model, [m for m in (args.sources or "").split(",") if m]
                if not target or not sources:
                    raise ValueError("--wrpo needs --target (or --model) and --sources M1,M2,...")
                weights = None
                if args.weights:
                    weights = dict(zip(objectives, check_weights(_weights_arg(args.weights), objectives)))
                prompts = load_prompts(args.prompts, args.prompt_column, args.split)
                init_ray(args.address)
                made = make_wrpo_pairs(target, sources, prompts, objectives, args.n, args.out, seed=args.seed,
                                       weights=weights, **sampling)
                print(json.dumps(made, indent=2))
                return 0
            if not args.model:
                raise ValueError("moray pairs needs --model")
            prompts = load_prompts(args.prompts, args.prompt_column, args.split)
            init_ray(args.address)
            made = make_pairs(args.model, prompts, objectives, args.n, args.out, seed=args.seed, **sampling)
            print(json.dumps(made, indent=2))
        elif args.command == "score":
            from reward_models.batch import score_file
            from reward_models.rules import check_objectives
            from trainers.launcher import init_ray

            objectives = [o for o in args.objectives.split(",") if o]
            check_objectives(objectives)
            init_ray(args.address)
            n = score_file(objectives, args.data, args.out,
                           tokenizer_path=args.tokenizer, actors=args.actors)
            print(f"scored {n} rows -> {args.out}")
        elif args.command == "mix" and args.method == "mpo":
            from reward_models.prompts import load_prompts
            from serving.mpo import compute_mpo_weights
            from serving.policies import parse_policies

            result = compute_mpo_weights(parse_policies(args.policies), args.ref,
                                         load_prompts(args.prompts, args.prompt_column, args.split), args.out,
                                         samples_per_prompt=args.m, prompt_batch=args.prompt_batch, steps=args.steps,
                                         c=args.c, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         seed=args.seed, actors=args.actors, force=args.force, address=args.address,
                                         allow_rename=args.allow_rename)
            print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
        elif args.command == "mix":
            from serving.policies import parse_policies
            from serving.soup import soup_policies

            policies = parse_policies(args.policies)
            weights: Any = ({k: float(v) for k, v in parse_policies(args.weights).items()} if "=" in args.weights
                            else [float(w) for w in args.weights.split(",") if w.strip()])
            print(soup_policies(policies, weights, args.out, lora=args.lora, force=args.force,
                                allow_rename=args.allow_rename))
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "demo":
            from cluster.demo import run_demo

            run_demo(tiny=args.tiny, out=args.out, workers=args.workers, zero_stage=args.zero_stage)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "study":
            from cluster.study import run_study

            run_study(tiny=args.tiny, out=args.out, workers=args.workers, zero_stage=args.zero_stage)
        elif args.command in ("submit", "jobs"):
            return run_jobs(args)
        elif args.command == "metrics":
            import ray

            from cluster.metrics import node_metrics_urls, read_metrics

            ray.init(address=args.address or "auto", logging_level=logging.WARNING)
            for url in node_metrics_urls():
                for name, labels, value in read_metrics(url):
                    tags = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k in KEPT_LABELS)
                    print(f"{name}{{{tags}}} {value:g}")
        elif args.command == "config":
            from serving.config import ServeConfig

            print("\n".join(describe(ServeConfig if args.job == "serve" else _job_classes()[args.job])))
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"moray: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from trainers.mopo import ConstraintsUnmet

        if not isinstance(e, ConstraintsUnmet):
            raise
        print(f"moray: error: {e}", file=sys.stderr)
        return 1
    return 0


def run_eval(args: argparse.Namespace) -> None:
    """``moray eval``: JSON, PNG and a table of the policies' per-objective means."""
    from pathlib import Path

    from reward_models.evaluate import EvalSettings, evaluate, front_report, plot, write_json
    from reward_models.prompts import load_prompts
    from reward_models.rules import check_objectives
    from serving.policies import parse_policies
    from trainers.launcher import init_ray

    objectives = [o for o in args.objectives.split(",") if o]
    check_objectives(objectives)
    policies = parse_policies(args.policies)
    for name, path in policies.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"policy {name}: {path} is not a directory")
    reference = None
    if args.reference:
        ref = _weights_arg(args.reference)
        if sorted(ref) != sorted(objectives):
            raise ValueError(f"--reference needs one value per objective {objectives}, got {sorted(ref)}")
        reference = [ref[k] for k in objectives]
    prompts = load_prompts(args.prompts, args.prompt_column, args.split)
    init_ray(args.address)
    results = evaluate(policies, prompts, objectives, next(iter(policies.values())),
                       EvalSettings(args.samples, args.max_new_tokens, args.temperature, args.seed, args.actors,
                                    args.top_k))
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


KEPT_LABELS = ("run", "method", "objective", "route", "mixing", "status", "result", "le", "replica")


def run_jobs(args: argparse.Namespace) -> int:
    """``moray submit`` and ``moray jobs``."""
    from cluster import jobs

    if args.command == "submit":
        cmd = jobs.moray_command(args.cmd)
        made = jobs.submit(cmd, args.address, jobs.runtime_env(args.working_dir, args.pip, args.env),
                           args.submission_id)
        print(f"submitted {made['job_id']}: moray {' '.join(cmd)}")
        print(f"dashboard: {made['dashboard']}")
        print(f"logs: moray jobs logs {made['job_id']} --follow" + (f" --address {args.address}" if args.address else ""),
              flush=True)
        if args.wait:
            status = jobs.follow(made["job_id"], args.address)
            print(f"job {made['job_id']} {status}")
            return 0 if status == "SUCCEEDED" else 1
    elif args.action == "list":
        print(jobs.format_jobs(jobs.list_jobs(args.address)))
    elif args.action == "status":
        print(json.dumps(jobs.status(args.job_id, args.address), indent=2))
    elif args.action == "logs":
        if args.follow:
            return 0 if jobs.follow(args.job_id, args.address) == "SUCCEEDED" else 1
        print(jobs.logs(args.job_id, args.address), end="")
    else:
        print(f"job {args.job_id} {jobs.stop(args.job_id, args.address, wait_s=30)}")
    return 0


def run_serve(args: argparse.Namespace) -> None:
    """``moray serve``: a Serve config file, or one built from the flags; runs until interrupted."""
    import time

    from serving.config import ServeConfig
    from serving.launch import load_serve_file, run_serve_file, serve_file, write_serve_file
    from serving.policies import parse_policies
    from trainers.config import load_config, parse_dotted

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
    print(f"serving at {url}/v1 (objectives: GET {url}/v1/objectives); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
