"""The one prompt renderer: the same chat row gives the same token ids in the training path
(pair files through Tokenize), in the server (/v1/chat/completions), in sampling (pairs, eval,
MPO) and in online GAPO's rollouts; plain text the same in training and /v1/completions."""

import json

import numpy as np

from reward_models.sampling import Generate
from serving.api import Limits, parse_request
from tests.helpers import write_jsonl
from trainers.core.models import load_tokenizer
from trainers.job_config import DataConfig
from trainers.core.prompts import (
    ask,
    encode,
    encode_response,
    left_pad,
    render,
    user_turn,
)
from trainers.data import Tokenize, load_pairs
from trainers.rollout import TokenizePrompts

LIMITS = Limits(("a",), (1.0,), "logits", 8, 64, 4096)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the park."}]


def _training_prompt_ids(tiny_model, tmp_path, prompt, **row):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": "It is lovely.",
                                                   "rejected": "It is awful.", **row}])
    table, _ = load_pairs(DataConfig(path=path), "x")
    cols = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
    out = Tokenize(tiny_model, 256, 256)(cols)
    return out["chosen_ids"][0][: out["chosen_start"][0]].tolist()


def test_a_chat_row_has_the_same_token_ids_in_training_and_in_the_server(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    trained = _training_prompt_ids(tiny_model, tmp_path, CHAT)
    served = parse_request({"messages": CHAT}, True, tok, LIMITS).prompt_ids
    assert trained == served == encode(tok, CHAT)
    assert tok.decode(served).endswith("<|assistant|>")


def test_plain_text_is_the_same_in_training_and_in_completions(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    trained = _training_prompt_ids(tiny_model, tmp_path, "Write about the coffee.")
    assert trained == parse_request({"prompt": "Write about the coffee."}, False, tok, LIMITS).prompt_ids
    assert trained == tok("Write about the coffee.")["input_ids"]  # with the tokenizer's own special tokens


def test_sampling_and_online_rollouts_ask_as_the_server_does(tiny_model):
    tok = load_tokenizer(tiny_model)
    question = "How was the movie?"
    served = parse_request({"messages": user_turn(question)}, True, tok, LIMITS).prompt_ids
    sampled = Generate(tiny_model, 2, 2, 1.0, 1.0, seed=0, keep_ids=True)(
        {"prompt": np.array([question], dtype=object), "row": np.arange(1)})
    assert json.loads(sampled["prompt_ids"][0]) == served
    online = TokenizePrompts(tiny_model, 256, 256)({"idx": np.arange(1), "prompt": np.array([question], dtype=object)})
    assert online["prompt_ids"][0].tolist() == served
    assert ask(tok, question) == user_turn(question)


def test_responses_truncation_and_left_padding(tiny_model):
    tok = load_tokenizer(tiny_model)
    plain = encode_response(tok, "Q", "It is lovely.")
    assert plain[-1] == tok.eos_token_id and len(encode_response(tok, "Q", "It is lovely.", 2)) == 2
    chat = encode_response(tok, CHAT, [{"role": "assistant", "content": "Lovely."}])
    assert tok.decode(chat) == "Lovely.<|end|>"
    full = encode(tok, CHAT)
    assert encode(tok, CHAT, 5) == full[-5:]
    assert render(tok, "as is") == "as is"
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
