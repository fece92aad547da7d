"""Rule conditions: tag operators (equals, one_of, regex, range, present, absent) and all/any/not.

`regex` is RE2 syntax, compiled only by patterns.compile_pattern (linear-time matching: no rule
text can make evaluation hang).

`equals` and `one_of` compare code strings (VR CS: Modality, BodyPartExamined, ImageType, ...)
without regard to case and surrounding spaces, because real headers are not upper case: the
rule's "CHEST" matches "Chest" and "chest ". Other text compares exactly; a regex can ask for
case-insensitive matching itself with "(?i)".

Each condition explains its outcome, because admins read the reasons to learn why a study got,
or did not get, a model. An Outcome carries the path to the deciding node ("all[1].any") and
a body ("Modality equals 'CT': held (value 'CT')"); `str(outcome)` joins them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword

from .facts import as_number, as_values, describe_value, is_empty, show_value
from .patterns import PatternError, compile_pattern

TAG_OPERATORS = ("equals", "one_of", "regex", "range", "present", "absent")
HEX_TAG = re.compile(r"^([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})$")


@dataclass
class Outcome:
    held: bool
    path: list[str]  # segments from this node down to the node that decided, e.g. ["all[5]", "any"]
    body: str

    def __str__(self) -> str:
        return f"{'.'.join(self.path)}: {self.body}" if self.path else self.body


def verdict(held: bool) -> str:
    return "held" if held else "failed"


@dataclass
class TagCondition:
    """`{ tag = ..., <operator> = operand }`; operand types are checked by parse_condition."""

    tag: str  # as written: a DICOM keyword or "gggg,eeee"
    operator: str  # one of TAG_OPERATORS
    operand: object  # str|number (equals), tuple (one_of), str (regex), (lo, hi) (range), True (present/absent)
    pattern: object = field(default=None, compare=False, repr=False)  # RE2, from patterns.compile_pattern

    def __post_init__(self) -> None:
        if self.operator == "regex" and self.pattern is None:
            self.pattern = compile_pattern(self.operand)

    def lookup_keys(self) -> list[str]:
        """Attributes are keyed by keyword; private/unknown hex tags can only be keyed by "GGGG,EEEE"."""
        match = HEX_TAG.match(self.tag)
        if not match:
            return [self.tag]
        keyword = keyword_for_tag(int(match[1] + match[2], 16))
        hex_key = f"{match[1]},{match[2]}".upper()
        return [keyword, hex_key] if keyword else [hex_key]

    def describe(self) -> str:
        operand = self.operand
        if self.operator == "equals":
            return f"{self.tag} equals {operand!r}"
        if self.operator == "one_of":
            return f"{self.tag} one of {list(operand)!r}"
        if self.operator == "regex":
            return f"{self.tag} regex {operand!r}"
        if self.operator == "range":
            return f"{self.tag} in range [{operand[0]}, {operand[1]}]"
        return f"{self.tag} {self.operator}"  # present / absent

    def check(self, attributes: dict[str, object]) -> Outcome:
        value = None
        for key in self.lookup_keys():
            if not is_empty(attributes.get(key)):
                value = attributes[key]
                break
        shown = "absent" if value is None else f"value {show_value(value)}"

        if self.operator == "present":
            held = value is not None
        elif self.operator == "absent":
            held = value is None
        elif value is None:
            held = False
        elif self.operator == "range":
            # a range constrains every value (e.g. both PixelSpacing values); text cannot be in a range
            numbers = [as_number(v) for v in as_values(value)]
            if None in numbers:
                shown += " is not a number"
                held = False
            else:
                low, high = self.operand
                held = all(low <= n <= high for n in numbers)
        else:
            # multi-valued attributes (ImageType, ...) match when any one value matches
            held = any(self._matches(v) for v in as_values(value))
        return Outcome(held, [], f"{self.describe()}: {verdict(held)} ({shown})")

    def _matches(self, value: object) -> bool:
        if self.operator == "regex":
            return self.pattern.search(str(value)) is not None
        candidates = self.operand if self.operator == "one_of" else (self.operand,)
        code_string = self.is_code_string()
        return any(_equal(value, candidate, code_string) for candidate in candidates)

    def is_code_string(self) -> bool:
        """The tag's VR is CS (compared without regard to case and surrounding spaces)."""
        match = HEX_TAG.match(self.tag)
        tag = int(match[1] + match[2], 16) if match else tag_for_keyword(self.tag)
        try:
            return tag is not None and dictionary_VR(tag) == "CS"
        except KeyError:  # private or unknown: its VR is not known
            return False

    def to_data(self) -> dict:
        operand = list(self.operand) if self.operator in ("one_of", "range") else self.operand
        return {"tag": self.tag, self.operator: operand}


def _equal(value: object, expected: object, code_string: bool = False) -> bool:
    """Numbers compare numerically (DS/IS text included: "5.0" equals 5); code strings without
    regard to case and surrounding spaces; anything else as case-sensitive text."""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        number = as_number(value)
        return number is not None and number == expected
    if code_string:
        return str(value).strip().upper() == str(expected).strip().upper()
    return str(value) == expected


@dataclass
class AllOf:
    conditions: list[Condition]

    def check(self, attributes: dict[str, object]) -> Outcome:
        held_parts = []
        for index, condition in enumerate(self.conditions):
            outcome = condition.check(attributes)
            if not outcome.held:  # the first failing branch is enough to explain a failure
                return Outcome(False, [f"all[{index}]"] + outcome.path, outcome.body)
            held_parts.append(str(outcome))
        return Outcome(True, [], "; ".join(held_parts))

    def to_data(self) -> dict:
        return {"all": [c.to_data() for c in self.conditions]}


@dataclass
class AnyOf:
    conditions: list[Condition]

    def check(self, attributes: dict[str, object]) -> Outcome:
        failed_parts = []
        for index, condition in enumerate(self.conditions):
            outcome = condition.check(attributes)
            if outcome.held:  # the first branch that held explains the success
                return Outcome(True, [f"any[{index}]"] + outcome.path, outcome.body)
            failed_parts.append(f"[{index}] {outcome}")
        return Outcome(False, ["any"], f"none held ({'; '.join(failed_parts)})")

    def to_data(self) -> dict:
        return {"any": [c.to_data() for c in self.conditions]}


@dataclass
class Not:
    condition: Condition

    def check(self, attributes: dict[str, object]) -> Outcome:
        inner = self.condition.check(attributes)
        return Outcome(not inner.held, ["not"], f"{verdict(not inner.held)} ({inner})")

    def to_data(self) -> dict:
        return {"not": self.condition.to_data()}


Condition = TagCondition | AllOf | AnyOf | Not


# ---------------------------------------------------------------------------------------------
# Parsing. Problems are collected as (path, message) so that one run reports every mistake.


def parse_condition(raw: object, path: str, problems: list[tuple[str, str]]) -> Condition | None:
    if not isinstance(raw, dict):
        example = '{ tag = "Modality", equals = "CT" }'
        problems.append((path, f"expected a table like {example}, got {describe_value(raw)}"))
        return None
    kinds = [key for key in ("all", "any", "not", "tag") if key in raw]
    if len(kinds) > 1:
        problems.append((path, f"one condition cannot mix {' and '.join(repr(k) for k in kinds)}; nest them instead"))
        return None
    if not kinds:
        problems.append((path, f"expected 'tag' with an operator, or 'all', 'any' or 'not'; got keys {sorted(raw)}"))
        return None

    kind = kinds[0]
    if kind == "tag":
        return _parse_tag_condition(raw, path, problems)
    extra = sorted(set(raw) - {kind})
    if extra:
        problems.append((path, f"unknown key(s) {extra} next to {kind!r}"))
    if kind == "not":
        inner = parse_condition(raw["not"], f"{path}.not", problems)
        return Not(inner) if inner is not None else None

    items = raw[kind]
    if not isinstance(items, list) or not items:
        problems.append((f"{path}.{kind}", f"expected a non-empty list of conditions, got {describe_value(items)}"))
        return None
    children = [parse_condition(item, f"{path}.{kind}[{i}]", problems) for i, item in enumerate(items)]
    if any(child is None for child in children):
        return None
    return AllOf(children) if kind == "all" else AnyOf(children)


def _parse_tag_condition(raw: dict, path: str, problems: list[tuple[str, str]]) -> TagCondition | None:
    count_before = len(problems)
    tag = raw["tag"]
    tag_problem = check_tag(tag)
    if tag_problem:
        problems.append((f"{path}.tag", tag_problem))

    unknown = sorted(set(raw) - {"tag", *TAG_OPERATORS})
    for key in unknown:
        problems.append((f"{path}.{key}", f"unknown key {key!r} (operators: {', '.join(TAG_OPERATORS)})"))
    operators = [key for key in TAG_OPERATORS if key in raw]
    if len(operators) != 1:
        if not operators and not unknown:
            problems.append((path, f"no operator for tag {tag!r}; expected one of {', '.join(TAG_OPERATORS)}"))
        elif operators:
            problems.append(
                (path, f"more than one operator ({', '.join(operators)}); put each in its own condition under all = [...]")
            )
        return None

    operator = operators[0]
    operand = _check_operand(operator, raw[operator], f"{path}.{operator}", problems)
    if len(problems) > count_before:
        return None
    return TagCondition(tag, operator, operand)


def _check_operand(operator: str, value: object, path: str, problems: list[tuple[str, str]]) -> object:
    if operator == "equals":
        if not _is_scalar(value):
            problems.append((path, f"expected a string or number, got {describe_value(value)}"))
        return value
    if operator == "one_of":
        if not isinstance(value, list) or not value or not all(_is_scalar(v) for v in value):
            problems.append((path, f"expected a non-empty list of strings or numbers, got {describe_value(value)}"))
            return None
        return tuple(value)
    if operator == "regex":
        if not isinstance(value, str):
            problems.append((path, f"expected a string, got {describe_value(value)}"))
            return None
        try:
            compile_pattern(value)
        except PatternError as error:
            problems.append((path, str(error)))
        return value
    if operator == "range":
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
            problems.append((path, f"expected [low, high] with two numbers, got {describe_value(value)}"))
            return None
        low, high = float(value[0]), float(value[1])
        if low > high:
            problems.append((path, f"low {value[0]} is greater than high {value[1]}"))
        return (low, high)
    # present / absent: only `= true` is meaningful; `present = false` is spelled `absent = true`
    if value is not True:
        opposite = "absent" if operator == "present" else "present"
        problems.append((path, f"expected true, got {describe_value(value)} (for the opposite use {opposite} = true)"))
    return True


def check_tag(tag: object) -> str | None:
    """None when `tag` is a pydicom keyword or "gggg,eeee"; otherwise the problem."""
    if not isinstance(tag, str):
        return f"expected a DICOM keyword or \"gggg,eeee\", got {describe_value(tag)}"
    if HEX_TAG.match(tag) or tag_for_keyword(tag) is not None:
        return None
    hint = difflib.get_close_matches(tag, keyword_dict.keys(), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown DICOM keyword {tag!r}{suggestion}; use a keyword from the DICOM dictionary or \"gggg,eeee\""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: object) -> bool:
    return isinstance(value, str) or _is_number(value)
