"""Micro-batches of preference rows: padding every response of a row into one concatenated batch,
their sequence log-probs in one forward, and grouping rows by length.

Shapes: a batch of ``B`` pairs becomes ``input_ids``, ``attention_mask`` and ``response_mask``
of shape ``(2B, T)`` -- rows ``0..B-1`` chosen, ``B..2B-1`` rejected -- so chosen and rejected go
through the model in one forward. Rows with more responses per prompt (WRPO's ``source``, MOPO's
candidates ``cand_0..cand_{n-1}``) stack the same way: ``R`` responses give ``(R·B, T)``, response
``r`` of prompt ``b`` at row ``r·B + b`` (order: :func:`response_names`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch

from trainers.core.logps import head_logits, logits_needed, pad_sequences, response_logits, sequence_logps


def response_names(columns: Iterable[str]) -> List[str]:
    """The responses a row holds, in batch order: ``chosen``, ``rejected``, ``source`` (those present),
    then ``cand_0, cand_1, …``. ``columns``: text columns, or tokenized ones (``<name>_ids``)."""
    names = {c[:-4] if c.endswith("_ids") else c for c in columns}
    fixed = [k for k in ("chosen", "rejected", "source") if k in names]
    return fixed + sorted((k for k in names if re.fullmatch(r"cand_\d+", k)), key=lambda k: int(k[5:]))


def _sequences(rows: Dict[str, Sequence[Any]], index: Sequence[int] | None):
    """Every response sequence of the rows ``index`` in batch order (response ``r`` of row ``b`` at
    ``r·B + b``), their response starts, the response names and the index."""
    names = response_names(k for k in rows if k.endswith("_ids"))
    index = range(len(rows[f"{names[0]}_ids"])) if index is None else index
    seqs = [rows[f"{n}_ids"][i] for n in names for i in index]
    starts = [int(rows[f"{n}_start"][i]) for n in names for i in index]
    return seqs, starts, tuple(names), index


RIDER_PREFIXES = ("sign_", "winrate_")  # per-row labels that ride along from the data to the batch


def rides_along(column: str) -> bool:
    """Whether a float column rides along with the token ids: ``sign_<objective>``: ``(B,)``,
    ``winrate_<objective>``: ``(B, n)`` (from the data), ``ref_<name>_logps`` (from the reference pass)."""
    return column.startswith(RIDER_PREFIXES) or (column.startswith("ref_") and column.endswith("_logps"))


def _riders(rows: Dict[str, Sequence[Any]], index: Sequence[int]) -> Dict[str, torch.Tensor]:
    """What rides along with the token ids: ``idx``, and the columns of :func:`rides_along` in float64."""
    out = {}
    if "idx" in rows:
        out["idx"] = torch.as_tensor(np.asarray([rows["idx"][i] for i in index], dtype=np.int64))
    for k in rows:
        if rides_along(k):
            out[k] = torch.as_tensor(np.asarray([np.asarray(rows[k][i], dtype=np.float64) for i in index]))
    return out


def pad_pairs(rows: Dict[str, Sequence[Any]], pad_id: int, index: Sequence[int] | None = None) -> Dict[str, Any]:
    """Right-pad the rows ``rows[...][index]`` into one ``(R·B, T)`` batch (T = longest sequence,
    R responses each: 2 for pairs), with the columns that ride along (:func:`_riders`);
    ``logits_to_keep`` is :func:`logits_needed` of the batch, an int; ``responses`` the names."""
    seqs, starts, names, index = _sequences(rows, index)
    out: Dict[str, Any] = pad_sequences(seqs, starts, pad_id)
    out["logits_to_keep"] = logits_needed(out["response_mask"])  # here, on the host: no device sync later
    out["responses"] = names
    return {**out, **_riders(rows, index)}


# Attention kernels a config may name ('' is transformers' default, SDPA) -> whether packing needs ONE row:
# transformers 5 reads restarting position_ids as separate sequences under flash attention only when the
# batch has one row (modeling_flash_attention_utils._is_packed_sequence); with more rows its flash path
# ignores them and packed sequences attend to each other. SDPA and eager build a block-diagonal mask
# from position_ids at any number of rows (masking_utils.find_packed_sequence_indices).
ATTENTION_ONE_ROW = {"": False, "sdpa": False, "eager": False, "flash_attention_2": True, "flash_attention_3": True}


def packs_one_row(attn_implementation: str) -> bool:
    """Whether :func:`pack_pairs` must put every sequence in one row for this attention kernel."""
    if attn_implementation not in ATTENTION_ONE_ROW:
        raise ValueError(f"unknown attention implementation {attn_implementation!r}: one of "
                         f"{', '.join(repr(k) for k in ATTENTION_ONE_ROW)}")
    return ATTENTION_ONE_ROW[attn_implementation]


def pack_pairs(rows: Dict[str, Sequence[Any]], pad_id: int, index: Sequence[int] | None = None,
               one_row: bool = False) -> Dict[str, Any]:
    """Every response sequence of the rows packed without padding: first-fit decreasing into rows
    as long as the longest sequence (``one_row``: all in one row, as flash attention needs, see
    :data:`ATTENTION_ONE_ROW`), each sequence's ``position_ids`` counting from 0, so that
    transformers attends within each sequence only (a block-diagonal causal mask with SDPA and
    eager attention, varlen kernels with flash attention). Padding is only what no sequence fits.

    Returns ``input_ids`` / ``position_ids`` / ``attention_mask`` ``(P, C)`` (the mask marks real
    tokens, for counting; it is not passed to the model), and for the log-probs the flat indices of
    the positions that predict a response token (``pred_index (M,)``), the tokens they predict
    (``pred_labels``) and the sequence each belongs to (``pred_owner``, in :func:`pad_pairs`' row
    order), ``sequences`` (their number), ``responses`` and the riders of :func:`pad_pairs`."""
    seqs, starts, names, index = _sequences(rows, index)
    lengths = [len(s) for s in seqs]
    capacity = sum(lengths) if one_row else max(lengths)
    room: List[int] = []  # free tokens per packed row
    place: List[Tuple[int, int]] = [(0, 0)] * len(seqs)  # (row, offset) of each sequence
    for s in sorted(range(len(seqs)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[s]), len(room))
        if r == len(room):
            room.append(capacity)
        place[s] = (r, capacity - room[r])
        room[r] -= lengths[s]
    input_ids = np.full((len(room), capacity), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(room), capacity), dtype=np.int64)
    mask = np.zeros((len(room), capacity), dtype=np.int64)
    for r, free in enumerate(room):  # what is left of a row is one more sequence: it attends only to itself
        position_ids[r, capacity - free:] = np.arange(free)
    pred_index, pred_labels, pred_owner = [], [], []
    for s, (seq, start) in enumerate(zip(seqs, starts)):
        r, o = place[s]
        n = lengths[s]
        input_ids[r, o:o + n] = np.asarray(seq, dtype=np.int64)
        position_ids[r, o:o + n] = np.arange(n)
        mask[r, o:o + n] = 1
        pred_index.append(r * capacity + o + np.arange(start - 1, n - 1))  # position t predicts token t+1
        pred_labels.append(np.asarray(seq[start:n], dtype=np.int64))
        pred_owner.append(np.full(n - start, s, dtype=np.int64))
    out: Dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(position_ids),
        "attention_mask": torch.from_numpy(mask), "pred_index": torch.from_numpy(np.concatenate(pred_index)),
        "pred_labels": torch.from_numpy(np.concatenate(pred_labels)),
        "pred_owner": torch.from_numpy(np.concatenate(pred_owner)), "sequences": len(seqs), "responses": names}
    return {**out, **_riders(rows, index)}


def batch_logits_to_keep(batch: Dict[str, Any]) -> int:
    """The batch's ``logits_to_keep`` as :func:`pad_pairs` computed it (else from its mask)."""
    keep = batch.get("logits_to_keep")
    return int(keep) if isinstance(keep, int) else logits_needed(batch["response_mask"])


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The batch's tensors on ``device`` (other entries as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pair_logps(model: torch.nn.Module, batch: Dict[str, Any], responses: int = 2) -> Tuple[torch.Tensor, ...]:
    """One forward over every response of the batch; returns one ``(B,)`` tensor per response
    (pairs: ``(chosen_logps, rejected_logps)``; ``responses``: R of :func:`pad_pairs`).

    The LM head runs in float32 (:func:`~trainers.core.logps.head_logits`): in a padded batch on the
    last ``logits_to_keep`` positions only, so prompt positions never reach it; in a packed one
    (:func:`pack_pairs`) on the predicting positions only.
    """
    if "pred_index" in batch:
        logps = packed_logps(model, batch)
    else:
        keep = batch_logits_to_keep(batch)
        logits, _ = response_logits(model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logps = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    return tuple(logps.view(responses, -1))


def packed_logps(model: torch.nn.Module, batch: Dict[str, Any]) -> torch.Tensor:
    """Sequence log-probs ``(S,)`` of a packed batch (:func:`pack_pairs`): one forward for the final
    hidden states (its own logits only at the last position), the LM head in float32 (float64 for a
    float64 model) on the ``M`` positions that predict a response token, their log-softmax, and a sum
    per sequence."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1].flatten(0, 1)[batch["pred_index"]]  # (M, H)
    logits = head_logits(model, hidden)  # (M, V)
    token = logits.gather(1, batch["pred_labels"][:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return token.new_zeros(batch["sequences"]).index_add(0, batch["pred_owner"], token)


def length_buckets(rows: Dict[str, Sequence[Any]], batch_size: int, seed: Sequence[int], shuffle: bool = True) -> List[np.ndarray]:
    """Cut a window of pairs into batches of similar length (less padding).

    Sort by the longest of each row's sequences, cut into ``batch_size`` chunks, then shuffle
    the chunk order with ``np.random.default_rng(seed)`` -- deterministic for a seed, so a resumed
    run sees the same batches.
    """
    cols = [rows[k] for k in rows if k.endswith("_ids")]  # every sequence of the row (online GAPO: its prompt)
    n = len(cols[0])
    lengths = np.array([max(len(c[i]) for c in cols) for i in range(n)])
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if shuffle:
        perm = np.random.default_rng(list(seed)).permutation(len(chunks))
        chunks = [chunks[i] for i in perm]
    return chunks


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
