"""Word problems about people holding items: gifts, purchases, losses, doubling.

Question::

    Alice has 23 apples. Bob has 17 apples. Alice gives 5 apples to Bob.
    Bob buys 12 more apples. Alice's apples double. How many apples does Bob have now?

Difficulty d (1–5) sets d + 1 events, 2 people (d ≤ 2) or 3, and the size of
the starting amounts. A gift is two steps (the giver's subtraction, then the
receiver's addition); every other event is one. Everyone's count is tracked,
as a careful student would, even when the question asks about one person.
"""

from __future__ import annotations

import random
import re

from world.steps import Tape

NAME = "transfer"
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Emma", "Frank", "Grace", "Henry")
_ITEMS = ("apples", "marbles", "stickers", "coins", "cards", "pencils", "shells", "stamps")
_START_MAX = {1: 20, 2: 40, 3: 60, 4: 90, 5: 150}
_FACTOR = {"double": 2, "triple": 3}

_HAS = re.compile(r"(\w+) has (\d+) (\w+)\.")
_GIVE = re.compile(r"(\w+) gives (\d+) \w+ to (\w+)\.")
_GAIN = re.compile(r"(\w+) (?:buys|finds) (\d+) more \w+\.")
_LOSE = re.compile(r"(\w+) (?:loses|sells) (\d+) \w+\.")
_GROW = re.compile(r"(\w+)'s \w+ (double|triple)\.")
_ASK = re.compile(r"How many \w+ does (\w+) have now\?")


def _event(rng: random.Random, counts: dict[str, int], item: str, d: int) -> str:
    """One event sentence, applied to ``counts``; never leaves anyone negative."""
    names = list(counts)
    who = rng.choice(names)
    kind = rng.choice(("give", "give", "gain", "lose", "grow"))
    if kind == "grow" and counts[who] > _START_MAX[d]:
        kind = "gain"
    if kind in ("give", "lose") and counts[who] < 2:
        kind = "gain"
    if kind == "give":
        other = rng.choice([n for n in names if n != who])
        n = rng.randint(1, counts[who] - 1)
        counts[who] -= n
        counts[other] += n
        return f"{who} gives {n} {item} to {other}."
    if kind == "lose":
        n = rng.randint(1, counts[who] - 1)
        counts[who] -= n
        return f"{who} {rng.choice(('loses', 'sells'))} {n} {item}."
    if kind == "grow":
        word = rng.choice(tuple(_FACTOR))
        counts[who] *= _FACTOR[word]
        return f"{who}'s {item} {word}."
    n = rng.randint(1, _START_MAX[d])
    counts[who] += n
    return f"{who} {rng.choice(('buys', 'finds'))} {n} more {item}."


def generate(rng: random.Random, difficulty: int) -> str:
    """Asks about the person in the last event, so the question is never trivial."""
    people = rng.sample(_NAMES, 2 if difficulty <= 2 else 3)
    item = rng.choice(_ITEMS)
    counts = {p: rng.randint(2, _START_MAX[difficulty]) for p in people}
    parts = [f"{p} has {counts[p]} {item}." for p in people]
    parts += [_event(rng, counts, item, difficulty) for _ in range(difficulty + 1)]
    asked = parts[-1].split()[0].removesuffix("'s")
    parts.append(f"How many {item} does {asked} have now?")
    return " ".join(parts)


def _apply_event(sentence: str, counts: dict[str, int], tape: Tape) -> None:
    """One sentence of the story, as steps; unknown sentences are an error."""
    if m := _GIVE.fullmatch(sentence):
        giver, n, taker = m.group(1), int(m.group(2)), m.group(3)
        counts[giver] = tape.apply("sub", counts[giver], n, giver, sentence)
        counts[taker] = tape.apply("add", counts[taker], n, taker)
    elif m := _GAIN.fullmatch(sentence):
        who = m.group(1)
        counts[who] = tape.apply("add", counts[who], int(m.group(2)), who, sentence)
    elif m := _LOSE.fullmatch(sentence):
        who = m.group(1)
        counts[who] = tape.apply("sub", counts[who], int(m.group(2)), who, sentence)
    elif m := _GROW.fullmatch(sentence):
        who = m.group(1)
        counts[who] = tape.apply("mul", counts[who], _FACTOR[m.group(2)], who, sentence)
    else:
        raise ValueError(f"not a transfer sentence: {sentence!r}")


def solve(question: str, tape: Tape) -> tuple[int, str]:
    """Replay the story sentence by sentence, tracking every person's count."""
    sentences = re.split(r"(?<=[.?])\s+", question.strip())
    ask = _ASK.fullmatch(sentences[-1])
    if ask is None:
        raise ValueError(f"not a transfer question: {question!r}")
    counts: dict[str, int] = {}
    item = ""
    for sentence in sentences[:-1]:
        if m := _HAS.fullmatch(sentence):
            counts[m.group(1)] = int(m.group(2))
            item = m.group(3)
            tape.note(f"{m.group(1)} starts with {m.group(2)} {item}.")
        else:
            _apply_event(sentence, counts, tape)
    asked = ask.group(1)
    return counts[asked], f"how many {item} {asked} has now"
