"""The Ray Serve app: one deployment serving any objective-weight vector, OpenAI-compatible.

Routes (FastAPI ingress):

- ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI bodies plus
  ``objective_weights: {name: weight}`` and ``mixing: "logits" | "soup"``; ``stream: true`` sends
  server-sent events ending with ``data: [DONE]``.
- ``GET /v1/objectives``: names, default weights, mixing modes; ``GET /v1/models``; ``GET /healthz``.

Bad input answers 400 with ``{"error": {"message", "param", ...}}`` and the replica keeps serving.

Build it with :func:`build_app` -- the ``import_path`` of a Serve config file
(``serving.app:build_app``), whose ``args`` are a :class:`~serving.config.ServeConfig`.
"""


import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from serving.api import Limits, RequestError, chunk_body, completion_body, error_body, new_id, parse_request
from serving.config import ServeConfig, load_serve_config
from serving.engine import MixEngine
from serving.mixing import MIXING_MODES
from serving.policies import check_compatible
from trainers.core.config import to_dict
from trainers.core.metrics import MetricSpec, make_metric

log = logging.getLogger(__name__)

api = FastAPI(title="Moray mixed policy", description="Any objective-weight vector, one endpoint.")


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SERVE: Dict[str, MetricSpec] = {s.name: s for s in [
    MetricSpec("moray_serve_requests", "counter", "Requests answered, by route, mixing mode and HTTP status",
               ("route", "mixing", "status")),
    MetricSpec("moray_serve_latency_seconds", "histogram", "Seconds from a request's arrival to its last token",
               ("route", "mixing"), LATENCY_BUCKETS, "s"),
    MetricSpec("moray_serve_first_token_seconds", "histogram", "Seconds from a request's arrival to its first text",
               ("route", "mixing"), LATENCY_BUCKETS, "s"),
    MetricSpec("moray_serve_generated_tokens", "counter", "Tokens generated (rate: tokens per second)", ("mixing",)),
    MetricSpec("moray_serve_soup_cache", "counter", "Soup-mode batches by cache result (hit: merged weights reused)",
               ("result",)),
    MetricSpec("moray_serve_objective_weight", "histogram", "Objective weights requested (after normalisation)",
               ("objective",), tuple(round(0.1 * i, 1) for i in range(1, 11))),
    MetricSpec("moray_serve_batch_size", "histogram", "Requests decoded together in one batch", ("mixing",),
               (1, 2, 4, 8, 16, 32, 64)),
]}


def serving_specs() -> List[MetricSpec]:
    return list(SERVE.values())


class ServingMetrics:
    """The Serve app's metrics (one per replica; ``ray.serve.metrics`` adds the replica's tags)."""

    def __init__(self):
        from ray.serve import metrics as serve_metrics

        self.m = {name: make_metric(spec, serve_metrics) for name, spec in SERVE.items()}

    def request(self, route: str, mixing: str, status: int, seconds: Optional[float] = None,
                first_token_s: Optional[float] = None, tokens: int = 0) -> None:
        tags = {"route": route, "mixing": mixing}
        self.m["moray_serve_requests"].inc(tags={**tags, "status": str(status)})
        if seconds is not None:
            self.m["moray_serve_latency_seconds"].observe(seconds, tags=tags)
        if first_token_s is not None:
            self.m["moray_serve_first_token_seconds"].observe(first_token_s, tags=tags)
        if tokens:
            self.m["moray_serve_generated_tokens"].inc(tokens, tags={"mixing": mixing})

    def weights(self, names: Sequence[str], weights: Sequence[float]) -> None:
        for name, w in zip(names, weights):
            self.m["moray_serve_objective_weight"].observe(float(w), tags={"objective": name})

    def batch(self, mixing: str, size: int, soup_cache_hit: Optional[bool]) -> None:
        self.m["moray_serve_batch_size"].observe(size, tags={"mixing": mixing})
        if soup_cache_hit is not None:
            self.m["moray_serve_soup_cache"].inc(tags={"result": "hit" if soup_cache_hit else "miss"})


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, kind), status_code=status)


class _Timing:
    """One generation request's clock: time to first text, then its status, latency and tokens,
    recorded once (a client that leaves early counts as 499)."""

    def __init__(self, metrics, route: str, mixing: str, tic: float):
        self.metrics, self.route, self.mixing, self.tic = metrics, route, mixing, tic
        self.first: Optional[float] = None
        self.recorded = False

    def first_text(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.tic

    def __call__(self, status: int, tokens: int = 0) -> None:
        if self.recorded:
            return
        self.recorded = True
        self.metrics.request(self.route, self.mixing, status, seconds=time.perf_counter() - self.tic,
                             first_token_s=self.first, tokens=tokens)


@serve.deployment(name="MixedPolicy")
@serve.ingress(api)
class MixedPolicyServer:
    def __init__(self, config: Dict[str, Any]):
        self.cfg: ServeConfig = load_serve_config(config)
        self.metrics = ServingMetrics()
        self.engine = MixEngine(self.cfg, on_batch=self.metrics.batch)
        self.names = self.engine.names
        self.limits = Limits(self.names, self.cfg.default_weight_vector(), self.engine.default_mixing,
                             self.cfg.default_max_tokens, self.cfg.max_tokens_limit, self.engine.max_context)
        self.api_key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if self.cfg.api_key_env and not self.api_key:
            raise ValueError(f"api_key_env names {self.cfg.api_key_env}, which is not set on this replica")
        log.info("serving %s (%s on %s), default weights %s", self.names, self.cfg.dtype, self.engine.device,
                 dict(zip(self.names, self.limits.default_weights)))

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def _unauthorized(self, request: Request) -> Optional[JSONResponse]:
        if not self.api_key:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return None
        return _error(401, "missing or wrong API key (Authorization: Bearer <key>)", kind="authentication_error")

    @api.get("/healthz")
    def healthz(self) -> Dict[str, Any]:
        return {"status": "ok", "engine_alive": self.engine.thread.is_alive()}

    @api.get("/v1/objectives")
    def objectives(self, request: Request):
        denied = self._unauthorized(request)
        if denied:
            return denied
        return {"objectives": self.names, "default_weights": dict(zip(self.names, self.limits.default_weights)),
                "default_source": "config" if self.cfg.default_weights else "mpo" if self.cfg.mpo_weights else "uniform",
                "mixing": list(MIXING_MODES), "default_mixing": self.engine.default_mixing,
                # a conditioned policy: soups are its model at λ, logits mode mixes its K vertex policies (MPO)
                "policy": "conditioned" if self.engine.conditioned else "policies",
                "max_context": self.engine.max_context, "max_tokens_limit": self.cfg.max_tokens_limit,
                "soup_cache": {"budget_mb": self.cfg.soup_cache_mb, "held_mb": self.engine.soups.held_bytes() / 2**20,
                               "hits": self.engine.soups.hits,
                               "misses": self.engine.soups.misses,
                               "per_row": self.engine.row_soup.kind}}

    @api.get("/v1/models")
    def models(self, request: Request):
        denied = self._unauthorized(request)
        if denied:
            return denied
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "owned_by": "moray"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool):
        route, tic = "chat" if chat else "completions", time.perf_counter()
        denied = self._unauthorized(request)
        if denied:
            self.metrics.request(route, "none", 401)
            return denied
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.metrics.request(route, "none", 400)
            return _error(400, f"the request body is not valid JSON: {e}")
        try:
            parsed = parse_request(body, chat, self.engine.tokenizer, self.limits)
        except RequestError as e:
            self.metrics.request(route, "none", 400)
            return JSONResponse(e.body(), status_code=400)
        self.metrics.weights(self.names, parsed.weights)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            req = self.engine.submit(parsed, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except RuntimeError as e:
            self.metrics.request(route, parsed.mixing, 503)
            return _error(503, str(e), kind="server_error")
        rid = new_id(chat)
        done = _Timing(self.metrics, route, parsed.mixing, tic)
        if parsed.stream:
            return StreamingResponse(self._sse(rid, parsed, req, events, done), media_type="text/event-stream")
        text = []
        try:
            while True:
                ev = await events.get()
                if ev["type"] == "delta":
                    done.first_text()
                    text.append(ev["text"])
                elif ev["type"] == "error":
                    done(500)
                    return _error(500, ev["message"], kind="server_error")
                else:
                    done(200, ev["tokens"])
                    return completion_body(rid, parsed, self.cfg.model_name, self.names, "".join(text),
                                           ev["finish"], ev["tokens"],
                                           {"batch_size": ev["batch"], "soup_cache_hit": ev["soup_cache_hit"]})
        except asyncio.CancelledError:  # the client went away: stop decoding its row
            req.cancelled = True
            done(499)
            raise

    async def _sse(self, rid, parsed, req, events, done: _Timing) -> AsyncIterator[str]:
        model = self.cfg.model_name
        first = True
        try:
            while True:
                ev = await events.get()
                if ev["type"] == "delta":
                    done.first_text()
                    yield f"data: {json.dumps(chunk_body(rid, parsed, model, ev['text'], None, first))}\n\n"
                    first = False
                elif ev["type"] == "error":
                    done(500)
                    yield f"data: {json.dumps(error_body(ev['message'], 'server_error'))}\n\n"
                    break
                else:
                    done(200, ev["tokens"])
                    yield f"data: {json.dumps(chunk_body(rid, parsed, model, None, ev['finish'], first))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = True  # harmless once done; stops decoding if the client left early
            done(499)  # no-op unless the client left before the end


def build_app(args: Dict[str, Any]):
    """Serve application builder (``import_path: serving.app:build_app``); ``args`` is a ServeConfig."""
    return bind_app(args)


def bind_app(args: Dict[str, Any], deployment_overrides: Optional[Dict[str, Any]] = None):
    """The bound deployment for ServeConfig ``args``. Checks the policies (directories, one
    tokenizer, one reference and β unless ``force``) here, before any replica starts; the config's
    autoscaling and resource options apply, then ``deployment_overrides`` (a Serve file's entry)."""
    cfg = load_serve_config(args)
    check_compatible(cfg.policies, force=cfg.force, allow_rename=cfg.allow_rename)
    options = dict(cfg.deployment_options(), **(deployment_overrides or {}))
    return MixedPolicyServer.options(**options).bind(to_dict(cfg))
