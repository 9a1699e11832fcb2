"""The first admin token of a compose or Kubernetes cluster: made offline (``bootstrap
--generate``, a file or a Secret), registered by the real scheduler at start-up
(``admin_token_files``) over real etcd, then accepted as an operator's on the admin API with
``admin_auth`` on."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import grpc
import pytest

from services.scheduler import bootstrap
from services.scheduler.app import Scheduler
from services.scheduler.config import SchedulerConfig
from snapwake import credentials, keys
from snapwake.etcd import Etcd
from snapwake.grpcclient import channel
from snapwake.testing import EtcdProcess
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc
from snapwake.v1.scheduler_pb2 import AdminToken

pytestmark = [pytest.mark.timeout(60)]


def test_generate_writes_a_private_token_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token, secret = tmp_path / "access" / "operator.token", tmp_path / "access" / "apikey.secret"
    argv = ["--generate", "--token-file", str(token), "--secret-file", str(secret)]
    assert bootstrap.main(argv) == 0
    cred = bootstrap.read_token_file(token)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert cred.id in out and cred.text not in out  # the id is printed, never the token
    assert bootstrap.main(argv) == 0 and bootstrap.read_token_file(token) == cred  # kept


def test_a_bad_token_file_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text("swt-not-a-token-secret-text\n")
    problems = SchedulerConfig(admin_token_files=(str(bad), str(tmp_path / "missing"))).validate()
    ours = [p for p in problems if p.startswith("admin_token_files:")]
    assert len(ours) == 2 and str(bad) in ours[0] and "missing" in ours[1], problems
    assert not any("secret-text" in p for p in problems)


@pytest.mark.asyncio
async def test_the_scheduler_registers_its_token_files_and_accepts_them(etcd_server: EtcdProcess,
                                                                        tmp_path: Path) -> None:
    files = [tmp_path / "operator.token", tmp_path / "gateway.token"]
    for f in files:
        assert bootstrap.main(["--generate", "--token-file", str(f)]) == 0
    creds = [bootstrap.read_token_file(f) for f in files]
    cfg = SchedulerConfig(listen="127.0.0.1:0", etcd=etcd_server.address, election_ttl_s=2, admin_auth=True,
                          claim_adopt_grace_s=0.1, admin_token_files=tuple(str(f) for f in files))
    async with Etcd.connect(etcd_server.address) as store:
        await store.delete_prefix(keys.ADMIN_TOKENS)
        try:
            for _ in range(2):  # a restart (or the second replica) keeps what the first stored
                sched = Scheduler(cfg, store)
                await sched.start()
                try:
                    for cred in creds:
                        entry = await store.get(keys.admin_token_key(cred.id), AdminToken)
                        assert entry is not None and entry.value.operator  # type: ignore[attr-defined]
                        assert entry.value.sha256 == credentials.sha256_digest(cred.text)  # type: ignore[attr-defined]
                    async with channel(f"127.0.0.1:{sched.port}") as ch:
                        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
                        got = await stub.GetTenantQuota(scheduler_pb2.GetTenantQuotaRequest(tenant="acme"), timeout=10,
                                                        metadata=[("authorization", f"Bearer {creds[0].text}")])
                        assert got.quota.tenant == "acme"
                        with pytest.raises(grpc.aio.AioRpcError) as refused:
                            await stub.GetTenantQuota(scheduler_pb2.GetTenantQuotaRequest(tenant="acme"), timeout=10)
                        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                finally:
                    await sched.stop(0)
            # A token file whose id etcd holds for another token: the start fails, naming it.
            other = credentials.Credential(creds[0].id, creds[0].text[:-4] + "AAAA")
            (tmp_path / "clash.token").write_text(other.text)
            clash = dataclasses.replace(cfg, admin_token_files=(str(tmp_path / "clash.token"),))
            with pytest.raises(ValueError, match=f"admin token id {creds[0].id} belongs to another token"):
                await Scheduler(clash, store).start()
        finally:
            await store.delete_prefix(keys.ADMIN_TOKENS)
