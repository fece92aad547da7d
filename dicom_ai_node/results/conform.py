"""What a result copies from its source, made valid for the result's IOD.

Be liberal in what you store, strict in what you send: a source may hold values its VR does
not allow (a DS of 20 characters, "Chest" in a CS, a PN with six components), sequence items
without their Type 1 attributes (a Referenced Study Sequence item with no SOP Class), or no
Type 2 attributes at all (no PatientBirthDate). The node stores such files as received; what
it writes must pass dciodvfy whatever the source held. Two steps, both reporting each change
in one sentence (no values: they may be patient data):

- ``conform_source``, before encoding: the patient and study modules that every result copies
  (highdicom copies them from a source image), with its Specific Character Set, made valid on
  the job's in-memory header (the file is never touched);
- ``conform_result``, after encoding: every value of the result checked against its VR and the
  sequences of its IOD's modules against their Type 1 and Type 2 attributes (highdicom's table
  of the standard): a value that can be mended is, an item that cannot be is dropped, a
  missing Type 2 attribute is added empty.
"""

from __future__ import annotations

import re
from functools import lru_cache

from highdicom._standard_utils import (  # the standard's module tables, as highdicom ships them
    AttributeTypeValues,
    construct_module_tree,
    get_iod_module_map,
    get_sop_class_iod_map,
)
from pydicom import config
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import format_number_as_ds, validate_value

# Modules every result copies from its source (highdicom's copy_patient_and_study_information).
COPIED_MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study")
# What a result built wholly from a source header (a derived image) is walked for, all its
# modules but these: content trees and functional groups hold alternatives (one of several
# Type 1 macros) the table cannot tell apart, and the node builds them itself.
NOT_WALKED = ("sr-document-content", "functional-groups", "key-object-document")
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"}
_NUMERIC_VRS = {"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV", "AT"}
_TEXT_LIMITS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": None, "UT": None}
_CS_INVALID = re.compile(r"[^A-Z0-9 _]")
_DATE_SEPARATORS = re.compile(r"[-./]")
# Enumerated values dciodvfy checks where sources are often sloppy: anything else is left empty.
_ENUMERATED = {"PatientSex": {"M", "F", "O"}}
_TYPE2 = {AttributeTypeValues.REQUIRED_EMPTY_IF_UNKNOWN}
DEIDENTIFICATION_NOT_STATED = "not stated by the source"


@lru_cache(maxsize=1)
def copied_keywords() -> frozenset[str]:
    """The top-level keywords of the modules every result copies from its source."""
    return frozenset(keyword for module in COPIED_MODULES for keyword in _module_tree(module)["attributes"])


@lru_cache(maxsize=1)
def copied_tags() -> tuple[int, ...]:
    """The tags conform_source may change: the copied modules' and the character set."""
    return tuple(sorted({0x00080005, *(tag_for_keyword(k) for k in copied_keywords() if tag_for_keyword(k))}))


def conform_source(header: Dataset) -> list[str]:
    """Make the copied modules of one source header valid, in place; the changes made."""
    changes = _conform_charset(header, code_extensions_to_utf8=False)
    for keyword in sorted(copied_keywords()):
        if keyword in header:
            changes += _conform_element(header, header.data_element(keyword), "")
    for module in COPIED_MODULES:
        changes += _conform_module(header, _module_tree(module), add_type2=module in ("patient", "general-study"),
                                   where="")
    return changes + _conform_conditions(header)


def conform_result(dataset: Dataset, copied_whole: bool = False) -> list[str]:
    """Make a result valid for the IOD of its SOP Class, in place; the changes made.

    Every value is checked against its VR. The modules checked for Type 1 and 2 are those it
    copied from its source: the patient and study modules (SEG, SR, SC and KOS, which
    highdicom builds), or, when ``copied_whole`` (a derived image: a copy of its source
    header), all its modules but those the node builds itself (NOT_WALKED)."""
    changes = _conform_charset(dataset, code_extensions_to_utf8=True)
    changes += conform_values(dataset)
    iod = get_sop_class_iod_map().get(str(dataset.get("SOPClassUID", "")))
    if iod is None:
        return changes
    for entry in get_iod_module_map()[iod]:
        module = entry["key"]
        if (module not in COPIED_MODULES and not copied_whole) or any(part in module for part in NOT_WALKED):
            continue
        changes += _conform_module(dataset, _module_tree(module), add_type2=entry["usage"] == "M", where="")
    return changes + _conform_conditions(dataset)


def conform_values(dataset: Dataset, where: str = "") -> list[str]:
    """Every value of ``dataset`` (items of sequences too) valid for its VR, in place."""
    changes = []
    for tag in list(dataset.keys()):
        if tag.group in (0x0002, 0x7FE0) or tag == 0xFFFAFFFA:
            continue
        try:
            element = dataset[tag]
        except Exception:  # cannot even be read: it cannot be written validly either
            del dataset[tag]
            changes.append(f"{where}{_name(tag)} could not be read and was left out")
            continue
        if element.VR == "SQ":
            for number, item in enumerate(element.value, start=1):
                changes += conform_values(item, f"{where}{_name(tag)} item {number}: ")
            continue
        changes += _conform_element(dataset, element, where)
    return changes


# --- one element ------------------------------------------------------------------------


def _conform_element(dataset: Dataset, element: DataElement, where: str) -> list[str]:
    name = f"{where}{_name(element.tag)}"
    vr = element.VR
    value = element.value
    if vr == "SQ" or vr in _BINARY_VRS or element.is_empty:
        return []
    if isinstance(value, (bytes, bytearray)):  # kept as bytes: wrong length or undecodable
        del dataset[element.tag]
        return [f"{name} could not be read as {vr} and was left out"]
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    if vr in _NUMERIC_VRS:
        return []
    mended, changed = [], False
    for item in values:
        fixed = _mended(vr, item)
        if fixed is None:
            changed = True
            continue
        changed |= fixed != str(item)
        mended.append(fixed)
    allowed = _ENUMERATED.get(element.keyword)
    if allowed is not None and any(item not in allowed for item in mended):
        mended, changed = [], True
    if not changed:
        return []
    if mended:
        element.value = mended if len(mended) > 1 else mended[0]
        return [f"{name} was not valid for its VR {vr} and was mended"]
    # empty ("unknown"): what Type 2 and 3 allow; an item whose Type 1 it was is then dropped
    element.value = None
    return [f"{name} was not valid for its VR {vr} and was emptied"]


def _mended(vr: str, value) -> str | None:
    """``value`` as a valid string of ``vr`` (itself when valid), or None when it cannot be."""
    text = str(value)
    if vr == "PN":
        text = _mended_person_name(text)
    elif vr == "DS":
        if _valid(vr, text):
            return text
        try:
            return format_number_as_ds(float(text.strip()))
        except (TypeError, ValueError):
            return None
    elif vr == "IS":
        if _valid(vr, text):
            return text
        try:
            number = float(text.strip())
        except ValueError:
            return None
        return str(int(number)) if number.is_integer() and abs(number) < 2**31 else None
    elif vr == "CS":
        text = _CS_INVALID.sub("_", text.strip().upper())[:16]
    elif vr == "DA":
        text = _DATE_SEPARATORS.sub("", text.strip())
    elif vr == "TM":
        text = text.strip().replace(":", "")
    elif vr == "UI":
        text = text.strip().rstrip("\x00")
    elif vr in _TEXT_LIMITS:
        limit = _TEXT_LIMITS[vr]
        text = "".join(ch for ch in text if ch >= " " or ch in "\t\r\n\f\x1b")
        text = text[:limit] if limit else text
        if vr in ("AE", "SH", "LO"):
            text = text.replace("\\", "/")
    return text if _valid(vr, text) else None


def _mended_person_name(text: str) -> str:
    """At most five components per group (family^given^middle^prefix^suffix), no trailing
    empty ones: "Doe^John^^^^" -> "Doe^John"; extra components join the last one."""
    groups = []
    for group in text.split("=")[:3]:
        parts = group.rstrip().split("^")
        if len(parts) > 5:
            parts = [*parts[:4], " ".join(p for p in parts[4:] if p)]
        while parts and not parts[-1].strip():
            parts.pop()
        groups.append("^".join(parts)[:64])
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _valid(vr: str, text: str) -> bool:
    try:
        validate_value(vr, text, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _conform_charset(dataset: Dataset, code_extensions_to_utf8: bool) -> list[str]:
    """A Specific Character Set highdicom and every reader accept, meaning what the source
    meant: an empty first value with code extensions is the default repertoire "ISO 2022 IR 6";
    a term nobody knows becomes UTF-8 (pydicom decodes with its fallback).

    ``code_extensions_to_utf8`` (a result): code extensions (ISO 2022, e.g. Japanese "ISO 2022
    IR 87") become UTF-8, "ISO_IR 192": the same characters, which OHIF (dcmjs) can read, while
    it refuses to open an object with more than one character set ("Using multiple character
    sets is not supported"). Whenever the set changes, every value is decoded first with the
    old one: pydicom decodes lazily, and would read the old bytes in the new set."""
    if "SpecificCharacterSet" not in dataset:
        return []
    value = dataset.SpecificCharacterSet
    terms = [str(term).strip().upper() for term in (value if isinstance(value, MultiValue) else [value])]
    if len(terms) > 1 and not terms[0]:
        terms[0] = "ISO 2022 IR 6"
    if not any(terms):
        del dataset.SpecificCharacterSet
        return []
    if any(term not in python_encoding for term in terms):
        decode_all(dataset)
        dataset.SpecificCharacterSet = "ISO_IR 192"
        return ["SpecificCharacterSet named a character set nobody knows; the result is written in UTF-8"]
    if code_extensions_to_utf8 and len(terms) > 1:
        decode_all(dataset)
        dataset.SpecificCharacterSet = "ISO_IR 192"
        return [f"SpecificCharacterSet {' / '.join(terms)} (code extensions) is written as UTF-8 (ISO_IR 192), "
                "the same characters, which every viewer reads"]
    original = list(value) if isinstance(value, MultiValue) else [value]
    if terms != original:
        dataset.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
        return ["SpecificCharacterSet was written in a non-standard form and was mended"]
    return []


def decode_all(dataset: Dataset) -> None:
    """Every element read from its bytes now, with the data set's present character set."""
    for _ in dataset.iterall():
        pass


# --- conditions (Type 1C) that real sources break --------------------------------------


def _conform_conditions(dataset: Dataset) -> list[str]:
    """The Type 1C conditions of the copied modules that real sources were seen to break (the
    module tables above cannot express conditions). Each mended without inventing a fact.

    Patient module: PatientIdentityRemoved YES needs DeidentificationMethod or its code
    sequence (NSCLC-Radiomics LUNG1-001 has neither): the flag is kept, and the method says
    that the source did not state it."""
    changes = []
    if (str(dataset.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
            and not dataset.get("DeidentificationMethod") and not dataset.get("DeidentificationMethodCodeSequence")):
        dataset.DeidentificationMethod = DEIDENTIFICATION_NOT_STATED
        changes.append("PatientIdentityRemoved is YES without a de-identification method; the method is "
                       "given as not stated by the source")
    return changes


# --- modules: Type 1 and Type 2 ---------------------------------------------------------


@lru_cache(maxsize=None)
def _module_tree(module: str) -> dict:
    return construct_module_tree(module)


def _conform_module(dataset: Dataset, tree: dict, add_type2: bool, where: str) -> list[str]:
    """The module's attributes in ``dataset``: items of its sequences that lack a Type 1
    attribute are dropped, their missing Type 2 attributes added empty (the module's own
    top-level Type 2 attributes too, when ``add_type2``: a mandatory module); a sequence left
    empty is removed unless it is Type 1 or 2."""
    changes = []
    for keyword, spec in tree.get("attributes", {}).items():
        kind = spec["type"]
        if keyword not in dataset:
            if add_type2 and kind in _TYPE2:
                setattr(dataset, keyword, None if keyword not in _SEQUENCE_KEYWORDS else Sequence())
                changes.append(f"{where}{keyword} was missing and was added empty")
            continue
        element = dataset.data_element(keyword)
        if kind is AttributeTypeValues.REQUIRED and element.VR != "SQ" and element.is_empty and not where:
            continue  # a top-level Type 1 the node sets itself; never made up here
        if element.VR != "SQ" or "attributes" not in spec:
            continue
        kept = []
        for number, item in enumerate(element.value, start=1):
            label = f"{where}{keyword} item {number}"
            missing = _missing_type1(item, spec["attributes"])
            if missing:
                changes.append(f"{label} lacked Type 1 {', '.join(missing)} and was left out")
                continue
            changes += _conform_module(item, spec, add_type2=True, where=f"{label}: ")
            kept.append(item)
        if len(kept) != len(element.value):
            if kept or kind in (AttributeTypeValues.REQUIRED, AttributeTypeValues.REQUIRED_EMPTY_IF_UNKNOWN):
                element.value = kept
            else:
                del dataset[keyword]
    return changes


def _missing_type1(item: Dataset, attributes: dict) -> list[str]:
    missing = []
    for keyword, spec in attributes.items():
        if spec["type"] is not AttributeTypeValues.REQUIRED:
            continue
        if keyword not in item or item.data_element(keyword).is_empty:
            missing.append(keyword)
    return missing


class _SequenceKeywords:
    """Keywords whose VR is SQ (an empty Type 2 sequence is written as an empty Sequence)."""

    def __contains__(self, keyword: str) -> bool:
        tag = tag_for_keyword(keyword)
        return tag is not None and dictionary_VR(tag) == "SQ"


_SEQUENCE_KEYWORDS = _SequenceKeywords()


def _name(tag) -> str:
    return keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"
