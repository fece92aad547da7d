"""model.toml: what a model is, what it accepts and what its outputs mean (coded concepts).

Example (see model_zoo/lung_ct_seg/model.toml for a full one)::

    [model]
    name = "lung_ct_seg"
    version = "1.0.0"
    task = "segmentation"            # segmentation | denoising | classification
    entry = "model:LungSegmentation" # module:class inside the model folder
    weights = "weights.pt"
    device = "any"                   # gpu | cpu | any (default): which workers may run it

    [algorithm]                      # identity written into every result (TID 4019, equipment)
    name = "Lung CT segmentation"
    version = "1.0.0"
    manufacturer = "dicom-ai-node"

    [input]
    modality = ["CT"]
    min_slices = 16
    spacing_mm = [0.3, 8.0]          # allowed range of every voxel spacing
    slice_spacing_mm = [0.3, 10.0]   # optional: the range between slices instead (default spacing_mm,
                                     # which then applies in-plane only)
    body_part = ["CHEST", "LUNG"]    # optional; checked only when the series has BodyPartExamined
    required_attributes = ["RescaleSlope"]

    [[outputs.segments]]
    name = "lung"
    label = "Lungs"
    category = { scheme = "SCT", value = "123037004", meaning = "Anatomical Structure" }
    type = { scheme = "SCT", value = "39607008", meaning = "Lung" }

    [[outputs.measurements]]
    name = "volume"
    concept = { scheme = "SCT", value = "118565006", meaning = "Volume" }
    unit = { scheme = "UCUM", value = "ml", meaning = "milliliter" }

    [[outputs.findings]]
    name = "body_region"
    concept = { scheme = "SCT", value = "...", meaning = "..." }
    values = { chest = { scheme = "SCT", value = "51185008", meaning = "Chest" } }

    # [qc]: what a plausible result is (model_zoo/quality.py checks every result against it
    # before anything is delivered; a failure is held, sent flagged or dropped by the routing
    # rule's qc_fail). Every table is optional; each entry names a declared output.
    [[qc.segments]]
    name = "lung"                    # an [[outputs.segments]] name
    required = true                  # an empty or missing mask fails (default false)
    volume_ml = [100, 12000]         # the segment's volume (mL) must lie in [low, high]

    [[qc.measurements]]
    name = "mean_attenuation"        # an [[outputs.measurements]] name
    range = [-1000, -500]            # [low, high] in the measurement's unit
    segment = "lung"                 # optional: only the value taken on this segment
    required = false                 # true: a missing (or not finite) value fails

    [[qc.findings]]
    name = "body_region"             # an [[outputs.findings]] name
    min_probability = 0.6            # the finding's probability must be at least this

    [[qc.reductions]]                # a measurement that must fall relative to another
    before = "noise_input"           # both [[outputs.measurements]] names
    after = "noise_output"
    min_relative = 0.2               # (before - after) / before >= 0.2, i.e. 20% less

A check whose output is absent passes unless ``required = true``; a value that is not a finite
number always fails.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("segmentation", "denoising", "classification")
# where a model runs (executor "celery" sends its jobs to the queue of the same name):
# "gpu" needs a GPU, "cpu" must run on a CPU, "any" runs on either
DEVICES = ("gpu", "cpu", "any")


class ManifestError(ValueError):
    """A model.toml is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str

    def to_highdicom(self):
        from highdicom.sr import CodedConcept

        return CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


@dataclass(frozen=True)
class SegmentSpec:
    name: str
    label: str
    category: Code
    type: Code
    color: tuple[int, int, int] = (255, 0, 0)


@dataclass(frozen=True)
class MeasurementSpec:
    name: str
    concept: Code
    unit: Code


@dataclass(frozen=True)
class FindingSpec:
    name: str
    concept: Code
    values: dict[str, Code]


@dataclass(frozen=True)
class InputSpec:
    modality: tuple[str, ...]
    min_slices: int = 1
    spacing_mm: tuple[float, float] = (0.0, 1e9)
    # between slices, when it differs from spacing_mm (which then is the in-plane range); None: spacing_mm
    slice_spacing_mm: tuple[float, float] | None = None
    body_part: tuple[str, ...] = ()
    required_attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SegmentCheck:
    """[[qc.segments]]: the segment must be non-empty (``required``) and/or its volume in range."""

    name: str
    required: bool = False
    volume_ml: tuple[float, float] | None = None


@dataclass(frozen=True)
class MeasurementCheck:
    """[[qc.measurements]]: the measurement's value in ``allowed`` (TOML key ``range``)."""

    name: str
    allowed: tuple[float, float]
    segment: str | None = None  # None: every value of that name, whatever its segment
    required: bool = False


@dataclass(frozen=True)
class FindingCheck:
    """[[qc.findings]]: the finding's probability at least ``min_probability``."""

    name: str
    min_probability: float
    required: bool = False


@dataclass(frozen=True)
class ReductionCheck:
    """[[qc.reductions]]: measurement ``after`` at least ``min_relative`` below ``before``."""

    before: str
    after: str
    min_relative: float
    required: bool = False


@dataclass(frozen=True)
class QualitySpec:
    """[qc]: what a plausible result of this model is; empty when the manifest has no [qc]."""

    segments: tuple[SegmentCheck, ...] = ()
    measurements: tuple[MeasurementCheck, ...] = ()
    findings: tuple[FindingCheck, ...] = ()
    reductions: tuple[ReductionCheck, ...] = ()


@dataclass(frozen=True)
class Manifest:
    path: Path  # the model.toml file
    name: str
    version: str
    task: str
    entry: str
    weights: str | None
    algorithm_name: str
    algorithm_version: str
    manufacturer: str
    input: InputSpec
    segments: tuple[SegmentSpec, ...] = ()
    measurements: tuple[MeasurementSpec, ...] = ()
    findings: tuple[FindingSpec, ...] = ()
    description: str = ""
    extra: dict = field(default_factory=dict)  # [model.options] passed to the model as-is
    qc: QualitySpec = field(default_factory=QualitySpec)
    device: str = "any"  # one of DEVICES

    @property
    def folder(self) -> Path:
        return self.path.parent

    def segment(self, name: str) -> SegmentSpec:
        return _by_name(self.segments, name, "segment", self.path)

    def measurement(self, name: str) -> MeasurementSpec:
        return _by_name(self.measurements, name, "measurement", self.path)

    def finding(self, name: str) -> FindingSpec:
        return _by_name(self.findings, name, "finding", self.path)


def _by_name(items, name, kind, path):
    for item in items:
        if item.name == name:
            return item
    raise ManifestError(f"{path}: the model produced {kind} {name!r}, which the manifest does not declare")


class _Reader:
    """Reads typed values out of the TOML tree and reports errors as 'file: key: problem'."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str):
        raise ManifestError(f"{self.path}: {key}: {problem}")

    def get(self, table: dict, key: str, where: str, kind, required=True, default=None):
        if key not in table:
            if required:
                self.fail(f"{where}.{key}", "is required")
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(f"{where}.{key}", f"must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def code(self, table: dict, key: str, where: str) -> Code:
        raw = self.get(table, key, where, dict)
        parts = []
        for part in ("scheme", "value", "meaning"):
            text = self.get(raw, part, f"{where}.{key}", str)
            if not text.strip():
                self.fail(f"{where}.{key}.{part}", "must not be empty")
            parts.append(text)
        if len(parts[1]) > 16 and parts[0] != "UCUM":
            self.fail(f"{where}.{key}.value", "code values are at most 16 characters (DICOM SH)")
        if len(parts[2]) > 64:
            self.fail(f"{where}.{key}.meaning", "code meanings are at most 64 characters (DICOM LO)")
        return Code(*parts)

    def bounds(self, table: dict, key: str, where: str, unit: str = "", required=True, default=None):
        """[low, high] of two numbers with low <= high, as floats."""
        value = self.get(table, key, where, list, required=required, default=default)
        if value is None:
            return None
        if (len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or not value[0] <= value[1]):
            self.fail(f"{where}.{key}", f"must be [low, high]{' in ' + unit if unit else ''} with low <= high, "
                      f"got {value!r}")
        return float(value[0]), float(value[1])

    def fraction(self, table: dict, key: str, where: str) -> float:
        value = self.get(table, key, where, float)
        if not 0.0 <= value <= 1.0:
            self.fail(f"{where}.{key}", f"must be between 0 and 1, got {value!r}")
        return value

    def known_keys(self, table: dict, allowed: tuple[str, ...], where: str) -> None:
        """Refuse keys outside ``allowed``: a misspelt check would otherwise silently not run."""
        for key in sorted(set(table) - set(allowed)):
            self.fail(f"{where}.{key}", f"unknown key (allowed: {', '.join(allowed)})")

    def name_of(self, table: dict, key: str, where: str, declared: list[str], kind: str,
                required=True) -> str | None:
        """A name that must be one of the manifest's declared outputs of ``kind``."""
        name = self.get(table, key, where, str, required=required)
        if name is not None and name not in declared:
            self.fail(f"{where}.{key}", f"{name!r} is not an [[outputs.{kind}]] name "
                      f"(declared: {', '.join(declared) or 'none'})")
        return name

    def strings(self, table: dict, key: str, where: str, required=False) -> tuple[str, ...]:
        raw = self.get(table, key, where, (list, str), required=required, default=[])
        raw = [raw] if isinstance(raw, str) else raw
        if not all(isinstance(item, str) for item in raw):
            self.fail(f"{where}.{key}", "must be a list of strings")
        return tuple(raw)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if path.is_dir():
        path = path / "model.toml"
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"{path}: not valid TOML: {error}") from None
    read = _Reader(path)

    model = read.get(tree, "model", "", dict)
    task = read.get(model, "task", "model", str)
    if task not in TASKS:
        read.fail("model.task", f"must be one of {', '.join(TASKS)}, got {task!r}")
    device = read.get(model, "device", "model", str, required=False, default="any")
    if device not in DEVICES:
        read.fail("model.device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    algorithm = read.get(tree, "algorithm", "", dict)
    raw_input = read.get(tree, "input", "", dict)
    input_spec = InputSpec(
        modality=read.strings(raw_input, "modality", "input", required=True),
        min_slices=read.get(raw_input, "min_slices", "input", int, required=False, default=1),
        spacing_mm=read.bounds(raw_input, "spacing_mm", "input", "mm", required=False, default=[0.0, 1e9]),
        slice_spacing_mm=read.bounds(raw_input, "slice_spacing_mm", "input", "mm", required=False),
        body_part=tuple(s.upper() for s in read.strings(raw_input, "body_part", "input")),
        required_attributes=read.strings(raw_input, "required_attributes", "input"),
    )

    outputs = read.get(tree, "outputs", "", dict, required=False, default={})
    segments = []
    for i, raw in enumerate(read.get(outputs, "segments", "outputs", list, required=False, default=[])):
        where = f"outputs.segments[{i}]"
        color = read.get(raw, "color", where, list, required=False, default=[255, 0, 0])
        if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
            read.fail(f"{where}.color", "must be [r, g, b] with 0..255 each")
        segments.append(SegmentSpec(
            name=read.get(raw, "name", where, str),
            label=read.get(raw, "label", where, str),
            category=read.code(raw, "category", where),
            type=read.code(raw, "type", where),
            color=tuple(color),
        ))
    measurements = []
    for i, raw in enumerate(read.get(outputs, "measurements", "outputs", list, required=False, default=[])):
        where = f"outputs.measurements[{i}]"
        unit = read.code(raw, "unit", where)
        if unit.scheme != "UCUM":
            read.fail(f"{where}.unit.scheme", f"units must be UCUM, got {unit.scheme!r}")
        measurements.append(MeasurementSpec(
            name=read.get(raw, "name", where, str),
            concept=read.code(raw, "concept", where),
            unit=unit,
        ))
    findings = []
    for i, raw in enumerate(read.get(outputs, "findings", "outputs", list, required=False, default=[])):
        where = f"outputs.findings[{i}]"
        values = read.get(raw, "values", where, dict)
        if not values:
            read.fail(f"{where}.values", "must list at least one coded value")
        findings.append(FindingSpec(
            name=read.get(raw, "name", where, str),
            concept=read.code(raw, "concept", where),
            values={key: read.code(values, key, f"{where}.values") for key in values},
        ))
    for kind, items in (("segments", segments), ("measurements", measurements), ("findings", findings)):
        names = [item.name for item in items]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            read.fail(f"outputs.{kind}", f"duplicate names {duplicates}")

    quality = _quality_spec(read, read.get(tree, "qc", "", dict, required=False, default={}),
                            segments, measurements, findings)

    return Manifest(
        path=path,
        name=read.get(model, "name", "model", str),
        version=read.get(model, "version", "model", str),
        task=task,
        entry=read.get(model, "entry", "model", str),
        weights=read.get(model, "weights", "model", str, required=False),
        description=read.get(model, "description", "model", str, required=False, default=""),
        algorithm_name=read.get(algorithm, "name", "algorithm", str),
        algorithm_version=read.get(algorithm, "version", "algorithm", str),
        manufacturer=read.get(algorithm, "manufacturer", "algorithm", str, required=False,
                              default="dicom-ai-node"),
        input=input_spec,
        segments=tuple(segments),
        measurements=tuple(measurements),
        findings=tuple(findings),
        extra=read.get(model, "options", "model", dict, required=False, default={}),
        qc=quality,
        device=device,
    )


QC_TABLES = ("segments", "measurements", "findings", "reductions")


def _quality_spec(read: _Reader, raw: dict, segments, measurements, findings) -> QualitySpec:
    """[qc], every entry checked against the declared outputs it names."""
    read.known_keys(raw, QC_TABLES, "qc")
    segment_names = [s.name for s in segments]
    measurement_names = [m.name for m in measurements]
    finding_names = [f.name for f in findings]

    def entries(kind: str, keys: tuple[str, ...]):
        for i, item in enumerate(read.get(raw, kind, "qc", list, required=False, default=[])):
            where = f"qc.{kind}[{i}]"
            if not isinstance(item, dict):
                read.fail(where, f"must be a table ([[qc.{kind}]]), got {item!r}")
            read.known_keys(item, keys, where)
            yield item, where

    def required(item, where) -> bool:
        return read.get(item, "required", where, bool, required=False, default=False)

    segment_checks = []
    for item, where in entries("segments", ("name", "required", "volume_ml")):
        check = SegmentCheck(name=read.name_of(item, "name", where, segment_names, "segments"),
                             required=required(item, where),
                             volume_ml=read.bounds(item, "volume_ml", where, "mL", required=False))
        if not check.required and check.volume_ml is None:
            read.fail(where, "checks nothing: set required = true and/or volume_ml = [low, high]")
        segment_checks.append(check)
    measurement_checks = [
        MeasurementCheck(name=read.name_of(item, "name", where, measurement_names, "measurements"),
                         allowed=read.bounds(item, "range", where),
                         segment=read.name_of(item, "segment", where, segment_names, "segments", required=False),
                         required=required(item, where))
        for item, where in entries("measurements", ("name", "range", "segment", "required"))]
    finding_checks = [
        FindingCheck(name=read.name_of(item, "name", where, finding_names, "findings"),
                     min_probability=read.fraction(item, "min_probability", where),
                     required=required(item, where))
        for item, where in entries("findings", ("name", "min_probability", "required"))]
    reduction_checks = []
    for item, where in entries("reductions", ("before", "after", "min_relative", "required")):
        check = ReductionCheck(before=read.name_of(item, "before", where, measurement_names, "measurements"),
                               after=read.name_of(item, "after", where, measurement_names, "measurements"),
                               min_relative=read.fraction(item, "min_relative", where),
                               required=required(item, where))
        if check.before == check.after:
            read.fail(f"{where}.after", "must name another measurement than before")
        reduction_checks.append(check)

    for kind, keys in (("segments", [c.name for c in segment_checks]),
                       ("measurements", [c.name + (f" on {c.segment}" if c.segment else "")
                                         for c in measurement_checks]),
                       ("findings", [c.name for c in finding_checks]),
                       ("reductions", [f"{c.before} -> {c.after}" for c in reduction_checks])):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            read.fail(f"qc.{kind}", f"the same output is checked twice: {', '.join(duplicates)}")
    return QualitySpec(tuple(segment_checks), tuple(measurement_checks), tuple(finding_checks),
                       tuple(reduction_checks))
