"""GPU smoke steps of serving, mixing and scoring (see bench/gpu_smoke.py for the interface).

Every step compares a number computed on the GPU with the same number in float64 on the CPU:
served soups' logits against the merged model's, per-row soups under a ``device_map``, scores
of GPU scorers, MPO's teacher-forced log-probs; plus today's pipeline (pairs, DPO, GAPO, MOPO, MPO,
eval, serve), each run then checked the same way.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

PROMPT_IDS = [[1, 504, 3458, 314, 260, 2582, 30], [1, 1780, 436, 260, 3553, 47, 1034], [1, 3055, 1097, 339, 4077, 28, 253]]
WEIGHTS = [[0.2, 0.3, 0.5], [0.0, 0.6, 0.4], [0.5, 0.5, 0.0]]
FP32_BOUND = 2e-2  # fp32 on the GPU against float64, logits of a 30-layer model (|logits| ~ 20)
BF16_BOUND = 0.35  # bf16 weights and activations against float64


def _nudged(base: str, out: Path, seed: int, noise: float = 0.02) -> str:
    """A policy directory without training: ``base`` plus seeded noise, with its metadata."""
    from trainers.core.export import save_hf
    from trainers.core.metadata import PolicyMetadata
    from trainers.core.models import load_causal_lm, load_tokenizer

    if (out / "moray.json").exists():
        return str(out)
    model = load_causal_lm(base)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * p.abs().mean() * torch.randn_like(p))
    return save_hf(model, load_tokenizer(base), str(out), PolicyMetadata("policy", out.name, base, 0.1))


def _lora(base: str, out: Path, seed: int) -> str:
    """A LoRA policy of ``base`` (seeded adapters), exported as training exports one."""
    from trainers.core.metadata import PolicyMetadata
    from trainers.job_config import ModelConfig
    from trainers.task import build_policy, export_policy

    if (out / "moray.json").exists():
        return str(out)
    cfg = ModelConfig(name_or_path=base, lora=True, lora_r=4, lora_alpha=8)
    policy = build_policy(cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.02)
    return export_policy(policy, cfg, str(out), PolicyMetadata("policy", out.name, base, 0.1))


def _policies(out: Path, base: str, lora: bool = False) -> Dict[str, str]:
    root = out / ("lora_policies" if lora else "policies")
    make = _lora if lora else _nudged
    return {name: make(base, root / name, seed) for seed, name in enumerate(("sentiment", "conciseness", "relevance"), 1)}


def _cpu64(path: str):
    from trainers.core.models import load_causal_lm

    return load_causal_lm(path, dtype=torch.float64).eval()


def _merged64(paths: Sequence[str], w: Sequence[float]):
    from serving.mixing import soup_state_dicts

    models = [_cpu64(p) for p in paths]
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(soup_state_dicts([m.state_dict() for m in models], w))
    return merged


def _gap(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - want.detach().double().cpu()).abs().max())


def _check(gaps: List[float], bound: float, what: str) -> str:
    worst = max(gaps)
    assert worst <= bound, f"{what}: max |GPU - CPU float64| {worst:.3g} > {bound}"
    return f"{what}: max |GPU - CPU float64| {worst:.2e} (bound {bound})"


def _engine(policies: Dict[str, str], **cfg):
    from serving.config import ServeConfig
    from serving.engine import MixEngine

    return MixEngine(ServeConfig(policies=policies, dtype="float32", **cfg).validate())


def _row_soup_gaps(engine, paths: Sequence[str]) -> List[float]:
    """Each row of the engine's per-row soup against the float64 merged model of its vector."""
    ids = torch.tensor(PROMPT_IDS)
    engine.row_soup.select_rows(torch.tensor(WEIGHTS))
    with torch.no_grad():
        got = engine.row_soup.model(input_ids=ids.to(engine.row_soup.device)).logits
        return [_gap(got[b], _merged64(paths, w)(input_ids=ids[b:b + 1]).logits[0]) for b, w in enumerate(WEIGHTS)]


def serve_two_gpus(out: Path, base: str, gpus: int) -> str:
    """num_gpus: 2, policy k on cuda:(k mod 2): the per-row soup (activations cross GPUs), a merged
    soup from the cache and the logits mix, each against float64 on the CPU."""
    from serving.mixing import mix_logits

    policies = _policies(out, base)
    paths = list(policies.values())
    engine = _engine(policies, num_gpus=2)
    try:
        assert {str(next(m.parameters()).device) for m in engine.models} == {"cuda:0", "cuda:1"}
        gaps = _row_soup_gaps(engine, paths)
        w = tuple(WEIGHTS[0])
        engine.soups.get(w), engine.soups.get(w)  # hot on the second miss: merged in the background
        engine.soups.wait()
        merged, hit = engine.soups.get(w)
        assert hit
        ids = torch.tensor(PROMPT_IDS[:1])
        with torch.no_grad():
            gaps.append(_gap(merged(input_ids=ids.to(merged.device)).logits[0], _merged64(paths, w)(input_ids=ids).logits[0]))
            each = torch.stack([m(input_ids=ids.to(m.device)).logits[0, -1].to("cuda:0") for m in engine.models])
            want = mix_logits(torch.stack([_cpu64(p)(input_ids=ids).logits[0, -1] for p in paths])[:, None],
                              torch.tensor(w).double())[0]
            gaps.append(_gap(mix_logits(each[:, None], torch.tensor(w))[0], want))
    finally:
        engine.close()
    return _check(gaps, FP32_BOUND, "per-row soup, merged soup and logits mix on 2 GPUs")


def _device_map_soup(out: Path, base: str, lora: bool) -> str:
    policies = _policies(out, base, lora=lora)
    paths = list(policies.values())
    engine = _engine(policies, num_gpus=2, device_map="auto")
    try:
        spread = {str(d) for d in engine.models[0].hf_device_map.values()}
        assert len(spread) >= 2, f"device_map 'auto' kept the policy on {spread}: the hooks' branch is not reached"
        assert engine.row_soup.kind == ("lora" if lora else "full")
        if lora:
            from serving.offline.soup import soup_policies
            from trainers.core.models import load_causal_lm

            ids = torch.tensor(PROMPT_IDS)
            engine.row_soup.select_rows(torch.tensor(WEIGHTS))
            with torch.no_grad():
                got = engine.row_soup.model(input_ids=ids.to(engine.row_soup.device)).logits
                gaps = [_gap(got[b], load_causal_lm(soup_policies(policies, w, str(out / f"lora_soup{b}"), lora=True),
                                                    dtype=torch.float64)(input_ids=ids[b:b + 1]).logits[0])
                        for b, w in enumerate(WEIGHTS)]
        else:
            gaps = _row_soup_gaps(engine, paths)
    finally:
        engine.close()
    return _check(gaps, FP32_BOUND, f"{'LoRA' if lora else 'full-weight'} per-row soup over {sorted(spread)}")


def serve_device_map(out: Path, base: str, gpus: int) -> str:
    """device_map 'auto' over 2 GPUs (accelerate's hooks on every block): the per-row soup mixes
    every row (it served policy 0 before), against the float64 merged model."""
    return _device_map_soup(out, base, lora=False)


def serve_device_map_lora(out: Path, base: str, gpus: int) -> str:
    return _device_map_soup(out, base, lora=True)


def scoring_on_gpu(out: Path, base: str, gpus: int) -> str:
    """relevance on a GPU placement (bf16) and through the GPU scoring actor of moray eval / pairs,
    against MiniLM in float64 on the CPU."""
    import numpy as np

    from reward_models.batch import Scorers
    from reward_models.objectives import get_scorer
    from trainers.core.models import Placement
    from trainers.core.runtime import init_ray

    prompts = ["How was the movie?", "Tell me about the park.", "What should I cook tonight?"]
    responses = ["I liked the film a lot.", "It is green and quiet.", "Pasta with tomatoes and basil."]
    ref = get_scorer("relevance")
    ref.model.double()
    ref.device = torch.device("cpu")
    want = np.asarray(ref.score(prompts, responses))
    gpu = get_scorer("relevance", placement=Placement(1.0))
    assert next(gpu.model.parameters()).device.type == "cuda"
    init_ray()
    scorers = Scorers(["relevance"], base, Placement(1.0))
    try:
        via_actor = scorers.score(prompts, responses)["relevance"]
    finally:
        scorers.close()
    gaps = [float(np.abs(gpu.score(prompts, responses) - want).max()), float(np.abs(via_actor - want).max())]
    return _check(gaps, 2e-2, "relevance in bf16 on a GPU (in process and in the scoring actor)")


def mpo_few_gpus(out: Path, base: str, gpus: int) -> str:
    """moray mix mpo's K+2 GPU actor pools on the visible GPUs (3 policies: 5 pools on 1 or 2 GPUs,
    run in groups), then SequenceLogps on the GPU against float64 teacher forcing on the CPU."""
    import numpy as np

    from serving.offline.mpo import SequenceLogps, sample_log_ratios
    from trainers.core.models import Placement
    from trainers.core.runtime import init_ray

    policies = _policies(out, base)
    init_ray()
    ell = sample_log_ratios(policies, base, ["How was the movie?", "Tell me about the park."], m=2, max_new_tokens=12,
                            placement=Placement(1.0))
    assert ell.shape == (2, 2, 3) and np.isfinite(ell).all()
    row = {"prompt_ids": np.array([json.dumps(PROMPT_IDS[0])], dtype=object),
           "response_ids": np.array([json.dumps([PROMPT_IDS[1][1:], PROMPT_IDS[2][1:]])], dtype=object)}
    name = "sentiment"
    got = json.loads(SequenceLogps(policies[name], name, placement=Placement(1.0))(dict(row))[f"logp_{name}"][0])
    cpu = SequenceLogps(policies[name], name)
    cpu.model = _cpu64(policies[name])
    want = json.loads(cpu(dict(row))[f"logp_{name}"][0])
    return _check([abs(a - b) for a, b in zip(got, want)], 0.5, f"MPO pools on {gpus} GPU(s); sequence log-prob (bf16)")


def _moray(out: Path, log: str, *args: str) -> str:
    """A ``moray`` command; its stdout (failures carry the log's tail)."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    run = subprocess.run([*MORAY, *args], capture_output=True, text=True, env=env)
    (out / f"{log}.log").write_text(run.stdout + "\n" + run.stderr)
    assert run.returncode == 0, f"moray {args[0]} {args[1] if len(args) > 1 else ''} exited {run.returncode}: " \
                                f"{(run.stderr or run.stdout).strip().splitlines()[-1:]} (log {out / log}.log)"
    return run.stdout


def _needs(path: Path, step: str) -> None:
    assert path.exists(), f"{path} is missing: step '{step}' did not pass"


def _policy_vs_cpu64(path: str, bound: float = BF16_BOUND) -> float:
    """The exported policy's logits in bf16 on the GPU against float64 on the CPU."""
    from trainers.core.models import load_causal_lm

    ids = torch.tensor(PROMPT_IDS)
    gpu = load_causal_lm(path, dtype=torch.bfloat16).to("cuda").eval()
    with torch.no_grad():
        gap = _gap(gpu(input_ids=ids.cuda()).logits.float(), _cpu64(path)(input_ids=ids).logits)
    assert gap <= bound, f"{path}: bf16 logits on the GPU are {gap:.3g} from float64 (bound {bound})"
    return gap


MORAY = [sys.executable, "-m", "cluster.cli"]  # the moray command of this checkout
TRAIN = ["--epochs", "1", "--micro-batch-size", "4", "--grad-accum", "1", "--use-gpu"]


def _train(out: Path, name: str, gpus: int, *args: str) -> str:
    _moray(out, name, "train", *args, "--workers", str(min(gpus, 2)), "--out", str(out / name), *TRAIN)
    return f"{name}: exported policy's bf16 logits within {_policy_vs_cpu64(str(out / name)):.3f} of float64"


def pipeline_pairs(out: Path, base: str, gpus: int) -> str:
    _moray(out, "pairs", "pairs", "--model", base, "--prompts", "demo:64", "--objectives", "sentiment,conciseness",
           "--samples-per-prompt", "4", "--max-new-tokens", "32", "--out", str(out / "data"), "--gpus-per-actor", "1")
    from reward_models.objectives import get_scorer

    rows = [json.loads(line) for line in (out / "data" / "candidates.jsonl").read_text().splitlines()]
    sentiment = get_scorer("sentiment")
    gaps = [abs(s - float(sentiment.score([""], [r])[0])) for row in rows[:8]
            for r, s in zip(row["responses"], row["scores"]["sentiment"]) if s is not None]
    return _check(gaps, 1e-9, f"{len(rows)} prompts' candidates: sentiment scores re-scored on the CPU")


def pipeline_dpo(stage: int):
    def step(out: Path, base: str, gpus: int) -> str:
        _needs(out / "data" / "pairs_sentiment.jsonl", "pairs on GPU actors")
        return _train(out, f"dpo_z{stage}", gpus, "dpo", "--model", base, "--objective", "sentiment",
                      "--data", str(out / "data" / "pairs_sentiment.jsonl"), "--zero-stage", str(stage))
    return step


def pipeline_dpo_lora(out: Path, base: str, gpus: int) -> str:
    _needs(out / "data" / "pairs_conciseness.jsonl", "pairs on GPU actors")
    return _train(out, "dpo_lora", gpus, "dpo", "--model", base, "--objective", "conciseness", "--lora",
                  "--data", str(out / "data" / "pairs_conciseness.jsonl"), "--zero-stage", "3",
                  "--set", "model.gradient_checkpointing=true")


def pipeline_gapo_offline(out: Path, base: str, gpus: int) -> str:
    _needs(out / "data" / "pairs_multi.jsonl", "pairs on GPU actors")
    return _train(out, "gapo", gpus, "gapo", "--model", base, "--objectives", "sentiment,conciseness",
                  "--data", str(out / "data" / "pairs_multi.jsonl"), "--zero-stage", "2")


def gapo_online_script(base: str, out: str, use_gpu: bool) -> str:
    """Python that trains online GAPO on relevance and conciseness under ZeRO-3 with 2 workers and
    prints ``RELEVANCE [...]``, the rollouts' mean relevance rewards."""
    return (f"from trainers.jobs.gapo import GAPOJobConfig, run\n"
            f"c = GAPOJobConfig(objectives=['relevance', 'conciseness'], online=True, samples_per_prompt=2, "
            f"max_new_tokens=24, out={out!r})\n"
            f"c.model.name_or_path, c.data.path = {base!r}, 'demo:16'\n"
            f"c.train.zero_stage, c.train.workers, c.train.use_gpu = 3, 2, {use_gpu!r}\n"
            "c.train.micro_batch_size, c.train.log_every = 4, 1\n"
            "m = run(c)\n"
            "import json; print('RELEVANCE', json.dumps([h.get('reward/relevance') for h in [m, *m.get('history', [])]]))\n")


def gapo_online_relevance_zero3(out: Path, base: str, gpus: int) -> str:
    """Online GAPO with relevance under ZeRO-3 on 2 workers: the rollout's MiniLM must be whole on
    each GPU worker (zero.Init partitioned it before); its reward is a cosine in [-1, 1]."""
    job = gapo_online_script(base, str(out / "gapo_online"), use_gpu=True)
    run = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True,
                         env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    (out / "gapo_online.log").write_text(run.stdout + "\n" + run.stderr)
    assert run.returncode == 0, f"online GAPO exited {run.returncode} (log {out / 'gapo_online.log'})"
    rel = [v for v in json.loads(run.stdout.split("RELEVANCE ", 1)[1].splitlines()[0]) if v is not None]
    assert rel and all(-1.0 <= v <= 1.0 for v in rel), f"relevance rewards {rel} (a cosine must be in [-1, 1])"
    gap = _policy_vs_cpu64(str(out / "gapo_online"))
    return f"relevance reward {rel[0]:.3f} in [-1, 1]; exported policy's bf16 logits within {gap:.3f} of float64"


def pipeline_mopo(out: Path, base: str, gpus: int) -> str:
    _needs(out / "data" / "candidates.jsonl", "pairs on GPU actors")
    return _train(out, "mopo", gpus, "mopo", "--model", base, "--objective", "conciseness", "--constraints",
                  "sentiment=0.5", "--data", str(out / "data" / "candidates.jsonl"), "--zero-stage", "2")


def pipeline_mpo_eval(out: Path, base: str, gpus: int) -> str:
    for d in ("dpo_z2", "dpo_lora", "dpo_z3"):
        _needs(out / d / "moray.json", d)
    pol = f"sentiment={out / 'dpo_z2'},conciseness={out / 'dpo_lora'}"
    _moray(out, "mpo", "mix", "mpo", "--policies", pol, "--ref", base, "--prompts", "demo:16", "--samples-per-prompt",
           "4", "--max-new-tokens", "24", "--out", str(out / "mpo.json"), "--gpus-per-actor", "1")
    weights = json.loads((out / "mpo.json").read_text())["weights"]
    assert abs(sum(weights.values()) - 1) < 1e-9, weights
    _moray(out, "eval", "eval", "--policies", f"a={out / 'dpo_z2'},b={out / 'dpo_z3'}", "--prompts", "demo:16",
           "--objectives", "sentiment,conciseness", "--max-new-tokens", "24", "--out", str(out / "eval"),
           "--gpus-per-actor", "1")
    return f"MPO weights {weights} on the simplex; eval written"


def serve_http_one_gpu(out: Path, base: str, gpus: int) -> str:
    """moray serve on 1 GPU in fp32, both mixing modes over HTTP; a unit vector's greedy tokens are
    the policy's own greedy tokens in float64 on the CPU."""
    import time
    import urllib.request

    from serving.decode import LockstepDecoder, Row, Sampling
    from trainers.core.models import load_tokenizer
    from trainers.core.prompts import encode

    policies = _policies(out, base)
    names = list(policies)
    port = 8765
    srv = subprocess.Popen([*MORAY, "serve", "--policies",
                            ",".join(f"{k}={v}" for k, v in policies.items()), "--port", str(port), "--set", "num_gpus=1",
                            "--set", "dtype=float32"], stdout=open(out / "serve.log", "w"), stderr=subprocess.STDOUT,
                           env=dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/objectives", timeout=5)
                break
            except OSError:
                assert srv.poll() is None, f"moray serve exited {srv.returncode} (log {out / 'serve.log'})"
                time.sleep(2)
        texts = {}
        for mixing in ("logits", "soup"):
            body = {"prompt": "The park is", "max_tokens": 12, "temperature": 0, "mixing": mixing,
                    "objective_weights": {names[0]: 1.0, names[1]: 0.0, names[2]: 0.0}}
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            texts[mixing] = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["text"]
    finally:
        srv.terminate()
        srv.wait(60)
    tok = load_tokenizer(base)
    ids = encode(tok, "The park is")  # as the server encodes a completion's prompt
    want = tok.decode(LockstepDecoder([_cpu64(policies[names[0]])], tok.pad_token_id, [tok.eos_token_id]).generate(
        [Row(ids, (1.0,), Sampling(max_tokens=12, temperature=0))])[0], skip_special_tokens=True)
    same = sum(t == want for t in texts.values())
    assert same == 2, f"served greedy texts {texts} differ from float64's {want!r}"
    return f"both mixing modes' greedy text equals policy 0's float64 greedy text ({len(want)} chars)"


STEPS = [
    ("serve: num_gpus 2, per-row soup / merged soup / logits mix vs float64", 2, serve_two_gpus),
    ("serve: device_map auto, full-weight per-row soup vs float64 merge", 2, serve_device_map),
    ("serve: device_map auto, LoRA per-row soup vs float64 LoRA soup", 2, serve_device_map_lora),
    ("serve: HTTP on 1 GPU, both modes' greedy text vs float64", 1, serve_http_one_gpu),
    ("scoring: relevance on GPU actors vs float64", 1, scoring_on_gpu),
    ("mix mpo: K+2 GPU pools on few GPUs, log-probs vs float64", 1, mpo_few_gpus),
    ("pipeline: pairs on GPU actors", 1, pipeline_pairs),
    ("pipeline: DPO ZeRO-2 bf16", 1, pipeline_dpo(2)),
    ("pipeline: DPO ZeRO-3 bf16", 1, pipeline_dpo(3)),
    ("pipeline: DPO ZeRO-3 LoRA + gradient checkpointing", 1, pipeline_dpo_lora),
    ("pipeline: GAPO offline ZeRO-2", 1, pipeline_gapo_offline),
    ("gapo online: relevance, ZeRO-3, 2 workers", 2, gapo_online_relevance_zero3),
    ("pipeline: MOPO ZeRO-2", 1, pipeline_mopo),
    ("pipeline: MPO weights and eval on GPU actors", 1, pipeline_mpo_eval),
]
