"""Writes a RuleSet back as TOML (the admin page saves edited rules as text).

A small emitter for this one known structure, so that the node needs no TOML-writing dependency;
tomllib.loads(rules_to_toml(r)) parses back to an equal RuleSet.
"""

from __future__ import annotations

import math

from .conditions import AllOf, Condition, Not, TagCondition
from .rules import RuleSet

INDENT = "  "


def rules_to_toml(rule_set: RuleSet) -> str:
    blocks = []
    for rule in rule_set.rules:
        lines = [
            "[[rules]]",
            f"name = {_value(rule.name)}",
            f"priority = {_value(rule.priority)}",
            f"enabled = {_value(rule.enabled)}",
            f"models = {_value(rule.models)}",
            f"destinations = {_value(rule.destinations)}",
        ]
        if rule.quiet_period_s is not None:
            lines.append(f"quiet_period_s = {_value(rule.quiet_period_s)}")
        if rule.qc_fail is not None:
            lines.append(f"qc_fail = {_value(rule.qc_fail)}")
        if rule.no_result_notice:
            lines.append(f"no_result_notice = {_value(rule.no_result_notice)}")
        if rule.priors is not None:
            pairs = ", ".join(f"{key} = {_value(value)}" for key, value in rule.priors.to_data().items())
            lines.append(f"priors = {{ {pairs} }}")
        if rule.source is not None:
            lines.append(f"source = {_value(rule.source)}")
        lines.append(f"when = {_condition(rule.when, 0)}")
        if not rule.series.is_default():
            lines += [
                "",
                "[rules.series]",
                f"orientation = {_value(rule.series.orientation)}",
                f"min_slices = {_value(rule.series.min_slices)}",
                f"pick = {_value(rule.series.pick)}",
            ]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _condition(condition: Condition, depth: int) -> str:
    # inline tables may not span lines in TOML 1.0, but arrays inside them may: lists of
    # conditions go one per line, everything else stays inline
    if isinstance(condition, TagCondition):
        pairs = ", ".join(f"{key} = {_value(value)}" for key, value in condition.to_data().items())
        return f"{{ {pairs} }}"
    if isinstance(condition, Not):
        return f"{{ not = {_condition(condition.condition, depth)} }}"
    kind = "all" if isinstance(condition, AllOf) else "any"
    inner = INDENT * (depth + 1)
    items = "".join(f"{inner}{_condition(child, depth + 1)},\n" for child in condition.conditions)
    return f"{{ {kind} = [\n{items}{INDENT * depth}] }}"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # e.g. 0.5, 5.0, 1e-05: all valid TOML floats
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _string(text: str) -> str:
    has_control = any(ord(ch) < 0x20 and ch != "\t" or ord(ch) == 0x7F for ch in text)
    # regexes read better without doubled backslashes: use a literal string when one can hold the text
    if "\\" in text and "'" not in text and not has_control:
        return f"'{text}'"
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
