"""Batch scoring on Ray Data: one column per objective added to a file of (prompt, response) rows.

Scorers load once per actor (``map_batches`` with an actor pool); rows keep their order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reward_models.objectives import check_objectives, get_scorer, score_checked
from trainers.core.models import Placement, load_tokenizer
from trainers.core.runtime import init_ray


class ScoreBatch:
    """``map_batches`` callable class: adds ``score_<objective>`` columns (learned reward models on
    ``placement``)."""

    def __init__(self, objectives: Sequence[str], tokenizer_path: Optional[str] = None,
                 placement: Optional[Placement] = None):
        tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
        self.scorers = {k: get_scorer(k, tok, placement) for k in objectives}

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        prompts = [str(p) for p in batch["prompt"]]
        responses = [r if isinstance(r, str) else "" for r in batch["response"]]
        out = dict(batch)
        for k, scorer in self.scorers.items():
            out[f"score_{k}"] = score_checked(k, scorer, prompts, responses)
        return out


class _ScoreActor:
    """A Ray actor holding one :class:`ScoreBatch` on its GPU."""

    def __init__(self, *args):
        self.scorer = ScoreBatch(*args)

    def score(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        return self.scorer(batch)


class Scorers:
    """The objectives' scorers loaded once for a whole command (every policy ``moray eval``
    scores, every sample ``moray pairs`` scores): in this process on a CPU placement, else in one
    Ray actor on the placement's GPU and dtype."""

    def __init__(self, objectives: Sequence[str], tokenizer_path: Optional[str] = None,
                 placement: Optional[Placement] = None):
        placement = placement or Placement()
        self.objectives = list(objectives)
        self.actor, self.local = None, None
        if placement.gpus:
            import ray

            init_ray()  # joins the running Ray (the sampling stages') or starts one on loopback
            self.actor = ray.remote(_ScoreActor).options(**placement.resources()).remote(
                self.objectives, tokenizer_path, placement)
        else:
            self.local = ScoreBatch(self.objectives, tokenizer_path, placement)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Dict[str, np.ndarray]:
        """Each objective's scores of the (prompt, response) rows, checked as :func:`score_checked` checks."""
        batch = {"prompt": np.array(list(prompts), dtype=object), "response": np.array(list(responses), dtype=object)}
        if self.actor is not None:
            import ray

            out = ray.get(self.actor.score.remote(batch))
        else:
            out = self.local(batch)
        return {k: np.asarray(out[f"score_{k}"], dtype=np.float64) for k in self.objectives}

    def close(self) -> None:
        """Free the actor's GPU."""
        if self.actor is not None:
            import ray

            ray.kill(self.actor)
            self.actor = None


def read_rows(path: str):
    """A Ray Dataset of a jsonl or parquet file that has ``prompt`` and ``response`` columns."""
    import ray.data

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
    ds = ray.data.read_parquet(path) if p.suffix == ".parquet" else ray.data.read_json(path, lines=True)
    missing = {"prompt", "response"} - set(ds.schema().names)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (need prompt and response)")
    return ds


def score_file(objectives: Sequence[str], data: str, out: str, tokenizer_path: Optional[str] = None,
               actors: int = 1, batch_size: int = 64, placement: Optional[Placement] = None) -> int:
    """Score every row of ``data`` with each objective and write ``out`` (jsonl or parquet); each
    actor on ``placement`` (CPU fp32 by default)."""
    import ray.data

    check_objectives(objectives)  # before Ray Data starts any actor
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    placement = placement or Placement()
    ds = read_rows(data).map_batches(ScoreBatch, fn_constructor_args=(list(objectives), tokenizer_path, placement),
                                     batch_size=batch_size, batch_format="numpy",
                                     compute=ray.data.ActorPoolStrategy(size=actors), **placement.resources())
    tables: List[pa.Table] = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(tables) if tables else pa.table({})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if out.endswith(".parquet"):
        pq.write_table(table, out)
    else:
        with open(out, "w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row) + "\n")
    return table.num_rows
