"""On-policy preference data: samples of a policy (:mod:`reward_models.sampling`), scored by every
objective, become best-vs-worst pairs per objective (ties dropped, the score margin kept),
pairs labelled by every objective (GAPO), candidate files (MOPO) and WRPO rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from reward_models.batch import Scorers
from reward_models.objectives import check_objectives, score_all
from reward_models.sampling import sample_responses
from trainers.core.prompts import user_turn


def best_vs_worst(prompts: Sequence[str], responses: Sequence[Sequence[str]], scores: Sequence[np.ndarray],
                  min_margin: float = 0.0) -> List[Dict[str, Any]]:
    """One pair per prompt: the best-scored response against the worst.

    ``scores[i]`` holds the ``n`` scores of ``responses[i]`` (NaN for a response that could not be
    scored, e.g. an empty one). Prompts whose best and worst tie (margin <= ``min_margin``), whose
    two texts are equal, or with fewer than two scored responses are dropped.
    """
    pairs = []
    for prompt, resp, sc in zip(prompts, responses, scores):
        sc = np.asarray(sc, dtype=np.float64)
        if len(resp) != len(sc):
            raise ValueError(f"{len(resp)} responses but {len(sc)} scores for prompt {prompt!r}")
        if np.isfinite(sc).sum() < 2:
            continue
        hi, lo = int(np.nanargmax(sc)), int(np.nanargmin(sc))
        margin = float(sc[hi] - sc[lo])
        if margin <= min_margin or resp[hi] == resp[lo]:
            continue
        pairs.append({"prompt": prompt, "chosen": resp[hi], "rejected": resp[lo], "margin": margin})
    return pairs


def score_candidates(names: Sequence[str], prompts: Sequence[str], responses: Sequence[Sequence[str]],
                     tokenizer: Optional[object] = None, scorers: Optional[Scorers] = None) -> Dict[str, np.ndarray]:
    """Scores ``(prompts, n)`` per objective; empty samples get NaN instead of failing the batch.
    ``scorers``: loaded once by the caller, on its placement (else built here, in this process)."""
    n = max((len(r) for r in responses), default=0)
    if any(len(r) != n for r in responses):
        raise ValueError("every prompt needs the same number of samples")
    flat = [(i, j, p, r) for i, (p, rs) in enumerate(zip(prompts, responses)) for j, r in enumerate(rs) if r.strip()]
    out = {k: np.full((len(prompts), n), np.nan) for k in names}
    if flat:
        ps, rs = [f[2] for f in flat], [f[3] for f in flat]
        scored = scorers.score(ps, rs) if scorers is not None else score_all(names, ps, rs, tokenizer)
        rows, cols = np.array([f[0] for f in flat]), np.array([f[1] for f in flat])
        for k in names:
            out[k][rows, cols] = scored[k]
    return out


def score_on_placement(names: Sequence[str], prompts: Sequence[str], responses: Sequence[Sequence[str]],
                       tokenizer_path: str, placement=None) -> Dict[str, np.ndarray]:
    """:func:`score_candidates` with the scorers on ``placement`` (the sampling actors'; on a GPU,
    one Ray actor), loaded once and freed after."""
    scorers = Scorers(names, tokenizer_path, placement)
    try:
        return score_candidates(names, prompts, responses, scorers=scorers)
    finally:
        scorers.close()


def _output_dir(objectives: Sequence[str], n: int, prompts: Sequence[str], out_dir: str):
    """Check what every sampling job needs (known objectives, n >= 2 samples, some prompts) and
    create the output directory."""
    check_objectives(objectives)
    if n < 2:
        raise ValueError(f"samples per prompt must be >= 2 to make pairs, got {n}")
    if not prompts:
        raise ValueError("no prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_pairs(model_path: str, prompts: Sequence[str], objectives: Sequence[str], n: int, out_dir: str,
               seed: int = 0, **sampling: Any) -> Dict[str, Any]:
    """Sample ``n`` responses per prompt, score them with every objective, and write

    - ``pairs_<objective>.jsonl``: best vs worst per prompt (ties dropped, margin kept), prompts as
      chat messages so training renders them exactly as sampling did;
    - ``candidates.jsonl``: every prompt (as chat messages) with all ``n`` responses and every
      objective's scores (``null`` where a sample could not be scored) -- MOPO's input;
    - with several objectives, ``pairs_multi.jsonl``: pairs labelled by every objective (GAPO's
      input; see :func:`labelled_pairs`).

    Returns ``{"pairs": {objective: path}, "counts": {objective: n_pairs, "multi": n}, "candidates": path,
    "pairs_multi": path}`` (the ``multi`` entries only with several objectives).
    """
    out = _output_dir(objectives, n, prompts, out_dir)
    responses = sample_responses(model_path, prompts, n, seed=seed, **sampling)
    scores = score_on_placement(objectives, prompts, responses, model_path, sampling.get("placement"))
    return write_pair_files(out, prompts, responses, scores, objectives)


def write_pair_files(out: Path, prompts: Sequence[str], responses: Sequence[Sequence[str]],
                     scores: Dict[str, Any], objectives: Sequence[str], min_margin: float = 0.0) -> Dict[str, Any]:
    """:func:`make_pairs`' files from prompts, their responses and ``scores[k][i]``: objective
    ``k``'s scores of ``responses[i]`` (NaN: unscored). Returns what :func:`make_pairs` returns."""
    result: Dict[str, Any] = {"pairs": {}, "counts": {}}
    for k in objectives:
        pairs = best_vs_worst(prompts, responses, list(scores[k]), min_margin)
        for p in pairs:
            p["prompt"] = user_turn(p["prompt"])
        result["pairs"][k] = write_jsonl(str(out / f"pairs_{k}.jsonl"), pairs)
        result["counts"][k] = len(pairs)
    if len(objectives) > 1:
        multi = labelled_pairs(prompts, responses, scores, objectives, min_margin)
        result["pairs_multi"] = write_jsonl(str(out / "pairs_multi.jsonl"), multi)
        result["counts"]["multi"] = len(multi)
    candidates = [{"prompt": user_turn(p), "responses": list(rs),
                   "scores": {k: [None if np.isnan(v) else float(v) for v in scores[k][i]] for k in objectives}}
                  for i, (p, rs) in enumerate(zip(prompts, responses))]
    result["candidates"] = write_jsonl(str(out / "candidates.jsonl"), candidates)
    return result


def labelled_pairs(prompts: Sequence[str], responses: Sequence[Sequence[str]], scores: Dict[str, np.ndarray],
                   objectives: Sequence[str], min_margin: float = 0.0) -> List[Dict[str, Any]]:
    """Pairs labelled by every objective: for each prompt, each objective's best vs worst sample,
    as ``response_0``/``response_1`` with ``better_<objective>`` = the index (0/1) of the response
    that objective scores higher. Pairs on which some objective ties (or cannot score), or whose
    picking objective's margin is <= ``min_margin``, are dropped; a pair two objectives both pick is
    kept once. Read it with ``data.response_columns:
    [response_0, response_1]`` and ``data.objective_labels: {k: better_k}``."""
    rows = []
    for i, (prompt, resp) in enumerate(zip(prompts, responses)):
        seen = set()
        for k in objectives:
            sc = np.asarray(scores[k][i], dtype=np.float64)
            if np.isfinite(sc).sum() < 2:
                continue
            hi, lo = int(np.nanargmax(sc)), int(np.nanargmin(sc))
            if (hi, lo) in seen or resp[hi] == resp[lo] or sc[hi] - sc[lo] <= min_margin:
                continue
            seen.add((hi, lo))
            labels = {}
            for j in objectives:
                a, b = scores[j][i][hi], scores[j][i][lo]
                if not (np.isfinite(a) and np.isfinite(b)) or a == b:
                    break
                labels[f"better_{j}"] = 0 if a > b else 1
            else:
                rows.append({"prompt": user_turn(prompt), "response_0": resp[hi],
                             "response_1": resp[lo], **labels})
    return rows


def scalarise(scores: Dict[str, np.ndarray], weights: Optional[Dict[str, float]] = None) -> np.ndarray:
    """One score from several objectives' ``(prompts, m)`` arrays: ``Σ_k w_k z_k`` with each
    objective standardised over all its finite values (so units do not decide the trade-off);
    weights default to equal. One objective: its raw scores. NaN stays NaN."""
    names = list(scores)
    if len(names) == 1:
        return np.asarray(scores[names[0]], dtype=np.float64)
    weights = weights or {k: 1.0 / len(names) for k in names}
    total = np.zeros_like(np.asarray(scores[names[0]], dtype=np.float64))
    for k in names:
        s = np.asarray(scores[k], dtype=np.float64)
        sd = np.nanstd(s)
        total = total + weights.get(k, 0.0) * (s - np.nanmean(s)) / (sd if sd > 0 else 1.0)
    return total


def wrpo_rows(prompts: Sequence[str], target: Sequence[Sequence[str]], source: Sequence[Sequence[str]],
              target_scores: np.ndarray, source_scores: np.ndarray) -> List[Dict[str, Any]]:
    """WRPO rows (§7): per prompt the best source response ``source`` (y_ws), the target's best
    sample ``chosen`` (y_wt) and its worst ``rejected`` (y_l). A prompt is dropped when the target's
    best does not beat its worst, when the source's best does not beat the target's worst, or when
    fewer than two target samples (one source sample) could be scored."""
    rows = []
    for i, prompt in enumerate(prompts):
        t, s = np.asarray(target_scores[i], dtype=np.float64), np.asarray(source_scores[i], dtype=np.float64)
        if np.isfinite(t).sum() < 2 or np.isfinite(s).sum() < 1:
            continue
        hi, lo, src = int(np.nanargmax(t)), int(np.nanargmin(t)), int(np.nanargmax(s))
        if not (t[hi] > t[lo] and s[src] > t[lo]) or target[i][hi] == target[i][lo] or source[i][src] == target[i][lo]:
            continue
        rows.append({"prompt": user_turn(prompt), "chosen": target[i][hi],
                     "rejected": target[i][lo], "source": source[i][src],
                     "scores": {"source": float(s[src]), "chosen": float(t[hi]), "rejected": float(t[lo])}})
    return rows


def make_wrpo_pairs(target: str, sources: Sequence[str], prompts: Sequence[str], objectives: Sequence[str], n: int,
                    out_dir: str, seed: int = 0, weights: Optional[Dict[str, float]] = None,
                    **sampling: Any) -> Dict[str, Any]:
    """``moray pairs --wrpo``: ``n`` samples per prompt from the target and from each source model,
    scored by the objectives (several: :func:`scalarise`d, standardised over all samples of this
    run), written as ``wrpo.jsonl`` (:func:`wrpo_rows`) for ``moray train wrpo``."""
    if not sources:
        raise ValueError("WRPO needs at least one source model")
    out = _output_dir(objectives, n, prompts, out_dir)
    tgt = sample_responses(target, prompts, n, seed=seed, **sampling)
    src = [[] for _ in prompts]
    for j, model in enumerate(sources):
        for i, rs in enumerate(sample_responses(model, prompts, n, seed=seed + 1 + j, **sampling)):
            src[i].extend(rs)
    both = [a + b for a, b in zip(tgt, src)]  # one scoring pass, one standardisation
    scored = scalarise(score_on_placement(objectives, prompts, both, target, sampling.get("placement")), weights)
    rows = wrpo_rows(prompts, tgt, src, scored[:, :n], scored[:, n:])
    path = write_jsonl(str(out / "wrpo.jsonl"), rows)
    return {"wrpo": path, "count": len(rows), "prompts": len(prompts), "sources": list(sources), "target": target}


def write_jsonl(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
