"""Loading every file format, chat formatting with the tokenizer's template, prompt masking."""

import json

import pandas as pd
import pytest

from potstill.data import PadCollator, encode_example, load_records, pad_id, records_to_pairs, train_eval_split
from potstill.errors import PotstillError

ROWS = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(5)]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_every_format_loads_the_same_rows(tmp_path, fmt):
    p = tmp_path / f"data.{fmt}"
    df = pd.DataFrame(ROWS)
    if fmt == "json":
        p.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        df.to_json(p, orient="records", lines=True)
    elif fmt == "csv":
        df.to_csv(p, index=False)
    else:
        df.to_parquet(p)
    assert load_records(p) == ROWS


def test_prompt_tokens_are_masked_and_response_is_the_template_suffix(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "What is two plus two?"}]
    ex = encode_example(tok, msgs, "Four.", 128)
    n_prompt = len(ex["prompt_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["response_ids"] == ex["input_ids"][n_prompt:]
    text = tok.decode(ex["input_ids"])
    assert text == "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n"
    assert tok.decode(ex["response_ids"]) == "Four.<|im_end|>\n"


def test_truncation_keeps_prompt_and_cuts_response(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Hi"}]
    full = encode_example(tiny_tokenizer, msgs, "one two three four five six seven eight nine ten", 512)
    short = encode_example(
        tiny_tokenizer, msgs, "one two three four five six seven eight nine ten", len(full["prompt_ids"]) + 3
    )
    assert short["prompt_ids"] == full["prompt_ids"] and len(short["response_ids"]) == 3
    with pytest.raises(PotstillError, match="max_length"):
        encode_example(tiny_tokenizer, msgs, "x", len(full["prompt_ids"]))


def test_messages_column_and_system_prompt():
    rows = [{"chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    pairs = records_to_pairs(rows, messages_field="chat", system_prompt="Be brief.")
    assert pairs == [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], "response": "a"}
    ]
    with pytest.raises(PotstillError, match="assistant"):
        records_to_pairs([{"chat": [{"role": "user", "content": "q"}]}], messages_field="chat")
    with pytest.raises(PotstillError, match="column 'prompt' not found"):
        records_to_pairs([{"question": "q", "response": "a"}])


def test_collator_pads_right_with_ignore_labels():
    b = PadCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_split_is_seeded_and_disjoint():
    a, b = train_eval_split(list(range(20)), 5, seed=3)
    a2, b2 = train_eval_split(list(range(20)), 5, seed=3)
    assert (a, b) == (a2, b2) and len(b) == 5 and not set(a) & set(b) and sorted(a + b) == list(range(20))
    with pytest.raises(PotstillError, match="eval_size"):
        train_eval_split(list(range(5)), 5)


def test_hub_path_loads_a_local_dataset_dir(tmp_path):
    """`HubData` goes through `datasets.load_dataset(name)`, which also reads a local dataset folder."""
    d = tmp_path / "my_ds"
    d.mkdir()
    pd.DataFrame(ROWS).to_json(d / "train.jsonl", orient="records", lines=True)
    assert load_records(hub_name=str(d), split="train") == ROWS
    with pytest.raises(PotstillError, match="could not be loaded"):
        load_records(hub_name=str(tmp_path / "absent_ds"))


# ----------------------------------------------------------------------------- bad input (issue 14)


def _one_line_with_fix(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "; " in msg, msg
    return msg


def test_a_broken_jsonl_line_is_named_by_file_and_line_number(tmp_path, capfd):
    p = tmp_path / "data.jsonl"
    p.write_text(
        '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
        '{"prompt": "e", broken\n{"prompt": "f", "response": "g"}\n'
    )
    with pytest.raises(PotstillError) as err:
        load_records(p)
    msg = _one_line_with_fix(err)
    assert str(p) in msg and "line 3 is not valid JSON" in msg
    assert capfd.readouterr().err == ""  # datasets' own multi-line log is kept off stderr


@pytest.mark.parametrize(
    "body, needle",
    [
        ('[{"prompt": "a", "response": "b"},\n {"prompt": "c" "response": "d"}]\n', "line 2 is not valid JSON"),
        ('{\n  "prompt": ["a", "b"],\n  "response": ["c" "d"]\n}\n', "line 3 is not valid JSON"),
        ('[{"prompt": "a", "response": "b"}, 3]', "item 2 of its array is an int"),
    ],
)
def test_a_broken_json_document_names_the_line(tmp_path, body, needle):
    p = tmp_path / "data.json"
    p.write_text(body)
    with pytest.raises(PotstillError) as err:
        load_records(p)
    assert needle in _one_line_with_fix(err)


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n["a", "b"]\n')
    with pytest.raises(PotstillError) as err:
        load_records(p)
    assert "line 2 is a JSON list" in _one_line_with_fix(err)


@pytest.mark.parametrize(
    "suffix, body, line",
    [
        (".jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', 2),
        (".csv", b"prompt,response\ncaf\xe9,b\n", 2),
        (".json", b'[{"prompt": "caf\xe9", "response": "b"}]', 1),
    ],
)
def test_a_latin1_data_file_says_save_it_as_utf8(tmp_path, suffix, body, line):
    p = tmp_path / f"data{suffix}"
    p.write_bytes(body)
    with pytest.raises(PotstillError) as err:
        load_records(p)
    msg = _one_line_with_fix(err)
    assert str(p) in msg and f"line {line}" in msg and "0xe9" in msg and "save it as UTF-8" in msg


@pytest.mark.parametrize(
    "row, field, what",
    [
        ({"prompt": None, "response": "b"}, "prompt", "is null"),
        ({"prompt": "a", "response": None}, "response", "is null"),
        ({"prompt": 5, "response": "b"}, "prompt", "is an int"),
        ({"prompt": "a", "response": ["x"]}, "response", "is a list"),
    ],
)
def test_a_prompt_or_response_that_is_not_a_string_is_refused(row, field, what):
    rows = [{"prompt": "q", "response": "r"}, row]
    with pytest.raises(PotstillError) as err:
        records_to_pairs(rows, where="data.jsonl")
    msg = _one_line_with_fix(err)
    assert msg.startswith("data.jsonl: row 2 ") and f"field '{field}' {what}" in msg


def test_a_null_prompt_read_from_a_file_never_becomes_the_text_None(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": null, "response": "b"}\n')
    with pytest.raises(PotstillError, match=r"row 2 field 'prompt' is null"):
        records_to_pairs(load_records(p), where=str(p))


@pytest.mark.parametrize(
    "chat, needle",
    [
        (["hi", "there"], "turn 1 is a str ('hi'), not a message"),
        ("hi", "is a str, not a list of messages"),
        (None, "is null, not a list of messages"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], "turn 2 has its 'content' null"),
        ([{"role": "user", "content": "q"}, {"content": "a"}], "turn 2 has its 'role' null or missing"),
    ],
)
def test_messages_that_are_not_role_content_turns_are_refused(chat, needle):
    rows = [{"chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, {"chat": chat}]
    with pytest.raises(PotstillError) as err:
        records_to_pairs(rows, messages_field="chat", where="chats.jsonl")
    msg = _one_line_with_fix(err)
    assert msg.startswith("chats.jsonl: row 2 field 'chat' ") and needle in msg and '"role"' in msg


def test_messages_as_a_list_of_strings_read_from_a_file(tmp_path):
    p = tmp_path / "chats.jsonl"
    p.write_text('{"messages": ["hello", "hi there"]}\n')
    with pytest.raises(PotstillError, match=r"row 1 field 'messages' turn 1 is a str"):
        records_to_pairs(load_records(p), messages_field="messages", where=str(p))


def test_pad_id_prefers_pad_then_eos_then_zero_or_raises():
    from types import SimpleNamespace

    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=7), required=True) == 7
    neither = SimpleNamespace(pad_token_id=None, eos_token_id=None)
    assert pad_id(neither) == 0
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        pad_id(neither, required=True)
