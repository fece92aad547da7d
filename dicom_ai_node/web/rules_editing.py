"""Editing the routing rules: validate a draft with precise errors, dry-run it against the
studies already stored (and compare with the active rules), save it as a new version, roll
back. The router reads the newest version for every study, so a save applies at once."""

from __future__ import annotations

import tomllib

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_ai_node import audit
from dicom_ai_node.db.models import RuleSetVersion, Study
from dicom_ai_node.router import series_facts
from dicom_ai_node.routing import RuleError, RuleSet, check_rules, evaluate, parse_rules, plan
from dicom_ai_node.web.context import WebContext

DRAFT = "draft"


class RulesInvalid(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_draft(ctx: WebContext, text: str) -> RuleSet:
    """The draft as a RuleSet, or RulesInvalid listing every problem (line and column for TOML
    syntax, rules[i].key for the rest, unknown models and destinations by name)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RulesInvalid([f"{DRAFT}: TOML syntax error: {error}"]) from None
    try:
        rule_set = parse_rules(data, source=DRAFT)
    except RuleError as error:
        raise RulesInvalid(error.problems) from None
    problems = check_rules(rule_set, ctx.models.names, ctx.destinations.names())
    if problems:
        raise RulesInvalid(problems)
    return rule_set


def validate(ctx: WebContext, text: str) -> list[str]:
    try:
        parse_draft(ctx, text)
    except RulesInvalid as invalid:
        return invalid.problems
    return []


def dry_run(ctx: WebContext, session: Session, text: str, limit: int = 100) -> dict:
    """What the draft would do to the newest `limit` stored studies, next to the active rules."""
    draft = parse_draft(ctx, text)
    version, active = ctx.rules.active(session)
    study_uids = session.scalars(select(Study.study_instance_uid)
                                 .order_by(Study.last_received_at.desc()).limit(limit)).all()
    studies = []
    for uid in study_uids:
        facts = series_facts(session, uid)
        draft_decisions = evaluate(draft, facts)
        draft_plan = _runs(plan(draft_decisions))
        active_plan = _runs(plan(evaluate(active, facts)))
        study = session.get(Study, uid)
        studies.append({
            "study_instance_uid": uid, "patient_id": study.patient_id,
            "description": study.study_description, "series": len(facts),
            "draft": draft_plan, "active": active_plan,
            "added": [run for run in draft_plan if run not in active_plan],
            "removed": [run for run in active_plan if run not in draft_plan],
            "changed": draft_plan != active_plan,
            "decisions": [{"rule": d.rule_name, "matched": d.matched, "reasons": d.reasons}
                          for d in draft_decisions],
        })
    return {"active_version": version, "studies": studies,
            "changed": sum(1 for s in studies if s["changed"])}


def _runs(runs) -> list[dict]:
    return [{"series_instance_uid": run.series_uid, "model": run.model, "destinations": run.destinations,
             "rule": run.rule_name, "qc_fail": run.qc_fail, "no_result_notice": run.no_result_notice}
            for run in runs]


def save(ctx: WebContext, session: Session, text: str, author: str, comment: str | None) -> int:
    parse_draft(ctx, text)  # refuse what the running node could not use
    return ctx.rules.save(session, text, author=author, comment=comment)


def rollback(ctx: WebContext, session: Session, version: int, author: str) -> int:
    """Roll back by saving the old text as a new version: history only ever grows."""
    old = session.get(RuleSetVersion, version)
    if old is None:
        raise LookupError(f"no rule set version {version}")
    parse_draft(ctx, old.text)  # e.g. a model removed since: refuse with the reason
    audit.record(session, author, "rules.rollback", f"rule set version {version}")
    return ctx.rules.save(session, old.text, author=author, comment=f"rollback to version {version}")


def versions(session: Session) -> list[dict]:
    rows = session.scalars(select(RuleSetVersion).order_by(RuleSetVersion.version.desc())).all()
    return [version_json(row, with_text=False) for row in rows]


def version_json(row: RuleSetVersion, with_text: bool = True) -> dict:
    out = {"version": row.version, "author": row.author, "comment": row.comment,
           "created_at": row.created_at}
    if with_text:
        out["text"] = row.text
    return out
