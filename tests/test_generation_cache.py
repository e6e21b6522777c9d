"""Cached, resumable generation (potstill.generation_cache) and the backend dispatch."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

import potstill.generate as gen_mod
from potstill.errors import PotstillError
from potstill.generate import Generations, generate
from potstill.generation_cache import (
    GenerationParams,
    backend_generate,
    generate_cached,
    generate_vllm,
    prompts_sha,
)

N_PROMPTS = 10
GREEDY = GenerationParams(max_new_tokens=6)
SAMPLED = GenerationParams(max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.95, seed=7)


@pytest.fixture
def prompts(tiny_tokenizer):
    rng = random.Random(1234)
    specials = set(tiny_tokenizer.all_special_ids)
    pool = [i for i in range(len(tiny_tokenizer)) if i not in specials]
    return [[rng.choice(pool) for _ in range(rng.randint(2, 9))] for _ in range(N_PROMPTS)]


@pytest.fixture
def count_generate(monkeypatch):
    """Wrap the engine and record the prompts of each call (one call per generated chunk)."""
    calls: list[list[list[int]]] = []

    def counting(model, tokenizer, prompts, **kw):
        calls.append([list(p) for p in prompts])
        return generate(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(gen_mod, "generate", counting)
    return calls


def _chunks(path: Path) -> list[Path]:
    return sorted(path.glob("chunk-*.json"))


def _without_seconds(path: Path) -> dict:
    rec = json.loads(path.read_text())
    assert isinstance(rec["seconds"], float) and rec["seconds"] >= 0
    del rec["seconds"]
    return rec


def _run(teacher, tok, prompts, path, params, **kw):
    kw.setdefault("progress", False)
    return generate_cached(teacher, tok, prompts, path, params, model_id="tiny-teacher", **kw)


# ----------------------------------------------------------------------- (a) equals generate


@pytest.mark.parametrize("chunk_size", [64, 4])
def test_cached_equals_direct_generate_greedy(tiny_teacher, tiny_tokenizer, prompts, tmp_path, chunk_size):
    direct = generate(tiny_teacher, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=4, progress=False)
    got = _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "g", GREEDY, chunk_size=chunk_size, batch_size=4)
    assert isinstance(got, Generations)
    assert got.token_ids == direct.token_ids
    assert got.num_tokens == direct.num_tokens
    assert any(got.token_ids), "the model generated nothing; the comparison would be vacuous"

    files = _chunks(tmp_path / "g")
    assert [f.name for f in files] == [f"chunk-{j:05d}.json" for j in range(-(-N_PROMPTS // chunk_size))]
    meta = json.loads((tmp_path / "g" / "meta.json").read_text())
    assert meta["model_id"] == "tiny-teacher"
    assert meta["num_prompts"] == N_PROMPTS and meta["chunk_size"] == chunk_size
    assert meta["params"] == {"max_new_tokens": 6, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    for j, f in enumerate(files):
        rec = json.loads(f.read_text())
        assert rec["key"] == meta["key"] and rec["chunk"] == j
        assert rec["prompts_sha"] == prompts_sha(prompts[j * chunk_size : (j + 1) * chunk_size])
        assert rec["token_ids"] == direct.token_ids[j * chunk_size : (j + 1) * chunk_size]
    assert sum(json.loads(f.read_text())["num_tokens"] for f in files) == got.num_tokens


# ----------------------------------------------------------------------- (b) second call reads disk


def test_second_call_reads_from_disk(tiny_teacher, tiny_tokenizer, prompts, tmp_path, count_generate):
    first = _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path, GREEDY, chunk_size=4)
    assert count_generate == [prompts[0:4], prompts[4:8], prompts[8:10]]
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    seen: list[int] = []
    second = _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path, GREEDY, chunk_size=4, on_chunk=seen.append)
    assert count_generate == [prompts[0:4], prompts[4:8], prompts[8:10]], "a fully cached call must not generate"
    assert seen == [0, 1, 2]
    assert second.token_ids == first.token_ids
    assert second.num_tokens == first.num_tokens
    assert first.seconds > 0
    assert first.seconds == pytest.approx(sum(json.loads(f.read_text())["seconds"] for f in _chunks(tmp_path)))
    assert second.seconds == first.seconds  # the original timing, read from the chunk files
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


# ----------------------------------------------------------------------- (c) kill and resume


def test_resume_after_kill_matches_uninterrupted_sampling(
    tiny_teacher, tiny_tokenizer, prompts, tmp_path, count_generate
):
    full = _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "full", SAMPLED, chunk_size=3)
    assert [len(c) for c in count_generate] == [3, 3, 3, 1]

    def die_after_1(j):
        if j == 1:
            raise KeyboardInterrupt("killed")

    count_generate.clear()
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_teacher, tiny_tokenizer, prompts, part, SAMPLED, chunk_size=3, on_chunk=die_after_1)
    assert [f.name for f in _chunks(part)] == ["chunk-00000.json", "chunk-00001.json"]
    kept = {f.name: f.read_bytes() for f in _chunks(part)}
    from potstill.io import temporary_prefix

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # A killed atomic write, and one of a writer that still runs (this process): only the first is removed.
    (part / f"{temporary_prefix('chunk-00002.json', gone.pid)}abc123.tmp").write_text('{"key": "half a fi')
    live = part / f"{temporary_prefix('chunk-00003.json')}abc123.tmp"
    live.write_text('{"key": "being writ')

    count_generate.clear()
    resumed = _run(tiny_teacher, tiny_tokenizer, prompts, part, SAMPLED, chunk_size=3)
    assert count_generate == [prompts[6:9], prompts[9:]], "only the missing chunks are generated"
    assert list(part.glob("*.tmp")) == [live]
    assert {f.name: f.read_bytes() for f in _chunks(part)[:2]} == kept
    assert resumed.token_ids == full.token_ids
    assert resumed.num_tokens == full.num_tokens
    # Chunks equal an uninterrupted run's byte for byte, except the wall-clock timing.
    assert (part / "meta.json").read_bytes() == (tmp_path / "full" / "meta.json").read_bytes()
    for a, b in zip(_chunks(part), _chunks(tmp_path / "full"), strict=True):
        assert _without_seconds(a) == _without_seconds(b)

    # The sampling is real: another seed gives other tokens.
    other = _run(
        tiny_teacher, tiny_tokenizer, prompts, tmp_path / "seed8", dataclasses.replace(SAMPLED, seed=8), chunk_size=3
    )
    assert other.token_ids != full.token_ids


def test_sampling_is_seeded_per_chunk(tiny_teacher, tiny_tokenizer, prompts, tmp_path):
    """Chunk j depends on seed + j only, not on the global RNG or on earlier chunks."""
    import torch

    a = _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "a", SAMPLED, chunk_size=3)
    torch.manual_seed(999)
    tail = _run(
        tiny_teacher,
        tiny_tokenizer,
        prompts[6:9],
        tmp_path / "b",
        dataclasses.replace(SAMPLED, seed=SAMPLED.seed + 2),
        chunk_size=3,
    )
    assert tail.token_ids == a.token_ids[6:9]


# ----------------------------------------------------------------------- (d) corrupt chunks


DAMAGES = ["truncate", "empty", "wrong_key", "wrong_prompts", "wrong_rows", "not_dict"]


def test_damaged_chunks_are_regenerated(tiny_teacher, tiny_tokenizer, prompts, tmp_path, count_generate):
    """Chunk j (chunk_size 1) gets damage j; each damaged chunk, and only those, is regenerated."""
    first = _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path, GREEDY, chunk_size=1)
    good = {}
    for j, damage in enumerate(DAMAGES):
        f = tmp_path / f"chunk-{j:05d}.json"
        good[j] = f.read_bytes()
        rec = json.loads(good[j])
        if damage == "truncate":
            f.write_bytes(good[j][: len(good[j]) // 2])
        elif damage == "empty":
            f.write_bytes(b"")
        elif damage == "wrong_key":
            f.write_text(json.dumps({**rec, "key": "0" * 64}))
        elif damage == "wrong_prompts":
            f.write_text(json.dumps({**rec, "prompts_sha": prompts_sha([[1, 2, 3]])}))
        elif damage == "wrong_rows":
            f.write_text(json.dumps({**rec, "token_ids": rec["token_ids"] + [[1]]}))
        else:
            f.write_text("[1, 2, 3]")
    count_generate.clear()
    again = _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path, GREEDY, chunk_size=1)
    assert count_generate == [[p] for p in prompts[: len(DAMAGES)]], "exactly the damaged chunks are regenerated"
    assert again.token_ids == first.token_ids
    assert again.num_tokens == first.num_tokens
    for j, data in good.items():
        assert _without_seconds(tmp_path / f"chunk-{j:05d}.json") == _without_seconds_bytes(data)


def _without_seconds_bytes(data: bytes) -> dict:
    rec = json.loads(data)
    del rec["seconds"]
    return rec


# ----------------------------------------------------------------------- (e) another run, same dir


def test_another_run_in_same_directory_is_refused(tiny_llama_pair, prompts, tmp_path, count_generate):
    teacher, student, tok = tiny_llama_pair
    _run(teacher, tok, prompts, tmp_path, GREEDY, chunk_size=4)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    count_generate.clear()
    cases = [  # (model, prompts, params, chunk_size): one thing changed each time
        (teacher, prompts, GenerationParams(max_new_tokens=7), 4),
        (teacher, prompts, SAMPLED, 4),
        (student, prompts, GREEDY, 4),
        (teacher, prompts[:-1], GREEDY, 4),
        (teacher, prompts, GREEDY, 5),
    ]
    for model, ps, params, chunk_size in cases:
        with pytest.raises(PotstillError, match="holds generations of another model/.*use another path or delete it"):
            _run(model, tok, ps, tmp_path, params, chunk_size=chunk_size)
    assert count_generate == []
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before

    # A changed weight is another model too.
    import torch

    with torch.no_grad():
        next(teacher.parameters()).view(-1)[0] += 1.0
    with pytest.raises(PotstillError, match="another model"):
        _run(teacher, tok, prompts, tmp_path, GREEDY, chunk_size=4)


def test_corrupt_meta_and_file_path(tiny_teacher, tiny_tokenizer, prompts, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(PotstillError, match="corrupt.*delete"):
        _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "d", GREEDY)
    (tmp_path / "f").write_text("x")
    with pytest.raises(PotstillError, match="is a file"):
        _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "f", GREEDY)


# ----------------------------------------------------------------------- (f) validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature=0.0 must be"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"do_sample": "yes"}, "do_sample"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(PotstillError, match=match):
        GenerationParams(**kwargs)


def test_params_defaults_and_frozen():
    p = GenerationParams()
    assert (p.max_new_tokens, p.do_sample, p.temperature, p.top_p, p.seed) == (64, False, 1.0, 1.0, 0)
    GenerationParams(top_p=1.0, temperature=0.01)  # boundaries are valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 3  # type: ignore[misc]
    assert "distillation temperature" in GenerationParams.__doc__


def test_bad_inputs(tiny_teacher, tiny_tokenizer, prompts, tmp_path):
    with pytest.raises(PotstillError, match="no prompts"):
        _run(tiny_teacher, tiny_tokenizer, [], tmp_path / "a", GREEDY)
    with pytest.raises(PotstillError, match="prompt 1 is empty"):
        _run(tiny_teacher, tiny_tokenizer, [[5, 6], []], tmp_path / "b", GREEDY)
    with pytest.raises(PotstillError, match="chunk_size=0"):
        _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "c", GREEDY, chunk_size=0)
    with pytest.raises(PotstillError, match="batch_size=0"):
        _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "d", GREEDY, batch_size=0)
    with pytest.raises(PotstillError, match="GenerationParams"):
        _run(tiny_teacher, tiny_tokenizer, prompts, tmp_path / "e", {"max_new_tokens": 3})
    assert not any((tmp_path / n).exists() for n in "abcde")


# ----------------------------------------------------------------------- (g) vllm guard and dispatch


VLLM_MSG = r"the vllm backend needs the vllm package; pip install 'potstill\[vllm\]' \(CUDA only\) or use backend 'hf'"


def test_vllm_guard(monkeypatch, prompts):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(PotstillError, match=VLLM_MSG):
        generate_vllm("some/model", prompts, GREEDY)
    with pytest.raises(PotstillError, match=VLLM_MSG):
        backend_generate("vllm", "some/model", None, prompts, GREEDY)


def test_backend_dispatch(tiny_teacher, tiny_tokenizer, prompts):
    with pytest.raises(PotstillError, match="backend 'tgi' is unknown; use one of hf, vllm"):
        backend_generate("tgi", tiny_teacher, tiny_tokenizer, prompts, GREEDY)
    with pytest.raises(PotstillError, match="hf backend takes a loaded model"):
        backend_generate("hf", "some/model", tiny_tokenizer, prompts, GREEDY)
    direct = generate(tiny_teacher, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3, progress=False)
    got = backend_generate("hf", tiny_teacher, tiny_tokenizer, prompts, GREEDY, batch_size=3, progress=False)
    assert got.token_ids == direct.token_ids and got.num_tokens == direct.num_tokens


def _fake_vllm(calls: dict) -> types.ModuleType:
    """A stand-in ``vllm`` module: echoes scripted outputs and records what it was given."""
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            calls["sampling"] = kw

    class Tok:
        eos_token_id = 3

    class LLM:
        def __init__(self, **kw):
            calls["llm"] = kw

        def get_tokenizer(self):
            return Tok()

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            calls["prompts"] = prompts
            scripted = [
                ([10, 11, 3], "stop", None),  # EOS: cut, counted
                ([12, 13, 14], "length", None),  # ran out of tokens
                ([15, 9, 16], "stop", 9),  # a stop token id vLLM reports
            ]
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=t, finish_reason=f, stop_reason=s)])
                for t, f, s in scripted[: len(prompts)]
            ]

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_backend_with_fake_module(monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(calls))
    prompts = [[5, 6], [7], [8, 8, 8]]
    out = backend_generate("vllm", "org/model", None, prompts, GREEDY, progress=False, dtype="float16")
    assert calls["llm"] == {"model": "org/model", "dtype": "float16"}
    assert calls["sampling"] == {"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    assert calls["prompts"] == [{"prompt_token_ids": p} for p in prompts]
    assert out.token_ids == [[10, 11], [12, 13, 14], [15]]
    assert out.num_tokens == 3 + 3 + 2
    assert out.seconds >= 0

    generate_vllm("org/model", prompts, SAMPLED, progress=False)
    assert calls["sampling"] == {"max_tokens": 6, "temperature": 1.3, "top_p": 0.95, "seed": 7}
