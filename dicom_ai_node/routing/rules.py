"""Routing rules: the model, and parsing from TOML data with every problem reported at once."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .conditions import Condition, parse_condition
from .facts import describe_value
from .selector import ORIENTATIONS, PICKS, SeriesSelector

RULE_KEYS = ("name", "priority", "enabled", "models", "destinations", "quiet_period_s", "qc_fail",
             "no_result_notice", "when", "series", "priors", "source")
REQUIRED_RULE_KEYS = ("name", "priority", "models", "destinations", "when")
SELECTOR_KEYS = ("orientation", "min_slices", "pick")
MAX_NAME_LENGTH = 128  # routing_decision.rule_name and job.rule_name are String(128)
# what happens to a result that fails its model's quality checks ([qc] in model.toml):
# kept on the node until an admin releases or rejects it | sent, marked as failed | not sent
QC_FAIL_POLICIES = ("hold", "send_flagged", "drop")
PRIOR_KEYS = ("same_modality", "body_part", "within_days", "max")
MAX_WITHIN_DAYS = 36500


class RuleError(Exception):
    """Rules that cannot be used; `problems` lists every one, each "source: path: message"."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PriorSpec:
    """Which earlier study of the patient a job also gets (``priors = {...}``), queried at the
    rule's ``source`` (a destination that answers C-FIND/C-MOVE, or QIDO-RS/WADO-RS when its kind
    is ``dicomweb``)."""

    within_days: int
    same_modality: bool = True
    body_part: str | None = None  # BodyPartExamined of the prior's series, compared case-insensitively
    max: int = 1  # one prior per job: the model compares two studies

    def to_data(self) -> dict:
        data = {"same_modality": self.same_modality, "within_days": self.within_days, "max": self.max}
        if self.body_part is not None:
            data["body_part"] = self.body_part
        return data


@dataclass
class Rule:
    name: str
    priority: int
    models: list[str]
    destinations: list[str]
    when: Condition
    enabled: bool = True
    quiet_period_s: float | None = None  # overrides the global completion quiet period for matched studies
    qc_fail: str | None = None  # one of QC_FAIL_POLICIES; None: the node's [qc] on_fail
    # a job that ends without a result (refused, failed, dropped by its checks) sends its
    # destinations a small "AI result not produced: <reason>" object (results/notice.py)
    no_result_notice: bool = False
    series: SeriesSelector = field(default_factory=SeriesSelector)
    priors: PriorSpec | None = None
    source: str | None = None  # destination name queried for priors


@dataclass
class RuleSet:
    rules: list[Rule]  # in file order (problems and check_rules refer to rules[i])
    source: str = field(default="<rules>", compare=False)

    def in_priority_order(self) -> list[Rule]:
        """Higher priority first; ties by name so that evaluation order never depends on file order."""
        return sorted(self.rules, key=lambda rule: (-rule.priority, rule.name))


def rule_label(index: int, name: object) -> str:
    return f"rules[{index}] ({name})" if isinstance(name, str) and name else f"rules[{index}]"


def parse_rules(data: dict | list, source: str = "<rules>") -> RuleSet:
    """A RuleSet from parsed TOML: a document with [[rules]] or the list of rule tables itself.

    A document without [[rules]] is an empty rule set (what rules_to_toml writes for one).
    """
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"rules"})
        if unknown:  # "[[rule]]" is a typo that would otherwise silently drop rules
            raise RuleError([f"{source}: unknown top-level key(s) {unknown}; a rule set holds [[rules]] tables only"])
        data = data.get("rules", [])
    if not isinstance(data, list):
        raise RuleError([f"{source}: rules: expected an array of tables ([[rules]]), got {describe_value(data)}"])

    problems: list[str] = []
    rules = []
    for index, raw in enumerate(data):
        rule_problems: list[tuple[str, str]] = []
        rule = _parse_rule(raw, rule_problems)
        label = rule_label(index, raw.get("name") if isinstance(raw, dict) else None)
        problems += [f"{source}: {label}{'.' + path if path else ''}: {message}" for path, message in rule_problems]
        if rule is not None:
            rules.append(rule)
    # duplicate names would clash where decisions are stored, keyed by rule name
    names = [raw.get("name") if isinstance(raw, dict) else None for raw in data]
    problems += _duplicate_names(names, source)
    if problems:
        raise RuleError(problems)
    return RuleSet(rules, source)


def load_rules_file(path: str | Path) -> RuleSet:
    """Reads a TOML rules file (top-level [[rules]]); syntax errors carry their line and column."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RuleError([f"{source}: cannot read: {error}"]) from error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # the message says "(at line L, column C)"
        raise RuleError([f"{source}: TOML syntax error: {error}"]) from error
    return parse_rules(data, source)


def check_rules(
    rule_set: RuleSet, known_models: set[str] | None, known_destinations: set[str] | None
) -> list[str]:
    """Cross-reference problems (unknown model / destination, duplicate names); None skips that check."""
    problems = []
    for index, rule in enumerate(rule_set.rules):
        label = f"{rule_set.source}: {rule_label(index, rule.name)}"
        for key, names, known, what in (
            ("models", rule.models, known_models, "model"),
            ("destinations", rule.destinations, known_destinations, "destination"),
        ):
            if known is None:
                continue
            for position, name in enumerate(names):
                if name not in known:
                    choices = ", ".join(sorted(known)) or "none configured"
                    problems.append(f"{label}.{key}[{position}]: unknown {what} {name!r} (known: {choices})")
        if rule.source is not None and known_destinations is not None and rule.source not in known_destinations:
            choices = ", ".join(sorted(known_destinations)) or "none configured"
            problems.append(f"{label}.source: unknown destination {rule.source!r} (known: {choices})")
    return problems + _duplicate_names([rule.name for rule in rule_set.rules], rule_set.source)


def _duplicate_names(names: list[object], source: str) -> list[str]:
    first_index: dict[str, int] = {}
    problems = []
    for index, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in first_index:
            problems.append(
                f"{source}: {rule_label(index, name)}.name: duplicate rule name {name!r} (also rules[{first_index[name]}])"
            )
        else:
            first_index[name] = index
    return problems


def _parse_rule(raw: object, problems: list[tuple[str, str]]) -> Rule | None:
    if not isinstance(raw, dict):
        problems.append(("", f"expected a table, got {describe_value(raw)}"))
        return None
    for key in sorted(set(raw) - set(RULE_KEYS)):
        problems.append((key, f"unknown key {key!r} (expected one of {', '.join(RULE_KEYS)})"))
    for key in REQUIRED_RULE_KEYS:
        if key not in raw:
            problems.append((key, "missing (required)"))

    count_before = len(problems)
    name = raw.get("name")
    if "name" in raw and not (isinstance(name, str) and name.strip()):
        problems.append(("name", f"expected a non-empty string, got {describe_value(name)}"))
    elif isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
        problems.append(("name", f"longer than {MAX_NAME_LENGTH} characters"))

    priority = raw.get("priority")
    if "priority" in raw and not _is_int(priority):
        problems.append(("priority", f"expected an integer, got {describe_value(priority)}"))

    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        problems.append(("enabled", f"expected true or false, got {describe_value(enabled)}"))

    models = raw.get("models")
    if "models" in raw and not _is_name_list(models, allow_empty=False):
        problems.append(("models", f"expected a non-empty list of model names, got {describe_value(models)}"))
    # an empty destination list is allowed: results are kept on the node and delivered nowhere
    destinations = raw.get("destinations")
    if "destinations" in raw and not _is_name_list(destinations, allow_empty=True):
        problems.append(("destinations", f"expected a list of destination names, got {describe_value(destinations)}"))

    quiet_period_s = raw.get("quiet_period_s")
    if quiet_period_s is not None and not (_is_number(quiet_period_s) and 0 <= quiet_period_s < math.inf):
        problems.append(("quiet_period_s", f"expected seconds >= 0, got {describe_value(quiet_period_s)}"))

    qc_fail = raw.get("qc_fail")
    if qc_fail is not None and qc_fail not in QC_FAIL_POLICIES:
        problems.append(("qc_fail", f"expected one of {' | '.join(QC_FAIL_POLICIES)}, got {describe_value(qc_fail)}"))

    no_result_notice = raw.get("no_result_notice", False)
    if not isinstance(no_result_notice, bool):
        problems.append(("no_result_notice", f"expected true or false, got {describe_value(no_result_notice)}"))

    when = parse_condition(raw["when"], "when", problems) if "when" in raw else None
    series = _parse_selector(raw.get("series", {}), problems)
    priors = _parse_priors(raw["priors"], problems) if "priors" in raw else None
    source = raw.get("source")
    if "source" in raw and not (isinstance(source, str) and source.strip()):
        problems.append(("source", f"expected a destination name, got {describe_value(source)}"))
    elif "priors" in raw and "source" not in raw:
        problems.append(("source", "missing: priors need a source (the destination to query)"))
    elif "source" in raw and "priors" not in raw:
        problems.append(("source", "given without priors (nothing would be queried)"))

    if len(problems) > count_before or any(key not in raw for key in REQUIRED_RULE_KEYS):
        return None
    return Rule(
        name=name,
        priority=priority,
        models=list(models),
        destinations=list(destinations),
        when=when,
        enabled=enabled,
        quiet_period_s=float(quiet_period_s) if quiet_period_s is not None else None,
        qc_fail=qc_fail,
        no_result_notice=no_result_notice,
        series=series,
        priors=priors,
        source=source,
    )


def _parse_priors(raw: object, problems: list[tuple[str, str]]) -> PriorSpec | None:
    if not isinstance(raw, dict):
        problems.append(("priors", f"expected a table like {{ within_days = 1095 }}, got {describe_value(raw)}"))
        return None
    count_before = len(problems)
    for key in sorted(set(raw) - set(PRIOR_KEYS)):
        problems.append((f"priors.{key}", f"unknown key {key!r} (expected one of {', '.join(PRIOR_KEYS)})"))
    within_days = raw.get("within_days")
    if within_days is None:
        problems.append(("priors.within_days", "missing (required): how many days back a prior may be"))
    elif not (_is_int(within_days) and 1 <= within_days <= MAX_WITHIN_DAYS):
        problems.append(("priors.within_days", f"expected days 1..{MAX_WITHIN_DAYS}, got {describe_value(within_days)}"))
    same_modality = raw.get("same_modality", True)
    if not isinstance(same_modality, bool):
        problems.append(("priors.same_modality", f"expected true or false, got {describe_value(same_modality)}"))
    body_part = raw.get("body_part")
    if body_part is not None and not (isinstance(body_part, str) and body_part.strip() and len(body_part) <= 16):
        problems.append(("priors.body_part", f"expected a BodyPartExamined value (1..16 characters), "
                                             f"got {describe_value(body_part)}"))
    count = raw.get("max", 1)
    if count != 1 or not _is_int(count):
        problems.append(("priors.max", f"only 1 is supported (a job compares with one prior), got {describe_value(count)}"))
    if len(problems) > count_before:
        return None
    return PriorSpec(within_days=within_days, same_modality=same_modality,
                     body_part=body_part.strip() if body_part else None, max=count)


def _parse_selector(raw: object, problems: list[tuple[str, str]]) -> SeriesSelector:
    selector = SeriesSelector()
    if not isinstance(raw, dict):
        problems.append(("series", f"expected a table ([rules.series]), got {describe_value(raw)}"))
        return selector
    for key in sorted(set(raw) - set(SELECTOR_KEYS)):
        problems.append((f"series.{key}", f"unknown key {key!r} (expected one of {', '.join(SELECTOR_KEYS)})"))
    for key, choices in (("orientation", ORIENTATIONS), ("pick", PICKS)):
        if key in raw:
            if raw[key] in choices:
                setattr(selector, key, raw[key])
            else:
                expected = " | ".join(choices)
                problems.append((f"series.{key}", f"expected one of {expected}, got {describe_value(raw[key])}"))
    if "min_slices" in raw:
        if _is_int(raw["min_slices"]) and raw["min_slices"] >= 0:
            selector.min_slices = raw["min_slices"]
        else:
            problems.append(("series.min_slices", f"expected an integer >= 0, got {describe_value(raw['min_slices'])}"))
    return selector


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_name_list(value: object, allow_empty: bool) -> bool:
    return (
        isinstance(value, list)
        and (allow_empty or bool(value))
        and all(isinstance(item, str) and item.strip() for item in value)
    )
