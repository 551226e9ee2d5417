"""Passwords in URLs are masked wherever a config or an error is written; a URL's user part ends at its last '@'
(as urllib and redis-py split it), so a password holding '@' must be masked whole."""

import pytest

from actors.redaction import redact


@pytest.mark.parametrize("raw,masked", [
    ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
    ("http://alice:s3cret@127.0.0.1:5000 and redis://:x@h:1", "http://alice:***@127.0.0.1:5000 and redis://:***@h:1"),
    ("postgresql://u:a:b@db/mlflow", "postgresql://u:***@db/mlflow"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://host:5000/path?token=abc&x=1", "http://host:5000/path?token=***&x=1"),
])
def test_the_whole_password_is_masked(raw, masked):
    assert redact(raw) == masked
