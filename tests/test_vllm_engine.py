"""The vLLM backend (potstill.vllm_engine) against fakes: no vllm, no GPU.

A fake ``vllm`` module (``LLM`` + ``SamplingParams``) stands in for the colocated engine and a
threaded ``http.server`` for a vLLM server; both record what they were sent. Checked: the
request/response mapping (token-id prompts in, outputs back in input order, EOS cut, stops,
num_tokens, sampling parameters), the synced weights of a plain and a LoRA-wrapped tiny Llama
(names, shapes, merged values), the wiring into generate_cached / demo / synthesize, and the
one-line errors.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import potstill.vllm_engine as ve
from potstill.errors import PotstillError
from potstill.generation_cache import GenerationParams, backend_generate, generate_cached
from potstill.recipes.distill import GenerationOptions, VLLMOptions
from potstill.vllm_engine import VLLMEngine, named_weights, require_vllm, save_for_vllm

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 3


def _scripted(prompt: list[int]) -> tuple[list[int], str, int | None]:
    """What the fake engines answer: depends on the prompt, so a mix-up of the order shows."""
    head = prompt[0]
    if head % 3 == 0:
        return [head + 100, EOS, head + 101], "stop", None  # EOS mid-way (vLLM keeps it): cut, counted
    if head % 3 == 1:
        return [head + 100, head + 101, head + 102], "length", None  # ran to the cap
    return [head + 100, 9], "stop", 9  # a stop token id vLLM reports


def _fake_vllm(log: dict, *, reorder: bool = False) -> types.ModuleType:
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            log.setdefault("sampling", []).append(kw)

    class LLM:
        def __init__(self, **kw):
            log["llm"] = kw
            self.loaded: list[tuple[str, torch.Tensor]] = []
            self.resets = 0
            model = types.SimpleNamespace(load_weights=lambda pairs: self.loaded.extend(pairs))
            self.llm_engine = types.SimpleNamespace(
                model_executor=types.SimpleNamespace(
                    driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
                )
            )

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            log.setdefault("prompts", []).append(prompts)
            out = []
            for p in prompts:
                toks, finish, stop = _scripted(p["prompt_token_ids"])
                out.append(
                    types.SimpleNamespace(
                        prompt_token_ids=p["prompt_token_ids"],
                        outputs=[types.SimpleNamespace(token_ids=toks, finish_reason=finish, stop_reason=stop)],
                    )
                )
            return out[::-1] if reorder else out

        def reset_prefix_cache(self):
            self.resets += 1

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


PROMPTS = [[6, 1], [4, 2, 2], [5], [7, 7]]  # heads 6, 4, 5, 7: EOS, cap, stop id, cap
EXPECTED = [[106], [104, 105, 106], [105], [107, 108, 109]]


def _check_outputs(out):
    assert out.token_ids == EXPECTED
    assert out.stops == [EOS, None, 9, None]
    assert out.num_tokens == 2 + 3 + 2 + 3
    assert out.seconds >= 0


# ----------------------------------------------------------------------- the one-line errors


def test_require_vllm_errors(monkeypatch):
    with pytest.raises(PotstillError, match=r"colocate\) runs on CUDA only, not on 'cpu'") as err:
        require_vllm("colocate", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(PotstillError, match="mode 'local' is unknown"):
        require_vllm("local", "cpu")
    require_vllm("server", "cpu")  # generating from a server needs only an HTTP client
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(PotstillError, match=r"pip install 'potstill\[vllm\]'"):
        require_vllm("server", "cpu", sync=True)  # NCCL weight sync: vllm and CUDA here too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(PotstillError, match=r"needs the vllm package; pip install 'potstill\[vllm\]'") as err:
        require_vllm("colocate", "cuda")
    assert "\n" not in str(err.value)


def test_from_options_checks_the_machine(tiny_teacher, tiny_tokenizer):
    with pytest.raises(PotstillError, match="CUDA only"):
        VLLMEngine.from_options(tiny_teacher, tiny_tokenizer, VLLMOptions())  # the model is on the CPU


# ----------------------------------------------------------------------- colocated: request/response mapping


def test_colocate_mapping_and_sampling(monkeypatch):
    log: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(log))
    eng = VLLMEngine(llm=sys.modules["vllm"].LLM(), eos_ids=[EOS, 0])
    _check_outputs(eng.generate(PROMPTS, max_new_tokens=5))
    assert log["prompts"][-1] == [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = log["sampling"][-1]
    assert greedy == {
        "n": 1,
        "max_tokens": 5,
        "stop_token_ids": [0, EOS],
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "temperature": 0.0,
        "top_p": 1.0,
    }
    log["sampling"].clear()
    eng.generate(PROMPTS + [[6, 1]], max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9, seed=11)
    sampled = log["sampling"]
    assert all(
        s["temperature"] == 0.7 and s["top_p"] == 0.9 and s["max_tokens"] == 7 and s["top_k"] == -1 for s in sampled
    )
    seeds = [s["seed"] for s in sampled]
    assert len(set(seeds)) == len(seeds)  # equal prompts (first and last) are sampled independently
    log["sampling"].clear()
    eng.generate(PROMPTS + [[6, 1]], max_new_tokens=7, do_sample=True, temperature=0.7, top_p=0.9, seed=11)
    assert [s["seed"] for s in log["sampling"]] == seeds  # reproducible
    log["sampling"].clear()
    eng.generate(PROMPTS, max_new_tokens=7, do_sample=True, seed=12)
    assert [s["seed"] for s in log["sampling"]] != seeds[:4]


def test_colocate_refuses_outputs_out_of_order(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}, reorder=True))
    eng = VLLMEngine(llm=sys.modules["vllm"].LLM(), eos_ids=[EOS])
    with pytest.raises(PotstillError, match="do not match the 4 prompts in order"):
        eng.generate(PROMPTS, max_new_tokens=5)


# ----------------------------------------------------------------------- server: a fake HTTP server


@pytest.fixture
def fake_server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: dict | bytes):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                return self._send(200, {"data": [{"id": "served/teacher"}]})
            self._send(404, {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if self.path != "/v1/completions" or body["prompt"] == [99]:
                return self._send(400, b"bad\nrequest")
            toks, finish, stop = _scripted(body["prompt"])
            self._send(
                200,
                {
                    "choices": [
                        {
                            "index": 0,
                            "text": "",
                            "token_ids": toks,
                            "finish_reason": finish,
                            "stop_reason": stop,
                            "prompt_token_ids": body["prompt"],
                        }
                    ]
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_server_mapping_and_requests(fake_server):
    url, seen = fake_server
    eng = VLLMEngine("server", eos_ids=[EOS], client=ve.VLLMServerClient(url + "/", timeout=5))
    _check_outputs(eng.generate(PROMPTS, max_new_tokens=5, do_sample=True, temperature=1.3, top_p=0.95, seed=2))
    assert sorted(b["prompt"] for b in seen) == sorted(PROMPTS)  # one request per prompt, each with its seed
    for b in seen:
        assert b["model"] == "served/teacher" and b["return_token_ids"] is True and b["max_tokens"] == 5
        assert (b["temperature"], b["top_p"], b["top_k"], b["min_p"], b["repetition_penalty"]) == (
            1.3,
            0.95,
            -1,
            0.0,
            1.0,
        )
        assert b["stop_token_ids"] == [EOS]
    assert len({b["seed"] for b in seen}) == len(PROMPTS)
    seen.clear()
    eng.generate([[5]], max_new_tokens=2)
    assert seen[0]["temperature"] == 0.0 and "seed" not in seen[0]
    with pytest.raises(PotstillError, match=r"refused a completion \(HTTP 400: .*bad request") as err:
        eng.generate([[99]], max_new_tokens=2)
    assert "\n" not in str(err.value)


def test_server_unreachable_is_one_line():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = VLLMEngine("server", eos_ids=[EOS], client=ve.VLLMServerClient(f"http://127.0.0.1:{port}", timeout=0.3))
    with pytest.raises(PotstillError, match="no vLLM server answers at .*trl vllm-serve") as err:
        eng.generate([[5]], max_new_tokens=2)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------- weights


def _tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        eos_token_id=EOS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            modules_to_save=["lm_head"],
            lora_dropout=0.0,
        ),
    )
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # B starts at 0: make the merge matter
                p.add_(torch.randn_like(p) * 0.1)
    return peft_model


def _colocated(monkeypatch) -> VLLMEngine:
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}))
    return VLLMEngine(llm=sys.modules["vllm"].LLM(), eos_ids=[EOS])


def test_sync_weights_plain_model(monkeypatch):
    model = _tiny_llama()
    eng = _colocated(monkeypatch)
    wrapped = torch.nn.DataParallel(model)  # a `.module` wrapper, as DDP
    assert eng.sync_weights(wrapped, version=3)
    loaded = eng._llm.loaded
    state = model.state_dict()
    assert [n for n, _ in loaded] == list(state)
    assert all(torch.equal(t, state[n]) for n, t in loaded)
    assert eng._llm.resets == 1
    assert not eng.sync_weights(wrapped, version=3)  # unchanged since: nothing pushed
    assert len(eng._llm.loaded) == len(state) and eng._llm.resets == 1
    assert eng.sync_weights(wrapped, version=4) and eng._llm.resets == 2


def test_sync_weights_tied_embeddings_sent_once():
    model = _tiny_llama(tie=True)
    names = [n for n, _ in named_weights(model)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert set(names) == set(model.state_dict()) - {"lm_head.weight"}


def test_sync_weights_lora_merged_out_of_place(monkeypatch):
    peft_model = _lora(_tiny_llama())
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    eng = _colocated(monkeypatch)
    eng.sync_weights(peft_model)
    loaded = dict(eng._llm.loaded)
    assert list(loaded) == list(merged)  # the HF names: no base_model / base_layer / lora_ / modules_to_save
    for name, t in loaded.items():
        assert t.shape == merged[name].shape, name
        assert torch.equal(t, merged[name]), name
    base = peft_model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    assert not torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], q.base_layer.weight)  # LoRA counted
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())  # training weights untouched
    assert not any(getattr(m, "merged_adapters", None) for m in base.modules())


def test_sync_weights_server_mode_metadata():
    class WeightClient:
        def __init__(self):
            self.updates, self.resets = [], 0

        def update_named_params(self, metadata, pairs):
            self.updates.append((metadata, [(n, t.clone()) for n, t in pairs]))

        def reset_prefix_cache(self):
            self.resets += 1

    peft_model = _lora(_tiny_llama())
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    client = WeightClient()
    eng = VLLMEngine("server", eos_ids=[EOS], make_weight_client=lambda: client)
    assert eng.sync_weights(peft_model, version=0) and eng.sync_weights(peft_model, version=1)
    meta, pairs = client.updates[-1]
    assert meta == [(n, "float32", list(t.shape)) for n, t in merged.items()]
    assert [n for n, _ in pairs] == list(merged) and all(torch.equal(t, merged[n]) for n, t in pairs)
    assert client.resets == 2


def test_save_for_vllm_roundtrip(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    peft_model = _lora(_tiny_llama())
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    path = save_for_vllm(peft_model, tiny_tokenizer, tmp_path / "m")
    assert any(path.glob("*.safetensors")) and (path / "tokenizer_config.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert list(back) == list(merged) and all(torch.equal(back[n], merged[n]) for n in merged)
    assert ve.local_model_dir(AutoModelForCausalLM.from_pretrained(path)) == path
    assert ve.local_model_dir(peft_model) is None


# ----------------------------------------------------------------------- wiring: cache, demo, synthesize


def test_generate_cached_with_engine(monkeypatch, tiny_teacher, tiny_tokenizer, tmp_path):
    log: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(log))
    built = []

    def make_llm():
        built.append(1)
        return sys.modules["vllm"].LLM()

    prompts = PROMPTS + [[8, 8], [9]]
    params = GenerationParams(max_new_tokens=4)
    eng = VLLMEngine(make_llm=make_llm, eos_ids=[EOS], identity={"dtype": "auto"})
    out = generate_cached(
        tiny_teacher,
        tiny_tokenizer,
        prompts,
        tmp_path / "g",
        params,
        model_id="t",
        chunk_size=4,
        engine=eng,
        progress=False,
    )
    assert out.token_ids[:4] == EXPECTED and len(log["prompts"]) == 2 and built == [1]
    rec = json.loads((tmp_path / "g" / "chunk-00000.json").read_text())
    assert set(rec) == {"key", "chunk", "prompts_sha", "token_ids", "num_tokens", "seconds"}
    meta = json.loads((tmp_path / "g" / "meta.json").read_text())
    assert meta["backend"] == {"backend": "vllm", "mode": "colocate", "dtype": "auto"}
    lazy = VLLMEngine(
        make_llm=lambda: pytest.fail("a fully cached run must not start vLLM"),
        eos_ids=[EOS],
        identity={"dtype": "auto"},
    )
    again = generate_cached(
        tiny_teacher,
        tiny_tokenizer,
        prompts,
        tmp_path / "g",
        params,
        model_id="t",
        chunk_size=4,
        engine=lazy,
        progress=False,
    )
    assert again.token_ids == out.token_ids
    with pytest.raises(PotstillError, match="run key differs"):  # hf generations are not vllm generations
        generate_cached(
            tiny_teacher, tiny_tokenizer, prompts, tmp_path / "g", params, model_id="t", chunk_size=4, progress=False
        )
    got = backend_generate("vllm", tiny_teacher, tiny_tokenizer, PROMPTS, params, engine=eng, progress=False)
    assert got.token_ids == EXPECTED


def test_demo_teacher_answers_through_vllm(monkeypatch, tiny_teacher, tiny_tokenizer, tmp_path):
    from potstill.data.demo import teacher_responses

    monkeypatch.setenv("POTSTILL_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}))
    opts = GenerationOptions(backend="vllm")
    with pytest.raises(PotstillError, match="CUDA only"):  # the model is on the CPU
        teacher_responses(
            tiny_teacher, tiny_tokenizer, "t", [{"id": "a", "prompt": "Hi"}], max_new_tokens=4, generation=opts
        )
    answer = tiny_tokenizer.encode("fine")

    class Engine(VLLMEngine):
        def generate(self, prompts, **kw):
            return ve.to_generations([(answer + [EOS], "stop", None) for _ in prompts], {EOS}, 0.0)

    monkeypatch.setattr(
        VLLMEngine,
        "from_options",
        classmethod(lambda cls, model, tok, options, **kw: Engine(eos_ids=[EOS], identity={"dtype": options.dtype})),
    )
    rows = teacher_responses(
        tiny_teacher, tiny_tokenizer, "t", [{"id": "a", "prompt": "Hi"}], max_new_tokens=4, generation=opts
    )
    assert rows[0]["response"] == "fine"
    hf = teacher_responses(tiny_teacher, tiny_tokenizer, "t", [{"id": "a", "prompt": "Hi"}], max_new_tokens=4)
    assert hf[0]["response"] != "fine"  # another cache entry: the backend is in the key


def test_synthesize_schema_and_generator(monkeypatch, tiny_teacher, tiny_tokenizer, tmp_path):
    from potstill.dd.synth_teacher import TeacherGenerator
    from potstill.runners.synthesize import run_synthesis, synthesis_config_from_dict

    cfg = synthesis_config_from_dict(
        {"generation": {"backend": "vllm", "vllm": {"mode": "server"}}}, ["generation.vllm.server_url=http://h:1"]
    )
    assert isinstance(cfg.generation, GenerationOptions) and cfg.generation.vllm.server_url == "http://h:1"
    with pytest.raises(PotstillError, match="generation.backend") as err:
        synthesis_config_from_dict({"generation": {"backend": "tgi"}})
    assert "\n" not in str(err.value)
    with pytest.raises(PotstillError, match="CUDA only"):
        run_synthesis(
            {"generation": {"backend": "vllm"}, "device": "cpu"},
            tmp_path / "s",
            model=tiny_teacher,
            tokenizer=tiny_tokenizer,
        )
    assert not (tmp_path / "s").exists()

    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm({}))
    answer = tiny_tokenizer.encode("a synthetic answer")
    eng = VLLMEngine(eos_ids=[EOS], identity={"dtype": "auto"})
    monkeypatch.setattr(
        eng,
        "generate",
        lambda prompts, **kw: ve.to_generations([(answer + [EOS], "stop", None) for _ in prompts], {EOS}, 0.0),
    )
    gen = TeacherGenerator(tiny_teacher, tiny_tokenizer, tmp_path / "gen", model_id="t", progress=False, engine=eng)
    hf = TeacherGenerator(tiny_teacher, tiny_tokenizer, tmp_path / "gen", model_id="t", progress=False)
    assert gen.identity != hf.identity
    comps = gen(["one", "two"], tag="round-001-answer", params=GenerationParams(max_new_tokens=64))
    assert [c.text for c in comps] == ["a synthetic answer"] * 2 and not comps[0].truncated


# ----------------------------------------------------------------------- on-policy sampling through the engine


def test_on_policy_steps_sample_from_the_engine_after_syncing_the_student(monkeypatch, tiny_llama_pair, tmp_path):
    """GKD with lmbda 1: before each step's sampling the engine gets the student's current weights (once per
    optimizer step), the data's prompts go in, and the engine's tokens (EOS cut, stop id kept) are what the
    student is trained on."""
    from datasets import Dataset

    from potstill.data import encode_example
    from potstill.kd import OnPolicyConfig, OnPolicyKDTrainer

    teacher, student, tok = tiny_llama_pair
    rows = [
        encode_example(tok, [{"role": "user", "content": q}], "an answer", 64)
        for q in ("What is two plus two?", "Name a fruit.", "Say hello.", "Count to three.")
    ]
    ds = Dataset.from_list([{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows])
    trainer = OnPolicyKDTrainer(
        model=student,
        teacher_model=teacher,
        processing_class=tok,
        train_dataset=ds,
        args=OnPolicyConfig(
            output_dir=str(tmp_path),
            lmbda=1.0,
            max_steps=2,
            per_device_train_batch_size=2,
            gen_max_new_tokens=4,
            learning_rate=1e-2,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            divergence="forward_kl",
        ),
    )
    log: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(log))
    eng = VLLMEngine(llm=sys.modules["vllm"].LLM(), eos_ids=[tok.eos_token_id])
    pushed: list = []
    llm = eng._llm  # the trainer closes the engine when training ends
    load = llm.llm_engine.model_executor.driver_worker.model_runner.model
    load.load_weights = lambda pairs: pushed.extend((n, t.clone()) for n, t in pairs)
    trainer._vllm = eng
    before = {n: p.detach().clone() for n, p in student.state_dict().items()}
    trainer.train()
    # one sync per sampling step (each after the optimizer step before it), every weight once in each
    assert llm.resets == 2 and len(pushed) == 2 * len(before)
    synced = [dict(pushed[: len(before)]), dict(pushed[len(before) :])]
    assert all(torch.equal(synced[0][n], before[n]) for n in before)  # step 0: the initial student
    assert any(not torch.equal(synced[1][n], before[n]) for n in before)  # step 1: the updated one
    sent = [p["prompt_token_ids"] for call in log["prompts"] for p in call]
    prompts = {tuple(r["prompt_ids"]) for r in rows}
    assert len(sent) == 4 and all(tuple(p) in prompts for p in sent)
    expected = sum(
        len(toks) if finish == "length" else toks.index(tok.eos_token_id) + 1 if tok.eos_token_id in toks else len(toks)
        for toks, finish, _ in map(_scripted, sent)
    )
    assert trainer.rollout_stats["gen_tokens"] == expected > 0
    assert trainer.rollout_stats["modes"] == ["student", "student"]


def test_a_vllm_recipe_without_cuda_is_one_line_exit_2(assets, tmp_path, capsys):
    from helpers import recipe, write

    from potstill.cli import main

    on_policy = [
        {
            "name": "gkd",
            "alpha": 0.0,
            "divergence": {"name": "forward_kl"},
            "method": {"kind": "on_policy", "lmbda": 1.0},
        }
    ]
    r = recipe(assets, tmp_path / "out", generation={"backend": "vllm"}, runs=on_policy)
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA only" in err[0] and "cpu" in err[0]
    assert not (tmp_path / "out" / "runs").exists()
    minillm = [{"name": "m", "alpha": 0.0, "divergence": {"name": "reverse_kl"}, "method": {"kind": "minillm"}}]
    r = recipe(assets, tmp_path / "out", generation={"backend": "vllm"}, runs=minillm)
    assert main(["distill", str(write(tmp_path / "r.yaml", r))]) == 2
    assert "mix the teacher into the student's sampling" in capsys.readouterr().err
