"""A fidelity certificate for a teacher-signal cache: which ``k`` (top-k) or ``draws`` (sampled) is enough.

On a probe of rows -- dense teacher logits ``[R, V]`` and the student's logits ``[R, V]`` -- each
candidate signal is built exactly as the cache would store and read it (:func:`~.encode.extract`,
then the value dtype's :func:`~potstill.signals.quant.encode_logprobs` /
:func:`~potstill.signals.quant.decode_logprobs` round trip, then the :class:`SparseSignal` that
``CachedSignal`` hands the reducer), and the student's loss and gradient from it are compared with
the dense teacher's (same divergence, parameters and temperature):

* loss: the mean per-row divergence over the probe. ``loss_bias`` is ``(E[L_sparse] - L_dense) / L_dense``;
  ``loss_std`` the standard deviation over the seeds of the draws (0 for top-k), relative to ``L_dense``;
  ``loss_error = sqrt(loss_bias^2 + loss_std^2)``, the root-mean-square relative error of one seed;
* gradient w.r.t. the student logits of that mean loss (Frobenius norms over the probe):
  ``grad_bias = ||E[g] - g_dense|| / ||g_dense||``, ``grad_std = sqrt(E||g - E[g]||^2) / ||g_dense||`` and
  ``grad_error = sqrt(E||g - g_dense||^2) / ||g_dense|| = sqrt(grad_bias^2 + grad_std^2)``.

``E`` is the mean over ``seeds`` (population moments, so the two identities hold exactly); for top-k
there is one deterministic signal. A sampled signal (Anshumann et al. 2025) is unbiased, so its
``grad_bias`` and ``loss_bias`` are noise of size ``std / sqrt(seeds - 1)`` plus what quantizing the
log-probs adds; a top-k bucket signal is deterministic and, for an f-divergence, never above the dense
loss (data-processing inequality; exactly so in fp32). The spread is that of the mean over the probe's
``R`` rows: a training batch of another size has another one.

The recommendation is the smallest candidate whose ``loss_error`` and ``grad_error`` are both within the
tolerance; ``reason`` says why it was chosen, why none was, or why the divergence cannot be computed
from this kind of signal (AKL and BiLD need the teacher's ranking, which sampled ids do not give).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ...divergences import check_divergence_params, check_temperature, get_divergence, sparse_divergence
from ...errors import PotstillError
from ..online import target_index, target_rows
from ..quant import ValueDType, decode_logprobs, encode_logprobs
from ..types import SparseSignal, TailMode
from .encode import extract, row_seed
from .format import CacheSpec

SparseKind = Literal["topk", "sampled"]


def cached_signal(z: Tensor, spec: CacheSpec, vocab: int, seeds: list[int] | None = None) -> SparseSignal:
    """Teacher logits ``z [r, V]`` (float32) -> the :class:`SparseSignal` a cache with ``spec`` gives for these rows.

    What :func:`~.encode.extract` and :func:`~.encode.example_rows` store, read back the way
    ``CachedSignal._combine`` does: log-probs through the dtype's encode/decode round trip, the top-k
    tail in its stored precision, sampled rows trimmed to their widest row with ``count / draws`` (or the
    stored importance weights) as weights. ``seeds`` are the per-row draw seeds (:func:`~.encode.row_seed`),
    required for sampled signals. On the CPU.
    """
    if spec.kind == "dense":
        raise ValueError("a dense cache holds no sparse signal; certify a topk or sampled cache")
    if spec.kind == "sampled" and (seeds is None or len(seeds) != z.shape[0]):
        raise ValueError(f"a sampled signal needs one draw seed per row ({z.shape[0]}), got {seeds and len(seeds)}")
    cols = extract(z, spec, vocab, seeds)
    enc = encode_logprobs(cols["lp"], spec.dtype)
    lp = decode_logprobs(enc["values"], spec.dtype, enc.get("scale"))
    if spec.kind == "topk":
        # The tail column is stored in fp32 by fp32 caches and in fp16 by the others (encode.assemble_shard).
        tail = cols["tail"].to(torch.float32 if spec.dtype == "fp32" else torch.float16).float()
        return SparseSignal(
            ids=cols["ids"], logprobs=lp, tail=spec.tail, tail_logprob=tail if spec.tail == "bucket" else None
        )
    counts = cols["counts"]
    live = counts > 0
    width = int(live.sum(-1).max()) if live.numel() else 0  # unique ids are left-packed by extract
    if spec.proposal_temperature == 1.0:
        weights = counts.float() / spec.draws
    else:
        weights = cols["weights"].float()
    weights = torch.where(live, weights, torch.zeros_like(weights))
    lp = torch.where(live, lp, torch.full_like(lp, float("-inf")))
    return SparseSignal(ids=cols["ids"][:, :width], logprobs=lp[:, :width], weights=weights[:, :width])


def _loss_and_grad(fn, student_logits: Tensor) -> tuple[float, Tensor]:
    """``fn(x) -> [R]`` per-row divergences -> (their mean, its gradient w.r.t. ``x [R, V]``)."""
    x = student_logits.detach().clone().requires_grad_(True)
    loss = fn(x).float().mean()
    (g,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), g.detach()


def _sq_norm(t: Tensor) -> float:
    return float(t.double().pow(2).sum())


def _measure(
    divergence: str,
    params: dict,
    teacher_logits: Tensor,
    student_logits: Tensor,
    spec: CacheSpec,
    vocab: int,
    seeds: Sequence[int | None],
    row_keys: list[tuple[int, int]],
    dense_loss: float,
    dense_grad: Tensor,
) -> dict[str, Any]:
    """One candidate's row of the certificate (see the module docstring for the quantities)."""
    device = student_logits.device
    losses: list[float] = []
    dev_sum = torch.zeros_like(dense_grad)  # sum over seeds of g - g_dense
    err_sq = 0.0  # sum over seeds of ||g - g_dense||^2
    for s in seeds:
        keys = None if s is None else [row_seed(s, e, r) for e, r in row_keys]
        sig = cached_signal(teacher_logits, spec, vocab, keys).to(device)
        try:
            loss, g = _loss_and_grad(
                lambda x, sig=sig: sparse_divergence(divergence, x, sig, temperature=spec.temperature, **params),
                student_logits,
            )
        except (ValueError, PotstillError) as err:  # the sparse path refuses this divergence for this signal
            return {"refused": str(err)}
        losses.append(loss)
        dev = g - dense_grad
        dev_sum += dev
        err_sq += _sq_norm(dev)
    n = len(losses)
    g_norm = math.sqrt(_sq_norm(dense_grad))
    mean_loss = sum(losses) / n
    loss_bias = (mean_loss - dense_loss) / dense_loss
    loss_std = math.sqrt(sum((x - mean_loss) ** 2 for x in losses) / n) / dense_loss
    grad_bias = math.sqrt(_sq_norm(dev_sum / n)) / g_norm
    grad_error = math.sqrt(err_sq / n) / g_norm
    return {
        "loss": mean_loss,
        "loss_bias": loss_bias,
        "loss_std": loss_std,
        "loss_error": math.sqrt(loss_bias**2 + loss_std**2),
        "grad_bias": grad_bias,
        "grad_std": math.sqrt(max(grad_error**2 - grad_bias**2, 0.0)),
        "grad_error": grad_error,
    }


def certify(
    teacher_logits: Tensor,
    student_logits: Tensor,
    divergence: str,
    params: dict | None = None,
    *,
    kind: SparseKind,
    candidates: Sequence[int],
    temperature: float = 1.0,
    dtype: ValueDType = "fp16",
    tail: TailMode = "bucket",
    proposal_temperature: float = 1.0,
    tolerance: float = 0.05,
    seeds: Sequence[int] = tuple(range(8)),
    row_keys: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Certify a cache of ``kind`` for each candidate ``k`` (topk) or ``draws`` (sampled) on a probe.

    ``teacher_logits`` and ``student_logits`` are ``[R, V]`` (same shape; float32 is used) at the probe's
    target rows; ``divergence`` a name of ``DIVERGENCES`` with its ``params``; ``temperature`` the
    distillation (= cache) temperature; ``dtype``, ``tail`` and ``proposal_temperature`` the cache's
    settings (:class:`~.format.CacheSpec`). Sampled signals are drawn once per seed in ``seeds``, each
    row with :func:`~.encode.row_seed` ``(seed, example_id, row)`` of its ``row_keys`` (default
    ``(0, i)``), so ``seeds=[spec.seed]`` with the rows' real keys gives the draws the cache holds.

    Returns a JSON-able dict::

        {"divergence", "params", "kind", "param": "k" | "draws", "temperature", "dtype", "tail",
         "proposal_temperature", "rows": R, "vocab": V, "seeds": S (1 for topk), "tolerance",
         "dense_loss": mean per-row dense divergence,
         "candidates": [{<param>: int, "ok": bool, "refused": str | None,
                         "loss", "loss_bias", "loss_std", "loss_error",
                         "grad_bias", "grad_std", "grad_error"}, ...],   # ascending; metrics None if refused
         "recommendation": int | None, "reason": str}

    Raises ``ValueError`` on bad shapes, parameters or a temperature below the floor, ``PotstillError``
    on a candidate the cache itself refuses (k outside [1, V], draws outside [1, 255]) or a probe on which
    the student already equals the teacher (the dense loss or gradient is 0: nothing to be relative to).
    """
    if teacher_logits.dim() != 2 or teacher_logits.shape != student_logits.shape or not teacher_logits.shape[0]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            "must both be [R, V] with R >= 1 (the probe's target rows)"
        )
    if kind not in ("topk", "sampled"):
        raise ValueError(
            f"certify compares sparse signals with the dense one; kind must be topk or sampled, not {kind!r}"
        )
    if not candidates:
        raise ValueError(f"no candidate {'k' if kind == 'topk' else 'draws'} to certify; give at least one")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (a relative error), got {tolerance}")
    params = dict(params or {})
    r, vocab = teacher_logits.shape
    check_temperature(temperature)
    check_divergence_params(divergence, params, vocab_size=vocab)
    keys = [(0, i) for i in range(r)] if row_keys is None else [(int(e), int(i)) for e, i in row_keys]
    if len(keys) != r:
        raise ValueError(f"row_keys has {len(keys)} entries for {r} probe rows")
    run_seeds: list[int | None] = [None] if kind == "topk" else [int(s) for s in seeds]
    if not run_seeds:
        raise ValueError("a sampled signal needs at least one seed of draws; give seeds")

    student = student_logits.detach().float()
    teacher = teacher_logits.detach().float()
    dense = get_divergence(divergence)
    dense_loss, dense_grad = _loss_and_grad(
        lambda x: dense(x, teacher.to(x.device), temperature=temperature, **params), student
    )
    if not math.isfinite(dense_loss):
        raise PotstillError(
            f"the dense {divergence} on the probe is {dense_loss} (NaN/inf logits?); check both models' logits"
        )
    if not dense_loss > 0 or not _sq_norm(dense_grad) > 0:
        raise PotstillError(
            f"the student matches the teacher on the probe ({divergence} = {dense_loss:.3g}, so no error is relative "
            "to anything); certify with the student you will train from, not the teacher"
        )

    param = "k" if kind == "topk" else "draws"
    rows = []
    for c in sorted({int(c) for c in candidates}):
        spec = CacheSpec(
            kind=kind,
            k=c if kind == "topk" else 1,
            draws=c if kind == "sampled" else 1,
            proposal_temperature=proposal_temperature,
            tail=tail,
            dtype=dtype,
            temperature=temperature,
        )
        spec.check(vocab)
        m = _measure(divergence, params, teacher, student, spec, vocab, run_seeds, keys, dense_loss, dense_grad)
        refused = m.pop("refused", None)
        ok = refused is None and m["loss_error"] <= tolerance and m["grad_error"] <= tolerance
        empty = dict.fromkeys(("loss", "loss_bias", "loss_std", "loss_error", "grad_bias", "grad_std", "grad_error"))
        rows.append({param: c, "ok": ok, "refused": refused, **(empty if refused else m)})

    rec = next((row[param] for row in rows if row["ok"]), None)
    return {
        "divergence": divergence,
        "params": params,
        "kind": kind,
        "param": param,
        "temperature": float(temperature),
        "dtype": dtype,
        "tail": tail if kind == "topk" else None,
        "proposal_temperature": float(proposal_temperature) if kind == "sampled" else None,
        "rows": int(r),
        "vocab": int(vocab),
        "seeds": len(run_seeds),
        "tolerance": float(tolerance),
        "dense_loss": dense_loss,
        "candidates": rows,
        "recommendation": rec,
        "reason": _reason(rows, rec, param, kind, divergence, dtype, tolerance),
    }


def _reason(rows: list[dict], rec: int | None, param: str, kind: str, divergence: str, dtype: str, tol: float) -> str:
    if rec is not None:
        row = next(row for row in rows if row[param] == rec)
        return (
            f"{param}={rec} is the smallest candidate within the tolerance {tol:g}: loss error "
            f"{row['loss_error']:.3g}, gradient error {row['grad_error']:.3g}"
        )
    done = [row for row in rows if row["refused"] is None]
    if not done:
        return f"{divergence} cannot be computed from a {kind} signal: {rows[0]['refused']}"
    best = min(done, key=lambda row: max(row["loss_error"], row["grad_error"]))
    tried = ", ".join(str(row[param]) for row in rows)
    if kind == "topk":
        hint = (
            "a top-k signal drops the shape of the teacher's tail, which this divergence weighs (a divergence "
            "that weighs the tail needs the dense signal); use a larger k, a sampled cache (unbiased) or a dense one"
        )
    else:
        hint = (
            "a sampled signal is unbiased but noisy (its variance falls as 1/draws); use more draws (at most 255)"
            + (f", a finer dtype than {dtype} (grad_bias is its rounding)" if dtype != "fp32" else "")
            + " or a dense cache"
        )
    return (
        f"no {param} of {tried} is within the tolerance {tol:g}: the best, {param}={best[param]}, has loss error "
        f"{best['loss_error']:.3g} and gradient error {best['grad_error']:.3g}; {hint}"
    )


def certify_models(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    examples: list[dict],
    divergence: str,
    params: dict | None = None,
    *,
    kind: SparseKind,
    candidates: Sequence[int],
    max_rows: int = 512,
    batch_size: int = 8,
    pad_id: int = 0,
    vocab_size: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`certify` on a probe built from models: the target rows of ``examples``, at most ``max_rows``.

    ``examples`` are encoded examples (``input_ids``, ``labels``, ``attention_mask``; an ``example_id``
    when they have one, else their list index, which is the cache's key and seeds the draws as
    :func:`~.write.build_shard` does). Both models run without gradients in eval mode (their modes are
    restored), each on its own device; the rows are those of :func:`~potstill.signals.target_index`,
    projected through each model's output head (logit scale and softcap included) and cut to
    ``vocab_size`` (default: the smaller of the two vocabularies, as the trainer aligns them). ``pad_id``
    fills right padding, which the attention mask hides. ``options`` go to :func:`certify`; the result
    has ``"examples"``, the number of examples the probe read, besides.
    """
    from ...data import PadCollator
    from ...models import final_hidden
    from ...models.placement import head_on, input_device

    if max_rows < 1 or batch_size < 1:
        raise ValueError(f"max_rows ({max_rows}) and batch_size ({batch_size}) must be >= 1")
    if not examples:
        raise ValueError("no examples to build the probe from")
    t_dev, s_dev = input_device(teacher), input_device(student)
    t_head, s_head = head_on(teacher, t_dev), head_on(student, s_dev)
    vocab = vocab_size if vocab_size is not None else min(t_head.vocab, s_head.vocab)
    if vocab > min(t_head.vocab, s_head.vocab):
        raise ValueError(f"vocab_size {vocab} exceeds a model's vocabulary ({t_head.vocab}, {s_head.vocab})")
    collate = PadCollator(pad_id)
    zt: list[Tensor] = []
    zs: list[Tensor] = []
    keys: list[tuple[int, int]] = []
    used = 0
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        with torch.no_grad():
            for b0 in range(0, len(examples), batch_size):
                if len(keys) >= max_rows:
                    break
                members = list(range(b0, min(b0 + batch_size, len(examples))))
                batch = collate([examples[i] for i in members])
                labels = batch["labels"]
                for i, c in zip(members, (labels[:, 1:] != -100).sum(-1).tolist()):
                    eid = int(examples[i].get("example_id", i))
                    keys += [(eid, r) for r in range(c)]
                index = target_index(labels)
                for model, head, dev, acc in ((teacher, t_head, t_dev, zt), (student, s_head, s_dev, zs)):
                    hidden = final_hidden(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
                    acc.append(head(target_rows(hidden, index.to(dev))).float()[:, :vocab].to(s_dev))
                used = members[-1] + 1
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    n = min(len(keys), max_rows)
    if n == 0:
        raise ValueError(f"the {used} probe examples have no target rows (every label is -100)")
    out = certify(
        torch.cat(zt)[:n],
        torch.cat(zs)[:n],
        divergence,
        params,
        kind=kind,
        candidates=candidates,
        row_keys=keys[:n],
        **options,
    )
    out["examples"] = used
    return out
