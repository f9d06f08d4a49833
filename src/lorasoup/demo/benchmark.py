"""A synthetic skill-composition benchmark in the spirit of GSM-Hard program-of-thought, from a seed.

Three prompt kinds share one tiny language of word problems:

* ``solve . <problem> >`` asks for the arithmetic: ``answer : 7 * 8``;
* ``write a program . <problem> >`` asks for a program. The base model writes ``print ( 3 + 4 )``;
  the *code skill* teaches the PAL style ``def solution ( ) : return 3 + 4`` that the harness calls.

What the base model knows (pre-trained from scratch here): addition and subtraction stories in both
formats, and bare expressions (``compute 7 * 8``, all three operators) in both formats. It has never
seen a multiplication *story*.

* **math skill** (skill 1, "word problems into arithmetic"): multiplication stories in the math
  format (``answer : a * b``); it never writes a program.
* **code skill** (skill 2, "arithmetic into Python programs"): the PAL format for expressions and for
  the known addition/subtraction stories; it never sees a multiplication story.
* **composite task**: a multiplication story, answered with a PAL program. The program runs in the
  sandbox and ``solution()`` must return ``a · b``. The math skill alone writes ``print ( a * b )``
  (no ``solution()``: no-code); the code skill alone turns the story into ``a + b`` (wrong). Only a
  model that has both skills solves it.

The oracle LoRA is trained on composite data itself: the ceiling a composition could reach.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

NAMES = ("tom", "ann", "bob", "eve", "sam", "kim", "joe", "amy")
OBJECTS = ("apples", "pens", "cards", "coins", "books", "cups", "eggs", "toys")
STORIES = {
    "+": (
        "{n} has {a} {o} and gets {b} more . how many {o} now ?",
        "{n} buys {a} {o} , then {b} {o} more . how many {o} ?",
        "there are {a} {o} in a box and {b} {o} on a table . how many {o} in total ?",
    ),
    "-": (
        "{n} has {a} {o} and gives away {b} . how many {o} are left ?",
        "{n} had {a} {o} and lost {b} of them . how many {o} remain ?",
        "there were {a} {o} and {b} were eaten . how many {o} are left ?",
    ),
    "*": (
        "{n} has {a} bags with {b} {o} in each bag . how many {o} ?",
        "there are {a} rows of {o} with {b} {o} per row . how many {o} ?",
        "{n} buys {a} packs of {b} {o} each . how many {o} in all ?",
    ),
}
SOLVE, PROGRAM = "solve .", "write a program ."
END = ">"  # ends every prompt, so the answer's first token is unambiguous
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class Problem:
    """One item: the operands, the operator and whether it is told as a story or as an expression."""

    a: int
    op: str
    b: int
    story: str | None  # None: a bare expression, "compute a op b"

    @property
    def value(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def question(self) -> str:
        return self.story if self.story is not None else f"compute {self.a} {self.op} {self.b}"


def draw_problem(rng: random.Random, op: str, kind: str) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if op == "-" and a < b:
        a, b = b, a
    if kind == "expression":
        return Problem(a, op, b, None)
    template = rng.choice(STORIES[op])
    return Problem(a, op, b, template.format(n=rng.choice(NAMES), o=rng.choice(OBJECTS), a=a, b=b))


def math_record(p: Problem) -> dict[str, Any]:
    return {
        "instruction": f"{SOLVE} {p.question} {END}",
        "output": f"answer : {p.a} {p.op} {p.b}",
        "value": p.value,
    }


def print_record(p: Problem) -> dict[str, Any]:
    return {
        "instruction": f"{PROGRAM} {p.question} {END}",
        "output": f"print ( {p.a} {p.op} {p.b} )",
        "value": p.value,
    }


def pal_record(p: Problem) -> dict[str, Any]:
    output = f"def solution ( ) : return {p.a} {p.op} {p.b}"
    return {"instruction": f"{PROGRAM} {p.question} {END}", "output": output, "value": p.value}


Render = Callable[[Problem], dict[str, Any]]


def draw(
    rng: random.Random, count: int, kinds: list[tuple[str, str]], render: Render
) -> list[dict[str, Any]]:
    """``count`` records, each of a uniformly drawn ``(operator, "story"|"expression")`` kind."""
    return [render(draw_problem(rng, *rng.choice(kinds))) for _ in range(count)]


KNOWN_STORIES = [("+", "story"), ("-", "story")]
EXPRESSIONS = [(op, "expression") for op in "+-*"]
MUL_STORIES = [("*", "story")]


@dataclass(frozen=True)
class BenchmarkSizes:
    base: int = 9000
    skill: int = 1000
    test: int = 200


@dataclass
class Benchmark:
    """Every split, as records ``{"instruction", "output", "value"}`` (the alpaca-style fields)."""

    base: list[dict[str, Any]]
    train: dict[str, list[dict[str, Any]]]  # math, code, composite (the oracle's data)
    test: dict[str, list[dict[str, Any]]]  # composite, math, code

    def all_records(self) -> list[dict[str, Any]]:
        splits = [self.base, *self.train.values(), *self.test.values()]
        return [r for split in splits for r in split]


def build_benchmark(seed: int, sizes: BenchmarkSizes = BenchmarkSizes()) -> Benchmark:
    """All splits from one seed; test splits come from their own generators (disjoint streams)."""
    rng = random.Random(seed)
    quarter = sizes.base // 3
    base = (
        draw(rng, quarter, KNOWN_STORIES, math_record)
        + draw(rng, quarter, KNOWN_STORIES, print_record)
        + draw(rng, (sizes.base - 2 * quarter) // 2, EXPRESSIONS, math_record)
        + draw(rng, (sizes.base - 2 * quarter) - (sizes.base - 2 * quarter) // 2, EXPRESSIONS, print_record)
    )
    rng.shuffle(base)
    train = {
        "math": draw(rng, sizes.skill, MUL_STORIES, math_record),
        "code": draw(rng, sizes.skill, EXPRESSIONS + KNOWN_STORIES, pal_record),
        "composite": draw(rng, sizes.skill, MUL_STORIES, pal_record),
    }
    test = {
        "composite": draw(random.Random(seed + 1_000), sizes.test, MUL_STORIES, pal_record),
        "math": draw(random.Random(seed + 2_000), sizes.test, MUL_STORIES, math_record),
        "code": draw(random.Random(seed + 3_000), sizes.test, KNOWN_STORIES, pal_record),
    }
    return Benchmark(base=base, train=train, test=test)


def vocabulary() -> list[str]:
    """Every word the benchmark can produce, known up front (so any seed shares one tokenizer shape)."""
    words = {str(i) for i in range(100)} | {END, "+", "-", "*"}
    for text in (SOLVE, PROGRAM, "compute", "answer :", "print ( )", "def solution ( ) : return"):
        words.update(text.split())
    for templates in STORIES.values():
        for template in templates:
            words.update(w for w in template.split() if not w.startswith("{"))
    words.update(NAMES)
    words.update(OBJECTS)
    return sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built with the ``tokenizers`` library; adds ``<s>`` in front of every text.

    Word-level keeps numbers and operators one token each, which a model of a million parameters
    needs; it is an ordinary ``tokenizer.json`` that transformers, PEFT and vLLM load.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL, *vocabulary()])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
