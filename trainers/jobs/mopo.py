"""``moray train mopo`` (docs/algorithms.md §4): maximise a primary objective while each secondary
objective's win-rate stays above a threshold. The math is in :mod:`trainers.constrained`.

Input: a candidate file -- one row per prompt with ``n`` responses and every objective's scores
(``moray pairs`` writes ``candidates.jsonl``) or preference matrices. On the driver, before Ray
starts, each objective's scores become win-rates against the prompt's candidates (ties ½; a
candidate some objective cannot score is dropped from its prompt, which then holds fewer), and
the thresholds are checked against the best any policy over the candidates could reach.

Thresholds are win-rates against the candidates: the behaviour policy (the candidates' sampler,
uniform over them) sits at exactly 0.5 on every objective, so ``{sentiment: 0.5}`` means "no
worse on sentiment than the model that produced the candidates".

Per micro-batch (``micro_batch_size`` prompts): one forward over all ``n`` candidates of every
prompt, ``ρ_λ`` from the current multipliers, the weighted behaviour-cloning loss, and each
prompt's constraint values under ``π_λ``. After each optimizer step the constraint values are
averaged over the workers' prompts (``all_reduce``), so every worker takes the same projected
dual step and holds the same λ; λ and the thresholds are saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch

from trainers.batches import pair_logps
from trainers.checkpoints import FINAL_TASK_STATE
from trainers.constrained import (check_feasible, check_multipliers, constraint_report, dual_step, mopo_ratios,
                                  prompt_values, solve_dual, win_rates)
from trainers.core.config import opt, parse_numbers
from trainers.core.metadata import METADATA_FILE, read_metadata, write_metadata
from trainers.data import LoadReport, PreferenceDataError, field_problem, read_source, settle_problems
from trainers.job_config import DataConfig, Flag, Job, JobConfig, PromiseUnmet
from trainers.launch import train_on_rows
from trainers.losses import weighted_bc_loss
from trainers.task import PolicyTask, policy_metadata

log = logging.getLogger(__name__)


@dataclass
class MOPOJobConfig(JobConfig):
    """`moray train mopo`: ``objective`` is the primary objective, ``constraints`` the others."""

    constraints: Dict[str, float] = opt({}, "Secondary objectives and their thresholds as win-rates against "
                                        "the candidates (0.5: the level of the model that sampled them), "
                                        "e.g. {sentiment: 0.5}.")
    tau: float = opt(0.1, "τ, the KL weight: the policy on the candidates is π_ref·ρ_λ with "
                     "ρ_λ ∝ exp((p̄ + λᵀq̄)/τ).")
    dual_lr: float = opt(1.0, "η_λ, the projected dual step size on the multipliers (once per optimizer step).")
    lambda_bound: float = opt(50.0, "Stop with an error naming the constraint when a multiplier passes this "
                              "(the threshold is out of this policy's reach).")
    ratchet_every: int = opt(0, "Every N optimizer steps, set each threshold to ratchet_relax x the value "
                             "reached over those steps (0: thresholds stay fixed).")
    ratchet_relax: float = opt(0.95, "β_relax of the ratchet.")
    dual_init: str = opt("solve", "Starting multipliers: 'solve' (the dual's minimiser on the training candidates, "
                         "solved on the driver before Ray starts: the point the dual steps converge to) or 'zero'.")
    initial_lambda: Dict[str, float] = opt({}, "Starting multipliers per constraint when dual_init=zero "
                                           "(missing: 0). With dual_init=solve the job fills them in.")
    constraint_slack: float = opt(0.01, "A constraint counts as met when its final estimate is at least "
                                  "threshold - slack (the estimate moves with the last steps' batches).")
    accept_unmet: bool = opt(False, "Exit 0 even when a constraint's final estimate misses its threshold "
                             "(the policy is exported and moray.json says which constraints were missed either way).")

    def labelled_objectives(self) -> List[str]:
        return []

    def extra_errors(self) -> List[str]:
        errors = []
        if not self.constraints:
            errors.append("constraints must name at least one secondary objective with its threshold")
        if self.objective in self.constraints:
            errors.append(f"the primary objective {self.objective!r} cannot also be a constraint")
        for k, b in self.constraints.items():
            if not (math.isfinite(b) and 0.0 <= b <= 1.0):
                errors.append(f"threshold of {k!r} must be a win-rate in [0, 1], got {b}")
        for name in ("tau", "dual_lr", "lambda_bound"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                errors.append(f"{name} must be a positive finite number, got {v}")
        if self.dual_init not in ("solve", "zero"):
            errors.append(f"dual_init must be 'solve' or 'zero', got {self.dual_init!r}")
        unknown = sorted(set(self.initial_lambda) - set(self.constraints))
        if unknown:
            errors.append(f"initial_lambda names {unknown}, which are not constraints")
        if any(not (math.isfinite(v) and v >= 0) for v in self.initial_lambda.values()):
            errors.append("initial_lambda values must be finite and >= 0")
        if not (math.isfinite(self.constraint_slack) and 0 <= self.constraint_slack < 1):
            errors.append(f"constraint_slack must be in [0, 1), got {self.constraint_slack}")
        if self.ratchet_every < 0 or not 0 < self.ratchet_relax <= 1:
            errors.append("ratchet_every must be >= 0 and ratchet_relax in (0, 1]")
        if self.data.objective_labels:
            errors.append("MOPO reads candidate files (prompt, responses, scores), not objective_labels")
        return errors

    def objective_names(self) -> List[str]:
        return [self.objective, *self.constraints]


def _row_win_rates(row_scores: Dict[str, Any], row_prefs: Dict[str, Any], names: List[str], n: int,
                   texts: List[Any]) -> Tuple[Optional[Dict[str, np.ndarray]], Optional[str]]:
    """Each objective's win-rates over the prompt's usable candidates (NaN for the others)."""
    usable = np.array([bool(t) for t in texts])
    for k in names:
        if k in row_scores:
            s = row_scores[k]
            if not isinstance(s, list) or len(s) != n:
                return None, f"scores.{k} must be a list of {n} numbers"
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in s):
                return None, f"scores.{k} holds a non-number"
            usable &= np.array([v is not None and math.isfinite(v) for v in s])
        elif k in row_prefs:
            P = row_prefs[k]
            if (not isinstance(P, list) or len(P) != n or any(not isinstance(r, list) or len(r) != n for r in P)
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for r in P for v in r)):
                return None, f"preferences.{k} must be a {n}x{n} matrix of probabilities"
        else:
            return None, f"no scores or preferences for objective {k!r}"
    if usable.sum() < 2:
        return None, "fewer than 2 candidates every objective scores"
    idx = np.flatnonzero(usable)
    out = {}
    for k in names:
        w = np.full(n, np.nan)
        if k in row_scores:
            s = torch.tensor([float(row_scores[k][i]) for i in idx], dtype=torch.float64)[None]
            w[idx] = win_rates(s)[0].numpy()
        else:
            P = torch.tensor(row_prefs[k], dtype=torch.float64)[idx][:, idx][None]
            w[idx] = win_rates(preferences=P)[0].numpy()
        out[k] = w
    return out, None


def load_candidates(cfg: MOPOJobConfig):
    """Read and check a candidate file on the driver; a table of ``idx, prompt, is_chat, cand_0..,
    winrate_<objective>`` (NaN for a dropped candidate, whose text repeats a kept one so every row
    holds ``n`` sequences) and a :class:`~trainers.data.LoadReport` counting prompts."""
    d: DataConfig = cfg.data
    names = cfg.objective_names()
    get = lambda row, name: row.get(d.columns.get(name, name))  # noqa: E731
    report, rows = LoadReport(), []
    for src in read_source(d.path, d.format, d.split):
        for i, row in enumerate(src.rows):
            report.total += 1
            prompt, texts = get(row, "prompt"), get(row, "responses")
            problem = field_problem(prompt) if "__not_an_object__" not in row else "row is not a JSON object"
            if problem is None and (not isinstance(texts, list) or len(texts) < 2
                                    or any(not isinstance(t, str) for t in texts)):
                problem = "responses must be a list of at least 2 strings"
            rates = None
            if problem is None:
                scores, prefs = get(row, "scores") or {}, get(row, "preferences") or {}
                if not isinstance(scores, dict) or not isinstance(prefs, dict):
                    problem = "scores and preferences must map objective names to values"
                else:
                    rates, problem = _row_win_rates(scores, prefs, names, len(texts), [t.strip() for t in texts])
            if problem:
                report.problems.setdefault(f"{src.name}: {problem}", []).append(i)
                continue
            rows.append((prompt, texts, rates))
    report.skipped, report.kept = settle_problems(report, d.skip_invalid, "candidate"), len(rows)
    if not rows:
        raise PreferenceDataError(f"{d.path}: no usable candidate rows")
    n = max(len(t) for _, t, _ in rows)
    cols: Dict[str, List[Any]] = {"prompt": [], "is_chat": [], **{f"cand_{j}": [] for j in range(n)},
                                  **{f"winrate_{k}": [] for k in names}}
    for prompt, texts, rates in rows:
        is_chat = isinstance(prompt, list)
        keep = [j for j in range(len(texts)) if np.isfinite(rates[names[0]][j])]
        for j in range(n):
            t = texts[j] if j < len(texts) and j in keep else texts[keep[0]]
            cols[f"cand_{j}"].append(json.dumps([{"role": "assistant", "content": t}]) if is_chat else t)
        cols["prompt"].append(json.dumps(prompt) if is_chat else prompt)
        cols["is_chat"].append(is_chat)
        for k in names:
            cols[f"winrate_{k}"].append(np.concatenate([rates[k], np.full(n - len(texts), np.nan)]).tolist())
    table = pa.table({"idx": pa.array(np.arange(len(rows), dtype=np.int64)), **cols})
    return table, report


def masked_win_rates(p_bar: torch.Tensor, q_bar: torch.Tensor):
    """NaN-marked win-rates ``p̄ (B, n)``, ``q̄ (B, n, J)`` -> the same with 0 where a candidate is
    absent, and the candidate ``mask (B, n)``."""
    return p_bar.nan_to_num(0.0), q_bar.nan_to_num(0.0), torch.isfinite(p_bar)


def win_rate_tensor(table, names: List[str]) -> torch.Tensor:
    """``(prompts, n, len(names))`` win-rates of a candidate table (NaN: absent)."""
    return torch.stack([torch.tensor(table.column(f"winrate_{k}").to_pylist(), dtype=torch.float64)
                        for k in names], -1)


class ConstraintsUnmet(PromiseUnmet):
    """A MOPO job ended with constraint estimates below their thresholds (the policy was exported)."""


class MOPOTask(PolicyTask):
    """MOPO's policy and dual steps (see the module docstring). Its statistics: ``logp_best`` and
    ``logp_worst``, the policy's log-probs of each prompt's highest- and lowest-ρ candidate."""

    name = "mopo"
    needs_reference = False  # ρ_λ is a closed form on the candidates: no reference log-probs

    def __init__(self, cfg: MOPOJobConfig):
        self.cfg, self.names = cfg, list(cfg.constraints)
        self.lam = torch.tensor([float(cfg.initial_lambda.get(k, 0.0)) for k in self.names], dtype=torch.float64)
        self.thresholds = torch.tensor([cfg.constraints[k] for k in self.names], dtype=torch.float64)
        self.step_thresholds = self.thresholds  # those the latest dual step used (self.thresholds: the next one's)
        self.steps = 0
        self._sum: Optional[torch.Tensor] = None  # Σ prompt values, prompts: on the device, read once per step
        self._window = torch.zeros(len(self.names) + 1, dtype=torch.float64)  # the same since the last ratchet

    def losses(self, engine, batch: Dict[str, torch.Tensor]):
        p_bar, q_bar, mask = masked_win_rates(batch[f"winrate_{self.cfg.objective}"],
                                              torch.stack([batch[f"winrate_{k}"] for k in self.names], -1))
        logps = torch.stack(pair_logps(engine, batch, responses=p_bar.shape[1]), 1)  # (B, n)
        rho = mopo_ratios(p_bar, q_bar, self.lam.to(p_bar.device), self.cfg.tau, mask)
        losses = weighted_bc_loss(logps, rho.to(logps.dtype), mask)
        values = prompt_values(rho, q_bar, mask)
        step_sum = torch.cat([values.sum(0), values.new_full((1,), float(len(values)))])
        self._sum = step_sum if self._sum is None else self._sum + step_sum
        best = rho.masked_fill(~mask, -1.0).argmax(1, keepdim=True)
        worst = rho.masked_fill(~mask, math.inf).argmin(1, keepdim=True)
        return losses, {"logp_best": logps.gather(1, best)[:, 0].detach(),
                        "logp_worst": logps.gather(1, worst)[:, 0].detach()}

    def end_step(self) -> Dict[str, float]:
        """The dual step on the global batch's constraint values; stops past ``lambda_bound``."""
        import torch.distributed as dist

        total = self._sum
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        total = total.cpu()
        self._sum = None
        values = total[:-1] / total[-1].clamp_min(1.0)
        out = {f"constraint/{k}": float(v) for k, v in zip(self.names, values)}
        out.update({f"threshold/{k}": float(b) for k, b in zip(self.names, self.thresholds)})
        self.lam, self.step_thresholds = dual_step(self.lam, self.thresholds, values, self.cfg.dual_lr), self.thresholds
        out.update({f"lambda/{k}": float(v) for k, v in zip(self.names, self.lam)})
        check_multipliers(self.lam, self.cfg.lambda_bound, self.names, values, self.thresholds)
        self.steps += 1
        self._window += total
        if self.cfg.ratchet_every and self.steps % self.cfg.ratchet_every == 0:
            self.thresholds = self.cfg.ratchet_relax * self._window[:-1] / self._window[-1].clamp_min(1.0)
            self._window.zero_()
            log.info("MOPO thresholds ratcheted to %s", {k: round(float(b), 4) for k, b in zip(self.names, self.thresholds)})
        return out

    def state(self) -> Dict[str, Any]:
        return {"lambda": self.lam.tolist(), "thresholds": self.thresholds.tolist(), "steps": self.steps,
                "window": self._window.tolist(), "step_thresholds": self.step_thresholds.tolist()}

    def load_state(self, state: Dict[str, Any]) -> None:
        if not state:
            return
        self.lam = torch.tensor(state["lambda"], dtype=torch.float64)
        self.thresholds = torch.tensor(state["thresholds"], dtype=torch.float64)
        self.steps = int(state["steps"])
        self._window = torch.tensor(state["window"], dtype=torch.float64)
        self.step_thresholds = torch.tensor(state.get("step_thresholds", state["thresholds"]), dtype=torch.float64)

    @staticmethod
    def final_duals(state: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(λ, thresholds)`` of the last dual step from a :meth:`state`: the multipliers it reached and
        the thresholds it stepped against (a ratchet at that step only changes the next step's)."""
        as_tensor = lambda key: torch.tensor(state[key], dtype=torch.float64)  # noqa: E731
        return as_tensor("lambda"), as_tensor("step_thresholds")


def run(job: MOPOJobConfig) -> Dict[str, Any]:
    """Train one MOPO policy and export it to ``job.out``. Returns the final metrics, with each
    constraint's final estimate under ``constraints_report`` (also in ``moray.json``).

    Fails before Ray starts on bad rows, unknown objectives and thresholds no policy over the
    candidates can reach together (or only on the boundary). Raises :class:`ConstraintsUnmet`
    after exporting when a final estimate misses its threshold, unless ``accept_unmet``."""
    job = job.validate()
    table, report = load_candidates(job)
    names = list(job.constraints)
    thresholds = torch.tensor([job.constraints[k] for k in names], dtype=torch.float64)
    w = win_rate_tensor(table, [job.objective, *names])
    check_feasible(w[:, :, 1:], thresholds, names)
    p_bar, q_bar, mask = masked_win_rates(w[:, :, 0], w[:, :, 1:])
    if job.dual_init == "solve":
        lam0 = solve_dual(p_bar, q_bar, thresholds, job.tau, mask)
        log.info("MOPO multipliers start at the dual's minimiser on the %d prompts' candidates: %s", len(p_bar),
                 {k: round(float(v), 4) for k, v in zip(names, lam0)})
        job = dataclasses.replace(job, initial_lambda={k: float(v) for k, v in zip(names, lam0)})
    metadata = policy_metadata(job, method="mopo", loss="mopo", constraints=job.constraints, tau=job.tau,
                               dual_lr=job.dual_lr, dual_init=job.dual_init, candidates=int(q_bar.shape[1]))
    metrics = train_on_rows(MOPOTask, job, table, report, metadata, f"mopo-{job.objective}",
                            unit="prompts")
    lam, final_b = MOPOTask.final_duals(metrics[FINAL_TASK_STATE])
    done = constraint_report(p_bar, q_bar, lam, final_b, job.tau, names, job.constraint_slack, mask)
    met = all(c["satisfied"] for c in done.values())
    write_metadata(job.out, read_metadata(job.out).with_entries(
        constraints_report=done, constraints_met=met, constraint_slack=job.constraint_slack))
    metrics.update(constraints_report=done, constraints_met=met)
    for k, c in done.items():
        log.info("MOPO constraint %s: final estimate %.4f against threshold %.4f (lambda %.3f): %s", k, c["estimate"],
                 c["threshold"], c["lambda"], "met" if c["satisfied"] else "NOT MET")
    missed = [f"{k} {c['estimate']:.4f} < {c['threshold']:.4f}" for k, c in done.items() if not c["satisfied"]]
    if missed:
        message = (f"MOPO ended with its constraints unmet ({'; '.join(missed)}, slack {job.constraint_slack}); "
                   f"the policy was exported to {job.out} and its {METADATA_FILE} records the miss")
        if not job.accept_unmet:
            raise ConstraintsUnmet(message + " (accept_unmet=true exits 0 with it)")
        log.warning("%s -- accepted (accept_unmet)", message)
    return metrics


JOB = Job("mopo", "MOPO: maximise --objective with the --constraints held (§4)", MOPOJobConfig, MOPOTask, run, flags=(
    Flag("--constraints", "constraints", parse=parse_numbers, help="secondary objectives' win-rate thresholds, "
                                                             "e.g. sentiment=0.5"),
    Flag("--tau", "tau", float, help="KL weight τ (default 0.1)"),
    Flag("--dual-lr", "dual_lr", float, help="dual step size on λ (default 1)"),
    Flag("--lambda-bound", "lambda_bound", float, help="stop when a multiplier passes this"),
    Flag("--dual-init", "dual_init", choices=("solve", "zero"),
         help="start λ at the dual's minimiser on the candidates (solve, default) or at 0"),
    Flag("--accept-unmet", "accept_unmet", switch=True,
         help="exit 0 even if a constraint's final estimate misses its threshold (moray.json says so)"),
))
