"""Distilled / selected SST-2 training sets vs DiLM's published sets, under one fixed protocol.

Claim checked (the issue's goal): potstill's best arm beats the published DiLM synthetic
sets (Maekawa et al. 2024) at every budget (5, 10, 20 examples per class) when every arm is
judged by the *same* learner, steps, optimizer and seeds. The answer is printed and written
as measured, whatever it is.

Protocol (``potstill.dd.protocol``):

* pool: 5,000 sentences of ``sst2/train.tsv`` (seeded); each set index ``s`` works on its own
  random half of the pool (2,500), so that deterministic selectors give ``--sets`` (default 10) different sets;
* eval: 872 sentences of ``sst2/dev.tsv`` (seeded shuffle, first 872). Hyper-parameters (learner
  lr, the selection rule, the condensation settings) were chosen on the *next* 872 of that shuffle,
  never on the eval sentences;
* learner: all-MiniLM-L6-v2 (potstill's ``TextClassifier``: encoder + mean pooling + dropout +
  linear head), seed = set index, one of two presets (``--learner``; each of its settings can be
  overridden by its own flag):

  - ``probe`` (default): ``--trainable-layers 0`` (frozen encoder, a fresh linear head; 1 layer
    costs ~14 s CPU per learner here instead of ~0.5 s), 100 AdamW steps, lr 1e-2, batch 16,
    warmup 10 % then linear decay (``--schedule linear``);
  - ``finetune``: DiLM's learner protocol (Maekawa et al. 2024: 200 steps, AdamW lr 1e-4, batch 16,
    warmup then cosine decay) on potstill's MiniLM learner: all 6 encoder layers trained
    (``--trainable-layers 6``), 200 steps, lr 1e-4, batch 16, warmup 10 % then cosine decay to 0
    (``--schedule cosine``, transformers' ``get_cosine_schedule_with_warmup``). The word and
    position embeddings stay frozen (they are the cached features), whereas DiLM fine-tunes
    BERT-base including its embeddings. Default output ``results/dd_sst2_finetune.json``;
* labels: hard (the set's labels) or soft (the teacher's class probabilities on the set's own
  inputs). Teacher: the same learner (with ``probe``, the MiniLM with a linear head) trained on the
  whole 5,000-sentence pool (500 steps, batch 64, the learner's lr, linear schedule): the learner's
  full-pool reference.

Arms (``construction_s``: seconds to build one set, CPU of this process):

* ``random``: a random real subset per class (DiLM's baseline);
* ``kcenters``: k-means medoids per class over MiniLM sentence embeddings (DiLM's "K-centers"
  coreset; ``potstill.dd.diversity.kmeans_medoids``);
* ``herding``: herding per class over the same embeddings (``potstill.dd.diversity.herding``);
* ``dilm``: DiLM's published sets ``dpc_{b}/set_{s}`` (``s = 0 .. sets-1``), as text;
* ``potstill_select``: teacher-aware selection: per class, only pool sentences the teacher
  labels correctly with probability >= 0.9, then herding over their embeddings;
* ``potstill_condense_emb``: trajectory matching (``potstill.dd.condense``) in input-embedding
  space, started from the ``random`` arm's set of the same index, fed to the learner as
  ``inputs_embeds``; ``potstill_condense_text``: its nearest-token text projection;
  ``potstill_condense_emb`` with ``learned`` labels: its own condensed soft labels.
  Condensed embedding sets are specific to this learner's embedding space, not text.

``--arms`` picks a subset of these (default all; ``random`` is required: every gain is over it).
Without both condensation arms, no experts are trained and no condensation runs (the costly part
with a fine-tuned learner); the verdict against DiLM needs ``dilm`` and at least one potstill arm.

Embeddings for k-means / herding / selection are the learner's frozen mean-pooled MiniLM
features, L2-normalized: the all-MiniLM-L6-v2 sentence embedding (``embed_texts``) at
``max_length=48`` instead of 256, computed once with the learner's features.

Usage: ``python benchmarks/dd_sst2.py [--quick] [--sets N] [--budgets 5,10,20] [--learner probe|finetune]
[--arms random,dilm,...] [--out PATH]``.
Writes JSON, prints one line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Partial, summary_line, write_json_atomic

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "dd_sst2.json"
FINETUNE_OUT = HERE / "results" / "dd_sst2_finetune.json"

ARMS = (
    "random",
    "kcenters",
    "herding",
    "dilm",
    "potstill_select",
    "potstill_condense_emb",
    "potstill_condense_text",
)
CONDENSE_ARMS = ("potstill_condense_emb", "potstill_condense_text")
# --learner presets: trainable_layers, steps, lr, batch_size, schedule (each overridable by its own flag)
LEARNERS = {
    "probe": {"trainable_layers": 0, "steps": 100, "lr": 1e-2, "batch_size": 16, "schedule": "linear"},
    # DiLM's protocol (Maekawa et al. 2024) on MiniLM: every encoder layer; the embeddings stay frozen
    "finetune": {"trainable_layers": 6, "steps": 200, "lr": 1e-4, "batch_size": 16, "schedule": "cosine"},
}

TEXT_ARMS = ("random", "kcenters", "herding", "dilm", "potstill_select", "potstill_condense_text")
POTSTILL_ARMS = ("potstill_select", "potstill_condense_emb", "potstill_condense_text")


class Clock:
    """CPU seconds of this process (immune to other users of a shared machine) and wall seconds."""

    def __enter__(self):
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.c0, time.perf_counter() - self.w0


def pooled(feats):
    """Mean-pooled features as ``[N, 1, H]`` with an all-ones mask: for a top with no encoder layer
    (``trainable_layers=0``) this is exactly what it computes first, at 1/S of the memory."""
    import torch

    from potstill.dd.protocol import Features

    m = feats.mask.float()[..., None]
    p = (feats.hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return Features(p[:, None, :].contiguous(), torch.ones(len(feats), 1, dtype=torch.long), feats.labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small pool/eval, 2 sets, few iterations")
    p.add_argument("--sets", type=int, default=None, help="sets per arm and budget (default 10; --quick 2)")
    p.add_argument("--budgets", default=None, help="examples per class, comma-separated (default 5,10,20)")
    p.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT}; --quick: /tmp)")
    p.add_argument("--pool", type=int, default=5000, help="training-pool sentences drawn from train.tsv")
    p.add_argument("--eval-size", type=int, default=872, help="dev sentences evaluated")
    p.add_argument(
        "--learner",
        choices=tuple(LEARNERS),
        default="probe",
        help="learner preset: probe (0 layers, 100 steps, lr 1e-2, linear) or finetune "
        "(DiLM's protocol: 6 layers, 200 steps, lr 1e-4, cosine); the flags below override it",
    )
    p.add_argument("--steps", type=int, default=None, help="learner steps (every arm; default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="learner learning rate (AdamW; default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="learner batch size (default: the preset's)")
    p.add_argument("--max-length", type=int, default=48, help="tokens per sentence")
    p.add_argument(
        "--trainable-layers", type=int, default=None, help="top encoder layers the learner trains (default: preset's)"
    )
    p.add_argument(
        "--schedule",
        choices=("linear", "cosine"),
        default=None,
        help="learner lr schedule after a 10 %% warmup (default: the preset's)",
    )
    p.add_argument(
        "--teacher",
        choices=("learner", "probe"),
        default="learner",
        help="the full-pool teacher (selection rule, soft labels): the learner itself (default) or, under "
        "--learner finetune, the probe (linear head on frozen MiniLM, lr 1e-2): the sets are then built as "
        "under the probe protocol and only judged by the fine-tuned learner (and 30 CPU-min of teacher saved)",
    )
    p.add_argument("--labels", default="hard,soft", help="label kinds judged: hard, soft or both (default)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)} (default all)")
    p.add_argument("--condense", choices=("tm", "gm"), default="tm", help="trajectory or gradient matching")
    p.add_argument("--iterations", type=int, default=None, help="condensation iterations (default 40; --quick 4)")
    p.add_argument("--save-dir", default=None, help="also save every condensed set here (save_condensed)")
    args = p.parse_args(argv)
    for key, value in LEARNERS[args.learner].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ARMS]
    if unknown or "random" not in chosen:
        why = f"unknown {','.join(unknown)}" if unknown else "random is required (every gain is over it)"
        p.error(f"--arms: {why}; choose from {','.join(ARMS)}")
    condense = any(a in chosen for a in CONDENSE_ARMS)
    label_kinds = [k.strip() for k in args.labels.split(",") if k.strip()]
    if not label_kinds or any(k not in ("hard", "soft") for k in label_kinds):
        p.error(f"--labels {args.labels}: use hard, soft or hard,soft")
    sets = args.sets or (2 if args.quick else 10)
    budgets = [int(b) for b in (args.budgets or ("5,10" if args.quick else "5,10,20")).split(",")]
    pool_n = 600 if args.quick else args.pool
    eval_n = 200 if args.quick else args.eval_size
    iterations = args.iterations or (4 if args.quick else 40)
    finetune = args.learner == "finetune"
    if args.out:
        out_path = Path(args.out)
    elif args.quick:
        out_path = Path("/tmp/dd_sst2_finetune_quick.json" if finetune else "/tmp/dd_sst2_quick.json")
    else:
        out_path = FINETUNE_OUT if finetune else DEFAULT_OUT
    # every finished set is kept beside the output: a killed run resumes at the next set
    # schema 2: every learner's per-example scores are kept (the verdicts); an older partial file starts afresh
    partial = Partial(out_path, {"schema": 2, **{k: v for k, v in vars(args).items() if k not in ("out", "save_dir")}})

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from potstill.data.classification import load_dilm_set, load_sst2
    from potstill.dd.condense import (
        RealData,
        gradient_matching,
        init_from_ids,
        save_condensed,
        text_candidates,
        train_experts,
        trajectory_matching,
    )
    from potstill.dd.diversity import herding, kmeans_medoids, per_class
    from potstill.dd.protocol import (
        SplitLearner,
        compare_arms,
        evaluate_features,
        evaluate_set,
        predict_features,
        train_top,
    )
    from potstill.models.classifier import TextClassifier, load_encoder

    total = Clock().__enter__()
    encoder, tokenizer = load_encoder("all-minilm-l6-v2")
    model = TextClassifier(encoder, tokenizer, num_labels=2, seed=0)
    learner = SplitLearner.from_classifier(model, trainable_layers=args.trainable_layers, max_length=args.max_length)
    probe = args.trainable_layers == 0
    E = learner.embedding_matrix

    train_all = load_sst2("train")
    pool = random.Random(0).sample(train_all, pool_n)
    dev = load_sst2("dev")
    random.Random(0).shuffle(dev)
    eval_set = dev[:eval_n]

    setup: dict = {}
    with Clock() as c:
        pool_f = learner.features(pool)
        eval_f = learner.features(eval_set)
        emb_source = pooled(pool_f) if probe else pooled(learner_full_features(learner, pool, model))
        if probe:
            pool_f, eval_f = emb_source, pooled(eval_f)
    setup["features_cpu_s"], setup["features_wall_s"] = c.cpu, c.wall
    emb = torch.nn.functional.normalize(emb_source.hidden[:, 0], dim=-1)
    labels = pool_f.labels

    probe_teacher = not probe and args.teacher == "probe"
    t_learner = (
        SplitLearner.from_classifier(model, trainable_layers=0, max_length=args.max_length)
        if probe_teacher
        else learner
    )
    with Clock() as c:
        t_pool_f = emb_source if probe_teacher else pool_f  # emb_source: the frozen encoder's pooled pool features
        t_eval_f = pooled(t_learner.features(eval_set)) if probe_teacher else eval_f
        teacher = t_learner.new_top(10_000)
        teacher_steps = 60 if args.quick else 500
        t_lr = LEARNERS["probe"]["lr"] if probe_teacher else args.lr
        train_top(teacher, t_pool_f, steps=teacher_steps, lr=t_lr, batch_size=64, seed=0)  # linear schedule
        teacher_probs = predict_features(teacher, t_pool_f)
    setup["teacher_cpu_s"] = c.cpu
    teacher_eval = evaluate_features(teacher, t_eval_f)
    protocol = {
        "learner": learner,
        "eval_examples": eval_f,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "schedule": args.schedule,
    }
    full_pool = evaluate_set(pool_f, seed=0, **protocol)

    confident = (teacher_probs.argmax(-1) == labels) & (teacher_probs[torch.arange(len(labels)), labels] >= 0.9)
    candidates = text_candidates(tokenizer, E.shape[0])
    real_all = RealData(torch.zeros(len(pool_f), 1, dtype=torch.long), pool_f.mask, labels, features=pool_f.hidden)

    def init_fn(seed):
        return {n: p.detach().clone() for n, p in learner.new_top(seed).named_parameters()}

    def soft_of(train):
        """Teacher probabilities on the set's own inputs (text or embeddings) and its features."""
        feats = learner.features(train)
        if probe:
            feats = pooled(feats)
        t_feats = pooled(t_learner.features(train)) if probe_teacher else feats
        return feats, predict_features(teacher, t_feats)

    results: dict = {b: {"hard": {}, "soft": {}} for b in budgets}
    learned: dict = {b: [] for b in budgets}
    build: dict = {b: {} for b in budgets}
    history: dict = {b: [] for b in budgets}
    examples_text: dict = {}
    for s in range(sets):
        if f"set{s}" in partial:
            _restore(partial[f"set{s}"], results, build, learned, history, examples_text)
            print(f"set {s}: restored from {partial.path}", flush=True)
            continue
        unit: dict = {"results": [], "build": [], "learned": [], "history": [], "examples": {}}
        g = torch.Generator().manual_seed(s)
        sub = torch.randperm(len(pool), generator=g)[: len(pool) // 2]
        real_s = RealData(
            real_all.input_ids[sub], real_all.attention_mask[sub], labels[sub], features=real_all.features[sub]
        )
        experts = None
        if condense and args.condense == "tm":
            with Clock() as ce:
                experts = train_experts(
                    learner.new_top(0),
                    real_s,
                    E,
                    init_fn=init_fn,
                    n_experts=5,
                    steps=20 if args.quick else 100,
                    save_every=5 if args.quick else 10,
                    lr=0.5,
                    batch_size=32,
                    seed=s,
                )
        for b in budgets:
            arms: dict = {}
            times: dict = {}
            with Clock() as c:
                gen = torch.Generator().manual_seed(1000 * s + b)
                idx = torch.cat(
                    [
                        (labels[sub] == k)
                        .nonzero()
                        .flatten()[torch.randperm(int((labels[sub] == k).sum()), generator=gen)[:b]]
                        for k in (0, 1)
                    ]
                )
                arms["random"] = [pool[int(sub[i])] for i in idx]
            times["random"] = c.cpu
            with Clock() as c:
                idx = per_class(kmeans_medoids, emb[sub], labels[sub], b, seed=s)
                arms["kcenters"] = [pool[int(sub[i])] for i in idx]
            times["kcenters"] = c.cpu
            with Clock() as c:
                idx = per_class(herding, emb[sub], labels[sub], b)
                arms["herding"] = [pool[int(sub[i])] for i in idx]
            times["herding"] = c.cpu
            arms["dilm"] = load_dilm_set(b, s)
            with Clock() as c:
                keep = sub[confident[sub]]
                idx = per_class(herding, emb[keep], labels[keep], b)
                arms["potstill_select"] = [pool[int(keep[i])] for i in idx]
            times["potstill_select"] = c.cpu  # + the teacher, trained once: setup.teacher_cpu_s
            if condense:  # condensation, started from this index's random set
                with Clock() as c:
                    enc = tokenizer(
                        [e.text for e in arms["random"]],
                        padding=True,
                        truncation=True,
                        max_length=args.max_length,
                        return_tensors="pt",
                    )
                    syn = init_from_ids(
                        enc["input_ids"],
                        enc["attention_mask"],
                        torch.tensor([e.label for e in arms["random"]]),
                        E,
                        num_classes=2,
                        special_ids=tokenizer.all_special_ids,
                    )
                    common = {
                        "prefix": learner.prefix,
                        "candidates": candidates,
                        "reg_weight": 1.0,
                        "reg_kind": "cosine",
                        "lr_embed": 5e-2,
                        "lr_label": 1e-2,
                        "seed": s,
                    }
                    if args.condense == "tm":
                        cs = trajectory_matching(
                            learner.new_top(0),
                            experts,
                            syn,
                            E,
                            iterations=iterations,
                            syn_steps=20,
                            expert_span=2,
                            syn_lr=0.5,
                            **common,
                        )
                    else:
                        cs = gradient_matching(
                            learner.new_top(0),
                            real_s,
                            syn,
                            E,
                            init_fn=init_fn,
                            iterations=iterations,
                            inner_steps=2,
                            real_batch=128,
                            **common,
                        )
                times["potstill_condense_emb"] = c.cpu + (ce.cpu if experts is not None else 0.0)
                history[b].append([round(v, 5) for v in cs.history["match"]])
                unit["history"].append([b, history[b][-1]])
                with Clock() as c2:
                    arms["potstill_condense_text"] = cs.to_text(tokenizer, E, candidates=candidates)
                times["potstill_condense_text"] = times["potstill_condense_emb"] + c2.cpu
                arms["potstill_condense_emb"] = cs
                if args.save_dir:
                    save_condensed(cs, Path(args.save_dir) / f"dpc{b}_set{s}")
            if s == 0:
                names = {
                    "init": "random",
                    "projected": "potstill_condense_text",
                    "dilm": "dilm",
                    "potstill_select": "potstill_select",
                }
                examples_text[b] = {
                    key: [e.text for e in arms[arm][:3]] + [e.text for e in arms[arm][b : b + 3]]
                    for key, arm in names.items()
                    if arm in arms
                }
                unit["examples"][str(b)] = examples_text[b]
            arms = {arm: data for arm, data in arms.items() if arm in chosen}
            for arm, data in arms.items():
                feats, soft = soft_of(data)
                if arm == "potstill_condense_emb":
                    cs_feats = feats
                for kind in label_kinds:
                    r = evaluate_set(
                        feats,
                        seed=s,
                        labels=kind,
                        soft_labels=soft if kind == "soft" else None,
                        per_example=True,
                        **protocol,
                    )
                    # 6 decimals keep the partial file small (the verdicts use the same values either way)
                    r["per_example"]["nll"] = [round(v, 6) for v in r["per_example"]["nll"]]
                    results[b][kind].setdefault(arm, []).append(r)
                    unit["results"].append([b, kind, arm, r])
                build[b].setdefault(arm, []).append(times.get(arm, 0.0))
                unit["build"].append([b, arm, times.get(arm, 0.0)])
            if "potstill_condense_emb" in arms:
                learned[b].append(
                    evaluate_set(cs_feats, seed=s, labels="soft", soft_labels=cs.soft_labels(), **protocol)
                )
                unit["learned"].append([b, learned[b][-1]])
            acc = {arm: round(results[b][label_kinds[0]][arm][-1]["accuracy"], 3) for arm in arms}
            print(f"set {s} budget {b}: {label_kinds[0]} {acc} ({total_cpu(total):.0f} s CPU so far)", flush=True)
        partial.put(f"set{s}", unit)

    table: dict = {}
    verdict: dict = {}
    ours = [a for a in POTSTILL_ARMS if a in chosen]
    ours_text = [a for a in ("potstill_select", "potstill_condense_text") if a in chosen]
    for b in budgets:
        table[b] = {}
        for kind in label_kinds:
            cons = {arm: v for arm, v in build[b].items() if arm != "dilm"}
            table[b][kind] = compare_arms(results[b][kind], baseline="random", construction_s=cons)
        if learned[b]:
            table[b]["learned"] = compare_arms({"potstill_condense_emb": learned[b]}, baseline=None)
        if "dilm" not in chosen or not ours:
            verdict[b] = None  # nothing to compare: --arms left out dilm or every potstill arm
            continue
        rows = [(table[b][k][a]["mean"], a, k) for k in label_kinds for a in ours]
        if learned[b]:
            rows.append((table[b]["learned"]["potstill_condense_emb"]["mean"], "potstill_condense_emb", "learned"))
        best_mean, best_arm, best_kind = max(rows)
        same_kind = "soft" if best_kind == "learned" else best_kind
        dilm = table[b][same_kind]["dilm"]
        dilm_best = max(table[b][k]["dilm"]["mean"] for k in label_kinds)
        best_text = (
            max((table[b][k][a]["mean"], a, k) for k in label_kinds for a in ours_text)
            if ours_text
            else (None, None, None)
        )
        verdict[b] = {
            "best_arm": best_arm,
            "best_labels": best_kind,
            "best_mean": best_mean,
            "dilm_mean_same_labels": dilm["mean"],
            "delta_vs_dilm_same_labels": best_mean - dilm["mean"],
            "dilm_best_mean": dilm_best,
            "beats_dilm_best": best_mean > dilm_best,
            "best_text_arm": best_text[1],
            "best_text_labels": best_text[2],
            "best_text_mean": best_text[0],
            "best_text_beats_dilm_best": None if best_text[0] is None else best_text[0] > dilm_best,
        }
    verdicts = verdict_rows(results, budgets, label_kinds, chosen)
    total.__exit__()
    for b in budgets:
        for kind in table[b]:
            for row in table[b][kind].values():
                row["values"] = [round(v, 4) for v in row["values"]]
    data = {
        "setup": {
            "pool": pool_n,
            "eval": eval_n,
            "sets": sets,
            "budgets": budgets,
            "steps": args.steps,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "trainable_layers": args.trainable_layers,
            "schedule": args.schedule,
            "warmup_fraction": 0.1,
            "learner_preset": args.learner,
            "arms": chosen,
            "labels": label_kinds,
            "teacher_kind": "probe" if probe or probe_teacher else "learner",
            "learner": learner.name,
            "condense": {
                "method": args.condense,
                "iterations": iterations,
                "syn_steps": 20,
                "expert_span": 2,
                "experts": 5,
                "expert_steps": 100,
                "save_every": 10,
                "expert_lr": 0.5,
                "syn_lr_init": 0.5,
                "lr_embed": 5e-2,
                "lr_label": 1e-2,
                "reg_weight": 1.0,
                "reg_kind": "cosine",
                "init": "the random arm's set of the same index",
            },
            "select": "teacher p(label) >= 0.9 and correct, then per-class herding",
            "teacher": {
                "what": "same learner, linear head on the whole pool, 500 steps, batch 64"
                if probe
                else f"the probe (linear head on the frozen encoder) on the whole pool, {teacher_steps} steps, batch 64, lr 1e-2"
                if probe_teacher
                else f"same learner ({learner.name}) on the whole pool, {teacher_steps} steps, batch 64, lr {args.lr}, linear",
                **{k: teacher_eval[k] for k in ("accuracy", "macro_f1", "ece")},
            },
            "full_pool_protocol_accuracy": full_pool["accuracy"],
            "quick": args.quick,
            "torch_threads": torch.get_num_threads(),
            **setup,
        },
        "results": {str(b): table[b] for b in budgets},
        "vs_dilm": {str(b): verdict[b] for b in budgets},
        "verdicts": verdicts,
        "goal_met": None if None in verdict.values() else all(v["beats_dilm_best"] for v in verdict.values()),
        "goal_met_with_text_arm": None
        if None in verdict.values() or not ours_text
        else all(v["best_text_beats_dilm_best"] for v in verdict.values()),
        "condense_match_history": {str(b): history[b] for b in budgets},
        "examples": {str(b): v for b, v in examples_text.items()},
        "cpu_s": total.cpu,
        "wall_s": total.wall,
    }
    write_json_atomic(out_path, data)
    partial.finish()
    items = {}
    for b in budgets:
        v = verdict[b]
        if v is not None:
            items[f"b{b}_best"] = f"{v['best_arm']}/{v['best_labels']}:{v['best_mean']:.3f}"
            items[f"b{b}_dilm"] = round(v["dilm_best_mean"], 3)
        items[f"b{b}_random"] = round(table[b][label_kinds[0]]["random"]["mean"], 3)
    for c in verdicts["rows"]:
        if c["arm"] == "potstill_select" and c["metric"].startswith("accuracy/"):
            _, b, kind = c["metric"].split("/")
            items[f"b{b}_{kind}_select_vs_{c['baseline']}"] = f"{100 * c['difference']:+.1f}pts:{c['verdict']}"
    items.update(
        learner=f"{args.learner}/{args.schedule}",
        goal_met=data["goal_met"],
        text_goal_met=data["goal_met_with_text_arm"],
        cpu_min=round(total.cpu / 60, 1),
        out=str(out_path),
    )
    print(summary_line("dd_sst2", items))
    return 0


def verdict_rows(results: dict, budgets: list[int], label_kinds: list[str], chosen: list[str]) -> dict:
    """Every arm against ``random``, and ``potstill_select`` against each other selection arm and DiLM, per
    budget, label kind and per-example metric (accuracy, the gold class's NLL): the paired difference over the
    sets (set index ``s`` = one pool half and learner seed shared by every arm) x the held-out sentences, its
    interval and *better / worse / no difference* after Holm over every row (:mod:`potstill.eval.verdict`, the
    statistics of ``potstill compare``). Every arm trains the same learner steps on a set of the same size, so
    they are compared at equal training cost; construction cost is in ``results``."""
    import numpy as np

    from potstill.eval.cls_metrics import EXAMPLE_METRICS
    from potstill.eval.verdict import compare_arms as verdicts

    scores, lower = {}, {}
    for b in budgets:
        for kind in label_kinds:
            for metric, low in EXAMPLE_METRICS.items():
                key = f"{metric}/{b}/{kind}"
                scores[key] = {
                    arm: np.array([r["per_example"][metric] for r in rows], dtype=np.float64)
                    for arm, rows in results[b][kind].items()
                }
                lower[key] = low
    pairs = [(a, "random") for a in chosen if a != "random"]
    if "potstill_select" in chosen:
        pairs += [("potstill_select", a) for a in ("kcenters", "herding", "dilm") if a in chosen]
    rows = verdicts(scores, "random", lower_better=lower, level=0.95, pairs=pairs)
    return {
        "level": 0.95,
        "family": f"Holm over all {len(rows)} rows (metric/budget/labels x pairs)",
        "rows": [{**c.as_dict(), "per_seed": [round(v, 5) for v in c.per_seed]} for c in rows],
    }


def _restore(unit: dict, results: dict, build: dict, learned: dict, history: dict, examples_text: dict) -> None:
    """A finished set, as :class:`_common.Partial` kept it, back into the per-budget tables."""
    for b, kind, arm, r in unit["results"]:
        results[b][kind].setdefault(arm, []).append(r)
    for b, arm, t in unit["build"]:
        build[b].setdefault(arm, []).append(t)
    for b, r in unit["learned"]:
        learned[b].append(r)
    for b, h in unit["history"]:
        history[b].append(h)
    for b, text in unit["examples"].items():
        examples_text[int(b)] = text


def total_cpu(clock: Clock) -> float:
    return time.process_time() - clock.c0


def learner_full_features(learner, examples, model):
    """Sentence embeddings when the learner's prefix stops before the last layer: the whole encoder."""
    from potstill.dd.protocol import SplitLearner

    return SplitLearner.from_classifier(model, trainable_layers=0, max_length=learner.max_length).features(examples)


if __name__ == "__main__":
    sys.exit(main())
