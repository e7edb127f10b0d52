"""Datasets rated per attribute -> per-objective preference pairs.

Two published layouts: every row holds a prompt and a list of rated responses (UltraFeedback:
``completions[*].response`` with ``completions[*].annotations.<aspect>.Rating``), or every row is
one rated response and the rows of a prompt are grouped (HelpSteer2: ``prompt``, ``response``,
``helpfulness``, ``correctness``, ...). The user names the objectives and says where each one's
rating sits; the result is what ``moray pairs`` writes from sampled responses
(:func:`reward_models.pairs.write_pair_files`): best vs worst per objective, pairs labelled by
every objective for GAPO, and candidates for MOPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from reward_models.pairs import write_pair_files
from trainers.data import LoadReport, PreferenceDataError, field_problem, read_source, settle_problems


@dataclass
class RatingsMapping:
    """Where a rated dataset keeps its prompts, responses and ratings."""

    ratings: Dict[str, str]  # objective (the user's name) -> its rating: a dotted path in a response entry, or a column
    prompt: str = "prompt"  # the prompt's column
    responses: str = ""  # column holding the list of rated responses; empty: one row per response, grouped by prompt
    response: str = "response"  # the response text: a field of each entry, or a column


def dig(entry: Any, path: str) -> Any:
    """``entry[a][b]...`` for the dotted ``path`` ``a.b...``; None where a step is missing."""
    for part in path.split("."):
        if not isinstance(entry, dict) or part not in entry:
            return None
        entry = entry[part]
    return entry


def rating(v: Any) -> float:
    """A rating as a number (published ones are often strings such as "4"); NaN for "N/A", missing
    or not a number."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _rated(entry: Dict[str, Any], m: RatingsMapping) -> Tuple[Optional[str], Dict[str, float]]:
    return dig(entry, m.response), {k: rating(dig(entry, path)) for k, path in m.ratings.items()}


def read_ratings(path: str, m: RatingsMapping, fmt: str = "auto", split: str = "train", skip_invalid: bool = False
                 ) -> Tuple[List[str], List[List[str]], Dict[str, List[np.ndarray]], LoadReport]:
    """Prompts (in order of first appearance), each prompt's responses, and ``scores[k][i]`` (the
    ratings of prompt ``i``'s responses by objective ``k``, NaN where unrated). A row with no
    prompt, no responses or an empty response is named by file and row (or skipped and counted)."""
    if not m.ratings:
        raise PreferenceDataError("name at least one objective and where its rating is (objective=path)")
    report = LoadReport()
    grouped: Dict[str, Tuple[List[str], Dict[str, List[float]]]] = {}
    for src in read_source(path, fmt, split):
        for i, row in enumerate(src.rows):
            report.total += 1
            problem = field_problem(row.get(m.prompt)) if "__not_an_object__" not in row else "not a JSON object"
            problem = problem and f"{m.prompt} {problem}"
            entries = [row] if not m.responses else row.get(m.responses)
            if not problem and (not isinstance(entries, list) or not entries
                                or not all(isinstance(e, dict) for e in entries)):
                problem = f"{m.responses} is not a list of rated responses"
            rated = [] if problem else [_rated(e, m) for e in entries]
            if not problem and any(not isinstance(r, str) or not r.strip() for r, _ in rated):
                problem = f"{m.response} missing or empty"
            if problem:
                report.problems.setdefault(f"{src.name}: {problem}", []).append(i)
                continue
            responses, scores = grouped.setdefault(row[m.prompt], ([], {k: [] for k in m.ratings}))
            for text, by in rated:
                responses.append(text)
                for k, v in by.items():
                    scores[k].append(v)
    if report.total == 0:
        raise PreferenceDataError(f"{path}: no rows")
    report.skipped = settle_problems(report, skip_invalid, "rated")
    report.kept = report.total - report.skipped
    if not grouped:
        raise PreferenceDataError(f"{path}: every row was invalid")
    for k, where in m.ratings.items():
        if not any(np.isfinite(np.asarray(sc[k], dtype=np.float64)).any() for _, sc in grouped.values()):
            raise PreferenceDataError(f"{path}: no response has a number at {where!r} (objective {k!r})")
    prompts = list(grouped)
    return (prompts, [grouped[p][0] for p in prompts],
            {k: [np.asarray(grouped[p][1][k], dtype=np.float64) for p in prompts] for k in m.ratings}, report)


def pairs_from_ratings(path: str, m: RatingsMapping, out_dir: str, min_margin: float = 0.0, fmt: str = "auto",
                       split: str = "train", skip_invalid: bool = False) -> Dict[str, Any]:
    """``moray pairs --from-ratings``: :func:`read_ratings`, then per objective the best-rated
    response against the worst (ties and margins <= ``min_margin`` dropped) in
    ``pairs_<objective>.jsonl``, ``pairs_multi.jsonl`` (several objectives) and
    ``candidates.jsonl``, as ``moray pairs`` writes them."""
    prompts, responses, scores, report = read_ratings(path, m, fmt, split, skip_invalid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = write_pair_files(out, prompts, responses, scores, list(m.ratings), min_margin)
    made.update(prompts=len(prompts), rows=report.total, skipped_invalid=report.skipped)
    return made
