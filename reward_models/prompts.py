"""Offline prompts and text for the demo and the tiny test models (no downloads).

Prompts ask for short reviews, descriptions and opinions: room for both sentiment and
conciseness to move. A pool (:data:`POOLS`) is every topic under every question form;
:func:`prompt_split` cuts it, by seed, into training prompts and held-out prompts that no
training, pair sampling or weight search sees. ``tiny_corpus`` writes answer-like text of varied
tone and length, used to train the tiny tokenizer and to warm-start the tiny model so it writes
words and stops.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

TOPICS = ["coffee shop", "movie", "novel", "hiking trail", "phone", "restaurant", "museum", "song",
          "city park", "video game", "laptop", "bakery", "concert", "hotel", "podcast", "train ride",
          "board game", "beach", "bookstore", "television show", "bicycle", "garden", "camera", "zoo"]
ASKS = ["Write a short review of a {t}.", "Describe a {t} you visited recently.",
        "What do you think of the new {t}?", "Give your opinion of a {t}.",
        "Tell me about a {t} in a few words.", "How was the {t}?"]
# the prompt pool adds these to TOPICS (the tiny model's warm-start text keeps TOPICS and ASKS)
MORE_TOPICS = ["airport", "library", "gym", "pizza", "theater play", "art gallery", "smartwatch", "headphones",
               "ski resort", "farmers market", "cooking class", "car", "apartment", "music festival", "tea house",
               "documentary", "pair of sneakers", "amusement park", "ferry trip", "office chair", "music album",
               "yoga class", "campsite", "ice cream shop"]
# question forms of the prompt pool: each asks for a short answer, so the base's answers end well
# before the evaluation's cap and the length objective is measured, not cut off
SHORT_ASKS = ["Write a short review of the {t}.", "Describe the {t} in two sentences.",
              "In a sentence or two, what do you think of the {t}?", "Give a brief opinion of the {t}.",
              "Tell me about the {t} in a few words.", "How was the {t}? Answer briefly.",
              "Sum up the {t} in one sentence.", "Would you recommend the {t}? Say why in a sentence.",
              "What is the best thing about the {t}? Be brief.", "What is the worst thing about the {t}? Be brief.",
              "Rate the {t} and give one reason.", "Write a one-line note to a friend about the {t}.",
              "Describe a {t} you visited recently, briefly.", "What do you think of the new {t}? Keep it short.",
              "Compare the {t} with one you knew before, in a sentence.", "Give your opinion of a {t} in a few words."]
PROMPT_TOPICS = TOPICS + MORE_TOPICS
PROMPT_FORMS = SHORT_ASKS
# the named prompt pools: topics x question forms. "tiny": the forms and topics the tiny model was
# warm-started on (144 prompts; its tokenizer knows no other topic)
POOLS = {"short": (PROMPT_TOPICS, PROMPT_FORMS), "tiny": (TOPICS, ASKS)}
POSITIVE = ["great", "wonderful", "lovely", "excellent", "delightful", "happy", "amazing", "good",
            "beautiful", "friendly", "fun", "charming"]
NEGATIVE = ["awful", "terrible", "boring", "bad", "disappointing", "sad", "ugly", "rude", "noisy",
            "dull", "horrible", "poor"]
NEUTRAL = ["fine", "okay", "average", "ordinary", "plain", "typical"]
FILLERS = ["I went there last week.", "It was busy that day.", "The staff were there all day.",
           "We stayed for an hour.", "It is near the station.", "My friend came along too.",
           "The price was what I expected.", "There were many people around."]


def prompt_pool(seed: int = 0, pool: str = "short") -> List[str]:
    """Every topic under every question form of ``pool`` (:data:`POOLS`), distinct, shuffled by ``seed``."""
    if pool not in POOLS:
        raise ValueError(f"unknown prompt pool {pool!r}; known: {sorted(POOLS)}")
    topics, forms = POOLS[pool]
    combos = [a.format(t=t) for t in topics for a in forms]
    random.Random(seed).shuffle(combos)
    return combos


def demo_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct review/opinion prompts of the 144 the tiny model knows (``demo:N``), wrapping
    around if n is larger."""
    combos = prompt_pool(seed, "tiny")
    return [combos[i % len(combos)] for i in range(n)]


@dataclass
class PromptSplit:
    """Training prompts (pair sampling, training, MPO's weight search take theirs from these) and
    held-out prompts (evaluation only), disjoint, from the pool shuffled by ``seed``."""
    seed: int
    pool: str
    train: List[str]
    heldout: List[str]

    def record(self) -> Dict[str, Any]:
        """The split as the study's JSON states it."""
        topics, forms = POOLS[self.pool]
        return {"seed": self.seed, "pool_name": self.pool, "pool": len(topics) * len(forms), "topics": len(topics),
                "question_forms": len(forms), "train": self.train, "heldout": self.heldout}


def prompt_split(train: int, heldout: int, seed: int = 0, pool: str = "short") -> PromptSplit:
    """``train`` prompts from the front of the shuffled pool, ``heldout`` from its back (the one
    does not move when the other's count changes). ValueError when the pool cannot hold both."""
    prompts = prompt_pool(seed, pool)
    if train < 0 or heldout < 0 or train + heldout > len(prompts):
        topics, forms = POOLS[pool]
        raise ValueError(f"{train} training + {heldout} held-out prompts: the {pool!r} pool has {len(prompts)} "
                         f"({len(topics)} topics x {len(forms)} question forms)")
    return PromptSplit(seed, pool, prompts[:train], prompts[::-1][:heldout])


def tiny_corpus(n: int, seed: int = 0) -> List[str]:
    """Prompt-and-answer text of mixed tone and length, to train the tiny tokenizer on."""
    return [p + " " + a for p, a in tiny_dialogues(n, seed)]


def tiny_dialogues(n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """``(prompt, answer)`` pairs of mixed tone and length, to warm-start the tiny model."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        words = rng.choice([POSITIVE, NEGATIVE, NEUTRAL])
        answer = f"The {topic} was {rng.choice(words)}."
        for _ in range(rng.randint(0, 4)):
            answer += " " + rng.choice(FILLERS + [f"It felt {rng.choice(words)}.", f"Really {rng.choice(words)}."])
        out.append((rng.choice(ASKS).format(t=topic), answer))
    return out


def load_prompts(spec: str, column: str = "prompt", split: str = "train") -> List[str]:
    """Prompts from ``demo:N`` (built-in), a ``.txt`` file (one per line), a jsonl or parquet file,
    a ``datasets`` ``save_to_disk`` directory or a hub dataset name (``column`` of ``split``).
    Empty prompts are an error naming the row."""
    import json
    from pathlib import Path

    if spec.startswith("demo:"):
        return demo_prompts(int(spec.split(":", 1)[1]))
    path = Path(spec)
    if path.suffix == ".txt" and path.is_file():
        values = [line for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".jsonl" and path.is_file():
        values = [json.loads(line).get(column) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".parquet" and path.is_file():
        import pyarrow.parquet as pq

        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    else:
        import datasets

        if path.is_dir():
            ds = datasets.load_from_disk(spec)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif "/" in spec and not path.exists():
            ds = datasets.load_dataset(spec, split=split)
        else:
            raise FileNotFoundError(f"{spec}: no such file (or use demo:N, a dataset directory or a hub name)")
        if column not in ds.column_names:
            raise ValueError(f"{spec}: no column {column!r}; has {ds.column_names}")
        values = ds[column]
    bad = [i for i, p in enumerate(values) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{spec}: rows {bad[:20]} have no non-empty {column!r}")
    if not values:
        raise ValueError(f"{spec}: no prompts")
    return [p.strip() for p in values]
