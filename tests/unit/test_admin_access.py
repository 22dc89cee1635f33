"""The admin tokens file (issue 14) without a server: what it accepts, what it refuses (naming the field), how a
token and a certificate name are matched."""

from __future__ import annotations

from pathlib import Path

import pytest

from budgetwarden.transport import AccessFile, AccessFileError, Role, new_token, token_digest


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    return path


def test_tokens_and_clients_give_identities_with_role_and_tenants(tmp_path: Path) -> None:
    token = new_token()
    access = AccessFile(
        write(
            tmp_path,
            f"tokens:\n  - {{name: alice, sha256: {token_digest(token).upper()}, role: approver, tenants: [acme]}}\n"
            "clients:\n  - {name: bot, san: 'spiffe://x/bot', role: admin, tenants: '*'}\n",
        )
    )
    alice = access.by_token(token)
    assert alice is not None
    assert (alice.name, alice.role, alice.via) == ("alice", Role.APPROVER, "token")
    assert alice.may_act_on("acme")
    assert not alice.may_act_on("globex")
    assert access.by_token(token + "x") is None
    bot = access.by_certificate(["bot.example", "spiffe://x/bot"])
    assert bot is not None
    assert (bot.role, bot.via, bot.may_act_on("anyone")) == (Role.ADMIN, "certificate", True)
    assert access.by_certificate(["spiffe://x/bot2"]) is None


def test_json_is_accepted_and_an_empty_file_names_nobody(tmp_path: Path) -> None:
    assert AccessFile(write(tmp_path, '{"tokens": []}')).by_token("t") is None
    assert AccessFile(write(tmp_path, "")).by_certificate(["a"]) is None


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("tokens:\n  - {name: a, sha256: abc, role: admin, tenants: '*'}\n", "tokens.0.sha256"),
        ("tokens:\n  - {name: a, sha256: " + "0" * 64 + ", role: root, tenants: '*'}\n", "tokens.0.role"),
        ("tokens:\n  - {name: a, sha256: " + "0" * 64 + ", role: admin, tenants: []}\n", "tokens.0.tenants"),
        ("tokens:\n  - {name: a, sha256: " + "0" * 64 + ", role: admin, tenants: all}\n", "tokens.0.tenants"),
        ("clients:\n  - {name: a, role: admin, tenants: '*'}\n", "clients.0.san"),
        ("token: []\n", "token"),
        ("tokens: [\n", "cannot read"),
    ],
)
def test_a_bad_file_is_refused_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(AccessFileError, match=field.replace(".", r"\.")):
        AccessFile(write(tmp_path, text))
