"""Teacher synthesis of instruction data (potstill.dd.synthesize): Self-Instruct and Evol-Instruct.

A scripted fake generator (a function of the prompt text) drives the parsing, filter and
resume logic; the tiny random Llama only drives the plumbing (generate_cached, decoding,
JSONL that the file loader reads), since its generations are gibberish.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

import potstill.generate as gen_mod
from potstill.data.loading import load_records, records_to_pairs
from potstill.dd.synthesize import (
    EVOL_OPERATIONS,
    Completion,
    NoveltyIndex,
    SeedTask,
    check_answer,
    check_evolution,
    copies_prompt,
    evol_prompt,
    load_seed_tasks,
    parse_answer,
    parse_evolution,
    parse_instructions,
    rouge_l_f,
    sample_examples,
    self_instruct_prompt,
    synthesize,
)
from potstill.errors import PotstillError
from potstill.generate import generate as real_generate
from potstill.runners.synthesize import load_synthesis_config, run_synthesis, synthesis_config_from_dict


def _synthesize(cfg, *args, **kwargs):
    """:func:`synthesize` of a recipe dict (validated as ``potstill synthesize`` does)."""
    return synthesize(synthesis_config_from_dict(cfg), *args, **kwargs)


RECIPE = Path(__file__).parents[2] / "recipes" / "synthesize_self_instruct.yaml"
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = [
    "river",
    "mountain",
    "recipe",
    "budget",
    "poem",
    "letter",
    "summary",
    "argument",
    "history",
    "planet",
    "garden",
    "engine",
    "market",
    "song",
    "puzzle",
    "theory",
    "habit",
    "museum",
    "journey",
    "contract",
]
VERBS = ["Write", "Explain", "Compare", "Describe", "Suggest", "Classify", "Summarize", "Plan", "Rewrite", "Translate"]


def _seeds(n: int = 12) -> list[SeedTask]:
    rng = random.Random(0)
    return [
        SeedTask(
            f"seed_{i}",
            f"{VERBS[i % len(VERBS)]} a {' '.join(rng.sample(WORDS, 3))} example number {i}.",
            "",
            f"Seed answer {i}: {' '.join(rng.sample(WORDS, 4))}.",
        )
        for i in range(n)
    ]


def _rouge(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


def _task(prompt: str) -> str:
    """The instruction an answer prompt asks about (answer_prompt puts it after 'Task: ')."""
    return prompt.split("Task: ", 1)[1] if "Task: " in prompt else prompt


class Fake:
    """A deterministic pseudo-teacher: every completion is a function of its prompt; records its calls."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[str] = []
        self.prompts: dict[str, list[str]] = {}
        self.fail_on = fail_on

    def __call__(self, prompts, *, tag, params):
        if self.fail_on and tag.startswith(self.fail_on):
            raise KeyboardInterrupt(f"killed in {tag}")
        self.calls.append(tag)
        self.prompts[tag] = list(prompts)
        out = []
        for p in prompts:
            rng = random.Random(hashlib.sha256(p.encode()).hexdigest())
            if tag.endswith("propose"):
                k = len(re.findall(r"(?m)^\d+\. ", p))
                lines = [f"{k + i + 1}. {rng.choice(VERBS)} {' '.join(rng.sample(WORDS, 6))}." for i in range(3)]
                out.append("Sure, here are new tasks:\n" + "\n".join(lines))
            else:
                out.append(f"Input: none\nOutput: {' '.join(rng.choice(WORDS) for _ in range(8))}.")
        return out


# ----------------------------------------------------------------------------- prompts and parsing


def test_sample_examples_is_seeded_and_mixes_pools():
    seeds, gen = [f"s{i}" for i in range(20)], [f"g{i}" for i in range(5)]
    a = sample_examples(seeds, gen, 6, 2, random.Random(3))
    assert a == sample_examples(seeds, gen, 6, 2, random.Random(3))
    assert a != sample_examples(seeds, gen, 6, 2, random.Random(4))
    assert len(a) == len(set(a)) == 6 and sum(x.startswith("g") for x in a) == 2
    assert sum(x.startswith("g") for x in sample_examples(seeds, gen[:1], 6, 2, random.Random(3))) == 1
    assert all(x.startswith("s") for x in sample_examples(seeds, [], 6, 2, random.Random(3)))
    with pytest.raises(PotstillError, match="k_in_context"):
        sample_examples(seeds[:3], [], 6, 2, random.Random(0))
    prompt = self_instruct_prompt(["Do X\n now.", "Do Y."], 3)
    assert "1. Do X now.\n2. Do Y.\n" in prompt and "numbered 3 to 5" in prompt


def test_rounds_sample_the_same_examples_in_every_run(tmp_path):
    cfg = {
        "method": {"n_instructions": 50, "rounds": 2, "prompts_per_round": 2, "k_in_context": 4, "machine_examples": 2}
    }
    a, b = Fake(), Fake()
    _synthesize(cfg, a, tmp_path / "a", generator_id="fake", seeds=_seeds())
    _synthesize(cfg, b, tmp_path / "b", generator_id="fake", seeds=_seeds())
    assert a.prompts == b.prompts
    listed = [re.findall(r"(?m)^\d+\. (.*)$", p) for p in a.prompts["round-002-propose"]]
    assert all(len(x) == 4 for x in listed)
    generated = {json.loads(line)["instruction"] for line in (tmp_path / "a" / "synthetic.jsonl").open()}
    assert all(sum(x in generated for x in ex) == 2 for ex in listed)  # 2 machine examples in round 2


def test_parse_numbered_lists():
    text = (
        "Sure! Here are the new tasks:\n\n9. Write a poem about cats.\n10) **Explain** gravity\n   to a child.\n"
        'Task 11: "List three fruits."\n12.\n**13.** Instruction: Plan a picnic.\n14. 1. Name a bird.\n'
        "\nI hope!\n"
        "The year 1990. was good"
    )
    assert parse_instructions(text) == [
        "Write a poem about cats.",
        "Explain gravity to a child.",
        "List three fruits.",
        "",
        "Plan a picnic.",
        "Name a bird.",
    ]
    assert parse_instructions("no list here, just chatter\nand more") == []
    assert parse_instructions("") == []
    assert parse_instructions("1.Write without a space.\n  2 . Spaced out number.") == [
        "Write without a space.",
        "Spaced out number.",
    ]
    assert parse_instructions("Intro 3. inside a line\n- a bullet") == []  # numbers must start a line


def test_parse_answers_and_evolutions():
    assert parse_answer("Input: none\nOutput: Paris.") == ("", "Paris.")
    assert parse_answer("Input: 3, 1, 2\nOutput: 1, 2, 3") == ("3, 1, 2", "1, 2, 3")
    assert parse_answer("**Output:** Yes.") == ("", "Yes.")
    assert parse_answer("Input: a list of numbers") is None  # input without output: unparsable
    assert parse_answer("Just the answer.") == ("", "Just the answer.")
    assert parse_answer("Sure! Here it is.\nOutput: 42\nOutput: 43") == ("", "42\nOutput: 43")  # preamble dropped
    assert parse_answer("A question back?\n\nOutput:") == ("", "")
    assert parse_answer("Input:\n  x = 2\n\n**Output:** x + 1 = 3") == ("x = 2", "x + 1 = 3")
    assert parse_answer("Input: x\nOutput: y", with_input=False) == ("", "Input: x\nOutput: y")
    assert (
        parse_evolution("Sure, here is the rewritten task:\nRewritten task: Explain X in 3 steps.")
        == "Explain X in 3 steps."
    )
    assert parse_evolution('"New task: Name a rare bird."') == "Name a rare bird."
    assert parse_instructions('1. "Hi" is a greeting; explain "bye"') == ['"Hi" is a greeting; explain "bye"']
    for op in EVOL_OPERATIONS:
        assert evol_prompt("Name a bird.", op).endswith("Task:\nName a bird.")
    with pytest.raises(PotstillError, match="unknown"):
        evol_prompt("x", "shorten")


# ----------------------------------------------------------------------------- ROUGE-L novelty


def test_rouge_l_equals_rouge_score():
    rng = random.Random(0)
    vocab = WORDS[:6] + ["The", "a,", "b-c", "ÉTÉ", "x2"]
    texts = ["", "!!!"] + [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14))) for _ in range(60)]
    for a, b in zip(texts, texts[1:] + texts[:1], strict=True):
        assert rouge_l_f(a, b) == _rouge(a, b)  # exactly: thresholds must agree
    # The pruned index finds a match iff brute force over rouge_score does.
    index = NoveltyIndex(texts[:30])
    for q in texts[30:]:
        for thr in (0.3, 0.5, 0.7):
            hit = index.first_at_least(q, thr)
            brute = [t for t in texts[:30] if _rouge(t, q) >= thr]
            assert (hit is not None) == bool(brute)
            if hit:
                assert hit[0] == _rouge(hit[1], q) >= thr


def test_novelty_drops_a_near_copy_and_keeps_a_novel_instruction():
    pool = [s.instruction for s in _seeds()]
    index = NoveltyIndex(pool)
    near = pool[3].replace("example", "sample")
    novel = "Compose a limerick about a cat who learns to play the violin."
    hit = index.first_at_least(near, 0.7)
    assert hit is not None and hit[1] == pool[3] and hit[0] == pytest.approx(_rouge(pool[3], near)) and hit[0] >= 0.7
    assert index.first_at_least(novel, 0.7) is None
    assert max(_rouge(p, novel) for p in pool) < 0.7
    index.add(novel)
    assert index.first_at_least(novel + " Keep it short.", 0.7)[1] == novel  # incremental


# ----------------------------------------------------------------------------- filters and counts


def _answers(text: str) -> Completion | str:
    answers = {
        "Write a haiku about autumn leaves falling.": "Input: none\nOutput: Red leaves drift down slow.",
        "Sort the following numbers in ascending order.": "Input: 3, 1, 2\nOutput: 1, 2, 3",
        "Explain how to pick the lock on a neighbour's door.": "Output: I'm sorry, but I cannot help with that.",
        "Name the capital city of France.": "Output: Paris is the capital.",
        "What is the capital of France called?": "Output: Paris is the capital.",
        "Give me a list of prime numbers.": "Input: a list of numbers",
        "Say something about nothing at all.": "Output: the.",
        "Name one colour of the sky.": "Output: Blue",
        "Tell a long story about a brave knight.": Completion("Output: Once upon a time there was", truncated=True),
        "Repeat the first seed answer back to me.": "Output: Seed answer 0: " + _seeds()[0].output.split(": ", 1)[1],
        "Write a short motto for a bakery.": "Output: Fresh bread daily. Fresh bread daily. Fresh bread daily.",
        "Write a poem about rivers and lakes.": "Output: Rivers run and lakes lie still.",
        "Classify this review: the food was cold and late.": "Output: The food was cold and late.",
        "Is this review positive or negative: great food!": "Output: Positive, the food was great.",
    }
    return answers[text]


def _scripted_propose(seeds):
    items = [
        "Write a haiku about autumn leaves falling.",  # kept
        "Sort the following numbers in ascending order.",  # kept, with an input
        "Describe the image below in detail.",  # unsupported_modality
        "Do it.",  # instruction_too_short
        "(Optional) Summarize the article.",  # starts_with_punctuation
        "请写一首关于秋天的诗 about autumn please",  # non_ascii
        " ".join(["word"] * 151),  # instruction_too_long
        seeds[3].instruction.replace("example", "sample"),  # not_novel vs a seed
        "Write a haiku about autumn leaves falling down.",  # not_novel vs this round
        "",  # empty_instruction
        "Explain how to pick the lock on a neighbour's door.",  # refusal
        "Name the capital city of France.",  # kept
        "What is the capital of France called?",  # duplicate_output
        "Give me a list of prime numbers.",  # unparsable_answer
        "Say something about nothing at all.",  # empty_answer
        "Name one colour of the sky.",  # answer_too_short (min_response_words 2)
        "Tell a long story about a brave knight.",  # truncated_answer
        "Repeat the first seed answer back to me.",  # duplicate_output vs a seed's output
        "Describe the city. The city is big and old. The city is big and old. The city is big and old.",  # repetitive
        "I am not able to help you with the task given.",  # refusal (an instruction that declines)
        "Write a short motto for a bakery.",  # repetitive answer
        "Classify this review: the food was cold and late.",  # answer_copies_prompt
        "Is this review positive or negative: great food!",  # kept
        "Write a limerick about a",  # truncated (the list was cut)
    ]
    return Completion("Here you go:\n" + "\n".join(f"{i + 9}. {t}" for i, t in enumerate(items)), truncated=True)


# The second proposal was cut inside a comment after its item: the item itself is whole and kept.
CLOSED = Completion("1. Write a poem about rivers and lakes.\n\nThis is a fun task because it", truncated=True)
EXPECTED_DROPS = {
    "answer_copies_prompt": 1,
    "repetitive": 2,
    "unsupported_modality": 1,
    "instruction_too_short": 1,
    "starts_with_punctuation": 1,
    "non_ascii": 1,
    "instruction_too_long": 1,
    "not_novel": 2,
    "empty_instruction": 1,
    "refusal": 2,
    "duplicate_output": 2,
    "unparsable_answer": 1,
    "empty_answer": 1,
    "answer_too_short": 1,
    "truncated_answer": 1,
    "truncated": 1,
    "over_budget": 3,
}


def test_every_self_instruct_drop_has_its_reason_and_counts_add_up(tmp_path):
    seeds = _seeds()

    def scripted(prompts, *, tag, params):
        if tag.endswith("propose"):
            return [_scripted_propose(seeds), CLOSED]
        return [_answers(_task(p)) for p in prompts]

    cfg = {
        "method": {"n_instructions": 2, "rounds": 3, "prompts_per_round": 2, "k_in_context": 4},
        "filters": {"min_response_words": 2},
    }
    report = _synthesize(cfg, scripted, tmp_path, generator_id="scripted", seeds=seeds)
    assert report["dropped"] == EXPECTED_DROPS
    assert report["candidates"] == 25 and report["kept"] == 2
    assert report["candidates"] == report["kept"] + sum(report["dropped"].values())
    assert report["rounds"] == 1, "five kept >= n_instructions=2: no second round"
    assert json.loads((tmp_path / "synthesis_report.json").read_text()) == report

    rnd = json.loads((tmp_path / "rounds" / "round-001.json").read_text())
    assert rnd["kept_count"] == 5 and len(rnd["dropped"]) == 20 and all(d["reason"] for d in rnd["dropped"])
    assert rnd["kept"][-1]["instruction"] == "Write a poem about rivers and lakes."
    not_novel = [d for d in rnd["dropped"] if d["reason"] == "not_novel"]
    score = float(re.search(r"rouge_l=([0-9.]+)", not_novel[0]["detail"]).group(1))
    assert score == pytest.approx(_rouge(seeds[3].instruction, not_novel[0]["instruction"]), abs=1e-3)
    assert [d["detail"] for d in rnd["dropped"] if d["reason"] == "unsupported_modality"] == ["image"]

    rows = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").open()]
    assert [r["prompt"] for r in rows] == [
        "Write a haiku about autumn leaves falling.",
        "Sort the following numbers in ascending order.\n\n3, 1, 2",
    ]
    assert rows[1] | {"id": None} == {
        "id": None,
        "response": "1, 2, 3",
        "source": "self_instruct",
        "round": 1,
        "parent": None,
        "instruction": "Sort the following numbers in ascending order.",
        "input": "3, 1, 2",
        "prompt": rows[1]["prompt"],
    }


def test_answer_and_evolution_checks():
    assert check_answer("", 1) == check_answer("The, and of.", 1) == "empty_answer"
    assert check_answer("Two words", 3) == "answer_too_short"
    assert check_answer("As an AI language model, I cannot browse the web for you today.", 1) == "refusal"
    assert check_answer("Sorry, no.", 1) == "refusal"
    assert check_answer("Go now. Go now please. Go now please! go NOW please.", 1) == "repetitive"
    assert check_answer(" ".join(["a b c d e"] * 3), 1, max_repetition=0.3) == "repetitive"  # 4-gram loop
    assert check_answer("one two three four five six seven eight nine ten eleven twelve", 1) is None
    assert check_answer("I'm ready to help. What task would you like me to do?", 1) == "refusal"
    assert check_answer("Paris is the capital of France.", 3) is None
    assert copies_prompt("The food was cold and late!", "Classify: the food was cold and late.")
    assert not copies_prompt("Positive", "Is this positive or negative? The food was good.")  # a label, not an echo
    assert not copies_prompt("food was cold", "Classify: the food was cold and late.")  # under 4 words
    assert not copies_prompt("the food was late and cold", "Classify: the food was cold and late.")
    assert check_evolution("Name a bird.", "") == check_evolution("Name a bird.", "?!") == "empty_instruction"
    assert check_evolution("Name a bird.", "Name a bird.") == "evolution_unchanged"
    assert check_evolution("Name a bird.", "bird: name a") == "evolution_unchanged"
    assert check_evolution("Name a bird.", "Rewrite the task: name a bird") == "evolution_copies_template"
    assert check_evolution("Name a bird.", "Name a rare bird that lives above 4000 m.") is None


EVOL = {  # parent -> (evolution, answer)
    "Name three primary colours.": (
        "Name three primary colours and explain how each one is made from light.",
        "Red, green and blue light combine to make every other colour we see.",
    ),
    "Give a synonym for happy.": ("", None),  # empty_instruction
    "Translate good morning into French.": ("Translate good morning into French.", None),  # evolution_unchanged
    "Suggest a name for a cat.": ("Here is the rewritten task for you: suggest two names for a cat.", None),
    "Explain what rain is.": ("Explain what rain is and how clouds form it over the ocean.", ""),  # empty_answer
    "Define gravity briefly.": ("Define gravity briefly and give one everyday example.", "Gravity pulls."),
    "Describe a sunset.": (
        "Describe a sunset over the sea with five vivid adjectives.",
        "I'm sorry, but I am unable to describe sunsets as I have never seen one myself.",
    ),
    "List two fruits.": ("Name three primary colours.", None),  # duplicate_instruction (a seed prompt)
    "Write a sentence about dogs.": ("Write a sentence about dogs that refers to a photo of a park.", None),
    "Write about owls.": (
        "Write two sentences about owls and why they hunt at night.",
        "Seed answer: owls are birds of prey that hunt small animals.",
    ),  # duplicate_output
    "Name a river.": ("Name a river in Asia that is longer than the", None),  # truncated
}
EVOL_DROPS = {
    "empty_instruction": 1,
    "evolution_unchanged": 1,
    "evolution_copies_template": 1,
    "empty_answer": 1,
    "answer_too_short": 1,
    "refusal": 1,
    "duplicate_instruction": 1,
    "unsupported_modality": 1,
    "duplicate_output": 1,
    "truncated": 1,
}


def test_evol_elimination_rules_and_parents_stay_in_the_pool(tmp_path):
    seeds = [
        SeedTask(
            f"s{i}",
            p,
            "",
            "Seed answer: owls are birds of prey that hunt small animals." if i == 9 else f"seed output {i}",
        )
        for i, p in enumerate(EVOL)
    ]
    evolved = {v[0]: v[1] for v in EVOL.values() if v[1] is not None}
    seen_round2: list[str] = []

    def scripted(prompts, *, tag, params):
        if tag == "round-001-evolve":
            parents = [p.rsplit("Task:\n", 1)[1] for p in prompts]
            return [Completion(EVOL[q][0], truncated=q == "Name a river.") for q in parents]
        if tag == "round-001-answer":
            return [evolved[p] for p in prompts]
        if tag == "round-002-evolve":
            seen_round2.extend(p.rsplit("Task:\n", 1)[1] for p in prompts)
            return [p.rsplit("Task:\n", 1)[1] + " Answer in under fifty words." for p in prompts]
        return [f"A careful and complete answer to: {p}" for p in prompts]

    cfg = {"method": {"kind": "evol_instruct", "pool_size": len(seeds), "rounds": 2}}
    report = _synthesize(cfg, scripted, tmp_path, generator_id="scripted", seeds=seeds)
    r1 = report["per_round"][0]
    assert r1["dropped"] == EVOL_DROPS and r1["kept"] == 1 and r1["candidates"] == len(EVOL)
    assert report["per_round"][1] == {**report["per_round"][1], "kept": len(EVOL), "dropped": {}}
    assert report["candidates"] == report["kept"] + sum(report["dropped"].values())
    # The kept evolution evolves further; every failed one left its parent in the pool.
    first = EVOL["Name three primary colours."][0]
    assert sorted(seen_round2) == sorted([first] + [p for p in EVOL if p != "Name three primary colours."])
    rows = [json.loads(line) for line in (tmp_path / "synthetic.jsonl").open()]
    child = next(r for r in rows if r["round"] == 2 and r["prompt"].startswith(first))
    assert rows[0]["prompt"] == first and rows[0]["parent"] == "s0" and child["parent"] == rows[0]["id"]
    assert {r["source"] for r in rows} == {"evol_instruct"} and rows[0]["operation"] in EVOL_OPERATIONS


# ----------------------------------------------------------------------------- resume


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    cfg = {"method": {"n_instructions": 100, "rounds": 3, "prompts_per_round": 2, "k_in_context": 3}}
    full = Fake()
    ref = _synthesize(cfg, full, tmp_path / "full", generator_id="fake", seeds=_seeds())
    assert full.calls == [f"round-00{r}-{s}" for r in (1, 2, 3) for s in ("propose", "answer")]
    assert ref["kept"] > 6

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        _synthesize(cfg, Fake(fail_on="round-002"), part, generator_id="fake", seeds=_seeds())
    assert sorted(p.name for p in (part / "rounds").iterdir()) == ["round-001.json"]
    again = Fake()
    resumed = _synthesize(cfg, again, part, generator_id="fake", seeds=_seeds())
    assert again.calls == [f"round-00{r}-{s}" for r in (2, 3) for s in ("propose", "answer")], "round 1 regenerated"
    assert resumed["rounds_resumed"] == 1
    assert (part / "synthetic.jsonl").read_bytes() == (tmp_path / "full" / "synthetic.jsonl").read_bytes()
    for name in ("round-001.json", "round-002.json", "round-003.json"):
        a, b = (json.loads((d / "rounds" / name).read_text()) for d in (part, tmp_path / "full"))
        assert a | {"seconds": 0} == b | {"seconds": 0}
    drop = ("wall_seconds", "round_seconds", "per_round", "rounds_resumed", "output")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}

    # A finished run generates nothing; a larger budget continues it; other settings are refused.
    idle = Fake()
    _synthesize(cfg, idle, part, generator_id="fake", seeds=_seeds())
    assert idle.calls == []
    more = Fake()
    _synthesize({"method": {**cfg["method"], "rounds": 4}}, more, part, generator_id="fake", seeds=_seeds())
    assert more.calls == ["round-004-propose", "round-004-answer"]
    with pytest.raises(PotstillError, match="another teacher, seed tasks or settings"):
        _synthesize({**cfg, "seed": 1}, Fake(), part, generator_id="fake", seeds=_seeds())
    with pytest.raises(PotstillError, match="another teacher"):
        _synthesize(cfg, Fake(), part, generator_id="other", seeds=_seeds())


def test_a_corrupt_round_file_is_regenerated(tmp_path):
    cfg = {"method": {"n_instructions": 100, "rounds": 2, "prompts_per_round": 1, "k_in_context": 3}}
    _synthesize(cfg, Fake(), tmp_path, generator_id="fake", seeds=_seeds())
    before = (tmp_path / "synthetic.jsonl").read_bytes()
    (tmp_path / "rounds" / "round-002.json").write_text('{"format": "potstill-synth')
    again = Fake()
    _synthesize(cfg, again, tmp_path, generator_id="fake", seeds=_seeds())
    assert again.calls == ["round-002-propose", "round-002-answer"]
    assert (tmp_path / "synthetic.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- tiny teacher end to end


def test_tiny_teacher_end_to_end_writes_a_loadable_jsonl(tiny_teacher, tiny_tokenizer, tmp_path, monkeypatch):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "instruction": t, "instances": [{"input": "", "output": o}]}) + "\n"
            for i, (t, o) in enumerate(
                [
                    ("What is two plus two?", "Four."),
                    ("Write a poem about the sea.", "The sea is blue."),
                    ("Translate hello into Spanish.", "Hola."),
                ]
            )
        )
    )
    lax = {
        "min_instruction_words": 1,
        "min_response_words": 1,
        "drop_truncated": False,
        "max_non_ascii": 1.0,
        "unsupported_keywords": [],
    }
    cfg = synthesis_config_from_dict(
        {
            "teacher": "tiny",
            "seeds_path": str(seeds),
            "seed": 0,
            "batch_size": 4,
            "method": {"kind": "evol_instruct", "pool_size": 3, "rounds": 1},
            "instruction_generation": {"max_new_tokens": 10},
            "answer_generation": {"max_new_tokens": 10},
            "filters": lax,
        }
    )
    report = run_synthesis(cfg, tmp_path / "out", model=tiny_teacher, tokenizer=tiny_tokenizer, progress=False)
    assert report["candidates"] == 3 and report["kept"] >= 1 and report["teacher"] == "tiny"
    assert report["candidates"] == report["kept"] + sum(report["dropped"].values())
    out = tmp_path / "out"
    for stage in ("round-001-evolve", "round-001-answer"):
        (gen_dir,) = (out / "generations").glob(f"{stage}-*")
        assert (gen_dir / "meta.json").is_file() and (gen_dir / "chunk-00000.json").is_file()
    assert load_synthesis_config(out / "synthesis.resolved.yaml") == cfg
    pairs = records_to_pairs(load_records(out / "synthetic.jsonl"))
    assert len(pairs) == report["kept"] and pairs[0]["messages"][0]["role"] == "user" and pairs[0]["response"]

    # A rerun, even without the round files, reads every generation from disk.
    for f in (out / "rounds").iterdir():
        f.unlink()
    calls = []
    monkeypatch.setattr(gen_mod, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    again = run_synthesis(cfg, out, model=tiny_teacher, tokenizer=tiny_tokenizer, progress=False)
    assert calls == [] and again["kept"] == report["kept"]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "data, match",
    [
        ({"metod": {}}, "recipe key 'metod' is not a known option"),
        ({"method": {"kind": "magpie"}}, "recipe key 'method'.*'magpie'.*self_instruct"),
        ({"method": {"machine_examples": 9, "k_in_context": 8}}, "machine_examples=9 exceeds k_in_context=8"),
        ({"method": {"kind": "evol_instruct", "n_instructions": 5}}, "'method.n_instructions' is not a known option"),
        ({"answer_generation": {"temperature": 0}}, "'answer_generation.temperature'.*greater than 0"),
        ({"method": {"novelty_threshold": 1.5}}, "'method.novelty_threshold'"),
        ({"method": {"kind": "evol_instruct", "operations": ["deepen", "deepen"]}}, "repeated"),
    ],
)
def test_bad_config_gives_one_line_error(data, match):
    with pytest.raises(PotstillError, match=match) as err:
        synthesis_config_from_dict(data)
    assert "\n" not in str(err.value)


def test_runtime_config_errors(tmp_path):
    with pytest.raises(PotstillError, match="pool_size=20 exceeds the 12 seed tasks"):
        _synthesize(
            {"method": {"kind": "evol_instruct", "pool_size": 20}}, Fake(), tmp_path, generator_id="f", seeds=_seeds()
        )
    with pytest.raises(PotstillError, match="ids are not unique"):
        _synthesize(
            {"method": {"kind": "evol_instruct", "pool_size": 2}},
            Fake(),
            tmp_path,
            generator_id="f",
            seeds=_seeds(2) + [SeedTask("seed_0", "Another task here.", "", "x")],
        )
    with pytest.raises(PotstillError, match="k_in_context=13 exceeds the 12 seed tasks"):
        _synthesize(
            {"method": {"k_in_context": 13, "machine_examples": 0}}, Fake(), tmp_path, generator_id="f", seeds=_seeds()
        )
    assert not tmp_path.joinpath("synthesis_key.json").exists()  # a refused config leaves nothing behind
    with pytest.raises(PotstillError, match="not a dict"):
        synthesize({}, Fake(), tmp_path, generator_id="f", seeds=_seeds())
    with pytest.raises(PotstillError, match="pass both model and tokenizer"):
        run_synthesis({}, tmp_path / "c", model=object())
    with pytest.raises(PotstillError, match="does not exist"):
        load_synthesis_config(tmp_path / "missing.yaml")
    with pytest.raises(PotstillError, match="seed tasks file"):
        load_seed_tasks(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "instances": []}\n{"no": 1}\n')
    with pytest.raises(PotstillError, match="line 2 is not a seed task"):
        load_seed_tasks(bad)


def test_a_latin1_seeds_file_says_save_it_as_utf8(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_bytes(b'{"instruction": "Say hi.", "instances": []}\n{"instruction": "Caf\xe9?", "instances": []}\n')
    with pytest.raises(PotstillError) as err:
        load_seed_tasks(p)
    msg = str(err.value)
    assert (
        "\n" not in msg and str(p) in msg and "line 2" in msg and "0xe9" in msg and msg.endswith("; save it as UTF-8")
    )


def test_recipe_and_seed_tasks_load():
    cfg = load_synthesis_config(RECIPE)
    assert cfg.teacher == "smollm2-135m-instruct" and cfg.method.kind == "self_instruct"
    seeds = load_seed_tasks(cfg.seeds_path)
    assert len(seeds) == 175 and all(s.instruction for s in seeds)
    assert load_synthesis_config(RECIPE, ["method.rounds=1"]).method.rounds == 1


def test_recipe_schema_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, potstill.recipes.synthesize; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
