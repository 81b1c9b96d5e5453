"""Per-tenant API keys: a keys file every server reads (`--keys-file`), and the command that manages it.

    python -m services.keys create --keys-file PATH --tenant NAME [--admin]   # prints the new key, once
    python -m services.keys list   --keys-file PATH
    python -m services.keys rotate --keys-file PATH --key-id ID [--grace-s 86400]  # new key; the old one
                                                                                  # stays valid for the grace
    python -m services.keys revoke --keys-file PATH --key-id ID

A key is `rk_<id>_<secret>`: the id names its record, the secret (256 random bits) is stored only as a salted
SHA-256 and compared in constant time. A slow password hash buys nothing for a random 256-bit secret and would
cost every call; the salt keeps equal secrets from showing. The file is JSON, written atomically with mode 600;
a server refuses a keys file that others may write, warns when others may read it, and reads it again when it
changes (create, rotate and revoke take effect within a second, no restart).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from common.names import NameInvalid, check_tenant_name

log = logging.getLogger(__name__)

KEY_FORMAT = re.compile(r"^rk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
DEFAULT_GRACE_S = 24 * 3600.0
RELOAD_CHECK_S = 1.0


class KeysFileError(ValueError):
    """A keys file that cannot be used (unreadable, not ours, writable by others), or a bad command."""


@dataclass(frozen=True)
class Principal:
    """Who a call is from: a tenant, and whether the key may manage keys and any tenant's resources."""

    tenant: str
    admin: bool = False
    key_id: str = ""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    admin: bool
    salt: str
    digest: str  # sha256(salt + secret), hex
    created: float
    expires: float | None = None  # set by rotate: the old key's grace period ends here
    revoked: bool = False

    def valid(self, now: float) -> bool:
        return not self.revoked and (self.expires is None or now < self.expires)


def validate_tenant(name: str) -> str:
    """The tenant name rule lives in common.names (shared with the adapters root and the tenant registry)."""
    try:
        return check_tenant_name(name)
    except NameInvalid as exc:
        raise KeysFileError(str(exc)) from None


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def new_key(tenant: str, admin: bool) -> tuple[KeyRecord, str]:
    """A record to store and the key to hand out (shown once)."""
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    record = KeyRecord(key_id, validate_tenant(tenant), admin, salt, _digest(salt, secret), time.time())
    return record, f"rk_{key_id}_{secret}"


def check_permissions(path: Path) -> None:
    """Refuse a keys file others may write (they could add keys); warn when others may read it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KeysFileError(f"keys file {path} is writable by group or others (mode {mode & 0o777:o}); chmod 600 it")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("keys file %s is readable by group or others (mode %o); chmod 600 it", path, mode & 0o777)


def read_records(path: Path) -> dict[str, KeyRecord]:
    if not path.exists():
        return {}
    check_permissions(path)
    try:
        data = json.loads(path.read_text())
        return {r["id"]: KeyRecord(**r) for r in data["keys"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeysFileError(f"keys file {path} cannot be read: {type(exc).__name__}") from None


def write_records(path: Path, records: dict[str, KeyRecord]) -> None:
    """Atomically, mode 600 from the start (the temporary file is never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": 1, "keys": [asdict(r) for r in records.values()]}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class KeysFile:
    """The keys a server accepts, from a file it re-reads when the file changes (checked at most once a second)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise KeysFileError(f"keys file {self.path} does not exist (create keys with python -m services.keys)")
        self._lock = threading.Lock()
        self._records = read_records(self.path)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None (malformed, unknown, revoked or expired)."""
        match = KEY_FORMAT.match(key)
        if match is None:
            return None
        record = self._current().get(match.group(1))
        if record is None:
            return None
        if not hmac.compare_digest(record.digest, _digest(record.salt, match.group(2))):
            return None
        return Principal(record.tenant, record.admin, record.id) if record.valid(time.time()) else None

    def _current(self) -> dict[str, KeyRecord]:
        with self._lock:
            if time.monotonic() - self._checked >= RELOAD_CHECK_S:
                self._checked = time.monotonic()
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    try:
                        self._records = read_records(self.path)
                        log.info("keys file %s reloaded: %d keys", self.path, len(self._records))
                    except KeysFileError as exc:  # a bad edit: keep the keys we had, and say so
                        log.error("keys file not reloaded, the previous keys stay: %s", exc)
                    self._stamp = stamp
            return self._records

    def _file_stamp(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino


# ---- the command ----------------------------------------------------------------------------------------


def create(path: Path, tenant: str, admin: bool) -> str:
    records = read_records(path)
    record, key = new_key(tenant, admin)
    records[record.id] = record
    write_records(path, records)
    return key


def rotate(path: Path, key_id: str, grace_s: float) -> str:
    records = read_records(path)
    old = _existing(records, key_id)
    record, key = new_key(old.tenant, old.admin)
    records[key_id] = replace(old, expires=min(old.expires or float("inf"), time.time() + grace_s))
    records[record.id] = record
    write_records(path, records)
    return key


def revoke(path: Path, key_id: str) -> None:
    records = read_records(path)
    records[key_id] = replace(_existing(records, key_id), revoked=True)
    write_records(path, records)


def listing(path: Path) -> list[dict[str, object]]:
    """What `list` shows: never a digest or a salt."""
    now = time.time()
    return [{"id": r.id, "tenant": r.tenant, "admin": r.admin, "created": _iso(r.created),
             "expires": _iso(r.expires) if r.expires else None,
             "status": "revoked" if r.revoked else "valid" if r.valid(now) else "expired"}
            for r in read_records(path).values()]


def _existing(records: dict[str, KeyRecord], key_id: str) -> KeyRecord:
    if key_id not in records:
        raise KeysFileError(f"no key with id {key_id!r}")
    return records[key_id]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("create", "list", "rotate", "revoke"):
        p = sub.add_parser(name)
        p.add_argument("--keys-file", type=Path, required=True)
        if name == "create":
            p.add_argument("--tenant", required=True)
            p.add_argument("--admin", action="store_true", help="may manage adapters and address any tenant")
        if name in ("rotate", "revoke"):
            p.add_argument("--key-id", required=True)
        if name == "rotate":
            p.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S,
                           help="seconds the old key stays valid beside the new one")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            print(create(args.keys_file, args.tenant, args.admin))
        elif args.command == "rotate":
            print(rotate(args.keys_file, args.key_id, args.grace_s))
        elif args.command == "revoke":
            revoke(args.keys_file, args.key_id)
            print(f"revoked {args.key_id}")
        else:
            print(json.dumps(listing(args.keys_file), indent=2))
    except KeysFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
