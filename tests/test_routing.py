"""Routing rules: operators and their reasons, selector, parse problems, TOML round-trip, plan."""

from __future__ import annotations

import json
import tomllib

import pytest

from dicom_ai_node.routing import (
    RuleError,
    Run,
    SeriesFacts,
    check_rules,
    evaluate,
    load_rules_file,
    parse_rules,
    plan,
    rules_to_toml,
)

AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
SAGITTAL = [0, 1, 0, 0, 0, -1]

EXAMPLE_TOML = """
[[rules]]
name = "lung-ct"
priority = 10
enabled = true
models = ["lung_ct_seg"]
destinations = ["pacs"]
quiet_period_s = 5
when = { all = [
  { tag = "Modality", equals = "CT" },
  { tag = "BodyPartExamined", one_of = ["CHEST", "LUNG", "THORAX"] },
  { not = { tag = "SeriesDescription", regex = "(?i)scout|localizer|topogram" } },
  { tag = "SliceThickness", range = [0.5, 5.0] },
  { tag = "ContrastBolusAgent", absent = true },
  { any = [ { tag = "0008,0070", regex = "(?i)siemens" }, { tag = "Manufacturer", present = true } ] },
] }
[rules.series]
orientation = "axial"
min_slices = 20
pick = "thinnest"
"""


def rule(when: dict, name: str = "r", priority: int = 0, **extra) -> dict:
    return {"name": name, "priority": priority, "models": ["m"], "destinations": ["pacs"], "when": when, **extra}


def check_one(when: dict, attributes: dict) -> tuple[bool, str]:
    """Evaluates one condition against one series: (matched, the series' reason line)."""
    [decision] = evaluate(parse_rules([rule(when)]), [SeriesFacts("1.2.3", attributes, 10)])
    return decision.matched, decision.reasons[0]


def problems_of(data, source: str = "rules.toml") -> list[str]:
    with pytest.raises(RuleError) as caught:
        parse_rules(data, source)
    return caught.value.problems


# --- operators -------------------------------------------------------------------------------


def test_equals_held_and_failed_with_reasons():
    matched, reason = check_one({"tag": "Modality", "equals": "CT"}, {"Modality": "CT", "SeriesDescription": "Thorax"})
    assert matched
    assert reason == "series 1.2.3 (CT 'Thorax', 10 instances): matched: Modality equals 'CT': held (value 'CT')"

    matched, reason = check_one({"tag": "Modality", "equals": "CT"}, {"Modality": "MR"})
    assert not matched
    assert reason.endswith("no match: Modality equals 'CT': failed (value 'MR')")


def test_code_strings_compare_without_case_and_surrounding_spaces_other_text_exactly():
    # real headers: "Chest", "chest " (issue 18); CS is BodyPartExamined's and Modality's VR
    rule = {"tag": "BodyPartExamined", "one_of": ["CHEST", "LUNG"]}
    for value in ("CHEST", "Chest", "chest ", " lung"):
        assert check_one(rule, {"BodyPartExamined": value})[0], value
    assert not check_one(rule, {"BodyPartExamined": "ABDOMEN"})[0]
    assert not check_one(rule, {"BodyPartExamined": "CHEST ABDOMEN"})[0]  # only surrounding spaces go
    assert check_one({"tag": "Modality", "equals": "CT"}, {"Modality": "ct"})[0]
    assert check_one({"tag": "0018,0015", "equals": "CHEST"}, {"BodyPartExamined": "chest"})[0]
    # LO is compared exactly: a rule asks for case-insensitive text with a regex "(?i)"
    assert not check_one({"tag": "StudyDescription", "equals": "Chest"}, {"StudyDescription": "chest"})[0]
    assert check_one({"tag": "StudyDescription", "regex": "(?i)^chest$"}, {"StudyDescription": "CHEST"})[0]


def test_equals_compares_numbers_numerically_including_numeric_text():
    assert check_one({"tag": "EchoNumbers", "equals": 1}, {"EchoNumbers": "1.0"})[0]
    assert check_one({"tag": "EchoNumbers", "equals": 1}, {"EchoNumbers": 1.0})[0]
    assert not check_one({"tag": "EchoNumbers", "equals": 1}, {"EchoNumbers": "one"})[0]
    # a string in the rule is compared as text
    assert check_one({"tag": "SeriesNumber", "equals": "3"}, {"SeriesNumber": 3})[0]


def test_one_of():
    when = {"tag": "BodyPartExamined", "one_of": ["CHEST", "LUNG"]}
    assert check_one(when, {"BodyPartExamined": "LUNG"})[0]
    matched, reason = check_one(when, {"BodyPartExamined": "HEAD"})
    assert not matched
    assert reason.endswith("BodyPartExamined one of ['CHEST', 'LUNG']: failed (value 'HEAD')")


def test_regex_uses_search():
    when = {"tag": "SeriesDescription", "regex": "(?i)thorax"}
    matched, reason = check_one(when, {"SeriesDescription": "CT Thorax 1.0"})
    assert matched and reason.endswith("SeriesDescription regex '(?i)thorax': held (value 'CT Thorax 1.0')")
    assert not check_one(when, {"SeriesDescription": "Head"})[0]


def test_range_inclusive_and_non_numeric():
    when = {"tag": "SliceThickness", "range": [0.5, 5]}
    assert check_one(when, {"SliceThickness": 5})[0]
    assert check_one(when, {"SliceThickness": "0.5"})[0]  # DS as text
    matched, reason = check_one(when, {"SliceThickness": 7.5})
    assert not matched and reason.endswith("SliceThickness in range [0.5, 5.0]: failed (value 7.5)")
    matched, reason = check_one(when, {"SliceThickness": "thin"})
    assert not matched and reason.endswith("failed (value 'thin' is not a number)")


def test_range_on_multi_valued_needs_every_value_inside():
    when = {"tag": "PixelSpacing", "range": [0.5, 1.0]}
    assert check_one(when, {"PixelSpacing": [0.7, 0.7]})[0]
    assert not check_one(when, {"PixelSpacing": [0.7, 1.5]})[0]


def test_present_and_absent_empty_counts_as_absent():
    present = {"tag": "ContrastBolusAgent", "present": True}
    absent = {"tag": "ContrastBolusAgent", "absent": True}
    matched, reason = check_one(present, {"ContrastBolusAgent": "Omnipaque"})
    assert matched and reason.endswith("ContrastBolusAgent present: held (value 'Omnipaque')")
    matched, reason = check_one(absent, {"ContrastBolusAgent": "Omnipaque"})
    assert not matched and reason.endswith("ContrastBolusAgent absent: failed (value 'Omnipaque')")
    for attributes in ({}, {"ContrastBolusAgent": ""}, {"ContrastBolusAgent": None}, {"ContrastBolusAgent": []}):
        assert check_one(absent, attributes)[0]
        matched, reason = check_one(present, attributes)
        assert not matched and reason.endswith("ContrastBolusAgent present: failed (absent)")


def test_missing_attribute_fails_value_operators():
    matched, reason = check_one({"tag": "Modality", "equals": "CT"}, {})
    assert not matched and reason.endswith("Modality equals 'CT': failed (absent)")


def test_multi_valued_image_type_matches_any_value():
    image_type = {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    assert check_one({"tag": "ImageType", "equals": "AXIAL"}, image_type)[0]
    assert check_one({"tag": "ImageType", "one_of": ["LOCALIZER", "PRIMARY"]}, image_type)[0]
    assert not check_one({"tag": "ImageType", "regex": "^DERIVED$"}, image_type)[0]
    assert check_one({"not": {"tag": "ImageType", "equals": "LOCALIZER"}}, image_type)[0]
    assert not check_one({"not": {"tag": "ImageType", "equals": "LOCALIZER"}}, {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})[0]


def test_hex_tag_reads_the_keyword_or_the_hex_key_for_private_tags():
    assert check_one({"tag": "0008,0060", "equals": "MR"}, {"Modality": "MR"})[0]
    assert check_one({"tag": "0029,1010", "present": True}, {"0029,1010": "x"})[0]
    assert check_one({"tag": "0029,101a", "equals": "x"}, {"0029,101A": "x"})[0]


# --- nesting ---------------------------------------------------------------------------------


def test_failed_all_reports_first_failing_branch_with_its_path():
    when = {"all": [
        {"tag": "Modality", "equals": "CT"},
        {"any": [{"tag": "Manufacturer", "regex": "(?i)siemens"}, {"tag": "StationName", "present": True}]},
        {"tag": "BodyPartExamined", "equals": "CHEST"},  # also fails, but the first failure is enough
    ]}
    matched, reason = check_one(when, {"Modality": "CT", "Manufacturer": "GE", "BodyPartExamined": "HEAD"})
    assert not matched
    assert reason.endswith(
        "no match: all[1].any: none held ([0] Manufacturer regex '(?i)siemens': failed (value 'GE'); "
        "[1] StationName present: failed (absent))"
    )
    assert "BodyPartExamined" not in reason


def test_held_all_lists_every_condition_and_the_branch_of_any_that_held():
    when = {"all": [
        {"tag": "Modality", "equals": "CT"},
        {"any": [{"tag": "Manufacturer", "regex": "(?i)siemens"}, {"tag": "StationName", "present": True}]},
    ]}
    matched, reason = check_one(when, {"Modality": "CT", "Manufacturer": "GE", "StationName": "CT01"})
    assert matched
    assert reason.endswith(
        "matched: Modality equals 'CT': held (value 'CT'); any[1]: StationName present: held (value 'CT01')"
    )


def test_not_inverts_and_explains_the_inner_outcome():
    when = {"all": [
        {"tag": "Modality", "equals": "CT"},
        {"not": {"any": [{"tag": "SeriesDescription", "regex": "(?i)scout"}, {"tag": "ImageType", "equals": "LOCALIZER"}]}},
    ]}
    matched, reason = check_one(when, {"Modality": "CT", "SeriesDescription": "Scout", "ImageType": ["ORIGINAL"]})
    assert not matched
    assert reason.endswith(
        "all[1].not: failed (any[0]: SeriesDescription regex '(?i)scout': held (value 'Scout'))"
    )
    matched, reason = check_one(when, {"Modality": "CT", "SeriesDescription": "Thorax", "ImageType": ["ORIGINAL"]})
    assert matched
    assert "not: held (any: none held ([0] SeriesDescription regex '(?i)scout': failed (value 'Thorax'); " in reason
    # double negation
    assert check_one({"not": {"not": {"tag": "Modality", "equals": "CT"}}}, {"Modality": "CT"})[0]


# --- selector --------------------------------------------------------------------------------


def chest_ct(uid: str, description: str, thickness, count: int, orientation=AXIAL, **extra) -> SeriesFacts:
    attributes = {
        "Modality": "CT", "BodyPartExamined": "CHEST", "Manufacturer": "SIEMENS",
        "SeriesDescription": description, "SliceThickness": thickness, "ImageOrientationPatient": orientation,
    }
    return SeriesFacts(uid, {**attributes, **extra}, count)


STUDY = [
    chest_ct("1.1", "Topogram 0.6 T20f", 0.6, 1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
    chest_ct("1.2", "Thorax cor 3.0", 3.0, 150, orientation=CORONAL),
    chest_ct("1.3", "Thorax 5.0 B31f", "5.0", 60),
    chest_ct("1.4", "Thorax 1.0 B31f", "1.0", 300),
]


def test_selector_picks_thinnest_axial_series_with_enough_slices():
    [decision] = evaluate(load_rules_text(EXAMPLE_TOML), STUDY)
    assert decision.matched and decision.selected_series == ["1.4"]
    assert decision.models == ["lung_ct_seg"] and decision.destinations == ["pacs"] and decision.quiet_period_s == 5.0
    assert decision.reasons[0] == (
        "series 1.1 (CT 'Topogram 0.6 T20f', 1 instance): no match: all[2].not: failed "
        "(SeriesDescription regex '(?i)scout|localizer|topogram': held (value 'Topogram 0.6 T20f'))"
    )
    assert len(decision.reasons) == len(STUDY) + 1  # one line per series, then the selector
    assert decision.reasons[-1] == (
        "selector: 3 series matched; skipped 1.2 (coronal, not axial); picked 1.4 (thinnest, SliceThickness 1.0 mm, 300 slices)"
    )


def test_selector_min_slices_most_slices_and_all():
    data = tomllib.loads(EXAMPLE_TOML)
    data["rules"][0]["series"] = {"orientation": "axial", "min_slices": 100}
    [decision] = evaluate(parse_rules(data), STUDY)
    assert decision.selected_series == ["1.4"]
    assert "1.3 (60 slices < 100)" in decision.reasons[-1]

    data["rules"][0]["series"] = {"orientation": "any", "pick": "most_slices"}
    [decision] = evaluate(parse_rules(data), STUDY)
    assert decision.selected_series == ["1.4"]

    del data["rules"][0]["series"]  # no selector: every matching series
    [decision] = evaluate(parse_rules(data), STUDY)
    assert decision.selected_series == ["1.2", "1.3", "1.4"]
    assert decision.reasons[-1] == "selector: 3 series matched; picked 1.2, 1.3, 1.4 (all)"


def test_selector_orientations_oblique_and_missing():
    data = tomllib.loads(EXAMPLE_TOML)
    tilted_5 = [1, 0, 0, 0, 0.9962, 0.0872]  # 5 degrees off axial: still axial
    tilted_30 = [1, 0, 0, 0, 0.866, 0.5]
    study = [
        chest_ct("2.1", "a", 1.0, 50, orientation=tilted_5),
        chest_ct("2.2", "b", 0.5, 50, orientation=tilted_30),
        chest_ct("2.3", "c", 0.5, 50, orientation=SAGITTAL),
        chest_ct("2.4", "d", 0.5, 50, orientation=None),
    ]
    [decision] = evaluate(parse_rules(data), study)
    assert decision.selected_series == ["2.1"]
    line = decision.reasons[-1]
    assert "2.2 (oblique, 30 deg from axial, not axial)" in line
    assert "2.3 (sagittal, not axial)" in line
    assert "2.4 (no ImageOrientationPatient, not axial)" in line


def test_selector_counts_frames_of_a_single_multiframe_instance():
    data = tomllib.loads(EXAMPLE_TOML)
    [decision] = evaluate(parse_rules(data), [chest_ct("3.1", "enhanced", 1.0, 1, NumberOfFrames=200)])
    assert decision.selected_series == ["3.1"]


def test_no_series_selected_means_not_matched():
    data = tomllib.loads(EXAMPLE_TOML)
    [decision] = evaluate(parse_rules(data), [STUDY[0], STUDY[1]])
    assert not decision.matched and decision.selected_series == []
    assert decision.reasons[-1] == "selector: 1 series matched; skipped 1.2 (coronal, not axial); none left to pick"
    [decision] = evaluate(parse_rules(data), [STUDY[0]])
    assert decision.reasons[-1] == "selector: no series matched the conditions"


# --- evaluation order, disabled, plan --------------------------------------------------------


def test_evaluation_order_priority_desc_then_name_and_disabled_rule():
    rule_set = parse_rules([
        rule({"tag": "Modality", "equals": "CT"}, name="b", priority=1),
        rule({"tag": "Modality", "equals": "CT"}, name="off", priority=99, enabled=False),
        rule({"tag": "Modality", "equals": "CT"}, name="a", priority=1),
        rule({"tag": "Modality", "equals": "CT"}, name="top", priority=5),
    ])
    decisions = evaluate(rule_set, [STUDY[3]])
    assert [d.rule_name for d in decisions] == ["off", "top", "a", "b"]
    off = decisions[0]
    assert not off.matched and off.selected_series == [] and off.reasons == ["disabled"]
    assert all(d.matched for d in decisions[1:])
    assert json.loads(json.dumps(off.to_json()))["reasons"] == ["disabled"]
    assert set(decisions[1].to_json()) == {
        "rule_name", "priority", "matched", "selected_series", "models", "destinations", "quiet_period_s", "qc_fail",
        "reasons", "priors", "source", "no_result_notice",
    }


def test_plan_deduplicates_series_model_pairs_highest_priority_wins():
    rule_set = parse_rules([
        {**rule({"tag": "Modality", "equals": "CT"}, name="broad", priority=1), "models": ["seg", "qc"], "destinations": ["archive"]},
        {**rule({"tag": "SeriesDescription", "regex": "1.0"}, name="specific", priority=10, qc_fail="drop"),
         "models": ["seg"], "destinations": ["pacs"]},
        {**rule({"tag": "Modality", "equals": "MR"}, name="mr", priority=20), "models": ["seg"]},
    ])
    runs = plan(evaluate(rule_set, [STUDY[2], STUDY[3]]))
    assert runs == [  # the winning rule's destinations and quality-check policy
        Run("1.4", "seg", ["pacs"], "specific", "drop"),
        Run("1.3", "seg", ["archive"], "broad", None),
        Run("1.3", "qc", ["archive"], "broad", None),
        Run("1.4", "qc", ["archive"], "broad", None),
    ]


def test_plan_skips_disabled_rules():
    rule_set = parse_rules([
        rule({"tag": "Modality", "equals": "CT"}, name="off", priority=9, enabled=False),
        {**rule({"tag": "Modality", "equals": "CT"}, name="on"), "destinations": ["viewer"]},
    ])
    assert plan(evaluate(rule_set, [STUDY[3]])) == [Run("1.4", "m", ["viewer"], "on", None)]


# --- problems --------------------------------------------------------------------------------


def test_bad_regex_is_reported_with_its_full_path():
    data = tomllib.loads(EXAMPLE_TOML)
    data["rules"] = [rule({"tag": "Modality", "equals": "CT"}, name="a"), rule({"tag": "Modality", "equals": "CT"}, name="b"),
                     data["rules"][0]]
    data["rules"][2]["when"]["all"][1] = {"tag": "BodyPartExamined", "regex": "("}
    assert problems_of(data) == [
        "rules.toml: rules[2] (lung-ct).when.all[1].regex: invalid regular expression '(': missing ): ("
    ]


def test_unknown_keyword_suggests_the_closest_one():
    assert problems_of([rule({"tag": "Modalty", "equals": "CT"}, name="x")]) == [
        "rules.toml: rules[0] (x).when.tag: unknown DICOM keyword 'Modalty' (did you mean 'Modality'?); "
        'use a keyword from the DICOM dictionary or "gggg,eeee"'
    ]
    assert "0008-0060" in problems_of([rule({"tag": "0008-0060", "present": True})])[0]


def test_all_problems_are_listed_at_once():
    data = [
        {"name": "a", "priority": "high", "models": "seg", "destinations": ["pacs"], "when": {"tag": "Modality", "equals": True},
         "enabeld": False},
        {"priority": 1, "models": ["seg"], "destinations": ["pacs"]},
        rule({"all": [{"tag": "SliceThickness", "range": [5, 1]}, {"tag": "SliceThickness", "range": ["1", 2]},
                      {"tag": "Modality", "one_of": []}, {"tag": "Modality", "present": False}]}, name="c"),
        rule({"any": []}, name="d", quiet_period_s=-1, series={"orientation": "axail", "pick": "thickest", "min": 3}),
        rule({"tag": "Modality", "equals": "CT", "regex": "CT"}, name="e"),
        rule({"tag": "Modality"}, name="f"),
        rule({"all": [{"tag": "Modality", "equals": "CT", "any": []}, "Modality", {"equal": "CT", "tag": "Modality"}]}, name="g"),
    ]
    assert problems_of(data, "config.toml") == [
        "config.toml: rules[0] (a).enabeld: unknown key 'enabeld' (expected one of name, priority, enabled, models, "
        "destinations, quiet_period_s, qc_fail, no_result_notice, when, series, priors, source)",
        "config.toml: rules[0] (a).priority: expected an integer, got a string 'high'",
        "config.toml: rules[0] (a).models: expected a non-empty list of model names, got a string 'seg'",
        "config.toml: rules[0] (a).when.equals: expected a string or number, got a boolean True",
        "config.toml: rules[1].name: missing (required)",
        "config.toml: rules[1].when: missing (required)",
        "config.toml: rules[2] (c).when.all[0].range: low 5 is greater than high 1",
        "config.toml: rules[2] (c).when.all[1].range: expected [low, high] with two numbers, got a list ['1', 2]",
        "config.toml: rules[2] (c).when.all[2].one_of: expected a non-empty list of strings or numbers, got a list []",
        "config.toml: rules[2] (c).when.all[3].present: expected true, got a boolean False (for the opposite use absent = true)",
        "config.toml: rules[3] (d).quiet_period_s: expected seconds >= 0, got an integer -1",
        "config.toml: rules[3] (d).when.any: expected a non-empty list of conditions, got a list []",
        "config.toml: rules[3] (d).series.min: unknown key 'min' (expected one of orientation, min_slices, pick)",
        "config.toml: rules[3] (d).series.orientation: expected one of any | axial | coronal | sagittal, got a string 'axail'",
        "config.toml: rules[3] (d).series.pick: expected one of all | thinnest | most_slices, got a string 'thickest'",
        "config.toml: rules[4] (e).when: more than one operator (equals, regex); put each in its own condition under all = [...]",
        "config.toml: rules[5] (f).when: no operator for tag 'Modality'; expected one of equals, one_of, regex, range, present, absent",
        "config.toml: rules[6] (g).when.all[0]: one condition cannot mix 'any' and 'tag'; nest them instead",
        "config.toml: rules[6] (g).when.all[1]: expected a table like { tag = \"Modality\", equals = \"CT\" }, got a string 'Modality'",
        "config.toml: rules[6] (g).when.all[2].equal: unknown key 'equal' (operators: equals, one_of, regex, range, present, absent)",
    ]


def test_top_level_shape_problems():
    assert problems_of({"rule": [], "rules": []}) == [
        "rules.toml: unknown top-level key(s) ['rule']; a rule set holds [[rules]] tables only"
    ]
    assert problems_of({"rules": {"name": "x"}}) == [
        "rules.toml: rules: expected an array of tables ([[rules]]), got a table {'name': 'x'}"
    ]
    assert problems_of([rule({"tag": "Modality", "present": True}, name="x")] * 2) == [
        "rules.toml: rules[1] (x).name: duplicate rule name 'x' (also rules[0])"
    ]


def test_check_rules_cross_references():
    rule_set = parse_rules([
        {**rule({"tag": "Modality", "equals": "CT"}, name="a"), "models": ["lung_ct_seg", "lung_ct_sg"], "destinations": ["pacs", "vna"]},
    ], "rules.toml")
    assert check_rules(rule_set, {"lung_ct_seg", "brain_seg"}, {"pacs"}) == [
        "rules.toml: rules[0] (a).models[1]: unknown model 'lung_ct_sg' (known: brain_seg, lung_ct_seg)",
        "rules.toml: rules[0] (a).destinations[1]: unknown destination 'vna' (known: pacs)",
    ]
    assert check_rules(rule_set, None, None) == []
    rule_set.rules.append(rule_set.rules[0])  # e.g. edited in code after parsing
    assert check_rules(rule_set, None, {"pacs", "vna"}) == [
        "rules.toml: rules[1] (a).name: duplicate rule name 'a' (also rules[0])"
    ]


def test_toml_syntax_error_reports_line_and_column(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "a"\npriority = \n')
    with pytest.raises(RuleError) as caught:
        load_rules_file(path)
    assert caught.value.problems == [f"{path}: TOML syntax error: Invalid value (at line 3, column 12)"]


def test_load_rules_file_rejects_unknown_top_level_tables_and_missing_files(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "a"\n')
    with pytest.raises(RuleError, match=r"unknown top-level key\(s\) \['rule'\]"):
        load_rules_file(path)
    path.write_text("# no rules yet\n")
    assert load_rules_file(path).rules == []
    with pytest.raises(RuleError, match="cannot read"):
        load_rules_file(tmp_path / "missing.toml")


def test_load_rules_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(EXAMPLE_TOML)
    rule_set = load_rules_file(path)
    assert rule_set.source == str(path)
    [lung] = rule_set.rules
    assert (lung.name, lung.priority, lung.enabled, lung.quiet_period_s) == ("lung-ct", 10, True, 5.0)
    assert (lung.series.orientation, lung.series.min_slices, lung.series.pick) == ("axial", 20, "thinnest")


# --- round trip ------------------------------------------------------------------------------


def load_rules_text(text: str):
    return parse_rules(tomllib.loads(text))


def test_rules_to_toml_round_trips():
    data = tomllib.loads(EXAMPLE_TOML)
    data["rules"].append({
        **rule({"not": {"any": [
            {"tag": "SeriesDescription", "regex": r"\d+\s*mm 'quoted'"},
            {"tag": "StudyDescription", "equals": 'say "hi"\\ \t\n\x7f é'},
            {"all": [{"tag": "EchoNumbers", "equals": 2}, {"tag": "RepetitionTime", "range": [1e-05, 3000]}]},
            {"tag": "ImageType", "one_of": ["LOCALIZER", 3, 1.5]},
        ]}}, name='odd "name" é', priority=-3, enabled=False),
        "destinations": [],
    })
    data["rules"].append(rule({"tag": "SeriesDescription", "regex": r"^T1\b"}, name="literal",
                              qc_fail="send_flagged"))
    original = parse_rules(data)
    text = rules_to_toml(original)
    assert parse_rules(tomllib.loads(text)) == original
    assert "pick = \"thinnest\"" in text and "regex = '^T1\\b'" in text  # regexes keep single backslashes
    assert rules_to_toml(parse_rules(tomllib.loads(text))) == text


def test_empty_rule_set_round_trips():
    # a node configured without rules stores "" as its rule set and must read it back
    empty = parse_rules([])
    assert rules_to_toml(empty) == ""
    assert parse_rules(tomllib.loads("")) == empty


def test_rule_without_selector_writes_no_series_table():
    text = rules_to_toml(parse_rules([rule({"tag": "Modality", "equals": "CT"})]))
    assert "[rules.series]" not in text and "quiet_period_s" not in text and "qc_fail" not in text


def test_qc_fail_is_one_of_the_policies():
    assert parse_rules([rule({"tag": "Modality", "equals": "CT"}, qc_fail="hold")]).rules[0].qc_fail == "hold"
    assert parse_rules([rule({"tag": "Modality", "equals": "CT"})]).rules[0].qc_fail is None  # node default
    assert problems_of([rule({"tag": "Modality", "equals": "CT"}, qc_fail="send")]) == [
        "rules.toml: rules[0] (r).qc_fail: expected one of hold | send_flagged | drop, got a string 'send'"]


def test_duplicate_names_are_reported_alongside_other_problems():
    data = [rule({"tag": "Modality", "present": True}, name="x"), rule({"tag": "Modalty", "present": True}, name="x")]
    problems = problems_of(data)
    assert len(problems) == 2
    assert problems[0].startswith("rules.toml: rules[1] (x).when.tag: unknown DICOM keyword 'Modalty'")
    assert problems[1] == "rules.toml: rules[1] (x).name: duplicate rule name 'x' (also rules[0])"


def test_study_without_series():
    [decision] = evaluate(parse_rules([rule({"tag": "Modality", "present": True})]), [])
    assert not decision.matched and decision.reasons == ["no series in the study"]
