"""``data.packing``: a packed batch gives the loss and gradients of the same examples padded."""

import json
import random

import pytest
import torch
from helpers import recipe, write
from transformers import OPTConfig, OPTForCausalLM

from potstill.cli import main
from potstill.data import PackCollator, PadCollator, encode_example, segments
from potstill.data.packing import check_packing, pack_rows
from potstill.errors import PotstillError
from potstill.kd import KDConfig, KDTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(tok, n=7, seed=0):
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog small model learns from large teacher".split()
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        ex = encode_example(tok, [{"role": "user", "content": prompt}], answer, 64)
        out.append(
            {
                "input_ids": ex["input_ids"],
                "labels": ex["labels"],
                "attention_mask": ex["attention_mask"],
                "example_id": 100 + i,
            }
        )
    # plain LM text, loss on every token, its first one included; the shortest, so packed after another example
    ids = tok("a small dog")["input_ids"]
    out.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * len(ids), "example_id": 99})
    return out


def test_first_fit_decreasing_fills_rows_without_overflow():
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    lengths = [random.Random(1).randint(1, 30) for _ in range(50)]
    rows = pack_rows(lengths, 32)
    assert sorted(i for r in rows for i in r) == list(range(50))
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert pack_rows([40, 3], 32) == [[0], [1]]  # longer than a row: a row of its own


def test_packed_layout_restarts_positions_and_masks_each_first_label(tiny_tokenizer):
    feats = _examples(tiny_tokenizer)
    batch = PackCollator(tiny_tokenizer.pad_token_id, 64)(feats)
    assert batch["input_ids"].shape[0] < len(feats)  # several examples share a row
    segs = segments(batch)
    assert len(segs) == len(feats) == len(batch["example_id"]) == len(batch["pack_order"])
    for (row, s, e), i, eid in zip(segs, batch["pack_order"].tolist(), batch["example_id"].tolist()):
        f = feats[i]
        assert eid == f["example_id"]
        assert batch["input_ids"][row, s:e].tolist() == f["input_ids"]
        assert batch["position_ids"][row, s:e].tolist() == list(range(e - s))
        assert batch["labels"][row, s].item() == -100 and batch["labels"][row, s + 1 : e].tolist() == f["labels"][1:]
    last = segments(batch)[batch["pack_order"].tolist().index(len(feats) - 1)]
    assert feats[-1]["labels"][0] != -100 and last[1] > 0  # masked: no example learns the next one's first token
    loss_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert loss_tokens == sum(sum(t != -100 for t in f["labels"][1:]) for f in feats)  # the same loss tokens
    ordered = segments(batch, collated_order=True)  # back in the order given to the collator
    assert [batch["input_ids"][r, s:e].tolist() for r, s, e in ordered] == [f["input_ids"] for f in feats]
    assert batch["attention_mask"].sum() == sum(len(f["input_ids"]) for f in feats)


def test_left_padding_ends_every_row_in_the_last_column_with_its_token_columns(tiny_tokenizer):
    feats = _examples(tiny_tokenizer)[:3]
    for k, f in enumerate(feats):
        f["kd_token_weights"] = [float(k + 1)] * len(f["input_ids"])
    right = PadCollator(tiny_tokenizer.pad_token_id)(feats)
    left = PadCollator(tiny_tokenizer.pad_token_id, left=True)(feats)
    n = left["input_ids"].shape[1]
    assert n == right["input_ids"].shape[1] and len({len(f["input_ids"]) for f in feats}) > 1
    for i, f in enumerate(feats):
        k = len(f["input_ids"])
        assert left["input_ids"][i, n - k :].tolist() == f["input_ids"] == right["input_ids"][i, :k].tolist()
        assert left["labels"][i, n - k :].tolist() == f["labels"] and set(left["labels"][i, : n - k].tolist()) <= {-100}
        assert left["attention_mask"][i].tolist() == [0] * (n - k) + [1] * k
        assert left["kd_token_weights"][i].tolist() == [0.0] * (n - k) + [float(i + 1)] * k
    assert torch.equal(left["example_id"], right["example_id"])


@pytest.mark.parametrize("alpha,divergence", [(0.0, "forward_kl"), (0.5, "reverse_kl")])
def test_packed_loss_and_gradients_equal_padded(tiny_llama_pair, tmp_path, alpha, divergence):
    teacher, student, tok = tiny_llama_pair
    feats = _examples(tok)
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        processing_class=tok,
        args=KDConfig(
            output_dir=str(tmp_path), alpha=alpha, divergence=divergence, report_to="none", use_cpu=True, chunk_size=16
        ),
    )
    results = []
    for collator in (PadCollator(tok.pad_token_id), PackCollator(tok.pad_token_id, 64)):
        batch = collator(feats)
        student.zero_grad()
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = trainer.compute_loss(student, batch, num_items_in_batch=n)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in student.named_parameters()}))
    (l_pad, g_pad), (l_pack, g_pack) = results
    assert torch.allclose(l_pack, l_pad, rtol=1e-5, atol=0)
    for k in g_pad:
        scale = g_pad[k].abs().max().clamp_min(1e-12)
        assert torch.allclose(g_pack[k], g_pad[k], rtol=0, atol=1e-5 * scale), k


def test_a_model_whose_attention_crosses_examples_is_refused(tiny_llama_pair):
    _, student, _ = tiny_llama_pair
    check_packing(student, "student")  # Llama: attention follows the position restarts
    torch.manual_seed(0)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(PotstillError, match="lets one packed example attend to another"):
        check_packing(opt, "student")


PACKED_RUNS = [
    {"name": "kd", "alpha": 0.2, "divergence": {"name": "forward_kl"}},
    {
        "name": "gkd",
        "alpha": 0.0,
        "divergence": {"name": "generalized_jsd", "beta": 0.5},
        "on_policy": {"lmbda": 1.0, "max_new_tokens": 5},
    },
]


@pytest.mark.parametrize(
    "extra",
    [{"runs": PACKED_RUNS}, {"runs": PACKED_RUNS[:1], "cache": {"signal": {"kind": "topk", "k": 8}}}],
    ids=["live-and-on-policy", "topk-cache"],
)
def test_a_packed_recipe_trains_the_student_of_the_padded_one(assets, tmp_path, extra):
    """The whole distill verb, packed and padded: the same loss curve step by step (off-policy with a live teacher,
    on-policy GKD sampling from the same prompts, a top-k cache read by example) and the same student."""
    from safetensors.torch import load_file

    outs = {}
    for packing in (False, True):
        out = tmp_path / f"packing_{packing}"
        patch = {"train.max_steps": 3, "train.batch_size": 4, "data.packing": packing, **extra}
        rp = str(write(tmp_path / f"{packing}.yaml", recipe(assets, out, **patch)))
        if "cache" in extra:  # the cache is written per example, unpacked; the packed run reads it by example
            assert main(["cache", rp]) == 0
        assert main(["distill", rp]) == 0
        outs[packing] = out
    for run in [r["name"] for r in extra["runs"]]:
        a, b = (json.loads((outs[p] / "runs" / run / "train_info.json").read_text()) for p in (False, True))
        assert len(a["loss_curve"]) == 3
        for (sa, la), (sb, lb) in zip(a["loss_curve"], b["loss_curve"]):
            assert sa == sb and lb == pytest.approx(la, rel=1e-5)
        assert a["loss_tokens"] == b["loss_tokens"]
        assert b["padding_share"] < a["padding_share"]  # what packing is for
        if "on_policy" in a:
            assert a["on_policy"]["gen_tokens"] == b["on_policy"]["gen_tokens"] > 0
        wa, wb = (load_file(outs[p] / "runs" / run / "model.safetensors") for p in (False, True))
        for k in wa:
            assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), (run, k)


def test_packing_with_a_leaking_student_is_one_line_exit_2(assets, tmp_path, capsys, tiny_tokenizer):
    student = tmp_path / "opt"
    torch.manual_seed(0)
    OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    ).save_pretrained(student)
    tiny_tokenizer.save_pretrained(student)
    capsys.readouterr()  # the save's progress bar
    r = recipe(
        assets,
        tmp_path / "out",
        **{
            "data.packing": True,
            "student": {"kind": "pretrained", "model": str(student)},
            "runs": [{"name": "sft", "alpha": 1.0}],
        },
    )
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.packing: the student (OPTForCausalLM" in err[0]
    assert not (tmp_path / "out" / "runs").exists()


def test_packing_with_a_row_reading_method_is_refused(assets, tmp_path, capsys):
    r = recipe(
        assets,
        tmp_path / "out",
        **{
            "data.packing": True,
            "runs": [
                {
                    "name": "d2",
                    "alpha": 0.0,
                    "divergence": {"name": "skew_forward_kl"},
                    "on_policy": {"contrastive": {}},
                }
            ],
        },
    )
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 2
    assert "data.packing: run d2 uses method distillm2" in capsys.readouterr().err
