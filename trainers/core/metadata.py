"""``moray.json``: what a trained or merged checkpoint is, written and read here only.

Every exported directory carries one :class:`PolicyMetadata`. Its ``kind`` is a key of
:data:`KINDS`, the one table of what may be written there; mixers, the server and the reward-model
loader read the kind's row instead of comparing strings. The JSON on disk is a flat object: the
kind, the objective, the reference model and β where known, then the writer's own entries.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from trainers.core import storage

METADATA_FILE = "moray.json"


@dataclass(frozen=True)
class Kind:
    """One kind of exported directory."""

    name: str
    what: str  # how a sentence names it ("a reward model")
    mixable: bool  # a policy that mixers and the server accept


KINDS: Dict[str, Kind] = {k.name: k for k in (
    Kind("policy", "a policy", mixable=True),  # trained by a job in trainers/jobs
    Kind("soup", "a merged policy", mixable=True),  # `moray mix soup`'s weighted merge of policies
    # `moray train conditioned`: the base, one LoRA per objective (vertices/<k>/), any λ their soup
    Kind("conditioned", "a preference-conditioned policy", mixable=True),
    Kind("reward_model", "a reward model", mixable=False),  # `moray train reward`'s Bradley-Terry scorer
)}
NAMED = ("kind", "objective", "reference_model", "beta")  # the fields with a name of their own


@dataclass(frozen=True)
class PolicyMetadata:
    """A directory's ``moray.json``. ``kind`` is a key of :data:`KINDS` (None in a file written
    without one); ``entries`` holds the writer's other fields (method, loss, data, rows, ...)."""

    kind: Optional[str]  # a key of KINDS when written
    objective: Optional[str] = None
    reference_model: Optional[str] = None  # the model a policy was trained from (its reference)
    beta: Optional[float] = None
    entries: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mixable(self) -> bool:
        return self.kind in KINDS and KINDS[self.kind].mixable

    def describe(self) -> str:
        """How a log sentence names what was trained: 'a reward model', 'a DPO policy'."""
        if self.kind != "policy":
            return KINDS[self.kind].what if self.kind in KINDS else "a checkpoint"
        return f"a {(self.entries.get('method') or self.entries.get('loss', '')).upper()} policy"

    def get(self, key: str, default: Any = None) -> Any:
        """A field by its name in the JSON."""
        if key in NAMED:
            value = getattr(self, key)
            return default if value is None else value
        return self.entries.get(key, default)

    def with_entries(self, **entries: Any) -> "PolicyMetadata":
        """A copy with ``entries`` set (a named field by its name, the rest among ``entries``)."""
        named = {k: entries.pop(k) for k in NAMED if k in entries}
        return dataclasses.replace(self, **named, entries={**self.entries, **entries})

    def to_json(self) -> Dict[str, Any]:
        named = {k: getattr(self, k) for k in NAMED if getattr(self, k) is not None}
        return {**named, **self.entries}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PolicyMetadata":
        named = {k: data[k] for k in NAMED[1:] if k in data}
        return cls(kind=data.get("kind"), **named, entries={k: v for k, v in data.items() if k not in NAMED})


def write_metadata(policy_dir: str, metadata: PolicyMetadata) -> None:
    """``moray.json`` in a local directory or at a storage URI (its kind one of :data:`KINDS`; a
    file read back keeps whatever kind it had, so that a newer writer's kind is named, not lost)."""
    if metadata.kind is not None and metadata.kind not in KINDS:
        raise ValueError(f"unknown {METADATA_FILE} kind {metadata.kind!r}; known: {sorted(KINDS)}")
    storage.write_text(storage.join(policy_dir, METADATA_FILE),
                       json.dumps(metadata.to_json(), indent=2, sort_keys=True))


def read_metadata(policy_dir: str) -> PolicyMetadata:
    path = storage.join(policy_dir, METADATA_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{policy_dir} has no {METADATA_FILE}: not a Moray policy")
    return PolicyMetadata.from_json(json.loads(storage.read_text(path)))


def has_kind(policy_dir: str, kind: str) -> bool:
    """Whether ``policy_dir`` (local) holds a ``moray.json`` of ``kind``."""
    path = storage.join(policy_dir, METADATA_FILE)
    return storage.exists(path) and read_metadata(policy_dir).kind == kind
