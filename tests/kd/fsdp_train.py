"""Three SGD steps of logit KD (alpha = 0.2, a live teacher) on a fixed global batch of 8.

``python fsdp_train.py OUT [DIVERGENCE [tied]]``: one process on the whole batch, plain modules (the reference).
``DIVERGENCE`` is ``forward_kl`` (the default: the reducer's closed-form path) or ``generalized_jsd`` (GKD's JSD
at beta 0.5: the autograd path); ``tied`` ties the student's lm_head to its input embeddings (one parameter that
gets gradient both through FSDP's own reduce-scatter and through the gathered head).
The same with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set for 2 processes: gloo, each rank
takes 4 of the 8 rows, and both the student (each decoder layer + the root, the root with
``reshard_after_forward=True`` so that its lm_head is a sharded DTensor when the reducer runs) and the frozen
teacher (same layout) are wrapped with FSDP2 ``fully_shard``. The loss is what ``KDTrainer.compute_loss`` computes
(``final_hidden`` -> ``target_rows`` -> ``full_head(output_head(...))`` -> ``chunked_kd_loss``), normalized by the
GLOBAL number of target tokens (all-reduced) and multiplied by the world size, as ``KDTrainer`` does under data
parallelism (FSDP2 averages gradients over ranks). Rank 0 writes ``student.safetensors`` (the full state dict,
gathered), ``hf/`` (``save_pretrained`` of that state) and ``info.json`` (what each rank saw). A rank still running after 180 s dumps its stacks and exits 1.
"""

import faulthandler
import json
import os
import sys

faulthandler.dump_traceback_later(180, exit=True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402
from helpers import encode_kd_pairs  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from potstill.data import PadCollator  # noqa: E402
from potstill.distributed import end_distributed  # noqa: E402
from potstill.divergences import chunked_kd_loss  # noqa: E402
from potstill.divergences.chunked import full_head  # noqa: E402
from potstill.models import final_hidden, output_head  # noqa: E402
from potstill.signals import OnlineTeacher, target_index, target_rows  # noqa: E402

STEPS, GLOBAL_BATCH, LR = 3, 8, 0.5
PARAMS = {"generalized_jsd": {"beta": 0.5}}


def make_student(tok, tied: bool):
    model = make_tiny_llama(tok, layers=1, hidden=32, heads=2, kv_heads=1, seed=1)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def main(out: str, divergence: str = "forward_kl", tied: str = "") -> None:
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tok = make_tiny_tokenizer()
    teacher = make_tiny_llama(tok, layers=2, hidden=64, heads=4, kv_heads=2, seed=0)
    student = make_student(tok, tied == "tied")
    # One padded batch of 8, then each rank's rows: both layouts see exactly the same inputs.
    full = PadCollator(tok.pad_token_id)(encode_kd_pairs(tok)[:GLOBAL_BATCH])
    per = GLOBAL_BATCH // world
    batch = {k: v[rank * per : (rank + 1) * per] for k, v in full.items()}
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", rank=rank, world_size=world)
        for model in (student, teacher):
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model, reshard_after_forward=True)
    student.train()
    source = OnlineTeacher(teacher)
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    seen = {
        "rank": rank,
        "world": world,
        "student_head": [],
        "teacher_head": type(source.head.weight).__name__,
        "head_shape": [],
        "loss": [],
    }
    for _ in range(STEPS):
        labels = batch["labels"]
        index = target_index(labels)
        hidden = final_hidden(student, batch["input_ids"], batch["attention_mask"])
        rows = target_rows(hidden, index)
        targets = labels[:, 1:].reshape(-1).index_select(0, index)
        signal = source.signal(batch)
        count = torch.tensor(float(index.numel()))
        if world > 1:
            dist.all_reduce(count)  # the global number of target tokens (Trainer's num_items_in_batch)
        raw = output_head(student)
        seen["student_head"].append(type(raw.weight).__name__)
        seen["head_shape"].append(
            list(raw.weight.to_local().shape if isinstance(raw.weight, DTensor) else raw.weight.shape)
        )
        loss, _ = chunked_kd_loss(
            rows,
            full_head(raw),
            targets,
            signal,
            divergence=divergence,
            alpha=0.2,
            divergence_kwargs=PARAMS.get(divergence, {}),
            normalizer=count,
            chunk_size=7,
        )
        (loss * world).backward()  # FSDP2 averages gradients over ranks; the loss is already globally normalized
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen["loss"].append(float(loss.detach()))
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        infos = [None] * world
        dist.all_gather_object(infos, seen)
    else:
        state, infos = student.state_dict(), [seen]
    if rank == 0:
        # clone: tied weights are one tensor under two names, which safetensors refuses
        save_file(
            {k: v.detach().clone().contiguous() for k, v in state.items()}, os.path.join(out, "student.safetensors")
        )
        # A consolidated Hugging Face checkpoint: a fresh unsharded model of the same config, the gathered weights.
        fresh = make_student(tok, tied == "tied")
        fresh.load_state_dict(state)
        fresh.save_pretrained(os.path.join(out, "hf"))
        with open(os.path.join(out, "info.json"), "w") as f:
            json.dump(infos, f)
    end_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
