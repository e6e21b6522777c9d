"""The CLI end to end on tiny local models, and the table of bad inputs.

Every bad input must give one line on stderr (``error: ...``) that names the fix, a
non-zero exit, no traceback (unless ``--debug``), and no output directory left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import PAIRS, recipe, write

from potstill.cli import main


def test_distill_end_to_end_then_resume(assets, tmp_path, capsys):
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out))
    assert main(["distill", str(rp)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert set(metrics) == {"teacher", "student_init", "sft", "kd"}
    for m in metrics.values():
        assert set(m) >= {"forward_kl", "top1_agreement", "perplexity", "rouge_l", "params", "tokens_per_s"}
    assert metrics["teacher"]["forward_kl"] == pytest.approx(0.0, abs=1e-6)
    assert (out / "report.md").is_file() and (out / "recipe.resolved.yaml").is_file()
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["runs"][1]["divergence"]["name"] == "forward_kl"
    from transformers import AutoModelForCausalLM

    kd = AutoModelForCausalLM.from_pretrained(out / "runs" / "kd")
    assert kd.config.num_hidden_layers == 1
    assert any(f.suffix == ".safetensors" for f in (out / "runs" / "kd").iterdir())
    assert not any(f.suffix in {".bin", ".pt", ".pkl"} for f in (out / "runs" / "kd").iterdir())
    # Resume: finished runs are reused, not retrained.
    stamp = (out / "runs" / "kd" / "model.safetensors").stat().st_mtime_ns
    assert main(["distill", str(rp)]) == 0
    assert (out / "runs" / "kd" / "model.safetensors").stat().st_mtime_ns == stamp
    # eval reads the finished runs back
    assert main(["eval", str(rp)]) == 0


def _bad_cases(assets, tmp_path):
    root, teacher, nan_teacher, other_student, data = assets
    out = tmp_path / "out"
    empty = write(tmp_path / "empty.jsonl", "")
    header_only = write(tmp_path / "header.csv", "prompt,response\n")
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    txt = write(tmp_path / "data.txt", "hello\n")
    return {
        "missing recipe file": (["distill", str(tmp_path / "nope.yaml")], "does not exist"),
        "invalid yaml": (["distill", str(write(tmp_path / "b.yaml", "train: [1, 2\n"))], "not valid YAML"),
        "yaml not a mapping": (["distill", str(write(tmp_path / "l.yaml", "- 1\n- 2\n"))], "mapping"),
        "unknown top-level key": (
            ["distill", str(write(tmp_path / "u.yaml", {**recipe(assets, out), "tacher": {}}))],
            "'tacher' is not a known option",
        ),
        "unknown nested key": (
            ["distill", str(write(tmp_path / "n.yaml", recipe(assets, out, **{"train.max_stepz": 3})))],
            "'train.max_stepz' is not a known option",
        ),
        "wrong type": (
            ["distill", str(write(tmp_path / "t.yaml", recipe(assets, out, **{"train.max_steps": "ten"})))],
            "train.max_steps",
        ),
        "alpha out of range": (
            ["distill", str(write(tmp_path / "a.yaml", recipe(assets, out, **{"runs.0.alpha": 1.5})))],
            "runs.0.alpha",
        ),
        "unknown divergence": (
            ["distill", str(write(tmp_path / "d.yaml", recipe(assets, out, **{"runs.1.divergence": {"name": "kll"}})))],
            "runs.1.divergence",
        ),
        "divergence parameter out of range": (
            [
                "distill",
                str(
                    write(
                        tmp_path / "j.yaml",
                        recipe(assets, out, **{"runs.1.divergence": {"name": "generalized_jsd", "beta": 2}}),
                    )
                ),
            ],
            "beta",
        ),
        "non-positive temperature": (
            ["distill", str(write(tmp_path / "tt.yaml", recipe(assets, out, **{"runs.1.temperature": 0})))],
            "temperature",
        ),
        "duplicate run names": (
            ["distill", str(write(tmp_path / "dup.yaml", recipe(assets, out, runs=[{"name": "x"}, {"name": "x"}])))],
            "unique",
        ),
        "bad override": (
            ["distill", str(write(tmp_path / "o.yaml", recipe(assets, out))), "train.max_steps"],
            "key=value",
        ),
        "missing data file": (
            [
                "distill",
                str(write(tmp_path / "m.yaml", recipe(assets, out, **{"data.source.path": str(tmp_path / "x.jsonl")}))),
            ],
            "does not exist",
        ),
        "empty data file": (
            ["distill", str(write(tmp_path / "e.yaml", recipe(assets, out, **{"data.source.path": str(empty)})))],
            "empty",
        ),
        "dataset with no rows": (
            ["distill", str(write(tmp_path / "h.yaml", recipe(assets, out, **{"data.source.path": str(header_only)})))],
            "no examples",
        ),
        "unsupported data format": (
            ["distill", str(write(tmp_path / "f.yaml", recipe(assets, out, **{"data.source.path": str(txt)})))],
            "unsupported extension",
        ),
        "missing data column": (
            ["distill", str(write(tmp_path / "c.yaml", recipe(assets, out, **{"data.source.path": str(nocol)})))],
            "column 'prompt' not found",
        ),
        "eval split too large": (
            ["distill", str(write(tmp_path / "s.yaml", recipe(assets, out, **{"data.eval_size": 50})))],
            "eval_size",
        ),
        "missing teacher dir": (
            [
                "distill",
                str(write(tmp_path / "md.yaml", recipe(assets, out, **{"teacher.model": str(tmp_path / "no_model")}))),
            ],
            "teacher",
        ),
        "vocab mismatch": (
            [
                "distill",
                str(
                    write(
                        tmp_path / "v.yaml",
                        recipe(assets, out, student={"kind": "pretrained", "model": str(other_student)}),
                    )
                ),
            ],
            "tokenizers differ",
        ),
        "NaN teacher logits": (
            ["distill", str(write(tmp_path / "nan.yaml", recipe(assets, out, **{"teacher.model": str(nan_teacher)})))],
            "NaN",
        ),
        "bad layer index": (
            [
                "distill",
                str(
                    write(tmp_path / "li.yaml", recipe(assets, out, student={"kind": "from_teacher", "layers": [0, 7]}))
                ),
            ],
            "layer",
        ),
        "no cuda": (["distill", str(write(tmp_path / "cu.yaml", recipe(assets, out, device="cuda:0")))], "cuda"),
        "eval with no finished runs": (
            ["eval", str(write(tmp_path / "ev.yaml", recipe(assets, out)))],
            "no finished runs",
        ),
        # Issue 14: inputs found by trying potstill as a new user would.
        "recipe nested 60,000 lists deep": (
            ["distill", str(write(tmp_path / "deep.yaml", "train: " + "[" * 60_000 + "]" * 60_000 + "\n"))],
            "nested too deeply",
        ),
        "latin-1 recipe": (
            ["distill", str(_write_bytes(tmp_path / "l1.yaml", b"output_dir: caf\xe9\n"))],
            "save it as UTF-8",
        ),
        "5,000-digit integer": (
            ["distill", str(write(tmp_path / "dig.yaml", "train:\n  max_steps: " + "9" * 5000 + "\n"))],
            "cannot read",
        ),
        "override below a plain value": (
            ["distill", str(write(tmp_path / "ov.yaml", recipe(assets, out))), "output_dir.x=1"],
            "not a section; override",
        ),
        "negative seed": (
            ["distill", str(write(tmp_path / "sd.yaml", recipe(assets, out))), "train.seed=-1"],
            "train.seed",
        ),
        "seed past 2**32": (
            ["distill", str(write(tmp_path / "sd2.yaml", recipe(assets, out))), f"train.seed={2**70}"],
            "train.seed",
        ),
        "infinite learning rate": (
            ["distill", str(write(tmp_path / "lr.yaml", recipe(assets, out))), "train.learning_rate=.inf"],
            "train.learning_rate",
        ),
        "infinite weight decay": (
            ["distill", str(write(tmp_path / "wd.yaml", recipe(assets, out))), "train.weight_decay=.inf"],
            "train.weight_decay",
        ),
        "batch size 1e20": (
            ["distill", str(write(tmp_path / "bs.yaml", recipe(assets, out))), "train.batch_size=1e20"],
            "train.batch_size",
        ),
        "ABKD alpha NaN": (
            [
                "distill",
                str(write(tmp_path / "ab.yaml", recipe(assets, out))),
                "runs.1.divergence={name: alpha_beta_divergence, alpha: .nan, beta: 0.1}",
            ],
            "runs.1.divergence",
        ),
        "KD temperature 1e-45": (
            ["distill", str(write(tmp_path / "kt.yaml", recipe(assets, out))), "runs.1.temperature=1e-45"],
            "temperature",
        ),
        "sampling temperature 1e-45": (
            ["distill", str(write(tmp_path / "st.yaml", recipe(assets, out))), "runs.1.on_policy={temperature: 1e-45}"],
            "method.temperature",
        ),
        "GKD JSD at beta 0": (
            [
                "distill",
                str(write(tmp_path / "b0.yaml", recipe(assets, out))),
                "runs.1.divergence={name: generalized_jsd, beta: 0}",
            ],
            "forward_kl",
        ),
        "GKD JSD at beta 1": (
            [
                "distill",
                str(write(tmp_path / "b1.yaml", recipe(assets, out))),
                "runs.1.divergence={name: generalized_jsd, beta: 1}",
            ],
            "reverse_kl",
        ),
        "run named ..": (
            ["distill", str(write(tmp_path / "dd.yaml", recipe(assets, out))), "runs.0.name=.."],
            "runs.0.name",
        ),
        "run named student_init": (
            ["distill", str(write(tmp_path / "si.yaml", recipe(assets, out))), "runs.0.name=student_init"],
            "row of the report",
        ),
        "run named teacher": (
            ["distill", str(write(tmp_path / "te.yaml", recipe(assets, out))), "runs.0.name=teacher"],
            "row of the report",
        ),
        "device mps": (["distill", str(write(tmp_path / "mps.yaml", recipe(assets, out, device="mps")))], "mps"),
        "device meta": (
            ["distill", str(write(tmp_path / "meta.yaml", recipe(assets, out, device="meta")))],
            "cannot train",
        ),
        "LoRA target module that does not exist": (
            [
                "distill",
                str(
                    write(
                        tmp_path / "lo.yaml",
                        recipe(assets, out, **{"train.lora": {"target_modules": ["no_such_proj"]}}),
                    )
                ),
            ],
            "no_such_proj",
        ),
        "feature layer 9 on a 1-layer student": (
            [
                "distill",
                str(
                    write(
                        tmp_path / "fl.yaml",
                        recipe(assets, out, **{"runs.1.method": {"kind": "feature", "layers": [[9, 1]]}}),
                    )
                ),
            ],
            "student layer 9",
        ),
        **_bad_model_and_data_cases(assets, tmp_path, out),
    }


def _bad_model_and_data_cases(assets, tmp_path, out):
    """Item 7's loading half through the CLI (each one also has a unit test in tests/models, tests/data)."""
    import shutil

    _, teacher, *_ = assets
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in PAIRS]
    broken = write(
        tmp_path / "broken.jsonl", "\n".join(lines[:4] + ['{"prompt": "x", "response": '] + lines[4:]) + "\n"
    )
    null = write(
        tmp_path / "null.jsonl", "\n".join(lines[:2] + [json.dumps({"prompt": None, "response": "r"})] + lines[2:])
    )
    chats = write(tmp_path / "chats.jsonl", "\n".join(json.dumps({"chat": ["hi", "hello"]}) for _ in range(10)) + "\n")
    truncated = tmp_path / "truncated_teacher"
    shutil.copytree(teacher, truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(teacher / f, no_tok / f)
    gguf = _write_bytes(tmp_path / "junk.gguf", bytes(range(256)) * 16)

    def teacher_at(name, path):
        return ["distill", str(write(tmp_path / f"{name}.yaml", recipe(assets, out, **{"teacher.model": str(path)})))]

    def data_at(name, path, **source):
        return [
            "distill",
            str(
                write(
                    tmp_path / f"{name}.yaml",
                    recipe(assets, out, **{"data.source": {"kind": "file", "path": str(path), **source}}),
                )
            ),
        ]

    return {
        "JSONL with a broken line": (data_at("bj", broken), "line 5 is not valid JSON"),
        "prompt null": (data_at("pn", null), "field 'prompt' is null"),
        "messages as a list of strings": (data_at("ms", chats, messages_field="chat"), "not a message"),
        "truncated teacher weights": (teacher_at("tw", truncated), "truncated or corrupt"),
        "teacher dir without a tokenizer": (teacher_at("nt", no_tok), "has no tokenizer"),
        "junk gguf teacher": (teacher_at("jg", gguf), "not a readable GGUF model"),
        "fsdp2 with one process": (
            ["distill", str(write(tmp_path / "f1.yaml", recipe(assets, out, **{"train.distributed": "fsdp2"})))],
            "one process with nothing to share with",
        ),
        "ddp with one process": (
            ["distill", str(write(tmp_path / "d1.yaml", recipe(assets, out, **{"train.distributed": "ddp"})))],
            "start it that way, or set train.distributed none",
        ),
        "liger loss backend on cpu": (
            ["distill", str(write(tmp_path / "lg.yaml", recipe(assets, out, **{"train.loss_backend": "liger"})))],
            "loss_backend 'liger'",
        ),
        "unknown distributed engine": (
            ["distill", str(write(tmp_path / "de.yaml", recipe(assets, out, **{"train.distributed": "megatron"})))],
            "train.distributed",
        ),
        "deepspeed config without zero3": (
            ["distill", str(write(tmp_path / "dc.yaml", recipe(assets, out, **{"train.deepspeed_config": "ds.json"})))],
            "train.deepspeed_config is for train.distributed zero3, not none",
        ),
    }


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CASES = [
    "missing recipe file",
    "invalid yaml",
    "yaml not a mapping",
    "unknown top-level key",
    "unknown nested key",
    "wrong type",
    "alpha out of range",
    "unknown divergence",
    "divergence parameter out of range",
    "non-positive temperature",
    "duplicate run names",
    "bad override",
    "missing data file",
    "empty data file",
    "dataset with no rows",
    "unsupported data format",
    "missing data column",
    "eval split too large",
    "missing teacher dir",
    "vocab mismatch",
    "NaN teacher logits",
    "bad layer index",
    "no cuda",
    "eval with no finished runs",
    "recipe nested 60,000 lists deep",
    "latin-1 recipe",
    "5,000-digit integer",
    "override below a plain value",
    "negative seed",
    "seed past 2**32",
    "infinite learning rate",
    "infinite weight decay",
    "batch size 1e20",
    "ABKD alpha NaN",
    "KD temperature 1e-45",
    "sampling temperature 1e-45",
    "GKD JSD at beta 0",
    "GKD JSD at beta 1",
    "run named ..",
    "run named student_init",
    "run named teacher",
    "device mps",
    "device meta",
    "LoRA target module that does not exist",
    "feature layer 9 on a 1-layer student",
    "JSONL with a broken line",
    "prompt null",
    "messages as a list of strings",
    "truncated teacher weights",
    "teacher dir without a tokenizer",
    "junk gguf teacher",
    "fsdp2 with one process",
    "ddp with one process",
    "unknown distributed engine",
    "liger loss backend on cpu",
    "deepspeed config without zero3",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_leaves_nothing(assets, tmp_path, capsys, case):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so device cuda:0 is valid input")
    if case == "device mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here, so device mps is valid input")
    argv, expected = _bad_cases(assets, tmp_path)[case]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected.lower() in err[0].lower(), err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "out").exists(), "bad input must leave no output behind"


def test_debug_shows_traceback_and_subprocess_exit_code(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "potstill", "distill", str(tmp_path / "nope.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    r = subprocess.run(
        [sys.executable, "-m", "potstill", "--debug", "distill", str(tmp_path / "nope.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("verb", ["distill", "eval", "demo"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "usage: potstill" in capsys.readouterr().out


# ------------------------------------------------------------------- teacher-signal cache

CACHE = {"signal": {"kind": "topk", "k": 8}, "examples_per_shard": 3}
KD_ONLY = [{"name": "kd", "alpha": 0.0, "divergence": {"name": "forward_kl"}}]


def test_cache_then_distill_from_the_cache(assets, tmp_path, capsys, monkeypatch):
    from potstill.signals.cache import CachedSignal

    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, cache=CACHE, runs=KD_ONLY, **{"eval.include_untrained": False}))
    assert main(["cache", str(rp)]) == 0
    cache_dir = out / "teacher_cache"
    man = json.loads((cache_dir / "manifest.json").read_text())
    assert man["complete"] and man["spec"]["kind"] == "topk" and man["spec"]["k"] == 8
    assert man["data"]["num_examples"] == len(PAIRS) - 3 and man["num_shards"] == 3  # eval_size 3 held out
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(
        f"cache: {cache_dir}  topk (fp16)  {man['data']['num_examples']} examples, "
        f"{man['data']['num_rows']} tokens, 3 shards, "
    ), line
    assert line.endswith(f"{man['bytes_per_token']:.1f} bytes/token")
    # a second run finds every shard on disk and rewrites nothing
    stamps = {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()}
    assert main(["cache", str(rp)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == line
    assert {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()} == stamps

    calls = []
    real = CachedSignal.signal

    def counting(self, batch):
        calls.append(batch["example_id"].tolist())
        return real(self, batch)

    monkeypatch.setattr(CachedSignal, "signal", counting)
    assert main(["distill", str(rp)]) == 0
    assert len(calls) == 3  # train.max_steps batches, each keyed by example id
    assert all(0 <= i < man["data"]["num_examples"] for ids in calls for i in ids)
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    assert set(metrics) == {"teacher", "kd"}
    assert metrics["kd"]["forward_kl"] > 0 and metrics["kd"]["params"] > 0
    assert (out / "runs" / "kd" / "model.safetensors").is_file()
    assert f"teacher signal from the cache at {cache_dir}: topk (fp16)" in (out / "report.md").read_text()


def _cache_bad_cases(assets, tmp_path):
    out = tmp_path / "out"

    def rec(name, **patch):
        return str(write(tmp_path / f"{name}.yaml", recipe(assets, out, **patch)))

    two_temps = [{"name": "kd1", "alpha": 0.0, "temperature": 1.0}, {"name": "kd2", "alpha": 0.0, "temperature": 2.0}]
    return {
        "cache with no cache section": (["cache", rec("nc")], "no `cache` section"),
        "distill before the cache is written": (["distill", rec("nw", cache=CACHE)], "run `potstill cache` first"),
        "sampled cache with adaptive_kl": (
            [
                "distill",
                rec("ak", cache={"signal": {"kind": "sampled"}}, **{"runs.1.divergence": {"name": "adaptive_kl"}}),
            ],
            "adaptive_kl",
        ),
        "topk cache with two temperatures": (
            ["cache", rec("tt", cache=CACHE, runs=two_temps)],
            "temperatures [1.0, 2.0]",
        ),
        "cache temperature differs from the runs": (
            ["distill", rec("ct", cache={**CACHE, "temperature": 2.0})],
            "cache.temperature=2.0",
        ),
        "unknown cache kind": (["cache", rec("uk", cache={"signal": {"kind": "topq"}})], "cache.signal"),
        "zero draws": (["cache", rec("d0", cache={"signal": {"kind": "sampled", "draws": 0}})], "draws"),
        "256 draws": (["cache", rec("d256", cache={"signal": {"kind": "sampled", "draws": 256}})], "draws"),
        "k larger than the vocabulary": (
            ["cache", rec("bigk", cache={"signal": {"kind": "topk", "k": 100_000}})],
            "k=100000 must be in [1, ",
        ),
        "rank outside the world": (
            ["cache", rec("rk", cache=CACHE), "--rank", "2", "--world-size", "2"],
            "rank 2 is not in [0, 2)",
        ),
        "refresh rule with threshold and fraction": (
            ["cache", rec("rf", cache={**CACHE, "refresh": {"threshold": 0.1, "fraction": 0.5}}), "--refresh"],
            "give threshold or fraction, not both",
        ),
        "append and refresh at once": (
            ["cache", rec("ar", cache=CACHE), "--append", "--refresh"],
            "--append and --refresh are two steps",
        ),
        "refresh before any cache": (
            ["cache", rec("rn", cache=CACHE), "--refresh"],
            "run `potstill cache` first",
        ),
    }


CACHE_CASES = [
    "cache with no cache section",
    "distill before the cache is written",
    "sampled cache with adaptive_kl",
    "topk cache with two temperatures",
    "cache temperature differs from the runs",
    "unknown cache kind",
    "zero draws",
    "256 draws",
    "k larger than the vocabulary",
    "rank outside the world",
]


@pytest.mark.parametrize("case", CACHE_CASES)
def test_bad_cache_input_gives_one_line_and_leaves_nothing(assets, tmp_path, capsys, case):
    argv, expected = _cache_bad_cases(assets, tmp_path)[case]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected.lower() in err[0].lower(), err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "out").exists(), "bad input must leave no output behind"


def test_refresh_after_the_teacher_changed_then_distill_from_the_mixed_cache(assets, tmp_path, capsys):
    """`potstill cache --refresh` with a changed teacher recomputes the top half by drift; distill
    refuses the mixed cache until the recipe allows it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, teacher, *_ = assets
    changed = tmp_path / "changed_teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        for w in model.model.layers[-1].parameters():
            w.mul_(1.5)
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(changed)
    out = tmp_path / "out"
    base = recipe(assets, out, cache=CACHE, runs=KD_ONLY, **{"eval.include_untrained": False})
    assert main(["cache", str(write(tmp_path / "a.yaml", base))]) == 0
    cache = {**CACHE, "refresh": {"fraction": 0.5, "probe_tokens": 4}}
    new = {**base, "teacher": {"model": str(changed)}, "cache": cache}
    rp = write(tmp_path / "b.yaml", new)
    assert main(["distill", str(rp)]) == 2  # the cache holds the old teacher's rows only
    assert "another teacher" in capsys.readouterr().err
    assert main(["cache", str(rp), "--refresh"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    n = len(PAIRS) - 3
    assert lines[-1].startswith(f"refresh 1: {(n + 1) // 2} of {n} probed examples recomputed (mean drift ")
    assert lines[-1].endswith("rows of an earlier teacher kept (train with cache.allow_mixed: true)")
    man = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    assert man["teacher"]["name"] == str(changed) and len({fp for *_, fp in man["sources"]}) == 2
    assert main(["distill", str(rp)]) == 2
    assert "cache.allow_mixed: true" in capsys.readouterr().err
    allowed = write(tmp_path / "c.yaml", {**new, "cache": {**cache, "allow_mixed": True}})
    assert main(["distill", str(allowed)]) == 0
    assert (out / "runs" / "kd" / "model.safetensors").is_file()
    # a later run continues that student (from its directory) on the same refreshed cache
    later = tmp_path / "later"
    cont = {
        **new,
        "output_dir": str(later),
        "student": {"kind": "pretrained", "model": str(out / "runs" / "kd")},
        "cache": {**cache, "allow_mixed": True, "dir": str(out / "teacher_cache")},
        "eval": {**new["eval"], "include_untrained": True},
    }
    assert main(["distill", str(write(tmp_path / "d.yaml", cont))]) == 0
    first = json.loads((out / "metrics.json").read_text())["runs"]["kd"]
    again = json.loads((later / "metrics.json").read_text())["runs"]
    # its starting point is the earlier student itself, and it trained on from there
    assert again["student_init"]["forward_kl"] == pytest.approx(first["forward_kl"], rel=1e-6)
    assert again["kd"]["forward_kl"] != pytest.approx(first["forward_kl"], rel=1e-6)


def test_certify_writes_the_certificate_into_the_manifest_and_the_report(assets, tmp_path, capsys):
    out = tmp_path / "out"
    runs = [*KD_ONLY, {"name": "kd_tv", "alpha": 0.0, "divergence": {"name": "total_variation"}}]
    cache = {**CACHE, "certify": {"probe_examples": 4, "candidates": [4, 64]}}
    rp = write(tmp_path / "r.yaml", recipe(assets, out, cache=cache, runs=runs, **{"eval.include_untrained": False}))
    assert main(["cache", str(rp), "--certify"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    man = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    cert = man["certificate"]
    assert set(cert["divergences"]) == {"forward_kl", "total_variation"} and cert["kind"] == "topk"
    fkl = cert["divergences"]["forward_kl"]
    assert [row["k"] for row in fkl["candidates"]] == [4, 8, 64] and fkl["own"] == 8 and fkl["runs"] == ["kd"]
    # a top-k bucket loss never exceeds the dense forward KL, and more ids never move it further away
    errs = [row["loss_error"] for row in fkl["candidates"]]
    assert all(row["loss_bias"] <= 1e-3 for row in fkl["candidates"]) and errs == sorted(errs, reverse=True)
    assert fkl["own_ok"] == (fkl["candidates"][1]["ok"])
    # judged in the output head's gradient (the probe spans 4 examples), the bias printed beside the errors
    assert fkl["criterion"] == "head" and cert["noise_tolerance"] == 0.25
    assert fkl["own_ok"] == (fkl["candidates"][1]["head_grad_bias"] <= fkl["tolerance"])
    assert lines[-2].startswith("certificate forward_kl (kd): k=8 loss error ") and "head gradient bias" in lines[-2]
    assert lines[-1].startswith("certificate total_variation (kd_tv): k=8 ")
    # certifying did not change the cache: distill reads it, and its report carries the certificate
    assert main(["distill", str(rp)]) == 0
    report = (out / "report.md").read_text()
    assert "certificate forward_kl (kd): k=8" in report and "certificate total_variation (kd_tv)" in report


def test_certificate_lines_name_a_refused_setting_without_its_missing_errors():
    from potstill.runners.cache import certificate_lines

    empty = dict.fromkeys(("loss_error", "grad_error", "head_grad_bias", "noise_ratio", "noise_ratio_total"))
    row = {"draws": 12, "ok": False, "refused": "adaptive_kl needs the teacher's full ranking", **empty}
    cert = {
        "divergences": {
            "adaptive_kl": {
                "candidates": [row],
                "param": "draws",
                "own": 12,
                "own_ok": False,
                "runs": ["kd_akl"],
                "kind": "sampled",
                "criterion": "head",
                "tolerance": 0.05,
                "noise_tolerance": 0.25,
                "recommendation": None,
                "reason": "adaptive_kl cannot be computed from a sampled signal: needs the full ranking",
            }
        }
    }
    (line,) = certificate_lines(cert)
    assert line.startswith("certificate adaptive_kl (kd_akl): draws=12 refused, outside tolerance 0.05; ")
    assert line.endswith("needs the full ranking")


def test_cache_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "usage: potstill cache" in text and "--world-size" in text


def test_kd_trainer_refuses_a_cache_at_another_temperature(tmp_path, tiny_teacher, tiny_student, tiny_tokenizer):
    from potstill.data import encode_example
    from potstill.errors import PotstillError
    from potstill.kd import KDConfig, KDTrainer
    from potstill.signals.cache import CachedSignal, CacheSpec, write_cache

    exs = [encode_example(tiny_tokenizer, [{"role": "user", "content": p}], r, 64) for p, r in PAIRS[:3]]
    write_cache(
        tiny_teacher, tiny_tokenizer, exs, tmp_path / "c", CacheSpec(kind="topk", k=8, temperature=2.0), progress=False
    )
    src = CachedSignal(tmp_path / "c", tokenizer=tiny_tokenizer)
    assert src.temperature == 2.0

    def trainer(t):
        args = KDConfig(output_dir=str(tmp_path / "o"), alpha=0.0, temperature=t, report_to="none", use_cpu=True)
        return KDTrainer(model=tiny_student, args=args, signal_source=src, processing_class=tiny_tokenizer)

    with pytest.raises(PotstillError) as info:
        trainer(1.0)
    msg = str(info.value)
    assert "\n" not in msg and "temperature 2.0 but temperature=1.0" in msg and "rebuild the cache" in msg
    assert trainer(2.0).signal_source is src


def test_distill_refuses_a_cache_that_does_not_match_the_recipe(assets, tmp_path, capsys):
    """Another signal asked for, or other training data, fails before anything is written."""
    out = tmp_path / "out"
    cache = {**CACHE, "dir": str(tmp_path / "cache")}
    rp = write(tmp_path / "r.yaml", recipe(assets, out, cache=cache, runs=[{"name": "kd", "alpha": 0.0}]))
    assert main(["cache", str(rp)]) == 0
    capsys.readouterr()
    for overrides, expected in (
        (["cache.signal.k=4"], "cache section differs"),
        (["cache.dtype=fp32"], "(dtype)"),
        (["data.max_length=36"], "training examples differ"),
    ):
        assert main(["distill", str(rp), *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "potstill cache" in err[0], err
        assert not out.exists()
    # The tail rule is a reading choice: renormalize reads the same bucket-written cache.
    assert main(["distill", str(rp), "cache.signal.tail=renormalize"]) == 0
    assert "topk (fp16)" in (out / "report.md").read_text()


def test_union_tags_do_not_leak_into_recipe_keys(assets, tmp_path, capsys):
    rp = write(tmp_path / "r.yaml", recipe(assets, tmp_path / "out", cache={"signal": {"kind": "sampled", "draws": 0}}))
    assert main(["cache", str(rp)]) == 2
    err = capsys.readouterr().err
    assert "recipe key 'cache.signal.draws'" in err and "sampled.draws" not in err


def test_cache_takes_rank_and_world_size_from_the_launcher_environment(assets, tmp_path, capsys, monkeypatch):
    """`accelerate launch` / torchrun set RANK and WORLD_SIZE; each process writes its shards."""
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, cache=CACHE))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["cache", str(rp)]) == 0
    assert "rank 1 of 2" in capsys.readouterr().out
    cache_dir = out / "teacher_cache"
    assert sorted(f.name for f in cache_dir.glob("shard-*.safetensors")) == ["shard-00001.safetensors"]
    monkeypatch.setenv("RANK", "0")
    assert main(["cache", str(rp)]) == 0  # the last rank to finish writes the manifest
    assert (cache_dir / "manifest.json").is_file() and "3 shards" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "one")
    assert main(["cache", str(rp)]) == 2
    assert "$RANK='one' is not an integer" in capsys.readouterr().err


def test_examples_whose_prompt_fills_max_length_are_dropped_and_counted(tiny_tokenizer, caplog):
    from potstill.errors import PotstillError
    from potstill.runners.prepare import encode_pairs

    pairs = [
        {"messages": [{"role": "user", "content": "hi"}], "response": "ok"},
        {"messages": [{"role": "user", "content": "word " * 80}], "response": "ok"},
        {"messages": [{"role": "user", "content": "yo"}], "response": "fine"},
    ]
    with caplog.at_level("WARNING", logger="potstill"):
        out = encode_pairs(pairs, tiny_tokenizer, 40)
    assert [e["reference"] for e in out] == ["ok", "fine"] and [e["example_id"] for e in out] == [0, 1]
    assert "dropped 1 of 3" in caplog.text
    with pytest.raises(PotstillError, match="every prompt"):
        encode_pairs(pairs[1:2], tiny_tokenizer, 40)


# ------------------------------------------------------- trust: output dirs, finished students, leftovers


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "; " in err[0], err
    return err[0]


def test_output_dir_that_cannot_be_written_is_refused_and_left_as_it_was(assets, tmp_path, capsys):
    a_file = write(tmp_path / "a_file", "keep me\n")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    if os.geteuid() == 0:  # root ignores permission bits: a directory no one may create files in
        read_only = Path("/sys/potstill-test-out")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        read_only = ro / "out"
    for out, expected in (
        (a_file, "is a file"),
        (dangling, "symbolic link to nothing"),
        (a_file / "out", "lies under the file"),
        (read_only, "cannot be written"),
    ):
        rp = write(tmp_path / "r.yaml", recipe(assets, out))
        assert main(["distill", str(rp)]) == 2
        assert expected in _one_error_line(capsys)
    assert a_file.read_text() == "keep me\n" and dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    assert not read_only.exists()


def test_run_dirs_that_are_not_potstills_are_refused_never_deleted(assets, tmp_path, capsys):
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("mine")
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "sft").symlink_to(elsewhere, target_is_directory=True)
    rp = write(tmp_path / "r.yaml", recipe(assets, out))
    assert main(["distill", str(rp)]) == 2
    assert "symbolic link" in _one_error_line(capsys)
    (out / "runs" / "sft").unlink()
    half = out / "runs" / "sft"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert main(["distill", str(rp)]) == 2
    assert "not a finished potstill student" in _one_error_line(capsys)
    assert (elsewhere / "precious.txt").read_text() == "mine" and (half / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["runs"]  # nothing written beside what the user had


def test_finished_students_are_reused_only_when_they_verify(assets, tmp_path, capsys):
    out = tmp_path / "out"
    rp = write(
        tmp_path / "r.yaml",
        recipe(assets, out, runs=[{"name": "kd", "alpha": 0.0}], **{"eval.include_untrained": False}),
    )
    assert main(["distill", str(rp)]) == 0
    kd = out / "runs" / "kd"
    marker = json.loads((kd / "POTSTILL_DONE").read_text())
    assert set(marker["files"]) >= {"model.safetensors", "config.json", "train_info.json"}
    assert marker["recipe"]["train"]["max_steps"] == 3 and marker["recipe"]["run"]["name"] == "kd"
    capsys.readouterr()
    # another recipe: named, not reused and not retrained
    assert main(["distill", str(rp), "train.max_steps=4"]) == 2
    assert "trained by another recipe (train.max_steps differs)" in _one_error_line(capsys)
    # eval-only keys do not decide the student: reused
    stamp = (kd / "model.safetensors").stat().st_mtime_ns
    assert main(["distill", str(rp), "eval.max_new_tokens=3"]) == 0
    assert (kd / "model.safetensors").stat().st_mtime_ns == stamp
    capsys.readouterr()
    # one flipped byte in the weights: loadable, but it does not verify
    weights = kd / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    for verb in ("distill", "eval"):
        assert main([verb, str(rp)]) == 2
        assert "'model.safetensors' changed since it was written" in _one_error_line(capsys)
    assert weights.read_bytes() == bytes(data), "a student that does not verify is never retrained silently"
    # a missing file, and a marker without checksums (an older potstill)
    weights.unlink()
    assert main(["distill", str(rp)]) == 2
    assert "missing its file 'model.safetensors'" in _one_error_line(capsys)
    (kd / "POTSTILL_DONE").write_text("ok\n")
    assert main(["distill", str(rp)]) == 2
    assert "has no checksums" in _one_error_line(capsys)


def test_eval_refuses_a_student_that_would_replace_a_row_or_does_not_load(assets, tmp_path, capsys):
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out))
    _, teacher, *_ = assets
    same_name = tmp_path / "elsewhere" / "sft"
    import shutil

    shutil.copytree(teacher, same_name)
    assert main(["eval", str(rp), "--student", str(same_name)]) == 2
    assert "already a row" in _one_error_line(capsys)
    truncated = tmp_path / "truncated"
    shutil.copytree(teacher, truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert main(["eval", str(rp), "--student", str(truncated)]) == 2
    assert "does not load" in _one_error_line(capsys)
    assert not out.exists()


def test_a_failure_after_writing_began_removes_what_this_run_created(assets, tmp_path, capsys, monkeypatch):
    """Late bad input (here a trainer that fails at its first step) leaves no half output directory."""
    from potstill.errors import PotstillError
    from potstill.kd import KDTrainer

    def fail(self, *a, **k):
        raise PotstillError("training diverged at step 1; lower train.learning_rate")

    monkeypatch.setattr(KDTrainer, "train", fail)
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out))
    assert main(["distill", str(rp)]) == 2
    assert "diverged at step 1" in _one_error_line(capsys)
    assert not out.exists()
    # A directory the user had is kept, with what was in it.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["distill", str(rp)]) == 2
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sigkilled_distill_leaves_no_temporary_behind_and_resumes(assets, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    scratch_tmp = tmp_path / "tmpdir"
    scratch_tmp.mkdir()
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **{"train.max_steps": 40}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch_tmp)}
    cmd = [sys.executable, "-m", "potstill", "distill", str(rp)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "recipe.resolved.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # inside the first run's training
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not [p.name for p in scratch_tmp.iterdir() if "potstill" in p.name]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    left = [p.name for p in (out / "runs").iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]
    assert not left, left
    assert all((out / "runs" / n / "POTSTILL_DONE").is_file() for n in ("sft", "kd"))


@pytest.mark.parametrize(
    "kind, patch, expected",
    [
        ("none", {}, "train.distributed is none, so every process would train its own copy"),
        (
            "zero3",
            {"runs.1.method": {"kind": "minillm"}, "runs.1.divergence": {"name": "reverse_kl"}},
            "run kd: method minillm is not supported under train.distributed zero3",
        ),
        (
            "zero3",
            {"train.deepspeed_config": "{tmp}/stage2.json"},
            "zero_optimization.stage is 2, but train.distributed zero3 needs stage 3",
        ),
        ("zero3", {"train.deepspeed_config": "{tmp}/missing.json"}, "cannot read it as a DeepSpeed JSON config"),
        ("zero3", {"deepspeed": None}, "DeepSpeed, which is not installed; pip install 'potstill[deepspeed]'"),
    ],
)
def test_bad_distributed_input_under_a_launcher(assets, tmp_path, capsys, monkeypatch, kind, patch, expected):
    """What a process of `accelerate launch` sees ($WORLD_SIZE 2) is refused before any model loads or any
    process group is made (so no process waits for the others)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    patch = dict(patch)
    if "deepspeed" in patch:  # DeepSpeed not installed: its import fails
        monkeypatch.setitem(sys.modules, "deepspeed", patch.pop("deepspeed"))
    (tmp_path / "stage2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    patch = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in patch.items()}
    out = tmp_path / "out"
    rp = write(tmp_path / "r.yaml", recipe(assets, out, **{"train.distributed": kind, **patch}))
    assert main(["distill", str(rp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() and not dist.is_initialized()


def test_eval_under_a_launcher_is_refused(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rp = write(tmp_path / "r.yaml", recipe(assets, tmp_path / "out"))
    assert main(["eval", str(rp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "potstill eval runs in one process" in err[0], err


def test_fsdp2_refuses_a_model_without_decoder_layer_classes():
    from potstill.distributed import layer_classes, shard_frozen
    from potstill.errors import PotstillError

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert layer_classes(plain) == []
    with pytest.raises(PotstillError, match="declares no decoder-layer classes"):
        shard_frozen(plain)
