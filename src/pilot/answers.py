"""Answer grammars: the only text a reasoning-gym scorer is ever shown.

Generated answers are untrusted input, and several reasoning-gym scorers evaluate them:
``countdown``, ``puzzle24``, ``polynomial_multiplication`` and ``simple_integration`` with
sympy's ``parse_expr`` (which runs Python), ``string_insertion``, ``spiral_matrix``,
``n_queens`` and ``binary_matrix`` with ``eval``. A block list of bad words cannot keep code
out of those -- pieces of a string can be assembled into any name -- so this module is an
allow-list: every accepted task has one grammar for its answer type, an answer is tokenised and
parsed by the hand-written code below (never ``eval``, ``ast`` or sympy), and the scorer is
handed the parse written out again. What does not parse scores 0 without reaching a scorer.

Every grammar is bounded (characters, tokens, digits per number, bracket depth) and none can
raise a number to a power: the only power is a polynomial variable raised to a literal of at
most two digits, so ``9**9**9``-style bombs cannot be written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_ANSWER_CHARS = 2000
MAX_TOKENS = 500          # numbers, operators, cells
MAX_NUMBER_DIGITS = 40
MAX_DEPTH = 16            # brackets and unary signs nested in one another
MAX_POWER_DIGITS = 2      # x**99 at most
MAX_WORD_CHARS = 200
MAX_GRID_SIDE = 50

# Printable ASCII plus tab and newlines. Non-ASCII is refused outright rather than normalised:
# Python reads `ｅｘｅｃ` as `exec`, and `int()` reads Arabic-Indic digits.
_PLAIN_TEXT = re.compile(r"[\x20-\x7e\t\r\n]*")
_INTEGER = re.compile(rf"[+-]?[0-9]{{1,{MAX_NUMBER_DIGITS}}}")
_DECIMAL = re.compile(
    rf"[+-]?(?:[0-9]{{1,{MAX_NUMBER_DIGITS}}}|[0-9]{{1,3}}(?:,[0-9]{{3}}){{1,12}})(?:\.[0-9]{{0,{MAX_NUMBER_DIGITS}}})?"
)
_FRACTION = re.compile(
    rf"\$?\s*(?:(?P<num>[+-]?[0-9]{{1,{MAX_NUMBER_DIGITS}}})\s*/\s*(?P<den>[+-]?[0-9]{{1,{MAX_NUMBER_DIGITS}}})"
    rf"|\\d?frac\s*\{{\s*(?P<tex_num>[0-9]{{1,{MAX_NUMBER_DIGITS}}})\s*\}}"
    rf"\s*\{{\s*(?P<tex_den>[0-9]{{1,{MAX_NUMBER_DIGITS}}})\s*\}})"
    r"\s*\$?"
)
_CAPITAL_WORD = re.compile(rf"[A-Z]{{1,{MAX_WORD_CHARS}}}")
_EXPRESSION_TOKEN = re.compile(
    r"\s*(?:(?P<number>[0-9]+(?:\.[0-9]+)?)|(?P<power>\*\*)|(?P<operator>[-+*/()])|(?P<name>[A-Za-z]+))"
)


@dataclass(frozen=True)
class Grammar:
    """One answer type: ``parse`` returns the canonical text a scorer may see, or None."""

    name: str
    description: str
    parse: Callable[[str], str | None]


def _plain(answer: object) -> str | None:
    """The stripped answer when it is a short string of plain ASCII, else None."""
    if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
        return None
    if not _PLAIN_TEXT.fullmatch(answer):
        return None
    return answer.replace("\r\n", "\n").strip() or None


def _parse_integer(text: str) -> str | None:
    return text if _INTEGER.fullmatch(text) else None


def _parse_decimal(text: str) -> str | None:
    return text if _DECIMAL.fullmatch(text) else None


def _parse_fraction(text: str) -> str | None:
    match = _FRACTION.fullmatch(text)
    if match is None:
        return None
    if match["num"] is not None:
        return f"{match['num']}/{match['den']}"
    return f"{match['tex_num']}/{match['tex_den']}"


def _parse_capital_word(text: str) -> str | None:
    return text if _CAPITAL_WORD.fullmatch(text) else None


def _parse_integer_list(text: str) -> str | None:
    items = text.split()
    if len(items) > MAX_TOKENS or not all(_INTEGER.fullmatch(item) for item in items):
        return None
    return " ".join(items)


def _rows(text: str) -> list[list[str]] | None:
    rows = [line.split() for line in text.split("\n") if line.strip()]
    if not rows or len(rows) > MAX_GRID_SIDE or sum(len(row) for row in rows) > MAX_TOKENS:
        return None
    if any(len(row) != len(rows[0]) for row in rows):
        return None  # a matrix is rectangular
    return rows


def _parse_integer_grid(text: str) -> str | None:
    rows = _rows(text)
    if rows is None or not all(_INTEGER.fullmatch(cell) for row in rows for cell in row):
        return None
    return "\n".join(" ".join(row) for row in rows)


def _parse_queens_board(text: str) -> str | None:
    rows = _rows(text)
    if rows is None or len(rows) != len(rows[0]) or not all(cell in ("Q", "_") for row in rows for cell in row):
        return None
    return "\n".join(" ".join(row) for row in rows)


class _Reject(Exception):
    pass


class _ExpressionParser:
    """Recursive descent over the tokens of an arithmetic or polynomial expression.

    expression := term (('+' | '-') term)*
    term       := unary (('*' | '/') unary)*
    unary      := ('+' | '-') unary | atom
    atom       := number | variable ['**' digits] | '(' expression ')'

    ``variable`` is one of the names the grammar allows (none for plain arithmetic), and the
    power is the only one the grammar has: a variable to a literal of at most two digits.
    """

    def __init__(self, tokens: list[tuple[str, str]], variables: frozenset[str]) -> None:
        self.tokens, self.variables = tokens, variables
        self.position, self.depth = 0, 0

    def parse(self) -> None:
        self.expression()
        if self.position != len(self.tokens):
            raise _Reject

    def peek(self) -> str | None:
        return self.tokens[self.position][1] if self.position < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.position >= len(self.tokens):
            raise _Reject
        self.position += 1
        return self.tokens[self.position - 1]

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject

    def expression(self) -> None:
        self.term()
        while self.peek() in ("+", "-"):
            self.take()
            self.term()

    def term(self) -> None:
        self.unary()
        while self.peek() in ("*", "/"):
            self.take()
            self.unary()

    def unary(self) -> None:
        if self.peek() in ("+", "-"):
            self.take()
            self.nest()
            self.unary()
            self.depth -= 1
        else:
            self.atom()

    def atom(self) -> None:
        kind, value = self.take()
        if kind == "number":
            return
        if kind == "name" and value in self.variables:
            if self.peek() == "**":
                self.take()
                kind, value = self.take()
                if kind != "number" or not value.isdigit() or len(value) > MAX_POWER_DIGITS:
                    raise _Reject
            return
        if value == "(":
            self.nest()
            self.expression()
            if self.take()[1] != ")":
                raise _Reject
            self.depth -= 1
            return
        raise _Reject


def _tokenize(text: str) -> list[tuple[str, str]] | None:
    tokens, position = [], 0
    while position < len(text):
        match = _EXPRESSION_TOKEN.match(text, position)
        if match is None:
            return None
        kind = match.lastgroup
        value = match[kind]
        if kind == "number" and sum(ch.isdigit() for ch in value) > MAX_NUMBER_DIGITS:
            return None
        tokens.append((kind, value))
        if len(tokens) > MAX_TOKENS:
            return None
        position = match.end()
    return tokens


def _expression_parser(variables: tuple[str, ...]) -> Callable[[str], str | None]:
    allowed = frozenset(variables)

    def parse(text: str) -> str | None:
        tokens = _tokenize(text)
        if not tokens:
            return None
        try:
            _ExpressionParser(tokens, allowed).parse()
        except _Reject:
            return None
        return " ".join(value for _, value in tokens)

    return parse


INTEGER = Grammar("integer", "an optionally signed integer of at most 40 digits", _parse_integer)
DECIMAL = Grammar(
    "decimal", "an optionally signed decimal number (comma thousands groups allowed), at most 40 digits a part",
    _parse_decimal,
)
FRACTION = Grammar(
    "fraction", "`a/b`, `$a/b$` or `\\frac{a}{b}` of integers, handed on as `a/b`", _parse_fraction,
)
ARITHMETIC = Grammar(
    "arithmetic", "numbers with `+ - * / ( )` and unary signs; no power, no names", _expression_parser(()),
)
CAPITAL_WORD = Grammar("capital_word", "one word of capital letters A-Z", _parse_capital_word)
INTEGER_LIST = Grammar("integer_list", "integers separated by spaces", _parse_integer_list)
INTEGER_GRID = Grammar(
    "integer_grid", "a rectangular matrix: rows of integers separated by spaces, one row per line",
    _parse_integer_grid,
)
QUEENS_BOARD = Grammar(
    "queens_board", "a square board: rows of `Q` and `_` separated by spaces, one row per line",
    _parse_queens_board,
)


def polynomial(variables: tuple[str, ...]) -> Grammar:
    """Arithmetic over numbers and the given names, plus ``name**k`` for a literal k <= 99."""
    names = ", ".join(f"`{name}`" for name in variables)
    return Grammar(
        "polynomial", f"arithmetic over numbers and {names}, the only power `{variables[0]}**k` with k <= 99",
        _expression_parser(variables),
    )


# Every task whose scorer may be shown model output, with the one grammar its answers must fit.
ANSWER_GRAMMARS: dict[str, Grammar] = {
    "basic_arithmetic": DECIMAL,
    "chain_sum": DECIMAL,
    "count_bits": INTEGER,
    "gcd": INTEGER,
    "lcm": INTEGER,
    "leg_counting": INTEGER,
    "fraction_simplification": FRACTION,
    "path_star": INTEGER_LIST,
    "spiral_matrix": INTEGER_LIST,
    "binary_matrix": INTEGER_GRID,
    "n_queens": QUEENS_BOARD,
    "string_insertion": CAPITAL_WORD,
    "countdown": ARITHMETIC,
    "puzzle24": ARITHMETIC,
    # The variables reasoning-gym's generators use (its defaults: x, y, z; x or X), plus the
    # integration constant C that the simple_integration scorer declares itself.
    "polynomial_multiplication": polynomial(("x", "y", "z")),
    "simple_integration": polynomial(("x", "X", "C")),
}


def scorable_tasks() -> list[str]:
    """Task names whose answers have a grammar, so their scorers may be run."""
    return sorted(ANSWER_GRAMMARS)


def check_scorable(task: str) -> None:
    """Raise a one-sentence ValueError for a task whose answers have no grammar."""
    if task in ANSWER_GRAMMARS:
        return
    import reasoning_gym

    if task in reasoning_gym.factory.DATASETS:
        what = ("is a reasoning-gym task with no answer grammar in pilot.answers, so its scorer cannot be "
                "shown model output safely")
    else:
        what = "is not a reasoning-gym task with an answer grammar"
    raise ValueError(f"Task '{task}' {what}; use one of {scorable_tasks()}.")


def parse_answer(task: str, answer: object) -> str | None:
    """The canonical text of ``answer`` under ``task``'s grammar, or None when it does not parse."""
    check_scorable(task)
    text = _plain(answer)
    return None if text is None else ANSWER_GRAMMARS[task].parse(text)


# ------------------------------------------------------------------- reading the answer out
# A model's reply is read by one rule per task before any grammar sees it. The toy format's
# answer is the first line; a chain-of-thought reply is read by its last number, its last
# \boxed{...}, or what follows a marker ("after:Answer:").
_NUMBER_IN_TEXT = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:\s*/\s*[0-9]+)?")


def check_extraction_rule(rule: str) -> str:
    """``rule`` when it is first_line, last_number, boxed or after:<marker>; else a one-sentence ValueError."""
    if rule in ("first_line", "last_number", "boxed") or (rule.startswith("after:") and rule[6:].strip()):
        return rule
    raise ValueError(f"unknown answer extraction rule {rule!r}; use one of first_line, last_number, boxed, "
                     "or after:<marker> (e.g. 'after:Answer:')")


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i].strip()
    return None


def extract_answer(text: str, rule: str) -> str:
    """The answer in a generated reply under ``rule`` ('' when the rule finds none)."""
    if rule == "first_line":
        return text.split("\n", 1)[0].strip()
    if rule == "last_number":
        numbers = _NUMBER_IN_TEXT.findall(text)
        return re.sub(r"[,\s]", "", numbers[-1]) if numbers else ""
    if rule == "boxed":
        return last_boxed(text) or ""
    if rule.startswith("after:"):
        marker = rule[len("after:"):].strip()
        at = text.rfind(marker)
        return "" if at < 0 else text[at + len(marker):].strip().split("\n", 1)[0].strip().rstrip(".")
    raise ValueError(check_extraction_rule(rule))


# ------------------------------------------------------------------- local datasets
def gold_answer(raw: object) -> str:
    r"""A local dataset's gold answer as plain text: GSM8K's ``... #### 72`` gives ``72``, MATH's
    solution with ``\boxed{...}`` gives the boxed content, anything else is stripped as it is."""
    text = str(raw).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def _exact_number(text: str):
    """``text`` as an exact rational when it is one (integer, decimal, fraction, \\frac), else None."""
    from fractions import Fraction

    text = text.strip().strip("$").strip().rstrip(".").strip()
    text = re.sub(r"\\[!,;: ]", "", text).replace("\\left", "").replace("\\right", "")
    if _DECIMAL.fullmatch(text):
        return Fraction(text.replace(",", ""))
    match = _FRACTION.fullmatch(text)
    if match is None:
        return None
    num, den = (match["num"], match["den"]) if match["num"] is not None else (match["tex_num"], match["tex_den"])
    return None if int(den) == 0 else Fraction(int(num), int(den))


def _normalised(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\[!,;: ]|\\left|\\right|\$|\s", "", text)
    return text.rstrip(".").replace("dfrac", "frac").replace("tfrac", "frac")


def equivalent(answer: object, gold: str) -> bool:
    """Whether a local dataset's answer matches its gold answer: as exact numbers (``0.5``, ``1/2``,
    ``\\frac{1}{2}`` and ``1,000`` vs ``1000``) when both are numbers, else as LaTeX-normalised text
    (spaces, ``$``, ``\\left``/``\\right``, ``\\text{}`` and ``dfrac`` ignored). Nothing is evaluated."""
    text = _plain(answer)
    if text is None:
        return False
    a, b = _exact_number(text), _exact_number(gold)
    if a is not None and b is not None:
        return a == b
    return _normalised(text) == _normalised(gold) != ""
