"""The vLLM generation backend (``generation.backend: vllm``; ``pip install 'potstill[vllm]'``, CUDA only).

A :class:`VLLMEngine` serves one model in one of TRL's two modes: ``colocate`` (a ``vllm.LLM`` in
this process, loaded from the model's local directory or a temporary copy) or ``server`` (started by
the user with ``trl vllm-serve --model M``: ``POST /v1/completions`` with token-id prompts, weights
through TRL's ``VLLMClient``). Outputs follow :func:`potstill.generate.generate` (EOS cut, ``stops``,
``num_tokens``); sampling is softmax(logits / T) cut at top_p only, each prompt with its own seed.
On-policy trainer hook::

    engine = VLLMEngine.from_options(student, tokenizer, recipe.generation.vllm,
                                     device=accelerator.device, seed=args.seed, sync=True)
    # per student batch, instead of potstill.generate.generate (every process calls both):
    engine.sync_weights(unwrapped_student, version=self.state.global_step)  # no-op if unchanged
    gen = engine.generate(prompts, max_new_tokens=..., do_sample=True, temperature=..., top_p=..., seed=seed)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PotstillError
from .generate import Generations

__all__ = [
    "MISSING_VLLM",
    "MODES",
    "VLLMEngine",
    "VLLMServerClient",
    "local_model_dir",
    "named_weights",
    "require_vllm",
    "sampling_params",
    "save_for_vllm",
    "to_generations",
]

MODES = ("colocate", "server")
MISSING_VLLM = "the vllm backend needs the vllm package; pip install 'potstill[vllm]' (CUDA only) or use backend 'hf'"
_ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


def _importable(name: str) -> bool:
    try:
        return importlib.import_module(name) is not None
    except ImportError:
        return False


def require_vllm(mode: str = "colocate", device=None, *, sync: bool = False) -> None:
    """Raise a one-line :class:`PotstillError` unless ``mode`` can run here: colocate needs a CUDA ``device``
    (default ``cuda``) and vllm; server only ``requests``, and with ``sync`` (weights pushed into the
    server over NCCL) also vllm, trl's ``VLLMClient`` and a CUDA device."""
    if mode not in MODES:
        raise PotstillError(f"generation.vllm.mode '{mode}' is unknown; use colocate or server")
    dev = torch.device(device if device is not None else "cuda")
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    if mode == "colocate" and not cuda:
        where = "no CUDA device is available here" if dev.type == "cuda" else f"not on '{dev}'"
        raise PotstillError(
            f"the vllm backend (colocate) runs on CUDA only, {where}; use a GPU, a vLLM "
            "server (generation.vllm.mode: server) or generation.backend: hf"
        )
    if mode == "colocate" and not _importable("vllm"):
        raise PotstillError(MISSING_VLLM)
    if mode == "server" and not _importable("requests"):
        raise PotstillError("the vllm server mode needs the requests package; pip install requests")
    if mode == "server" and sync and not (cuda and _importable("vllm") and _importable("trl.generation.vllm_client")):
        raise PotstillError(
            "syncing weights into a vLLM server needs vllm, trl and a CUDA device here (NCCL); "
            "pip install 'potstill[vllm]' trl on a GPU machine, or use generation.backend: hf"
        )


def _outer(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate (``.module``) and torch.compile (``._orig_mod``), keeping a peft wrapper."""
    for _ in range(16):
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = inner
    return model


def _plain_lora(layer, adapters: list[str]) -> bool:
    """A vanilla LoRA linear layer (no DoRA or other variant, no LoRA bias): mergeable out of place."""
    from peft.tuners.lora.layer import Linear

    return isinstance(layer, Linear) and not any(
        a in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(a) for a in adapters
    )


def _hf_name(key: str, prefix: str, adapter: str) -> str | None:
    """A peft state-dict key as the wrapped model's own key; ``None`` for adapter-only tensors."""
    parts = key.removeprefix("base_model.model.").split(".")
    if any(p.startswith(prefix) for p in parts) or "original_module" in parts:
        return None  # lora_A / lora_B / magnitudes (merged) and the frozen copy of a modules_to_save module
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        if parts[i + 1 : i + 2] != [adapter]:
            return None
        del parts[i : i + 2]
    return ".".join(p for p in parts if p != "base_layer")


@torch.no_grad()
def named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``model`` under the names of its HF checkpoint, for vLLM's ``load_weights``.

    ``model``: an HF causal LM, maybe peft-, DDP-wrapped or compiled. Names: the unwrapped model's state-dict
    keys (no ``base_model.model.``, ``.base_layer``, ``lora_``); a tensor tied to an earlier one (``lm_head``)
    is left out, as in a saved checkpoint. LoRA is merged out of place, ``W + scale * B @ A`` in W's dtype
    (what ``merge_and_unload`` computes), W untouched; other adapter kinds through peft's
    ``merge_adapter`` / ``unmerge_adapter``. FSDP2 ``DTensor`` s are gathered.
    """
    model = _outer(model)
    peft = hasattr(model, "peft_config") and hasattr(model, "base_model")
    layers, in_place, prefix, adapter = {}, False, "", ""
    if peft:
        from peft.tuners.tuners_utils import BaseTunerLayer

        prefix, adapter = getattr(model.base_model, "prefix", "lora_"), model.active_adapter
        layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        in_place = not all(_plain_lora(m, m.active_adapters) for m in layers.values())
        if in_place:
            model.merge_adapter()
    seen: set[int] = set()
    try:
        for key, t in model.state_dict().items():
            name = _hf_name(key, prefix, adapter) if peft else key
            ptr = (t.to_local() if hasattr(t, "to_local") else t).data_ptr()
            if name is None or (ptr in seen and t.numel()):
                continue
            seen.add(ptr)
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            layer = layers.get(key.removesuffix(".base_layer.weight")) if key.endswith(".base_layer.weight") else None
            if layer is not None and not in_place and not layer.disable_adapters:
                for a in layer.active_adapters:
                    if a in layer.lora_A and a not in layer.merged_adapters:
                        t = (t + layer.get_delta_weight(a)).to(t.dtype)  # peft's merge: W += delta, in W's dtype
            yield name, t.detach()
    finally:
        if in_place:
            model.unmerge_adapter()


def save_for_vllm(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Save ``model`` (LoRA merged, HF names, safetensors) and ``tokenizer`` into ``directory`` for ``vllm.LLM``."""
    from .models.head import unwrap_model

    directory = Path(directory)
    unwrap_model(model).save_pretrained(directory, state_dict={n: t.contiguous() for n, t in named_weights(model)})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def local_model_dir(model: nn.Module) -> Path | None:
    """The local safetensors checkpoint ``model`` was loaded from, if of its architecture and with no adapter
    (vLLM loads it; changes made in memory since reach vLLM only through :meth:`VLLMEngine.sync_weights`)."""
    cfg = getattr(_outer(model), "config", None)
    d = Path(getattr(cfg, "_name_or_path", "") or "/nonexistent")
    if hasattr(_outer(model), "peft_config") or not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        return None
    disk, mine = json.loads((d / "config.json").read_text()), cfg.to_dict()
    return d if all(disk.get(k) == mine.get(k) for k in _ARCH_KEYS) else None


def _prompt_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"potstill.vllm:{seed}:{i}".encode()).digest()[:4], "little") >> 1


def sampling_params(
    *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, seed: int | None, eos: Iterable[int]
) -> dict[str, Any]:
    """One request's ``SamplingParams`` kwargs / ``/v1/completions`` fields: greedy is temperature 0, sampling
    softmax(logits / temperature) cut at ``top_p`` only; it stops on exactly the EOS ids the hf backend does."""
    kw: dict[str, Any] = {
        "n": 1,
        "max_tokens": int(max_new_tokens),
        "stop_token_ids": sorted(int(e) for e in eos),
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    if do_sample:
        return {**kw, "temperature": float(temperature), "top_p": float(top_p), "seed": int(seed or 0)}
    return {**kw, "temperature": 0.0, "top_p": 1.0}


def to_generations(outputs: Iterable[tuple[list[int], Any, Any]], eos: set[int], seconds: float) -> Generations:
    """``(token_ids, finish_reason, stop_reason)`` per prompt, in input order, as :class:`Generations`
    (vLLM keeps the stop token in ``token_ids``; it is cut here and counted in ``num_tokens``)."""
    token_ids, stops, num = [], [], 0
    for toks, finish, reason in outputs:
        toks = [int(t) for t in toks]
        reason = reason if isinstance(reason, int) and not isinstance(reason, bool) else None
        cut = next((j for j, t in enumerate(toks) if t in eos or t == reason), None)
        if cut is None and finish == "stop" and reason is not None:  # stopped on a token it left out
            toks, cut = toks + [reason], len(toks)
        num += len(toks) if cut is None else cut + 1
        token_ids.append(toks if cut is None else toks[:cut])
        stops.append(None if cut is None else toks[cut])
    return Generations(token_ids, num, seconds, stops)


class VLLMServerClient:
    """A vLLM server's ``/v1/completions`` (token-id prompts in, ``token_ids`` out), over ``requests``."""

    def __init__(self, base_url: str, timeout: float = 240.0):
        self.base_url, self.timeout = base_url.rstrip("/"), float(timeout)
        self.model, self._session = None, None  # the served model's name (GET /v1/models), a requests.Session

    def _ready(self) -> str:
        import requests

        deadline, self._session = time.monotonic() + self.timeout, self._session or requests.Session()
        while self.model is None:
            try:
                r = self._session.get(f"{self.base_url}/v1/models", timeout=max(1.0, min(10.0, self.timeout)))
                self.model = str(r.json()["data"][0]["id"]) if r.status_code == 200 else None
            except (ValueError, KeyError, IndexError, TypeError):  # first: a JSONDecodeError is a ValueError
                raise PotstillError(
                    f"{self.base_url} answers, but not as a vLLM server (GET /v1/models); "
                    "fix generation.vllm.server_url"
                ) from None
            except requests.RequestException:
                pass
            if self.model is None and time.monotonic() >= deadline:
                raise PotstillError(
                    f"no vLLM server answers at {self.base_url} (waited {self.timeout:g} s); start "
                    "one with `trl vllm-serve --model MODEL` or fix generation.vllm.server_url"
                )
            time.sleep(0.0 if self.model else min(1.0, max(0.0, deadline - time.monotonic())))
        return self.model

    def complete(self, prompt: list[int], sampling: dict[str, Any]) -> dict:
        """One completion choice: ``{"token_ids", "finish_reason", "stop_reason", ...}``."""
        import requests

        body = {"model": self._ready(), "prompt": prompt, "return_token_ids": True, **sampling}
        try:
            r = self._session.post(f"{self.base_url}/v1/completions", json=body, timeout=self.timeout)
        except requests.RequestException as err:
            raise PotstillError(
                f"the vLLM server at {self.base_url} did not answer a completion "
                f"({type(err).__name__}); check that it still runs"
            ) from None
        if r.status_code != 200:
            raise PotstillError(
                f"the vLLM server at {self.base_url} refused a completion (HTTP {r.status_code}: "
                f"{' '.join(r.text.split())[:160]}); check the server's model and version"
            )
        try:
            choice = r.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            choice = None
        if not isinstance(choice, dict) or not isinstance(choice.get("token_ids"), list):
            raise PotstillError(
                f"the vLLM server at {self.base_url} returned no token ids; upgrade vllm on the "
                "server (its /v1/completions must honour return_token_ids)"
            )
        return choice

    def weight_client(self, device):
        """TRL's ``VLLMClient`` joined to the server's NCCL weight-update group (``device``: CUDA, this side)."""
        from trl.generation.vllm_client import VLLMClient

        try:
            client = VLLMClient(base_url=self.base_url, connection_timeout=self.timeout)
            client.init_communicator(device=device)
        except (RuntimeError, ConnectionError, ImportError) as err:
            why = " ".join(str(err).split())[:160]
            raise PotstillError(
                f"cannot sync weights into the vLLM server at {self.base_url} ({why}); "
                "start it with `trl vllm-serve --model MODEL`"
            ) from None
        return client


def _launcher_env() -> None:
    """The torch.distributed variables vLLM's ``external_launcher`` reads: torchrun's, else one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        for k, v in (
            ("RANK", 0),
            ("LOCAL_RANK", 0),
            ("WORLD_SIZE", 1),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", s.getsockname()[1]),
        ):
            os.environ.setdefault(k, str(v))


class VLLMEngine:
    """One model served by vLLM: colocated (``llm``, a ``vllm.LLM``, or ``make_llm()`` building one on first
    use) or a server (``client``: a :class:`VLLMServerClient`; ``make_weight_client()``: TRL's ``VLLMClient``).
    ``eos_ids``: where generation stops; ``identity``: what outputs depend on besides weights and params (it
    goes into cache run keys). Build one with :meth:`from_options`; tests pass fakes."""

    def __init__(
        self,
        mode: str = "colocate",
        *,
        eos_ids: Iterable[int],
        llm=None,
        make_llm: Callable | None = None,
        client=None,
        make_weight_client: Callable | None = None,
        identity: dict | None = None,
        owned_dirs: list[str] | None = None,
    ):
        self.mode, self.eos_ids = mode, {int(e) for e in eos_ids}
        self._llm, self._make_llm, self._client = llm, make_llm, client
        self._weights, self._make_weights = None, make_weight_client
        self.identity = {"backend": "vllm", "mode": mode, **(identity or {})}
        self._owned = owned_dirs if owned_dirs is not None else []
        self._version, self._meta = object(), None  # object(): equal to no version, so the first sync runs

    @classmethod
    def from_options(
        cls,
        model: nn.Module,
        tokenizer,
        options,
        *,
        device=None,
        seed: int = 0,
        sync: bool = False,
        workdir: str | Path | None = None,
    ) -> VLLMEngine:
        """An engine for ``model`` set up by ``options`` (``config.VLLMOptions``, or any object with its fields).

        Checks the machine at once (:func:`require_vllm`); vLLM starts on the first generation, so a
        fully cached run never loads it. ``sync``: weights will be synced (on-policy), so a colocated
        engine runs in this process (``external_launcher``). ``workdir``: where a temporary model copy goes.
        """
        from .generate import eos_ids
        from .models.head import unwrap_model

        device = device if device is not None else next(model.parameters()).device
        require_vllm(options.mode, device, sync=sync)
        eos = eos_ids(unwrap_model(model), tokenizer)
        if options.mode == "server":
            client = VLLMServerClient(options.server_url, options.server_timeout)
            return cls("server", eos_ids=eos, client=client, make_weight_client=lambda: client.weight_client(device))
        owned: list[str] = []
        kw = {
            "dtype": options.dtype,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "tensor_parallel_size": options.tensor_parallel_size,
            "seed": int(seed),
            **({} if options.max_model_len is None else {"max_model_len": options.max_model_len}),
            **({"distributed_executor_backend": "external_launcher"} if sync else {}),
        }  # in-process: load_weights

        def make_llm():
            path = local_model_dir(model)
            if path is None:
                Path(workdir or tempfile.gettempdir()).mkdir(parents=True, exist_ok=True)
                owned.append(tempfile.mkdtemp(prefix="potstill-vllm-", dir=workdir))
                path = save_for_vllm(model, tokenizer, owned[-1])
            if sync:
                _launcher_env()
            return importlib.import_module("vllm").LLM(model=str(path), **kw)

        return cls("colocate", eos_ids=eos, make_llm=make_llm, identity={"dtype": options.dtype}, owned_dirs=owned)

    def _engine(self):
        if self._llm is None:
            self._llm = self._make_llm()
        return self._llm

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_ids: Iterable[int] | None = None,
        progress: bool = False,
    ) -> Generations:
        """Continue each token-id prompt: :class:`Generations` in the input order (see the module docstring);
        prompt ``i`` sampled with a seed hashed from ``(seed, i)``; ``seconds``: the requests' wall time."""
        prompts = [[int(t) for t in p] for p in prompts]
        eos = self.eos_ids if eos_ids is None else {int(e) for e in eos_ids}
        kws = [
            sampling_params(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                seed=_prompt_seed(seed, i),
                eos=eos,
            )
            for i in range(len(prompts))
        ]
        t0 = time.perf_counter()
        if self.mode == "colocate":
            vllm = importlib.import_module("vllm")
            results = list(
                self._engine().generate(
                    [{"prompt_token_ids": p} for p in prompts],
                    use_tqdm=progress,
                    sampling_params=[vllm.SamplingParams(**k) for k in kws],
                )
            )
            echoed = [list(getattr(r, "prompt_token_ids", None) or p) for r, p in zip(results, prompts)]
            if len(results) != len(prompts) or echoed != prompts:
                raise PotstillError(
                    f"vllm returned {len(results)} outputs that do not match the {len(prompts)} "
                    "prompts in order; check the vllm version"
                )
            outs = [
                (c.token_ids, getattr(c, "finish_reason", None), getattr(c, "stop_reason", None))
                for c in (r.outputs[0] for r in results)
            ]
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(32, len(prompts)))) as pool:
                outs = [
                    (c["token_ids"], c.get("finish_reason"), c.get("stop_reason"))
                    for c in pool.map(self._client.complete, prompts, kws)
                ]
        return to_generations(outs, eos, time.perf_counter() - t0)

    def sync_weights(self, model: nn.Module, *, version: Any = None) -> bool:
        """Push ``model``'s current weights (:func:`named_weights`) into the engine; reset its prefix cache.

        ``version`` (e.g. the optimizer step): skipped when equal to the last synced one; returns whether
        weights were pushed. Server mode: rank 0 pushes, the other ranks only join the gathering, then all
        wait at a barrier, so that nobody samples from stale weights.
        """
        if version is not None and version == self._version:
            return False
        if self.mode == "colocate":
            self._load_weights(named_weights(model))
            self._engine().reset_prefix_cache()
        else:
            dist = torch.distributed.is_initialized()
            if not dist or torch.distributed.get_rank() == 0:
                self._weights = self._weights or self._make_weights()
                if self._meta is None:  # the server must know every tensor before the first one is sent
                    self._meta = [
                        (n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named_weights(model)
                    ]
                self._weights.update_named_params(self._meta, named_weights(model))
                self._weights.reset_prefix_cache()
            else:
                for _ in named_weights(model):
                    pass
            if dist:
                torch.distributed.barrier()
        self._version = version
        return True

    def _load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Colocated: the in-process model's ``load_weights`` (the engine runs with ``external_launcher``,
        as in TRL's colocate mode), one tensor at a time, so one merged copy exists at once."""
        model = self._engine().llm_engine.model_executor.driver_worker.model_runner.model
        for pair in weights:
            model.load_weights([pair])

    def close(self) -> None:
        """Drop the engine and remove the temporary model directories this engine created."""
        self._llm = None
        while self._owned:
            shutil.rmtree(self._owned.pop(), ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
