"""``potstill cache``: run the recipe's teacher once over its training data and store its signal;
``--append`` caches examples added since, ``--refresh`` brings the cache up to a changed teacher,
``--certify`` measures how far its signal is from the dense teacher's for the recipe's divergences."""

from __future__ import annotations

import logging

from potstill.errors import PotstillError
from potstill.finished import (
    check_output_dir,
)
from potstill.recipes.distill import Recipe
from potstill.runners.prepare import Prepared, cache_spec

log = logging.getLogger("potstill")


def cache(
    recipe: Recipe,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    append: bool = False,
    refresh: bool = False,
    certify: bool = False,
    timings: dict | None = None,
) -> dict | None:
    """``potstill cache``: run the teacher over the recipe's training examples and store its signal.

    ``append``: the recipe's examples extend the cached ones; only the new ones are run.
    ``refresh``: the cache exists for these examples but the recipe's teacher changed; the
    examples whose drift exceeds ``cache.refresh`` are recomputed
    (:mod:`potstill.signals.cache.refresh`). ``certify``: once the cache is complete, its
    certificate (:func:`certificate`) is written into its manifest. Returns the manifest when
    the cache is complete, ``None`` while other ranks still work.
    """
    from potstill.signals.cache import write_cache

    if recipe.cache is None:
        raise PotstillError("the recipe has no `cache` section; add e.g. `cache: {signal: {kind: topk, k: 32}}`")
    if append and refresh:
        raise PotstillError(
            "--append and --refresh are two steps: append with the teacher that wrote the cache, then refresh"
        )
    check_output_dir(recipe.cache_dir, key="cache.dir")
    prep = Prepared(recipe)
    spec = cache_spec(recipe)
    # A cross-tokenizer recipe's cache holds the teacher's signal in its own tokens (any student family reads
    # it through the vocabulary projection); otherwise the teacher's tokens are the student's.
    tokenizer, examples = getattr(prep, "teacher_tokenizer", prep.tokenizer), prep.teacher_pool_examples()
    if refresh:
        from potstill.signals.cache.refresh import DEFAULT_THRESHOLD, RefreshRule, refresh_cache

        r = recipe.cache.refresh
        rule = RefreshRule(
            threshold=DEFAULT_THRESHOLD if r.threshold is None and r.fraction is None else r.threshold,
            fraction=r.fraction,
            probe_tokens=r.probe_tokens,
        )
        manifest = refresh_cache(
            prep.teacher,
            tokenizer,
            examples,
            recipe.cache_dir,
            spec,
            rule,
            teacher_name=recipe.teacher.model,
            rank=rank,
            world_size=world_size,
            progress=progress,
            timings=timings,
        )
    else:
        manifest = write_cache(
            prep.teacher,
            tokenizer,
            examples,
            recipe.cache_dir,
            spec,
            teacher_name=recipe.teacher.model,
            append=append,
            rank=rank,
            world_size=world_size,
            progress=progress,
            timings=timings,
        )
    if certify and manifest is not None:
        from potstill.signals.cache.write import record_in_plan

        manifest = record_in_plan(recipe.cache_dir, "certificate", certificate(recipe, prep))
    return manifest


DEFAULT_CANDIDATES = {"topk": [8, 16, 32, 64, 128], "sampled": [4, 8, 12, 16, 32, 64]}


def certificate(recipe: Recipe, prep: Prepared) -> dict:
    """How far the cache's kind of signal is from the dense teacher's, for every divergence the recipe's
    KD runs train with, measured on the recipe's initial student and the first training examples
    (:func:`potstill.signals.cache.certify.certify_models`): per candidate k (or draws), the relative
    error of the loss and of its gradient, the smallest candidate within ``cache.certify.tolerance``, and
    whether the cache's own setting is within it.

    A cross-tokenizer recipe's cache (the teacher's own tokens) is certified for each ``vocab_map`` run in
    what its student trains on: rows aligned on the response, both signals projected onto the student's
    vocabulary with the run's ``kinds`` (:func:`~potstill.signals.cache.certify.certify_models_cross`)."""
    from potstill.data.collate import pad_id
    from potstill.fingerprints import weights_fingerprint
    from potstill.models import output_head
    from potstill.models.vocab_map import DEFAULT_KINDS
    from potstill.recipes.divergences import divergence_params
    from potstill.signals.cache.certify import certify_models, certify_models_cross
    from potstill.signals.cache.cross import Projection

    c = recipe.cache.certify
    spec = cache_spec(recipe)
    head = {
        "teacher": weights_fingerprint(prep.teacher),
        "tolerance": c.tolerance,
        "noise_tolerance": c.noise_tolerance,
        "kind": spec.kind,
        "probe_examples": min(c.probe_examples, len(prep.pool_examples)),
    }
    if spec.kind == "dense":
        return {**head, "divergences": {}, "reason": "a dense cache holds the teacher's whole distribution (exact)"}
    own = spec.k if spec.kind == "topk" else spec.draws
    candidates = sorted({*(c.candidates or DEFAULT_CANDIDATES[spec.kind]), own})
    cross = bool(getattr(prep, "cross", False))
    vocab = output_head(prep.teacher).weight.shape[0] if cross else prep.vocab_size  # what the cache's ids index
    candidates = [k for k in candidates if spec.kind != "topk" or k <= vocab] if vocab else candidates
    probe = [{**x, "example_id": i} for i, x in enumerate(prep.pool_examples[: head["probe_examples"]])]
    common = {
        "kind": spec.kind,
        "candidates": candidates,
        "max_rows": c.max_rows,
        "batch_size": spec.batch_size,
        "pad_id": pad_id(prep.tokenizer, required=True),
        "temperature": spec.temperature,
        "dtype": spec.dtype,
        "tail": spec.tail,
        "proposal_temperature": spec.proposal_temperature,
        "tolerance": c.tolerance,
        "noise_tolerance": c.noise_tolerance,
        "seeds": [spec.seed + s for s in range(c.seeds)],
    }
    out: dict[str, dict] = {}
    for run in recipe.runs:
        if not run.uses_teacher or run.divergence is None:
            continue
        ct = run.cross_tokenizer
        if cross and (ct is None or ct.align != "vocab_map"):
            continue  # only vocab_map runs read a cross-tokenizer cache (uld is refused with a cache)
        params = divergence_params(run.divergence)
        key = run.divergence.name + ("" if not params else f" {params}")
        if cross and ct is not None and sorted(ct.kinds) != sorted(DEFAULT_KINDS):
            key += f" kinds {list(ct.kinds)}"
        if key in out:
            out[key]["runs"].append(run.name)
            continue
        if cross and ct is not None:
            cert = certify_models_cross(
                prep.teacher,
                prep.student0,
                probe,
                prep.teacher_pool_examples(),
                prep.teacher_example_map(),
                run.divergence.name,
                params,
                student_tokenizer=prep.tokenizer,
                teacher_tokenizer=prep.teacher_tokenizer,
                projection=Projection(prep.vocab_map(), output_head(prep.student0).weight.shape[0], tuple(ct.kinds)),
                teacher_pad_id=pad_id(prep.teacher_tokenizer),  # padding is masked out
                **common,
            )
        else:
            cert = certify_models(
                prep.teacher, prep.student0, probe, run.divergence.name, params, vocab_size=vocab, **common
            )
        mine = next(row for row in cert["candidates"] if row[cert["param"]] == own)
        out[key] = {**cert, "runs": [run.name], "own": own, "own_ok": mine["ok"]}
        log.info("certificate, %s: %s", key, cert["reason"])
    return {**head, "divergences": out}


def certificate_lines(cert: dict) -> list[str]:
    """One line per certified divergence: the cache's own setting against the tolerance, and the recommendation."""
    lines = []
    for key, d in cert.get("divergences", {}).items():
        mine = next(row for row in d["candidates"] if row[d["param"]] == d["own"])
        tol = f"tolerance {d['tolerance']:g}"
        if mine["refused"]:
            errs = "refused"
        else:
            errs = f"loss error {mine['loss_error']:.3f}, logit gradient error {mine['grad_error']:.3f}"
        if d.get("criterion") == "head" and not mine["refused"]:
            noise = mine["noise_ratio"]
            errs += f", head gradient bias {mine['head_grad_bias']:.3f}"
            if d["kind"] == "sampled":
                errs += ", noise ratio " + ("unmeasured" if noise is None else f"{noise:.3f}")
                tol += f" / noise tolerance {d['noise_tolerance']:g}"
        verdict = "within" if d["own_ok"] else "outside"
        rec = d["recommendation"]
        lines.append(
            f"certificate {key} ({', '.join(d['runs'])}): {d['param']}={d['own']} {errs}, {verdict} {tol}; "
            + (f"smallest within: {d['param']}={rec}" if rec is not None else d["reason"])
        )
    return lines
