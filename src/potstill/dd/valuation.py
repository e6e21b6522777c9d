"""Data valuation: what each training example is worth to a learner, for selection and for finding label noise.

* :func:`knn_shapley` -- the exact Shapley value of every training point for an unweighted K-NN classifier
  (Jia et al. 2019, "Efficient Task-Specific Data Valuation for Nearest Neighbor Algorithms", VLDB,
  Theorem 1), in ``O(N log N)`` per test point. For one test point ``(x, y)`` with the training points sorted
  by distance, ``alpha_1`` nearest, and ``m_i = 1[y_{alpha_i} = y]``:

      ``s_{alpha_N} = m_N * min(K, N) / (K N)``
      ``s_{alpha_i} = s_{alpha_{i+1}} + (m_i - m_{i+1}) / K * min(K, i) / i``

  the Shapley values of the utility ``U(S) = 1/K sum_{k <= min(K, |S|)} 1[y_{alpha_k(S)} = y]`` (the
  likelihood of the right label, ``U(empty) = 0``). The paper writes ``s_{alpha_N} = m_N / N``, which is the
  same when ``N >= K``; with ``N < K`` every point is always among the K nearest and its value is ``m / K``,
  which the ``min(K, N)`` form gives. The values of several test points are averaged (the utility is their
  mean). Ties in distance go to the lower index.
* :func:`tmc_shapley` -- Truncated Monte-Carlo Data Shapley (Ghorbani & Zou 2019, "Data Shapley", ICML,
  Algorithm 1) for any incremental :class:`Utility`: random permutations, the marginal contribution of each
  point to the learner's validation performance when it joins its predecessors, the scan of a permutation
  truncated once the running performance is within ``tolerance`` of the full-data performance (the later
  points get 0), values the running mean over permutations. Stops after ``permutations`` or earlier by the
  paper's convergence rule (Sec. 4: the mean relative change of the values over the last ``window``
  permutations below ``convergence``; taken here as ``sum_i |phi_t - phi_{t-w}| / sum_i |phi_t|`` so that
  near-zero values do not divide by zero).
* :class:`NearestCentroidUtility` -- the cheap learner of the TMC utility: validation accuracy of a
  nearest-class-centroid classifier (squared Euclidean distance) trained on the subset, updated in ``O(M + N)``
  per added point from precomputed Gram matrices. ``V(empty)`` is chance, ``1 / C``.
* :func:`per_class_top` picks the highest values per class; :func:`lowest` flags the lowest-valued share as
  suspect (mislabelled examples have negative value: they pull their neighbours' votes the wrong way).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import PotstillError

__all__ = [
    "NearestCentroidUtility",
    "Utility",
    "check_pool_size",
    "knn_shapley",
    "lowest",
    "per_class_top",
    "tmc_shapley",
]


def _xy(x, y, what: str) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    y = torch.as_tensor(y).detach().to("cpu").long().reshape(-1)
    if x.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise PotstillError(
            f"{what}: need embeddings [N, D] with N >= 1 and one label each; got {tuple(x.shape)} and {y.shape[0]}"
        )
    return x, y


def knn_shapley(train_x, train_y, test_x, test_y, k: int, *, chunk: int = 256) -> Tensor:
    """Exact K-NN Shapley values (Jia et al. 2019, Theorem 1; module docstring), averaged over test points.

    ``train_x [N, D]``, ``train_y [N]``, ``test_x [M, D]``, ``test_y [M]``; Euclidean distance. Returns
    ``[N]`` float64; the values sum to ``mean_test U(train) - U(empty)`` (efficiency). ``chunk`` test points
    are sorted at a time (memory ``chunk x N``).
    """
    tx, ty = _xy(train_x, train_y, "knn_shapley train")
    vx, vy = _xy(test_x, test_y, "knn_shapley test")
    if k < 1:
        raise PotstillError(f"knn_shapley k={k} must be >= 1")
    n = tx.shape[0]
    i = torch.arange(1, n, dtype=torch.float64)  # ranks 1..N-1
    step = torch.clamp(i, max=k) / (k * i)  # min(K, i) / (K i)
    out = torch.zeros(n, dtype=torch.float64)
    for s in range(0, vx.shape[0], chunk):
        d = torch.cdist(vx[s : s + chunk], tx)  # [m, N]
        order = torch.sort(d, dim=1, stable=True).indices  # alpha_1 .. alpha_N per test point
        match = (ty[order] == vy[s : s + chunk, None]).double()  # m_i in sorted order
        last = match[:, -1:] * (min(k, n) / (k * n))
        # s_i = s_N + sum_{j = i}^{N-1} (m_j - m_{j+1}) min(K, j) / (K j): a reversed cumulative sum
        inc = (match[:, :-1] - match[:, 1:]) * step
        vals = torch.cat([torch.flip(torch.cumsum(torch.flip(inc, [1]), 1), [1]) + last, last], 1)
        out.index_add_(0, order.reshape(-1), vals.reshape(-1))
    return out / vx.shape[0]


class Utility(Protocol):
    """An incremental learner performance ``V(S)`` for :func:`tmc_shapley`."""

    n: int

    def empty(self) -> float:
        """``V(empty)``."""

    def full(self) -> float:
        """``V(D)``, all ``n`` points."""

    def start(self) -> None:
        """Forget every point (the next :meth:`add` starts from the empty set)."""

    def add(self, i: int) -> float:
        """Add point ``i`` to the current subset and return ``V`` of the subset."""


class NearestCentroidUtility:
    """Validation accuracy of a nearest-centroid classifier on a growing subset (module docstring).

    ``train_x [N, D]``, ``train_y [N]``, ``val_x [M, D]``, ``val_y [M]``, labels in ``0..num_classes-1``.
    A class with no point in the subset is never predicted; ties go to the lower class; the empty set scores
    ``1 / num_classes`` (chance). The running sums are numpy float64: one :meth:`add` is a handful of
    ``O(M + N)`` vector ops, where torch's per-op overhead would dominate.
    """

    def __init__(self, train_x, train_y, val_x, val_y, num_classes: int | None = None):
        tx, ty = _xy(train_x, train_y, "nearest-centroid train")
        vx, vy = _xy(val_x, val_y, "nearest-centroid validation")
        self.n = tx.shape[0]
        self.c = int(num_classes or max(int(ty.max()), int(vy.max())) + 1)
        self.ty, self.vy = ty.numpy(), vy.numpy()
        self.cross = (tx @ vx.T).numpy()  # [N, M]: x_i . x_val
        self.gram = (tx @ tx.T).numpy()  # [N, N]
        self.start()

    def empty(self) -> float:
        return 1.0 / self.c

    def start(self) -> None:
        m = self.cross.shape[1]
        self.dot = np.zeros((self.c, m))  # x_val . sum_c
        self.with_sum = np.zeros((self.c, self.n))  # x_i . sum_c
        self.sq = np.zeros(self.c)  # ||sum_c||^2
        self.count = np.zeros(self.c)

    def add(self, i: int) -> float:
        c = int(self.ty[i])
        self.sq[c] += 2 * self.with_sum[c, i] + self.gram[i, i]
        self.with_sum[c] += self.gram[i]
        self.dot[c] += self.cross[i]
        self.count[c] += 1
        return self._accuracy()

    def _accuracy(self) -> float:
        # ||x - sum_c / n_c||^2 - ||x||^2 = -2 x.sum_c / n_c + ||sum_c||^2 / n_c^2 (||x||^2 is the same for all c)
        n_c = np.maximum(self.count, 1.0)[:, None]
        dist = -2 * self.dot / n_c + self.sq[:, None] / n_c**2
        dist[self.count == 0] = np.inf
        return float((dist.argmin(0) == self.vy).mean())

    def full(self) -> float:
        self.start()
        for c in range(self.c):
            members = np.flatnonzero(self.ty == c)
            self.count[c] = len(members)
            self.dot[c] = self.cross[members].sum(0)
            self.sq[c] = self.gram[np.ix_(members, members)].sum()
        v = self._accuracy()
        self.start()
        return v


def check_pool_size(n: int, max_pool: int) -> None:
    """Refuse TMC-Shapley on a pool too large for its ``O(permutations x N)`` learner updates."""
    if n > max_pool:
        raise PotstillError(
            f"tmc_shapley would value {n} examples, more than select.valuation.max_pool={max_pool}; lower "
            "data.pool_size, raise max_pool, or use scorer knn_shapley (exact and fast on any pool)"
        )


def tmc_shapley(
    utility: Utility,
    *,
    permutations: int = 200,
    tolerance: float = 0.01,
    convergence: float | None = None,
    window: int = 100,
    seed: int = 0,
    max_pool: int | None = None,
) -> tuple[Tensor, dict]:
    """Truncated Monte-Carlo Shapley values (Ghorbani & Zou 2019, Algorithm 1; module docstring).

    For permutation ``t``: ``v_0 = V(empty)``; for ``j = 1..N``, if ``|V(D) - v_{j-1}| < tolerance`` then
    ``v_j = v_{j-1}`` (truncated), else ``v_j = V({pi_1..pi_j})``; ``phi_{pi_j} <- (t-1)/t phi_{pi_j} +
    (v_j - v_{j-1})/t``. ``tolerance = 0`` never truncates (plain permutation sampling, unbiased).

    Returns ``(values [N] float64, info)`` with ``info = {permutations, converged, evaluations,
    full_score, empty_score}`` (``evaluations``: calls of ``utility.add``).
    """
    n = utility.n
    if max_pool is not None:
        check_pool_size(n, max_pool)
    if permutations < 1 or tolerance < 0 or window < 1:
        raise PotstillError(
            f"tmc_shapley needs permutations >= 1, tolerance >= 0, window >= 1; got "
            f"{permutations}, {tolerance}, {window}"
        )
    g = torch.Generator().manual_seed(seed)
    full, empty = utility.full(), utility.empty()
    phi = torch.zeros(n, dtype=torch.float64)
    marg = torch.zeros(n, dtype=torch.float64)
    history: deque[Tensor] = deque(maxlen=window)
    evaluations, converged, t = 0, False, 0
    for t in range(1, permutations + 1):
        utility.start()
        marg.zero_()
        prev = empty
        for i in torch.randperm(n, generator=g).tolist():
            if abs(full - prev) < tolerance:
                break  # the rest of the permutation adds (almost) nothing: marginal 0
            v = utility.add(i)
            evaluations += 1
            marg[i] = v - prev
            prev = v
        phi += (marg - phi) / t
        if convergence is not None:
            if len(history) == window:
                change = float((phi - history[0]).abs().sum() / phi.abs().sum().clamp_min(1e-12))
                if change < convergence:
                    converged = True
                    break
            history.append(phi.clone())
    info = {
        "permutations": t,
        "converged": converged,
        "evaluations": evaluations,
        "full_score": full,
        "empty_score": empty,
    }
    return phi, info


def per_class_top(values, labels, counts: Mapping[int, int]) -> Tensor:
    """Indices of the ``counts[y]`` highest values of each label ``y`` (ties to the lower index), class by
    class in ``counts`` order. ``values [N]``, ``labels [N]`` -> ``LongTensor [sum(counts)]``."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    lab = torch.as_tensor(labels).reshape(-1)
    out = []
    for y, k in counts.items():
        rows = (lab == y).nonzero().flatten()
        if len(rows) < k:
            raise PotstillError(f"label {y} has {len(rows)} valued examples, fewer than {k}; lower the budget")
        out.append(rows[torch.sort(-v[rows], stable=True).indices[:k]])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def lowest(values, fraction: float) -> Tensor:
    """Indices of the ``ceil(fraction * N)`` lowest values, lowest first (ties to the lower index): the
    suspects of value-based removal of mislabelled examples. ``values [N]`` -> ``LongTensor``."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not 0.0 <= fraction <= 1.0:
        raise PotstillError(f"suspect fraction {fraction} must be in [0, 1]")
    k = math.ceil(fraction * v.numel() - 1e-9)
    return torch.sort(v, stable=True).indices[:k]
