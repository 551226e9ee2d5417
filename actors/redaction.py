"""Secrets out of everything the project writes or prints: `redact` masks the password in any URL it finds.

A Redis or MLflow URL may carry a password (redis://:pw@host, http://user:pw@host, ?password=pw). Every dump point
passes what it writes through `redact`: the run's config.yaml, MLflow params and its config.yaml artifact,
run.json, summary.json, and the messages of errors that quote a URL. Lives in actors/ so both the actors (stream
errors) and the learner (dumps) can use the one function.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:@/\s]*):(?P<secret>[^/\s]+)@")
_QUERY = re.compile(r"(?P<head>[?&](?:password|pwd|token)=)(?P<secret>[^&#\s]+)", re.IGNORECASE)


def redact(data: Any) -> Any:
    """`data` (a string, or dicts/lists/tuples of them) with every URL password replaced by ***."""
    if isinstance(data, str):
        return _QUERY.sub(rf"\g<head>{MASK}", _USERINFO.sub(rf"\g<head>:{MASK}@", data))
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact(v) for v in data)
    return data


def is_redacted(text: str | None) -> bool:
    """Whether `text` is a URL `redact` changed: its password was not saved and must be given again."""
    return text is not None and redact(text) == text and (f":{MASK}@" in text or f"={MASK}" in text)
