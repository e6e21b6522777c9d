"""Non-finite training stops before the step is applied: the decision and its message, every trainer
class, the step it names and the weights it leaves, gradient accumulation, the classifier's loop, and
two processes of which only one sees the NaN (both must raise, neither may hang)."""

from __future__ import annotations

import copy
import os
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from helpers import one_step_cpu_args
from helpers_proc import run_all
from transformers import TrainerCallback

from potstill.data import encode_example
from potstill.errors import PotstillError
from potstill.kd import (
    ContrastiveConfig,
    ContrastiveKDTrainer,
    CrossTokenizerKDTrainer,
    FeatureKDConfig,
    FeatureKDTrainer,
    KDConfig,
    KDTrainer,
    MiniLLMConfig,
    MiniLLMKDTrainer,
    NonFiniteTrainingError,
    OnPolicyConfig,
    OnPolicyKDTrainer,
    guards,
)
from potstill.kd.feature import PROJECTIONS
from potstill.kd.guards import KD_HINT, check_finite, nonfinite_flags, nonfinite_message

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "Four."),
    ("Write a poem about the sea.", "The sea is blue and the waves are loud at night."),
    ("How many days are in a week?", "Seven."),
    ("Explain why the sky is blue.", "Light from the sun is scattered by the air."),
    ("Count from one to ten:", "one, two, three, four, five"),
    ("Translate hello into Spanish:", "hola"),
    ("Please answer the question in one short sentence.", "Sure, here is a short answer."),
]


def dataset(tok):
    rows = [encode_example(tok, [{"role": "user", "content": p}], r, 128) for p, r in PAIRS]
    return Dataset.from_list([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in rows])


def cfg(tmp_path, config=KDConfig, **kw):
    return config(**one_step_cpu_args(tmp_path, **kw))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=0, msg=f"{k} differs")


def nan_from_call(module: torch.nn.Module, k: int, value: float = NAN):
    """From its ``k``-th forward on (1-based), ``module``'s output becomes ``value`` everywhere."""
    calls = [0]

    def hook(_mod, _inp, out):
        calls[0] += 1
        return out * value if calls[0] >= k else out

    module.register_forward_hook(hook)
    return calls


# ------------------------------------------------------------------------------ the decision


def test_finite_steps_pass_and_the_message_is_one_line_naming_step_value_and_fix():
    check_finite(1, torch.tensor(2.5), torch.tensor(0.3))
    check_finite(1, torch.tensor(2.5), None)
    check_finite(1, 2.5, 0.3)
    with pytest.raises(NonFiniteTrainingError) as err:
        check_finite(3, torch.tensor(NAN), torch.tensor(INF), run="fkl")
    msg = str(err.value)
    assert isinstance(err.value, PotstillError) and "\n" not in msg
    assert msg == f"training diverged at step 3 of run fkl: the loss is nan (gradient norm inf); {KD_HINT}"
    assert "learning_rate" in msg and "temperature" in msg and "divergence" in msg


@pytest.mark.parametrize(
    ("loss", "norm", "what"),
    [
        (INF, 1.0, "the loss is inf;"),
        (-INF, None, "the loss is -inf;"),
        (1.0, NAN, "the gradient norm is nan (the loss is finite);"),
        (torch.tensor([1.0, INF]), torch.tensor(2.0), "the loss is inf;"),
        (torch.tensor([INF, -INF]), 2.0, "the loss is nan;"),  # their sum
    ],
)
def test_each_kind_of_non_finite_value_is_named(loss, norm, what):
    with pytest.raises(
        NonFiniteTrainingError, match="^training diverged at step 7: " + what.replace("(", r"\(").replace(")", r"\)")
    ):
        check_finite(7, loss, norm)


def test_ranks_agree_by_max_and_the_message_names_the_first_rank_that_diverged():
    """What ``agree`` does across processes, computed here by hand: the element-wise MAX of every rank's flags."""
    ok = nonfinite_flags(torch.tensor(1.0), torch.tensor(1.0), rank=0, world_size=4)
    bad2 = nonfinite_flags(torch.tensor(1.0), torch.tensor(INF), rank=2, world_size=4)
    bad3 = nonfinite_flags(torch.tensor(NAN), torch.tensor(NAN), rank=3, world_size=4)
    assert ok.tolist() == [0.0] * 7
    assert nonfinite_message(ok.tolist(), 5, world_size=4) is None
    reduced = torch.stack([ok, bad3, bad2, ok]).amax(0).tolist()
    msg = nonfinite_message(reduced, 5, world_size=4)
    assert msg.startswith("training diverged at step 5 (first on rank 2): the loss is nan (gradient norm nan)")
    assert nonfinite_message(bad3.tolist(), 5).startswith("training diverged at step 5: the loss is nan")


# -------------------------------------------------------------------------------- KDTrainer


def test_nan_at_step_3_stops_before_that_step_with_the_weights_after_step_2(tiny_llama_pair, tmp_path, monkeypatch):
    teacher, student, tok = tiny_llama_pair

    def no_second_pass(model):
        raise AssertionError("the check must reuse Trainer's gradient norm, not walk the gradients again")

    monkeypatch.setattr(guards, "_local_grad_norm", no_second_pass)
    reference = copy.deepcopy(student)
    KDTrainer(
        model=reference,
        teacher_model=copy.deepcopy(teacher),
        args=cfg(tmp_path / "ref", max_steps=2),
        train_dataset=dataset(tok),
        processing_class=tok,
    ).train()
    calls = nan_from_call(student.model.norm, 3)  # the student's 3rd forward (step 3) gives NaN hidden states
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg(tmp_path, max_steps=5),
        train_dataset=dataset(tok),
        processing_class=tok,
    )
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"^training diverged at step 3: the loss is nan \(gradient "
        r"norm nan\); lower train\.learning_rate",
    ):
        trainer.train()
    assert calls[0] == 3 and trainer.state.global_step == 2
    after = weights(student)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert_same(after, weights(reference))


def test_a_huge_learning_rate_stops_at_the_first_bad_step_with_finite_weights(tiny_llama_pair, tmp_path):
    teacher, student, tok = tiny_llama_pair
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg(tmp_path, max_steps=6, learning_rate=1e30, max_grad_norm=0.0),
        train_dataset=dataset(tok),
        processing_class=tok,
    )
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.train()
    step = trainer.state.global_step + 1
    assert step > 1 and str(err.value).startswith(f"training diverged at step {step}: ")
    assert all(torch.isfinite(v).all() for v in weights(student).values())


@pytest.mark.parametrize(("max_grad_norm", "own_norm"), [(1.0, False), (0.0, False), (1.0, True)])
def test_a_non_finite_gradient_with_a_finite_loss_is_caught(
    tiny_llama_pair, tmp_path, monkeypatch, max_grad_norm, own_norm
):
    """With clipping, without (Trainer's norm-only path), and with a Trainer that no longer reports its norm."""
    teacher, student, tok = tiny_llama_pair
    if own_norm:
        from transformers import Trainer

        monkeypatch.setattr(guards.NonFiniteGuard, "_get_grad_norm", Trainer._get_grad_norm)
    steps = [0]
    weight = student.model.layers[0].mlp.down_proj.weight
    weight.register_hook(lambda g: g * INF if steps[0] == 2 else g)
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg(tmp_path, max_steps=3, max_grad_norm=max_grad_norm),
        train_dataset=dataset(tok),
        processing_class=tok,
    )
    orig = trainer.training_step

    def counted(*a, **k):
        steps[0] = trainer.state.global_step + 1
        return orig(*a, **k)

    trainer.training_step = counted
    before = []

    class Snapshot(TrainerCallback):
        def on_step_begin(self, *a, **k):
            before.append(weights(student))

    trainer.add_callback(Snapshot())
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"^training diverged at step 2: the gradient norm is (nan|inf) "
        r"\(the loss is finite\)",
    ):
        trainer.train()
    assert_same(weights(student), before[1])  # step 2 never applied


def test_a_nan_in_one_micro_batch_of_an_accumulated_step_is_caught(tiny_llama_pair, tmp_path):
    """The loss is NaN in micro-batch 1 of step 2 (of 2), its gradients stay finite: only the summed loss sees it."""
    teacher, student, tok = tiny_llama_pair
    trainer = KDTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg(tmp_path, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=dataset(tok),
        processing_class=tok,
    )
    orig = trainer.compute_loss
    micro = [0]

    def loss_with_a_nan(*a, **k):
        micro[0] += 1
        loss = orig(*a, **k)
        return loss + NAN if micro[0] == 3 else loss  # a constant: d(loss + c) = d(loss), finite

    trainer.compute_loss = loss_with_a_nan
    with pytest.raises(NonFiniteTrainingError, match=r"^training diverged at step 2: the loss is nan;"):
        trainer.train()
    assert micro[0] == 4  # the step's second micro-batch ran, then the check stopped it


# ------------------------------------------------------------------------ every trainer class


def _make(kind, teacher, student, tok, tmp_path):
    ds = dataset(tok)
    gen = {"gen_max_new_tokens": 4}
    if kind == "kd":
        return KDTrainer(
            model=student, teacher_model=teacher, args=cfg(tmp_path), train_dataset=ds, processing_class=tok
        )
    if kind == "onpolicy":
        return OnPolicyKDTrainer(
            model=student,
            teacher_model=teacher,
            args=cfg(tmp_path, OnPolicyConfig, lmbda=1.0, **gen),
            train_dataset=ds,
            processing_class=tok,
        )
    if kind == "contrastive":
        return ContrastiveKDTrainer(
            model=student,
            teacher_model=teacher,
            args=cfg(tmp_path, ContrastiveConfig, **gen),
            train_dataset=ds,
            processing_class=tok,
        )
    if kind == "minillm":
        return MiniLLMKDTrainer(
            model=student,
            teacher_model=teacher,
            args=cfg(tmp_path, MiniLLMConfig, divergence="reverse_kl", **gen),
            train_dataset=ds,
            processing_class=tok,
        )
    if kind == "feature":
        return FeatureKDTrainer(
            model=student,
            teacher_model=teacher,
            args=cfg(tmp_path, FeatureKDConfig, feature_layers=[[1, 2]]),
            train_dataset=ds,
            processing_class=tok,
        )
    if kind == "cross_tokenizer":  # alpha = 1: the CE path of the cross-tokenizer trainer, no teacher tokenizer
        return CrossTokenizerKDTrainer(
            model=student, args=cfg(tmp_path, alpha=1.0), train_dataset=ds, processing_class=tok
        )
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["kd", "onpolicy", "contrastive", "minillm", "feature", "cross_tokenizer"])
def test_every_trainer_class_stops_before_a_nan_step(tiny_llama_pair, tmp_path, kind):
    teacher, student, tok = tiny_llama_pair
    trainer = _make(kind, teacher, student, tok, tmp_path)
    assert isinstance(trainer, guards.NonFiniteGuard)
    orig = trainer.compute_loss

    def nan_loss(*a, **k):
        out = orig(*a, **k)
        return (out[0] * NAN, out[1]) if isinstance(out, tuple) else out * NAN

    trainer.compute_loss = nan_loss
    # the student's own weights (feature KD's projections hang on it only while it trains)
    init = {k: v for k, v in weights(trainer.model).items() if PROJECTIONS not in k}
    with pytest.raises(NonFiniteTrainingError, match=r"^training diverged at step 1: the loss is nan"):
        trainer.train()
    assert_same(weights(trainer.model), init)


# ---------------------------------------------------------------------- the classifier's loop


def _tiny_classifier():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from potstill.models.classifier import TextClassifier

    words = ["[PAD]", "[UNK]", "good", "bad", "film", "the"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", model_max_length=16)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = BertModel(config, add_pooling_layer=False)
    return TextClassifier(encoder, tok, num_labels=2, seed=0)


def test_the_classifier_loop_stops_before_a_nan_step():
    from potstill.data.classification import Example
    from potstill.kd.classifier import train_classifier

    model = _tiny_classifier()
    init = weights(model)
    nan_from_call(model.head, 2)
    data = [Example("the good film", 1), Example("the bad film", 0)] * 4
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"^training diverged at step 2: the loss is nan \(gradient norm "
        r"nan\); lower the learning rate \(teacher\.lr / train\.lr\)",
    ):
        train_classifier(model, data, steps=4, batch_size=4, lr=1e-2, warmup_fraction=0.0)
    after = weights(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], init[k]) for k in init)  # step 1 was applied, step 2 was not


# ----------------------------------------------------------------------------- two processes

_RANK = textwrap.dedent("""
    import importlib.util, sys
    import torch, torch.distributed as dist
    rank, store, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    # the guards module alone (torch + potstill.errors), not potstill.kd and its transformers import
    spec = importlib.util.spec_from_file_location("potstill.kd.guards", path)
    guards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guards)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    try:
        guards.check_finite(1, torch.tensor(1.0), torch.tensor(1.0))
        loss = torch.tensor(float("nan") if rank == 1 else 1.0)  # a rank-local loss: only rank 1 sees the NaN
        try:
            guards.check_finite(2, loss, torch.tensor(1.0), run="r")
            print("NO-RAISE", flush=True)
        except guards.NonFiniteTrainingError as err:
            print("RAISED", err, flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_raise_together_when_only_one_sees_a_nan(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "store"), guards.__file__]
    # run_all kills both ranks' sessions on a timeout and fails the test if a process outlives it
    results = run_all([[sys.executable, "-c", _RANK, str(r), *args] for r in (0, 1)], env=env, timeout=180)
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
    outs = [(r.stdout, r.stderr) for r in results]
    lines = [out.strip() for out, _ in outs]
    want = f"RAISED training diverged at step 2 of run r (first on rank 1): the loss is nan; {KD_HINT}"
    assert lines == [want, want]
