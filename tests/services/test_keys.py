"""The keys file and `python -m services.keys`: keys shown once and stored only salted and hashed, mode 600,
rotation with a grace period, revocation, a keys file others may write refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from services import keys
from services.keys import KeysFile, KeysFileError, Principal

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.keys", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_the_command_creates_lists_rotates_and_revokes(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = run("create", "--keys-file", str(path), "--tenant", "acme")
    assert created.returncode == 0
    key = created.stdout.strip()
    match = keys.KEY_FORMAT.match(key)
    assert match
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The secret is never written. It is URL-safe base64 and may itself contain "_", so take it from the format.
    assert match.group(2) not in path.read_text()
    listed = json.loads(run("list", "--keys-file", str(path)).stdout)
    assert [(k["tenant"], k["admin"], k["status"]) for k in listed] == [("acme", False, "valid")]
    assert not {"digest", "salt"} & set(listed[0])
    assert KeysFile(path).authenticate(key) == Principal("acme", False, listed[0]["id"])

    rotated = run("rotate", "--keys-file", str(path), "--key-id", listed[0]["id"], "--grace-s", "3600")
    new_key = rotated.stdout.strip()
    store = KeysFile(path)
    assert store.authenticate(key) is not None and store.authenticate(new_key) is not None  # both, in the grace
    assert run("revoke", "--keys-file", str(path), "--key-id", listed[0]["id"]).returncode == 0
    store = KeysFile(path)
    assert store.authenticate(key) is None and store.authenticate(new_key) is not None
    assert run("revoke", "--keys-file", str(path), "--key-id", "nope").returncode == 2
    assert run("create", "--keys-file", str(path), "--tenant", "../etc").returncode == 2  # names reach storage


def test_keys_that_are_not_exactly_right_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = keys.create(path, "acme", admin=True)
    store = KeysFile(path)
    assert store.authenticate(key) == Principal("acme", True, key.split("_")[1])
    wrong_secret = key[:-1] + ("a" if key[-1] != "a" else "b")
    unknown_id = "rk_000000000000_" + key.split("_", 2)[2]
    for bad in (wrong_secret, unknown_id, key + "x", "", "Bearer " + key, key.upper()):
        assert store.authenticate(bad) is None, bad


def test_a_keys_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys.create(path, "acme", admin=False)
    os.chmod(path, 0o666)
    with pytest.raises(KeysFileError, match="writable by group or others"):
        KeysFile(path)
