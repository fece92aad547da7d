"""Which peers may open an association: calling AE title, optionally pinned to a host."""

from __future__ import annotations

from dicom_ai_node.config import AllowedCaller


def is_allowed(callers: tuple[AllowedCaller, ...], allow_any: bool, ae_title: str, host: str) -> bool:
    if allow_any:
        return True
    ae_title = ae_title.strip()
    return any(caller.ae_title.strip() == ae_title and (caller.host in (None, "", host))
               for caller in callers)
