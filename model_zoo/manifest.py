"""model.toml: what a model is, what it accepts and what its outputs mean (coded concepts).

Example (see model_zoo/lung_ct_seg/model.toml for a full one)::

    [model]
    name = "lung_ct_seg"
    version = "1.0.0"
    task = "segmentation"            # segmentation | denoising | classification
    entry = "model:LungSegmentation" # module:class inside the model folder
    weights = "weights.pt"

    [algorithm]                      # identity written into every result (TID 4019, equipment)
    name = "Lung CT segmentation"
    version = "1.0.0"
    manufacturer = "dicom-ai-node"

    [input]
    modality = ["CT"]
    min_slices = 16
    spacing_mm = [0.3, 8.0]          # allowed range of every voxel spacing
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
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("segmentation", "denoising", "classification")


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
    body_part: tuple[str, ...] = ()
    required_attributes: tuple[str, ...] = ()


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
    algorithm = read.get(tree, "algorithm", "", dict)
    raw_input = read.get(tree, "input", "", dict)
    spacing = read.get(raw_input, "spacing_mm", "input", list, required=False, default=[0.0, 1e9])
    if len(spacing) != 2 or not all(isinstance(v, (int, float)) for v in spacing) or spacing[0] > spacing[1]:
        read.fail("input.spacing_mm", f"must be [low, high] in mm, got {spacing!r}")
    input_spec = InputSpec(
        modality=read.strings(raw_input, "modality", "input", required=True),
        min_slices=read.get(raw_input, "min_slices", "input", int, required=False, default=1),
        spacing_mm=(float(spacing[0]), float(spacing[1])),
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
    )
