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


@pytest.mark.parametrize("override", [
    "mlflow.tracking_uri=[http://alice:hunter2@mlflow:5000]",  # a list where a string goes
    "redis.url='redis://:hunter2@h:6379/0",  # not valid YAML (an unclosed quote)
])
def test_a_config_error_quoting_an_override_masks_its_password(override):
    from learner.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_a_refused_resume_override_masks_its_password():
    """The likely case: a user re-types the tracking URI (with its credentials) they started the run with."""
    from learner.config import ConfigError
    from learner.resume import check_resume_overrides

    with pytest.raises(ConfigError, match="would change") as info:
        check_resume_overrides(["mlflow.tracking_uri=http://alice:hunter2@mlflow:5000"])
    assert "hunter2" not in str(info.value) and "alice:***@mlflow" in str(info.value)


@pytest.mark.parametrize("raw,masked", [
    ("http://host:5000/?Password=abc", "http://host:5000/?Password=***"),
    ("redis://h:6379/0?PWD=abc&db=1", "redis://h:6379/0?PWD=***&db=1"),
    ("http://host/x?a=1&pwd=a-very-long-secret-123", "http://host/x?a=1&pwd=***"),
])
def test_a_password_in_a_query_is_masked_whatever_its_name_case_or_length(raw, masked):
    """Would catch the query rule matching lower-case names only, forgetting pwd, or masking only a prefix."""
    assert redact(raw) == masked


def test_passwords_are_masked_inside_nested_configs():
    """A dumped config is a tree: every string in it, at any depth, in dicts, lists and tuples."""
    config = {"redis": {"url": "redis://:pw1@h:6379/0"}, "urls": ["http://u:pw2@h", ("http://u:pw3@h", 3)]}
    assert redact(config) == {"redis": {"url": "redis://:***@h:6379/0"},
                              "urls": ["http://u:***@h", ("http://u:***@h", 3)]}


@pytest.mark.parametrize("text,redacted", [
    ("redis://:***@h:6379/0", True),
    ("http://host:5000/?token=***", True),
    ("redis://h:6379/0", False),
    ("redis://:pw@h:6379/0", False),
    (None, False),
])
def test_a_url_whose_password_was_not_saved_is_recognised(text, redacted):
    """A resume must ask for the password of a URL saved masked, in either form. Would catch only the user-part
    form recognised (a token URL resumed with '***' as its token)."""
    from actors.redaction import is_redacted

    assert is_redacted(text) == redacted


def test_a_resume_takes_the_tracking_uris_password_only_for_the_server_it_was_saved_for(monkeypatch):
    """--resume reopens a masked MLflow URI through MLFLOW_TRACKING_URI: the one given must be the saved one with its
    password. Would catch any exported URI accepted (a shell still set up for another server: the run's metrics
    continued on a server that does not hold the run)."""
    from learner.config import ConfigError, load_config
    from learner.resume import secrets_again

    cfg = load_config(None, [])
    saved = "http://alice:***@mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2@other-mlflow:5000")
    with pytest.raises(ConfigError, match="Export MLFLOW_TRACKING_URI") as info:
        secrets_again(cfg, saved, "runs/r")
    assert "hunter2" not in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2@mlflow:5000")
    assert secrets_again(cfg, saved, "runs/r") == "http://alice:hunter2@mlflow:5000"
    assert secrets_again(cfg, "sqlite:///m.db", "runs/r") == "sqlite:///m.db"  # nothing masked: kept as saved
