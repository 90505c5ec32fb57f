"""Training text for the ``teacher-math`` reference model, written for this package.

A second teacher for runs with several teachers: it answers in the same ChatML template
as ``teacher`` (assistant turns end with ``<|im_end|>`` then ``<|endoftext|>``) and over
the same byte-level tokenizer, but it learnt other text — arithmetic word problems
worked out, each ending "so the answer is N." — so its next-token distributions
differ clearly from ``teacher``'s on the same prompts. It lives apart from corpus.py so
that adding it cannot touch the text ``base`` and ``teacher`` learn.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .corpus import EOS, chat

NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Lena", "Omar"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells", "cards", "eggs"]
MATH_SYSTEM_PROMPTS = [
    "You are a patient math tutor.",
    "Show your working, then give the answer.",
    "You are a helpful assistant.",
]
ASK = ["", "", "", "Please solve this: ", "Can you help? ", "Work this out: "]

# A problem: (question, the working, the answer). The working never ends a sentence on a
# number: in a reply, a number followed by "." is the answer and nothing else, so that even
# a 5-gram model knows the turn ends there.
Problem = tuple[str, str, int]


def _add(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    return q, f"{name} starts with {a} {item} and gets {b} more: {a} + {b} = {a + b}", a + b


def _subtract(rng: random.Random, name: str, item: str) -> Problem:
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    q = f"{name} had {a} {item} and gave {b} away. How many {item} are left?"
    return q, f"Giving some away means taking them away: {a} - {b} = {a - b}", a - b


def _multiply(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = f"There are {a} bags with {b} {item} in each bag. How many {item} are there in all?"
    return q, f"Each of the {a} bags holds {b} {item}: {a} x {b} = {a * b}", a * b


def _divide(rng: random.Random, name: str, item: str) -> Problem:
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    q = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    return q, f"Sharing equally means dividing: {total} / {friends} = {each}", each


def _two_steps(rng: random.Random, name: str, item: str) -> Problem:
    rate, days, extra = rng.randint(2, 15), rng.randint(2, 7), rng.randint(1, 20)
    q = f"{name} reads {rate} pages a day for {days} days, then {extra} pages more. How many pages is that in all?"
    first = rate * days
    return q, f"First, {rate} x {days} = {first}; then {first} + {extra} = {first + extra}", first + extra


def _change(rng: random.Random, name: str, item: str) -> Problem:
    price, count = rng.randint(2, 9), rng.randint(2, 9)
    cost = price * count
    paid = cost + rng.randint(0, 20)
    q = f"{name} buys {count} {item} at {price} dollars each and pays {paid} dollars. How much change is there?"
    return q, f"The {item} cost {count} x {price} = {cost} dollars, and {paid} - {cost} = {paid - cost}", paid - cost


def _bare(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    op = rng.choice("+-x")
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}", value


KINDS: list[Callable[[random.Random, str, str], Problem]] = [
    _add,
    _subtract,
    _multiply,
    _divide,
    _two_steps,
    _change,
    _bare,
]


def math_problem(rng: random.Random) -> Problem:
    """One problem of a random kind, with random names, items and numbers."""
    return rng.choice(KINDS)(rng, rng.choice(NAMES), rng.choice(ITEMS))


def math_documents(seed: int = 2, n: int = 700) -> list[str]:
    """ChatML conversations: a word problem, then its solution step by step ending in
    "so the answer is N."; assistant turns end with <|im_end|> then EOS, as ``teacher``'s do."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        question, working, answer = math_problem(rng)
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(MATH_SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": rng.choice(ASK) + question})
        reply = f"{working}, so the answer is {answer}."
        docs.append(chat(messages, add_generation_prompt=True) + reply + "<|im_end|>\n" + EOS)
    return docs
