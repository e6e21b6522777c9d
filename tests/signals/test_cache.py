"""The teacher-signal cache: round trips, exactness, resume after a kill, sharding across
processes, and training from the cache with no teacher in memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from potstill.data import PadCollator, encode_example
from potstill.divergences import chunked_kd_loss
from potstill.models import final_hidden, output_head
from potstill.signals import OnlineTeacher, SparseSignal, target_index, target_rows
from potstill.signals.cache import CachedSignal, CacheSpec, extract, write_cache
from potstill.signals.cache.write import build_shard
from potstill.signals.quant import id_bits

TEXTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Two plus two is four, and four is even."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Count from one to five:", "one, two, three, four, five"),
    ("Translate hello into Spanish:", "hola"),
    ("Name a fruit.", "I like apples and pears."),
]


def make_examples(tok, n: int = 13) -> list[dict]:
    out = []
    for i in range(n):
        p, r = TEXTS[i % len(TEXTS)]
        ex = encode_example(tok, [{"role": "user", "content": f"{p} ({i})"}], r, 64)
        ex["example_id"] = i
        out.append(ex)
    return out


def reference_rows(teacher, ex: dict) -> torch.Tensor:
    """Teacher log-softmax (T=1) of one example's target rows, run alone (batch of one)."""
    ids = torch.tensor([ex["input_ids"]])
    labels = torch.tensor([ex["labels"]])
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
    keep = labels[0, 1:] != -100
    return logits[keep]


SPECS = {
    "topk_fp16": CacheSpec(kind="topk", k=8, dtype="fp16", examples_per_shard=4, batch_size=3),
    "topk_int8": CacheSpec(kind="topk", k=16, dtype="int8", examples_per_shard=5),
    "topk_bf16_T2": CacheSpec(kind="topk", k=8, dtype="bf16", temperature=2.0, examples_per_shard=4),
    "sampled_fp16": CacheSpec(kind="sampled", draws=12, examples_per_shard=4, batch_size=2),
    "sampled_int8_tau2": CacheSpec(
        kind="sampled", draws=32, dtype="int8", proposal_temperature=2.0, examples_per_shard=6
    ),
    "dense_fp32": CacheSpec(kind="dense", dtype="fp32", examples_per_shard=4),
    "dense_int8": CacheSpec(kind="dense", dtype="int8", examples_per_shard=7),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_is_bit_exact_and_matches_the_teacher(tmp_path, tiny_teacher, tiny_tokenizer, name):
    spec = SPECS[name]
    exs = make_examples(tiny_tokenizer)
    man = write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, spec, progress=False)
    assert man["complete"] and man["data"]["num_examples"] == len(exs)
    src = CachedSignal(tmp_path, tokenizer=tiny_tokenizer)
    head = output_head(tiny_teacher)
    vocab = head.vocab
    # 1. Bit-for-bit: the columns the writer computes in memory equal what is read from disk.
    for rec in man["shards"]:
        lo, n = rec["first_example"], rec["num_examples"]
        cols = build_shard(
            tiny_teacher,
            head,
            exs[lo : lo + n],
            lo,
            spec,
            vocab,
            id_bits(vocab),
            tiny_tokenizer.pad_token_id,
            torch.device("cpu"),
        )
        from safetensors.torch import load_file

        disk = load_file(tmp_path / rec["file"])
        assert sorted(disk) == sorted(cols)
        for key in cols:
            assert disk[key].dtype == cols[key].dtype and torch.equal(disk[key], cols[key]), key
    # 2. Against an independent per-example teacher pass: same ids, values within the code's step.
    step = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2, "int8": None}[spec.dtype]
    for ex in exs:
        z = reference_rows(tiny_teacher, ex)
        got = src.example(ex["example_id"])
        assert got.rows == z.shape[0]
        batch = PadCollator(tiny_tokenizer.pad_token_id)([ex])
        sig = src.signal(batch)
        if spec.kind == "dense":
            ref = torch.log_softmax(z, -1)
            lp = sig.logits.float()  # the stored log-probs themselves
            if step is None:  # int8: sqrt code, |sqrt(p / p_max) - c / 255| <= 0.5 / 255, codes >= 1
                p, pmax = ref.exp(), ref.exp().amax(-1, keepdim=True)
                bound = (p * pmax).sqrt() / 255 + pmax / 255**2
                assert ((lp.exp() - p).abs() <= bound * (1 + 1e-4) + 1e-7).all()
            else:
                torch.testing.assert_close(lp, ref, atol=step, rtol=0)
            continue
        ref = torch.log_softmax(z / spec.temperature, -1)
        assert isinstance(sig, SparseSignal)
        real = ~torch.isneginf(sig.logprobs)
        want = ref.gather(-1, sig.ids)
        if step is not None:
            assert ((sig.logprobs - want).abs()[real] <= step * want.abs()[real].clamp_min(1)).all()
        if spec.kind == "topk":
            assert torch.equal(sig.ids, ref.topk(spec.k, -1).indices)
            assert not sig.sampled
            tail = torch.log1p(-ref.topk(spec.k, -1).values.exp().sum(-1).clamp_max(1 - 1e-7))
            torch.testing.assert_close(sig.tail_logprob, tail, atol=2e-3, rtol=0)
        else:
            assert sig.sampled
            w = sig.weights
            if spec.proposal_temperature == 1.0:
                # counts / draws: a distribution over the drawn ids with 1/draws resolution
                torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
                assert torch.equal(torch.round(w * spec.draws), w * spec.draws)
            assert (w[~real] == 0).all() and (w[real] > 0).all()
            # unique ids per row
            for row, keep in zip(sig.ids, real):
                assert row[keep].unique().numel() == int(keep.sum())


def _loss(hidden, head, labels, signal, **kw):
    loss, stats = chunked_kd_loss(hidden, head, labels, signal, normalizer=labels.numel(), chunk_size=7, **kw)
    return loss


def test_topk_with_k_equal_vocab_equals_dense(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer):
    exs = make_examples(tiny_tokenizer, 6)
    V = output_head(tiny_teacher).vocab
    write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, CacheSpec(kind="topk", k=V, dtype="fp32"), progress=False)
    src = CachedSignal(tmp_path)
    batch = PadCollator(tiny_tokenizer.pad_token_id)(exs)
    sparse = src.signal(batch)
    dense = OnlineTeacher(tiny_teacher).signal(batch)
    index = target_index(batch["labels"])
    h = target_rows(final_hidden(tiny_student, batch["input_ids"], batch["attention_mask"]), index).detach()
    y = batch["labels"][:, 1:].reshape(-1)[index]
    head = output_head(tiny_student)
    for div in ("forward_kl", "reverse_kl", "generalized_jsd", "total_variation"):
        a = _loss(h, head, y, sparse, divergence=div)
        b = _loss(h, head, y, dense, divergence=div)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dense_fp32_cache_gives_the_online_loss_and_gradients(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer):
    exs = make_examples(tiny_tokenizer, 5)
    write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, CacheSpec(kind="dense", dtype="fp32"), progress=False)
    src = CachedSignal(tmp_path)
    assert src.temperature is None  # a dense cache serves any temperature
    batch = PadCollator(tiny_tokenizer.pad_token_id)(exs[::-1])
    index = target_index(batch["labels"])
    y = batch["labels"][:, 1:].reshape(-1)[index]
    head = output_head(tiny_student)
    for T in (1.0, 2.5):
        grads = []
        for sig in (src.signal(batch), OnlineTeacher(tiny_teacher).signal(batch)):
            h = target_rows(final_hidden(tiny_student, batch["input_ids"], batch["attention_mask"]), index)
            h = h.detach().requires_grad_(True)
            loss = _loss(h, head, y, sig, divergence="skew_forward_kl", temperature=T)
            loss.backward()
            grads.append((loss.detach(), h.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-4)


def test_sampled_draws_are_unbiased_estimates_of_the_teacher(tmp_path):
    """E[weights at id v] = p_v, from the teacher itself and through a tempered proposal."""
    torch.manual_seed(0)
    V, n, trials = 12, 8, 4000
    z = torch.randn(1, V) * 2
    p = torch.softmax(z, -1)[0].double()
    for tau in (1.0, 2.0):
        spec = CacheSpec(kind="sampled", draws=n, proposal_temperature=tau)
        acc = torch.zeros(V, dtype=torch.float64)
        sq = torch.zeros(V, dtype=torch.float64)
        for trial in range(trials):
            rows = extract(z, spec, V, seeds=[trial])
            w = torch.zeros(V, dtype=torch.float64)
            weights = rows["counts"][0].double() / n if tau == 1.0 else rows["weights"][0].double()
            w.index_add_(0, rows["ids"][0], weights)
            acc += w
            sq += w * w
        mean = acc / trials
        se = ((sq / trials - mean**2).clamp_min(0) / trials).sqrt()
        assert (se > 0).any()
        assert ((mean - p).abs() <= 5 * se + 1e-9).all(), (tau, mean, p)


@pytest.mark.slow
def test_resume_after_a_real_kill_gives_the_identical_cache(tmp_path, tiny_teacher, tiny_tokenizer):
    exs = make_examples(tiny_tokenizer, 13)
    spec = CacheSpec(kind="sampled", draws=12, examples_per_shard=3, batch_size=2)
    ref = tmp_path / "ref"
    write_cache(tiny_teacher, tiny_tokenizer, exs, ref, spec, progress=False)
    # A child process SIGKILLs itself right after its second shard is on disk.
    model_dir = tmp_path / "teacher"
    tiny_teacher.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cache import make_examples
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from potstill.signals.cache import CacheSpec, write_cache
        tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).eval()
        done = []
        def on_shard(j):
            done.append(j)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        write_cache(model, tok, make_examples(tok, 13), {str(killed)!r}, CacheSpec(**{spec.__dict__!r}),
                    progress=False, on_shard=on_shard)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr
    assert not (killed / "manifest.json").exists()
    shards = sorted(killed.glob("shard-*.json"))
    assert len(shards) == 2
    with pytest.raises(Exception, match="incomplete"):
        CachedSignal(killed)
    # A torn write a kill can leave: a shard without its record, and a stray temp file.
    (killed / "shard-00003.safetensors").write_bytes(b"\0" * 100)
    (killed / ".shard-00004.safetensors.123.tmp").write_bytes(b"partial")
    written = []
    write_cache(tiny_teacher, tiny_tokenizer, exs, killed, spec, progress=False, on_shard=written.append)
    assert written == [2, 3, 4]  # resumed at the first missing shard, kept the two finished ones
    for f in sorted(ref.iterdir()):
        assert (killed / f.name).read_bytes() == f.read_bytes(), f.name


def _cache_cmd(model_dir: Path, out: Path, rank: int, world: int) -> list[str]:
    code = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cache import make_examples
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from potstill.signals.cache import CacheSpec, write_cache
        tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).eval()
        spec = CacheSpec(kind="topk", k=8, dtype="int8", examples_per_shard=2, batch_size=2)
        m = write_cache(model, tok, make_examples(tok, 13), {str(out)!r}, spec, rank={rank}, world_size={world},
                        progress=False)
        print("MANIFEST" if m is not None else "PARTIAL")
    """)
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_two_processes_give_the_same_cache_as_one(tmp_path, tiny_teacher, tiny_tokenizer):
    from helpers_proc import run, run_all  # here: the child processes import this module without tests/ on their path

    model_dir = tmp_path / "teacher"
    tiny_teacher.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    r = run(_cache_cmd(model_dir, one, 0, 1), env=env, timeout=120)
    assert r.returncode == 0 and "MANIFEST" in r.stdout, r.stderr
    two = tmp_path / "two"
    # run_all: on timeout both ranks are killed (and the test fails), and none may outlive the test
    ranks = run_all([_cache_cmd(model_dir, two, rank, 2) for rank in (0, 1)], env=env, timeout=120)
    assert all(p.returncode == 0 for p in ranks), [p.stderr for p in ranks]
    assert any("MANIFEST" in p.stdout for p in ranks)  # the last rank to finish merged the manifest
    names = sorted(f.name for f in one.iterdir())
    assert names == sorted(f.name for f in two.iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) == 7
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_kd_trainer_trains_from_the_cache_without_a_teacher(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer):
    """Several epochs, shuffled, sampled signal, a non-KL divergence; the loss goes down."""
    from datasets import Dataset

    from potstill.kd import KDConfig, KDTrainer

    exs = make_examples(tiny_tokenizer, 8)
    write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path / "c", CacheSpec(kind="sampled", draws=16), progress=False)
    src = CachedSignal(tmp_path / "c", tokenizer=tiny_tokenizer)
    seen: list[list[int]] = []
    real_signal = src.signal

    def spy(batch):
        seen.append(batch["example_id"].tolist())
        return real_signal(batch)

    src.signal = spy
    ds = Dataset.from_list([{k: e[k] for k in ("input_ids", "attention_mask", "labels", "example_id")} for e in exs])
    args = KDConfig(
        output_dir=str(tmp_path / "o"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        alpha=0.0,
        divergence="generalized_jsd",
        divergence_kwargs={"beta": 0.5},
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = KDTrainer(
        model=tiny_student, args=args, signal_source=src, train_dataset=ds, processing_class=tiny_tokenizer
    )
    assert trainer.teacher_model is None
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(seen) == 12 and trainer.state.epoch >= 5.9  # six epochs over 8 examples
    assert sorted(sum(seen[:2], [])) == list(range(8))  # every example once per epoch
    assert seen[0] != seen[2]  # reshuffled between epochs
    assert sum(losses[-3:]) < sum(losses[:3])
