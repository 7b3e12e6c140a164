"""A user's rating of a run, as every :class:`~ambient_tracing.backends.base.RatingSink` receives
it, and as the feedback queue stores it (JSON). Parsing a browser's body into one is
:mod:`ambient_tracing.feedback.ratings`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

RatingKind = Literal["thumbs_up", "thumbs_down", "correction"]
KINDS: tuple[RatingKind, ...] = ("thumbs_up", "thumbs_down", "correction")
#: The score (Langfuse) / assessment (MLflow) names, as the origin runner named its score.
FEEDBACK_NAME = "user-feedback"
CORRECTION_NAME = "user-correction"


@dataclass(frozen=True, slots=True)
class Rating:
    """One rating, ready to record. ``trace_id`` is bare 32 hex, None when not known (yet)."""

    kind: RatingKind
    thread_id: str | None
    trace_id: str | None
    user_id: str | None
    message_id: str | None
    comment: str | None
    correction: str | None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The score / assessment name: thumbs share one, so a changed mind replaces the rating."""
        return CORRECTION_NAME if self.kind == "correction" else FEEDBACK_NAME

    @property
    def value(self) -> bool | str:
        """True/False for thumbs up/down; the corrected answer for a correction."""
        if self.kind == "correction":
            return self.correction or ""
        return self.kind == "thumbs_up"

    @property
    def key(self) -> str:
        """Same (trace or session, message, user, name) -> same key: a retry or a second click updates."""
        target = self.trace_id or f"session:{self.thread_id}"
        raw = "\x1f".join((target, self.message_id or "", self.user_id or "", self.name))
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def with_trace(self, trace_id: str | None) -> Rating:
        return replace(self, trace_id=trace_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str | bytes) -> Rating:
        """A rating stored by :meth:`to_json`; ValueError (never the text) for anything else."""
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(data, dict) or data.get("kind") not in KINDS:
            raise ValueError("not a rating")
        fields = {key: data.get(key) for key in cls.__slots__ if key in data}
        for key, value in fields.items():
            wanted = _FIELD_TYPES.get(key, str)
            if value is not None and not isinstance(value, wanted):
                raise ValueError(f"rating field {key} has the wrong type")
        metadata = fields.get("metadata") or {}
        if not all(isinstance(value, str) for value in metadata.values()):
            raise ValueError("rating metadata must be text")
        return cls(**fields)  # type: ignore[arg-type]  # checked just above


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"metadata": dict}
