"""The ``moray`` command line's parser, built from the tables: a ``moray train <job>`` per entry of
:data:`trainers.jobs.JOBS` (its flags from the job's declaration, their help from its config's
documentation), objectives' help from :data:`reward_models.objectives.SCORERS`, ``moray config``'s
choices from the jobs. Also what checks a command line before ``moray submit`` sends it.

    moray train dpo --objective NAME --data PATH_OR_HUB_NAME --model NAME_OR_PATH --out DIR
                    [--config FILE.yaml] [--workers N] [--zero-stage S] [--lora] [--set KEY=VALUE ...]
    moray train gapo --objectives a,b --data pairs_multi.jsonl --model M --out DIR [--preference a=0.7,b=0.3]
    moray train gapo --online --objectives a,b --data demo:64 --model M --out DIR
    moray train mopo --objective a --constraints b=0.5 --data candidates.jsonl --model M --out DIR
    moray train wrpo --objective a --data wrpo.jsonl --model M --out DIR [--alpha-max 0.1]
    moray train reward --objective a --data pairs.jsonl --backbone minilm --out DIR
    moray pairs --model M --prompts FILE|demo:N --objectives a,b --samples-per-prompt n --out DIR
    moray pairs --wrpo --target M --sources M1,M2 --prompts P --objectives a[,b] --out DIR
    moray score --objectives a,b --data FILE --out FILE
    moray mix mpo --policies a=DIR,b=DIR --ref DIR --prompts P --out weights.json
    moray mix soup --policies a=DIR,b=DIR --weights 0.3,0.7 --out DIR [--lora]
    moray serve --config serve.yaml | --policies a=DIR,b=DIR [--mpo-weights F] [--allow-rename] [--write-config F]
    moray demo [--tiny] [--out DIR]
    moray eval --policies a=DIR,b=DIR --prompts P --objectives a,b --out DIR [--reference a=-1,b=-64]
    moray study [--tiny] [--out DIR] [--docs docs]  # every method on the demo task: table, JSON, plot, intervals
    moray submit [--address URL] [--working-dir D] [--pip PKG] [--env K=V] [--wait] -- train dpo ...
    moray jobs list | status ID | logs ID [--follow] | stop ID      [--address URL]
    moray metrics [--address ADDR]        # Moray's metrics as every node exports them now
    moray config dpo|gapo|mopo|wrpo|reward|serve   # every option with its default and documentation

Values come from the dataclass defaults, then ``--config``, then the flags; ``--set`` takes any
dotted key (``--set train.lr=1e-5 --set data.skip_invalid=true``).
"""

from __future__ import annotations

import argparse
import shlex
from typing import List, Sequence

from reward_models import GENERATE_TOP_K
from reward_models.objectives import objectives_help
from serving.deploy import IMPORT_PATH
from trainers.core.config import field_help
from trainers.core.models import INFERENCE_DTYPES
from trainers.job_config import Job, flags_of
from trainers.jobs import JOBS

RENAME_HELP = "accept NAMEs that differ from the objectives recorded in the policies' moray.json"


CONDITIONED = "; or a conditioned policy's directory alone (its vertex policies)"


def add_mixing_checks(p: argparse.ArgumentParser, force: bool = True) -> None:
    """The flags that relax the checks of a set of policies before they are mixed."""
    if force:
        p.add_argument("--force", action="store_true", help="mix even if reference, beta or tokenizer differ")
    p.add_argument("--allow-rename", dest="allow_rename", action="store_true", help=RENAME_HELP)


def add_placement(p: argparse.ArgumentParser, what: str) -> None:
    """Where an inference stage's Ray Data actors run (``trainers.core.models.Placement``)."""
    p.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, default=0.0,
                   help=f"GPUs each {what} actor requests (fractions share a GPU; default 0: CPU)")
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                   help="model dtype of those actors (auto: bfloat16 on a GPU, float32 on the CPU)")


def add_job(p: argparse.ArgumentParser, job: Job) -> None:
    """A job's flags: ``--config``, every :class:`~trainers.job_config.Flag` it declares (``--address``
    among them) and ``--set``."""
    p.add_argument("--config", help="YAML file with model:, data:, train: sections (and the job's own fields)")
    for f in flags_of(job):
        text = (f.help or field_help(job.config, f.key)).replace("%", "%%")
        if f.switch:
            p.add_argument(f.flag, dest=f.dest, action="store_const", const=True, help=text)
        else:
            p.add_argument(f.flag, dest=f.dest, type=f.type, choices=f.choices, help=text)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any config field by dotted key, e.g. train.checkpoint_every=20 (moray config {job.name})")


def build_parser() -> argparse.ArgumentParser:
    """Every ``moray`` command and flag."""
    parser = argparse.ArgumentParser(prog="moray", description="Multi-objective preference alignment on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy or a reward model").add_subparsers(dest="method", required=True)
    for job in JOBS.values():
        add_job(train.add_parser(job.name, help=job.help), job)

    _pairs(sub)
    _score(sub)
    _mix(sub)
    _serve(sub)
    _demo_and_study(sub)
    _eval(sub)
    _cluster(sub)
    _config(sub)
    return parser


def _pairs(sub) -> None:
    """On-policy pairs, candidates, WRPO rows."""
    pairs = sub.add_parser("pairs", help="preference pairs: on-policy (sample, score, best vs worst) or from a "
                           "dataset rated per attribute (--from-ratings)")
    pairs.add_argument("--model", help="policy to sample from (HF name or path)")
    pairs.add_argument("--wrpo", action="store_true", help="WRPO rows: the target's best and worst sample and "
                       "the best of the --sources' samples")
    pairs.add_argument("--target", help="--wrpo: the model to be trained (default --model)")
    pairs.add_argument("--sources", help="--wrpo: comma-separated source models (HF names or paths)")
    pairs.add_argument("--weights", help="--wrpo with several objectives: a=0.5,b=0.5 over standardised scores")
    pairs.add_argument("--from-ratings", dest="from_ratings", help="a rated dataset (jsonl, parquet, HF dataset "
                       "directory or hub name): per objective its best-rated response against its worst, written as "
                       "on-policy pairs are; needs --ratings (no model, no Ray)")
    pairs.add_argument("--ratings", help="--from-ratings: objective=where its rating is, comma-separated; a dotted "
                       "path inside each response entry (helpfulness=annotations.helpfulness.Rating) or a column "
                       "(helpfulness=helpfulness); the objectives are yours to name")
    pairs.add_argument("--responses", default="", help="--from-ratings: the column holding each row's list of rated "
                       "responses (UltraFeedback: completions); omitted: one row per response, grouped by prompt")
    pairs.add_argument("--response-field", dest="response_field", default="response",
                       help="--from-ratings: the response text's field in each entry (or its column)")
    pairs.add_argument("--min-margin", dest="min_margin", type=float, default=0.0,
                       help="--from-ratings: drop pairs whose rating gap is this or less (ties always are)")
    pairs.add_argument("--skip-invalid", dest="skip_invalid", action="store_true",
                       help="--from-ratings: drop malformed rows and count them instead of failing")
    pairs.add_argument("--prompts", help="a .txt file (one per line), a jsonl or parquet "
                       "file, an HF dataset directory or hub name, or demo:N (built-in prompts)")
    pairs.add_argument("--prompt-column", dest="prompt_column", default="prompt",
                       help="column holding prompts (jsonl, parquet, HF datasets; --from-ratings too)")
    pairs.add_argument("--split", default="train", help="split of an HF dataset")
    pairs.add_argument("--objectives", help=objectives_help())
    pairs.add_argument("--samples-per-prompt", dest="n", type=int, default=4)
    pairs.add_argument("--out", required=True, help="directory for pairs_<objective>.jsonl and candidates.jsonl")
    pairs.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    pairs.add_argument("--temperature", type=float, default=1.0)
    pairs.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    pairs.add_argument("--top-k", dest="top_k", type=int, default=GENERATE_TOP_K,
                       help="0: no top-k (default: HF generate's)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--actors", type=int, default=1, help="Ray Data sampling actors")
    add_placement(pairs, "sampling")
    pairs.add_argument("--address", help="Ray cluster address")


def _score(sub) -> None:
    """Batch scoring."""
    score = sub.add_parser("score", help="add one score column per objective to a prompt/response file")
    score.add_argument("--objectives", required=True, help=objectives_help())
    score.add_argument("--data", required=True, help="jsonl or parquet with prompt and response columns")
    score.add_argument("--out", required=True, help="output .jsonl or .parquet")
    score.add_argument("--tokenizer", help="tokenizer for token counts (conciseness); default: words")
    score.add_argument("--actors", type=int, default=1)
    add_placement(score, "scoring (learned reward models)")
    score.add_argument("--address", help="Ray cluster address")


def _mix(sub) -> None:
    """MPO weights and soups."""
    mix = sub.add_parser("mix", help="post-hoc mixing of per-objective policies").add_subparsers(dest="method", required=True)
    mpo = mix.add_parser("mpo", help="MPO max-min weights by batch stochastic mirror descent (§3b)")
    mpo.add_argument("--policies", required=True, help="NAME=DIR,NAME=DIR: one policy per objective" + CONDITIONED)
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
    add_placement(mpo, "sampling and scoring")
    mpo.add_argument("--out", required=True, help="weights.json")
    add_mixing_checks(mpo)
    mpo.add_argument("--address", help="Ray cluster address")
    soup = mix.add_parser("soup", help="Personalized Soups: weighted merge into one HF checkpoint (§6)")
    soup.add_argument("--policies", required=True, help="NAME=DIR,NAME=DIR" + CONDITIONED)
    soup.add_argument("--weights", required=True, help="0.3,0.7 (policy order) or NAME=W,NAME=W; normalised to sum 1")
    soup.add_argument("--out", required=True, help="output directory (HF checkpoint)")
    soup.add_argument("--lora", action="store_true", help="merge the policies' LoRA adapters (B·A products) on the base")
    add_mixing_checks(soup)


def _serve(sub) -> None:
    """The Serve app."""
    srv = sub.add_parser("serve", help="serve any objective-weight vector (Ray Serve, OpenAI-compatible)")
    srv.add_argument("--config", help=f"a Ray Serve config file whose app is {IMPORT_PATH}")
    srv.add_argument("--policies", help="NAME=DIR,NAME=DIR (instead of --config)" + CONDITIONED)
    srv.add_argument("--mpo-weights", dest="mpo_weights", help="weights.json from `moray mix mpo` (default weights)")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="any serve option, e.g. max_replicas=4 (see `moray config serve`)")
    add_mixing_checks(srv, force=False)
    srv.add_argument("--write-config", dest="write_config", help="write the Serve config file and exit")
    srv.add_argument("--address", help="Ray cluster address")


def _demo_and_study(sub) -> None:
    """The demo and the study."""
    for name, text, tiny in (("demo", "end-to-end demo on an embedded local Ray", "about 4 minutes"),
                             ("study", "every method on the demo task: table, JSON, Pareto plot, hypervolume",
                              "about 7 minutes from scratch, 6 on a demo directory")):
        run = sub.add_parser(name, help=text)
        run.add_argument("--tiny", action="store_true", help=f"the tiny model built here ({tiny})")
        run.add_argument("--out", default=f"moray_runs/{name}", help="output directory (steps already done "
                         "there with the same settings are reused)")
        run.add_argument("--workers", type=int, default=None, help="Ray Train workers per training job")
        run.add_argument("--zero-stage", dest="zero_stage", type=int, default=2, choices=[0, 1, 2, 3])
        if name == "study":
            run.add_argument("--docs", default=None, help="also copy study.{md,json,png} into this directory as "
                             "study-smollm2.* (study-tiny.* with --tiny), made first if missing: `--docs docs` "
                             "regenerates the repository's copies")


def _eval(sub) -> None:
    """Scoring policies."""
    ev = sub.add_parser("eval", help="score policies on held-out prompts: means, 95%% intervals, Pareto front, plot")
    ev.add_argument("--policies", required=True, help="NAME=DIR,NAME=DIR (policies, soups, any HF causal LM)")
    ev.add_argument("--prompts", required=True, help="prompt file, HF dataset, or demo:N (as for `moray pairs`)")
    ev.add_argument("--prompt-column", dest="prompt_column", default="prompt")
    ev.add_argument("--split", default="test")
    ev.add_argument("--objectives", required=True, help=objectives_help() + " (all maximised)")
    ev.add_argument("--samples", type=int, default=2, help="samples per prompt and policy")
    ev.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-k", dest="top_k", type=int, default=GENERATE_TOP_K,
                       help="0: no top-k (default: HF generate's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--reference", help="hypervolume reference point, e.g. sentiment=-1,conciseness=-64 "
                    "(default: each objective's worst mean)")
    ev.add_argument("--actors", type=int, default=1, help="Ray Data sampling actors")
    add_placement(ev, "sampling")
    ev.add_argument("--out", required=True, help="directory for eval.json and eval.png")
    ev.add_argument("--address", help="Ray cluster address")


def _cluster(sub) -> None:
    """Ray Jobs and metrics of a cluster."""
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


def _config(sub) -> None:
    """Every option of a job."""
    cfg = sub.add_parser("config", help="print every option of a job with its default and meaning")
    cfg.add_argument("job", choices=[*JOBS, "serve"])


def moray_command(argv: Sequence[str]) -> List[str]:
    """The Moray command line after ``--`` (``moray`` itself optional), checked by Moray's parser."""
    cmd = list(argv)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if cmd[:1] == ["moray"]:
        cmd = cmd[1:]
    if not cmd:
        raise ValueError("nothing to submit: moray submit [options] -- train dpo --objective ...")
    if cmd[0] in ("submit", "jobs"):
        raise ValueError(f"`moray {cmd[0]}` runs on this machine, not as a job")
    try:
        build_parser().parse_args(cmd)
    except SystemExit:  # argparse printed what is wrong
        raise ValueError(f"not a valid moray command: {shlex.join(cmd)}") from None
    return cmd
