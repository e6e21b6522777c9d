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

Training follows the gradient of the parameters, summed over many rows and steps, not one row's logit
gradient. A sampled signal's noise is independent from row to row, so it averages out there, while a
bias does not: a sampled cache whose logit ``grad_error`` is several times the gradient can train as
well as the live teacher. Given the student's ``features`` (its final hidden states at the probe rows,
which :func:`certify_models` passes), the certificate measures both in the gradient of a linear output
head reading them (``G = features^T g``, ``[d, V]``; exact for an untied plain head, the proxy for the
rest), with Gram matrices (``[R, R]``), so nothing ``[d, V]``-sized is formed:

* ``head_grad_bias = ||E[G] - G_dense|| / ||G_dense||``, with the noise of the mean over the seeds
  subtracted (``||E_S[G] - G_dense||^2`` minus its expected noise ``sum_r ||f_r||^2 s_r^2 / S``, ``s_r^2``
  the rows' sample variance over the seeds; floored at 0): what no number of steps averages away;
* ``noise_ratio``: the variance the draws add to one training step's progress -- its head gradient's
  component along the dense head gradient, which is what changes the loss to first order -- over the
  variance that drawing the step's batch of examples already gives it (the minibatch noise of SGD,
  estimated from the probe's examples; McCandlish et al. 2018 use the same per-example covariance).
  Both scale as one over the batch, so the ratio holds at every batch size: a cache with
  ``noise_ratio`` ``x`` makes progress like the live teacher with a batch ``1 / (1 + x)`` as large.
  ``noise_ratio_total`` is the same over the whole head gradient: it also counts the draws' noise in
  directions that do not move the loss to first order (the rare tokens' rows a draw of ``1/p``-weighted
  outcomes jitters), which second-order effects and Adam's per-weight scaling see only partly; it is
  reported, not judged. Both 0 for top-k; ``None`` with one seed.

The recommendation is the smallest candidate within the tolerances: with ``features``, ``head_grad_bias
<= tolerance`` and ``noise_ratio <= noise_tolerance`` (``criterion: "head"``); without, ``loss_error``
and ``grad_error`` both ``<= tolerance`` (``criterion: "logits"``, which takes every draw's noise for an
error). ``reason`` says why it was chosen, why none was, or why the divergence cannot be computed from
this kind of signal (AKL and BiLD need the teacher's ranking, which sampled ids do not give).

A cache written in the teacher's own tokens for a student with another tokenizer
(:mod:`~.cross`) is certified in what that student trains on: with a :class:`~.cross.Projection`, the dense
reference is the teacher's distribution projected onto the student's vocabulary
(:func:`~potstill.models.vocab_map.project_teacher`) and each candidate's signal the cached one projected
as the reader does (:func:`~.cross.project_sparse`); rows with nothing mapped count 0, as in training.
:func:`certify_models_cross` builds that probe from the two encodings of each pair, aligned on the
response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor

from ...divergences import check_divergence_params, check_temperature, get_divergence, sparse_divergence
from ...errors import PotstillError
from ...models.head import eval_mode
from ..online import target_index, target_rows
from ..quant import ValueDType, decode_logprobs, encode_logprobs
from ..types import SparseSignal, TailMode
from .cross import Projection
from .encode import extract, row_seed
from .format import CacheSpec

SparseKind = Literal["topk", "sampled"]


def _masked(per_row: Tensor, valid: Tensor | None) -> Tensor:
    """Per-row divergences with the rows training gives weight 0 (nothing mapped) set to 0."""
    return per_row if valid is None else per_row * valid.to(per_row.device, per_row.dtype)


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


class _Head:
    """Norms in the gradient of a linear head reading ``features [R, d]``: ``||features^T x||^2`` for an
    ``[R, V]`` logit gradient ``x``, through the features' Gram matrix, and inner products with the dense
    head gradient ``<features^T x, features^T g> = sum_r x_r . w_r``, ``w = Gram @ g``."""

    def __init__(self, features: Tensor, example_of_row: list[int], dense_grad: Tensor) -> None:
        f = features.detach().double().cpu()
        self.gram = f @ f.T
        self.row_sq = self.gram.diagonal().clone()
        g = dense_grad.double().cpu()
        self.dense_sq = self.sq(g)
        self.w = self.gram @ g  # [R, V]: row r's logit gradient . w_r is its head gradient . the dense one
        self._w_on: dict[torch.device, Tensor] = {}
        # Minibatch noise: per example e, S_e - n_e * mean gradient = sum_r beta_er c_r with c_r the row's
        # contribution; its squared norm is beta_e^T (Gram_f * Gram_g) beta_e, its component along the dense
        # head gradient beta_e . t with t_r = g_r . w_r.
        m = self.gram * (g @ g.T)
        t = (g * self.w).sum(-1)
        r = g.shape[0]
        ids = torch.tensor(example_of_row)
        spread = spread_along = 0.0
        examples = ids.unique()
        for e in examples:
            member = (ids == e).double()
            beta = member - float(member.sum()) / r
            spread += float(beta @ m @ beta)
            spread_along += float(beta @ t) ** 2
        self.examples = int(examples.numel())
        self.minibatch = spread  # sums over examples; the ratios' formula carries the counts
        self.minibatch_along = spread_along

    def sq(self, x: Tensor) -> float:
        x = x.double().cpu()
        return float(((x @ x.T) * self.gram).sum())

    def along(self, x: Tensor) -> Tensor:
        """Per row ``r``: ``x_r . w_r`` (float64 ``[R]``, on ``x``'s device)."""
        if x.device not in self._w_on:
            self._w_on[x.device] = self.w.to(x.device)
        return (x.double() * self._w_on[x.device]).sum(-1)

    def _ratio(self, noise: float, spread: float) -> float:
        if spread > 0:
            return (self.examples - 1) / self.examples * noise / spread
        return math.inf if noise > 0 else 0.0

    def measure(
        self, dev_mean: Tensor, row_var: Tensor | None, row_var_along: Tensor | None, n_seeds: int
    ) -> dict[str, Any]:
        """``dev_mean`` = E[g] - g_dense ``[R, V]``; ``row_var`` the rows' sample variance over the seeds
        (summed over the vocabulary) and ``row_var_along`` that of ``dev_r . w_r``; None for a
        deterministic signal."""
        noise = 0.0 if row_var is None else float((self.row_sq * row_var.double().cpu()).sum())
        bias_sq = max(self.sq(dev_mean) - noise / n_seeds, 0.0)
        out: dict[str, Any] = {"head_grad_bias": math.sqrt(bias_sq / self.dense_sq)}
        if row_var is None or row_var_along is None:
            return out | {"noise_ratio": 0.0, "noise_ratio_total": 0.0}
        noise_along = float(row_var_along.double().cpu().sum())
        return out | {
            "noise_ratio": self._ratio(noise_along, self.minibatch_along),
            "noise_ratio_total": self._ratio(noise, self.minibatch),
        }


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
    head: _Head | None = None,
    projection: Projection | None = None,
) -> dict[str, Any]:
    """One candidate's row of the certificate (see the module docstring for the quantities)."""
    device = student_logits.device
    losses: list[float] = []
    dev_sum = torch.zeros_like(dense_grad)  # sum over seeds of g - g_dense
    row_sq = torch.zeros(dense_grad.shape[0], dtype=torch.float64, device=dense_grad.device)  # per row, sum over seeds
    along_sum = torch.zeros_like(row_sq)  # per row, sum over seeds of (g - g_dense)_r . w_r (head criterion)
    along_sq = torch.zeros_like(row_sq)
    err_sq = 0.0  # sum over seeds of ||g - g_dense||^2
    for s in seeds:
        keys = None if s is None else [row_seed(s, e, r) for e, r in row_keys]
        sig = cached_signal(teacher_logits, spec, vocab, keys)
        if projection is not None:
            sig = projection.sparse(sig)[0]
        sig = sig.to(device)
        try:
            loss, g = _loss_and_grad(
                lambda x, sig=sig: _masked(
                    sparse_divergence(divergence, x, sig, temperature=spec.temperature, **params), sig.valid
                ),
                student_logits,
            )
        except (ValueError, PotstillError) as err:  # the sparse path refuses this divergence for this signal
            return {"refused": str(err)}
        losses.append(loss)
        dev = g - dense_grad
        dev_sum += dev
        row_sq += dev.double().pow(2).sum(-1)
        if head is not None:
            a = head.along(dev)
            along_sum += a
            along_sq += a * a
        err_sq += _sq_norm(dev)
    n = len(losses)
    g_norm = math.sqrt(_sq_norm(dense_grad))
    mean_loss = sum(losses) / n
    loss_bias = (mean_loss - dense_loss) / dense_loss
    loss_std = math.sqrt(sum((x - mean_loss) ** 2 for x in losses) / n) / dense_loss
    grad_bias = math.sqrt(_sq_norm(dev_sum / n)) / g_norm
    grad_error = math.sqrt(err_sq / n) / g_norm
    out: dict[str, Any] = {}
    if head is not None:
        row_var = row_var_along = None
        if seeds != [None] and n > 1:  # sample variances over the seeds, per row
            row_var = ((row_sq - n * (dev_sum / n).double().pow(2).sum(-1)) / (n - 1)).clamp_min(0.0)
            row_var_along = ((along_sq - along_sum * along_sum / n) / (n - 1)).clamp_min(0.0)
        out = head.measure(dev_sum / n, row_var, row_var_along, n)
        if seeds != [None] and n == 1:  # one seed has no spread to measure
            out["noise_ratio"] = out["noise_ratio_total"] = None
    return {
        **out,
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
    noise_tolerance: float = 0.25,
    seeds: Sequence[int] = tuple(range(8)),
    row_keys: Sequence[tuple[int, int]] | None = None,
    features: Tensor | None = None,
    projection: Projection | None = None,
) -> dict[str, Any]:
    """Certify a cache of ``kind`` for each candidate ``k`` (topk) or ``draws`` (sampled) on a probe.

    ``teacher_logits`` and ``student_logits`` are ``[R, V]`` (same shape; float32 is used) at the probe's
    target rows, or, with a ``projection`` (a student with another tokenizer), ``[R, V_t]`` and
    ``[R, V_s]`` at aligned rows (``V_s`` the projection's student vocabulary; ``V`` below is ``V_t``);
    ``divergence`` a name of ``DIVERGENCES`` with its ``params``; ``temperature`` the
    distillation (= cache) temperature; ``dtype``, ``tail`` and ``proposal_temperature`` the cache's
    settings (:class:`~.format.CacheSpec`). Sampled signals are drawn once per seed in ``seeds``, each
    row with :func:`~.encode.row_seed` ``(seed, example_id, row)`` of its ``row_keys`` (default
    ``(0, i)``), so ``seeds=[spec.seed]`` with the rows' real keys gives the draws the cache holds.

    Returns a JSON-able dict::

        {"divergence", "params", "kind", "param": "k" | "draws", "temperature", "dtype", "tail",
         "proposal_temperature", "rows": R, "vocab": V, "seeds": S (1 for topk), "tolerance",
         # with a projection also "student_vocab", "kinds" and "rows_mapped" (rows with mass mapped)
         "noise_tolerance", "criterion": "head" | "logits",
         "dense_loss": mean per-row dense divergence,
         "candidates": [{<param>: int, "ok": bool, "refused": str | None,
                         "loss", "loss_bias", "loss_std", "loss_error",
                         "grad_bias", "grad_std", "grad_error",
                         "head_grad_bias", "noise_ratio", "noise_ratio_total"}, ...],
                         # ascending; metrics None if refused; the last three only with features
         "recommendation": int | None, "reason": str}

    Raises ``ValueError`` on bad shapes, parameters or a temperature below the floor, ``PotstillError``
    on a candidate the cache itself refuses (k outside [1, V], draws outside [1, 255]) or a probe on which
    the student already equals the teacher (the dense loss or gradient is 0: nothing to be relative to).
    """
    if projection is None:
        shapes_ok = teacher_logits.dim() == 2 and teacher_logits.shape == student_logits.shape
        want = "must both be [R, V]"
    else:
        shapes_ok = (
            teacher_logits.dim() == student_logits.dim() == 2
            and teacher_logits.shape[0] == student_logits.shape[0]
            and student_logits.shape[1] == projection.student_vocab
        )
        want = f"must be [R, V_t] and [R, {projection.student_vocab}] (the projection's student vocabulary)"
    if not shapes_ok or not teacher_logits.shape[0]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
            f"{want} with R >= 1 (the probe's target rows)"
        )
    if kind not in ("topk", "sampled"):
        raise ValueError(
            f"certify compares sparse signals with the dense one; kind must be topk or sampled, not {kind!r}"
        )
    if not candidates:
        raise ValueError(f"no candidate {'k' if kind == 'topk' else 'draws'} to certify; give at least one")
    if not tolerance > 0 or not noise_tolerance >= 0:
        raise ValueError(
            f"tolerance must be > 0 (a relative error) and noise_tolerance >= 0 (a variance ratio), got "
            f"{tolerance} and {noise_tolerance}"
        )
    params = dict(params or {})
    r, vocab = teacher_logits.shape
    check_temperature(temperature)
    check_divergence_params(divergence, params, vocab_size=student_logits.shape[1])
    keys = [(0, i) for i in range(r)] if row_keys is None else [(int(e), int(i)) for e, i in row_keys]
    if len(keys) != r:
        raise ValueError(f"row_keys has {len(keys)} entries for {r} probe rows")
    run_seeds: list[int | None] = [None] if kind == "topk" else [int(s) for s in seeds]
    if not run_seeds:
        raise ValueError("a sampled signal needs at least one seed of draws; give seeds")
    if features is not None:
        if features.dim() != 2 or features.shape[0] != r:
            raise ValueError(f"features {tuple(features.shape)} must be [R, d] with R = {r} (one per probe row)")
        if len({e for e, _ in keys}) < 2:
            raise ValueError(
                "the head criterion compares the draws' noise with the minibatch noise between examples; the "
                "probe needs rows of at least two examples (row_keys' example ids)"
            )

    student = student_logits.detach().float()
    teacher = teacher_logits.detach().float()
    dense = get_divergence(divergence)
    dense_teacher, dense_valid = teacher, None
    if projection is not None:
        dense_teacher, mass = projection.dense(teacher, temperature)
        dense_valid = mass > 0
        if not bool(dense_valid.any()):
            raise PotstillError(
                "no probe row has teacher mass on a token the student's vocabulary maps; check the vocabulary map"
            )
    dense_loss, dense_grad = _loss_and_grad(
        lambda x: _masked(dense(x, dense_teacher.to(x.device), temperature=temperature, **params), dense_valid),
        student,
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

    head = None if features is None else _Head(features, [e for e, _ in keys], dense_grad)
    if head is not None and not head.dense_sq > 0:
        raise PotstillError(
            "the dense gradient of the output head is 0 on the probe (all-zero features?); check the student"
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
        m = _measure(
            divergence, params, teacher, student, spec, vocab, run_seeds, keys, dense_loss, dense_grad, head, projection
        )
        refused = m.pop("refused", None)
        if refused is not None:
            ok = False
        elif head is None:
            ok = m["loss_error"] <= tolerance and m["grad_error"] <= tolerance
        else:
            ok = (
                m["head_grad_bias"] <= tolerance
                and m["noise_ratio"] is not None
                and m["noise_ratio"] <= noise_tolerance
            )
        names = ("loss", "loss_bias", "loss_std", "loss_error", "grad_bias", "grad_std", "grad_error")
        empty = dict.fromkeys(names + (("head_grad_bias", "noise_ratio", "noise_ratio_total") if head else ()))
        rows.append({param: c, "ok": ok, "refused": refused, **(empty if refused else m)})

    rec = next((row[param] for row in rows if row["ok"]), None)
    crossed = {}
    if projection is not None:
        crossed = {
            "student_vocab": int(projection.student_vocab),
            "kinds": list(projection.kinds),
            "rows_mapped": int(cast(Tensor, dense_valid).sum()),
        }
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
        **crossed,
        "seeds": len(run_seeds),
        "tolerance": float(tolerance),
        "noise_tolerance": float(noise_tolerance),
        "criterion": "logits" if head is None else "head",
        "dense_loss": dense_loss,
        "candidates": rows,
        "recommendation": rec,
        "reason": _reason(rows, rec, param, kind, divergence, dtype, tolerance, noise_tolerance, head is not None),
    }


def _errors(row: dict, by_head: bool) -> str:
    if not by_head:
        return f"loss error {row['loss_error']:.3g}, gradient error {row['grad_error']:.3g}"
    noise = "unmeasured (one seed)" if row["noise_ratio"] is None else f"{row['noise_ratio']:.3g}"
    return f"head gradient bias {row['head_grad_bias']:.3g}, noise ratio {noise}"


def _reason(
    rows: list[dict],
    rec: int | None,
    param: str,
    kind: str,
    divergence: str,
    dtype: str,
    tol: float,
    noise_tol: float,
    by_head: bool,
) -> str:
    within = f"the tolerance {tol:g}" + (f" and noise tolerance {noise_tol:g}" if by_head and kind == "sampled" else "")
    if rec is not None:
        row = next(row for row in rows if row[param] == rec)
        return f"{param}={rec} is the smallest candidate within {within}: {_errors(row, by_head)}"
    done = [row for row in rows if row["refused"] is None]
    if not done:
        return f"{divergence} cannot be computed from a {kind} signal: {rows[0]['refused']}"

    def badness(row: dict) -> float:
        if not by_head:
            return max(row["loss_error"], row["grad_error"])
        noise = math.inf if row["noise_ratio"] is None else row["noise_ratio"] / max(noise_tol, 1e-12)
        return max(row["head_grad_bias"] / tol, noise)

    best = min(done, key=badness)
    tried = ", ".join(str(row[param]) for row in rows)
    if kind == "topk":
        hint = (
            "a top-k signal drops the shape of the teacher's tail, which this divergence weighs (a divergence "
            "that weighs the tail needs the dense signal); use a larger k, a sampled cache (unbiased) or a dense one"
        )
    elif by_head and best["head_grad_bias"] > tol:
        hint = (
            f"{divergence} estimated from sampled draws is biased here (more draws shrink its noise, not its "
            "bias); use a top-k or dense cache"
        )
    else:
        hint = (
            "a sampled signal is unbiased but noisy (its variance falls as 1/draws); use more draws (at most 255)"
            + (f", a finer dtype than {dtype} (grad_bias is its rounding)" if dtype != "fp32" else "")
            + " or a dense cache"
        )
    return f"no {param} of {tried} is within {within}: the best, {param}={best[param]}, has {_errors(best, by_head)}; {hint}"


def _certify_rows(
    zt: list[Tensor],
    zs: list[Tensor],
    feats: list[Tensor],
    keys: list[tuple[int, int]],
    max_rows: int,
    empty: str,
    divergence: str,
    params: dict | None,
    kind: SparseKind,
    candidates: Sequence[int],
    options: dict[str, Any],
) -> dict[str, Any]:
    """:func:`certify` on a probe's first ``max_rows`` rows, gathered per batch (teacher and student logits,
    the student's features, row keys); the features are used when the rows span two examples or more."""
    n = min(len(keys), max_rows)
    if n == 0:
        raise ValueError(empty)
    return certify(
        torch.cat(zt)[:n],
        torch.cat(zs)[:n],
        divergence,
        params,
        kind=kind,
        candidates=candidates,
        row_keys=keys[:n],
        features=torch.cat(feats)[:n] if len({e for e, _ in keys[:n]}) > 1 else None,
        **options,
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
    fills right padding, which the attention mask hides. The student's final hidden states at the rows are
    the ``features`` of the head criterion when the probe's rows span two examples or more (else the
    logit criterion). ``options`` go to :func:`certify`; the result
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
    feats: list[Tensor] = []
    keys: list[tuple[int, int]] = []
    used = 0
    with eval_mode(teacher, student), torch.no_grad():
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
                rows = target_rows(hidden, index.to(dev))
                acc.append(head(rows).float()[:, :vocab].to(s_dev))
                if model is student:
                    feats.append(rows.float())
            used = members[-1] + 1
    empty = f"the {used} probe examples have no target rows (every label is -100)"
    out = _certify_rows(zt, zs, feats, keys, max_rows, empty, divergence, params, kind, candidates, options)
    out["examples"] = used
    return out


def certify_models_cross(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    examples: list[dict],
    teacher_examples: list[dict],
    example_map: dict[int, int],
    divergence: str,
    params: dict | None = None,
    *,
    kind: SparseKind,
    candidates: Sequence[int],
    student_tokenizer,
    teacher_tokenizer,
    projection: Projection,
    max_rows: int = 512,
    batch_size: int = 8,
    pad_id: int = 0,
    teacher_pad_id: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """:func:`certify` of a cache in the teacher's own tokens for a student with another tokenizer, on what
    :class:`~.cross.CrossTokenizerCache` trains it with: at most ``max_rows`` student target rows aligned on
    the response with a row of the same pair in the teacher's encoding
    (:func:`~potstill.data.cross_tokenizer.response_alignment`), through ``projection``.

    ``examples`` are the student's encoded examples (``example_id`` or their list index), ``teacher_examples``
    the cache's examples (the pairs in the teacher's tokens; the list index is the cache's key and, with the
    aligned row, seeds the draws), ``example_map`` student example id -> teacher example index (an example
    without one is skipped). The teacher runs on its own encoding, the student on its own (each on its own
    device, no gradients, eval mode restored); the student's final hidden states at the rows are the head
    criterion's ``features`` when the rows span two examples or more. ``options`` go to :func:`certify`; the
    result has ``"examples"`` (student examples read) and ``"aligned_row_share"`` (of their target rows).
    """
    from ...data import PadCollator
    from ...data.cross_tokenizer import response_alignment
    from ...models import final_hidden
    from ...models.placement import head_on, input_device
    from ...models.vocab_map import special_ids

    if max_rows < 1 or batch_size < 1:
        raise ValueError(f"max_rows ({max_rows}) and batch_size ({batch_size}) must be >= 1")
    if not examples:
        raise ValueError("no examples to build the probe from")
    t_dev, s_dev = input_device(teacher), input_device(student)
    t_head, s_head = head_on(teacher, t_dev), head_on(student, s_dev)
    v_s = projection.student_vocab
    if v_s > s_head.vocab:
        raise ValueError(f"the projection's student vocabulary {v_s} exceeds the student's head ({s_head.vocab})")
    s_special, t_special = special_ids(student_tokenizer), special_ids(teacher_tokenizer)
    columns = ("input_ids", "attention_mask", "labels")
    s_collate, t_collate = PadCollator(pad_id), PadCollator(teacher_pad_id)
    zt: list[Tensor] = []
    zs: list[Tensor] = []
    feats: list[Tensor] = []
    keys: list[tuple[int, int]] = []
    used = targets = 0
    with eval_mode(teacher, student), torch.no_grad():
        for b0 in range(0, len(examples), batch_size):
            if len(keys) >= max_rows:
                break
            members = range(b0, min(b0 + batch_size, len(examples)))
            used = members[-1] + 1
            pairs = []  # (student example, teacher example index, alignment)
            for i in members:
                ex = examples[i]
                targets += sum(1 for y in ex["labels"][1:] if y != -100)
                tid = example_map.get(int(ex.get("example_id", i)))
                if tid is None:
                    continue
                t = teacher_examples[tid]
                align = response_alignment(
                    student_tokenizer,
                    ex["input_ids"],
                    ex["labels"],
                    teacher_tokenizer,
                    t["input_ids"],
                    t["labels"],
                    student_special=s_special,
                    teacher_special=t_special,
                )
                if any(a >= 0 for a in align):
                    pairs.append((ex, tid, align))
            if not pairs:
                continue
            s_batch = s_collate([{k: ex[k] for k in columns} for ex, _, _ in pairs])
            t_batch = t_collate([{k: teacher_examples[tid][k] for k in columns} for _, tid, _ in pairs])
            s_take: list[int] = []
            t_take: list[int] = []
            s_off = t_off = 0
            s_counts = (s_batch["labels"][:, 1:] != -100).sum(-1).tolist()
            t_counts = (t_batch["labels"][:, 1:] != -100).sum(-1).tolist()
            for (_, tid, align), sc, tc in zip(pairs, s_counts, t_counts):
                for r, a in enumerate(align):
                    if a >= 0:
                        s_take.append(s_off + r)
                        t_take.append(t_off + a)
                        keys.append((tid, a))
                s_off, t_off = s_off + sc, t_off + tc
            for model, head, dev, batch, take in (
                (student, s_head, s_dev, s_batch, s_take),
                (teacher, t_head, t_dev, t_batch, t_take),
            ):
                hidden = final_hidden(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
                rows = target_rows(hidden, target_index(batch["labels"]).to(dev))
                rows = rows.index_select(0, torch.tensor(take, dtype=torch.long, device=dev))
                if model is student:
                    zs.append(head(rows).float()[:, :v_s])
                    feats.append(rows.float())
                else:
                    zt.append(head(rows).float().to(s_dev))
    empty = f"none of the {used} probe examples has a target row aligned with the teacher's encoding of the pair"
    options = {**options, "projection": projection}
    out = _certify_rows(zt, zs, feats, keys, max_rows, empty, divergence, params, kind, candidates, options)
    out["examples"] = used
    out["aligned_row_share"] = len(keys) / max(targets, 1)
    return out
