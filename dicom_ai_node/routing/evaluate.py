"""Evaluating a RuleSet against one study's series: one Decision per rule, with reasons."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .facts import SeriesFacts, series_label
from .rules import PriorSpec, Rule, RuleSet


@dataclass
class Decision:
    """One rule evaluated against one study; the caller stores it with its reasons."""

    rule_name: str
    priority: int
    matched: bool  # True when at least one series was selected
    selected_series: list[str]  # series_instance_uids chosen by the selector
    models: list[str]
    destinations: list[str]
    quiet_period_s: float | None
    qc_fail: str | None  # the rule's policy for results that fail their quality checks (None: node default)
    reasons: list[str]  # one line per series (why it met the conditions or not), then the selector's line
    priors: PriorSpec | None = None  # the earlier study its jobs also get, from ``source``
    source: str | None = None
    no_result_notice: bool = False  # a job without a result tells the destinations why

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(rule_set: RuleSet, series: list[SeriesFacts]) -> list[Decision]:
    """Every rule, in priority order (higher first, ties by name), against the series of one study."""
    return [_evaluate_rule(rule, series) for rule in rule_set.in_priority_order()]


def _evaluate_rule(rule: Rule, series: list[SeriesFacts]) -> Decision:
    reasons: list[str] = []
    selected: list[str] = []
    if not rule.enabled:
        reasons.append("disabled")
    elif not series:
        reasons.append("no series in the study")
    else:
        candidates = []
        for one in series:
            outcome = rule.when.check(one.attributes)
            reasons.append(f"{series_label(one)}: {'matched' if outcome.held else 'no match'}: {outcome}")
            if outcome.held:
                candidates.append(one)
        selected, selector_reason = rule.series.select(candidates)
        reasons.append(selector_reason)
    return Decision(
        rule_name=rule.name,
        priority=rule.priority,
        matched=bool(selected),
        selected_series=selected,
        models=list(rule.models),
        destinations=list(rule.destinations),
        quiet_period_s=rule.quiet_period_s,
        qc_fail=rule.qc_fail,
        reasons=reasons,
        priors=rule.priors,
        source=rule.source,
        no_result_notice=rule.no_result_notice,
    )


@dataclass(frozen=True)
class Run:
    """One model to run on one series: where its results go, and what happens to a result that
    fails its quality checks, by the rule that asked for it."""

    series_uid: str
    model: str
    destinations: list[str]
    rule_name: str
    qc_fail: str | None
    priors: PriorSpec | None = None
    source: str | None = None
    no_result_notice: bool = False


def plan(decisions: list[Decision]) -> list[Run]:
    """The runs, once per (series, model).

    When several matched rules ask for the same model on the same series, the highest-priority
    rule (ties by name) wins and only its destinations and qc_fail are used.
    """
    runs = []
    taken: set[tuple[str, str]] = set()
    for decision in sorted(decisions, key=lambda d: (-d.priority, d.rule_name)):
        if not decision.matched:
            continue
        for series_uid in decision.selected_series:
            for model in decision.models:
                if (series_uid, model) not in taken:
                    taken.add((series_uid, model))
                    runs.append(Run(series_uid, model, list(decision.destinations), decision.rule_name,
                                    decision.qc_fail, decision.priors, decision.source,
                                    decision.no_result_notice))
    return runs
