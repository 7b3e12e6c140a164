"""The runner's privacy mask, applied by the core to inputs and outputs for every backend."""

from __future__ import annotations

from typing import Any

REDACTED = "[REDACTED FOR PRIVACY]"
# Strings up to this length (ids, short labels, "ok") stay readable; longer ones are content.
MAX_VISIBLE_CHARS = 50


def mask(value: Any) -> Any:
    """Replace every string longer than 50 characters, at any depth, with ``[REDACTED FOR PRIVACY]``."""
    if isinstance(value, str):
        return REDACTED if len(value) > MAX_VISIBLE_CHARS else value
    if isinstance(value, dict):
        return {key: mask(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask(item) for item in value]
    return value
