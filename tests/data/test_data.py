"""Data formats and bad data: every format trains; every bad input gets one line and exit code 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import assert_one_line_error, cli_in_process, tiny_facts

from qlora_app.data.encoding import encode, load_tokenizer
from qlora_app.data.sources import load_splits
from qlora_app.recipe.loader import load_recipe

FACTS = tiny_facts()[:12]
FORMATS = {
    "messages": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS],
    "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in FACTS],
    "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in FACTS],
    "prompt_completion": [{"prompt": q, "completion": a} for q, a in FACTS],
    "text": [{"text": f"Q: {q} A: {a}"} for q, a in FACTS],
}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_for(path, *extra):
    return load_recipe("tiny", [f"data.source={path}", "data.format=auto", "data.eval_split=null", "data.eval_fraction=0.25",
                                *extra])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_recipe("tiny"))


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca", "prompt_completion"])
def test_chat_like_formats_render_exactly_like_messages(tmp_path, tokenizer, fmt):
    reference = encode(load_splits(recipe_for(write(tmp_path / "m.jsonl", FORMATS["messages"])).data)[0],
                       tokenizer, 128)
    other = encode(load_splits(recipe_for(write(tmp_path / f"{fmt}.jsonl", FORMATS[fmt])).data)[0], tokenizer, 128)
    assert (other.input_ids, other.labels) == (reference.input_ids, reference.labels)


def test_chat_labels_cover_only_the_assistant_answer_and_its_end_of_turn(tmp_path, tokenizer):
    encoded = encode(load_splits(recipe_for(write(tmp_path / "m.jsonl", FORMATS["messages"])).data)[0],
                     tokenizer, 128)
    learned = tokenizer.decode([t for t in encoded.labels[0] if t != -100])
    assert learned in {f"{a}<|eot_id|>" for _, a in FACTS}
    assert encoded.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_text_format_learns_every_token_and_ends_with_eos(tmp_path, tokenizer):
    encoded = encode(load_splits(recipe_for(write(tmp_path / "t.jsonl", FORMATS["text"])).data)[0], tokenizer, 128)
    assert encoded.labels[0] == encoded.input_ids[0]
    assert encoded.input_ids[0][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_json_csv_and_parquet_files_load(tmp_path, suffix):
    rows = FORMATS["alpaca"]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    train, held_out = load_splits(recipe_for(path).data)
    assert len(train.rows) + len(held_out.rows) == len(rows) and len(held_out.rows) == 3


def test_length_limit_drops_long_chats_and_says_how_many(tmp_path, tokenizer):
    rows = FORMATS["messages"] + [{"messages": [{"role": "user", "content": "word " * 200},
                                                {"role": "assistant", "content": "ok"}]}]
    encoded = encode(load_splits(recipe_for(write(tmp_path / "m.jsonl", rows)).data)[0], tokenizer, 128)
    assert encoded.dropped_too_long == 1


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_trains(tmp_path, fmt):
    from qlora_app.run.directory import RunDir
    from qlora_app.train.stage import train

    recipe = recipe_for(write(tmp_path / f"{fmt}.jsonl", FORMATS[fmt]), "train.max_steps=4", "train.save_steps=2",
                        "train.eval_steps=2", "train.log_steps=1")
    run = train(recipe, tmp_path / "runs")
    manifest = RunDir(run.path).read_manifest()
    assert manifest["status"] == "finished" and manifest["training"]["steps"] == 4
    assert manifest["losses"]["final_train_loss"] > 0 and (run.adapter / "adapter_model.safetensors").is_file()


BAD_DATA = {
    "malformed-json": ('{"messages": []}\n{"messages": [}\n', "bad.jsonl:2: malformed JSON"),
    "missing-column": ('{"question": "q", "answer": "a"}\n',
                       "format 'messages' needs column(s) messages; columns found: question, answer"),
    "empty": ("\n", "the dataset is empty"),
    "bad-role": ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n',
                 "bad.jsonl:1: turn 1: role 'bot' is not one of system, user, assistant"),
    "no-assistant": ('{"messages": [{"role": "user", "content": "q"}]}\n', "bad.jsonl:1: no assistant turn"),
    "column-missing-later": ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                             '{"text": "oops"}\n', "bad.jsonl:2: missing column 'messages' (columns found: text)"),
    "not-an-object": ('[1, 2]\n', "bad.jsonl:1: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_gets_one_line_and_exit_2_before_any_model_loads(tmp_path, case):
    content, expected = BAD_DATA[case]
    (tmp_path / "bad.jsonl").write_text(content)
    result = cli_in_process("train", "tiny", "--set", f"data.source={tmp_path / 'bad.jsonl'}", "--set",
                            "data.format=messages", "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, expected)
    assert not (tmp_path / "runs").exists()  # nothing was created for a run that could not start


def test_unknown_format_lists_what_is_expected(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    result = cli_in_process("train", "tiny", "--set", f"data.source={tmp_path / 'bad.jsonl'}", "--set",
                            "data.format=auto")
    assert_one_line_error(result, "no known data format in columns question, answer", "messages: messages")


def test_missing_file(tmp_path):
    result = cli_in_process("train", "tiny", "--set", f"data.source={tmp_path / 'nope.jsonl'}")
    assert_one_line_error(result, f"data file {tmp_path / 'nope.jsonl'} does not exist")


def test_every_example_too_long(tmp_path):
    result = cli_in_process("train", "tiny", "--set", "data.max_length=16")
    assert_one_line_error(result, "all 40 examples are longer than data.max_length=16")


@pytest.mark.slow
def test_unpacked_training_reports_its_padding(tmp_path):
    from qlora_app.run.directory import RunDir
    from qlora_app.train.stage import train

    rows = FORMATS["messages"] + [{"messages": [{"role": "user", "content": "word " * n},
                                                {"role": "assistant", "content": "ok"}]} for n in (5, 15, 30, 45, 60)]
    recipe = recipe_for(write(tmp_path / "m.jsonl", rows), "data.packing=false", "train.max_steps=2",
                        "train.save_steps=2", "train.eval_steps=2")
    manifest = RunDir(train(recipe, tmp_path / "runs").path).read_manifest()
    assert not manifest["training"]["packed"]
    assert 0.3 < manifest["training"]["non_pad_fraction"] < 1.0
