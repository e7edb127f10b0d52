"""The generation engine inside one Serve replica: K policies, a soup cache and a batching thread.

Requests arrive from the async HTTP handlers through :meth:`MixEngine.submit` and are decoded on
one background thread (torch work never blocks the event loop, and two requests never fight for
the replica's cores). Requests of one mixing mode batch together, each row with its own weights
(soup mode: a merged model for a hot shared vector, else the per-row soup), and requests that
arrive while a batch decodes join it at the next step. Text goes back as events through the
``emit`` callback the handler gave; a request is answered when its own row ends.
"""

from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from serving.api import Parsed
from serving.config import ServeConfig
from serving.decode import LockstepDecoder, Row
from serving.mixing import MIXING_MODES, soup_tensor
from serving.rowsoup import LoraRowSoup, RowSoup
from trainers.core.export import ADAPTER_DIR, load_lora_factors
from trainers.core.models import Placement, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


class TextStream:
    """Incremental detokenisation: the new text after each token, cut at the first stop string.

    Text that might be the beginning of a stop string, or an incomplete UTF-8 character, is held
    back until the next token decides it.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tok, self.stop = tokenizer, list(stop)
        self.ids: List[int] = []
        self.emitted = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._text()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(text[: min(hits)])
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._advance(text[: len(text) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._advance(self._text())

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.emitted) or len(upto) <= len(self.emitted):
            return ""
        delta, self.emitted = upto[len(self.emitted):], upto
        return delta


@dataclass
class Request:
    """One HTTP request inside the engine: its parsed body, where its output goes, its batch key."""

    parsed: Parsed
    emit: Callable[[Dict[str, Any]], None]  # thread-safe; called from the engine thread
    key: Tuple = ()
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class SoupCache:
    """Merged models for hot weight vectors, least recently used evicted. A batch whose vector is
    not cached decodes as a per-row soup (:class:`~serving.rowsoup.RowSoup`); a vector missed a
    second time is hot, and its merge starts on a background thread (tensor by tensor on the
    models' device), never on the decode thread.
    Bounded by bytes: the merged copies cached plus the one being merged stay within
    ``budget_bytes`` (least recently used ones are evicted to make room before a merge starts; a
    model larger than the budget is never merged). An evicted copy still decoding is freed when
    its batch ends."""

    def __init__(self, models: Sequence[torch.nn.Module], budget_bytes: int):
        from concurrent.futures import ThreadPoolExecutor

        self.models, self.budget = models, budget_bytes
        self.model_bytes = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
        self.cache: "collections.OrderedDict[Tuple[float, ...], torch.nn.Module]" = collections.OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()
        self.merging: Dict[Tuple[float, ...], Any] = {}
        self.seen: "collections.OrderedDict[Tuple[float, ...], int]" = collections.OrderedDict()  # misses per vector
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moray-soup-merge")

    def held_bytes(self) -> int:
        """Bytes of merged weights cached or being merged."""
        return (len(self.cache) + len(self.merging)) * self.model_bytes

    def get(self, weights: Tuple[float, ...]) -> Tuple[Optional[torch.nn.Module], bool]:
        """The merged model and True when it is ready (a unit vector: the policy itself), else
        ``(None, False)`` (and the merge started if the vector is hot and fits the budget)."""
        nonzero = [k for k, w in enumerate(weights) if w]
        if len(nonzero) == 1:
            self.hits += 1
            return self.models[nonzero[0]], True
        with self.lock:
            if weights in self.cache:
                self.cache.move_to_end(weights)
                self.hits += 1
                return self.cache[weights], True
            self.misses += 1
            self.seen[weights] = self.seen.pop(weights, 0) + 1
            while len(self.seen) > 4096:
                self.seen.popitem(last=False)
            hot = self.seen[weights] >= 2 and weights not in self.merging
            if hot and self.model_bytes <= self.budget:
                while self.cache and self.held_bytes() + self.model_bytes > self.budget:
                    self.cache.popitem(last=False)
                if self.held_bytes() + self.model_bytes <= self.budget:  # else: a merge in flight fills it
                    self.merging[weights] = self.pool.submit(self._merge, weights)
        return None, False

    def wait(self) -> None:
        """Until the merges started so far are cached (tests)."""
        for future in list(self.merging.values()):
            future.result()

    def _merge(self, weights: Tuple[float, ...]) -> None:
        nonzero = [k for k, w in enumerate(weights) if w]
        model = copy.deepcopy(self.models[0])
        states = [self.models[k].state_dict() for k in nonzero]
        with torch.no_grad():
            for name, t in model.state_dict().items():  # views of the copy's parameters and buffers
                if t.is_floating_point():
                    soup_tensor([s[name] for s in states], [weights[k] for k in nonzero], out=t)
        with self.lock:
            self.cache[weights] = model
            del self.merging[weights]


def policy_devices(k: int, gpus: int) -> List[torch.device]:
    """Where each of ``k`` policies lives: spread over the replica's ``gpus`` GPUs (policy i on GPU
    i mod gpus), all on the CPU without GPUs."""
    return [torch.device("cuda", i % gpus) if gpus else torch.device("cpu") for i in range(k)]


def load_policies(paths: Sequence[str], devices: Sequence[torch.device], dtype: torch.dtype,
                  trust_remote_code: bool = False, device_map: str = "") -> List[torch.nn.Module]:
    """The policies in the serving dtype, each loaded straight onto its device (``device_map``
    'auto': sharded over the GPUs as it loads), one after another: the host never holds the K
    policies at once (it held all of them, in full, before any moved to its GPU)."""
    return [load_causal_lm(p, trust_remote_code, dtype=dtype, device_map=device_map or str(d)).eval()
            for p, d in zip(paths, devices)]


def round_weights(weights: Sequence[float], decimals: int) -> Tuple[float, ...]:
    """Weights rounded for the soup cache key, renormalised onto the simplex."""
    r = [round(w, decimals) for w in weights]
    if sum(r) == 0:
        r = [1.0 if w == max(weights) else 0.0 for w in weights]
    s = sum(r)
    return tuple(x / s for x in r)


def per_row_soup(models: Sequence[torch.nn.Module], dirs: Sequence[str]):
    """The per-row soup for these policies: base forward plus the K adapters when every policy is
    one base plus its LoRA adapter (``adapter/``), else the K full-weight policies layer by layer."""
    if all((Path(d) / ADAPTER_DIR).is_dir() for d in dirs):
        try:
            return LoraRowSoup(models, [load_lora_factors(str(Path(d) / ADAPTER_DIR)) for d in dirs])
        except ValueError as e:
            log.warning("per-row soups run over the full weights: the LoRA policies are not one base plus "
                        "their adapters (%s)", e)
    return RowSoup(models)


class SoupBatch:
    """A soup-mode batch: each row's weight vector (in :meth:`row` order) and the model the rows
    decode through -- the merged model of their one vector while they share it, else, for good
    once a row with another vector joins, the per-row soup (its layers give the same keys and
    values, so the KV caches carry over). Its :meth:`on_rows` is the decoder's hook."""

    def __init__(self, row_soup, merged: Optional[torch.nn.Module], decimals: int):
        self.row_soup, self.merged, self.decimals = row_soup, merged, decimals
        self.vectors: List[Tuple[float, ...]] = []

    def models(self) -> List[torch.nn.Module]:
        return [self.merged if self.merged is not None else self.row_soup.model]

    def row(self, req: Request) -> Row:
        self.vectors.append(round_weights(req.parsed.weights, self.decimals))
        if self.merged is not None and self.vectors[-1] != self.vectors[0]:
            self.merged = None
        return Row(req.parsed.prompt_ids, (1.0,), req.parsed.sampling)

    def on_rows(self, live: List[int]) -> List[torch.nn.Module]:
        if self.merged is None:
            self.row_soup.select_rows(torch.tensor([self.vectors[i] for i in live], dtype=torch.float32))
        return self.models()


class MixEngine:
    def __init__(self, cfg: ServeConfig, on_batch: Optional[Callable[[str, int, Optional[bool]], None]] = None):
        """``on_batch(mode, size, soup_cache_hit)``: called after every decoded batch (metrics)."""
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.on_batch = on_batch
        self.names = list(cfg.policies)
        placement = Placement(cfg.num_gpus, cfg.dtype)
        self.device = placement.device()  # where logits are mixed and sampled: cuda:0 or the CPU
        dtype = placement.torch_dtype(self.device)
        first = cfg.policies[self.names[0]]
        self.tokenizer = load_tokenizer(first, cfg.trust_remote_code)
        devices = policy_devices(len(self.names), torch.cuda.device_count() if cfg.num_gpus else 0)
        self.models = load_policies([cfg.policies[n] for n in self.names], devices, dtype, cfg.trust_remote_code,
                                    cfg.device_map)
        self.max_context = cfg.max_context or int(getattr(self.models[0].config, "max_position_embeddings", 2048))
        eos = self.tokenizer.eos_token_id
        eos_ids = set([eos] if eos is not None else [])
        gen_eos = getattr(self.models[0].generation_config, "eos_token_id", None)
        eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids = sorted(eos_ids)
        self.soups = SoupCache(self.models, int(cfg.soup_cache_mb * 2**20))
        self.row_soup = per_row_soup(self.models, [cfg.policies[n] for n in self.names])
        # each mixing mode: its batch key (requests with equal keys decode together) and its decoder
        self.modes: Dict[str, Tuple[Callable[[Parsed], Tuple], Callable[[List[Request]], Tuple]]] = {
            "logits": (lambda p: ("logits",), self._logits),
            "soup": (lambda p: ("soup",), self._soup),  # any vectors: one batch (per-row soup)
        }
        assert set(self.modes) == set(MIXING_MODES), "every mixing mode needs a decoder here"
        self.queue: "queue.Queue[Optional[Request]]" = queue.Queue()
        self.pending: Deque[Request] = collections.deque()
        self.running = True
        self.stats = collections.Counter()
        self.thread = threading.Thread(target=self._loop, name="moray-engine", daemon=True)
        self.thread.start()

    # -- submission ------------------------------------------------------------------------
    def submit(self, parsed: Parsed, emit: Callable[[Dict[str, Any]], None]) -> Request:
        if not self.running:
            raise RuntimeError("the engine is shutting down")
        req = Request(parsed, emit, self.modes[parsed.mixing][0](parsed))
        self.queue.put(req)
        return req

    def close(self, timeout: float = 30.0) -> None:
        """Finish the requests already queued, then stop the thread."""
        self.running = False
        self.queue.put(None)
        self.thread.join(timeout)
        self.soups.pool.shutdown(wait=True, cancel_futures=True)  # no merge thread outlives the engine

    # -- the engine thread -------------------------------------------------------------------
    def _next_batch(self) -> Optional[List[Request]]:
        while not self.pending:
            req = self.queue.get()
            if req is None:
                return None
            self.pending.append(req)
        deadline = time.perf_counter() + self.cfg.batch_wait_ms / 1000
        key = self.pending[0].key
        while sum(j.key == key for j in self.pending) < self.cfg.max_batch_size:
            left = deadline - time.perf_counter()
            try:
                req = self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self.queue.put(None)  # see it again once the pending work is done
                break
            self.pending.append(req)
        batch = [j for j in self.pending if j.key == key][: self.cfg.max_batch_size]
        for j in batch:
            self.pending.remove(j)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                if self.pending:
                    continue
                return
            try:
                self._run(batch)
            except Exception as e:  # before decoding started (decoding errors are answered in _run)
                log.exception("generation failed")
                for j in batch:
                    j.emit({"type": "error", "message": f"generation failed: {e}"})

    def _logits(self, batch: List[Request]):
        """The K policies in lock-step, each row with its own weights; any logits request may join."""
        decoder = LockstepDecoder(self.models, self.tokenizer.pad_token_id, self.eos_ids, self.device)
        return decoder, lambda j: Row(j.parsed.prompt_ids, j.parsed.weights, j.parsed.sampling), None

    def _soup(self, batch: List[Request]):
        """One weight vector in the whole batch: its merged model when the cache has it (a unit
        vector: the policy itself). Otherwise -- several vectors, or a vector being merged -- the
        per-row soup. Any soup request may join: a vector other than the merged model's switches
        the running batch to the per-row soup, whose layers give the same keys and values, so the
        KV caches carry over."""
        vectors = [round_weights(j.parsed.weights, self.cfg.soup_decimals) for j in batch]
        model, cache_hit = None, None
        if len(set(vectors)) == 1:
            model, cache_hit = self.soups.get(vectors[0])
        soup = SoupBatch(self.row_soup, model, self.cfg.soup_decimals)
        decoder = LockstepDecoder(soup.models(), self.tokenizer.pad_token_id, self.eos_ids, self.device, soup.on_rows)
        return decoder, soup.row, cache_hit

    def _joiners(self, key: Tuple, row_of: Callable[[Request], Optional[Row]], room: int) -> List[Tuple[Request, Row]]:
        """Waiting requests that can join the running batch now (same mode, accepted by it)."""
        while True:
            try:
                req = self.queue.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self.queue.put(None)  # shutting down: seen again once the running work is done
                break
            self.pending.append(req)
        taken = []
        for req in list(self.pending):
            if len(taken) >= room:
                break
            if req.key == key:
                row = row_of(req)
                if row is not None:
                    self.pending.remove(req)
                    taken.append((req, row))
        return taken

    def _run(self, batch: List[Request]) -> None:
        """Decode ``batch``; requests of the same mode join it as rows finish or room allows
        (continuous batching), and each request is answered as soon as its own row is done."""
        mode = batch[0].parsed.mixing
        decoder, row_of, cache_hit = self.modes[mode][1](batch)
        reqs = list(batch)
        rows = [row_of(j) for j in reqs]
        streams = [TextStream(self.tokenizer, j.parsed.stop) for j in reqs]
        started = [time.perf_counter()] * len(reqs)
        tokens = [0] * len(reqs)
        finished = set()

        def on_token(i: int, token: int) -> bool:
            tokens[i] += 1
            delta = streams[i].push(token)
            if delta:
                reqs[i].emit({"type": "delta", "text": delta})
            return streams[i].stopped or reqs[i].cancelled

        def on_finish(i: int) -> None:
            finished.add(i)
            tail = streams[i].flush()
            if tail:
                reqs[i].emit({"type": "delta", "text": tail})
            ids = streams[i].ids
            ended = bool(ids) and ids[-1] in self.eos_ids and not reqs[i].parsed.sampling.ignore_eos
            reqs[i].emit({"type": "done", "finish": "stop" if (streams[i].stopped or ended) else "length",
                          "tokens": tokens[i], "batch": len(reqs), "seconds": time.perf_counter() - started[i],
                          "soup_cache_hit": cache_hit})

        def more(running: int) -> List[Row]:
            joined = self._joiners(reqs[0].key, row_of, self.cfg.max_batch_size - running)
            for req, _ in joined:
                reqs.append(req)
                streams.append(TextStream(self.tokenizer, req.parsed.stop))
                started.append(time.perf_counter())
                tokens.append(0)
            return [row for _, row in joined]

        try:
            decoder.generate(rows, on_token, more=more, on_finish=on_finish)
        except Exception as e:  # a failed batch answers every request still in it; the engine keeps going
            log.exception("generation failed")
            for i, req in enumerate(reqs):
                if i not in finished:
                    req.emit({"type": "error", "message": f"generation failed: {e}"})
            return
        self.stats[f"{mode}_batches"] += 1
        self.stats[f"{mode}_requests"] += len(reqs)
        if self.on_batch is not None:
            self.on_batch(mode, len(reqs), cache_hit)
