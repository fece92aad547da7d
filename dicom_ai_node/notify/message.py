"""What a notification says: the event, the node, when, and the fields its emitter gave
(UIDs, ids, model names, reasons, counts). Patient data only for targets with include_phi."""

from __future__ import annotations

import json

# never sent to a target without include_phi, whoever put them in the fields
PHI_FIELDS = frozenset({"patient_name", "patient_id", "patient_birth_date", "accession_number"})

TITLES = {
    "job_failed": "a job failed",
    "delivery_failed": "results not delivered (gave up)",
    "result_held": "a result is held for review (quality checks failed)",
    "disk_high": "disk full: instances refused",
    "association_refused": "association refused from an unknown AE",
}


def payload(event: str, node: str, at: str, fields: dict, include_phi: bool,
            patient: dict | None = None) -> dict:
    """The message as a dict (the webhook's JSON body; the e-mail lists it)."""
    details = {key: value for key, value in fields.items() if include_phi or key not in PHI_FIELDS}
    if include_phi and patient:
        details.update(patient)
    return {"event": event, "title": TITLES.get(event, event), "node": node, "at": at, "details": details}


def body(message: dict) -> bytes:
    return json.dumps(message, sort_keys=True, default=str).encode()


def subject(message: dict) -> str:
    return f"[{message['node']}] {message['title']}"


def text(message: dict) -> str:
    lines = [f"{message['title']} on {message['node']} at {message['at']}", ""]
    lines += [f"{key}: {value}" for key, value in message["details"].items()]
    return "\n".join(lines) + "\n"
