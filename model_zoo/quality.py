"""Quality checks: is a model's output plausible by its manifest's [qc]? Pure: no files, no database.

    results = check_output(manifest, output, volume.voxel_volume_ml)
    reasons = failures(results)  # the failed checks' sentences

One :class:`CheckResult` per check and value (a measurement taken on two segments is checked
twice). A check whose output is absent passes unless the manifest says ``required = true``; a
value that is not a finite number fails. Messages are one ASCII sentence each, with names and
numbers only (no patient data), because they also go into DICOM text and burned-in banners.
What the node does with a failure (hold, send flagged, drop) is the routing rule's choice, not
this module's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from model_zoo.base import ModelOutput
from model_zoo.manifest import (FindingCheck, Manifest, MeasurementCheck, ReductionCheck,
                                SegmentCheck)

UNIT_TEXT = {"[hnsf'U]": "HU", "ml": "mL"}  # UCUM codes shown more readably


@dataclass(frozen=True)
class CheckResult:
    name: str  # what was checked, e.g. "lung volume", "mean_attenuation on lung"
    value: float | None  # what the result had; None when the output was absent
    low: float | None  # the allowed range; None is open on that side
    high: float | None
    unit: str  # of value, low and high ("mL", "HU", "%", "" for a probability)
    passed: bool
    message: str


def check_output(manifest: Manifest, output: ModelOutput, voxel_volume_ml: float) -> list[CheckResult]:
    """Every [qc] check of ``manifest`` against ``output``; [] when the manifest has no [qc]."""
    spec = manifest.qc
    results: list[CheckResult] = []
    for check in spec.segments:
        results.append(_segment(check, output, voxel_volume_ml))
    for check in spec.measurements:
        results += _measurement(check, output, _unit(manifest, check.name))
    for check in spec.findings:
        results += _finding(check, output)
    for check in spec.reductions:
        results += _reduction(check, output, _unit(manifest, check.after))
    return results


def failures(results: list[CheckResult]) -> list[str]:
    """The sentences of the checks that failed, in check order."""
    return [result.message for result in results if not result.passed]


def _segment(check: SegmentCheck, output: ModelOutput, voxel_volume_ml: float) -> CheckResult:
    masks = [s.mask for s in output.segments if s.name == check.name]
    volume = float(masks[0].sum()) * voxel_volume_ml if masks else 0.0
    low, high = check.volume_ml or (None, None)
    name = f"{check.name} volume" if check.volume_ml else f"{check.name} present"
    if volume == 0.0:
        if check.required:
            return CheckResult(name, 0.0, low, high, "mL", False,
                               f"{check.name} not found: the model segmented nothing, and it is required")
        return CheckResult(name, 0.0, low, high, "mL", True,
                           f"{check.name} not found; optional, so not checked")
    if check.volume_ml is None:
        return CheckResult(name, volume, None, None, "mL", True,
                           f"{check.name} present ({_number(volume)} mL)")
    return _in_range(name, volume, low, high, "mL", "plausible")


def _measurement(check: MeasurementCheck, output: ModelOutput, unit: str) -> list[CheckResult]:
    low, high = check.allowed
    found = [m for m in output.measurements
             if m.name == check.name and (check.segment is None or m.segment == check.segment)]
    if not found:
        name = check.name + (f" on {check.segment}" if check.segment else "")
        return [_absent(name, low, high, unit, check.required, "not reported by the model")]
    return [_in_range(m.name + (f" on {m.segment}" if m.segment else ""), m.value, low, high, unit,
                      "plausible") for m in found]


def _finding(check: FindingCheck, output: ModelOutput) -> list[CheckResult]:
    name = f"{check.name} probability"
    found = [f for f in output.findings if f.name == check.name]
    if not found:
        return [_absent(name, check.min_probability, None, "", check.required, "not reported by the model")]
    results = []
    for finding in found:
        result = _in_range(name, finding.probability, check.min_probability, None, "", "needed")
        # say which answer the probability belongs to: that is what a reader acts on
        results.append(replace(result, message=f"{check.name} '{finding.value}': {result.message}"))
    return results


def _reduction(check: ReductionCheck, output: ModelOutput, unit: str) -> list[CheckResult]:
    name = f"{check.after} reduction from {check.before}"
    low = 100.0 * check.min_relative
    afters = {m.segment: m for m in output.measurements if m.name == check.after}
    pairs = [(m, afters[m.segment]) for m in output.measurements
             if m.name == check.before and m.segment in afters]
    if not pairs:
        return [_absent(name, low, None, "%", check.required, "not computed: the model did not report both")]
    results = []
    for before, after in pairs:
        relative = 100.0 * (before.value - after.value) / before.value if before.value > 0 else math.nan
        result = _in_range(name, relative, low, None, "%", "needed")
        detail = f" ({check.before} {_number(before.value)} {unit}, {check.after} {_number(after.value)} {unit})"
        results.append(replace(result, message=result.message + detail))
    return results


def _in_range(name: str, value: float, low: float | None, high: float | None, unit: str,
              what: str) -> CheckResult:
    """``what``: "plausible" (a range) or "needed" (a floor), as the sentence reads."""
    shown = f"{name} {_number(value)}{_with_unit(unit)}"
    allowed = _range_text(low, high, unit)
    if not math.isfinite(value):
        return CheckResult(name, value, low, high, unit, False, f"{name} is not a number")
    if low is not None and value < low:
        message = f"{shown} is below the {what} {allowed}"
    elif high is not None and value > high:
        message = f"{shown} is above the {what} {allowed}"
    else:
        return CheckResult(name, value, low, high, unit, True, f"{shown} is within the {what} {allowed}")
    return CheckResult(name, value, low, high, unit, False, message)


def _absent(name: str, low, high, unit: str, required: bool, why: str) -> CheckResult:
    if required:
        return CheckResult(name, None, low, high, unit, False, f"{name} {why}, and it is required")
    return CheckResult(name, None, low, high, unit, True, f"{name} {why}; optional, so not checked")


def _unit(manifest: Manifest, measurement: str) -> str:
    code = manifest.measurement(measurement).unit.value
    return UNIT_TEXT.get(code, code)


def _range_text(low: float | None, high: float | None, unit: str) -> str:
    if low is not None and high is not None:
        return f"range {_number(low)} to {_number(high)}{_with_unit(unit)}"
    if low is not None:
        return f"minimum {_number(low)}{_with_unit(unit)}"
    return f"maximum {_number(high)}{_with_unit(unit)}"


def _with_unit(unit: str) -> str:
    return "" if not unit else unit if unit == "%" else f" {unit}"


def _number(value: float) -> str:
    """Short and exact enough for a sentence: 149.4, 12000, 0.84, -752.5."""
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
