"""Public preference datasets in their published shapes (a few rows each, written here exactly as
the datasets publish them): the prompt each row's responses continue is found on the driver, at
validation, or the row is named by file and row; then each shape tokenizes."""

import json

import pytest

from tests.helpers import write_jsonl
from trainers.core.models import load_tokenizer
from trainers.data import PreferenceDataError, Tokenize, load_pairs
from trainers.job_config import DataConfig


def turn(role, content):
    return {"role": role, "content": content}


def hh_rows():
    """Anthropic/hh-rlhf: full transcripts, no prompt column."""
    return [
        {"chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list."
                   "\n\nHuman: What's your favorite one?\n\nAssistant: I haven't even thought about it.",
         "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list."
                     "\n\nHuman: What's your favorite one?\n\nAssistant: Ass."},
        {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then knead.",
         "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Buy it."},
    ]


def ultrafeedback_rows(with_prompt=True):
    """HuggingFaceH4/ultrafeedback_binarized: a prompt string plus message lists repeating the user
    turn (and the copies without the prompt column)."""
    rows = []
    for q, good, bad, sc in [("Write a haiku about rain.", "Soft rain on the roof / ...", "Rain.", (8.5, 3.0)),
                             ("What is 2+2?", "2+2 equals 4.", "It is 5.", (10.0, 1.0))]:
        row = {"prompt": q, "prompt_id": f"{abs(hash(q)):x}",
               "chosen": [turn("user", q), turn("assistant", good)],
               "rejected": [turn("user", q), turn("assistant", bad)],
               "messages": [turn("user", q), turn("assistant", good)],
               "score_chosen": sc[0], "score_rejected": sc[1]}
        if not with_prompt:
            del row["prompt"]
        rows.append(row)
    return rows


def trl_rows():
    """TRL's explicit conversational preference format."""
    return [{"prompt": [turn("system", "Be brief."), turn("user", "What color is the sky?")],
             "chosen": [turn("assistant", "Blue.")], "rejected": [turn("assistant", "Green, always.")]},
            {"prompt": [turn("user", "Name a prime.")],
             "chosen": [turn("assistant", "7")], "rejected": [turn("assistant", "8")]}]


def pku_rows():
    """PKU-Alignment/PKU-SafeRLHF: two responses, one index per objective."""
    return [{"prompt": "How can I pick a lock?", "response_0": "Call a locksmith.", "response_1": "Use a tension wrench.",
             "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
             "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 1, "safer_response_id": 0},
            {"prompt": "Tell me a joke.", "response_0": "No.", "response_1": "Why did the chicken cross the road?",
             "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
             "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 1}]


PKU = dict(response_columns=["response_0", "response_1"],
           objective_labels={"helpful": "better_response_id", "harmless": "safer_response_id"})


def chat(table, col, i):
    return json.loads(table.column(col).to_pylist()[i])


def test_hh_prompt_is_the_transcript_up_to_the_last_shared_assistant_turn(tmp_path):
    table, report = load_pairs(DataConfig(path=write_jsonl(tmp_path / "hh.jsonl", hh_rows())), "helpful")
    assert report.kept == 2 and not table.column("is_chat").to_pylist()[0]
    prompt = table.column("prompt").to_pylist()[0]
    assert prompt.endswith("What's your favorite one?\n\nAssistant:") and prompt.startswith("\n\nHuman: What are")
    assert table.column("chosen").to_pylist()[0] == " I haven't even thought about it."
    assert table.column("rejected").to_pylist()[0] == " Ass."
    assert table.column("rejected").to_pylist()[1] == " Buy it."


def test_ultrafeedback_repeated_user_turn_becomes_the_prompt(tmp_path):
    for with_prompt in (True, False):
        path = write_jsonl(tmp_path / f"uf{with_prompt}.jsonl", ultrafeedback_rows(with_prompt))
        table, report = load_pairs(DataConfig(path=path), "helpful")
        assert report.kept == 2
        assert chat(table, "prompt", 1) == [turn("user", "What is 2+2?")]
        assert chat(table, "chosen", 1) == [turn("assistant", "2+2 equals 4.")]
        assert chat(table, "rejected", 0) == [turn("assistant", "Rain.")]


def test_trl_explicit_and_pku_load_as_published(tmp_path):
    table, _ = load_pairs(DataConfig(path=write_jsonl(tmp_path / "trl.jsonl", trl_rows())), "helpful")
    assert chat(table, "prompt", 0)[0] == turn("system", "Be brief.") and chat(table, "chosen", 1) == [turn("assistant", "7")]
    cfg = DataConfig(path=write_jsonl(tmp_path / "pku.jsonl", pku_rows()), **PKU)
    table, _ = load_pairs(cfg, "harmless", also=["helpful"])
    assert table.column("chosen").to_pylist() == ["Call a locksmith.", "Why did the chicken cross the road?"]
    assert table.column("sign_helpful").to_pylist() == [-1.0, 1.0]


def test_rows_that_would_fail_at_tokenization_are_named_at_validation(tmp_path):
    hh, uf, trl = hh_rows(), ultrafeedback_rows(), trl_rows()
    hh[1]["chosen"] = "How do I bake bread? Mix flour."           # no shared "\n\nAssistant:" turn
    uf[0]["prompt"] = "Something else entirely"                    # the repeated user turn is another prompt
    trl[1]["chosen"] = [turn("user", "Name a prime."), turn("assistant", "7")]  # a user turn in a response
    rows = hh + uf + trl
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(PreferenceDataError) as e:
        load_pairs(DataConfig(path=path), "helpful")
    msg = str(e.value)
    assert "3 invalid" in msg and "mixed.jsonl" in msg
    assert "share no '\\n\\nAssistant:' turn to split at (row 1)" in msg
    assert "do not end with the prompt (row 2)" in msg
    assert "chosen does not start with an assistant turn (row 5)" in msg
    table, report = load_pairs(DataConfig(path=path, skip_invalid=True), "helpful")
    assert (report.total, report.kept, report.skipped) == (6, 3, 3)


def test_every_published_shape_tokenizes(tmp_path, tiny_model):
    """What validation passes, the workers' tokenizer renders (the failure used to come here, late)."""
    tokenize = Tokenize(tiny_model, 64, 32)
    tok = load_tokenizer(tiny_model)
    for name, rows in [("hh", hh_rows()), ("uf", ultrafeedback_rows()), ("uf_np", ultrafeedback_rows(False)),
                       ("trl", trl_rows())]:
        table, _ = load_pairs(DataConfig(path=write_jsonl(tmp_path / f"{name}.jsonl", rows)), "helpful")
        out = tokenize(table.to_pydict() | {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names})
        start = out["chosen_start"][0]
        assert 0 < start < len(out["chosen_ids"][0]), name
        response = tok.decode(out["chosen_ids"][0][start:])
        assert "2+2" not in response and "Human:" not in response, name


@pytest.mark.slow
def test_published_shapes_train_one_step(ray_local, tiny_model, tmp_path):
    """One DPO step over a file holding HH-RLHF, UltraFeedback (with and without its prompt column)
    and TRL rows side by side (each row as published; rows are mapped one by one), then one GAPO
    step on PKU-SafeRLHF's two labels and one on pairs made from UltraFeedback's per-aspect ratings."""
    from cluster.cli import main
    from tests.trainers.test_ratings import ultrafeedback_rows as rated_rows
    from trainers.core.config import load_config
    from trainers.jobs.dpo import DPOJobConfig, run as run_dpo
    from trainers.jobs.gapo import GAPOJobConfig, run as run_gapo

    one_step = {"model.name_or_path": tiny_model, "train.workers": 1, "train.micro_batch_size": 8,
                "train.checkpoint_every": 0, "train.log_every": 1, "data.max_prompt_length": 64,
                "data.max_response_length": 32}
    rows = hh_rows() + ultrafeedback_rows() + ultrafeedback_rows(with_prompt=False) + trl_rows()
    dpo = run_dpo(load_config(DPOJobConfig, overrides={
        **one_step, "objective": "helpful", "out": str(tmp_path / "dpo"),
        "data.path": write_jsonl(tmp_path / "mixed.jsonl", rows)}))
    assert dpo["pairs"] == 8 and dpo["step"] == 1

    pku = run_gapo(load_config(GAPOJobConfig, overrides={
        **one_step, "objectives": ["helpful", "harmless"], "out": str(tmp_path / "pku"),
        "data.path": write_jsonl(tmp_path / "pku.jsonl", pku_rows() * 4),
        "data.response_columns": PKU["response_columns"], "data.objective_labels": PKU["objective_labels"]}))
    assert pku["pairs"] == 8 and pku["step"] == 1

    main(["pairs", "--from-ratings", write_jsonl(tmp_path / "uf_raw.jsonl", rated_rows() * 4),
          "--prompt-column", "instruction", "--responses", "completions", "--out", str(tmp_path / "rated"),
          "--ratings", "helpfulness=annotations.helpfulness.Rating,honesty=annotations.honesty.Rating"])
    rated = run_gapo(load_config(GAPOJobConfig, overrides={
        **one_step, "objectives": ["helpfulness", "honesty"], "out": str(tmp_path / "rated_gapo"),
        "data.path": str(tmp_path / "rated" / "pairs_multi.jsonl"), "train.micro_batch_size": 2}))
    assert rated["pairs"] == 2 and rated["step"] == 1


def test_a_tokenizer_that_cannot_render_the_rows_fails_before_ray(tiny_model, tmp_path):
    """Chat rows and a tokenizer without a chat template: the job stops on the driver, naming the
    row and the reason, instead of in every worker."""
    import shutil

    import ray

    from trainers.core.config import load_config
    from trainers.jobs.dpo import DPOJobConfig, run as run_dpo

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model, plain)
    for f in plain.glob("chat_template.*"):
        f.unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert not getattr(load_tokenizer(str(plain)), "chat_template", None)
    started = ray.is_initialized()
    job = load_config(DPOJobConfig, overrides={
        "objective": "helpful", "out": str(tmp_path / "out"), "model.name_or_path": str(plain),
        "data.path": write_jsonl(tmp_path / "mixed.jsonl", hh_rows() + ultrafeedback_rows())})
    with pytest.raises(PreferenceDataError, match=r"mixed.jsonl: valid row 2 .* cannot be tokenized"):
        run_dpo(job)
    assert ray.is_initialized() == started
