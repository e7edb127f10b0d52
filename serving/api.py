"""The OpenAI-compatible request and response bodies, as pure functions.

:func:`parse_request` turns a ``/v1/completions`` or ``/v1/chat/completions`` JSON body into a
:class:`Parsed` request or raises :class:`RequestError` (the app answers 400 with its message).
Moray's extra fields: ``objective_weights: {name: weight}`` and ``mixing: "logits" | "soup"``;
``ignore_eos`` (as in vLLM) decodes ``max_tokens`` tokens past any EOS.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from serving.decode import Sampling
from serving.mixing import check_mixing
from trainers.core.prompts import encode
from trainers.core.weights import WeightError, check_weights

ROLES = ("system", "user", "assistant")


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None) -> Dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class RequestError(ValueError):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param

    def body(self) -> Dict[str, Any]:
        return error_body(str(self), param=self.param)


@dataclass
class Parsed:
    prompt_ids: List[int]
    weights: Tuple[float, ...]
    mixing: str
    sampling: Sampling
    stop: List[str]
    stream: bool
    chat: bool


@dataclass
class Limits:
    names: Sequence[str]
    default_weights: Tuple[float, ...]
    default_mixing: str
    default_max_tokens: int
    max_tokens_limit: int
    max_context: int


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{key} must be a finite number, got {v!r}", key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise RequestError(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _integer(body: Mapping[str, Any], key: str, default: Optional[int]) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key} must be an integer, got {v!r}", key)
    return v


def _top_k(body: Mapping[str, Any]) -> int:
    """``top_k``: a positive integer, or 0 / -1 (vLLM's spelling) for no top-k; absent: off."""
    k = _integer(body, "top_k", 0)
    if k < -1:
        raise RequestError(f"top_k must be a positive integer, or 0 or -1 for none, got {k}", "top_k")
    return max(k, 0)


def _flag(body: Mapping[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if not isinstance(v, bool):
        raise RequestError(f"{key} must be true or false, got {v!r}", key)
    return v


def chat_messages(tokenizer, messages: Any) -> List[Dict[str, str]]:
    """The request's messages, checked (each refusal names the field), as the renderer takes them."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be {{role: one of {list(ROLES)}, content: string}}", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_request(body: Any, chat: bool, tokenizer, limits: Limits) -> Parsed:
    """Validate an OpenAI-style body; every refusal names the field and what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if chat:
        prompt_ids = encode(tokenizer, chat_messages(tokenizer, body.get("messages")))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)", "prompt")
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        prompt_ids = encode(tokenizer, prompt)
    n = _integer(body, "n", 1)
    if n != 1:
        raise RequestError(f"n must be 1 (one choice per request), got {n}", "n")
    max_tokens = _integer(body, "max_tokens", None)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", limits.default_max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise RequestError(f"max_tokens must be in [1, {limits.max_tokens_limit}], got {max_tokens}", "max_tokens")
    if len(prompt_ids) + max_tokens > limits.max_context:
        raise RequestError(f"the prompt is {len(prompt_ids)} tokens; with max_tokens {max_tokens} it exceeds "
                           f"the context limit of {limits.max_context} tokens", "messages" if chat else "prompt")
    sampling = Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_top_k(body),
                        seed=_integer(body, "seed", None),
                        ignore_eos=_flag(body, "ignore_eos"))
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of at most 4 of them", "stop")
    stream = _flag(body, "stream")
    mixing = body.get("mixing") or limits.default_mixing
    try:
        check_mixing(mixing)
    except ValueError as e:
        raise RequestError(str(e), "mixing") from None
    raw = body.get("objective_weights")
    if raw is None:
        weights = limits.default_weights
    else:
        if not isinstance(raw, (dict, list)):
            raise RequestError("objective_weights must be an object {objective: weight}", "objective_weights")
        try:
            weights = check_weights(raw, limits.names)
        except WeightError as e:
            raise RequestError(str(e), "objective_weights") from None
    return Parsed(prompt_ids, weights, mixing, sampling, stop, stream, chat)


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def completion_body(rid: str, p: Parsed, model: str, names: Sequence[str], text: str, finish: str,
                    completion_tokens: int, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """An OpenAI completion (or chat completion) body; Moray's own fields sit under ``moray``."""
    choice: Dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if p.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if p.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": len(p.prompt_ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(p.prompt_ids) + completion_tokens},
            "moray": dict({"objective_weights": dict(zip(names, p.weights)), "mixing": p.mixing}, **(extra or {}))}


def chunk_body(rid: str, p: Parsed, model: str, text: Optional[str], finish: Optional[str],
               first: bool = False) -> Dict[str, Any]:
    if p.chat:
        delta: Dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice: Dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
