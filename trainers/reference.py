"""Reference log-probs, computed once per pair by the frozen reference model.

A Ray Data pass (``map_batches`` on an actor pool: the model loads once per actor) adds
``ref_<name>_logps`` for every response of a tokenized row (``ref_chosen_logps`` and
``ref_rejected_logps`` for a pair; WRPO adds ``ref_source_logps``), under ``no_grad``.
Training then never runs the reference again -- not per step, not per epoch, not on resume.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

from trainers.batches import length_buckets, pad_pairs, pair_logps, response_names, to_device
from trainers.core.models import load_causal_lm


class ReferenceLogps:
    """``map_batches`` callable class: tokenized pairs -> the same rows plus reference log-probs."""

    def __init__(self, model_path: str, pad_id: int, micro_batch_size: int = 8, threads: int = 1,
                 trust_remote_code: bool = False, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_causal_lm(model_path, trust_remote_code, dtype=dtype).to(self.device).eval()
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def __call__(self, rows: Dict[str, np.ndarray]) -> Dict[str, Any]:
        n = len(rows["idx"])
        names = response_names(k for k in rows if k.endswith("_ids"))
        out = {name: np.zeros(n, dtype=np.float64) for name in names}
        for index in length_buckets(rows, self.micro_batch_size, seed=(0,), shuffle=False):
            batch = to_device(pad_pairs(rows, self.pad_id, index), self.device)
            for name, lp in zip(names, pair_logps(self.model, batch, len(names))):
                out[name][index] = lp.double().cpu().numpy()
        return {**rows, **{f"ref_{name}_logps": v for name, v in out.items()}}
