"""Reference log-probs, computed once per row by the policy itself before its first step, inside
the training workers (docs/algorithms.md §1): until it is updated the policy *is* the reference, so
no second model is loaded anywhere, the reference is sharded like the policy (ZeRO-3 included) and
runs in the training dtype. Each worker passes over its own rows in epoch 0's order and batches,
so the first step's log-ratios are exactly 0.

A worker's table (row id -> one log-prob per response, float64) is saved with every checkpoint: a
resumed run cannot recompute it, its policy has moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List

import numpy as np
import torch

from trainers.batches import pair_logps, to_device


class ReferenceTable:
    """One worker's reference log-probs of its rows."""

    def __init__(self, idx: np.ndarray, values: np.ndarray, names: List[str]):
        self.names = list(names)
        self.rows = {int(i): r for r, i in enumerate(idx)}
        self.values = values  # (rows, responses) float64

    @classmethod
    @torch.no_grad()
    def compute(cls, module: torch.nn.Module, batches: Iterable[Dict[str, Any]], device: torch.device) -> "ReferenceTable":
        """One pass of ``module`` (eval mode, no grad) over ``batches``; the log-probs stay on the
        device until the pass ends (one copy to the host)."""
        was_training = module.training
        module.eval()
        idx, values, names = [], [], None
        for batch in batches:
            names = list(batch["responses"])
            b = to_device(batch, device)
            values.append(torch.stack(pair_logps(module, b, len(names)), 1).double())
            idx.append(batch["idx"])
        module.train(was_training)
        if names is None:
            raise RuntimeError("no rows to compute reference log-probs on")
        return cls(torch.cat(idx).numpy(), torch.cat(values).cpu().numpy(), names)

    def attach(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """``batch`` with ``ref_<name>_logps`` ``(B,)`` float64 for each of its rows."""
        rows = [self.rows[int(i)] for i in batch["idx"]]
        values = torch.from_numpy(self.values[rows])
        return {**batch, **{f"ref_{n}_logps": values[:, j] for j, n in enumerate(self.names)}}

    def save(self, directory: str, rank: int) -> None:
        idx = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
        np.savez(Path(directory) / f"reference_rank{rank}.npz", idx=idx, values=self.values,
                 names=np.asarray(self.names))

    @classmethod
    def load(cls, directory: str, rank: int) -> "ReferenceTable | None":
        path = Path(directory) / f"reference_rank{rank}.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:  # arrays only: never a pickle
            return cls(f["idx"], f["values"], [str(n) for n in f["names"]])
