"""Ratings as Langfuse scores, posted to the public scores API and acknowledged; trace lookups.

The SDK's ``create_score`` queues a score and drops it after three failed attempts, without telling
the caller. A rating must not be lost, so it is posted here directly (``POST /api/public/scores``,
the API every Langfuse server version has) from the delivery thread, which retries until the server
says 2xx. The score id is the rating's key: Langfuse upserts scores by id, so a retry or a second
click updates the one score, and a changed mind (thumbs down after up) replaces it.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from ambient_tracing.backends.base import RatingRejected
from ambient_tracing.backends.rating import Rating

_REJECTED = frozenset({400, 422})  # the score itself is invalid: retrying cannot help


@dataclass(frozen=True, slots=True)
class ScoreApi:
    base_url: str
    public_key: str
    secret_key: str
    environment: str | None = None
    timeout: float = 10.0

    @property
    def _headers(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.public_key}:{self.secret_key}".encode()).decode()
        return {"Content-Type": "application/json", "Authorization": "Basic " + token}

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        """Blocking: the stored trace (``GET /api/public/traces/{id}``); None when Langfuse has not got
        it (yet). Raises when Langfuse cannot answer."""
        url = f"{self.base_url.rstrip('/')}/api/public/traces/{urllib.parse.quote(trace_id, safe='')}"
        try:
            found = self._get(url)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return found if isinstance(found, dict) else None

    def latest_trace(self, session_id: str, name: str) -> str | None:
        """Blocking: the id of the session's newest trace called ``name``; None when it has none."""
        query = urllib.parse.urlencode(
            {"sessionId": session_id, "name": name, "limit": 1, "orderBy": "timestamp.desc"}
        )
        found = self._get(f"{self.base_url.rstrip('/')}/api/public/traces?{query}")
        data = found.get("data") if isinstance(found, dict) else None
        if not data or not isinstance(data[0], dict) or not isinstance(data[0].get("id"), str):
            return None
        return str(data[0]["id"])

    def _get(self, url: str) -> Any:
        request = urllib.request.Request(url, method="GET", headers=self._headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read(1 << 20))

    def post(self, rating: Rating) -> None:
        """Blocking: store the rating as a score; raises to retry, RatingRejected when it never will."""
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/api/public/scores",
            data=json.dumps(score_body(rating, self.environment)).encode(),
            method="POST",
            headers=self._headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in _REJECTED:
                raise RatingRejected(f"Langfuse answered {exc.code}: {exc.read()[:200]!r}") from None
            raise


def score_body(rating: Rating, environment: str | None = None) -> dict[str, Any]:
    """The score: BOOLEAN ``user-feedback`` (1 = thumbs up) or CORRECTION ``user-correction``;
    on the trace when it is known, else on the session (the AG-UI thread)."""
    body: dict[str, Any] = {
        "id": rating.key,
        "name": rating.name,
        "comment": rating.comment,
        "metadata": rating.metadata or None,
        "environment": environment,
    }
    if rating.kind == "correction":
        body.update(value=rating.correction, dataType="CORRECTION")
    else:
        body.update(value=1 if rating.kind == "thumbs_up" else 0, dataType="BOOLEAN")
    if rating.trace_id:
        body["traceId"] = rating.trace_id
    else:
        body["sessionId"] = rating.thread_id
    return {key: value for key, value in body.items() if value is not None}
