"""Rule regexes cannot freeze the node (issue 10, item 1).

`(a+)+$` against 41 characters backtracks for hours in Python's `re`, holding the GIL: the
DICOM listener and the web page stopped with it. Rules now use RE2 (linear time), and what RE2
cannot run (backreferences, lookaround, huge patterns) is refused wherever rules are checked.
Every wait here is bounded: the evaluation runs in a child process with a timeout, the node is a
real process reached over real sockets with timeouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_ai_node.routing import RuleError, SeriesFacts, evaluate, parse_rules
from dicom_ai_node.routing.patterns import (
    MAX_PATTERN_LENGTH,
    PatternError,
    compile_pattern,
)
from tests.node_process import NODE_AE, NodeProcess
from tests.peers import (
    echoscu,
    skip_unless_tools,
    storescu,
    storescu_failures,
    write_tiny_ct,
)
from tests.web_support import Web

HOSTILE_PATTERN = "(a+)+$"
HOSTILE_VALUE = "a" * 41 + "!"  # fails to match only after trying every way to split the a's


def rule_data(pattern: str, name: str = "hostile") -> dict:
    return {"name": name, "priority": 10, "models": ["lung_ct_seg"], "destinations": [],
            "when": {"tag": "StudyDescription", "regex": pattern}}


def problems_of(pattern: str) -> list[str]:
    with pytest.raises(RuleError) as raised:
        parse_rules([rule_data(pattern)], source="rules.toml")
    return raised.value.problems


# --- evaluation ------------------------------------------------------------------------------


def test_catastrophic_pattern_is_evaluated_at_once():
    """In a child process with a time limit, so the old engine fails this test instead of hanging it."""
    script = textwrap.dedent(f"""
        from dicom_ai_node.routing import SeriesFacts, evaluate, parse_rules
        rules = parse_rules([{rule_data(HOSTILE_PATTERN)!r}])
        for value in ({HOSTILE_VALUE!r}, "a" * 255 + "!", "aaa"):
            facts = [SeriesFacts("1.2.3", {{"StudyDescription": value}}, 1)]
            print(evaluate(rules, facts)[0].matched)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"]


def test_common_rule_patterns_behave_as_before():
    def matched(pattern: str, value: object) -> bool:
        rules = parse_rules([rule_data(pattern)])
        return evaluate(rules, [SeriesFacts("1.2.3", {"StudyDescription": value}, 1)])[0].matched

    assert matched("(?i)chest|thorax|lung|thx", "CT THORAX w/o")
    assert not matched("(?i)chest|thorax|lung|thx", "CT ABDOMEN")
    assert matched(r"^T1\b", "T1 MPRAGE") and not matched(r"^T1\b", "T1w")
    assert matched(r"\d+\s*mm", "Body 1.0 mm") and matched("^DERIVED$", ["ORIGINAL", "DERIVED"])
    assert matched("Thorax", "Lungen Thorax ä")  # non-ASCII values are searched as text


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "words"), [
    (r"(CT)\1", "backreferences (\\1) are not supported"),
    (r"(?P<a>x)(?P=a)", "backreferences (?P=name) are not supported"),
    (r"chest(?=\s)", "lookahead (?=...) is not supported"),
    (r"chest(?!x)", "negative lookahead (?!...) is not supported"),
    (r"(?<=CT )chest", "lookbehind (?<=...) is not supported"),
    (r"(?<!no )chest", "negative lookbehind (?<!...) is not supported"),
    (r"((a{100}){100})", "repetition counts are limited to 1000 in all"),
    (r"\pL{1000}\pL{1000}\pL{1000}", "too complex"),
])
def test_what_re2_cannot_run_is_refused_with_the_reason(pattern, words):
    [problem] = problems_of(pattern)
    assert problem.startswith(f"rules.toml: rules[0] (hostile).when.regex: invalid regular expression {pattern!r}: ")
    assert words in problem and "RE2 syntax" in problem


def test_overlong_pattern_is_refused_without_echoing_it():
    pattern = "a|" * MAX_PATTERN_LENGTH
    [problem] = problems_of(pattern)
    assert problem == (f"rules.toml: rules[0] (hostile).when.regex: regular expression of {len(pattern)} "
                       f"characters; at most {MAX_PATTERN_LENGTH} allowed")
    compile_pattern("a" * MAX_PATTERN_LENGTH)  # the limit itself is allowed
    with pytest.raises(PatternError):
        compile_pattern("a" * (MAX_PATTERN_LENGTH + 1))


def test_rules_check_refuses_lookaround(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "x"\npriority = 1\nmodels = ["lung_ct_seg"]\ndestinations = []\n'
                    'when = { tag = "SeriesDescription", regex = "(?!scout)" }\n')
    done = subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(tmp_path / "none.toml"),
                           "rules", "check", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "rules[0] (x).when.regex: invalid regular expression '(?!scout)': negative lookahead" in done.stderr


def test_api_validate_and_save_refuse_what_re2_cannot_run(tmp_path):
    web = Web(tmp_path)
    draft = ('[[rules]]\nname = "x"\npriority = 1\nmodels = ["lung_ct_seg"]\ndestinations = ["pacs"]\n'
             'when = { tag = "SeriesDescription", regex = "(CT)\\\\1" }\n')
    viewer, admin = web.client(web.viewer_token), web.client(web.admin_token)
    answer = viewer.post("/api/rules/validate", json={"text": draft}).json()
    assert answer["valid"] is False
    assert answer["problems"] == [("draft: rules[0] (x).when.regex: invalid regular expression '(CT)\\\\1': "
                                   "backreferences (\\1) are not supported (invalid escape sequence: \\1); "
                                   "rules use RE2 syntax, which matches in linear time")]
    saved = admin.post("/api/rules", json={"text": draft})
    assert saved.status_code == 422 and saved.json()["detail"]["problems"] == answer["problems"]
    dry = viewer.post("/api/rules/dry-run", json={"text": draft})
    assert dry.status_code == 422


# --- the real node ---------------------------------------------------------------------------

HOSTILE_RULES = f"""
[[rules]]
name = "hostile"
priority = 10
models = ["lung_ct_seg"]
destinations = []
when = {{ tag = "StudyDescription", regex = {json.dumps(HOSTILE_PATTERN)} }}
"""


def healthz(node: NodeProcess) -> int:
    with urllib.request.urlopen(f"{node.web_url}/healthz", timeout=10) as answer:
        return answer.status


def viewer_token(node: NodeProcess) -> str:
    add = subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(node.config_path), "users",
                          "add", "vera", "--role", "viewer", "--password-stdin"], input="a long password\n",
                         capture_output=True, text=True, timeout=60, check=False)
    assert add.returncode == 0, add.stderr
    return node.cli("users", "token", "vera").stdout.strip()


@pytest.mark.integration
@skip_unless_tools("storescu", "echoscu")
def test_node_keeps_answering_while_a_hostile_rule_routes_a_study(tmp_path):
    study_uid = generate_uid()
    path = tmp_path / "in" / "ct.dcm"
    path.parent.mkdir()
    write_tiny_ct(path, study_uid=study_uid)
    dataset = dcmread(path)
    dataset.StudyDescription = HOSTILE_VALUE
    dataset.save_as(path, enforce_file_format=True)

    with NodeProcess(tmp_path / "node", rules=HOSTILE_RULES, quiet_period_s=0.5, web=True) as node:
        assert not storescu_failures(storescu("127.0.0.1", node.port, path, NODE_AE, timeout=60))
        # echo and /healthz answer on every round until the study is routed (old code: the
        # listener and the web server froze with the routing thread, and echoscu timed out)
        for _round in range(60):
            echo = echoscu("127.0.0.1", node.port, NODE_AE, timeout=20)
            assert echo.returncode == 0, echo.stdout + echo.stderr
            assert healthz(node) == 200
            detail = node.study(study_uid)
            if detail["state"] == "complete" and detail["decisions"]:
                break
        else:
            pytest.fail(f"study not routed after 60 rounds of echo and /healthz:\n{node.log()[-3000:]}")
        [decision] = detail["decisions"]
        assert decision["rule"] == "hostile" and decision["matched"] is False and detail["jobs"] == []

        # a viewer's dry-run of the same rule against the stored study answers as well
        request = urllib.request.Request(
            f"{node.web_url}/api/rules/dry-run", method="POST",
            data=json.dumps({"text": HOSTILE_RULES}).encode(),
            headers={"Authorization": f"Bearer {viewer_token(node)}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            dry = json.load(answer)
        [study] = dry["studies"]
        assert study["study_instance_uid"] == study_uid and study["decisions"][0]["matched"] is False
        assert echoscu("127.0.0.1", node.port, NODE_AE, timeout=20).returncode == 0
