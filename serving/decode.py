"""Lock-step decoding of K causal LMs with MPO logit mixing (§3a), batched across requests.

Every model keeps its own KV cache; each step feeds one new token per row to each model and
mixes the K next-token logits with the row's own weights (``serving.mixing.mix_logits``). A model
whose weight is zero in every row of a batch is skipped entirely (``e_k`` costs one model). With
K = 1 this is plain incremental decoding (the soup mode).

Shapes: ``B`` requests, prompts left-padded to ``L``; position ids count real tokens only, so a
padded row decodes exactly like the same prompt alone. Every row is sampled at once on the
models' device (its own temperature, top-k, top-p and seeded generator); the tokens cross to the
host once per step, for the text streams. A finished row leaves the batch and its KV caches
(:func:`roomy_cache`: written in place), and so do leading positions that only
pad the rows left.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from serving.mixing import mix_logits
from trainers.core.prompts import left_pad


@dataclass
class Sampling:
    """Per-request decoding parameters (validated by the caller)."""

    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off; else sample among the k most likely tokens (before top_p, as HF generate)
    seed: Optional[int] = None
    ignore_eos: bool = False  # decode max_tokens tokens whatever comes (benchmarks; vLLM has the same flag)


@dataclass
class Row:
    prompt_ids: List[int]
    weights: Sequence[float]  # one per model
    sampling: Sampling = field(default_factory=Sampling)


def row_probs(logits: torch.Tensor, samplings: Sequence[Sampling]) -> torch.Tensor:
    """The next token's distribution for every row of ``logits (B, V)`` at once, each row with its
    own temperature, then top-k, then top-p on what top-k kept (the order of HF ``generate``'s
    warpers), on the logits' device (no host round trip). float64 ``(B, V)``;
    rows at temperature 0 are computed at temperature 1 (their token is the argmax anyway)."""
    B, V = logits.shape
    dev = logits.device
    temp = torch.tensor([x.temperature or 1.0 for x in samplings], dtype=torch.float64, device=dev)
    scores = logits.double() / temp[:, None]
    on = [0 < x.top_k < V for x in samplings]
    kmax = max((x.top_k for x, o in zip(samplings, on) if o), default=V)
    if any(on):  # the k-th largest score by topk: a sort of the whole vocabulary costs ~40x more on a CPU
        k = torch.tensor([x.top_k if o else 1 for x, o in zip(samplings, on)], device=dev)
        kth = torch.topk(scores, kmax, dim=-1).values.gather(1, (k - 1)[:, None])
        kth = kth.masked_fill(~torch.tensor(on, device=dev)[:, None], float("-inf"))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if any(x.top_p < 1.0 for x in samplings):
        top_p = torch.tensor([x.top_p for x in samplings], dtype=torch.float64, device=dev)
        n = int((probs > 0).sum(-1).max())  # sorting the tokens top-k left is enough (ties included)
        sorted_p, order = torch.topk(probs, n, dim=-1)
        keep = (torch.cumsum(sorted_p, -1) - sorted_p < top_p[:, None]) | (top_p[:, None] >= 1.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_rows(logits: torch.Tensor, samplings: Sequence[Sampling], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits (B, V)``, on their device: the argmax at temperature 0, else an
    inverse-CDF draw from :func:`row_probs` with one uniform from the row's own generator (the
    same seed gives the same tokens whatever else shares the batch)."""
    argmax = torch.argmax(logits, dim=-1)
    if all(x.temperature == 0 for x in samplings):
        return argmax
    greedy = torch.tensor([x.temperature == 0 for x in samplings], device=logits.device)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=g) for g in generators]).to(logits.device)
    cdf = torch.cumsum(row_probs(logits, samplings), dim=-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp_(max=logits.shape[1] - 1)
    return torch.where(greedy, argmax, drawn)


GROW_MIN = 256  # positions a full KV buffer grows by, at least


@functools.lru_cache(maxsize=None)
def roomy_cache() -> type:
    """The decoder's KV cache class, built on first use (transformers loads with the models).

    ``DynamicCache`` concatenates each step's keys and values onto the whole cache, so a step copies
    ``B x T`` positions of every layer (at 64 rows and 1,024 positions, most of a CPU step). Here each
    layer keeps them in a buffer with room to grow (by a quarter, at least ``GROW_MIN`` positions):
    a step writes in place and the model sees a view of the positions written. ``trim_left`` drops
    leading positions no row attends to without a copy."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    class RoomyLayer(DynamicLayer):
        """One layer's keys and values ``(B, H, T, D)``: views of the first ``T`` positions of a buffer."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._n = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self._n, key_states.shape[-2]
            if self._k is None or n + t > self._k.shape[-2]:
                cap = n + t + max(GROW_MIN, (n + t) // 4)
                k = key_states.new_empty(key_states.shape[:2] + (cap, key_states.shape[-1]))
                v = value_states.new_empty(value_states.shape[:2] + (cap, value_states.shape[-1]))
                if n:
                    k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
                self._k, self._v = k, v
            self._k[:, :, n:n + t] = key_states
            self._v[:, :, n:n + t] = value_states
            self._n = n + t
            self._views()
            return self.keys, self.values

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized and self._n:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def trim_left(self, positions: int) -> None:
            """Drop the first ``positions`` positions (the buffer keeps its storage; no copy)."""
            if self.is_initialized and self._n and positions:
                self._k, self._v = self._k[:, :, positions:], self._v[:, :, positions:]
                self._n -= positions
                self._views()

        def place(self, rows: torch.Tensor, new: "RoomyLayer") -> None:
            """Write ``new``'s positions into the last positions of batch rows ``rows`` (in place)."""
            if self.is_initialized and self._n and new.is_initialized and new.keys.numel():
                t = new.keys.shape[-2]
                self._k[rows, :, self._n - t:self._n] = new.keys.to(self._k.device)
                self._v[rows, :, self._n - t:self._n] = new.values.to(self._v.device)
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            if self.is_initialized and tokens_to_remove:
                self._n = self.keys.shape[-2]

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx.to(self.keys.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized and self._n:
                self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
                self._views()

    class RoomyCache(DynamicCache):
        """A ``DynamicCache`` whose layers are :class:`RoomyLayer`: the same keys and values, written in place."""

        def __init__(self):
            Cache.__init__(self, layer_class_to_replicate=RoomyLayer)

        def trim_left(self, positions: int) -> None:
            """Drop the first ``positions`` positions of every layer (columns of left padding)."""
            for layer in self.layers:
                layer.trim_left(positions)

        def place(self, rows: torch.Tensor, new: "RoomyCache") -> None:
            """Write ``new``'s keys and values into the last positions of batch rows ``rows``."""
            for layer, other in zip(self.layers, new.layers):
                layer.place(rows, other)

    return RoomyCache


def cache_device(cache, fallback: torch.Tensor) -> torch.device:
    """The device of a KV cache's tensors (a policy's GPU), where its row index must be."""
    layers = getattr(cache, "layers", None) or []
    keys = getattr(layers[0], "keys", None) if layers else None
    return keys.device if isinstance(keys, torch.Tensor) else fallback.device


@functools.lru_cache(maxsize=None)
def cache_argument(model_class: type) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` where it has one (transformers
    deprecates ``past_key_values`` for it and removes it in 5.40), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class LockstepDecoder:
    """Decode a batch of rows through ``models`` (one tokenizer, one vocabulary)."""

    def __init__(self, models: Sequence[torch.nn.Module], pad_id: int, eos_ids: Sequence[int], device: str = "cpu",
                 on_rows: Optional[Callable[[List[int]], Optional[Sequence[torch.nn.Module]]]] = None):
        """``on_rows(live)``: told the rows in the batch (their indices in ``rows``) before the first
        forward, before joining rows are prefilled and whenever rows leave (a per-row soup selects
        their weight vectors); it returns the models to run from then on -- their keys and values
        must match the ones they replace, as the KV caches carry over -- or None to keep them."""
        self.models, self.pad_id, self.eos = list(models), pad_id, set(eos_ids)
        self.device = torch.device(device)
        self.on_rows = on_rows

    def _forwards(self, active: Sequence[int], ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                  caches) -> torch.Tensor:
        """The active models' next-token logits ``(K, B, V)`` in fp32 on the decoder's device.

        Policies may live on different GPUs: the inputs are copied to every model's device before
        any forward is launched, and no result is read before every forward is launched, so the K
        forwards run side by side (a copy queued behind policy 0's forward would hold policy 1's
        GPU idle until policy 0 finished)."""
        devices = [self.models[k].get_input_embeddings().weight.device for k in active]
        moved = {d: (ids.to(d), mask.to(d), pos.to(d)) for d in dict.fromkeys(devices)}
        outs = [self.models[k](input_ids=moved[d][0], attention_mask=moved[d][1], position_ids=moved[d][2],
                               use_cache=True, logits_to_keep=1,
                               **{cache_argument(type(self.models[k])): caches[k]}).logits
                for k, d in zip(active, devices)]
        return torch.stack([o[:, -1].to(self.device, torch.float32) for o in outs])

    @torch.no_grad()
    def generate(self, rows: Sequence[Row], on_token: Optional[Callable[[int, int], bool]] = None,
                 more: Optional[Callable[[int], Sequence[Row]]] = None,
                 on_finish: Optional[Callable[[int], None]] = None) -> List[List[int]]:
        """Token ids generated for each row (its EOS included when it stopped on one).

        ``on_token(row, token)`` is called for every new token; returning True finishes that row
        (a stop string, a cancelled request); ``on_finish(row)`` when a row is done. ``more(n)``,
        asked after every step while rows decode, returns rows that join the batch (numbered after
        the ones so far): they are prefilled and decode from the next step on, in the same
        forwards (continuous batching; every model then runs, as a joining row may need it).
        """
        new_cache = roomy_cache()
        rows = list(rows)
        weights = [list(r.weights) for r in rows]  # on the host: mixing's checks need no device sync
        if any(len(w) != len(self.models) for w in weights):
            raise ValueError(f"{len(weights[0])} weights per row for {len(self.models)} models")
        active = list(range(len(self.models))) if more is not None else \
            [k for k in range(len(self.models)) if any(w[k] != 0 for w in weights)]
        ids, mask = left_pad([r.prompt_ids for r in rows], self.pad_id)
        mask = mask.to(self.device)
        step_ids, step_pos = ids.to(self.device), (mask.cumsum(1) - 1).clamp(min=0)
        caches = {k: new_cache() for k in active}
        gens = [_generator(r) for r in rows]
        out: List[List[int]] = [[] for _ in rows]
        live = list(range(len(rows)))  # rows still decoding; finished rows leave the batch and its caches
        self._rows_changed(live)
        while live:
            logits = self._forwards(active, step_ids, mask, step_pos, caches)
            mixed = mix_logits(logits, torch.tensor([[weights[i][k] for k in active] for i in live]))
            sampled = sample_rows(mixed, [rows[i].sampling for i in live], [gens[i] for i in live])
            tokens = sampled.tolist()  # the step's one copy to the host (the text streams need the tokens)
            keep = []
            for j, (i, tok) in enumerate(zip(live, tokens)):
                r = rows[i]
                out[i].append(tok)
                stop = on_token(i, tok) if on_token else False
                if stop or (tok in self.eos and not r.sampling.ignore_eos) or len(out[i]) >= r.sampling.max_tokens:
                    if on_finish is not None:
                        on_finish(i)
                else:
                    keep.append(j)
            step_ids = sampled[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=self.device)], dim=1)
            kept_now = set(keep)
            gone = [j for j in range(len(live)) if j not in kept_now]
            joining = list(more(len(keep))) if more is not None else []
            if joining:
                first = len(rows)
                rows += joining
                weights += [list(r.weights) for r in joining]
                gens += [_generator(r) for r in joining]
                out += [[] for _ in joining]
            taken = gone[:len(joining)] if joining and gone and self._fits(joining[:len(gone)], mask) else []
            if taken:  # joining rows take finished rows' places: no copy of the running caches
                step_ids, step_pos = self._replace(joining[:len(taken)], first, taken, active, caches, mask, step_ids,
                                                   step_pos)
                live = [first + taken.index(j) if j in taken else i for j, i in enumerate(live)]
            kept = sorted(keep + taken)
            if len(kept) < len(live):
                index = torch.tensor(kept, dtype=torch.long, device=self.device)
                for cache in caches.values():
                    cache.batch_select_indices(index.to(cache_device(cache, index)))
                step_ids, mask, step_pos = step_ids[index], mask[index], step_pos[index]
                live = [live[j] for j in kept]
            if live and (taken or len(kept) < len(tokens)):  # positions every row pads: attention would skip them
                lead = int(torch.argmax(mask.any(0).to(torch.int8)))
                if lead:
                    mask = mask[:, lead:]
                    for cache in caches.values():
                        cache.trim_left(lead)
            rest = joining[len(taken):]
            if rest:
                start = first + len(taken)
                caches, mask, step_ids, step_pos = self._join(rest, start, active, caches, mask, step_ids, step_pos)
                live += list(range(start, len(rows)))
            if live and (joining or len(kept) < len(tokens)):
                self._rows_changed(live)
        return out

    def _rows_changed(self, live: List[int]) -> None:
        models = self.on_rows(live) if self.on_rows is not None else None
        if models is not None:
            self.models = list(models)

    @staticmethod
    def _fits(rows: Sequence[Row], mask: torch.Tensor) -> bool:
        """Whether every prompt but its last token fits in the running caches' positions."""
        return max(len(r.prompt_ids) - 1 for r in rows) <= mask.shape[1] - 1

    def _prefill(self, rows: Sequence[Row], first: int, active: Sequence[int]):
        """The joining rows' prompts but their last tokens, left-padded, through the active models:
        ``(new caches, their mask, the heads)``; the caches are empty for one-token prompts."""
        heads = [r.prompt_ids[:-1] for r in rows]
        ids, new_mask = left_pad(heads, self.pad_id)
        new_mask = new_mask.to(self.device)
        new_caches = {k: roomy_cache()() for k in active}
        if ids.shape[1]:
            self._rows_changed(list(range(first, first + len(rows))))  # the prefill's rows: the joining ones
            pos = (new_mask.cumsum(1) - 1).clamp(min=0)
            self._forwards(active, ids.to(self.device), new_mask, pos, new_caches)
        return new_caches, new_mask, heads

    def _replace(self, rows: Sequence[Row], first: int, slots: Sequence[int], active: Sequence[int], caches, mask,
                 step_ids, step_pos):
        """Joining rows written into the places of finished rows (``slots``, batch positions): each
        one's prefilled keys and values fill the last positions of its place and the mask hides the
        rest. ``mask`` is updated in place; returns the new ``(step_ids, step_pos)``."""
        new_caches, new_mask, heads = self._prefill(rows, first, active)
        T, Ln = mask.shape[1] - 1, new_mask.shape[1]
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        if Ln:
            for k in active:
                caches[k].place(index.to(cache_device(caches[k], index)), new_caches[k])
        mask[index] = 0
        mask[index, T - Ln:T] = new_mask.to(mask.dtype)
        mask[index, T] = 1
        step_ids, step_pos = step_ids.clone(), step_pos.clone()
        step_ids[index, 0] = torch.tensor([r.prompt_ids[-1] for r in rows], dtype=step_ids.dtype, device=self.device)
        step_pos[index, 0] = torch.tensor([len(h) for h in heads], dtype=step_pos.dtype, device=self.device)
        return step_ids, step_pos

    def _join(self, rows: Sequence[Row], first: int, active: Sequence[int], caches, mask, step_ids, step_pos):
        """Rows joining a running batch: each prompt but its last token is prefilled into new KV
        caches; both sides are left-padded to one length and stacked. The last prompt token is the
        joining row's input at the next step, so its first token comes from the common forward."""
        n = len(rows)
        new_caches, new_mask, heads = self._prefill(rows, first, active)
        Ln = new_mask.shape[1]
        T = max(mask.shape[1] - 1, Ln)  # cache length both sides are padded to
        joined = {k: _stack_caches(caches[k], new_caches[k], n, T) for k in active}
        ones = torch.ones((n, 1), dtype=mask.dtype, device=self.device)
        mask = torch.cat([_pad_left(mask, T + 1), _pad_left(torch.cat([new_mask, ones], 1), T + 1)])
        last = torch.tensor([[r.prompt_ids[-1]] for r in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[len(h)] for h in heads], dtype=step_pos.dtype, device=self.device)
        return joined, mask, torch.cat([step_ids, last]), torch.cat([step_pos, pos])


def _generator(row: Row) -> torch.Generator:
    """The row's own sampling stream: its seed, or a fresh random one."""
    seed = row.sampling.seed if row.sampling.seed is not None else int(torch.randint(2**62, (1,)))
    return torch.Generator().manual_seed(seed)


def _pad_left(t: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """``t`` zero-padded on the left of ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _stack_caches(running, new, n_new: int, length: int):
    """One KV cache of the running rows and ``n_new`` joining rows, every layer's keys and values
    ``(B, H, T, D)`` left-padded to ``length`` (the padding is masked out)."""
    out = roomy_cache()()
    for i, layer in enumerate(running.layers):
        k, v = layer.keys, layer.values
        if new.layers and i < len(new.layers) and new.layers[i].keys is not None and new.layers[i].keys.numel():
            nk, nv = new.layers[i].keys.to(k.device), new.layers[i].values.to(v.device)
        else:  # one-token prompts: nothing to prefill
            nk = k.new_zeros((n_new, k.shape[1], 0, k.shape[3]))
            nv = v.new_zeros((n_new, v.shape[1], 0, v.shape[3]))
        out.update(torch.cat([_pad_left(k, length, 2), _pad_left(nk, length, 2)]),
                   torch.cat([_pad_left(v, length, 2), _pad_left(nv, length, 2)]), i)
    return out
