"""Routing rules: which models run on which series of a study, and where their results go.

Pure Python and no database: the caller passes the facts it knows (SeriesFacts) and stores the
Decisions, with their reasons, that evaluate() returns.

    rule_set = load_rules_file("rules.toml")            # or parse_rules(config["rules"], "config.toml")
    problems = check_rules(rule_set, known_models, known_destinations)
    decisions = evaluate(rule_set, series_of_study)    # one Decision per rule, reasons included
    for run in plan(decisions): ...                     # Run(series_uid, model, destinations, rule_name, qc_fail)

Condition semantics (see conditions.py): `equals` compares text case-sensitively, and numbers
numerically when the rule gives a number (DS/IS text like "5.0" counts as a number); a
multi-valued attribute (a list, e.g. ImageType) matches equals/one_of/regex when any one value
matches, and `range` only when every value is a number within it; an empty value counts as absent.
A `regex` is RE2 syntax (patterns.py: linear time; no backreferences or lookaround, at most
MAX_PATTERN_LENGTH characters), searched anywhere in the value like `re.search`.
"""

from .conditions import AllOf, AnyOf, Not, TagCondition
from .evaluate import Decision, Run, evaluate, plan
from .facts import SeriesFacts
from .rules import QC_FAIL_POLICIES, PriorSpec, Rule, RuleError, RuleSet, check_rules, load_rules_file, parse_rules
from .selector import SeriesSelector
from .toml_writer import rules_to_toml

__all__ = [
    "AllOf",
    "AnyOf",
    "Decision",
    "Not",
    "PriorSpec",
    "QC_FAIL_POLICIES",
    "Rule",
    "RuleError",
    "RuleSet",
    "Run",
    "SeriesFacts",
    "SeriesSelector",
    "TagCondition",
    "check_rules",
    "evaluate",
    "load_rules_file",
    "parse_rules",
    "plan",
    "rules_to_toml",
]
