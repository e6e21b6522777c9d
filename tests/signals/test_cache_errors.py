"""Every way a teacher-signal cache can be wrong fails loudly.

Each case must raise a PotstillError whose message is one line that says what to do
(rebuild / rerun / delete ...), and the reader must not hand back a signal (EasyDistill
#21: a cache that silently answers with zeros trains a student on nothing).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from potstill.data import PadCollator
from potstill.errors import PotstillError
from potstill.fingerprints import weights_fingerprint
from potstill.signals import SparseSignal
from potstill.signals.cache import CachedSignal, CacheSpec, read_manifest, write_cache

from .cache_helpers import PAIRS, SPEC, encode, shard


def batch(examples: list[dict], pad_id: int, *, drop_ids: bool = False) -> dict[str, torch.Tensor]:
    b = PadCollator(pad_id)([{k: v for k, v in ex.items() if not (drop_ids and k == "example_id")} for ex in examples])
    assert ("example_id" in b) != drop_ids
    return b


def fails(call, *words: str) -> str:
    """``call()`` raises a one-line PotstillError containing every word (case-insensitive)."""
    with pytest.raises(PotstillError) as info:
        call()
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in: {msg}"
    return msg


def snapshot(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


@pytest.fixture
def pad(tiny_tokenizer):
    return tiny_tokenizer.pad_token_id


def test_a_good_batch_reads_back(built, tiny_tokenizer, tiny_teacher, pad):
    # The control for every case below: the same reader calls succeed on intact input.
    path, exs = built
    src = CachedSignal(path, tokenizer=tiny_tokenizer, teacher_fingerprint=weights_fingerprint(tiny_teacher))
    b = batch([exs[1], exs[4], exs[6]], pad)
    sig = src.signal(b)
    n = int((b["labels"][:, 1:] != -100).sum())
    assert isinstance(sig, SparseSignal) and sig.num_rows == n and sig.ids.shape == (n, 8)
    assert torch.isfinite(sig.logprobs).all() and (sig.logprobs < 0).all()
    by_hash = src.signal(batch([exs[1], exs[4], exs[6]], pad, drop_ids=True))
    assert torch.equal(by_hash.ids, sig.ids) and torch.equal(by_hash.logprobs, sig.logprobs)


# --------------------------------------------------------------- reading with other inputs


def test_reading_with_another_chat_template_is_refused(built, tiny_tokenizer):
    path, _ = built
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = tiny_tokenizer.chat_template.replace("'\n' }}", "'\n\n' }}")
    assert other.chat_template != tiny_tokenizer.chat_template
    fails(lambda: CachedSignal(path, tokenizer=other), "another tokenizer or chat template", "rebuild the cache")


def test_reading_with_another_teacher_is_refused(built, tiny_teacher):
    path, _ = built
    with torch.no_grad():
        tiny_teacher.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    fails(
        lambda: CachedSignal(path, teacher_fingerprint=weights_fingerprint(tiny_teacher)),
        "another teacher",
        "rebuild the cache",
    )


def test_an_example_id_whose_tokens_changed_is_refused(built, tiny_tokenizer, pad):
    path, exs = built
    src = CachedSignal(path)
    swapped = dict(exs[4], example_id=3)  # the id of another example
    fails(lambda: src.signal(batch([exs[0], swapped], pad)), "example 3", "tokens differ", "rebuild the cache")
    # the same prompt, cut shorter by a smaller max_length: same id, other tokens
    short = encode(tiny_tokenizer, max_length=len(exs[2]["input_ids"]) - 2)[2]
    assert short["input_ids"] != exs[2]["input_ids"]
    fails(lambda: src.signal(batch([short], pad)), "example 2", "max_length", "rebuild the cache")


def test_a_batch_without_ids_whose_tokens_are_not_cached_is_refused(built, tiny_tokenizer, pad):
    path, exs = built
    src = CachedSignal(path)
    new = encode(tiny_tokenizer, [("Name a fruit.", "I like apples.")])[0]
    fails(
        lambda: src.signal(batch([exs[0], new], pad, drop_ids=True)),
        "example 1 of this batch",
        "not in",
        "rebuild the cache",
    )


@pytest.mark.parametrize("bad_id", [7, 1000, -1])
def test_an_example_id_out_of_range_is_refused(built, pad, bad_id):
    path, exs = built
    src = CachedSignal(path)
    fails(
        lambda: src.signal(batch([dict(exs[0], example_id=bad_id)], pad)),
        f"example id {bad_id} is not in the cache (7 examples)",
        "rebuild the cache",
    )
    fails(lambda: src.example(bad_id), "rebuild the cache")


def test_labels_masked_differently_are_refused(built, pad):
    path, exs = built
    src = CachedSignal(path)
    ex = copy.deepcopy(exs[5])
    first = next(i for i, t in enumerate(ex["labels"]) if t != -100)
    ex["labels"][first] = -100  # one response token fewer
    fails(lambda: src.signal(batch([ex], pad)), "example 5", "rebuild the cache")


def test_a_batch_with_more_target_tokens_than_cached_rows_is_refused(built, pad):
    # Same visible tokens (so the content hash matches) but a label on a padded position:
    # the student would have one row more than the cache.
    path, exs = built
    src = CachedSignal(path)
    b = batch([exs[6], exs[2]], pad)
    n6 = len(exs[6]["input_ids"])
    assert n6 < b["labels"].shape[1]
    b["labels"][0, n6] = 42  # attention_mask there is 0
    fails(lambda: src.signal(b), "example 6", "target tokens in the batch", "cached rows", "rebuild the cache")


# --------------------------------------------------------- writing over an existing cache


def _spec(**kw) -> CacheSpec:
    return CacheSpec(**{**SPEC.__dict__, **kw})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"k": 16}, "spec.k"),
        ({"kind": "dense"}, "spec.kind"),
        ({"dtype": "int8"}, "spec.dtype"),
        ({"temperature": 2.0}, "spec.temperature"),
        ({"kind": "sampled"}, "spec.kind"),
    ],
)
def test_rewriting_with_another_spec_is_refused(cache_copy, tiny_teacher, tiny_tokenizer, change, field):
    path, exs = cache_copy
    before = snapshot(path)
    msg = fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, exs, path, _spec(**change), progress=False),
        "another setup",
        field,
        "another cache directory or delete this one",
    )
    named = msg.split("(", 1)[1].split(" differ)", 1)[0].split(", ")
    assert field in named and not any(n.startswith(("teacher", "data", "tokenizer")) for n in named), named
    assert snapshot(path) == before


def test_rewriting_with_another_teacher_is_refused(cache_copy, tiny_teacher, tiny_tokenizer):
    path, exs = cache_copy
    before = snapshot(path)
    with torch.no_grad():
        tiny_teacher.lm_head.weight[3, 3] *= 2
    msg = fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False),
        "teacher.fingerprint",
        "delete this one",
    )
    assert msg.split("(", 1)[1].split(" differ)", 1)[0] == "teacher.fingerprint"
    assert snapshot(path) == before


@pytest.mark.parametrize("how", ["one example changed", "one example fewer"])
def test_rewriting_with_other_data_is_refused(cache_copy, tiny_teacher, tiny_tokenizer, how):
    path, _ = cache_copy
    before = snapshot(path)
    if how == "one example changed":
        pairs = PAIRS[:3] + [("How many days are in a week?", "Seven.")] + PAIRS[4:]
    else:
        pairs = PAIRS[:-1]
    new = encode(tiny_tokenizer, pairs)
    fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, new, path, SPEC, progress=False),
        "data.fingerprint",
        "delete this one",
    )
    assert snapshot(path) == before


def test_rewriting_with_another_chat_template_is_refused(cache_copy, tiny_teacher, tiny_tokenizer):
    path, exs = cache_copy
    tiny_tokenizer.chat_template = tiny_tokenizer.chat_template + "{{ '' }}"
    msg = fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False),
        "tokenizer.fingerprint",
        "chat_template",
        "delete this one",
    )
    named = msg.split("(", 1)[1].split(" differ)", 1)[0].split(", ")
    assert sorted(named) == ["chat_template", "tokenizer.fingerprint"], named


def test_a_corrupt_plan_is_reported(cache_copy, tiny_teacher, tiny_tokenizer):
    path, exs = cache_copy
    (path / "plan.json").write_text("{not json")
    fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False),
        "plan.json is not valid JSON",
        "delete the cache directory and rerun",
    )


# ----------------------------------------------------------------------- incomplete caches


class _Killed(Exception):
    pass


def test_an_interrupted_cache_is_incomplete_then_resumes_to_the_same_bytes(
    built, tmp_path, tiny_teacher, tiny_tokenizer, pad
):
    ref, exs = built
    path = tmp_path / "c"

    def kill(j):
        raise _Killed(j)

    with pytest.raises(_Killed):
        write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False, on_shard=kill)
    assert not (path / "manifest.json").exists() and shard(path, 0).is_file()
    fails(lambda: read_manifest(path), "incomplete (1 of 3 shards)", "rerun `potstill cache`")
    fails(lambda: CachedSignal(path), "incomplete (1 of 3 shards)", "rerun `potstill cache`")
    man = write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False)
    assert man is not None and man["complete"]
    assert snapshot(path) == snapshot(ref)
    assert CachedSignal(path).signal(batch(exs, pad)).num_rows == man["data"]["num_rows"]


def test_one_rank_of_two_leaves_an_incomplete_cache(tmp_path, built, tiny_teacher, tiny_tokenizer):
    _, exs = built
    path = tmp_path / "c"
    assert write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, rank=0, world_size=2, progress=False) is None
    fails(lambda: CachedSignal(path), "incomplete (2 of 3 shards)", "rerun")


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_no_cache_at_all(tmp_path, where):
    path = tmp_path / "nothing"
    if where == "empty":
        path.mkdir()
    fails(lambda: CachedSignal(path), "no teacher-signal cache", "run `potstill cache` first")


# -------------------------------------------------------------------------- corruption


def _header_end(f: Path) -> int:
    data = f.read_bytes()
    return 8 + int.from_bytes(data[:8], "little")


def _rerun_fix(msg: str) -> None:
    assert "rerun `potstill cache`" in msg


@pytest.mark.parametrize("verify", [True, False])
def test_a_truncated_shard_is_detected_when_the_cache_is_opened(cache_copy, verify):
    path, _ = cache_copy
    f = shard(path, 1)
    f.write_bytes(f.read_bytes()[:-10])
    for _ in range(2):  # and again: a failure is not remembered as a success
        _rerun_fix(
            fails(lambda: CachedSignal(path, verify=verify), "shard-00001", "does not match its manifest", "truncated")
        )


@pytest.mark.parametrize("verify", [True, False])
def test_a_shard_truncated_after_opening_is_detected_when_read(cache_copy, pad, verify):
    path, exs = cache_copy
    src = CachedSignal(path, verify=verify)
    f = shard(path, 1)
    f.write_bytes(f.read_bytes()[:-10])
    for _ in range(2):
        _rerun_fix(fails(lambda: src.signal(batch([exs[3]], pad)), "shard-00001", "truncated"))
    fails(lambda: src.example(4), "truncated")
    assert src.signal(batch([exs[0], exs[6]], pad)).num_rows > 0  # other shards still read


def test_a_flipped_data_byte_fails_the_sha256_check_when_the_cache_is_opened(cache_copy, pad):
    path, exs = cache_copy
    f = shard(path, 2)
    data = bytearray(f.read_bytes())
    assert len(data) - 1 >= _header_end(f)
    data[-1] ^= 0x40  # inside the tensor data, not the header
    f.write_bytes(bytes(data))
    for _ in range(2):
        _rerun_fix(
            fails(
                lambda: CachedSignal(path, verify=True),
                "shard-00002",
                "does not match its manifest",
                "sha256",
                "corrupt",
            )
        )
    # verify=False opts out of hashing (sizes are still checked): the flipped byte goes unnoticed
    assert CachedSignal(path, verify=False).signal(batch([exs[0]], pad)).num_rows > 0


def test_a_corrupt_header_is_detected(cache_copy, pad):
    path, exs = cache_copy
    f = shard(path, 0)
    data = bytearray(f.read_bytes())
    assert data[8:9] == b"{"
    data[8:9] = b"#"  # the JSON header no longer parses; the size is unchanged
    f.write_bytes(bytes(data))
    _rerun_fix(fails(lambda: CachedSignal(path), "shard-00000", "sha256"))
    src = CachedSignal(path, verify=False)  # without the hash: when the shard is first read
    for _ in range(2):
        _rerun_fix(fails(lambda: src.signal(batch([exs[1]], pad)), "shard-00000", "cannot be read"))


@pytest.mark.parametrize("verify", [True, False])
def test_a_missing_shard_file_is_detected_when_the_cache_is_opened(cache_copy, verify):
    path, _ = cache_copy
    shard(path, 1).unlink()
    _rerun_fix(fails(lambda: CachedSignal(path, verify=verify), "shard-00001", "missing"))


def test_a_shard_that_disagrees_with_its_manifest_record_is_detected(cache_copy, pad):
    path, exs = cache_copy
    man = json.loads((path / "manifest.json").read_text())
    man["shards"][1]["num_rows"] += 1
    (path / "manifest.json").write_text(json.dumps(man))
    src = CachedSignal(path)
    _rerun_fix(fails(lambda: src.signal(batch([exs[3]], pad)), "does not match its manifest record"))


def test_a_manifest_that_is_not_json(cache_copy):
    path, _ = cache_copy
    (path / "manifest.json").write_text('{"format": "potstill-cache", ')
    _rerun_fix(fails(lambda: CachedSignal(path), "manifest.json is corrupt (not JSON)"))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"format": "other-cache"}, ("not a potstill cache manifest", "point the recipe at a cache directory")),
        ({"version": 2}, ("version 2 is not 1", "rebuild the cache")),
        ({"version": None}, ("version None is not 1", "rebuild the cache")),
    ],
)
def test_a_manifest_of_another_format_or_version(cache_copy, edit, words):
    path, _ = cache_copy
    man = json.loads((path / "manifest.json").read_text())
    man.update(edit)
    (path / "manifest.json").write_text(json.dumps(man))
    fails(lambda: CachedSignal(path), *words)


def test_a_manifest_that_is_a_list(cache_copy):
    path, _ = cache_copy
    (path / "manifest.json").write_text("[1, 2]")
    fails(lambda: CachedSignal(path), "not a potstill cache manifest")


def _edit_manifest(path: Path, edit) -> None:
    man = json.loads((path / "manifest.json").read_text())
    edit(man)
    (path / "manifest.json").write_text(json.dumps(man))


def _set(keys: str, value):
    def edit(m):
        *parents, last = keys.split(".")
        for k in parents:
            m = m[int(k) if isinstance(m, list) else k]
        m[int(last) if isinstance(m, list) else last] = value

    return edit


def _drop(keys: str):
    def edit(m):
        *parents, last = keys.split(".")
        for k in parents:
            m = m[int(k) if isinstance(m, list) else k]
        del m[last]

    return edit


MANIFEST_DAMAGE = {
    # name: (edit, words the one-line message must contain)
    "num_shards removed": (_drop("num_shards"), ("has no field 'num_shards'",)),
    "spec is a string": (_set("spec", "topk"), ("bad field 'spec'",)),
    "spec.k is a string": (_set("spec.k", "8"), ("bad field 'spec.k'",)),
    "spec.kind unknown": (_set("spec.kind", "toppk"), ("bad field 'spec.kind'",)),
    "spec field removed": (_drop("spec.examples_per_shard"), ("has no field 'spec.examples_per_shard'",)),
    "a shard record without sha256": (_drop("shards.1.sha256"), ("has no field 'shards.1.sha256'",)),
    "a shard's sha256 is a number": (_set("shards.0.sha256", 123), ("bad field 'shards.0.sha256'",)),
    "a shard's bytes negative": (_set("shards.2.bytes", -1), ("bad field 'shards.2.bytes'",)),
    "shards is an object": (_set("shards", {}), ("bad field 'shards'",)),
    "teacher is null": (_set("teacher", None), ("bad field 'teacher'",)),
    "data.fingerprint removed": (_drop("data.fingerprint"), ("has no field 'data.fingerprint'",)),
    "vocab_size a float": (_set("vocab_size", 1.5), ("bad field 'vocab_size'",)),
    "a mistyped key": (lambda m: m.update(num_shard=m.pop("num_shards")), ("has no field 'num_shards'",)),
    "an unknown key": (_set("shards.0.sha265", "x"), ("unknown field 'shards.0.sha265'",)),
    "num_shards disagrees": (_set("num_shards", 4), ("lists 3 shards", "'num_shards' says 4")),
    "a shard file outside the cache": (
        _set("shards.2.file", "../../elsewhere.safetensors"),
        ("bad record for shard 2",),
    ),
    "shards out of order": (lambda m: m["shards"].reverse(), ("bad record for shard 0",)),
    "a shard missing from the list": (
        lambda m: (m["shards"].pop(), m.update(num_shards=2)),
        ("holding 6 examples", "'data.num_examples' says 7"),
    ),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_manifest_with_a_missing_or_mistyped_field(cache_copy, case):
    path, _ = cache_copy
    edit, words = MANIFEST_DAMAGE[case]
    _edit_manifest(path, edit)
    for call in (lambda: read_manifest(path), lambda: CachedSignal(path, verify=False)):
        _rerun_fix(fails(call, "manifest.json", *words))


@pytest.mark.parametrize("case", ["num_shards removed", "a shard record without sha256", "spec is a string"])
def test_rerunning_the_cache_rewrites_a_damaged_manifest(built, cache_copy, tiny_teacher, tiny_tokenizer, case):
    # The fix the message names works: the shards are intact, so only the manifest is rewritten.
    ref, _ = built
    path, exs = cache_copy
    _edit_manifest(path, MANIFEST_DAMAGE[case][0])
    written = []
    write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False, on_shard=written.append)
    assert written == [] and snapshot(path) == snapshot(ref)
    assert CachedSignal(path).manifest == read_manifest(ref)


# ------------------------------------------------------------------ cache.dir is a file


@pytest.mark.parametrize("where", ["the file itself", "under the file"])
def test_writing_to_a_cache_dir_that_is_a_file(tmp_path, built, tiny_teacher, tiny_tokenizer, where):
    _, exs = built
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    path = f if where == "the file itself" else f / "cache"
    words = ("is a file",) if where == "the file itself" else ("lies under", "notes.txt', which is a file")
    fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False),
        "cache.dir",
        *words,
        "not a directory",
        "point cache.dir at a directory",
    )
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("where", ["the file itself", "under the file"])
def test_reading_from_a_cache_dir_that_is_a_file(tmp_path, where):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    path = f if where == "the file itself" else f / "cache"
    for call in (lambda: read_manifest(path), lambda: CachedSignal(path)):
        fails(call, "cache.dir", "not a directory", "point cache.dir at the directory `potstill cache` wrote")
    assert f.read_text() == "mine"


def test_writing_again_repairs_a_corrupt_shard_and_only_that_one(built, cache_copy, tiny_teacher, tiny_tokenizer, pad):
    ref, _ = built
    path, exs = cache_copy
    f = shard(path, 1)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    fails(lambda: CachedSignal(path), "sha256")
    stamps = {j: shard(path, j).stat().st_mtime_ns for j in (0, 2)}
    man = write_cache(tiny_teacher, tiny_tokenizer, exs, path, SPEC, progress=False)
    assert man is not None
    assert shard(path, 1).read_bytes() == shard(ref, 1).read_bytes()
    assert snapshot(path) == snapshot(ref)
    assert {j: shard(path, j).stat().st_mtime_ns for j in (0, 2)} == stamps  # intact shards are kept
    got = CachedSignal(path).signal(batch(exs, pad))
    want = CachedSignal(ref).signal(batch(exs, pad))
    assert torch.equal(got.ids, want.ids) and torch.equal(got.logprobs, want.logprobs)
    assert torch.equal(got.tail_logprob, want.tail_logprob)


# --------------------------------------------------------------------- bad writer input


def test_write_cache_with_no_examples(tmp_path, tiny_teacher, tiny_tokenizer):
    fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, [], tmp_path / "c", SPEC, progress=False),
        "no examples to cache",
        "data section",
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (5, 2), (-1, 2), (0, 0)])
def test_write_cache_with_a_rank_outside_the_world(built, tmp_path, tiny_teacher, tiny_tokenizer, rank, world):
    _, exs = built
    fails(
        lambda: write_cache(
            tiny_teacher, tiny_tokenizer, exs, tmp_path / "c", SPEC, rank=rank, world_size=world, progress=False
        ),
        f"rank {rank} is not in [0, {world})",
        "--rank",
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"k": 0}, ("k=0", "[1, ")),
        ({"k": 10_000}, ("k=10000", "vocabulary")),
        ({"draws": 0, "kind": "sampled"}, ("draws=0",)),
        ({"draws": 256, "kind": "sampled"}, ("draws=256", "one byte")),
        ({"temperature": 0.0}, ("temperature=0.0", "> 0")),
        ({"examples_per_shard": 0}, ("examples_per_shard=0",)),
        ({"dtype": "int4"}, ("int4", "use one of")),
    ],
)
def test_write_cache_with_a_bad_spec(tmp_path, built, tiny_teacher, tiny_tokenizer, change, words):
    _, exs = built
    fails(
        lambda: write_cache(tiny_teacher, tiny_tokenizer, exs, tmp_path / "c", _spec(**change), progress=False), *words
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_nan_teacher_logits_fail_while_caching(tiny_teacher, tiny_tokenizer, tmp_path, kind):
    import copy

    bad = copy.deepcopy(tiny_teacher)
    with torch.no_grad():
        bad.lm_head.weight[3].fill_(float("nan"))  # one vocabulary row: NaN in every position's logits
    spec = CacheSpec(kind=kind, k=4, draws=4)
    with pytest.raises(PotstillError, match="NaN/inf while caching"):
        write_cache(bad, tiny_tokenizer, encode(tiny_tokenizer), tmp_path / "c", spec, progress=False)


def test_weights_fingerprint_sees_any_change_and_tied_weights(tiny_teacher):
    import copy

    a = weights_fingerprint(tiny_teacher)
    assert a == weights_fingerprint(copy.deepcopy(tiny_teacher))
    other = copy.deepcopy(tiny_teacher)
    with torch.no_grad():
        p = next(iter(other.parameters()))
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))  # one ulp
    assert weights_fingerprint(other) != a
