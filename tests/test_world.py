"""The reference world: problems, splits, solutions in two styles, corruption."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from data.answers import count_tokens, extract_answer
from world import (
    FAMILIES,
    HELDOUT_FAMILIES,
    TRAIN_FAMILIES,
    build_problems,
    check,
    corpus_texts,
    corrupt,
    generate,
    problem_from_record,
    render_concise,
    render_steps,
    render_target,
    render_verbose,
    solve,
)
from world.narrate import recheck
from world.steps import Step
from world.styles import concise_lines, steps_lines, verbose_lines
from world.tokenizer import train_tokenizer


def _oracle(family: str, question: str) -> int:
    """Each family's answer computed directly, without the step machinery."""
    nums = [int(n) for n in re.findall(r"\d+", question)]
    if family == "modular":
        base, exp, mod = nums
        return pow(base, exp, mod)
    if family == "arith":
        value = nums[0]
        for word, n in re.findall(r"(Add|Subtract|Multiply by) (\d+)", question):
            value = {"Add": value + int(n), "Subtract": value - int(n)}.get(word, value * int(n))
        return value
    if family == "lists":
        values = [int(v) for v in question.split(": ")[1].split(".")[0].split(", ")]
        if "largest" in question:
            return max(values) - min(values)
        return sum(v for v in values if v > nums[-1])
    if family == "shopping":
        totals = [
            sum(int(q) * int(p) for q, p in re.findall(r"(\d+) \w+ that cost (\d+)", part))
            for part in question.split(". ")[:2]
        ]
        return abs(totals[0] - totals[1])
    return _transfer_oracle(question)


def _transfer_oracle(question: str) -> int:
    counts: dict[str, int] = {}
    for sentence in re.split(r"(?<=[.?])\s+", question):
        if m := re.fullmatch(r"(\w+) has (\d+) \w+\.", sentence):
            counts[m[1]] = int(m[2])
        elif m := re.fullmatch(r"(\w+) gives (\d+) \w+ to (\w+)\.", sentence):
            counts[m[1]] -= int(m[2])
            counts[m[3]] += int(m[2])
        elif m := re.fullmatch(r"(\w+) (buys|finds|loses|sells) (\d+) .*\.", sentence):
            counts[m[1]] += int(m[3]) if m[2] in ("buys", "finds") else -int(m[3])
        elif m := re.fullmatch(r"(\w+)'s \w+ (double|triple)\.", sentence):
            counts[m[1]] *= 2 if m[2] == "double" else 3
        elif m := re.fullmatch(r"How many \w+ does (\w+) have now\?", sentence):
            return counts[m[1]]
    raise AssertionError(question)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_answers_agree_with_an_independent_oracle(family: str, difficulty: int) -> None:
    rng = random.Random(difficulty)
    for _ in range(40):
        problem = generate(family, rng, difficulty)
        assert int(problem.answer) == _oracle(family, problem.question), problem.question
        assert int(problem.answer) >= 0
        assert all(not step.is_slip for step in problem.steps)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_difficulty_adds_steps(family: str) -> None:
    def mean_steps(d: int) -> float:
        rng = random.Random(0)
        return statistics.mean(len(generate(family, rng, d).steps) for _ in range(50))

    assert mean_steps(1) < mean_steps(3) < mean_steps(5)


def test_generate_rejects_unknown_difficulty() -> None:
    with pytest.raises(ValueError, match="difficulty"):
        generate("arith", random.Random(0), 6)


def test_check_normalises_and_gives_no_partial_credit() -> None:
    assert check("042", "42")
    assert check(" +42.", "42")
    assert not check("43", "42")
    assert not check(None, "42")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return build_problems(7, n_train=120, n_test=40, n_heldout=20, difficulty=(1, 5))


def test_build_is_deterministic_in_the_seed(records: list[dict]) -> None:
    again = build_problems(7, n_train=120, n_test=40, n_heldout=20, difficulty=(1, 5))
    other = build_problems(8, n_train=120, n_test=40, n_heldout=20, difficulty=(1, 5))
    assert records == again
    assert [r["prompt"] for r in records] != [r["prompt"] for r in other]


def test_eval_splits_do_not_move_when_train_grows(records: list[dict]) -> None:
    bigger = build_problems(7, n_train=300, n_test=40, n_heldout=20, difficulty=(1, 5))
    evals = [r for r in records if r["split"] != "train"]
    assert evals == [r for r in bigger if r["split"] != "train"]


def test_splits_sizes_ids_and_families(records: list[dict]) -> None:
    by_split = {s: [r for r in records if r["split"] == s] for s in ("train", "test", "heldout")}
    assert [len(v) for v in by_split.values()] == [120, 40, 20]
    assert {r["family"] for r in by_split["heldout"]} == set(HELDOUT_FAMILIES)
    assert {r["family"] for r in by_split["train"] + by_split["test"]} == set(TRAIN_FAMILIES)
    for family in TRAIN_FAMILIES:
        assert sum(r["family"] == family for r in by_split["train"]) == 30
    ids = [r["problem_id"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert re.fullmatch(rf"{r['family']}-{r['split']}-\d{{6}}", r["problem_id"])
        assert 1 <= r["difficulty"] <= 5
        assert set(r) == {"problem_id", "family", "split", "difficulty", "prompt", "answer"}


def test_splits_are_disjoint_by_question(records: list[dict]) -> None:
    prompts = [r["prompt"] for r in records]
    assert len(set(prompts)) == len(prompts)


def test_exhausted_family_fails_clearly() -> None:
    with pytest.raises(ValueError, match="ran out of distinct problems"):
        build_problems(0, 0, 2000, 0, difficulty=1, train_families=("modular",))


def test_record_resolves_to_its_problem(records: list[dict]) -> None:
    for record in records[:30]:
        problem = problem_from_record(record)
        assert problem.answer == record["answer"]
        assert problem.question == record["prompt"]
    tampered = {**records[0], "answer": str(int(records[0]["answer"]) + 1)}
    with pytest.raises(ValueError, match="solver says"):
        problem_from_record(tampered)


def test_solve_rejects_foreign_text() -> None:
    with pytest.raises(ValueError):
        solve("modular", "Start with 3. Add 4. What is the final number?", 1)
    with pytest.raises(KeyError):
        solve("nope", "x", 1)


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(line in it for line in short)


@pytest.mark.parametrize("verbosity", [1, 2, 3])
def test_concise_is_verbose_with_lines_deleted(records: list[dict], verbosity: int) -> None:
    rng = random.Random(0)
    for record in records:
        problem = problem_from_record(record)
        concise, verbose = render_concise(problem), render_verbose(problem, rng, verbosity)
        assert extract_answer(concise) == extract_answer(verbose) == record["answer"]
        lines = concise_lines(problem)
        assert len(lines) == len(problem.steps)
        assert _is_subsequence(lines, verbose_lines(problem, random.Random(1), verbosity))
        assert concise.startswith("<think>\n") and concise.endswith(
            f"</think>\n\nAnswer: {problem.answer}"
        )


@pytest.mark.parametrize("verbosity", [1, 2, 3])
def test_steps_style_is_verbose_with_lines_deleted(records: list[dict], verbosity: int) -> None:
    """The teacher's default target keeps the student's path: headers, equations, values."""
    for record in records:
        problem = problem_from_record(record)
        steps = render_target(problem, "steps")
        assert steps == render_steps(problem)
        assert extract_answer(steps) == record["answer"]
        lines = steps_lines(problem)
        assert len(lines) == 3 * len(problem.steps) + 1
        verbose = verbose_lines(problem, random.Random(1), verbosity)
        assert _is_subsequence(lines, verbose)
        assert _is_subsequence(concise_lines(problem), lines)
    with pytest.raises(ValueError, match="target style must be one of"):
        render_target(problem, "terse")


def test_verbose_length_is_set_by_the_problem_not_by_chance(records: list[dict]) -> None:
    for record in records[:40]:
        problem = problem_from_record(record)
        lengths = {len(render_verbose(problem, random.Random(s))) for s in range(6)}
        assert max(lengths) - min(lengths) <= 10  # phrasing variants only


def test_recheck_is_tied_to_the_step() -> None:
    assert recheck(Step("add", 47, 38, 85)) is not None  # carry
    assert recheck(Step("add", 41, 38, 79)) is None
    assert recheck(Step("sub", 52, 38, 14)) is not None  # borrow
    assert recheck(Step("sub", 58, 32, 26)) is None
    assert recheck(Step("mul", 47, 3, 141)) is not None  # big product
    assert recheck(Step("mul", 12, 3, 36)) is None
    assert recheck(Step("gt", 12, 10, 1)) is not None  # close comparison
    assert recheck(Step("gt", 40, 10, 1)) is None


def test_corrupted_trace_has_one_slip_and_a_wrong_answer(records: list[dict]) -> None:
    rng = random.Random(3)
    for record in records:
        problem = problem_from_record(record)
        bad = corrupt(problem, rng)
        assert bad.question == problem.question
        assert bad.answer != problem.answer
        assert sum(step.is_slip for step in bad.steps) == 1
        text = render_verbose(bad, rng)
        assert not check(extract_answer(text), record["answer"])


def test_error_rate_draws_corruption(records: list[dict]) -> None:
    problem = problem_from_record(records[0])
    gold = problem.answer
    assert extract_answer(render_verbose(problem, random.Random(0), error_rate=1.0)) != gold
    assert extract_answer(render_verbose(problem, random.Random(0), error_rate=0.0)) == gold
    rng = random.Random(0)
    wrong = sum(
        extract_answer(render_verbose(problem, rng, error_rate=0.3)) != gold for _ in range(200)
    )
    assert 30 <= wrong <= 90


def test_verbose_is_at_least_three_times_longer_in_tokens() -> None:
    sample = build_problems(11, n_train=200, n_test=0, n_heldout=0, difficulty=(1, 5))
    tok = train_tokenizer(corpus_texts(sample[:100]), vocab_size=1024)
    rng = random.Random(0)
    per_family: dict[str, list[tuple[int, int]]] = {}
    for record in sample:
        problem = problem_from_record(record)
        concise = count_tokens(tok.encode, render_concise(problem))[0]
        steps = count_tokens(tok.encode, render_steps(problem))[0]
        verbose = count_tokens(tok.encode, render_verbose(problem, rng))[0]
        per_family.setdefault(record["family"], []).append((concise, steps, verbose))
    for family, rows in per_family.items():
        ratio = statistics.mean(v for _, _, v in rows) / statistics.mean(c for c, _, _ in rows)
        assert ratio >= 3, (family, ratio)
    # the steps target leaves room for MPD's -40%: well under 0.6 of the verbose length
    rows = [row for family_rows in per_family.values() for row in family_rows]
    steps_ratio = statistics.mean(s for _, s, _ in rows) / statistics.mean(v for *_, v in rows)
    assert steps_ratio <= 0.6, steps_ratio
