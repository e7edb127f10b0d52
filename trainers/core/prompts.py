"""The one prompt renderer: how a prompt becomes the token ids a model continues, the same in
training, pair sampling, online GAPO, evaluation and serving.

A prompt is either a list of chat messages (``[{"role": "user", "content": ...}, ...]``), rendered
with the tokenizer's chat template and a generation prompt, its tokens taken as they are (the
template already carries the BOS the model wants); or plain text (``/v1/completions``,
plain-string pair files), tokenized with the tokenizer's own special tokens. :func:`ask` is how
Moray puts a plain question to a model: a user turn when the tokenizer has a chat template.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

Messages = List[Dict[str, str]]
Prompt = Union[str, Messages]


def user_turn(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def ask(tokenizer, text: str) -> Prompt:
    """A plain question as the model is asked it: a user turn under a chat template, else the text."""
    return user_turn(text) if has_chat_template(tokenizer) else text


def render(tokenizer, prompt: Prompt) -> str:
    """The text the model continues."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


def encode(tokenizer, prompt: Prompt, max_length: Optional[int] = None) -> List[int]:
    """The prompt's token ids (the last ``max_length`` of them when given: prompts lose their start)."""
    ids = tokenizer(render(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]
    return ids[-max_length:] if max_length else ids


def encode_response(tokenizer, prompt: Prompt, response: Prompt, max_length: Optional[int] = None) -> List[int]:
    """The token ids of ``response`` after ``prompt``, as training sees them (the first
    ``max_length``). Chat: the messages the template renders after the prompt's generation prompt;
    plain text: the text itself, ending with EOS (added if missing) so a policy learns to stop."""
    if isinstance(prompt, str) != isinstance(response, str):
        raise ValueError("a prompt and its response must both be text or both be chat messages")
    if isinstance(response, str):
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
    else:
        prompt_text = render(tokenizer, prompt)
        full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as the start of the conversation "
                             "(templates that rewrite earlier turns once a reply follows); render the rows "
                             "to plain-string prompt/chosen/rejected with this template's turn markers")
        ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return ids[:max_length] if max_length else ids


HH_TURN = "\n\nAssistant:"  # where a plain-text transcript (HH-RLHF) hands the turn to the model


def _shared_turns(responses: Sequence[Messages]) -> int:
    """How many leading messages every response shares, cut back so that each response then
    starts with an assistant turn (the only place a chat template lets a response begin)."""
    k = 0
    while all(k < len(r) for r in responses) and all(r[k] == responses[0][k] for r in responses):
        k += 1
    while k > 0 and not all(k < len(r) and r[k]["role"] == "assistant" for r in responses):
        k -= 1
    return k


def split_prompt(row: Dict[str, Any], responses: Sequence[str]) -> Tuple[Dict[str, Any], Optional[str]]:
    """``row`` with its prompt made explicit, or a reason it cannot be (rows whose fields are strings
    or message lists). When the prompt is absent, or the responses (``row[k]`` for ``k`` in
    ``responses``) repeat it, the prompt is their longest common prefix at a turn boundary --
    the shared leading messages, or plain text up to and including the last shared
    ``"\n\nAssistant:"`` -- and each response is what follows. Message responses must then begin
    with an assistant turn, or the chat template could not render them after the prompt."""
    prompt, texts = row["prompt"], [row[k] for k in responses]
    out = dict(row)
    if all(isinstance(t, str) for t in texts):
        if prompt is None:
            shared = texts[0][:next((i for i, c in enumerate(zip(*texts)) if len(set(c)) > 1), min(map(len, texts)))]
            cut = shared.rfind(HH_TURN)
            if cut < 0:
                return row, f"prompt missing, and {' and '.join(responses)} share no {HH_TURN!r} turn to split at"
            cut += len(HH_TURN)
            prompt = texts[0][:cut]
        elif isinstance(prompt, str) and prompt.strip() and all(t.startswith(prompt) for t in texts):
            cut = len(prompt)  # transcripts that repeat their prompt column
        else:
            return row, None
        out.update(prompt=prompt, **{k: t[cut:] for k, t in zip(responses, texts)})
        return out, None
    if not all(isinstance(t, list) for t in texts):
        return row, None if prompt is not None else "prompt missing"
    k = _shared_turns(texts)
    if isinstance(prompt, list) and k >= len(prompt) and texts[0][:len(prompt)] == prompt:
        out["prompt"] = texts[0][:k]  # the responses repeat the prompt's messages
    elif prompt is None or (isinstance(prompt, str) and k):
        asked = [m["content"].strip() for m in texts[0][:k] if m["role"] == "user"]
        if prompt is None and not k:
            return row, f"prompt missing, and {' and '.join(responses)} share no turns before an assistant turn"
        if prompt is not None and (not asked or asked[-1] != prompt.strip()):
            return row, "the responses begin with turns of their own that do not end with the prompt"
        out["prompt"] = texts[0][:k]
    else:
        k = 0
    for name, t in zip(responses, texts):
        if not t[k:]:
            return row, f"{name} is all prompt"
        if t[k]["role"] != "assistant":
            return row, f"{name} does not start with an assistant turn"
        out[name] = t[k:]
    return out, None


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[Any, Any]:
    """``input_ids``, ``attention_mask`` ``(N, L)`` with the sequences right-aligned (generation)."""
    import torch

    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, L - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[r, L - len(s):] = 1
    return ids, mask
