"""Load what highdicom loads lazily, once, when the node starts.

highdicom reads the standard's IOD/module tables (JSON, ~0.3-0.5 s) the first time a SEG or
SR is built; without this the first study after every restart would pay for it. The module
is private to highdicom: if it moves, the node builds the same results, only that bit slower.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def warm_up() -> None:
    try:
        from highdicom import _standard_utils

        _standard_utils.get_sop_class_iod_map()
        _standard_utils.get_iod_module_map()
        _standard_utils.get_module_attribute_map()
        from dicom_ai_node.results.conform import copied_tags

        copied_tags()  # the module trees the fitness check and the results' conform step walk
    except Exception as error:  # only a speed-up; results are built the same without it
        log.debug("highdicom warm-up skipped: %s", error)
