"""Float64 reference divergences written from the definitions, independently of
``potstill.divergences`` (no imports from it): plain probabilities, explicit sums
(mixtures, powers and |p - q| on probabilities, not log-space tricks).

Each function takes ``student_logits, teacher_logits`` ``[..., V]`` (any float dtype,
converted to float64) and returns ``[...]``; torch autograd through these plain
formulas gives the reference gradients.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import torch


def softmax_and_log(logits, temperature=1.0):
    """(probabilities, log-probabilities) in float64, by hand."""
    x = logits.double() / temperature
    shifted = x - x.max(dim=-1, keepdim=True).values
    e = torch.exp(shifted)
    z = e.sum(dim=-1, keepdim=True)
    return e / z, shifted - torch.log(z)


def _xlogy_sum(a, log_a, b):
    """sum_v a_v (log a_v - log b_v), skipping a_v == 0, with b a plain probability."""
    live = a > 0
    b_safe = torch.where(live, b, torch.ones_like(b))  # keep log finite where skipped
    return torch.where(live, a * (log_a - torch.log(b_safe)), torch.zeros_like(a)).sum(-1)


def kl(a, log_a, b, log_b):
    """KL(a || b) = sum_v a_v (log a_v - log b_v), skipping a_v == 0."""
    live = a > 0
    return torch.where(live, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def forward_kl(s, t, temperature=1.0):
    q, lq = softmax_and_log(s, temperature)
    p, lp = softmax_and_log(t, temperature)
    return kl(p, lp, q, lq)


def reverse_kl(s, t, temperature=1.0):
    q, lq = softmax_and_log(s, temperature)
    p, lp = softmax_and_log(t, temperature)
    return kl(q, lq, p, lp)


def generalized_jsd(s, t, temperature=1.0, beta=0.5):
    q, lq = softmax_and_log(s, temperature)
    p, lp = softmax_and_log(t, temperature)
    m = beta * p + (1 - beta) * q
    return beta * _xlogy_sum(p, lp, m) + (1 - beta) * _xlogy_sum(q, lq, m)


def skew_forward_kl(s, t, temperature=1.0, alpha=0.1):
    q, lq = softmax_and_log(s, temperature)
    p, lp = softmax_and_log(t, temperature)
    return _xlogy_sum(p, lp, alpha * p + (1 - alpha) * q)


def skew_reverse_kl(s, t, temperature=1.0, alpha=0.1):
    q, lq = softmax_and_log(s, temperature)
    p, lp = softmax_and_log(t, temperature)
    return _xlogy_sum(q, lq, alpha * q + (1 - alpha) * p)


def total_variation(s, t, temperature=1.0):
    q, _ = softmax_and_log(s, temperature)
    p, _ = softmax_and_log(t, temperature)
    return 0.5 * (p - q).abs().sum(-1)


class _Pow:
    """A probability whose powers are computed as exp(x * log)."""

    def __init__(self, prob, log_prob):
        self.prob, self.log = prob, log_prob

    def __pow__(self, x):
        return torch.exp(x * self.log)

    def __truediv__(self, other):
        return _Ratio(self.log - other.log)


class _Ratio:
    def __init__(self, log_ratio):
        self.log = log_ratio

    def __pow__(self, x):
        return torch.exp(x * self.log)


def alpha_beta_divergence(s, t, temperature=1.0, alpha=0.5, beta=0.5):
    """Cichocki, Cruces & Amari (2011), eq. (4) and its limits, term by term."""
    q, lq = softmax_and_log(s, temperature)
    p, lp = softmax_and_log(t, temperature)
    a, b = alpha, beta
    # powers through exp(log): pow(0, x < 1) would give an inf * 0 = NaN gradient
    p, q = _Pow(p, lp), _Pow(q, lq)
    if a != 0 and b != 0 and a + b != 0:
        terms = p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)
        return -terms.sum(-1) / (a * b)
    if a != 0 and b == 0:
        pa, qa = p**a, q**a
        return (pa * (a * lp - a * lq) - pa + qa).sum(-1) / a**2
    if a == 0 and b != 0:
        pb, qb = p**b, q**b
        return (qb * (b * lq - b * lp) - qb + pb).sum(-1) / b**2
    if a != 0:  # a = -b
        ratio = (q / p) ** a
        return (torch.log(ratio) + 1 / ratio - 1).sum(-1) / a**2
    return 0.5 * ((lp - lq) ** 2).sum(-1)


def akl_head(probs, mu):
    """AKL's head (Wu et al. 2024, Sec. 5) from the paper's text: the fewest outcomes whose teacher
    mass reaches mu -- take outcomes in order of decreasing p until their total reaches mu (the
    one that crosses mu included). Sums are exact (Fractions of the float64 probabilities); "reaches"
    is measured against the row's own total, which rounding keeps a hair off 1. Returns the set of
    indices; mu = 0 needs no outcome."""
    exact = [Fraction(float(x)) for x in probs]
    target = Fraction(float(mu)) * sum(exact, Fraction(0))
    head, mass = set(), Fraction(0)
    for v in sorted(range(len(exact)), key=lambda i: -exact[i]):
        if mass >= target:
            break
        head.add(v)
        mass += exact[v]
    return head


def adaptive_kl(s, t, temperature=1.0, mu=0.5):
    """Wu et al. (2024): w FKL + (1 - w) RKL, w = g_head / (g_head + g_tail) with the gaps
    g = sum |p - q| over the head / the rest, detached weights."""
    q, lq = softmax_and_log(s, temperature)
    p, lp = softmax_and_log(t, temperature)
    fkl, rkl = kl(p, lp, q, lq), kl(q, lq, p, lp)
    flat_p = p.detach().reshape(-1, p.shape[-1])
    flat_q = q.detach().reshape(-1, q.shape[-1])
    w = torch.empty(flat_p.shape[0], dtype=torch.float64)
    for r in range(flat_p.shape[0]):
        head = akl_head(flat_p[r].tolist(), mu)
        gaps = [abs(float(a) - float(b)) for a, b in zip(flat_p[r], flat_q[r])]
        g_head = sum(g for v, g in enumerate(gaps) if v in head)
        g_tail = sum(g for v, g in enumerate(gaps) if v not in head)
        w[r] = g_head / (g_head + g_tail) if g_head + g_tail > 0 else 0.5
    w = w.reshape(p.shape[:-1])
    return w * fkl + (1 - w) * rkl


REFERENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
    "alpha_beta_divergence": alpha_beta_divergence,
    "adaptive_kl": adaptive_kl,
}


def kd_loss(
    hidden,
    weight,
    bias,
    labels,
    teacher_logits,
    *,
    name,
    params,
    alpha,
    temperature,
    scale_t2,
    normalizer,
    logit_scale=None,
    softcap=None,
):
    """The reducer's loss from its definition, row by row, in float64."""
    h, w = hidden.double(), weight.double()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(h.shape[0]):
        if int(labels[i]) == -100:
            continue
        z = w @ h[i] + (0 if bias is None else bias.double())
        if logit_scale is not None:
            z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        _, log_q1 = softmax_and_log(z, 1.0)
        ce = -log_q1[int(labels[i])]
        div = torch.zeros((), dtype=torch.float64)
        if alpha < 1:
            div = REFERENCES[name](z, teacher_logits[i], temperature, **params)
        total = total + alpha * ce + (1 - alpha) * (temperature**2 if scale_t2 else 1.0) * div
    return total / (normalizer if normalizer else 1)


def sparse_forward_kl(z, ids, logprobs, weights=None, tail="bucket", tail_logprob=None, temperature=1.0):
    """Forward KL against one row of a sparse teacher, from the definitions, in float64.

    ``z [V]`` student logits; ``ids/logprobs/weights [k]`` (padding: logprob -inf); ``tail_logprob``
    a 0-d tensor or None. Sampled (weights given): ``sum_i w_i (log p_i - log q_i)``. Bucket: KL
    between ``(p_S, p_tail)`` and ``(q_S, q_tail)`` with ``q_tail`` the sum of q outside S and
    ``p_tail = 1 - sum p_S`` or, given ``tail_logprob``, both normalized by ``sum p_S + exp(tail)``;
    no tail outcome when S is the whole vocabulary. Renormalize: KL of p and q restricted to S
    and divided by their sums there.
    """
    q, lq = softmax_and_log(z, temperature)
    vocab = q.shape[-1]
    real = [i for i in range(len(ids)) if float(logprobs[i]) != float("-inf")]
    zero = torch.zeros((), dtype=torch.float64)
    if weights is not None:
        return sum((float(weights[i]) * (float(logprobs[i]) - lq[int(ids[i])]) for i in real), zero)
    chosen = [int(ids[i]) for i in real]
    p = torch.tensor([float(logprobs[i]) for i in real], dtype=torch.float64).exp()
    if tail == "renormalize":
        if not chosen:
            return zero
        pr, qr = p / p.sum(), q[chosen] / q[chosen].sum()
        return (pr * (pr.log() - qr.log())).sum()
    rest = [v for v in range(vocab) if v not in chosen]
    if not rest:
        p_tail = torch.zeros((), dtype=torch.float64)
    elif tail_logprob is None:
        p_tail = 1.0 - p.sum()
    else:
        p_tail = torch.tensor(float(tail_logprob), dtype=torch.float64).exp()
    if tail_logprob is not None:
        total = p.sum() + p_tail
        p, p_tail = p / total, p_tail / total
    out = (p * (p.log() - lq[chosen])).sum() if chosen else zero
    if float(p_tail) > 0:
        out = out + p_tail * (p_tail.log() - q[rest].sum().log())
    return out


def sparse_kd_loss(hidden, weight, bias, labels, signal, *, alpha, temperature, scale_t2, normalizer):
    """The reducer's loss (plain linear head) against a sparse teacher, row by row, in float64.

    ``signal`` is read as plain data (``ids``, ``logprobs``, ``weights``, ``tail``, ``tail_logprob``).
    """
    h, w = hidden.double(), weight.double()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(h.shape[0]):
        if int(labels[i]) == -100:
            continue
        z = w @ h[i] + (0 if bias is None else bias.double())
        _, log_q1 = softmax_and_log(z, 1.0)
        ce = -log_q1[int(labels[i])]
        div = torch.zeros((), dtype=torch.float64)
        if alpha < 1:
            div = sparse_forward_kl(
                z,
                signal.ids[i],
                signal.logprobs[i],
                None if signal.weights is None else signal.weights[i],
                signal.tail,
                None if signal.tail_logprob is None else signal.tail_logprob[i],
                temperature,
            )
        total = total + alpha * ce + (1 - alpha) * (temperature**2 if scale_t2 else 1.0) * div
    return total / (normalizer if normalizer else 1)


def _led_difference_kl(s, t, lead, temperature, top_k):
    """One half of BiLD (Li et al. 2024) at one position, from the definitions, with Python loops:
    the ``top_k`` indices of ``lead`` in its rank order, every pair ``a < b`` of them
    (``itertools.combinations`` keeps that order), the differences ``(z_a - z_b) / T`` of each model,
    a softmax over them by hand, and KL(teacher pairs || student pairs)."""
    order = sorted(range(lead.shape[0]), key=lambda v: -float(lead[v]))[:top_k]
    pairs = list(itertools.combinations(order, 2))
    if not pairs:
        return (s.sum() + t.sum()) * 0.0
    d_t = [(t[a] - t[b]) / temperature for a, b in pairs]
    d_s = [(s[a] - s[b]) / temperature for a, b in pairs]

    def log_softmax(d):
        m = max(float(x) for x in d)
        log_z = m + torch.log(sum(torch.exp(x - m) for x in d))
        return [x - log_z for x in d]

    lp, lq = log_softmax(d_t), log_softmax(d_s)
    return sum(torch.exp(a) * (a - b) for a, b in zip(lp, lq))


def bild(s, t, temperature=1.0, top_k=8, student_led=True):
    """BiLD = t-LD + s-LD (Li et al. 2024, arXiv:2406.13555): t-LD on the teacher's top-k pairs, s-LD on
    the student's, both KL(teacher || student) over the softmax of the logit differences; position by
    position in float64 (``student_led=False``: t-LD alone)."""
    s64, t64 = s.double(), t.double()
    v = s64.shape[-1]
    fs, ft = s64.reshape(-1, v), t64.reshape(-1, v)
    out = []
    for r in range(fs.shape[0]):
        val = _led_difference_kl(fs[r], ft[r], ft[r], temperature, top_k)
        if student_led:
            val = val + _led_difference_kl(fs[r], ft[r], fs[r], temperature, top_k)
        out.append(val)
    return torch.stack(out).reshape(s64.shape[:-1])


REFERENCES["bild"] = bild
