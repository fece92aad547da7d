"""Rule regexes: the one place a rule's `regex = "..."` is compiled.

Rules are written by admins and dry-run by any viewer, so their regexes must be safe to run
whatever their text. Python's `re` backtracks: `(a+)+$` against 41 characters runs for minutes
and holds the GIL, freezing the DICOM listener and the web page with it. RE2 (the `google-re2`
binding) matches in time linear in the value's length, never backtracks and keeps its memory
under `max_mem`; what it cannot do in linear time (backreferences, lookaround) it refuses when
the pattern is compiled, which is when rules are checked (`rules check`, the rule editor, the
API, the node's start), so a rule that cannot run is never stored.
"""

from __future__ import annotations

import re2

MAX_PATTERN_LENGTH = 1000  # characters; real rules need tens
MAX_PATTERN_MEMORY = 1 << 20  # bytes of compiled program and match cache per pattern (RE2's default is 8 MiB)

# RE2's error text -> what the admin wrote that RE2 cannot run, in words
_UNSUPPORTED = (
    ("invalid perl operator: (?=", "lookahead (?=...) is not supported"),
    ("invalid perl operator: (?!", "negative lookahead (?!...) is not supported"),
    ("invalid perl operator: (?<=", "lookbehind (?<=...) is not supported"),
    ("invalid perl operator: (?<!", "negative lookbehind (?<!...) is not supported"),
    ("invalid perl operator: (?P", "backreferences (?P=name) are not supported"),  # (?P<name>...) itself is fine
    ("invalid perl operator: (?>", "atomic groups (?>...) are not supported"),
    ("pattern too large", "too complex: its compiled form exceeds the limit; simplify it (fewer or smaller {n} repeats)"),
    ("bad repetition operator", "nested repetition (like a{10}{10} or a**) is not supported"),
    ("invalid repetition size", "repetition counts are limited to 1000 in all"),
)
_BACKREFERENCE = tuple(f"invalid escape sequence: \\{digit}" for digit in "123456789")


class PatternError(ValueError):
    """A rule regex that cannot be used; the message says why, in words an admin can act on."""


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False  # RE2 would print the pattern to stderr for every refusal
    return options


def compile_pattern(pattern: str):
    """The compiled RE2 pattern (its `.search(text)` as in `re`), or PatternError."""
    if not isinstance(pattern, str):
        raise PatternError(f"expected a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"regular expression of {len(pattern)} characters; at most {MAX_PATTERN_LENGTH} allowed")
    try:
        return re2.compile(pattern, _options())
    except re2.error as error:
        raise PatternError(f"invalid regular expression {pattern!r}: {_explain(error)}") from None


def _explain(error: Exception) -> str:
    detail = error.args[0] if error.args else ""
    detail = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
    if detail.startswith(_BACKREFERENCE):
        return f"backreferences (\\1) are not supported ({detail}); rules use RE2 syntax, which matches in linear time"
    for prefix, meaning in _UNSUPPORTED:
        if detail.startswith(prefix):
            return f"{meaning} ({detail}); rules use RE2 syntax, which matches in linear time"
    return detail
