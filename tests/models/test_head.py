"""output_head / final_hidden reproduce the model's own logits, wrappers included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from potstill.models.head import final_hidden, hidden_and_cache, output_head, unwrap_model


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        cfg = Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5, sliding_window=4)
        return Gemma2ForCausalLM(cfg).eval()
    if kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=2.0, sliding_window=4)
        return Gemma3ForCausalLM(cfg).eval()
    if kind == "cohere":
        from transformers import CohereConfig, CohereForCausalLM

        return CohereForCausalLM(CohereConfig(**common, logit_scale=0.125)).eval()
    raise AssertionError(kind)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in row 1
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3", "cohere"])
def test_head_of_final_hidden_equals_logits(kind):
    model = _tiny(kind)
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        hid = final_hidden(model, ids, mask)
        dec = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    head = output_head(model)
    assert hid.shape == (2, 9, 32)
    torch.testing.assert_close(hid, dec)
    torch.testing.assert_close(head(hid), ref, rtol=1e-5, atol=1e-5)
    # the transform fields are really present where the arch has them
    if kind == "gemma2":
        assert head.softcap == 0.5 and head.logit_scale is None
        # and they matter: without softcap the logits differ
        plain = torch.nn.functional.linear(hid, head.weight)
        assert not torch.allclose(plain, ref, atol=1e-3)
    if kind == "cohere":
        assert head.logit_scale == 0.125 and head.softcap is None
    if kind == "llama":
        assert head.logit_scale is None and head.softcap is None and head.bias is None


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3", "cohere"])
def test_a_left_padded_prefix_continued_from_its_cache_reads_as_the_whole_text(kind):
    """Prefixes of 6, 3 and 9 tokens left-padded, then two of them continued from the key/value cache
    (the others dropped from it) by their right-padded remainders: every row's hidden states equal
    the text's run alone. Sliding windows of 4 (Gemma) are crossed by 17-token texts, so a cache
    whose key positions drift from the text's (right padding between prefix and remainder) fails."""
    model = _tiny(kind)
    g = torch.Generator().manual_seed(2)
    texts = [torch.randint(0, 97, (n,), generator=g) for n in (14, 9, 17)]
    cuts, width = [6, 3, 9], 9
    ids, mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for i, (t, c) in enumerate(zip(texts, cuts)):
        ids[i, width - c :], mask[i, width - c :] = t[:c], 1
    keep = [0, 2]
    rests = [texts[i][cuts[i] :] for i in keep]
    more, more_mask = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    for r, t in enumerate(rests):
        more[r, : len(t)], more_mask[r, : len(t)] = t, 1
    with torch.no_grad():
        hidden, cache = hidden_and_cache(model, ids, mask, (mask.cumsum(-1) - 1).clamp(0))
        cache.batch_select_indices(torch.tensor(keep))
        positions = torch.tensor([cuts[i] for i in keep])[:, None] + torch.arange(8)[None]
        after, _ = hidden_and_cache(model, more, torch.cat([mask[keep], more_mask], -1), positions, cache)
        alone = [final_hidden(model, t[None], torch.ones(1, len(t), dtype=torch.long))[0] for t in texts]
    torch.testing.assert_close(hidden[1, width - 3 :], alone[1][:3], rtol=1e-5, atol=1e-5)
    for r, i in enumerate(keep):
        got = torch.cat([hidden[i, width - cuts[i] :], after[r, : len(rests[r])]])
        torch.testing.assert_close(got, alone[i], rtol=1e-5, atol=1e-5)


def test_head_weight_is_live_parameter(tiny_teacher):
    head = output_head(tiny_teacher)
    assert head.weight is tiny_teacher.lm_head.weight
    assert head.vocab == tiny_teacher.config.vocab_size


class _DDPLike(nn.Module):
    """Stands in for DistributedDataParallel / accelerate wrappers: forward delegates to .module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_wrappers_peft_and_ddp(tiny_teacher):
    from peft import LoraConfig, get_peft_model

    ids, mask = _batch()
    ids = ids % tiny_teacher.config.vocab_size
    peft_model = get_peft_model(
        tiny_teacher, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    wrapped = _DDPLike(peft_model)
    assert unwrap_model(wrapped) is peft_model.get_base_model()
    with torch.no_grad():
        ref = wrapped(input_ids=ids, attention_mask=mask).logits
        hid = final_hidden(wrapped, ids, mask)
    torch.testing.assert_close(output_head(wrapped)(hid), ref, rtol=1e-5, atol=1e-5)


def test_final_hidden_has_gradients_through_wrapper(tiny_student):
    """Through a DDP-like wrapper, head(final_hidden) gives every parameter the gradient that
    plain autograd through ``decoder(...).last_hidden_state @ lm_head.weight.T`` gives a copy."""
    ids, mask = _batch()
    ids = ids % tiny_student.config.vocab_size
    reference = copy.deepcopy(tiny_student)
    tiny_student.train()
    reference.train()
    hid = final_hidden(_DDPLike(tiny_student), ids, mask)
    output_head(tiny_student)(hid).logsumexp(-1).sum().backward()
    ref_hid = reference.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    (ref_hid @ reference.lm_head.weight.T).logsumexp(-1).sum().backward()
    got = dict(tiny_student.named_parameters())
    for name, p in reference.named_parameters():
        assert p.grad is not None and got[name].grad is not None, name
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
