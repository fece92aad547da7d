"""Fitness before inference: one look at everything loading, inference and encoding will need.

Before a job reads a pixel, its series' headers are checked against what the rest of the job
needs: a volume's geometry (imaging/load.plan_series), the model's declared input
(model.toml [input]), pixel data the node can decode, UIDs results can reference, a Frame of
Reference, the patient and study modules every result copies. The outcome is one of:

- run;
- run with repairs, each said in one sentence (stored on the job, written into the SR): one
  Frame of Reference for a series whose geometry is one volume but whose slices carry none or
  several; the patient/study attributes a result needs but the source lacks added empty where
  the standard allows; values the source wrote invalidly mended (results/conform.py);
- refuse, with every reason.

So a job never fails after inference for a reason that was visible before it; an exception
after inference is a bug (the runner records it as such).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from dicom_ai_node.imaging.load import SeriesPlan, plan_series
from dicom_ai_node.imaging.volume import VolumeError
from dicom_ai_node.results import common
from dicom_ai_node.results.conform import conform_source, copied_tags, decode_all
from dicom_ai_node.storage import is_valid_uid
from model_zoo.manifest import Manifest
from model_zoo.registry import check_input

MAX_REASONS = 8  # a refusal lists the first few problems; one per kind is enough to act on
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2"}
_REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass
class Fitness:
    refusals: list[str] = field(default_factory=list)  # why the job cannot run; empty: it can
    repairs: list[str] = field(default_factory=list)  # what was repaired so that it can
    plan: SeriesPlan | None = None  # the volume to read, when it can run
    sources: list[Dataset] = field(default_factory=list)  # one header per source file, volume order

    @property
    def fit(self) -> bool:
        return not self.refusals


def check_fitness(manifest: Manifest, paths: list[str | Path], headers: list[Dataset]) -> Fitness:
    """Check one series for one model, from its headers alone. The headers are the job's own
    in-memory copies: repairs are made on them (never on the stored files)."""
    fitness = Fitness()
    try:
        plan = plan_series(paths, headers)
    except VolumeError as error:
        fitness.refusals.append(f"series cannot be used as a volume: {error}")
        return fitness
    reasons = check_input(manifest, plan.attributes, plan.shape[0], plan.spacing, present=plan.present)
    if reasons:
        fitness.refusals.append(f"series does not fit model {manifest.name}: " + "; ".join(reasons))

    sources = [plan.headers[path] for path in dict.fromkeys(frame.path for frame in plan.frames)]
    fitness.refusals += _pixel_problems(sources)
    fitness.refusals += _uid_problems(sources)
    fitness.refusals += _output_problems(manifest, plan, sources)
    if fitness.refusals:
        del fitness.refusals[MAX_REASONS:]
        return fitness

    fitness.repairs += _one_frame_of_reference(sources)
    fitness.repairs += [f"source {change}" for change in _conform_sources(sources)]
    fitness.plan, fitness.sources = plan, sources
    return fitness


def _conform_sources(sources: list[Dataset]) -> list[str]:
    """conform_source on every header, once per distinct set of copied values: the slices of a
    series nearly always share their patient and study attributes, and mending each of 400
    headers on its own cost 0.84 s (bench/fitness_cost.py); a header whose copied elements are
    byte for byte those of one already mended gets that one's mended elements."""
    tags = copied_tags()
    mended: dict[tuple, tuple[Dataset, list[int]]] = {}  # signature -> (mended header, tags it changed)
    changes: list[str] = []
    for header in sources:
        signature = tuple(_raw_value(header, tag) for tag in tags)
        done = mended.get(signature)
        if done is None:
            before = {tag: _value(header, tag) for tag in tags}
            changes += [change for change in conform_source(header) if change not in changes]
            mended[signature] = (header, [tag for tag in tags if _value(header, tag) != before[tag]])
            continue
        model, changed = done
        if 0x00080005 in changed:  # its other text is read in its own set before the set changes
            decode_all(header)
        for tag in changed:  # the rest is the same bytes already
            if tag in model:
                header[tag] = copy.deepcopy(model[tag])
            elif tag in header:
                del header[tag]
    return changes


def _raw_value(header: Dataset, tag: int):
    item = header.get_item(tag, keep_deferred=True)
    if item is None:
        return None
    return item.value if isinstance(item, RawDataElement) else repr(item.value)


def _value(header: Dataset, tag: int):
    return repr(header[tag].value) if tag in header else None


def _pixel_problems(sources: list[Dataset]) -> list[str]:
    problems = []
    for header in sources:
        name = Path(str(getattr(header, "filename", "") or "")).name or str(header.get("SOPInstanceUID", ""))
        if getattr(header, "pixel_data_present", True) is False:
            problems.append(f"{name} has no pixel data")
            continue
        photometric = str(header.get("PhotometricInterpretation", "") or "").strip().upper()
        if photometric not in _PHOTOMETRIC:
            problems.append(f"{name} has PhotometricInterpretation {photometric or '(missing)'}; "
                            "only grayscale (MONOCHROME1/2) images can be processed")
        if header.get("BitsAllocated") not in (8, 16, 32) or header.get("PixelRepresentation") not in (0, 1):
            problems.append(f"{name} has no usable pixel description (BitsAllocated "
                            f"{header.get('BitsAllocated')}, PixelRepresentation {header.get('PixelRepresentation')})")
        syntax = _transfer_syntax(header)
        if syntax is not None and syntax.is_compressed:
            try:
                decodable = get_decoder(syntax).is_available
            except NotImplementedError:
                decodable = False
            if not decodable:
                problems.append(f"{name}'s pixel data is in {syntax.name}, which this node cannot decode; "
                                "ask the sender for an uncompressed or standard JPEG/JPEG 2000/JPEG-LS/RLE syntax")
        if len(problems) >= MAX_REASONS:
            break
    return _unique(problems)


def _transfer_syntax(header: Dataset) -> UID | None:
    meta = header.__dict__.get("file_meta")
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def _uid_problems(sources: list[Dataset]) -> list[str]:
    """Results reference the source's UIDs: they must be valid DICOM UIDs (no leading zeros, at
    most 64 characters), or the results would fail validation with them."""
    problems = []
    for keyword in _REFERENCED_UIDS:
        bad = sum(1 for header in sources if not is_valid_uid(str(header.get(keyword, "") or "").strip()))
        if bad:
            problems.append(f"{bad} of {len(sources)} images have a {keyword} that is not a valid DICOM UID "
                            "(e.g. a component with a leading zero); results could not reference them")
    return problems


def _output_problems(manifest: Manifest, plan: SeriesPlan, sources: list[Dataset]) -> list[str]:
    multi_frame = any(frame.frame_number is not None for frame in plan.frames)
    if manifest.task == "denoising" and multi_frame:
        return ["a derived image series is written for single-frame images only; this series is multi-frame"]
    if manifest.segments and multi_frame and len(sources) > 1:
        return ["a SEG references single-frame images or one multi-frame image; this series has "
                f"{len(sources)} multi-frame files"]
    return []


def _one_frame_of_reference(sources: list[Dataset]) -> list[str]:
    """Every result of a volume shares one Frame of Reference with its images. The loader has
    checked the geometry is one volume, so a series whose slices carry none, several or an
    invalid one gets one: the first slice's (in volume order, what viewers show the volume
    with), else one made for the series (the same for every job on it)."""
    values = [str(header.get("FrameOfReferenceUID", "") or "").strip() for header in sources]
    if len(set(values)) == 1 and is_valid_uid(values[0]):
        return []
    chosen = values[0] if is_valid_uid(values[0]) else common.new_uid(
        "frame-of-reference", str(sources[0].SeriesInstanceUID))
    for header in sources:
        header.FrameOfReferenceUID = chosen
    used = "the first image's" if chosen == values[0] else "one made for this series"
    if not any(values):
        return [f"the series has no Frame of Reference UID; the results use {used}"]
    distinct = len(Counter(values))
    if distinct > 1:
        return [f"the series' images carry {distinct} different Frame of Reference UIDs although they form "
                f"one volume; the results use {used}"]
    return [f"the series' Frame of Reference UID is not a valid UID; the results use {used}"]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
