"""Configuration of the mixed-policy server: the ``args`` of the Serve application.

The same dict is the ``args:`` of an application in a Ray Serve config file (``serve run
serve.yaml`` / ``serve deploy``) and what ``moray serve`` builds from its flags.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

from serving.mixing import MIXING_MODES, check_mixing
from trainers.core.config import from_dict, opt
from trainers.core.models import Placement
from trainers.core.weights import check_weights


@dataclass
class ServeConfig:
    """The mixed-policy app: which policies, how to mix by default, limits and scaling."""

    policies: Dict[str, str] = opt({}, "Objective name -> directory of that objective's Moray policy "
                                   "(all trained from one reference with one β and one tokenizer); a conditioned "
                                   "policy's objectives are its vertices, OUT/vertices/<objective>, served as one "
                                   "base plus their adapters (`moray serve --policies OUT` lists them).")
    default_weights: Dict[str, float] = opt({}, "Weights used when a request gives none. Empty: the MPO "
                                            "max-min weights from `mpo_weights`, else equal weights.")
    mpo_weights: str = opt("", "weights.json written by `moray mix mpo` (served as the default weights).")
    default_mixing: str = opt("", "Mixing when a request gives none: " + "; ".join(
        f"'{k}' ({v})" for k, v in MIXING_MODES.items()) + ". Empty: 'soup' for a conditioned policy "
        "(its model at the request's weights), else 'logits'.")
    max_batch_size: int = opt(8, "Most concurrent requests of one mixing mode decoded in one batch.")
    batch_wait_ms: float = opt(5.0, "How long the first request waits for others to batch with.")
    soup_cache_mb: float = opt(2048, "Soup mode: memory for merged copies of the policies, one per hot weight vector "
                               "(merged in the background, least recently used evicted; meanwhile, and for "
                               "batches with several vectors, rows decode as per-row soups). 0: never merge.")
    soup_decimals: int = opt(3, "Soup mode: weights are rounded to this many decimals before merging "
                             "(and as the cache key).")
    max_context: int = opt(0, "Prompt + max_tokens limit in tokens; 0: the model's max_position_embeddings.")
    max_tokens_limit: int = opt(512, "Largest max_tokens a request may ask for.")
    default_max_tokens: int = opt(64, "max_tokens when a request gives none.")
    threads: int = opt(1, "torch threads per replica.")
    num_cpus: float = opt(1.0, "CPUs reserved per replica.")
    num_gpus: float = opt(0.0, "GPUs per replica; > 0 places the K policies across the replica's GPUs "
                          "(policy k on GPU k mod n) and fails if CUDA sees none.")
    dtype: str = opt("auto", "Model dtype: float32, bfloat16, or auto (bfloat16 on GPU, float32 on CPU).")
    device_map: str = opt("", "'auto': shard each policy over the replica's GPUs with transformers' device_map "
                          "(for a policy larger than one GPU); empty: one GPU per policy.")
    min_replicas: int = opt(1, "Autoscaling: fewest replicas.")
    max_replicas: int = opt(1, "Autoscaling: most replicas.")
    target_ongoing_requests: float = opt(4.0, "Autoscaling: requests in flight per replica it aims for.")
    upscale_delay_s: float = opt(5.0, "Autoscaling: how long the load must stay above target before a replica is added.")
    downscale_delay_s: float = opt(60.0, "Autoscaling: how long the load must stay below target before a replica is removed.")
    look_back_period_s: float = opt(30.0, "Autoscaling: the window over which in-flight requests are averaged.")
    max_ongoing_requests: int = opt(32, "Requests a replica accepts at once; more wait in the proxy.")
    graceful_shutdown_timeout_s: float = opt(20.0, "On scale-down or shutdown, how long in-flight requests may finish.")
    model_name: str = opt("moray-mix", "Name reported in responses and /v1/models.")
    api_key_env: str = opt("", "Name of an environment variable holding an API key; when set, requests "
                           "need 'Authorization: Bearer <key>' (401 otherwise). The key never sits in the file.")
    allow_rename: bool = opt(False, "Serve policies under names other than the objectives recorded in their "
                             "moray.json (refused otherwise: swapped directories would serve the opposite trade-off).")
    force: bool = opt(False, "Serve policies even if their reference, β or tokenizer differ (MPO is then undefined).")
    trust_remote_code: bool = opt(False, "Allow model code shipped with a checkpoint to run.")

    def validate(self) -> "ServeConfig":
        if not self.policies:
            raise ValueError("no policies to serve (policies: {objective: DIR})")
        for name, path in self.policies.items():
            if not Path(path).is_dir():
                raise ValueError(f"policy {name!r}: {path} is not a directory")
        if self.default_mixing:
            check_mixing(self.default_mixing, "default_mixing")
        Placement(self.num_gpus, self.dtype)  # raises on a bad dtype or GPU count
        if self.device_map not in ("", "auto"):
            raise ValueError(f"device_map must be '' or 'auto', got {self.device_map!r}")
        if self.device_map and not self.num_gpus:
            raise ValueError("device_map 'auto' shards over GPUs: set num_gpus")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        for key in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("max_batch_size", "max_tokens_limit", "default_max_tokens", "threads",
                    "max_ongoing_requests"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if not (self.soup_cache_mb >= 0 and math.isfinite(self.soup_cache_mb)):
            raise ValueError(f"soup_cache_mb must be a finite number >= 0, got {self.soup_cache_mb}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})")
        self.default_weight_vector()  # raises on bad default weights
        return self

    def default_weight_vector(self) -> Tuple[float, ...]:
        names = list(self.policies)
        if self.default_weights:
            return check_weights(self.default_weights, names)
        if self.mpo_weights:
            data = json.loads(Path(self.mpo_weights).read_text())
            return check_weights(data["weights"], names)
        return tuple(1.0 / len(names) for _ in names)

    def deployment_options(self) -> Dict[str, Any]:
        """Ray Serve deployment options (a Serve config file's ``deployments:`` entry overrides them)."""
        actor: Dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {
            "autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                   "target_ongoing_requests": self.target_ongoing_requests,
                                   "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                                   "look_back_period_s": self.look_back_period_s,
                                   # Serve wants its metrics interval inside the window
                                   "metrics_interval_s": min(10.0, self.look_back_period_s / 2)},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": actor,
        }


def load_serve_config(values: Mapping[str, Any]) -> ServeConfig:
    return from_dict(ServeConfig, values).validate()

