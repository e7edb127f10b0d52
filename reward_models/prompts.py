"""Offline prompts and text for the demo and the tiny test models (no downloads).

Prompts ask for short reviews, descriptions and opinions: room for both sentiment and
conciseness to move. ``tiny_corpus`` writes answer-like text of varied tone and length, used to
train the tiny tokenizer and to warm-start the tiny model so it writes words and stops.
"""

from __future__ import annotations

import random
from typing import List, Tuple

TOPICS = ["coffee shop", "movie", "novel", "hiking trail", "phone", "restaurant", "museum", "song",
          "city park", "video game", "laptop", "bakery", "concert", "hotel", "podcast", "train ride",
          "board game", "beach", "bookstore", "television show", "bicycle", "garden", "camera", "zoo"]
ASKS = ["Write a short review of a {t}.", "Describe a {t} you visited recently.",
        "What do you think of the new {t}?", "Give your opinion of a {t}.",
        "Tell me about a {t} in a few words.", "How was the {t}?"]
POSITIVE = ["great", "wonderful", "lovely", "excellent", "delightful", "happy", "amazing", "good",
            "beautiful", "friendly", "fun", "charming"]
NEGATIVE = ["awful", "terrible", "boring", "bad", "disappointing", "sad", "ugly", "rude", "noisy",
            "dull", "horrible", "poor"]
NEUTRAL = ["fine", "okay", "average", "ordinary", "plain", "typical"]
FILLERS = ["I went there last week.", "It was busy that day.", "The staff were there all day.",
           "We stayed for an hour.", "It is near the station.", "My friend came along too.",
           "The price was what I expected.", "There were many people around."]


def demo_prompts(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct review/opinion prompts (wrapping around the templates if n is large)."""
    combos = [a.format(t=t) for t in TOPICS for a in ASKS]
    random.Random(seed).shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


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
