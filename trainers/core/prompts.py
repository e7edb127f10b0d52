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
            raise ValueError("chat template does not render the prompt as a prefix of the conversation; "
                             "pass plain-string columns instead")
        ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return ids[:max_length] if max_length else ids


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
