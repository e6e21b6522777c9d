"""student_from_teacher (layer dropping) and student_scaled (random init, same vocab)."""

from __future__ import annotations

import pytest
import torch

from potstill.errors import PotstillError
from potstill.models.head import output_head
from potstill.models.student import select_layers, student_from_teacher, student_scaled


def _ids(vocab: int, shape=(2, 7)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _tiny_gemma3(layers=6, tied=True):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=3,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        eos_token_id=[1, 2],
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


def test_select_layers():
    assert select_layers(30, 4) == [0, 10, 19, 29]
    assert select_layers(2, 2) == [0, 1]
    assert select_layers(5, 1) == [0]
    assert select_layers(5, [1, 3]) == [1, 3]
    for bad in (0, 6, [], [5], [-1], [2, 1], [1, 1], True):
        with pytest.raises(PotstillError):
            select_layers(5, bad)


def test_all_layers_reproduce_teacher_exactly(tiny_teacher):
    student = student_from_teacher(tiny_teacher, 2)
    assert type(student) is type(tiny_teacher)
    assert student is not tiny_teacher
    ids = _ids(tiny_teacher.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, tiny_teacher(ids).logits)
    # deep copy, not shared storage
    assert student.lm_head.weight.data_ptr() != tiny_teacher.lm_head.weight.data_ptr()


def test_subset_copies_chosen_layers(tiny_teacher):
    student = student_from_teacher(tiny_teacher, [1])
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert tiny_teacher.config.num_hidden_layers == 2  # teacher untouched
    t, s = tiny_teacher.model, student.model
    assert torch.equal(s.layers[0].self_attn.q_proj.weight, t.layers[1].self_attn.q_proj.weight)
    assert torch.equal(s.layers[0].mlp.down_proj.weight, t.layers[1].mlp.down_proj.weight)
    assert torch.equal(s.embed_tokens.weight, t.embed_tokens.weight)
    assert torch.equal(s.norm.weight, t.norm.weight)
    assert torch.equal(student.lm_head.weight, tiny_teacher.lm_head.weight)
    assert student.model.layers[0].self_attn.layer_idx == 0
    with torch.no_grad():
        out = student.generate(_ids(60, (1, 3)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_gemma3_layer_types_and_tied_embeddings():
    teacher = _tiny_gemma3(layers=6)
    assert teacher.config.layer_types[5] == "full_attention"
    ids = _ids(61, (2, 9))
    full = student_from_teacher(teacher, 6)
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    student = student_from_teacher(teacher, [0, 5])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert student.config.eos_token_id == [1, 2]
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert output_head(student).softcap is None
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()


def test_keeps_dtype():
    teacher = _tiny_gemma3(layers=3).to(torch.bfloat16)
    assert student_from_teacher(teacher, 2).dtype == torch.bfloat16
    assert student_scaled(teacher, num_layers=1).dtype == torch.bfloat16


def test_scaled_sizes_and_vocab(tiny_teacher, tiny_tokenizer):
    s = student_scaled(tiny_teacher, num_layers=1, hidden_size=32, num_attention_heads=2)
    c, t = s.config, tiny_teacher.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (1, 32, 2)
    assert c.head_dim == 16 and c.num_key_value_heads == 2  # gcd(2, 2)
    assert c.intermediate_size == 64  # teacher's ratio 128/64 kept
    assert c.vocab_size == t.vocab_size == len(tiny_tokenizer)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (t.pad_token_id, t.bos_token_id, t.eos_token_id)
    assert s.lm_head.weight.shape == (len(tiny_tokenizer), 32)
    # seeded, without touching the global RNG
    state = torch.random.get_rng_state()
    s2 = student_scaled(tiny_teacher, num_layers=1, hidden_size=32, num_attention_heads=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(s.lm_head.weight, s2.lm_head.weight)
    s3 = student_scaled(tiny_teacher, num_layers=1, hidden_size=32, num_attention_heads=2, seed=1)
    assert not torch.equal(s.lm_head.weight, s3.lm_head.weight)
    ids = _ids(len(tiny_tokenizer))
    with torch.no_grad():
        assert s(ids).logits.shape == (2, 7, len(tiny_tokenizer))


def test_scaled_from_config_and_gemma_head_dim():
    teacher = _tiny_gemma3(layers=6)
    s = student_scaled(teacher.config, num_layers=2, hidden_size=16, intermediate_size=24)
    c = s.config
    assert c.head_dim == 16 and c.hidden_size == 16 and c.intermediate_size == 24  # decoupled head_dim kept
    assert c.layer_types == ["sliding_attention", "full_attention"]
    assert c.vocab_size == 61
    with torch.no_grad():
        assert s(_ids(61)).logits.shape == (2, 7, 61)


def test_scaled_rejects_bad_sizes(tiny_teacher):
    with pytest.raises(PotstillError, match="divisible"):
        student_scaled(tiny_teacher, num_layers=1, hidden_size=30, num_attention_heads=4)
    with pytest.raises(PotstillError, match="multiple"):
        student_scaled(tiny_teacher, num_layers=1, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(PotstillError):
        student_scaled(tiny_teacher, num_layers=0)


def test_peft_teacher_refused(tiny_teacher):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_teacher, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(PotstillError, match="merge_and_unload"):
        student_from_teacher(peft_model, 1)
