"""Text for one step: its concise line, and the verbose narration around it.

The concise line is the step's equation (``605 - 129 = 476``); the verbose
style wraps the SAME line in a header, column-by-column work and a re-check.
Whether a re-check happens is a function of the step (a carry, a borrow, a
big product, a close comparison), never a coin flip: a student decoding
greedily reproduces what is likely given its context, so verbosity that is
predictable from the context survives decoding, and random detours vanish
(see FACTS.md, "The reference world"). The detail and re-check lines of a
slipped step repeat its wrong result, like a student who believes it.
"""

from __future__ import annotations

from world.steps import Step

_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "mod": "mod"}
_PLACES = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands")
CLOSE = 5  # comparisons this close are looked at twice
BIG_PRODUCT = 100  # products at least this big are checked the other way round


def equation(step: Step) -> str:
    """The concise line of a step; the verbose trace contains it verbatim."""
    a, b, r = step.a, step.b, step.result
    if step.op == "gt":
        line = f"{a} > {b}: {'yes' if r else 'no'}"
    elif step.op in ("max", "min"):
        line = f"{step.op}({a}, {b}) = {r}"
    else:
        line = f"{a} {_SYMBOL[step.op]} {b} = {r}"
    return f"{step.label}: {line}" if step.label else line


def header(step: Step, index: int) -> str:
    """Says in words what the step does, after the sentence that caused it."""
    a, b = step.a, step.b
    phrase = {
        "add": f"I add {b} to {a}.",
        "sub": f"I subtract {b} from {a}.",
        "mul": f"I multiply {a} by {b}.",
        "mod": f"I divide {a} by {b} and keep the remainder.",
        "gt": f"Is {a} greater than {b}?",
        "max": f"I compare {b} with the largest so far, {a}.",
        "min": f"I compare {b} with the smallest so far, {a}.",
    }[step.op]
    if step.label and step.op not in ("gt", "max", "min"):
        phrase = f"For {step.label}, {phrase}"
    why = f"{step.why} " if step.why else ""
    return f"Step {index}: {why}{phrase}"


def so_far(step: Step) -> str:
    """Restates the running value, as verbose solvers keep doing."""
    r = step.result
    if step.op == "gt":
        return f"So {step.a} is {'greater' if r else 'not greater'} than {step.b}."
    if step.op == "max":
        return f"The largest so far is {r}."
    if step.op == "min":
        return f"The smallest so far is {r}."
    if step.label:
        return f"So {step.label} is now at {r}."
    return f"The result so far is {r}."


def _digits(n: int, width: int) -> list[int]:
    """Least significant first, padded with zeros to ``width``."""
    return [(n // 10**i) % 10 for i in range(width)]


def _place(i: int) -> str:
    return _PLACES[i] if i < len(_PLACES) else f"Column {i + 1}"


def _add_columns(a: int, b: int, r: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    da, db, dr = _digits(a, width), _digits(b, width), _digits(abs(r), width + 1)
    lines, carry = [], 0
    for i in range(width):
        total = da[i] + db[i] + carry
        plus = " + 1" if carry else ""
        tail = ", carry 1." if total >= 10 else "."
        lines.append(f"{_place(i)}: {da[i]} + {db[i]}{plus} = {total}, write {dr[i]}{tail}")
        carry = total // 10
    if carry:
        lines.append(f"{_place(width)}: the carry gives {dr[width]}.")
    return lines


def _sub_columns(a: int, b: int, r: int) -> list[str]:
    width = len(str(a))
    da, db, dr = _digits(a, width), _digits(b, width), _digits(abs(r), width)
    lines, borrow = [], 0
    for i in range(width):
        x = da[i] - borrow
        pre = f"{da[i]} - 1 = {x}, and " if borrow else ""
        if x < db[i]:
            work = f"{x} is less than {db[i]}, so borrow: {x + 10} - {db[i]} = {x + 10 - db[i]}"
            borrow = 1
        else:
            work = f"{x} - {db[i]} = {x - db[i]}"
            borrow = 0
        lines.append(f"{_place(i)}: {pre}{work}, write {dr[i]}.")
    return lines


def _place_parts(n: int) -> list[int]:
    return [d * 10**i for i, d in reversed(list(enumerate(_digits(n, len(str(n)))))) if d]


def _mul_parts(a: int, b: int, r: int) -> list[str]:
    """Split the longer factor by place value (or the shorter, if both are long)."""
    big, small = (a, b) if len(str(a)) >= len(str(b)) else (b, a)
    if small < 10:
        products = [(f"{p} * {small}", p * small) for p in _place_parts(big)]
    else:
        products = [(f"{big} * {p}", big * p) for p in _place_parts(small)]
    if len(products) < 2:
        return []
    lines = [f"{text} = {value}" for text, value in products]
    lines.append(" + ".join(str(v) for _, v in products) + f" = {r}")
    return lines


def _mod_work(a: int, m: int, r: int) -> list[str]:
    q = a // m
    if q == 0:
        return [f"{a} is less than {m}, so the remainder is {r}."]
    return [
        f"{m} * {q} = {m * q}, and {m} * {q + 1} = {m * (q + 1)} is more than {a}.",
        f"{a} - {m * q} = {r}.",
    ]


def detail(step: Step) -> list[str]:
    """Column-by-column or part-by-part work shown before the step's equation."""
    a, b, r = step.a, step.b, step.result
    if min(a, b) < 0:
        return []
    if step.op == "add":
        return _add_columns(a, b, r)
    if step.op == "sub" and a >= b:
        return _sub_columns(a, b, r)
    if step.op == "mul":
        return _mul_parts(a, b, r)
    if step.op == "mod" and b > 0:
        return _mod_work(a, b, r)
    return []


def _has_carry(a: int, b: int) -> bool:
    width = max(len(str(a)), len(str(b)))
    return any(x + y >= 10 for x, y in zip(_digits(a, width), _digits(b, width), strict=True))


def _has_borrow(a: int, b: int) -> bool:
    width = len(str(a))
    return any(x < y for x, y in zip(_digits(a, width), _digits(b, width), strict=True))


def recheck(step: Step) -> str | None:
    """The "wait, let me verify" line, present exactly when the step invites one."""
    a, b, r = step.a, step.b, step.result
    if min(a, b) < 0:
        return None
    if step.op == "add" and _has_carry(a, b):
        return f"There was a carry, so let me verify by subtracting: {r} - {b} = {a}. Yes, that matches."
    if step.op == "sub" and a >= b and _has_borrow(a, b):
        return f"There was a borrow, so let me verify by adding back: {r} + {b} = {a}. Yes, that matches."
    if step.op == "mul" and r >= BIG_PRODUCT:
        return f"Wait, that is a big product, so let me check it the other way round: {b} * {a} = {r}. Yes."
    if step.op == "mod" and b > 0 and a // b >= 2:
        return f"Let me double-check: {b} * {a // b} + {r} = {a}, and {r} is less than {b}. Good."
    if step.op in ("gt", "max", "min") and abs(a - b) <= CLOSE:
        return f"Wait, {a} and {b} are close, so let me look again: {_compare_words(step)}"
    return None


def _compare_words(step: Step) -> str:
    a, b, r = step.a, step.b, step.result
    if step.op == "gt":
        return f"{a} is {'greater' if r else 'not greater'} than {b}."
    kind = "larger" if step.op == "max" else "smaller"
    return f"the {kind} one is {r}."
