"""Loading every file format, chat formatting with the tokenizer's template, prompt masking."""

import json

import pandas as pd
import pytest

from potstill.data import PadCollator, encode_example, load_records, records_to_pairs, train_eval_split
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
    short = encode_example(tiny_tokenizer, msgs, "one two three four five six seven eight nine ten",
                           len(full["prompt_ids"]) + 3)
    assert short["prompt_ids"] == full["prompt_ids"] and len(short["response_ids"]) == 3
    with pytest.raises(PotstillError, match="max_length"):
        encode_example(tiny_tokenizer, msgs, "x", len(full["prompt_ids"]))


def test_messages_column_and_system_prompt():
    rows = [{"chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    pairs = records_to_pairs(rows, messages_field="chat", system_prompt="Be brief.")
    assert pairs == [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}],
                      "response": "a"}]
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
