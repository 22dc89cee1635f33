from pathlib import Path

import pytest
from pydantic import ValidationError

from budgetwarden.app._config import Settings, load_settings

CONFIGURATION_DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


def test_defaults() -> None:
    settings = load_settings()
    assert settings.listen == "127.0.0.1:50151"
    assert settings.redis_url is None
    assert settings.fail_mode == "closed"


def test_flags_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("listen: 127.0.0.1:1111\nfail_mode: open\ncheck_deadline_ms: 10\nlog_level: DEBUG\n")
    monkeypatch.setenv("BUDGETWARDEN_CHECK_DEADLINE_MS", "20")
    monkeypatch.setenv("BUDGETWARDEN_LISTEN", "127.0.0.1:2222")
    settings = load_settings(config, listen="127.0.0.1:3333", log_level=None)
    assert settings.listen == "127.0.0.1:3333"  # flag
    assert settings.check_deadline_ms == 20  # environment over file
    assert settings.fail_mode == "open"  # file over default
    assert settings.log_level == "DEBUG"  # an unset flag does not override


def test_invalid_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETWARDEN_CHECK_DEADLINE_MS", "0")
    with pytest.raises(ValidationError, match="check_deadline_ms"):
        load_settings()


def test_unknown_key_in_the_file_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("listn: 127.0.0.1:1\n")
    with pytest.raises(ValidationError, match="listn"):
        load_settings(config)


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_configuration_doc_documents_every_setting(name: str) -> None:
    assert f"`--{name.replace('_', '-')}`" in CONFIGURATION_DOC
    assert f"`BUDGETWARDEN_{name.upper()}`" in CONFIGURATION_DOC


@pytest.mark.parametrize(
    ("settings", "named", "message"),
    [
        ({"redis_tls_ca_file": "README.md", "redis_url": "redis://h:6379/0"}, "redis_tls_ca_file", "rediss://"),
        ({"redis_tls_cert_file": "README.md", "redis_url": "rediss://h:6379/0"}, "redis_tls_key_file", "together"),
        (
            {"redis_password": "p", "redis_password_file": "README.md", "redis_url": "redis://h"},
            "redis_password_file",
            "not both",
        ),
        ({"redis_username": "u"}, "redis_username", "needs a redis_url"),
        ({"tls_cert_file": "README.md"}, "tls_key_file", "together"),
        ({"tls_client_ca_file": "README.md"}, "tls_client_ca_file", "needs tls_cert_file"),
        ({"tls_cert_file": "no-such.pem", "tls_key_file": "README.md"}, "tls_cert_file", "does not point to a file"),
    ],
)
def test_tls_and_credential_settings_that_do_not_go_together_are_refused_naming_the_setting(
    settings: dict[str, str], named: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    with pytest.raises(ValidationError) as refused:
        Settings(**settings)
    assert named in str(refused.value)
    assert message in str(refused.value)


def test_the_redis_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(redis_url="redis://h:6379/0", redis_password="hunter2")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())
