"""Bayesian KD (Fang et al. ICML 2024): SGLD recovers a conjugate Gaussian posterior; the BKD potential against a
float64 reference and torch's Dirichlet; its mode is the KD minimiser (closed form); calibration metrics by hand;
the posterior predictive is an average over distinct samples (fails for plain KD); the classify recipe end to end;
recipe errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import tiny_bert, tiny_bert_tokenizer, toy_examples

import potstill.runners.classify as clf
from potstill.errors import PotstillError
from potstill.eval.cls_metrics import brier_score, classification_metrics, interval_coverage
from potstill.kd.bayesian import (
    SGLD,
    bkd_negative_log_posterior,
    calibration_report,
    dirichlet_log_prior,
    kd_alpha_of,
    posterior_predict,
    sample_classifier_posterior,
)
from potstill.kd.classifier import soft_label_kd
from potstill.models.classifier import TextClassifier
from potstill.recipes.classify import load_classifier_recipe
from potstill.runners.classify import run_classifier_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ SGLD


def _gaussian_posterior(x: torch.Tensor, sigma: float, mu0: float, s0: float) -> tuple[float, float]:
    """Conjugate normal-normal posterior of the mean: precision n/sigma^2 + 1/s0^2."""
    prec = len(x) / sigma**2 + 1 / s0**2
    return float((x.sum() / sigma**2 + mu0 / s0**2) / prec), 1 / prec


@pytest.mark.parametrize("batch", [None, 50])
def test_sgld_recovers_the_conjugate_gaussian_posterior(batch):
    """K independent chains (one SGLD parameter vector of K entries) on U(mu) = (N/m) sum_batch (x - mu)^2 / 2
    + (mu - mu0)^2 / (2 s0^2); the last states are K i.i.d. draws of SGLD's stationary law."""
    g = torch.Generator().manual_seed(0)
    n, sigma, mu0, s0, k = 100, 1.0, 0.5, 2.0, 4000
    x = 1.3 + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    mean, var = _gaussian_posterior(x, sigma, mu0, s0)
    prec = 1 / var
    eps = 0.02 / prec  # eps * P = 0.02: the Euler bias on the variance is 1 / (1 - eps P / 4) - 1 = 0.5 %
    mu = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = SGLD([mu], lr=eps, seed=1)
    steps = 800  # 8 relaxation times 2 / (eps P) = 100 steps: the start's influence on the mean is e^-8
    for _ in range(steps):
        if batch is None:
            data_term = ((x[None, :] - mu[:, None]) ** 2).sum(1) / (2 * sigma**2)
        else:
            idx = torch.randint(0, n, (k, batch), generator=g)  # each chain its own batch
            data_term = (n / batch) * ((x[idx] - mu[:, None]) ** 2).sum(1) / (2 * sigma**2)
        u = (data_term + (mu - mu0) ** 2 / (2 * s0**2)).sum()
        opt.zero_grad()
        u.backward()
        opt.step()
    draws = mu.detach()
    # Stationary variance of the discretized chain: (1 + eps V_g / 4) / (P (1 - eps P / 4)), V_g the variance
    # of the batch gradient (with replacement: N^2 / m * var(x) / sigma^4).
    v_g = 0.0 if batch is None else n**2 / batch * float(x.var(unbiased=False)) / sigma**4
    bias = (1 + eps * v_g / 4) / (1 - eps * prec / 4) - 1
    assert bias < 0.02  # 0.5 % full batch, 1.5 % with batches of 50
    se_mean, se_var = math.sqrt(var / k), var * math.sqrt(2 / (k - 1))
    assert abs(float(draws.mean()) - mean) < 4 * se_mean
    assert abs(float(draws.var()) - var) < 4 * se_var + bias * var


def test_sgld_schedule_burn_in_thinning_and_noise_free_step():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SGLD([p], lr=0.5, noise_scale=0.0, gamma=1.0, decay_offset=2.0, burn_in=3, thin=2)
    kept, sizes = [], []
    for _ in range(7):
        p.grad = torch.tensor([2.0, 4.0])
        sizes.append(opt.step_size())
        opt.step()
        kept.append(opt.is_sample())
    assert sizes == pytest.approx([0.5 * 2 / (2 + t) for t in range(7)])
    assert kept == [False, False, False, False, True, False, True]  # after burn-in 3: steps 5 and 7
    assert p.detach().tolist() == pytest.approx([1.0 - sum(sizes), -2.0 - 2 * sum(sizes)])  # - eps/2 * grad
    with pytest.raises(PotstillError, match="thin >= 1"):
        SGLD([p], lr=0.1, thin=0)


# ----------------------------------------------------------------------------- the posterior


def test_dirichlet_log_prior_equals_torch_dirichlet():
    g = torch.Generator().manual_seed(3)
    a = 1 + 5 * torch.rand(4, 3, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), -1)
    want = torch.distributions.Dirichlet(a).log_prob(q)
    assert torch.allclose(dirichlet_log_prior(q.log(), a), want, atol=1e-12)


def _ref_potential(z, y, zt, lam, tau, n):
    """Float64, written from the equations: sum_i [-log softmax(z_i)_y - log Dir(softmax(z_i/tau); 1 + lam p_i)]."""
    total = 0.0
    for i in range(len(y)):
        e = [math.exp(v) for v in z[i]]
        nll = -math.log(e[y[i]] / sum(e))
        et = [math.exp(v / tau) for v in zt[i]]
        p = [v / sum(et) for v in et]
        es = [math.exp(v / tau) for v in z[i]]
        q = [v / sum(es) for v in es]
        a = [1 + lam * pc for pc in p]
        logdir = sum((ac - 1) * math.log(qc) for ac, qc in zip(a, q)) - sum(math.lgamma(ac) for ac in a)
        total += nll - (logdir + math.lgamma(sum(a)))
    return total * n / len(y)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_potential_matches_float64_reference(tau):
    g = torch.Generator().manual_seed(5)
    z, zt = torch.randn(5, 3, generator=g, dtype=torch.float64), 2 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    got = bkd_negative_log_posterior(z, y, zt, prior_strength=3.0, temperature=tau, dataset_size=40)
    assert float(got) == pytest.approx(_ref_potential(z.tolist(), y.tolist(), zt.tolist(), 3.0, tau, 40), rel=1e-10)


def test_posterior_mode_is_the_kd_minimiser_in_closed_form():
    """One example, free logits, tau = 1: the Dirichlet-categorical posterior Dir(1 + lam p + e_y) has mode
    q* = (e_y + lam p) / (1 + lam), which is also the minimiser of Hinton KD with alpha = 1 / (1 + lam)."""
    lam, p, y = 3.0, torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64), torch.tensor([1])
    want = (torch.nn.functional.one_hot(y, 3).double() + lam * p) / (1 + lam)

    def argmin(loss_of):
        z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([z], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = loss_of(z)
            loss.backward()
            return loss

        opt.step(closure)
        return torch.softmax(z.detach(), -1)

    bkd = argmin(lambda z: bkd_negative_log_posterior(z, y, p.log(), prior_strength=lam))
    a = kd_alpha_of(lam, 1.0)
    kd = argmin(
        lambda z: (
            a * torch.nn.functional.cross_entropy(z, y) + (1 - a) * soft_label_kd(z, p.log(), temperature=1.0).sum()
        )
    )
    assert torch.allclose(bkd, want, atol=1e-7) and torch.allclose(kd, want, atol=1e-7)
    # noiseless SGLD (noise_scale=0) is gradient descent on U: it ends at the same mode
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    opt = SGLD([z], lr=0.2, noise_scale=0.0)
    for _ in range(3000):
        opt.zero_grad()
        bkd_negative_log_posterior(z, y, p.log(), prior_strength=lam).backward()
        opt.step()
    assert torch.allclose(torch.softmax(z.detach(), -1), want, atol=1e-7)


def test_tempered_potential_has_the_gradient_of_kd_over_alpha():
    """At any tau, grad U = grad(KD) / a with a = tau^2 / (tau^2 + lam): the same stationary points."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zt, y, lam, tau = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.tensor([0, 4, 2, 2]), 2.0, 3.0
    (gu,) = torch.autograd.grad(bkd_negative_log_posterior(z, y, zt, prior_strength=lam, temperature=tau), z)
    a = kd_alpha_of(lam, tau)
    kd = (
        a * torch.nn.functional.cross_entropy(z, y, reduction="sum")
        + (1 - a) * soft_label_kd(z, zt, temperature=tau).sum()
    )
    (gk,) = torch.autograd.grad(kd, z)
    assert torch.allclose(gu, gk / a, atol=1e-10)


# ------------------------------------------------------------------------ metrics by hand


def test_brier_ece_and_coverage_by_hand():
    probs = torch.tensor([[0.81, 0.19], [0.29, 0.71], [0.61, 0.39]])
    labels = [0, 0, 1]
    assert brier_score(probs, labels) == pytest.approx((2 * 0.19**2 + 2 * 0.71**2 + 2 * 0.61**2) / 3)
    assert classification_metrics(probs, labels)["ece"] == pytest.approx((0.19 + 0.71 + 0.61) / 3)
    # intervals at the predicted class; each example alone in its bin (accuracy 1, 0, 0)
    lo = torch.tensor([[0.7, 0.0], [0.0, 0.5], [0.0, 0.0]])
    hi = torch.tensor([[1.0, 0.3], [0.5, 0.9], [0.7, 0.4]])
    cov = interval_coverage(probs, lo, hi, labels)
    assert cov["coverage"] == pytest.approx(2 / 3) and cov["mean_width"] == pytest.approx((0.3 + 0.4 + 0.7) / 3)
    # two examples in one bin (0.9, 0.92 in (13/15, 14/15]): one right -> accuracy 0.5
    two = torch.tensor([[0.9, 0.1], [0.92, 0.08]])
    cov = interval_coverage(
        two, torch.tensor([[0.4, 0.0], [0.9, 0.0]]), torch.tensor([[0.95, 0.1], [0.95, 0.1]]), [0, 1]
    )
    assert cov["coverage"] == 0.5
    point = interval_coverage(probs, probs, probs, labels)  # a point estimate covers nothing here
    assert point == {"coverage": 0.0, "mean_width": 0.0}


def test_posterior_predict_mean_and_percentiles():
    s = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    samples = torch.stack([s, 1 - s], -1)[:, None, :]  # [S=5, N=1, C=2]
    pred = posterior_predict(samples, level=0.95)
    assert pred.mean[0].tolist() == pytest.approx([0.3, 0.7])
    # linear interpolation over 5 sorted values: quantile q sits at position 4q
    assert pred.lower[0].tolist() == pytest.approx([0.11, 0.51]) and pred.upper[0].tolist() == pytest.approx(
        [0.49, 0.89]
    )
    with pytest.raises(PotstillError, match="level"):
        posterior_predict(samples, level=1.0)


# ------------------------------------------------------------------------ classifier student


@pytest.fixture(scope="module")
def tok():
    return tiny_bert_tokenizer()


def test_classifier_posterior_is_an_average_over_distinct_samples(tok):
    """Fails for plain KD: its 'samples' would all be one model (zero-width intervals, mean = that model)."""
    model = TextClassifier(tiny_bert(tok, layers=1, hidden=16, seed=3), tok, seed=3)
    train, held = toy_examples(48, 1), toy_examples(12, 2)
    teacher_probs = torch.tensor([[0.2, 0.8] if e.label else [0.8, 0.2] for e in train])
    kw = dict(prior_strength=2.0, temperature=2.0, lr=1e-4, burn_in=3, samples=4, thin=2, batch_size=8, max_length=16)
    log = sample_classifier_posterior(copy.deepcopy(model), train, teacher_probs, held, seed=0, **kw)
    assert log.sample_probs.shape == (4, 12, 2) and log.steps == 3 + 4 * 2
    assert all(not torch.equal(log.sample_probs[i], log.sample_probs[i + 1]) for i in range(3))
    pred = posterior_predict(log.sample_probs)
    assert torch.allclose(pred.mean, log.sample_probs.double().mean(0))
    assert (pred.upper - pred.lower).min() > 0
    again = sample_classifier_posterior(copy.deepcopy(model), train, teacher_probs, held, seed=0, **kw)
    assert torch.equal(again.sample_probs, log.sample_probs)  # seeded noise: repeatable
    still = sample_classifier_posterior(copy.deepcopy(model), train, teacher_probs, held, seed=0, noise_scale=0.0, **kw)
    assert not torch.equal(still.sample_probs, log.sample_probs)
    report = calibration_report(pred, [e.label for e in held])
    assert report["mean_width"] > 0 and report["ece_bins"] == 15 and 0 <= report["brier"] <= 2


def _tiny_recipe(tmp_path, **method):
    return load_classifier_recipe(
        {
            "dataset": "sms_spam",
            "output_dir": str(tmp_path / "unused"),
            "data": {"train_size": 80, "eval_fraction": 0.25},
            "teacher": {"model": "tiny", "steps": 40, "batch_size": 16, "lr": 3e-3},
            "student": {"kind": "layers", "layers": [0, 2]},
            "kd": {"hidden_weight": 0.0},
            "train": {"steps": 8, "batch_size": 8, "lr": 1e-3, "max_length": 16},
            "eval": {"latency_batch_size": 4, "latency_repeats": 1},
            "method": {"kind": "bayesian", "prior_strength": 2.0, "temperature": 2.0, **method},
        }
    )


def test_classify_recipe_with_bayesian_method_end_to_end(tmp_path, monkeypatch, tok):
    monkeypatch.setattr(clf, "load_encoder", lambda name: (tiny_bert(tok, layers=3, hidden=32, seed=2), tok))
    monkeypatch.setattr(clf, "load_sms_spam", lambda: toy_examples(140, 8))
    recipe = _tiny_recipe(tmp_path, sgld={"lr": 1e-4, "burn_in": 2, "samples": 3, "thin": 2})
    out = tmp_path / "run"
    m = run_classifier_recipe(recipe, out)
    assert json.loads((out / "metrics.json").read_text()) == m
    assert set(m["models"]) == {"teacher", "kd_student", "no_teacher", "bayesian_student"}
    b, row = m["bayesian"], m["models"]["bayesian_student"]
    assert b["sgld_steps"] == 2 + 3 * 2 and b["kd_alpha"] == pytest.approx(4 / 6) and b["samples"] == 3
    assert row["mean_width"] > 0 and 0 <= row["coverage"] <= 1 and 0 <= row["brier"] <= 2 and row["ece_bins"] == 15
    assert "brier" in m["models"]["kd_student"] and set(b["mode"]) >= {"accuracy", "ece", "brier"}
    lines = [json.loads(s) for s in (out / "posterior_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == m["n_eval"] > 0
    assert all(lo <= hi for r in lines for lo, hi in zip(r["lower"], r["upper"]))
    assert any(hi > lo for r in lines for lo, hi in zip(r["lower"], r["upper"]))
    mean = torch.tensor([r["mean"] for r in lines], dtype=torch.float64)
    assert row["accuracy"] == pytest.approx(
        float((mean.argmax(-1) == torch.tensor([r["label"] for r in lines])).double().mean())
    )
    assert "Bayesian KD student" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "method, match",
    [
        ({"kind": "bayes"}, "'method.kind' is 'bayes'"),
        ({"prior_strength": 1.0}, "method needs a kind"),
        ({"kind": "bayesian", "prior_strength": 0}, "'method.prior_strength'"),
        ({"kind": "bayesian", "sgld": {"samples": 1}}, "'method.sgld.samples'"),
        ({"kind": "bayesian", "sgld": {"thinn": 2}}, "'method.sgld.thinn' is not a known option"),
        ({"kind": "bayesian", "level": 1.0}, "'method.level'"),
        ({"kind": "kd", "prior_strength": 1.0}, "'method.prior_strength' is not a known option"),
    ],
)
def test_bad_bayesian_recipes_name_the_key(method, match):
    with pytest.raises(PotstillError, match=match):
        load_classifier_recipe({"dataset": "sms_spam", "method": method})


def test_default_method_is_plain_kd():
    r = load_classifier_recipe({"dataset": "sst2"})
    assert r.method.kind == "kd"
