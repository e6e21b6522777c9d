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

from potstill.cli import main

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Two plus two is four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Count from one to five:", "one, two, three, four, five"),
    ("Translate hello into Spanish:", "hola"),
    ("Please answer in one short sentence.", "Sure, here is a short answer."),
    ("What do the children do?", "They play in the park."),
    ("Name a fruit.", "I like apples."),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, _tiny_teacher_session, _tiny_tokenizer_session):
    root = tmp_path_factory.mktemp("cli")
    tok = _tiny_tokenizer_session
    teacher = root / "teacher"
    _tiny_teacher_session.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    # A teacher whose weights are NaN.
    import copy

    nan_model = copy.deepcopy(_tiny_teacher_session)
    with torch.no_grad():
        nan_model.lm_head.weight.fill_(float("nan"))
    nan_teacher = root / "nan_teacher"
    nan_model.save_pretrained(nan_teacher)
    tok.save_pretrained(nan_teacher)
    # A student with another tokenizer (a different vocabulary).
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(60)]
    other = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>", eos_token="<|im_end|>")
    other_student = root / "other_student"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other_student)
    other_tok.save_pretrained(other_student)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    return root, teacher, nan_teacher, other_student, data


def recipe(assets, out: Path, **patch) -> dict:
    root, teacher, _, _, data = assets
    r = {
        "output_dir": str(out),
        "teacher": {"model": str(teacher)},
        "student": {"kind": "scaled", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                    "num_key_value_heads": 1},
        "data": {"source": {"kind": "file", "path": str(data)}, "eval_size": 3, "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3},
        "runs": [{"name": "sft", "alpha": 1.0}, {"name": "kd", "alpha": 0.0, "divergence": {"name": "forward_kl"}}],
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "device": "cpu",
    }
    for key, value in patch.items():
        node = r
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[parts[-1]] = value
    return r


def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


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
        "unknown top-level key": (["distill", str(write(tmp_path / "u.yaml", {**recipe(assets, out), "tacher": {}}))],
                                  "'tacher' is not a known option"),
        "unknown nested key": (["distill", str(write(tmp_path / "n.yaml", recipe(assets, out, **{"train.max_stepz": 3})))],
                               "'train.max_stepz' is not a known option"),
        "wrong type": (["distill", str(write(tmp_path / "t.yaml", recipe(assets, out, **{"train.max_steps": "ten"})))],
                       "train.max_steps"),
        "alpha out of range": (["distill", str(write(tmp_path / "a.yaml", recipe(assets, out, **{"runs.0.alpha": 1.5})))],
                               "runs.0.alpha"),
        "unknown divergence": (["distill", str(write(tmp_path / "d.yaml",
                                                     recipe(assets, out, **{"runs.1.divergence": {"name": "kll"}})))],
                               "runs.1.divergence"),
        "divergence parameter out of range": (
            ["distill", str(write(tmp_path / "j.yaml",
                                  recipe(assets, out, **{"runs.1.divergence": {"name": "generalized_jsd", "beta": 2}})))],
            "beta"),
        "non-positive temperature": (["distill", str(write(tmp_path / "tt.yaml",
                                                           recipe(assets, out, **{"runs.1.temperature": 0})))],
                                     "temperature"),
        "duplicate run names": (["distill", str(write(tmp_path / "dup.yaml",
                                                      recipe(assets, out, runs=[{"name": "x"}, {"name": "x"}])))],
                                "unique"),
        "bad override": (["distill", str(write(tmp_path / "o.yaml", recipe(assets, out))), "train.max_steps"],
                         "key=value"),
        "missing data file": (["distill", str(write(tmp_path / "m.yaml",
                                                    recipe(assets, out, **{"data.source.path": str(tmp_path / "x.jsonl")})))],
                              "does not exist"),
        "empty data file": (["distill", str(write(tmp_path / "e.yaml", recipe(assets, out, **{"data.source.path": str(empty)})))],
                            "empty"),
        "dataset with no rows": (["distill", str(write(tmp_path / "h.yaml",
                                                       recipe(assets, out, **{"data.source.path": str(header_only)})))],
                                 "no examples"),
        "unsupported data format": (["distill", str(write(tmp_path / "f.yaml",
                                                          recipe(assets, out, **{"data.source.path": str(txt)})))],
                                    "unsupported extension"),
        "missing data column": (["distill", str(write(tmp_path / "c.yaml",
                                                      recipe(assets, out, **{"data.source.path": str(nocol)})))],
                                "column 'prompt' not found"),
        "eval split too large": (["distill", str(write(tmp_path / "s.yaml", recipe(assets, out, **{"data.eval_size": 50})))],
                                 "eval_size"),
        "missing teacher dir": (["distill", str(write(tmp_path / "md.yaml",
                                                      recipe(assets, out, **{"teacher.model": str(tmp_path / "no_model")})))],
                                "teacher"),
        "vocab mismatch": (["distill", str(write(tmp_path / "v.yaml",
                                                 recipe(assets, out, student={"kind": "pretrained",
                                                                              "model": str(other_student)})))],
                           "tokenizers differ"),
        "NaN teacher logits": (["distill", str(write(tmp_path / "nan.yaml",
                                                     recipe(assets, out, **{"teacher.model": str(nan_teacher)})))],
                               "NaN"),
        "bad layer index": (["distill", str(write(tmp_path / "li.yaml",
                                                  recipe(assets, out, student={"kind": "from_teacher", "layers": [0, 7]})))],
                            "layer"),
        "no cuda": (["distill", str(write(tmp_path / "cu.yaml", recipe(assets, out, device="cuda:0")))], "cuda"),
        "eval with no finished runs": (["eval", str(write(tmp_path / "ev.yaml", recipe(assets, out)))], "no finished runs"),
    }


CASES = [
    "missing recipe file", "invalid yaml", "yaml not a mapping", "unknown top-level key", "unknown nested key",
    "wrong type", "alpha out of range", "unknown divergence", "divergence parameter out of range",
    "non-positive temperature", "duplicate run names", "bad override", "missing data file", "empty data file",
    "dataset with no rows", "unsupported data format", "missing data column", "eval split too large",
    "missing teacher dir", "vocab mismatch", "NaN teacher logits", "bad layer index", "no cuda",
    "eval with no finished runs",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_leaves_nothing(assets, tmp_path, capsys, case):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so device cuda:0 is valid input")
    argv, expected = _bad_cases(assets, tmp_path)[case]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected.lower() in err[0].lower(), err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "out").exists(), "bad input must leave no output behind"


def test_debug_shows_traceback_and_subprocess_exit_code(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "potstill", "distill", str(tmp_path / "nope.yaml")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    r = subprocess.run([sys.executable, "-m", "potstill", "--debug", "distill", str(tmp_path / "nope.yaml")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("verb", ["distill", "eval", "demo"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and "usage: potstill" in capsys.readouterr().out
