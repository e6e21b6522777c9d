"""``potstill condense`` for causal LMs (a recipe with ``kind: causal_lm``; experimental).

The verb around :mod:`potstill.dd.condense_lm`: gradient matching of the forward-KL KD loss into
``sequences`` soft-prompt sequences of ``length`` tokens, for the recipe's student and teacher (the
distill sections ``teacher``, ``student``, ``data``; they must share the tokenizer and the
embedding width, e.g. a student pruned from the teacher).

1. The pool is distill's train split. Real batches for matching: ``real_batch`` pool sequences
   (prompt + response, right-padded), cycled. The set starts from a ``length``-token window of
   ``sequences`` seeded pool examples (``init: real``; ``window: end``, the default, keeps the last
   tokens, the end of the response; ``start`` the chat header and prompt) or from random text
   tokens (``random``); special tokens and padding stay fixed.
2. :func:`~potstill.dd.condense_lm.condense_lm` for ``outer_steps``. ``theta: student`` matches
   gradients at the student's own starting weights (the student that will be trained); ``fresh``
   re-draws them every outer step (Zhao et al. 2021, for students trained from scratch).
3. Writes ``soft_prompts.safetensors`` + ``soft_prompts.json`` (the set, its matching history),
   ``condensed_text.jsonl`` (nearest-token projection, one ``{"text"}`` per sequence) and
   ``condense_report.json``.
4. ``evaluate`` (optional): fresh copies of the student are trained for the same steps on the
   condensed set, on its own start (the set before condensing) and on ``seeds`` random real
   subsets of ``sequences`` pool sequences cut to the same window (the same size); held-out
   forward KL to the teacher on the recipe's eval split (all tokens), and the gain over random.

Why experimental: see :mod:`potstill.dd.condense_lm`. On tiny models the set beats the untrained
student; it has not been shown to beat a random real subset of its size.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError

from ..config import DataConfig, FromTeacherStudent, StudentConfig, TeacherConfig
from ..errors import PotstillError
from ..io import atomic_write_json, atomic_write_text
from . import condense_recipe as cr

__all__ = ["CondenseLMRecipe", "load_condense_lm_recipe", "run_condense_lm"]

REPORT = "condense_report.json"
TEXT = "condensed_text.jsonl"


class CondenseLMSettings(cr._Strict):
    sequences: int = Field(8, ge=1, description="Soft-prompt sequences in the set.")
    length: int = Field(32, ge=2, description="Tokens per sequence.")
    init: Literal["real", "random"] = Field(
        "real", description="Start from a `length`-token window of seeded pool examples, or from random text tokens."
    )
    window: Literal["end", "start"] = Field(
        "end",
        description="Which tokens of a real example a window keeps: the "
        "last `length` (the end of the response) or the first (the chat "
        "header and prompt). Also the random real subsets of the evaluation.",
    )
    labels: Literal["teacher", "learned"] = Field(
        "teacher", description="Targets: the teacher on the current embeddings, or free logits started from it."
    )
    theta: Literal["student", "fresh"] = Field(
        "student",
        description="Match gradients at the student's own weights, or at freshly drawn ones every outer step.",
    )
    outer_steps: int = Field(40, ge=1, description="Outer steps (one set update per inner step).")
    inner_steps: int = Field(1, ge=1, description="Set updates per outer step (theta trained on the set between).")
    net_steps: int = Field(1, ge=1, description="SGD steps of theta on the set between inner steps.")
    lr_embed: float = Field(1e-3, gt=0.0, description="Adam lr of the soft-prompt embeddings.")
    lr_label: float = Field(1e-2, gt=0.0, description="Adam lr of learned label logits.")
    lr_net: float = Field(1e-2, gt=0.0, description="SGD lr of theta between inner steps.")
    reg_weight: float = Field(
        0.1, ge=0.0, description="Weight of the latent-space regularizer (distance to the nearest token embedding)."
    )
    real_batch: int = Field(8, ge=1, description="Pool sequences per real matching batch.")
    seed: int = Field(0, description="Seed of the initial examples, the random tokens and fresh thetas.")


class CondenseLMEval(cr._Strict):
    steps: int = Field(50, ge=1, description="Adam steps of every evaluated student (each arm).")
    lr: float = Field(1e-3, gt=0.0, description="Adam lr of every evaluated student.")
    seeds: int = Field(3, ge=1, description="Random real subsets of the set's size (one per seed).")


class CondenseLMRecipe(cr._Strict):
    kind: Literal["causal_lm"] = Field(
        ...,
        description="causal_lm: soft prompts for an LLM student (without it, condense learns a classification set).",
    )
    output_dir: str = Field("runs/condense_lm", description="Where the set, its text and the report go.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher (as in distill).")
    student: StudentConfig = Field(
        default_factory=FromTeacherStudent,
        description="The student (as in distill); it must share the teacher's tokenizer and embedding width.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="The distill data section: pool and held-out.")
    seed: int = Field(0, description="distill's train.seed: the initial weights of a scaled student.")
    condense: CondenseLMSettings = Field(default_factory=CondenseLMSettings, description="The set and its matching.")
    evaluate: CondenseLMEval | None = Field(
        default_factory=CondenseLMEval,
        description="Students trained on the set vs random real subsets of its size (null: skip).",
    )
    device: str | None = Field(None, description="torch device; default: cuda if available, else cpu.")

    def distill_recipe(self):
        from ..config import Recipe

        return Recipe.model_validate(
            {
                "output_dir": self.output_dir,
                "teacher": self.teacher.model_dump(mode="json"),
                "student": self.student.model_dump(mode="json"),
                "data": self.data.model_dump(mode="json"),
                "train": {"seed": self.seed},
                "runs": [{"name": "kd", "alpha": 0.0}],
                "device": self.device,
            }
        )


def load_condense_lm_recipe(data: dict, base_dir: Path | None = None) -> CondenseLMRecipe:
    """A validated recipe from a dict (overrides applied); data paths resolve as in distill."""
    from ..config import format_validation_error, recipe_from_dict

    try:
        recipe = CondenseLMRecipe.model_validate(data)
        if recipe.teacher.model is None:
            raise PotstillError("teacher.model is null: the soft prompts' labels are the teacher's; name a teacher")
        recipe.distill_recipe()
    except ValidationError as err:
        raise PotstillError(format_validation_error(err, data, "condense")) from None
    recipe.data = recipe_from_dict({"data": recipe.data.model_dump(mode="json")}, base_dir=base_dir).data
    return recipe


def _pad(
    seqs: list[list[int]], pad_id: int, length: int | None = None, window: str = "start"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``, cut to ``length`` tokens when given (the first
    ones, or with ``window="end"`` the last ones)."""
    seqs = [(s[-length:] if window == "end" else s[:length]) if length else s for s in seqs]
    width = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def run_condense_lm(recipe: CondenseLMRecipe) -> dict:
    """Condense, save, export as text, evaluate (module docstring); returns the report."""
    from ..generate import pad_id as pad_id_of
    from ..pipeline import Prepared
    from .condense import fresh_init, text_candidates
    from .condense_lm import check_pair, condense_lm, evaluate_lm_set, init_soft_prompts, random_soft_prompts

    t_start = time.perf_counter()
    c = recipe.condense
    prep = Prepared(recipe.distill_recipe())
    check_pair(prep.student0, prep.teacher)
    pool, held = prep.pool_examples, prep.eval_examples
    if c.sequences > len(pool):
        raise PotstillError(
            f"condense.sequences={c.sequences} is more than the pool's {len(pool)} examples; lower it or raise the data"
        )
    if recipe.evaluate is not None and not held:
        raise PotstillError("the held-out split is empty; raise data.eval_size or set evaluate: null")
    pad = pad_id_of(prep.tokenizer)
    device = prep.device
    student, teacher = prep.student0, prep.teacher
    E = student.get_input_embeddings().weight.detach()
    cand = text_candidates(prep.tokenizer, E.shape[0]).to(E.device)
    g = torch.Generator().manual_seed(c.seed)
    order = torch.randperm(len(pool), generator=g).tolist()
    batches = [
        tuple(t.to(device) for t in _pad([pool[i]["input_ids"] for i in order[j : j + c.real_batch]], pad))
        for j in range(0, len(order), c.real_batch)
    ]
    if c.init == "real":
        ids, mask = _pad([pool[i]["input_ids"] for i in order[: c.sequences]], pad, c.length, c.window)
        syn = init_soft_prompts(
            ids.to(device),
            mask.to(device),
            E,
            special_ids=prep.tokenizer.all_special_ids,
            labels=c.labels,
            teacher=teacher,
        )
    else:
        syn = random_soft_prompts(
            c.sequences, c.length, E, candidates=cand, seed=c.seed, labels=c.labels, teacher=teacher
        )
    start = copy.deepcopy(syn)
    if c.theta == "student":
        own = {n: p.detach().clone() for n, p in student.named_parameters()}
        init_fn, n_inits = (lambda seed: own), 1
    else:
        init_fn, n_inits = fresh_init(student), None
    t0 = time.perf_counter()
    out_set = condense_lm(
        student,
        teacher,
        batches,
        syn,
        outer_steps=c.outer_steps,
        inner_steps=c.inner_steps,
        net_steps=c.net_steps,
        lr_embed=c.lr_embed,
        lr_label=c.lr_label,
        lr_net=c.lr_net,
        init_fn=init_fn,
        n_inits=n_inits,
        reg_weight=c.reg_weight,
        candidates=cand,
        seed=c.seed,
    )
    construction_s = time.perf_counter() - t0
    texts = out_set.to_text(prep.tokenizer, E, candidates=cand)

    evaluation = None
    if recipe.evaluate is not None:
        ev = recipe.evaluate
        eval_batches = [
            tuple(t.to(device) for t in _pad([x["input_ids"] for x in held[j : j + 8]], pad))
            for j in range(0, len(held), 8)
        ]
        common = {"steps": ev.steps, "lr": ev.lr}
        arms = {
            "condensed": evaluate_lm_set(student, teacher, out_set, eval_batches, **common),
            "start": evaluate_lm_set(student, teacher, start, eval_batches, **common),
        }
        rnd = []
        for s in range(ev.seeds):
            pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + s))[: c.sequences]
            real = tuple(t.to(device) for t in _pad([pool[int(i)]["input_ids"] for i in pick], pad, c.length, c.window))
            rnd.append(evaluate_lm_set(student, teacher, real, eval_batches, seed=s, **common)["forward_kl"])
        base = statistics.fmean(rnd)
        evaluation = {
            "untrained_forward_kl": arms["condensed"]["forward_kl_init"],
            "condensed_forward_kl": arms["condensed"]["forward_kl"],
            "start_forward_kl": arms["start"]["forward_kl"],
            "random_real_forward_kl": {
                "mean": base,
                "std": statistics.stdev(rnd) if len(rnd) > 1 else 0.0,
                "values": rnd,
            },
            "gain_vs_random_pct": 100.0 * (base - arms["condensed"]["forward_kl"]) / base if base else None,
            "steps": ev.steps,
            "lr": ev.lr,
        }

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_set.meta["construction_s"] = construction_s
    out_set.save(out)
    atomic_write_text(out / TEXT, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    hist = out_set.history["match"]
    report = cr._finite(
        {
            "kind": "causal_lm",
            "sequences": c.sequences,
            "length": c.length,
            "pool": len(pool),
            "construction_s": construction_s,
            "match_first": hist[0],
            "match_last": hist[-1],
            "evaluation": evaluation,
            "total_s": time.perf_counter() - t_start,
            "paths": {
                "set": str(out / "soft_prompts.safetensors"),
                "text": str(out / TEXT),
                "report": str(out / REPORT),
            },
            "recipe": recipe.model_dump(mode="json"),
        }
    )
    atomic_write_json(out / REPORT, report)
    return report
