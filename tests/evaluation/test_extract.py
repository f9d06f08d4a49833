"""Answer extractors: programs, numbers, answer phrases, lines; and their registry."""

import pytest

from lorasoup.errors import ConfigError
from lorasoup.evaluation.extract import (
    EXTRACTORS,
    answer_number,
    answer_phrase,
    extract_program,
    first_line,
    first_number,
    last_number,
    numbers_in,
    strip,
)

PAL_ANSWER = (
    "Let’s go ahead and solve this using Python:\n```\ndef solution():\n    money_initial = 23\n"
    "    result = money_initial - 5 * 3\n    return result\n```\n\n### Instruction: next"
)


def test_fenced_program_is_taken_without_the_prose_around_it():
    code = extract_program(PAL_ANSWER)
    assert (
        code
        == "def solution():\n    money_initial = 23\n    result = money_initial - 5 * 3\n    return result\n"
    )


@pytest.mark.parametrize("tag", ["python", "py", "Python3", ""])
def test_fence_language_tags(tag):
    assert (
        extract_program(f"```{tag}\ndef solution():\n    return 1\n```") == "def solution():\n    return 1\n"
    )


def test_block_defining_solution_is_preferred_over_earlier_blocks():
    text = "```\nprint('hi')\n```\nthen\n```python\nimport math\ndef solution():\n    return math.pi\n```"
    assert extract_program(text) == "import math\ndef solution():\n    return math.pi\n"


def test_first_block_when_none_defines_solution():
    assert extract_program("```\nx = 1\nprint(x)\n```\n```\ny = 2\n```") == "x = 1\nprint(x)\n"


def test_unclosed_last_block_counts():
    # a stop string or max_new_tokens can end the text inside the block
    assert (
        extract_program("Sure:\n```python\ndef solution():\n    return 7")
        == "def solution():\n    return 7\n"
    )


def test_bare_solution_with_imports_and_body_only():
    text = (
        "Here it is.\nimport math\nfrom fractions import Fraction\n\ndef solution():\n    x = 2\n\n"
        "    if x:\n        x += 1\n    return x\nprint(solution())\nmore prose"
    )
    expected = (
        "import math\nfrom fractions import Fraction\ndef solution():\n    x = 2\n\n"
        "    if x:\n        x += 1\n    return x\n"
    )
    assert extract_program(text) == expected


def test_no_program():
    assert extract_program("The answer is 42.") is None
    assert extract_program("```\n\n```") is None


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("The answer is 1,234,567.", ["1234567"]),
        ("x = -5 and y = −3.5e10", ["-5", "-3.5e10"]),
        ("it is 3/4.", ["3/4"]),
        ("pay $12.50 now, or .5 later", ["12.50", ".5"]),
        ("1e-5 and 2E+3", ["1e-5", "2E+3"]),
        ("5 - 3 = 2", ["5", "3", "2"]),
        ("100km in 2 hours", ["100", "2"]),
        ("v2 and x3y", []),
        ("1,2345", ["1", "2345"]),
        ("no digits here", []),
    ],
)
def test_numbers_in(text, numbers):
    assert numbers_in(text) == numbers


def test_first_and_last_number():
    assert last_number("from 3 to 4,000,000") == "4000000"
    assert first_number("from 3 to 4,000,000") == "3"
    assert last_number("none") is None


def test_answer_phrase_and_fallbacks():
    assert answer_phrase("The correct answer is: red, blue.\n\n### Instruction") == "red, blue."
    assert answer_phrase("the correct answer is RPKM (reads per kilobase)") == "RPKM (reads per kilobase)"
    assert answer_phrase("  Red and blue.\n\nNext paragraph") == "Red and blue."
    assert answer_phrase("   \n") is None


def test_answer_number_prefers_the_phrase():
    assert answer_number("Counting 7 words, the correct answer is 3 (of 9)") == "3"
    assert answer_number("words: 4, 5; so 6") == "6"


def test_line_and_strip():
    assert first_line("\n\n  first \nsecond") == "first"
    assert first_line(" \n") is None
    assert strip("  a b \n") == "a b"
    assert strip("  ") is None


def test_registry_names_and_did_you_mean():
    assert {
        "program",
        "last_number",
        "first_number",
        "answer_phrase",
        "answer_number",
        "first_line",
        "strip",
    } <= set(EXTRACTORS.names())
    with pytest.raises(ConfigError, match="did you mean 'last_number'"):
        EXTRACTORS.get("last_numbr")
