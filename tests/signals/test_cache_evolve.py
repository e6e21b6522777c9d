"""A cache that outlives its data and its teacher: appending examples, refreshing against a
changed teacher (only the rows that drifted), and the manifest's record of both."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from potstill.errors import PotstillError
from potstill.signals.cache import CachedSignal, CacheSpec, write_cache
from potstill.signals.cache.refresh import RefreshRule, probe_prefix, refresh_cache

from .cache_helpers import encode
from .test_cache import TEXTS, make_examples, reference_rows

SPEC = CacheSpec(kind="topk", k=8, dtype="fp32", examples_per_shard=3, batch_size=2)
SAMPLED = CacheSpec(kind="sampled", draws=12, dtype="fp16", examples_per_shard=3, batch_size=2)
DENSE = CacheSpec(kind="dense", dtype="fp32", examples_per_shard=3, batch_size=2)


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("shard-*"))}


def _changed(teacher, scale: float = 3.0, seed: int = 1):
    """The teacher after a small change to its last layer (a stand-in for a fine-tuning step)."""
    new = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.model.layers[-1].parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return new


def _reference_drift(new_teacher, cached: CachedSignal, ex: dict, eid: int, probe: int | None) -> float:
    """KL(new || old) per row on the cached ids plus one bucket, written out row by row from the
    new teacher run on the whole example alone (not on the probe's prefix)."""
    lp_new = torch.log_softmax(reference_rows(new_teacher, ex).double(), -1)
    old = cached.rows_signal([eid])
    n = lp_new.shape[0] if probe is None else min(probe, lp_new.shape[0])
    total = 0.0
    for r in range(n):
        live = torch.isfinite(old.logprobs[r])
        ids, lo = old.ids[r][live], old.logprobs[r][live].double()
        ln = lp_new[r, ids]
        p_new = [*ln.exp().tolist(), 1 - float(ln.exp().sum())]
        p_old = [*lo.exp().tolist(), 1 - float(lo.exp().sum())]
        total += sum(a * math.log(a / b) for a, b in zip(p_new, p_old) if a > 0)
    return total / n


# ----------------------------------------------------------------------------- append


@pytest.mark.parametrize("spec", [SPEC, SAMPLED], ids=["topk", "sampled"])
def test_append_writes_only_the_new_examples_and_keeps_old_shards_byte_identical(
    tmp_path, tiny_teacher, tiny_tokenizer, spec
):
    exs = make_examples(tiny_tokenizer, 11)
    path = tmp_path / "c"
    write_cache(tiny_teacher, tiny_tokenizer, exs[:5], path, spec, progress=False)  # shards [0,3) [3,5)
    before = _files(path)
    with pytest.raises(PotstillError, match=r"grew by 6 examples.*--append"):
        write_cache(tiny_teacher, tiny_tokenizer, exs, path, spec, progress=False)
    written: list[int] = []
    man = write_cache(
        tiny_teacher, tiny_tokenizer, exs, path, spec, append=True, progress=False, on_shard=written.append
    )
    assert written == [2, 3]  # the new examples [5, 8) and [8, 11): no old shard rewritten
    assert [(r["first_example"], r["num_examples"]) for r in man["shards"]] == [(0, 3), (3, 2), (5, 3), (8, 3)]
    assert man["segments"] == [5] and man["data"]["num_examples"] == 11
    after = _files(path)
    assert {k: after[k] for k in before} == before
    # The grown cache reads every example as a cache written at once does.
    whole = tmp_path / "whole"
    write_cache(tiny_teacher, tiny_tokenizer, exs, whole, spec, progress=False)
    a, b = CachedSignal(path, tokenizer=tiny_tokenizer), CachedSignal(whole, tokenizer=tiny_tokenizer)
    a.check_data(exs)
    for e in range(len(exs)):
        x, y = a.stored_rows(e), b.stored_rows(e)
        assert torch.equal(x.ids, y.ids) and x.rows == y.rows
        torch.testing.assert_close(x.values["values"].float(), y.values["values"].float(), rtol=0, atol=2e-3)
    # Rerunning on the grown data is a no-op; a dataset that is not an extension is refused.
    assert write_cache(tiny_teacher, tiny_tokenizer, exs, path, spec, progress=False) == man
    assert _files(path) == after
    other = make_examples(tiny_tokenizer, 12)[1:]
    with pytest.raises(PotstillError, match="made for another setup"):
        write_cache(tiny_teacher, tiny_tokenizer, other, path, spec, append=True, progress=False)


def test_append_twice_and_resume_after_a_kill(tmp_path, tiny_teacher, tiny_tokenizer):
    exs = make_examples(tiny_tokenizer, 10)
    path = tmp_path / "c"
    write_cache(tiny_teacher, tiny_tokenizer, exs[:4], path, SPEC, progress=False)
    write_cache(tiny_teacher, tiny_tokenizer, exs[:6], path, SPEC, append=True, progress=False)

    def die(j):
        if j == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, append=True, progress=False, on_shard=die)
    man = write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, append=True, progress=False)
    assert man["segments"] == [4, 6]
    assert [(r["first_example"], r["num_examples"]) for r in man["shards"]] == [(0, 3), (3, 1), (4, 2), (6, 3), (9, 1)]
    CachedSignal(path).check_data(exs)


# ---------------------------------------------------------------------------- refresh


def test_probe_prefix_keeps_the_first_target_rows_exactly(tiny_teacher, tiny_tokenizer):
    ex = make_examples(tiny_tokenizer, 3)[2]
    full = reference_rows(tiny_teacher, ex)
    cut = probe_prefix(ex, 4)
    assert len(cut["input_ids"]) < len(ex["input_ids"])
    torch.testing.assert_close(reference_rows(tiny_teacher, cut), full[:4], rtol=1e-5, atol=1e-5)
    assert probe_prefix(ex, 10_000) is ex and probe_prefix(ex, None) is ex


def test_refresh_against_the_same_teacher_recomputes_nothing(tmp_path, tiny_teacher, tiny_tokenizer):
    exs = make_examples(tiny_tokenizer, 7)
    man = write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, SPEC, progress=False)
    before = _files(tmp_path)
    timings: dict = {}
    same = copy.deepcopy(tiny_teacher)
    again = refresh_cache(same, tiny_tokenizer, exs, tmp_path, SPEC, progress=False, timings=timings)
    assert again == man and _files(tmp_path) == before
    assert timings == {}  # not one teacher forward


@pytest.mark.parametrize(("spec", "probe"), [(SPEC, None), (DENSE, 3)], ids=["topk-all", "dense-probe3"])
def test_the_drift_of_an_unchanged_teacher_is_zero(tmp_path, tiny_teacher, tiny_tokenizer, spec, probe):
    from potstill.models import output_head
    from potstill.signals.cache.refresh import example_drifts

    exs = make_examples(tiny_tokenizer, 7)
    write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, spec, progress=False)
    cached = CachedSignal(tmp_path)
    drifts, rows, whole = example_drifts(
        tiny_teacher, output_head(tiny_teacher), exs, list(range(7)), cached, probe, 3, 256, 0, "cpu"
    )
    total = cached.manifest["data"]["num_rows"]
    assert rows == (total if probe is None else 3 * len(exs)) and whole == {}  # nothing encoded unless asked
    assert max(abs(d) for d in drifts) < 1e-6


@pytest.mark.parametrize("probe", [None, 3])
def test_refresh_recomputes_exactly_the_examples_over_the_threshold(tmp_path, tiny_teacher, tiny_tokenizer, probe):
    exs = make_examples(tiny_tokenizer, 8)
    old_dir = tmp_path / "c"
    write_cache(tiny_teacher, tiny_tokenizer, exs, old_dir, SPEC, progress=False)
    old = CachedSignal(old_dir)
    old_rows = {e: old.stored_rows(e) for e in range(len(exs))}
    before = _files(old_dir)
    new_teacher = _changed(tiny_teacher)
    ref = [_reference_drift(new_teacher, old, x, e, probe) for e, x in enumerate(exs)]
    # the threshold in the widest gap between drifts, keeping at least two examples on each side
    s = sorted(ref)
    k = max(range(2, len(s) - 1), key=lambda i: s[i] - s[i - 1])
    threshold = (s[k - 1] + s[k]) / 2
    want = {e for e, d in enumerate(ref) if d > threshold}
    assert 2 <= len(want) <= len(exs) - 2 and s[k] - s[k - 1] > 1e-4  # far above the rounding of drift
    del old
    rule = RefreshRule(threshold=threshold, probe_tokens=probe)
    man = refresh_cache(new_teacher, tiny_tokenizer, exs, old_dir, SPEC, rule, teacher_name="new", progress=False)
    # exactly the examples over the threshold come from the new teacher, as the manifest records
    from potstill.fingerprints import weights_fingerprint

    new_fp, old_fp = weights_fingerprint(new_teacher), weights_fingerprint(tiny_teacher)
    per_example = [fp for _, n, fp in man["sources"] for _ in range(n)]
    assert {e for e, fp in enumerate(per_example) if fp == new_fp} == want
    assert {fp for fp in per_example if fp != new_fp} == {old_fp}
    assert man["teacher"] == {"name": "new", "fingerprint": new_fp}
    (rec,) = man["refreshes"]
    assert rec["examples_recomputed"] == len(want) and rec["examples_probed"] == len(exs)
    drift = json.loads((old_dir / "drift.json").read_text())
    torch.testing.assert_close(
        torch.tensor([drift["drift"][str(e)] for e in range(len(exs))]), torch.tensor(ref), rtol=1e-4, atol=1e-6
    )
    # a mixed cache is refused unless allowed; allowed, kept rows are bit for bit the old ones
    # and recomputed rows are the new teacher's (as a cache written by it from scratch)
    with pytest.raises(PotstillError, match=r"rows of 2 teachers.*allow_mixed"):
        CachedSignal(old_dir)
    mixed = CachedSignal(old_dir, allow_mixed=True, teacher_fingerprint=new_fp)
    mixed.check_data(exs)
    fresh_dir = tmp_path / "fresh"
    write_cache(new_teacher, tiny_tokenizer, exs, fresh_dir, SPEC, progress=False)
    fresh = CachedSignal(fresh_dir)
    for e in range(len(exs)):
        got, exp = mixed.stored_rows(e), (fresh.stored_rows(e) if e in want else old_rows[e])
        assert torch.equal(got.ids, exp.ids)
        if e in want:
            torch.testing.assert_close(got.values["values"], exp.values["values"], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got.values["values"], exp.values["values"]) and torch.equal(got.tail, exp.tail)
    # shards with nothing to recompute keep their file; the others have a new revision, the old file is gone
    after = _files(old_dir)
    for r in man["shards"]:
        touched = any(r["first_example"] <= e < r["first_example"] + r["num_examples"] for e in want)
        assert (r["file"] in before) != touched and (r.get("revision", 0) == 1) == touched
        if not touched:
            assert after[r["file"]] == before[r["file"]]
    assert not list(old_dir.glob("drift-*")) and not (old_dir / "refresh.json").exists()
    assert set(after) == {r["file"] for r in man["shards"]} | {
        r["file"].replace(".safetensors", ".json") for r in man["shards"]
    }
    # refreshing again under the same rule changes nothing; threshold 0 brings every row to the new teacher
    assert refresh_cache(new_teacher, tiny_tokenizer, exs, old_dir, SPEC, rule, progress=False) == man
    full = refresh_cache(new_teacher, tiny_tokenizer, exs, old_dir, SPEC, RefreshRule(threshold=0.0), progress=False)
    assert "sources" not in full and len(full["refreshes"]) == 2
    CachedSignal(old_dir, teacher_fingerprint=new_fp)  # not mixed any more


def _long_answers(tok, n: int) -> list[dict]:
    """Short prompts, answers of 30-60 tokens: the probes are a fraction of each example."""
    from potstill.data import encode_example

    out = []
    for i in range(n):
        p, r = TEXTS[i % len(TEXTS)]
        ex = encode_example(tok, [{"role": "user", "content": f"({i})"}], " ".join([r] * (2 + i % 3)), 96)
        ex["example_id"] = i
        out.append(ex)
    return out


@pytest.mark.parametrize(
    ("spec", "answers"),
    [(SPEC, "short"), (SAMPLED, "short"), (DENSE, "short"), (SPEC, "long")],
    ids=["topk", "sampled", "dense", "topk-long"],
)
def test_a_refresh_reads_each_token_once_and_writes_the_new_teachers_rows(
    tmp_path, tiny_teacher, tiny_tokenizer, spec, answers
):
    """Under a threshold, an example over it is finished from its probe's key/value cache, so a refresh
    that recomputes every example reads exactly the tokens a new cache reads, none twice; the rows it
    writes are those the new teacher writes from scratch (the same draws for a sampled cache). With
    long answers a probe batch holds a whole shard, finished in two continuations from copies of its
    cache (out of the probe's row order)."""
    exs = make_examples(tiny_tokenizer, 8) if answers == "short" else _long_answers(tiny_tokenizer, 8)
    old_dir, fresh_dir = tmp_path / "c", tmp_path / "fresh"
    write_cache(tiny_teacher, tiny_tokenizer, exs, old_dir, spec, progress=False)
    new_teacher = _changed(tiny_teacher)
    wrote: dict = {}
    write_cache(new_teacher, tiny_tokenizer, exs, fresh_dir, spec, progress=False, timings=wrote)
    spent: dict = {}
    rule = RefreshRule(threshold=0.0, probe_tokens=3)
    man = refresh_cache(new_teacher, tiny_tokenizer, exs, old_dir, spec, rule, progress=False, timings=spent)
    assert man["refreshes"][0]["examples_recomputed"] == len(exs) and "sources" not in man
    assert spent["probe_tokens_read"] + spent["tokens_read"] == wrote["tokens_read"]
    assert spent["tokens_read"] > 0 and man["refreshes"][0]["drift_rows"] == 3 * len(exs)  # all cut after 3
    got, want = CachedSignal(old_dir), CachedSignal(fresh_dir)
    for e in range(len(exs)):
        x, y = got.stored_rows(e), want.stored_rows(e)
        assert torch.equal(x.ids, y.ids) and x.rows == y.rows
        torch.testing.assert_close(x.values["values"].float(), y.values["values"].float(), rtol=1e-5, atol=2e-3)


def test_refresh_by_fraction_takes_the_largest_drifts(tmp_path, tiny_teacher, tiny_tokenizer):
    exs = make_examples(tiny_tokenizer, 7)
    write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, SPEC, progress=False)
    new_teacher = _changed(tiny_teacher, seed=3)
    rule = RefreshRule(threshold=None, fraction=0.4, probe_tokens=None)
    man = refresh_cache(new_teacher, tiny_tokenizer, exs, tmp_path, SPEC, rule, progress=False)
    drift = json.loads((tmp_path / "drift.json").read_text())
    top = sorted(range(7), key=lambda e: -drift["drift"][str(e)])[: math.ceil(0.4 * 7)]
    assert drift["recomputed"] == sorted(top) and man["refreshes"][0]["examples_recomputed"] == 3


def test_a_killed_refresh_resumes_to_the_same_cache(tmp_path, tiny_teacher, tiny_tokenizer, monkeypatch):
    import potstill.signals.cache.refresh as refresh

    exs = make_examples(tiny_tokenizer, 9)
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        write_cache(tiny_teacher, tiny_tokenizer, exs, p, SAMPLED, progress=False)
    new_teacher = _changed(tiny_teacher)
    rule = RefreshRule(threshold=0.0, probe_tokens=2)
    whole = refresh_cache(new_teacher, tiny_tokenizer, exs, a, SAMPLED, rule, progress=False)
    real, calls = refresh.write_shard, []

    def dies_on_the_second_shard(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(refresh, "write_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        refresh_cache(new_teacher, tiny_tokenizer, exs, b, SAMPLED, rule, progress=False)
    assert (b / "refresh.json").is_file() and len(list(b.glob("drift-*"))) == 1
    CachedSignal(b)  # the old cache is intact meanwhile
    monkeypatch.setattr(refresh, "write_shard", real)
    assert refresh_cache(new_teacher, tiny_tokenizer, exs, b, SAMPLED, rule, progress=False) == whole
    assert _files(a) == _files(b)


def test_refresh_refuses_other_data_and_a_bad_rule(tmp_path, tiny_teacher, tiny_tokenizer):
    exs = encode(tiny_tokenizer)
    write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, SPEC, progress=False)
    with pytest.raises(PotstillError, match="training examples differ"):
        refresh_cache(_changed(tiny_teacher), tiny_tokenizer, exs[:-1], tmp_path, SPEC, progress=False)
    with pytest.raises(PotstillError, match="exactly one of threshold and fraction"):
        refresh_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path, SPEC, RefreshRule(fraction=0.5), progress=False)
    with pytest.raises(PotstillError, match="fraction needs every example"):
        RefreshRule(threshold=None, fraction=0.5).check(world_size=2)


def test_a_refresh_split_over_two_ranks_equals_one_process(tmp_path, tiny_teacher, tiny_tokenizer):
    """Rank r of 2 probes and rewrites the shards j % 2 == r; whichever finishes last writes the manifest."""
    exs = make_examples(tiny_tokenizer, 9)
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        write_cache(tiny_teacher, tiny_tokenizer, exs, p, SPEC, progress=False)
    new_teacher = _changed(tiny_teacher)
    rule = RefreshRule(threshold=0.0, probe_tokens=3)
    one = refresh_cache(new_teacher, tiny_tokenizer, exs, a, SPEC, rule, progress=False)
    assert refresh_cache(new_teacher, tiny_tokenizer, exs, b, SPEC, rule, rank=1, world_size=2, progress=False) is None
    assert sorted(f.name for f in b.glob("drift-*")) == ["drift-1-00001.json"]
    two = refresh_cache(new_teacher, tiny_tokenizer, exs, b, SPEC, rule, rank=0, world_size=2, progress=False)
    assert two == one and _files(a) == _files(b)
