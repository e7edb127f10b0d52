"""Training metrics on the Ray dashboard and Prometheus: what each optimizer step publishes, from
rank 0 of every job (tags ``run``, ``method``, ``objective``).

The loop's own figures (loss, throughput, learning rate, step) and whatever a task reports under
a name defined here: scalars (:data:`TRAIN_SCALARS`) and per-objective families ``family/<objective>``
(:data:`TRAIN_FAMILIES`) -- GAPO's α and gradient norms, MOPO's λ, constraint values and
thresholds, per-objective losses, margins and accuracies, online rewards; a counter of rows trained.
Anything else a task reports stays in the job's metrics but is not published. The gauges are set
again every half report interval while the job lives, and its last values stay in Ray's KV store
(:data:`FINAL_NAMESPACE`) after it ends.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from trainers.core.metrics import BestEffort, MetricSpec, Republisher, make_metric

TRAIN_TAGS = ("run", "method", "objective")

# a training job's scalar entries -> gauges
TRAIN_SCALARS: Dict[str, MetricSpec] = {key: MetricSpec(name, "gauge", desc, TRAIN_TAGS, unit=unit) for key, name, desc, unit in [
    ("loss", "moray_train_loss", "Training loss, mean over the rows of the last optimizer step", "short"),
    ("reward_margin", "moray_train_reward_margin", "Mean implicit reward margin beta*(chosen - rejected) log-ratio", "short"),
    ("accuracy", "moray_train_accuracy", "Fraction of pairs ranked the right way (implicit reward, or a reward model's score)", "percentunit"),
    ("rows_per_s", "moray_train_rows_per_second", "Rows (pairs; prompts for MOPO and online GAPO) trained per second, all workers", "short"),
    ("tokens_per_s", "moray_train_tokens_per_second", "Tokens through the model per second, all workers", "short"),
    ("lr", "moray_train_learning_rate", "Learning rate of the last optimizer step", "short"),
    ("step", "moray_train_step", "Optimizer steps done", "short"),
    ("grad_cosine", "moray_train_gapo_grad_cosine", "GAPO: cosine between the two objectives' gradients", "short"),
    ("alpha", "moray_train_wrpo_alpha", "WRPO: weight of the source models' chosen responses", "short"),
    ("empty_fraction", "moray_train_online_empty_fraction", "Online GAPO: fraction of empty samples", "percentunit"),
    ("kl", "moray_train_online_kl", "Online GAPO: mean log pi - log pi_ref of the samples (a KL estimate)", "short"),
]}

# a method's per-objective entries ``family/<objective>`` -> gauges tagged with that objective
TRAIN_FAMILIES: Dict[str, MetricSpec] = {key: MetricSpec(name, "gauge", desc, TRAIN_TAGS) for key, name, desc in [
    ("loss", "moray_train_objective_loss", "Per-objective loss (GAPO)"),
    ("margin", "moray_train_objective_reward_margin", "Per-objective implicit reward margin in that objective's orientation (GAPO)"),
    ("accuracy", "moray_train_objective_accuracy", "Per-objective pair accuracy (GAPO)"),
    ("reward", "moray_train_objective_reward", "Online GAPO: mean score of the policy's samples"),
    ("alpha", "moray_train_gapo_alpha", "GAPO: the objective's coefficient in the balanced gradient"),
    ("grad_norm", "moray_train_gapo_grad_norm", "GAPO: norm of the objective's gradient"),
    ("lambda", "moray_train_mopo_lambda", "MOPO: the constraint's Lagrange multiplier"),
    ("constraint", "moray_train_mopo_constraint", "MOPO: the constraint's win-rate under the current policy weights"),
    ("threshold", "moray_train_mopo_threshold", "MOPO: the constraint's threshold"),
]}

TRAIN_ROWS = MetricSpec("moray_train_rows", "counter", "Rows (pairs; prompts for MOPO and online GAPO) trained", TRAIN_TAGS)


def training_specs() -> List[MetricSpec]:
    return list(TRAIN_SCALARS.values()) + list(TRAIN_FAMILIES.values()) + [TRAIN_ROWS]


def training_series(metrics: Mapping[str, Any]) -> List[Tuple[MetricSpec, Optional[str], float]]:
    """The gauges a step's metrics set: ``(spec, objective or None, value)``. ``family/<objective>``
    keys of :data:`TRAIN_FAMILIES` are tagged with their objective; other keys of
    :data:`TRAIN_SCALARS` with the job's; anything else (and NaN) is not published."""
    out = []
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            continue
        family, _, objective = key.partition("/")
        if objective and family in TRAIN_FAMILIES:
            out.append((TRAIN_FAMILIES[family], objective, float(value)))
        elif not objective and key in TRAIN_SCALARS:
            out.append((TRAIN_SCALARS[key], None, float(value)))
    return out


# Ray's KV namespace of finished jobs' last values, one key ``<run>/<objective>`` per job
FINAL_NAMESPACE = "moray_final_metrics"


@dataclass(frozen=True)
class FinalSeries:
    """One gauge's last value as a finished job left it (``name`` with Ray's ``ray_`` prefix)."""

    name: str
    labels: Dict[str, str]
    value: float


def read_final() -> List[FinalSeries]:
    """The last values of every finished job of the connected Ray cluster."""
    from ray.experimental import internal_kv

    out = []
    for key in sorted(internal_kv._internal_kv_list("", namespace=FINAL_NAMESPACE)):
        kept = internal_kv._internal_kv_get(key, namespace=FINAL_NAMESPACE)  # None: deleted since listed
        out += [FinalSeries(**s) for s in json.loads(kept or "[]")]
    return out


class TrainingMetrics:
    """Publishes a training job's per-step metrics (one worker: rank 0), keeping its gauges on the
    endpoint between steps until :meth:`close`. A failure to publish is logged once and never stops
    training."""

    def __init__(self, run: str, method: str, objective: str):
        self.tags = {"run": run, "method": method, "objective": objective}
        self._gauges: Dict[str, Any] = {}
        self._out = BestEffort(lambda: make_metric(TRAIN_ROWS), "training")
        self._again = Republisher()

    def record(self, metrics: Mapping[str, Any]) -> None:
        if self._out:
            self._out.call(lambda: self._record(metrics))

    def _series(self, metrics: Mapping[str, Any]) -> List[Tuple[MetricSpec, Dict[str, str], float]]:
        return [(spec, {**self.tags, "objective": objective} if objective else self.tags, value)
                for spec, objective, value in training_series(metrics)]

    def _record(self, metrics: Mapping[str, Any]) -> None:
        for spec, tags, value in self._series(metrics):
            if spec.name not in self._gauges:
                self._gauges[spec.name] = make_metric(spec)
            self._again.set(self._gauges[spec.name], value, tags)
        if metrics.get("step_rows"):
            self._out.target.inc(float(metrics["step_rows"]), tags=self.tags)

    def close(self, final: Mapping[str, Any]) -> None:
        """The job ended: stop re-publishing, and leave ``final``'s gauges in Ray's KV store."""
        self._again.close()
        if self._out:
            self._out.call(lambda: self._keep(final))

    def _keep(self, final: Mapping[str, Any]) -> None:
        from ray.experimental import internal_kv

        series = [asdict(FinalSeries(f"ray_{spec.name}", tags, value)) for spec, tags, value in self._series(final)]
        key = f"{self.tags['run']}/{self.tags['objective']}"
        internal_kv._internal_kv_put(key, json.dumps(series), overwrite=True, namespace=FINAL_NAMESPACE)
