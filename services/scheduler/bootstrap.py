"""First credentials of a fresh cluster, written to files (never to a command line).

    python -m services.scheduler.bootstrap --etcd HOST:PORT --etcd-ca CA --etcd-cert CRT --etcd-key KEY \
        --token-file PATH [--secret-file PATH]

``--token-file``: an operator admin token. When the file already holds a token that etcd
still knows, it is kept; otherwise a new operator token is stored in etcd (as its SHA-256,
``services.scheduler.access``) and written to the file, readable by its owner only. The
token id (not the token) is printed. Use the file with ``snapwake --token-file PATH`` or
``SNAPWAKE_TOKEN_FILE``, then make tenant tokens with ``snapwake token create``.

``--secret-file``: the API-key secret (32 random bytes, base64) shared by the scheduler and the
gateways (their ``api_key_secret_file``); created only when absent.

``make run`` (``snapwake.devcluster``) runs this before it starts the scheduler.

``--generate``: writes a fresh operator token to ``--token-file`` (when the file is absent),
and the API-key secret with ``--secret-file``, without reaching etcd. The scheduler registers
such files itself at start-up (its ``admin_token_files``, ``register_operator_token``): how the
compose cluster and Kubernetes (a Secret) get their first token without a step that writes
etcd. Revoking a token registered that way lasts until a scheduler restarts with the file
still listed: remove it from ``admin_token_files`` (the Secret) too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from snapwake import credentials, keys
from snapwake.etcd import Etcd, EtcdClient, EtcdTls
from snapwake.v1.scheduler_pb2 import AdminToken

__all__ = ["ensure_operator_token", "ensure_secret", "main", "read_token_file", "register_operator_token"]


def _write_private(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` with mode 0600 from the start (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    tmp.replace(path)


def ensure_secret(path: Path) -> bool:
    """Creates the API-key secret file unless it exists; True when it was created."""
    if path.exists():
        return False
    _write_private(path, base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    return True


async def ensure_operator_token(etcd: Etcd, path: Path, description: str, held: str = "") -> tuple[str, bool]:
    """The id of the operator token kept in ``path`` (``held``: what the file holds now), and
    whether it was created now."""
    if held:
        cred = credentials.parse(held, credentials.TOKEN_PREFIX)
        if cred is not None:
            entry = await etcd.get(keys.admin_token_key(cred.id), AdminToken)
            if entry is not None and credentials.matches(entry.value.sha256,  # type: ignore[attr-defined]
                                                         credentials.sha256_digest(cred.text)):
                return cred.id, False
    cred = credentials.new_credential(credentials.TOKEN_PREFIX)
    now = Timestamp()
    now.FromDatetime(datetime.now(UTC))
    token = AdminToken(id=cred.id, operator=True, sha256=credentials.sha256_digest(cred.text),
                       description=description, create_time=now)
    if not await etcd.create(keys.admin_token_key(cred.id), token):
        raise RuntimeError("token id collided; run again")
    _write_private(path, cred.text)
    return cred.id, True


def read_token_file(path: str | Path) -> credentials.Credential:
    """The admin token in ``path``; ValueError naming the file (never its content)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    cred = credentials.parse(text, credentials.TOKEN_PREFIX)
    if cred is None:
        raise ValueError(f"{path} holds no admin token ({credentials.TOKEN_PREFIX}<id>-<secret>; "
                         "python -m services.scheduler.bootstrap --generate --token-file PATH makes one)")
    return cred


async def register_operator_token(etcd: EtcdClient, cred: credentials.Credential, description: str) -> bool:
    """Stores ``cred`` as an operator token (its SHA-256) unless etcd holds it already; True
    when it was stored now. ValueError when its id is another token's."""
    digest = credentials.sha256_digest(cred.text)
    entry = await etcd.get(keys.admin_token_key(cred.id), AdminToken)
    if entry is None:
        now = Timestamp()
        now.FromDatetime(datetime.now(UTC))
        token = AdminToken(id=cred.id, operator=True, sha256=digest, description=description, create_time=now)
        if await etcd.create(keys.admin_token_key(cred.id), token):
            return True
        entry = await etcd.get(keys.admin_token_key(cred.id), AdminToken)  # another replica, just now
    if entry is None or not credentials.matches(entry.value.sha256, digest):  # type: ignore[attr-defined]
        raise ValueError(f"admin token id {cred.id} belongs to another token in etcd")
    return False


def _generate(opts: argparse.Namespace) -> None:
    if opts.secret_file is not None and ensure_secret(opts.secret_file):
        print(f"API-key secret written to {opts.secret_file}")
    if opts.token_file.exists():
        print(f"{opts.token_file} exists; kept")
        return
    cred = credentials.new_credential(credentials.TOKEN_PREFIX)
    _write_private(opts.token_file, cred.text)
    print(f"operator token {cred.id} written to {opts.token_file}")


async def _run(opts: argparse.Namespace) -> None:
    tls = None if opts.etcd_plaintext else EtcdTls(opts.etcd_ca, opts.etcd_cert, opts.etcd_key)
    async with Etcd.connect(opts.etcd, tls=tls) as etcd:
        tid, created = await ensure_operator_token(etcd, opts.token_file, opts.description, opts.held)
    print(f"operator token {tid} {'written to' if created else 'kept in'} {opts.token_file}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler.bootstrap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--etcd", default="127.0.0.1:2379", help="etcd members, host:port[,host:port...]")
    parser.add_argument("--token-file", type=Path, required=True, help="where the operator token is kept")
    parser.add_argument("--description", default="bootstrap operator", help="stored with the token")
    parser.add_argument("--secret-file", type=Path, help="API-key secret file, created when absent")
    parser.add_argument("--etcd-ca", default="", help="PEM CA bundle etcd's certificates are checked against")
    parser.add_argument("--etcd-cert", default="", help="PEM client certificate (a scheduler's, or etcd's root)")
    parser.add_argument("--etcd-key", default="", help="PEM private key of --etcd-cert")
    parser.add_argument("--etcd-plaintext", nargs="?", const="true", default="false", choices=("true", "false"),
                        help="development only: etcd without TLS")
    parser.add_argument("--generate", action="store_true",
                        help="write a new token to --token-file (and --secret-file) without etcd; the "
                             "scheduler registers it (its admin_token_files)")
    opts = parser.parse_args(argv)
    if opts.generate:
        _generate(opts)
        return 0
    opts.etcd_plaintext = opts.etcd_plaintext == "true"
    if not opts.etcd_plaintext and not (opts.etcd_ca and opts.etcd_cert and opts.etcd_key):
        parser.error("--etcd-ca, --etcd-cert and --etcd-key are required, unless --etcd-plaintext (development)")
    opts.held = opts.token_file.read_text().strip() if opts.token_file.exists() else ""
    if opts.secret_file is not None and ensure_secret(opts.secret_file):
        print(f"API-key secret written to {opts.secret_file}")
    asyncio.run(_run(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
