"""Preference pairs into a Ray Dataset: read, map columns, validate, tokenize.

Sources: jsonl, parquet (a file or a directory of them), a directory written by ``datasets``'
``save_to_disk``, or a hub dataset name. Every source row becomes ``prompt``, ``chosen``,
``rejected`` -- strings, or chat message lists rendered with the tokenizer's chat template --
after an optional column mapping (:class:`~trainers.job_config.DataConfig`). Multi-objective pair
files (two responses plus one "which is better" label per objective) are turned into pairs for
the requested objective.

Validation runs on the driver before any compute and names the file and row numbers of each
bad row; ``skip_invalid`` drops them instead and reports how many.

Tokenized rows (:class:`Tokenize`, run in ``map_batches``) hold ``chosen_ids`` and
``rejected_ids`` (prompt + response token ids) and ``chosen_start`` / ``rejected_start``, the
index of the first response token: only positions ``>= start`` count in a log-prob.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainers.batches import RIDER_PREFIXES, response_names
from trainers.core import storage
from trainers.core.models import load_tokenizer
from trainers.core.prompts import encode, encode_response, split_prompt
from trainers.job_config import DataConfig

log = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
CHUNK_ROWS = 8192  # rows validated between two Arrow record batches


class PreferenceDataError(ValueError):
    """Malformed preference data; the message names files and row numbers."""


@dataclass
class SourceRows:
    """Rows of one source file (or HF split), read lazily (iterate once), with their origin for
    error messages."""

    name: str
    rows: Iterable[Dict[str, Any]]


@dataclass
class StagedRows:
    """Validated rows too large for the driver's memory, in a parquet file (a local path or a
    storage URI every node reaches) that Ray Data reads on the cluster."""

    path: str
    num_rows: int


@dataclass
class LoadReport:
    total: int = 0
    kept: int = 0
    skipped: int = 0
    problems: Dict[str, List[int]] = field(default_factory=dict)  # "file: reason" -> row numbers


def _resolve_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_file():
        if p.suffix in (".jsonl", ".json"):
            return "jsonl"
        if p.suffix == ".parquet":
            return "parquet"
        raise PreferenceDataError(f"{path}: cannot tell the format from the suffix; set data.format")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or any(p.glob("*/dataset_info.json")):
            return "hf"
        if any(p.glob("*.parquet")):
            return "parquet"
        if any(p.glob("*.jsonl")):
            return "jsonl"
        raise PreferenceDataError(f"{path}: directory holds no .parquet, .jsonl or HF dataset")
    if "/" in path and not path.startswith((".", "/")):
        return "hf"  # looks like a hub name: owner/dataset
    raise PreferenceDataError(f"{path}: no such file or directory")


def _files(path: str, suffix: str) -> List[Path]:
    p = Path(path)
    return [p] if p.is_file() else sorted(p.glob(f"*{suffix}"))


def _jsonl_rows(f: Path) -> Iterator[Dict[str, Any]]:
    with open(f) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{f}: line {lineno} is not valid JSON ({e.msg})") from None
            yield obj if isinstance(obj, dict) else {"__not_an_object__": obj}


def _parquet_rows(f: Path) -> Iterator[Dict[str, Any]]:
    for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS):
        yield from batch.to_pylist()


def read_source(path: str, fmt: str = "auto", split: str = "train") -> List[SourceRows]:
    """The sources' rows, read as they are iterated (a file is never held whole), keeping file
    names so errors can point at them."""
    fmt = _resolve_format(path, fmt)
    if fmt == "jsonl":
        return [SourceRows(str(f), _jsonl_rows(f)) for f in _files(path, ".jsonl")]
    if fmt == "parquet":
        return [SourceRows(str(f), _parquet_rows(f)) for f in _files(path, ".parquet")]
    if fmt == "hf":
        import datasets

        if Path(path).exists():
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PreferenceDataError(f"{path}: no split {split!r}; has {sorted(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split)
        return [SourceRows(f"{path}[{split}]", iter(ds))]  # Arrow-backed, memory-mapped
    raise PreferenceDataError(f"unknown data format {fmt!r}; use jsonl, parquet or hf")


def _is_messages(v: Any) -> bool:
    return (isinstance(v, list) and len(v) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        and m["content"].strip() for m in v))


def field_problem(v: Any) -> Optional[str]:
    if v is None:
        return "missing"
    if isinstance(v, str):
        return None if v.strip() else "empty"
    if isinstance(v, list):
        return None if _is_messages(v) else "malformed chat messages"
    return f"not a string ({type(v).__name__})"


def map_row(row: Dict[str, Any], cfg: DataConfig, objective: str, also: Sequence[str] = (),
            extra: Sequence[str] = ()) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """One source row -> ``{prompt, chosen, rejected}`` or a reason it is invalid.

    ``also`` (multi-objective files): objectives whose preference is read too, as
    ``sign_<objective>``: +1 when it prefers the same response as ``objective``, -1 otherwise.
    ``extra``: further response fields every row must hold (WRPO's ``source``), validated alike.
    """
    if "__not_an_object__" in row:
        return None, "not a JSON object"
    get = lambda name: row.get(cfg.columns.get(name, name))  # noqa: E731
    if cfg.objective_labels:
        labels = {}
        for k in [objective, *also]:
            label_col = cfg.objective_labels[k]
            labels[k] = row.get(label_col)
            if isinstance(labels[k], bool) or labels[k] not in (0, 1):
                return None, f"{label_col} must be 0 or 1"
        a, b = (row.get(c) for c in cfg.response_columns)
        chosen, rejected = (a, b) if labels[objective] == 0 else (b, a)
        out = {"prompt": get("prompt"), "chosen": chosen, "rejected": rejected,
               **{f"sign_{k}": 1.0 if labels[k] == labels[objective] else -1.0 for k in also}}
    else:
        out = {k: get(k) for k in FIELDS}
    out.update({k: get(k) for k in extra})
    responses = ("chosen", "rejected", *extra)
    for k in responses:
        problem = field_problem(out[k])
        if problem:
            return None, f"{k} {problem}"
    out, problem = split_prompt(out, responses)
    if problem:
        return None, problem
    for k in FIELDS:
        problem = field_problem(out[k])
        if problem:
            return None, f"{k} {problem}"
    if out["chosen"] == out["rejected"]:
        return None, "chosen == rejected"
    if "source" in extra and out["source"] == out["rejected"]:
        return None, "source == rejected"
    return out, None


def _ranges(rows: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:20])
    return shown + (f", … ({len(rows)} rows)" if len(rows) > 20 else "")


def settle_problems(report: LoadReport, skip_invalid: bool, what: str) -> int:
    """Raise listing every bad row (file: reason, row numbers) unless ``skip_invalid``, which
    warns instead; returns how many rows were bad."""
    bad = sum(len(v) for v in report.problems.values())
    if bad:
        detail = "; ".join(f"{k} (row {_ranges(v)})" for k, v in report.problems.items())
        if not skip_invalid:
            raise PreferenceDataError(f"{bad} invalid {what} rows (rows count from 0 per file): "
                                      f"{detail}. Fix them or set data.skip_invalid=true.")
        log.warning("skipped %d of %d invalid %s rows: %s", bad, report.total, what, detail)
    return bad


def load_pairs(cfg: DataConfig, objective: str, also: Sequence[str] = (), extra: Sequence[str] = (),
               stage: str = "") -> Tuple[Union[pa.Table, StagedRows], LoadReport]:
    """Read, map and validate, a chunk of rows at a time; return a table of ``idx, prompt, chosen,
    rejected`` (+ ``extra`` response columns, e.g. WRPO's ``source``). Rows beyond
    ``cfg.in_memory_mb`` of Arrow data are written to a parquet file under ``stage`` (a local path
    or URI) as they come, and :class:`StagedRows` is returned instead: the driver then never holds
    the data.

    Chat message lists are stored as JSON strings (``is_chat`` column) so the table has one
    schema; :class:`Tokenize` renders them with the chat template. Raises
    :class:`PreferenceDataError` listing every bad row unless ``cfg.skip_invalid``. ``also``: other
    objectives' labels of the same pairs as ``sign_<objective>`` columns (see :func:`map_row`).
    """
    for k in [objective, *also]:
        if cfg.objective_labels and k not in cfg.objective_labels:
            raise PreferenceDataError(f"objective {k!r} is not in data.objective_labels "
                                      f"({sorted(cfg.objective_labels)})")
    if also and not cfg.objective_labels:
        raise PreferenceDataError("several objectives on the same pairs need data.response_columns "
                                  "and data.objective_labels")
    report = LoadReport()
    fields = (*FIELDS, *extra)
    schema = pa.schema([("idx", pa.int64()), *((k, pa.string()) for k in fields), ("is_chat", pa.bool_()),
                        *((f"sign_{k}", pa.float64()) for k in also)])
    sink = RowSink(schema, stage, cfg.in_memory_mb * 2**20)
    kept: Dict[str, List[Any]] = {name: [] for name in schema.names if name != "idx"}
    for src in read_source(cfg.path, cfg.format, cfg.split):
        for i, row in enumerate(src.rows):
            report.total += 1
            mapped, problem = map_row(row, cfg, objective, also, extra)
            if problem:
                report.problems.setdefault(f"{src.name}: {problem}", []).append(i)
                continue
            is_chat = any(isinstance(mapped[k], list) for k in fields)
            for k in fields:
                v = mapped[k]
                if is_chat and isinstance(v, str):
                    v = [{"role": "user" if k == "prompt" else "assistant", "content": v}]
                kept[k].append(json.dumps(v) if is_chat else v)
            kept["is_chat"].append(is_chat)
            for k in also:
                kept[f"sign_{k}"].append(mapped[f"sign_{k}"])
            if len(kept["is_chat"]) == CHUNK_ROWS:
                sink.add(kept)
    sink.add(kept)
    if report.total == 0:
        raise PreferenceDataError(f"{cfg.path}: no rows")
    report.skipped = settle_problems(report, cfg.skip_invalid, "preference")
    report.kept = sink.rows
    if report.kept == 0:
        raise PreferenceDataError(f"{cfg.path}: every row was invalid")
    return sink.finish(), report


class RowSink:
    """Validated rows as Arrow record batches: kept in memory up to ``limit`` bytes, then written
    (those first, and every later one) to ``<stage>/rows.parquet``."""

    def __init__(self, schema: pa.Schema, stage: str, limit: int):
        self.schema, self.stage, self.limit = schema, stage, limit
        self.batches: List[pa.RecordBatch] = []
        self.rows = self.held = 0
        self.writer = None

    def add(self, columns: Dict[str, List[Any]]) -> None:
        """Append the rows in ``columns`` (emptied)."""
        n = len(columns["is_chat"])
        if not n:
            return
        idx = pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64))
        batch = pa.record_batch([idx, *(pa.array(columns[f.name], f.type) for f in self.schema if f.name != "idx")],
                                schema=self.schema)
        for v in columns.values():
            v.clear()
        self.rows += n
        if self.writer is None and self.stage and self.held + batch.nbytes > self.limit:
            self._spill()
        if self.writer is not None:
            self.writer.write_batch(batch)
        else:
            self.batches.append(batch)
            self.held += batch.nbytes

    def finish(self) -> Union[pa.Table, StagedRows]:
        if self.writer is None:
            return pa.Table.from_batches(self.batches, self.schema)
        self.writer.close()
        return StagedRows(storage.join(self.stage, "rows.parquet"), self.rows)

    def _spill(self) -> None:
        fs, path = storage.filesystem(storage.join(self.stage, "rows.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        log.info("the validated rows pass %d MB: writing them to %s", self.limit // 2**20, self.stage)
        self.writer = pq.ParquetWriter(path, self.schema, filesystem=fs)
        for b in self.batches:
            self.writer.write_batch(b)
        self.batches, self.held = [], 0
        pa.default_memory_pool().release_unused()  # the pool would otherwise keep what the batches held


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, is_chat: bool,
                  max_prompt_length: int, max_response_length: int) -> Dict[str, Any]:
    """Token ids for one pair (see :func:`tokenize_responses`)."""
    return tokenize_responses(tokenizer, prompt, {"chosen": chosen, "rejected": rejected}, is_chat,
                              max_prompt_length, max_response_length)


def tokenize_responses(tokenizer, prompt: str, responses: Dict[str, str], is_chat: bool,
                       max_prompt_length: int, max_response_length: int) -> Dict[str, Any]:
    """``<name>_ids`` (prompt + response token ids) and ``<name>_start`` for each response of one
    prompt (chat rows: JSON message lists), rendered by :mod:`trainers.core.prompts`: the prompt
    truncated from the left, responses from the right; plain-string responses end with EOS."""
    p = json.loads(prompt) if is_chat else prompt
    try:
        prompt_ids = encode(tokenizer, p, max_prompt_length)
        out: Dict[str, Any] = {}
        for name, response in responses.items():
            ids = encode_response(tokenizer, p, json.loads(response) if is_chat else response, max_response_length)
            out[f"{name}_ids"] = np.asarray(prompt_ids + ids, dtype=np.int64)
            out[f"{name}_start"] = len(prompt_ids)
    except ValueError as e:  # a chat template that does not render the prompt as a prefix
        raise PreferenceDataError(str(e)) from None
    return out


class Tokenize:
    """``map_batches`` callable: string rows -> token ids and response starts for every response
    column (``chosen``, ``rejected``, and ``source`` / ``cand_i`` where present)."""

    def __init__(self, tokenizer_path: str, max_prompt_length: int, max_response_length: int,
                 trust_remote_code: bool = False):
        self.tok = load_tokenizer(tokenizer_path, trust_remote_code)
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        names = response_names(k for k in batch if k not in ("prompt", "is_chat", "idx") and not k.endswith("_ids"))
        cols: Dict[str, List[Any]] = {f"{k}_{part}": [] for k in names for part in ("ids", "start")}
        for i, (p, chat) in enumerate(zip(batch["prompt"], batch["is_chat"])):
            t = tokenize_responses(self.tok, p, {k: batch[k][i] for k in names}, bool(chat),
                                   self.max_prompt_length, self.max_response_length)
            for k in cols:
                cols[k].append(t[k])
        n = len(batch["idx"])
        return {
            **{k: v for k, v in batch.items() if k.startswith(RIDER_PREFIXES)},  # labels and win-rates ride along
            "idx": batch["idx"],
            **{f"{k}_ids": ragged(cols[f"{k}_ids"]) for k in names},
            **{f"{k}_start": np.asarray(cols[f"{k}_start"], dtype=np.int64).reshape(n) for k in names},
        }


def ragged(arrays: List[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out
