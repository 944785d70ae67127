"""The registry's notification format, pure: what a receiver of distribution's webhooks
parses works here (an envelope `{"events": [...]}`, media type EVENTS_MEDIA_TYPE). The mirror's
actions beyond distribution's `pull` are named in config.WEBHOOK_EVENTS; a receiver that
switches on `action` ignores those it does not know."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
SIGNATURE_HEADER = "X-Mirror-Signature-256"  # "sha256=<hex HMAC of the body>"
Event = dict[str, Any]


def timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def event(action: str, now: float, *, target: Mapping[str, Any] | None = None,
          request: Mapping[str, Any] | None = None, actor: str | None = None,
          source: Mapping[str, Any] | None = None, **extra: Any) -> Event:
    """One event: `extra` holds the mirror's own fields (upstream, error, reason)."""
    return {
        "id": uuid.uuid4().hex, "timestamp": timestamp(now), "action": action,
        "target": {k: v for k, v in (target or {}).items() if v is not None},
        "request": dict(request or {}),
        "actor": {"name": actor} if actor else {},
        "source": dict(source or {}),
        **{k: v for k, v in extra.items() if v is not None},
    }


def encode(one: Event) -> bytes:
    return json.dumps(one, separators=(",", ":")).encode()


def envelope(encoded: Sequence[bytes]) -> bytes:
    """The body of one POST, from events as `encode` gave them (queued that way)."""
    return b'{"events":[' + b",".join(encoded) + b"]}"


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """What a receiver does with SIGNATURE_HEADER (the tests' receiver uses it)."""
    return hmac.compare_digest(signature(secret, body), header)
