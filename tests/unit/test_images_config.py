"""Image configs, Docker's command rules and user resolution (services/nodeagent/images/config.py,
user.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from services.nodeagent.images import ImageConfig, command, parse_config, parse_user, resolve_user
from snapwake import errors

VLLM_LIKE = {
    "architecture": "amd64", "os": "linux",
    "config": {"Entrypoint": ["python3", "-m", "vllm.entrypoints.openai.api_server"], "Cmd": None,
               "Env": ["PATH=/usr/bin:/bin", "HF_HOME=/data", "A=1", "A=2", "EMPTY=", "NOEQUALS", "X=a=b"],
               "WorkingDir": "/workspace", "User": "1000:1000",
               "ExposedPorts": {"8000/tcp": {}, "9090": {}, "53/udp": {}}},
    "rootfs": {"type": "layers", "diff_ids": []},
}


def test_parses_the_run_time_parts() -> None:
    config = parse_config(json.dumps(VLLM_LIKE).encode())
    assert config == ImageConfig(
        entrypoint=("python3", "-m", "vllm.entrypoints.openai.api_server"), cmd=(),
        env={"PATH": "/usr/bin:/bin", "HF_HOME": "/data", "A": "2", "EMPTY": "", "X": "a=b"},
        working_dir="/workspace", user="1000:1000", exposed_ports=(8000, 9090), os="linux", architecture="amd64")


@pytest.mark.parametrize("doc", [{}, {"config": None}, {"config": {}}, {"config": {"Cmd": None, "Env": None}}])
def test_an_empty_config_is_the_default(doc: dict[str, Any]) -> None:
    assert parse_config(doc) == ImageConfig()


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "not JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"config": []}), "config is not an object"),
    (json.dumps({"config": {"Entrypoint": "python3 app.py"}}), "Entrypoint is not a list of strings"),
    (json.dumps({"config": {"Cmd": ["a", 1]}}), "Cmd is not a list of strings"),
    (json.dumps({"config": {"Env": "A=1"}}), "Env is not a list of strings"),
    (json.dumps({"config": {"User": 0}}), "User is not a string"),
    (json.dumps({"config": {"ExposedPorts": ["8000/tcp"]}}), "ExposedPorts is not an object"),
    (json.dumps({"config": {"ExposedPorts": {"http/tcp": {}}}}), "bad exposed port 'http/tcp'"),
    (json.dumps({"config": {"ExposedPorts": {"70000/tcp": {}}}}), "bad exposed port"),
    (json.dumps({"config": {"ExposedPorts": {"80/quic": {}}}}), "bad exposed port"),
])
def test_a_malformed_config_is_refused(raw: bytes | str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message) as caught:
        parse_config(raw)
    assert caught.value.field == "spec.image"
    assert caught.value.message.startswith("spec.image: image config is malformed: ")


E, C = ("/entry", "--flag"), ("serve", "--port", "8000")
COMMANDS = [
    # (entrypoint, cmd, override command, override args, argv): Docker's and Kubernetes' rules.
    (E, C, (), (), ["/entry", "--flag", "serve", "--port", "8000"]),
    (E, (), (), (), ["/entry", "--flag"]),
    ((), C, (), (), ["serve", "--port", "8000"]),
    (E, C, (), ("other",), ["/entry", "--flag", "other"]),  # args replace Cmd only
    ((), C, (), ("python3", "x.py"), ["python3", "x.py"]),  # no entrypoint: args are the command
    (E, C, ("/bin/sh", "-c"), (), ["/bin/sh", "-c"]),  # a command drops the image's Cmd too
    (E, C, ("/bin/sh", "-c"), ("echo hi",), ["/bin/sh", "-c", "echo hi"]),
    ((), (), ("/app",), (), ["/app"]),
    ((), (), (), ("/app", "x"), ["/app", "x"]),
]


@pytest.mark.parametrize(("entrypoint", "cmd", "override_command", "override_args", "argv"), COMMANDS)
def test_command_follows_dockers_rules(entrypoint: tuple[str, ...], cmd: tuple[str, ...],
                                       override_command: tuple[str, ...], override_args: tuple[str, ...],
                                       argv: list[str]) -> None:
    config = ImageConfig(entrypoint=entrypoint, cmd=cmd)
    assert command(config, override_command, override_args) == argv


@pytest.mark.parametrize("config", [ImageConfig(), ImageConfig(cmd=("",)), ImageConfig(entrypoint=("",))])
def test_an_image_without_a_command_fails_the_deploy(config: ImageConfig) -> None:
    with pytest.raises(errors.InvalidArgument, match="image has no command") as caught:
        command(config)
    assert caught.value.field == "spec.image"


@pytest.mark.parametrize(("override_command", "override_args", "field"), [
    (("/bin/sh\0",), (), "spec.command.0"), (("/app",), ("ok", "b\0ad"), "spec.args.1")])
def test_an_override_with_nul_is_refused(override_command: tuple[str, ...], override_args: tuple[str, ...],
                                         field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        command(ImageConfig(cmd=("x",)), override_command, override_args)
    assert caught.value.field == field


PASSWD = """root:x:0:0:root:/root:/bin/bash
# a comment
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
app:x:1000:1001::/home/app:/bin/sh
broken line
big:x:70000:70000::/:/bin/sh
"""
GROUP = "root:x:0:\napps:x:1001:app\nvideo:x:44:app\nnogroup:x:65534:\n"
USERS = [
    ("", (0, 0)),
    ("root", (0, 0)),
    ("nobody", (65534, 65534)),
    ("app", (1000, 1001)),
    ("1000", (1000, 1001)),  # a number in passwd takes its group
    ("4242", (4242, 0)),  # a number not in passwd runs with group 0, as in runc
    ("app:video", (1000, 44)),
    ("app:7", (1000, 7)),
    ("4242:4242", (4242, 4242)),
    ("0:nogroup", (0, 65534)),
]


@pytest.mark.parametrize(("user", "ids"), USERS)
def test_parse_user(user: str, ids: tuple[int, int]) -> None:
    assert parse_user(user, PASSWD, GROUP) == ids


@pytest.mark.parametrize(("user", "message"), [
    ("ghost", "'ghost' is not in the image's /etc/passwd"),
    ("app:ghosts", "'ghosts' is not in the image's /etc/group"),
    ("big", "maps ids 0..65535 only"),
    ("70000", "maps ids 0..65535 only"),
])
def test_parse_user_refuses(user: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        parse_user(user, PASSWD, GROUP)


def test_resolve_user_reads_the_rootfs_but_never_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    assert resolve_user("app:video", tmp_path) == (1000, 44)
    # An image whose /etc/passwd points at the host's must not read the host's.
    host = tmp_path / "host-passwd"
    host.write_text("hostonly:x:5:5::/:/bin/sh\n")
    os.replace(tmp_path / "etc" / "passwd", tmp_path / "real-passwd")
    (tmp_path / "etc" / "passwd").symlink_to(host)
    with pytest.raises(errors.InvalidArgument, match="not in the image's /etc/passwd"):
        resolve_user("hostonly", tmp_path)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "etc").symlink_to(tmp_path / "etc")
    assert resolve_user("4242", evil) == (4242, 0)  # /etc itself a symlink: read as empty
