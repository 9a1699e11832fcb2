"""The gateway's optional TLS (a real uvicorn with a certificate from the development CA), the
dashboard cookie's ``Secure`` flag over TLS, and ``/metrics`` and the dashboard answering only
loopback clients while auth is off."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from services.gateway.__main__ import uvicorn_config
from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.dashboard.auth import COOKIE
from services.gateway.scheduler_client import FunctionInfo
from services.gateway.scheduler_fake import InMemoryScheduler
from snapwake import pki

pytestmark = pytest.mark.timeout(60)

KEY = "sk-acme-tls"


def _scheduler() -> InMemoryScheduler:
    s = InMemoryScheduler()
    s.deploy(FunctionInfo("default/default/chat", queue_len=4, queue_timeout=1), [])
    return s


def _asgi(config: GatewayConfig, client: tuple[str, int], scheme: str = "http") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=build_app(_scheduler(), config), client=client)
    return httpx.AsyncClient(transport=transport, base_url=f"{scheme}://gateway", timeout=10)


@contextlib.asynccontextmanager
async def _serving(config: GatewayConfig) -> AsyncIterator[int]:
    server = uvicorn.Server(uvicorn_config(build_app(_scheduler(), config), config))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.025)
        assert server.started, "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_the_gateway_serves_https_with_its_certificate(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path / "ca")
    files = pki.issue(ca, tmp_path / "certs", pki.Identity("gateway", "gw-1"))
    config = GatewayConfig(listen="127.0.0.1:0", tls_certfile=str(files.cert), tls_keyfile=str(files.key),
                           shutdown_grace=1)
    assert config.validate() == []
    async with _serving(config) as port:
        trusted = ssl.create_default_context(cafile=str(ca.cert_path))
        async with httpx.AsyncClient(verify=trusted, timeout=10) as http:
            health = await http.get(f"https://127.0.0.1:{port}/healthz")
            models = await http.get(f"https://localhost:{port}/v1/models")
            login = await http.get(f"https://127.0.0.1:{port}/metrics")
        assert health.status_code == 200 and models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["chat"]
        assert login.status_code == 200  # auth off, and this client is on loopback
        async with httpx.AsyncClient(timeout=10) as plain:  # neither plain HTTP nor an unknown CA
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/healthz")
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await plain.get(f"https://127.0.0.1:{port}/healthz")


@pytest.mark.parametrize(("settings", "problem"), [
    ({"tls_certfile": "/etc/hostname"}, "tls_certfile, tls_keyfile: set both"),
    ({"tls_certfile": "/nonexistent.crt", "tls_keyfile": "/nonexistent.key"}, "tls_certfile: cannot read"),
])
def test_tls_settings_are_checked(settings: dict[str, Any], problem: str) -> None:
    assert any(problem in line for line in GatewayConfig(**settings).validate())


@pytest.mark.parametrize(("scheme", "secure"), [("https", True), ("http", False)])
async def test_the_dashboard_cookie_is_secure_over_tls(scheme: str, secure: bool) -> None:
    config = GatewayConfig(api_keys=(f"{KEY}:acme",), operator_keys=("sk-ops:ops",))
    async with _asgi(config, ("203.0.113.9", 5000), scheme) as http:
        login = await http.get(f"/dashboard/?key={KEY}")
    assert login.status_code == 303
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert ("Secure" in cookie) is secure


@pytest.mark.parametrize("client", [("127.0.0.1", 5000), ("::1", 5000), ("::ffff:127.0.0.1", 5000)])
async def test_with_auth_off_loopback_clients_see_metrics_and_the_dashboard(client: tuple[str, int]) -> None:
    async with _asgi(GatewayConfig(), client) as http:
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/dashboard/")).status_code == 404  # no admin lists here: not mounted


@pytest.mark.parametrize("path", ["/metrics", "/dashboard/", "/dashboard/api/state", "/dashboard"])
async def test_with_auth_off_other_clients_are_refused_metrics_and_the_dashboard(path: str) -> None:
    async with _asgi(GatewayConfig(), ("192.0.2.7", 5000)) as http:
        refused = await http.get(path)
        api = await http.get("/v1/models")
        health = await http.get("/healthz")
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["type"] == "permission_error" and "only this host" in error["message"] and path in error["message"]
    assert api.status_code == 200 and health.status_code == 200  # the API itself stays open (auth off)


async def test_with_keys_metrics_follows_the_operator_key_from_anywhere() -> None:
    config = GatewayConfig(api_keys=(f"{KEY}:acme",), operator_keys=("sk-ops:ops",))
    async with _asgi(config, ("192.0.2.7", 5000)) as http:
        assert (await http.get("/metrics", headers={"Authorization": "Bearer sk-ops"})).status_code == 200
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})).status_code == 403
