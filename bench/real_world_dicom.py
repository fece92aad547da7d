"""Real-world DICOM through a node on the shipped rules (issue 18's closing measurement).

    .venv/bin/python bench/real_world_dicom.py [--data ../shared/data] [--out docs/real-world-dicom.md]

Every DICOM file in ../shared/data (real scanners, vendors, transfer syntaxes and malformed
files on purpose) and every case of the quirk corpus (tests/quirk_corpus.py) is sent with dcmtk
storescu to a node running the rules of the shipped config.toml with ``no_result_notice = true``
and delivering to a private Orthanc. When every study has settled, it counts: files sent,
stored, refused (by the node's status); series and the jobs the rules made: with a result,
held by the quality gate, refused before inference (grouped by reason), failed after inference;
and every object the node sent to Orthanc run through dciodvfy (errors counted). Loopback only;
everything started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicom_ai_node.routing.rules import parse_rules  # noqa: E402
from dicom_ai_node.routing.toml_writer import rules_to_toml  # noqa: E402
from tests.conftest import PROJECT_ROOT, SHARED_DATA, shared_dicom_files  # noqa: E402
from tests.node_process import NODE_AE, NodeProcess  # noqa: E402
from tests.peers import OrthancPeer, parse_storescu_output, storescu, wait_for  # noqa: E402
from tests.quirk_corpus import NOT_KEPT_BY_STORESCU, make_quirk_corpus  # noqa: E402

FINISHED = {"done", "failed", "dropped", "held", "rejected", "superseded"}
SETTLE_TIMEOUT_S = 3600


def shipped_rules() -> str:
    data = tomllib.loads((PROJECT_ROOT / "config.toml").read_text())
    return rules_to_toml(parse_rules([{**rule, "no_result_notice": True} for rule in data["rules"]]))


def send(port: int, files: list[Path], extra: tuple[str, ...] = (), batch: int = 100) -> list:
    """storescu in batches; a batch that crashes storescu (a few malformed files do) is sent
    file by file, so one bad file costs only itself."""
    outcomes = []
    for start in range(0, len(files), batch):
        part = files[start:start + batch]
        result = storescu("127.0.0.1", port, part, NODE_AE, extra_args=extra, timeout=600)
        if result.returncode < 0:
            for path in part:
                single = storescu("127.0.0.1", port, [path], NODE_AE, extra_args=extra, timeout=60)
                outcomes += parse_storescu_output(single.stdout + single.stderr)
        else:
            outcomes += parse_storescu_output(result.stdout + result.stderr)
    return outcomes


def send_unsent(port: int, outcomes: list) -> None:
    """What storescu could not send (a transfer syntax it cannot read or convert, a file meta it
    refuses), sent again by pynetdicom as the file is, in its own transfer syntax; the outcome's
    status then says what the node answered (prefixed "pynetdicom:")."""
    from pydicom import dcmread
    from pynetdicom import AE

    for outcome in outcomes:
        if outcome.status is not None:
            continue
        try:
            dataset = dcmread(outcome.path)
            ae = AE(ae_title="STORESCU")
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
            association = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
            if not association.is_established:
                outcome.status = "pynetdicom: association refused"
                continue
            try:
                answer = association.send_c_store(dataset)
            finally:
                association.release()
            code = int(answer.Status) if answer else None
            outcome.status = ("Success (pynetdicom)" if code == 0 else
                              f"pynetdicom: status 0x{code:04X} {answer.get('ErrorComment', '')}" if answer else
                              "pynetdicom: no answer")
        except Exception as error:  # the file itself cannot be read or sent
            outcome.status = f"pynetdicom could not send it either: {type(error).__name__}: {str(error)[:80]}"


def studies(node: NodeProcess) -> list[dict]:
    return [node.study(uid) for uid in _query(node, "select study_instance_uid from study")]


def settled(node: NodeProcess) -> bool:
    """Every study complete, every job finished and nothing waiting to be delivered."""
    finished = ", ".join(f"'{state}'" for state in FINISHED)
    return not (_query(node, "select 1 from study where state != 'complete' limit 1")
                or _query(node, f"select 1 from job where state not in ({finished}) limit 1")
                or _query(node, "select 1 from delivery where state = 'pending' limit 1"))


def _query(node: NodeProcess, sql: str) -> list:
    import sqlite3

    with sqlite3.connect(node.workdir / "node.db", timeout=30) as connection:
        return [row[0] for row in connection.execute(sql)]


def reason_kind(reason: str) -> str:
    """A refusal's reason without file names, UIDs and numbers, to group alike ones."""
    text = re.sub(r"\S+\.dcm\b|\d+(\.\d+)+|\d+", "#", reason)
    return text[:150]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--out", type=Path, help="write the report (markdown) here too")
    args = parser.parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="real-world-dicom-"))
    files = shared_dicom_files(max_bytes=float("inf")) if args.data == SHARED_DATA else sorted(
        p for p in args.data.rglob("*") if p.is_file())
    cases = make_quirk_corpus(work / "corpus", args.data)
    orthanc = OrthancPeer(workdir=work / "orthanc", dicomweb=False).start()
    node = NodeProcess(work / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=shipped_rules(), quiet_period_s=2.0, extra="[workers]\ncount = 2\n")
    try:
        with node:
            shared = send(node.port, files)
            send_unsent(node.port, shared)
            corpus = []
            for case in cases:
                if case.name in NOT_KEPT_BY_STORESCU:
                    continue  # storescu cannot send its quirk (tests/test_quirks_end_to_end.py does, by pynetdicom)
                corpus += send(node.port, sorted(case.folder.iterdir()), case.storescu_args)
            time.sleep(5)  # the last study's quiet period
            wait_for(lambda: settled(node), timeout=SETTLE_TIMEOUT_S, interval=5,
                     what="every study complete and every job settled")
            details = studies(node)
            sent_objects = []
            for study in details:
                for series in orthanc.study_series(study["study_instance_uid"]):
                    for orthanc_id in series["Instances"]:
                        path = work / "sent" / f"{orthanc_id}.dcm"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(orthanc.instance_file(orthanc_id))
                        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
                        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
                        sent_objects.append((series["SeriesDescription"], errors))
    finally:
        orthanc.cleanup()
    report = render(files, shared, cases, corpus, details, sent_objects, time.monotonic() - started)
    print(report)
    if args.out:
        args.out.write_text(report)


def render(files, shared, cases, corpus, details, sent_objects, seconds) -> str:
    lines = [f"# Real-world DICOM through the node ({datetime.now():%Y-%m-%d}, "
             f"`bench/real_world_dicom.py`, {seconds / 60:.1f} min)", ""]
    for label, outcomes in (("shared files (../shared/data)", shared), ("quirk corpus files", corpus)):
        stored = sum(1 for o in outcomes if o.ok)
        refused = collections.Counter(o.status for o in outcomes if not o.ok)
        lines.append(f"- {label}: {len(outcomes)} sent, {stored} stored, {len(outcomes) - stored} not stored"
                     + (": " + "; ".join(f"{n} x {status}" for status, n in refused.most_common()) if refused else ""))
        for outcome in outcomes:
            if not outcome.ok:  # None: storescu sent nothing (it could not read or convert the file)
                where = str(Path(outcome.path).relative_to(SHARED_DATA)) if SHARED_DATA in Path(outcome.path).parents \
                    else Path(outcome.path).name
                lines.append(f"  - `{where}`: {outcome.status or 'not sent by storescu'}"
                             + (f" ({outcome.messages[0][:100]})" if outcome.messages else ""))
    series = [s for d in details for s in d["series"] if not s["is_result"]]
    noted = [s for s in series if s["header_notes"]]
    jobs = [j for d in details for j in d["jobs"]]
    states = collections.Counter(j["state"] if j["state"] != "failed" else f"failed ({j['failed_step'] or 'delivery'})"
                                 for j in jobs)
    lines += [f"- studies {len(details)}, series {len(series)} ({len(noted)} with header oddities noted), "
              f"jobs {len(jobs)}: " + ", ".join(f"{n} {state}" for state, n in sorted(states.items())), ""]
    refusals = collections.Counter(reason_kind(j["reason"]) for j in jobs if j["failed_step"] == "input")
    if refusals:
        lines += ["| refused before inference | jobs |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in refusals.most_common()]
        lines.append("")
    after = [j for j in jobs if j["failed_step"] in ("inference", "encoding")]
    lines.append(f"- failed after inference: {len(after)}")
    lines += [f"  - job {j['id']}: {j['reason']}" for j in after]
    repaired = collections.Counter(note.split(" and ")[0] for j in jobs for note in j["input_notes"])
    lines.append(f"- jobs run with repairs: {sum(1 for j in jobs if j['input_notes'])} "
                 f"({len(repaired)} kinds of repair)")
    error_count = sum(len(errors) for _, errors in sent_objects)
    by_kind = collections.Counter((description or "").split(":")[0] for description, _ in sent_objects)
    lines.append(f"- objects the node sent to Orthanc: {len(sent_objects)} "
                 f"({', '.join(f'{n} {kind}' for kind, n in by_kind.most_common())}); dciodvfy errors: {error_count}")
    for description, errors in sent_objects:
        for error in sorted(set(errors)):
            lines.append(f"  - {description}: {error}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
