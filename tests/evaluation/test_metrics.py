"""Metrics: numeric tolerance on GSM-Hard-like answers, SQuAD EM/F1, the paper's TF-IDF cosine."""

import math
from fractions import Fraction

import pytest

from lorasoup.evaluation.metrics import (
    METRICS,
    exact_match,
    normalize_answer,
    novel_token_f1,
    numeric,
    parse_number,
    reads_question,
    tfidf_cosine,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-1,234.5", Fraction(-2469, 2)),
        ("1.5e3", Fraction(1500)),
        ("3/4", Fraction(3, 4)),
        ("−7", Fraction(-7)),
        ("np.float64(3.5)", Fraction(7, 2)),
        ("Decimal('2.50')", Fraction(5, 2)),
        ("Fraction(7, 2)", Fraction(7, 2)),
        (12, Fraction(12)),
        (0.1, Fraction(0.1)),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text", ["True", "[3]", "(1, 2)", "3+4j", "abc", "", None, True, "1/0", "Fraction(1, 0)", "9" * 5000]
)
def test_not_numbers(text):
    assert parse_number(text) is None


def test_huge_exponents_do_not_hang_or_overflow():
    assert parse_number("1e400") == Fraction(10) ** 400
    assert parse_number("1e99999999") == math.inf
    assert parse_number("-1e-99999999") == 0.0
    assert numeric("1e400", "1e400") == 1.0


def test_numeric_gsm_hard_answers():
    assert numeric("-9867630", -9867630.0) == 1.0
    assert numeric("-9867630.0004", -9867630.0) == 1.0  # within the reference's absolute 1e-3
    # off by the 3 eggs of the question: a relative 1e-3 tolerance would wrongly accept it
    assert numeric("-9867624", -9867630.0) == 0.0
    # a non-integer answer stored with float noise (GSM-Hard row 2 of our fixture)
    assert numeric("3244047.1", 3244047.0999999996) == 1.0
    assert numeric("3244047.2", 3244047.0999999996) == 0.0
    assert numeric("0.333", 1 / 3) == 1.0 and numeric("0.33", 1 / 3) == 0.0


def test_numeric_is_the_reference_rule_by_default():
    """``abs(label - pred) <= 0.001`` and nothing more: no relative window at large answers."""
    assert numeric("6277334006", 6277334000.0) == 0.0  # GSM-Hard test/11, an integer off by 6 at 6e9
    assert numeric("1000000001", 1000000000.0) == 0.0  # off by one at 1e9
    assert numeric("10000000.0099", 10000000.0) == 0.0  # off by 0.0099 at 1e7
    assert numeric("10000000.0009", 10000000.0) == 1.0
    assert numeric("6277334000", 6277334000.0) == 1.0
    # the old relative 1e-9 is still there for who asks for it
    assert numeric("1000000001", 1000000000.0, rel_tol=1e-9) == 1.0


def test_numeric_exact_integers_beyond_float_precision():
    exact = 2**60 + 3  # a program's exact int; the stored float answer rounds it
    assert numeric(str(exact), float(exact)) == 1.0
    assert numeric(str(exact), float(2**61)) == 0.0


def test_numeric_edge_values():
    assert numeric("inf", math.inf) == 1.0
    assert numeric("inf", -math.inf) == 0.0
    assert numeric("nan", math.nan) == 0.0
    assert numeric(None, 3) == 0.0
    assert numeric("three", 3) == 0.0
    assert numeric("3", ["4", "3"]) == 1.0  # any acceptable reference
    assert numeric("10.4", 10, abs_tol=0.5) == 1.0


def test_squad_normalisation_em_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the Cat.", "cat") == 1.0
    assert exact_match("a cat", "dog") == 0.0
    assert exact_match(None, "x") == 0.0
    # common tokens red, and, blue: precision 3/3, recall 3/4 -> F1 = 6/7
    assert token_f1("red and blue", "blue, red and yellow") == pytest.approx(6 / 7)
    assert token_f1("red green", "red blue yellow") == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert token_f1("green", "red") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("cat", ["dog", "a cat"]) == 1.0


def test_novel_token_f1_ignores_the_question_words():
    question = "What is the spellcasting ability for bard spells?"
    reference = "The spellcasting ability for bard spells is Charisma."
    echo = "The spellcasting ability for bard spells is Wisdom."
    assert tfidf_cosine(echo, reference) > 0.3  # the paper's rule passes the wrong echo
    assert novel_token_f1(echo, reference, question=question) == 0.0
    assert novel_token_f1(question, reference, question=question) == 0.0
    assert novel_token_f1("Charisma", reference, question=question) == 1.0
    assert novel_token_f1("It is Charisma.", reference, question=question) == pytest.approx(2 / 3)
    assert novel_token_f1(None, reference, question=question) == 0.0
    assert novel_token_f1("Charisma", reference) == token_f1("Charisma", reference)  # no question
    assert reads_question(METRICS.get("novel_token_f1")) and not reads_question(token_f1)


def test_novel_token_f1_when_the_question_holds_the_answer():
    """Every reference word in the question ("higher or lower?"): plain F1, an echo's precision is low."""
    question = "Should they predict higher or lower than 40%?"
    assert novel_token_f1("higher", "higher", question=question) == 1.0
    assert novel_token_f1(question, "higher", question=question) == pytest.approx(
        token_f1(question, "higher")
    )
    assert novel_token_f1(question, "higher", question=question) < 0.3


def test_tfidf_cosine_fitted_on_the_pair():
    # fit on ["red blue", "red green"]: idf(red) = ln(3/3) + 1 = 1, idf(blue) = idf(green) = ln(3/2) + 1
    rare = math.log(3 / 2) + 1
    expected = 1 / (rare**2 + 1)
    assert tfidf_cosine("red blue", "red green") == pytest.approx(expected)
    assert tfidf_cosine("Red, BLUE and yellow", "yellow and blue, red") == pytest.approx(1.0)
    assert tfidf_cosine("cats", "dogs") == 0.0
    assert tfidf_cosine("a", "?") == 0.0  # no word of two letters: empty vocabulary
    assert tfidf_cosine(None, "x") == 0.0
    # the QABot threshold: a partial answer passes, an unrelated one does not
    reference = "Extra kinetic energy is needed for a molecule to jump a fence between compartments"
    assert tfidf_cosine("extra kinetic energy", reference) > 0.3
    assert tfidf_cosine("ATP hydrolysis drives pumps", reference) < 0.3


def test_registry():
    assert {"numeric", "exact_match", "token_f1", "novel_token_f1", "tfidf_cosine"} <= set(METRICS.names())


def test_exact_text_keeps_operators_and_case():
    exact_text = METRICS.get("exact_text")
    assert exact_text("answer :  7 * 8 ", "answer : 7 * 8") == 1.0
    assert exact_text("answer : 7 + 8", "answer : 7 * 8") == 0.0  # exact_match would call these equal
    assert exact_match("answer : 7 + 8", "answer : 7 * 8") == 1.0
    assert exact_text("Cat", "cat") == 0.0
    assert exact_text(None, "x") == 0.0
