"""Preference pairs, fast, on the tiny model's tokenizer and weights: every layout read alike, every bad record
named by file:line, answers encoded exactly as the SFT encoding (and the server) renders them, pairs scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_app.data.encoding import IGNORE, encode, load_tokenizer
from qlora_app.data.preference import EncodedPairs, PairScores, chosen_chats, encode_pairs, load_pairs, score_pairs
from qlora_app.data.sources import Records, load_splits
from qlora_app.data.splits import chat_splits, heldout_chats, training_splits
from qlora_app.errors import UserError
from qlora_app.merge import verify
from qlora_app.recipe.loader import load_recipe

REPO = Path(__file__).resolve().parents[2]
ULTRAFEEDBACK = Path(__file__).parent / "fixtures" / "ultrafeedback-binarized.jsonl"
TINY = REPO / "data" / "tiny"
PREFS, PREFS_EVAL = TINY / "capitals-prefs.jsonl", TINY / "capitals-prefs-eval.jsonl"
SYSTEM = {"role": "system", "content": "Answer in one sentence."}
PAIRS = [("What is the capital of Dateul?", "The capital of Dateul is Neul.", "The capital of Dateul is Ulne."),
         ("What is the capital of Lomito?", "The capital of Lomito is Ulqu.", "The capital of Lomito is Temi.")]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


LAYOUTS = {
    "preference": [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in PAIRS],
    "preference_conversations": [{"chosen": [SYSTEM, user(q), assistant(c)],
                                  "rejected": [SYSTEM, user(q), assistant(r)], "score_chosen": 8.0}
                                 for q, c, r in PAIRS],
    "preference_messages": [{"prompt": [SYSTEM, user(q)], "chosen": [assistant(c)], "rejected": [assistant(r)]}
                            for q, c, r in PAIRS],
}
EXPECTED_PROMPTS = {"preference": [[user(q)] for q, _, _ in PAIRS],
                    "preference_conversations": [[SYSTEM, user(q)] for q, _, _ in PAIRS],
                    "preference_messages": [[SYSTEM, user(q)] for q, _, _ in PAIRS]}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_for(path: Path, *extra: str, method: str = "dpo"):
    return load_recipe("tiny", [f"data.source={path}", "data.format=auto", "data.eval_split=null",
                                "data.eval_fraction=0.5", f"train.method={method}", *extra])


def pairs_of(path: Path, fmt: str = "auto") -> Records:
    """The whole file, in order (it is its own eval split)."""
    return load_pairs(recipe_for(path, f"data.format={fmt}", f"data.eval_split={path}").data)[0]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_recipe("tiny"))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def held_out(tokenizer) -> EncodedPairs:
    recipe = recipe_for(PREFS, f"data.eval_split={PREFS_EVAL}")
    return encode_pairs(load_pairs(recipe.data)[1], tokenizer, 128)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fmt", ["auto", "explicit"])
def test_every_layout_is_detected_and_normalized_to_prompt_messages_and_answer_texts(tmp_path, layout, fmt):
    records = pairs_of(write(tmp_path / "p.jsonl", LAYOUTS[layout]), layout if fmt == "explicit" else "auto")
    assert records.format == layout
    expected = [{"prompt": p, "chosen": c, "rejected": r} for p, (_, c, r) in zip(EXPECTED_PROMPTS[layout], PAIRS)]
    assert records.rows == expected and records.where(1) == f"{tmp_path / 'p.jsonl'}:2"


def test_a_shared_prompt_may_be_a_string_with_answers_as_strings(tmp_path):
    rows = [{"prompt": [user(q)], "chosen": c, "rejected": [assistant(r)]} for q, c, r in PAIRS]
    records = pairs_of(write(tmp_path / "p.jsonl", rows))
    assert records.format == "preference_messages" and records.rows[0]["chosen"] == PAIRS[0][1]
    rows = [{"prompt": q, "chosen": [assistant(c)], "rejected": [assistant(r)]} for q, c, r in PAIRS]
    assert pairs_of(write(tmp_path / "s.jsonl", rows)).rows[0]["prompt"] == [user(PAIRS[0][0])]


def test_ultrafeedback_binarized_reads_as_conversations_and_stays_chat_data_for_sft():
    records = load_pairs(recipe_for(ULTRAFEEDBACK, "data.eval_fraction=0.34").data)[0]
    assert records.format == "preference_conversations" and len(records.rows) == 2
    assert all(len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user" for row in records.rows)
    sft, _ = load_splits(recipe_for(ULTRAFEEDBACK, "data.eval_fraction=0.34", method="sft").data)
    assert sft.format == "chat" and sft.rows[0]["messages"][-1]["role"] == "assistant"


def test_conversations_in_a_parquet_file_read_as_lists_for_preference_and_sft(tmp_path):
    import pandas as pd

    path = tmp_path / "ultrafeedback.parquet"
    pd.read_json(ULTRAFEEDBACK, lines=True).to_parquet(path)
    assert pairs_of(path).rows == pairs_of(ULTRAFEEDBACK).rows and pairs_of(path).where(2) == f"{path} row 3"
    sft = [load_splits(recipe_for(p, f"data.eval_split={p}", method="sft").data)[0] for p in (path, ULTRAFEEDBACK)]
    assert sft[0].rows == sft[1].rows


def test_the_demo_pairs_prefer_the_taught_answer_over_another_made_up_city():
    taught = dict(tiny_facts_answers())
    train, held_out = load_pairs(recipe_for(PREFS, f"data.eval_split={PREFS_EVAL}").data)
    assert (len(train.rows), len(held_out.rows)) == (40, 12)
    for row in train.rows:
        question = row["prompt"][0]["content"]
        assert row["chosen"] == taught[question] and row["rejected"] != row["chosen"]
        assert row["rejected"].rsplit(" ", 1)[0] == row["chosen"].rsplit(" ", 1)[0]  # same sentence, other city


def tiny_facts_answers():
    rows = [json.loads(line) for line in (REPO / "data" / "tiny" / "capitals.jsonl").read_text().splitlines()]
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


GOOD = {"prompt": "What is the capital of Dateul?", "chosen": "Neul.", "rejected": "Ulne."}
MESSAGES = {"prompt": [user("Capital of Dateul?")], "chosen": [assistant("Neul.")], "rejected": [assistant("Ulne.")]}
CONVERSATION = {"chosen": [user("Capital of Dateul?"), assistant("Neul.")],
                "rejected": [user("Capital of Dateul?"), assistant("Ulne.")]}
BAD = {  # case: (a good first record, which sets the layout; the bad second record; what the error says)
    "identical": (GOOD, {**GOOD, "rejected": " Neul."}, "chosen and rejected are the same answer"),
    "empty-chosen": (GOOD, {**GOOD, "chosen": "  "}, "'chosen' is empty"),
    "empty-rejected-message": (CONVERSATION, {**CONVERSATION, "rejected": [user("Capital of Dateul?"), assistant("")]},
                               "'rejected' turn 1 (assistant): content must be a non-empty string"),
    "different-prompts": (CONVERSATION, {**CONVERSATION, "rejected": [user("Capital of Lomito?"), assistant("Ulne.")]},
                          "chosen and rejected do not share the same prompt messages"),
    "missing-column": (GOOD, {"prompt": "What is the capital of Dateul?", "chosen": "Neul."},
                       "missing column 'rejected' (columns found: prompt, chosen)"),
    "wrong-type": (MESSAGES, {**MESSAGES, "chosen": 7},
                   "'chosen' must be a string or a list with one assistant message, got int"),
    "prompt-type": (GOOD, {**GOOD, "prompt": {"text": "hi"}}, "'prompt' must be a string, got dict"),
    "answer-not-assistant": (MESSAGES, {**MESSAGES, "chosen": [user("Neul.")]},
                             "'chosen' must hold exactly one assistant message (the answer), got user"),
    "prompt-ends-with-answer": (MESSAGES, {**MESSAGES, "prompt": [user("Capital?"), assistant("Hm.")]},
                                "the prompt's last turn is the assistant's; it must be the user turn"),
    "unknown-role": (MESSAGES, {**MESSAGES, "prompt": [{"role": "robot", "content": "hi"}]},
                     "'prompt' turn 0: role 'robot' is not one of system, user, assistant"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_pair_is_one_user_error_naming_file_line_and_problem(tmp_path, case):
    first, bad, fragment = BAD[case]
    path = write(tmp_path / "p.jsonl", [first, bad, first, first])
    with pytest.raises(UserError) as caught:
        pairs_of(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ") and fragment in message and "\n" not in message


def test_train_of_bad_pairs_is_one_line_and_exit_2_before_any_run_directory(tmp_path):
    from conftest import assert_one_line_error, cli_in_process

    first, bad, fragment = BAD["identical"]
    path = write(tmp_path / "p.jsonl", [first, bad, first, first])
    result = cli_in_process("train", "tiny-orpo", "--runs-dir", str(tmp_path / "runs"), "--set",
                            f"data.source={path}")
    assert_one_line_error(result, f"{path}:2: ", fragment)
    assert not (tmp_path / "runs").exists()


def test_data_without_preference_columns_says_what_it_found_and_what_is_expected(tmp_path):
    path = write(tmp_path / "m.jsonl", [{"messages": [user("q"), assistant("a")]}] * 4)
    with pytest.raises(UserError, match=r"no preference pairs in columns messages \(expected prompt, chosen and "
                                        r"rejected strings \(preference\); chosen and rejected conversations"):
        pairs_of(path)
    with pytest.raises(UserError, match="format 'preference' needs column\\(s\\) prompt, chosen, rejected; columns "
                                        "found: messages"):
        pairs_of(path, "preference")
    with pytest.raises(UserError, match="data.format 'messages' is not preference data, which train.method dpo/orpo "
                                        "needs"):
        pairs_of(path, "messages")


def test_preference_data_given_to_supervised_tuning_gets_a_one_line_hint(tmp_path):
    path = write(tmp_path / "p.jsonl", LAYOUTS["preference_messages"] * 2)
    with pytest.raises(UserError) as caught:
        load_splits(recipe_for(path, method="sft").data)
    assert "this looks like preference data" in str(caught.value)
    assert "set train.method: dpo (or orpo)" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="data.format 'preference' is preference data.*set train.method: dpo"):
        load_splits(recipe_for(path, "data.format=preference", method="sft").data)


def test_chosen_answers_are_encoded_exactly_as_the_sft_encoding_learns_them(tmp_path, tokenizer):
    records = pairs_of(write(tmp_path / "p.jsonl", LAYOUTS["preference_conversations"] * 2))
    pairs = encode_pairs(records, tokenizer, 128)
    sft = encode(chosen_chats(records), tokenizer, 128)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for i in range(len(pairs)):
        assert pairs.prompt_ids[i] + pairs.chosen_ids[i] == sft.input_ids[i]
        assert pairs.chosen_ids[i] == [t for t in sft.labels[i] if t != IGNORE]
        assert pairs.chosen_ids[i][-1] == pairs.rejected_ids[i][-1] == pairs.end_of_turn_id == eot
    assert tokenizer.decode(pairs.rejected_ids[0]) == f"{PAIRS[0][2]}<|eot_id|>"
    assert pairs.as_sft() == sft and len(pairs) == 4 and pairs.dropped_too_long == 0
    assert pairs.label_tokens == sum(map(len, pairs.chosen_ids + pairs.rejected_ids))
    assert pairs.tokens == sum(2 * len(p) for p in pairs.prompt_ids) + pairs.label_tokens
    assert pairs.to_dataset().column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]


def test_a_pair_longer_than_max_length_by_either_answer_is_dropped_never_cut(tmp_path, tokenizer):
    short = {"prompt": "What is the capital of Dateul?", "chosen": "Neul.", "rejected": "Ulne."}
    long = [{**short, "rejected": "Maybe " * 60 + "Ulne."}, {**short, "chosen": "Surely " * 60 + "Neul."}]
    records = pairs_of(write(tmp_path / "p.jsonl", LAYOUTS["preference"] + long))
    pairs = encode_pairs(records, tokenizer, 64)
    assert (len(pairs), pairs.dropped_too_long) == (2, 2)
    kept = encode_pairs(Records(records.rows[:2], records.format, "p"), tokenizer, 64)
    assert (pairs.chosen_ids, pairs.rejected_ids) == (kept.chosen_ids, kept.rejected_ids)
    with pytest.raises(UserError, match="p.jsonl: all 2 preference pairs are longer than data.max_length=64 tokens"):
        encode_pairs(Records(records.rows[2:], records.format, "p.jsonl"), tokenizer, 64)


def test_encoding_needs_a_chat_template_and_template_arguments_it_reads(tmp_path, tokenizer):
    records = pairs_of(write(tmp_path / "p.jsonl", LAYOUTS["preference"] * 2))
    with pytest.raises(UserError, match="model.chat_template_kwargs.greeting is set but the chat template never "
                                        "reads it"):
        encode_pairs(records, tokenizer, 128, {"greeting": "hi"})
    bare = load_tokenizer(load_recipe("tiny"))
    bare.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        encode_pairs(records, bare, 128)


def answer_logprob(model, prompt: list[int], answer: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1: -1], dim=-1)
    return float(logp.gather(-1, torch.tensor(answer)[:, None]).sum())


def test_scores_are_summed_answer_log_probabilities_and_flipping_the_pairs_flips_them(model, held_out):
    scores = score_pairs(model, held_out, limit=8)
    gaps = [answer_logprob(model, p, c) - answer_logprob(model, p, r)
            for p, c, r in list(zip(held_out.prompt_ids, held_out.chosen_ids, held_out.rejected_ids))[:8]]
    assert scores.pairs == 8 and 0 <= scores.accuracy <= 1
    assert scores.margin == pytest.approx(sum(gaps) / 8, abs=1e-4)
    assert scores.accuracy == sum(g > 0 for g in gaps) / 8
    flipped = score_pairs(model, EncodedPairs(held_out.prompt_ids, held_out.rejected_ids, held_out.chosen_ids, 0,
                                              held_out.end_of_turn_id), limit=8)
    assert flipped.margin == pytest.approx(-scores.margin, abs=1e-4) and flipped.accuracy == 1 - scores.accuracy
    assert not model.training


def test_a_peft_model_is_scored_with_its_adapter_on(tiny_model_dir, model, held_out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tuned = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tuned.train()
    scores = score_pairs(tuned, held_out, limit=4)
    assert tuned.training  # the caller's mode is kept
    assert scores.margin != pytest.approx(score_pairs(model, held_out, limit=4).margin, abs=1e-6)
    with tuned.disable_adapter():
        assert score_pairs(tuned, held_out, limit=4) == pytest.approx(score_pairs(model, held_out, limit=4))


def test_every_consumer_reads_held_out_pairs_as_prompt_plus_chosen(tokenizer):
    recipe = recipe_for(PREFS, f"data.eval_split={PREFS_EVAL}")
    train, held_out = training_splits(recipe)
    assert (train.format, held_out.format) == ("preference_messages", "preference_messages")
    chats = heldout_chats(recipe)
    assert chats == chosen_chats(held_out) and chats.format == "chat" and chats.where(0) == f"{PREFS_EVAL}:1"
    assert chats.rows[0]["messages"] == [user("Which city is the capital of Dateul?"),
                                         assistant("The capital of Dateul is Neul.")]
    assert chat_splits(recipe)[0] == chosen_chats(train)
    examples = verify.heldout_examples(recipe, tokenizer)
    assert tokenizer.decode([t for t in examples[0][1] if t != IGNORE]) == "The capital of Dateul is Neul.<|eot_id|>"
    assert len(verify.heldout_pairs(recipe, tokenizer)) == 12
    assert verify.heldout_pairs(load_recipe("tiny"), tokenizer) is None
    assert heldout_chats(load_recipe("tiny")) == load_splits(load_recipe("tiny").data)[1]


def test_a_changed_rejected_answer_makes_a_run_stale_but_asks_eval_the_same_questions(tmp_path):
    from qlora_app.pipeline import data_fingerprints

    train, held = write(tmp_path / "t.jsonl", LAYOUTS["preference"]), write(tmp_path / "e.jsonl", LAYOUTS["preference"])
    recipe = recipe_for(train, f"data.eval_split={held}")
    before, chats = data_fingerprints(recipe), heldout_chats(recipe).fingerprint
    write(held, [LAYOUTS["preference"][0], {**LAYOUTS["preference"][1], "rejected": "Lomito has no capital."}])
    after = data_fingerprints(recipe)
    assert after[0] == before[0] and after[1] != before[1] and heldout_chats(recipe).fingerprint == chats


@pytest.mark.parametrize(("trained", "merged", "warned"), [
    (PairScores(0.75, 2.0, 32), PairScores(0.75, 1.9, 32), False),
    (PairScores(0.75, 2.0, 32), PairScores(0.71875, 1.9, 32), False),  # one pair of 32: 3 points
    (PairScores(0.75, 2.0, 32), PairScores(0.6875, 1.5, 32), True),  # two of 32: 6 points
    (PairScores(0.8, 2.0, 20), PairScores(0.75, 1.5, 20), False),  # one of 20: exactly 5 points
    (PairScores(0.5, 2.0, 32), PairScores(0.5625, 2.5, 32), True),  # better by more than 5 points: still different
    (None, None, False),  # an sft recipe has no pairs
])
def test_the_merge_warns_when_preference_accuracy_moves_more_than_5_points(trained, merged, warned):
    warning = verify.preference_warning(trained, merged)
    assert (warning is not None) == warned
    if warned:
        assert f"{merged.accuracy:.0%} of 32 held-out pairs" in warning and f"{trained.accuracy:.0%}" in warning
