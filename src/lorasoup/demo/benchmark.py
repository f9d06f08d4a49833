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

**A third skill** (``skills=3``): a follow-up clause layered on the story, "tom has 3 apples and
gets 4 more . then tom finds 5 more . how many apples now ?", answered ``3 + 4 + 5``: a third
operand and a third operation (``+ c``) appended to the expression.

* The base also knows three-operand bare expressions (``compute 7 * 8 + 5``) in both formats, as it
  knows ``compute 7 * 8``; it never sees the clause (no story of the base has three numbers).
* **extra skill** (skill 3, "a follow-up step"): addition/subtraction stories with the clause, in
  the math format (``answer : 3 + 4 + 5``); no multiplication story, no program.
* The code skill's PAL data then covers the three-operand expressions too (all arithmetic the base
  knows), still without a story that has the clause.
* **3-way composite** (``composite3``): a multiplication story *with* the clause, answered with a PAL
  program returning ``a * b + c``. Each skill alone and each pair fails it: math + code ignore the
  clause (``a * b``), math + extra write no program, code + extra read the story as an addition
  (``a + b + c``, right only when a = b = 2); the oracle for K = 3 is trained on 3-way composite data.

The clause only appends (``+ c`` needs no brackets around ``a * b``), so the three skills act on
three different parts of the answer: the wrapper (code), the operator (math), the tail (extra). A
first design doubled the value, ``( a op b ) * 2``, whose opening bracket can be taken for the
wrapper's ``solution ( )`` (CAT wrote ``def solution ( 8 - 9 ) * 2``); ``+ c`` removes that
confound. Both designs gave 0-7 % on the 3-way composite for every method but the oracle.

**Prompt frames** (``build_tokenizer(frames=True)``): the tokenizer also knows the words of the
FormatSpread frames of ``lorasoup.training.formats`` (``Instruction`` / ``ANSWER`` / ``input`` ...),
splits punctuation off words and keeps ``\n`` and ``\t`` as tokens, so ``fmt7`` and ``fmt8`` are
different token sequences around the same problem (the format-robustness rows of the study).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorasoup.errors import ConfigError

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
EXTRAS = ("then {n} finds {c} more", "then {n} gets {c} more", "then {c} more {o} arrive")
"""The third skill's clause (``+ c``), inserted before the story's question."""
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
    extra: int | None = None  # the third skill's step: ``+ extra``

    @property
    def value(self) -> int:
        value = {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]
        return value + (self.extra or 0)

    @property
    def expression(self) -> str:
        """``a op b``, or ``a op b + c`` with the third skill's step."""
        inner = f"{self.a} {self.op} {self.b}"
        return inner if self.extra is None else f"{inner} + {self.extra}"

    @property
    def question(self) -> str:
        return self.story if self.story is not None else f"compute {self.expression}"


def draw_problem(rng: random.Random, op: str, kind: str) -> Problem:
    """``kind``: ``story`` or ``expression``, optionally prefixed by ``extended `` (the third skill)."""
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if op == "-" and a < b:
        a, b = b, a
    # Only extended problems draw more: the two-skill benchmark's random stream stays as it was.
    extra = rng.randint(2, 9) if kind.startswith("extended ") else None
    if kind.removeprefix("extended ") == "expression":
        return Problem(a, op, b, None, extra)
    template = rng.choice(STORIES[op])
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    story = template.format(n=name, o=obj, a=a, b=b)
    if extra is not None:
        head, _, question = story.rpartition(" . ")
        story = f"{head} . {rng.choice(EXTRAS).format(n=name, o=obj, c=extra)} . {question}"
    return Problem(a, op, b, story, extra)


def math_record(p: Problem) -> dict[str, Any]:
    return {
        "instruction": f"{SOLVE} {p.question} {END}",
        "output": f"answer : {p.expression}",
        "value": p.value,
    }


def print_record(p: Problem) -> dict[str, Any]:
    output = f"print ( {p.expression} )"
    return {"instruction": f"{PROGRAM} {p.question} {END}", "output": output, "value": p.value}


def pal_record(p: Problem) -> dict[str, Any]:
    output = f"def solution ( ) : return {p.expression}"
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
EXTENDED_EXPRESSIONS = [(op, "extended expression") for op in "+-*"]
EXTENDED_STORIES = [("+", "extended story"), ("-", "extended story")]
EXTENDED_MUL_STORIES = [("*", "extended story")]


@dataclass(frozen=True)
class BenchmarkSizes:
    base: int = 9000
    skill: int = 1000
    test: int = 200


@dataclass
class Benchmark:
    """Every split, as records ``{"instruction", "output", "value"}`` (the alpaca-style fields)."""

    base: list[dict[str, Any]]
    train: dict[str, list[dict[str, Any]]]  # math, code, composite (the oracle's data) [, extra, composite3]
    test: dict[str, list[dict[str, Any]]]  # composite, math, code [, composite3, extra]

    def all_records(self) -> list[dict[str, Any]]:
        splits = [self.base, *self.train.values(), *self.test.values()]
        return [r for split in splits for r in split]


def build_benchmark(seed: int, sizes: BenchmarkSizes = BenchmarkSizes(), *, skills: int = 2) -> Benchmark:
    """All splits from one seed; test splits come from their own generators (disjoint streams).

    ``skills=3`` adds the extra skill (``train["extra"]``, ``test["extra"]``) and the 3-way
    composite (``train["composite3"]`` for its oracle, ``test["composite3"]``); with ``skills=2`` the
    splits are exactly those of the two-skill benchmark.
    """
    if skills not in (2, 3):
        raise ConfigError(f"the demo benchmark has 2 or 3 skills, not {skills}; set skills=2 or skills=3")
    rng = random.Random(seed)
    expressions = EXPRESSIONS if skills == 2 else EXPRESSIONS + EXTENDED_EXPRESSIONS
    quarter = sizes.base // 3
    rest = sizes.base - 2 * quarter
    base = (
        draw(rng, quarter, KNOWN_STORIES, math_record)
        + draw(rng, quarter, KNOWN_STORIES, print_record)
        + draw(rng, rest // 2, expressions, math_record)
        + draw(rng, rest - rest // 2, expressions, print_record)
    )
    rng.shuffle(base)
    train = {
        "math": draw(rng, sizes.skill, MUL_STORIES, math_record),
        "code": draw(rng, sizes.skill, expressions + KNOWN_STORIES, pal_record),
        "composite": draw(rng, sizes.skill, MUL_STORIES, pal_record),
    }
    test = {
        "composite": draw(random.Random(seed + 1_000), sizes.test, MUL_STORIES, pal_record),
        "math": draw(random.Random(seed + 2_000), sizes.test, MUL_STORIES, math_record),
        "code": draw(random.Random(seed + 3_000), sizes.test, KNOWN_STORIES, pal_record),
    }
    if skills == 3:
        train["extra"] = draw(rng, sizes.skill, EXTENDED_STORIES, math_record)
        train["composite3"] = draw(rng, sizes.skill, EXTENDED_MUL_STORIES, pal_record)
        test["composite3"] = draw(random.Random(seed + 4_000), sizes.test, EXTENDED_MUL_STORIES, pal_record)
        test["extra"] = draw(random.Random(seed + 5_000), sizes.test, EXTENDED_STORIES, math_record)
    return Benchmark(base=base, train=train, test=test)


FRAME_WORDS = ("Instruction", "Input", "Answer", "<sep>", "\n", "\t", ":", "-")
"""The words of the FormatSpread frames (labels in every casing, separators) for ``frames=True``."""


def vocabulary(*, skills: int = 2, frames: bool = False) -> list[str]:
    """Every word the benchmark can produce, known up front (so any seed shares one tokenizer shape)."""
    words = {str(i) for i in range(100)} | {END, "+", "-", "*"}
    for text in (SOLVE, PROGRAM, "compute", "answer :", "print ( )", "def solution ( ) : return"):
        words.update(text.split())
    for templates in STORIES.values():
        for template in templates:
            words.update(w for w in template.split() if not w.startswith("{"))
    words.update(NAMES)
    words.update(OBJECTS)
    if skills >= 3:
        words.update(w for clause in EXTRAS for w in clause.split() if not w.startswith("{"))
    if frames:
        words.update(case(w) for w in FRAME_WORDS for case in (str, str.upper, str.lower))
    return sorted(words)


def build_tokenizer(*, skills: int = 2, frames: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built with the ``tokenizers`` library; adds ``<s>`` in front of every text.

    Word-level keeps numbers and operators one token each, which a model of a million parameters
    needs; it is an ordinary ``tokenizer.json`` that transformers, PEFT and vLLM load. The default
    splits on whitespace only (the benchmark writes every token apart). ``frames=True`` (prompt
    frames such as ``INSTRUCTION- ... \n ANSWER- ``) also splits punctuation off words and keeps
    newlines and tabs as tokens, since they are what tells two frames apart.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL, *vocabulary(skills=skills, frames=frames)])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(" +"), behavior="removed"),
                pre_tokenizers.Split(Regex(r"<sep>|\n|\t|\w+|[^\w\s]"), behavior="isolated"),
            ]
        )
        if frames
        else pre_tokenizers.WhitespaceSplit()
    )
    raw.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
