"""The image pipeline's small pure parts: eviction planning, registry secrets by name, skopeo and
umoci error translation, the runtime feature probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.nodeagent.images import Usage, authfile, plan_eviction
from services.nodeagent.images.tools import last_words, parse_features, translate
from snapwake import errors


def u(digest: str, size: int, in_use: bool, last_used: int) -> Usage:
    return Usage(digest, size, in_use, last_used)


EVICTIONS = [
    # (images, max_bytes, victims)
    ([], 0, []),
    ([u("a", 10, False, 1)], 10, []),
    ([u("a", 10, False, 1), u("b", 10, False, 2)], 10, ["a"]),
    ([u("a", 10, False, 2), u("b", 10, False, 1)], 10, ["b"]),  # least recently used first
    ([u("a", 10, True, 1), u("b", 10, False, 2)], 10, ["b"]),  # never one in use
    ([u("a", 10, True, 1), u("b", 10, True, 2)], 5, []),  # over the bound, all in use: kept
    ([u("a", 5, False, 1), u("b", 5, False, 2), u("c", 30, True, 3)], 20, ["a", "b"]),
    ([u("a", 5, False, 1), u("b", 50, False, 2), u("c", 5, False, 3)], 20, ["a", "b"]),
    ([u("a", 1, False, 1), u("b", 1, False, 2), u("c", 1, False, 3)], 0, ["a", "b", "c"]),
]


@pytest.mark.parametrize(("images", "max_bytes", "victims"), EVICTIONS)
def test_plan_eviction(images: list[Usage], max_bytes: int, victims: list[str]) -> None:
    assert plan_eviction(images, max_bytes) == victims


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".hidden", "UPPER", "x" * 64, "-lead", "trail-",
                                  "sp ace", "nul\0"])
def test_a_secret_name_is_a_name_not_a_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        authfile(tmp_path, name)
    assert caught.value.field == "spec.registry_secret"


def test_a_registered_secret_is_its_auth_file(tmp_path: Path) -> None:
    (tmp_path / "team-a.pull.json").write_text('{"auths": {}}')
    assert authfile(tmp_path, "team-a.pull") == tmp_path / "team-a.pull.json"


@pytest.mark.parametrize("secrets_dir", [None, Path("/nonexistent/secrets")])
def test_a_missing_secret_is_a_clear_precondition(secrets_dir: Path | None) -> None:
    with pytest.raises(errors.FailedPrecondition, match="secret 'team-a' is not registered") as caught:
        authfile(secrets_dir, "team-a")
    assert caught.value.field == "spec.registry_secret"


SKOPEO_MISSING = ('time="2026-11-27T10:49:07Z" level=fatal msg="Error parsing image name '
                  '\\"oci-archive:/x.tar\\": open /x.tar: no such file or directory"\n')
TRANSLATIONS = [
    (SKOPEO_MISSING, errors.InvalidArgument, "oci-archive:/x.tar: open /x.tar: no such file or directory"),
    ('level=fatal msg="reading manifest v1 in reg.io/a: manifest unknown"', errors.InvalidArgument,
     "manifest unknown"),
    ('level=fatal msg="pinging container registry reg.io: Get \\"https://reg.io/v2/\\": dial tcp: lookup reg.io: '
     'no such host"', errors.Unavailable, "no such host"),
    ('level=fatal msg="... connect: connection refused"', errors.Unavailable, "connection refused"),
    ('level=fatal msg="reading blob: 503 Service Unavailable"', errors.Unavailable, "503"),
    ("   • unpacking rootfs ...\n   ⨯ write /x/usr/lib/libfoo.so: no space left on device\n", errors.ResourceExhausted,
     "write /x/usr/lib/libfoo.so: no space left on device"),
    ("   ⨯ open CAS: validate: read oci-layout: invalid image detected\n", errors.InvalidArgument,
     "open CAS: validate: read oci-layout: invalid image detected"),
    ("", errors.InvalidArgument, "failed without a message"),
]


@pytest.mark.parametrize(("stderr", "kind", "said"), TRANSLATIONS)
def test_translate(stderr: str, kind: type[errors.SnapwakeError], said: str) -> None:
    exc = translate("cannot fetch oci-archive:/x.tar", stderr, None)
    assert type(exc) is kind
    assert exc.field == "spec.image"
    assert exc.message.startswith("spec.image: cannot fetch oci-archive:/x.tar: ")
    assert said in exc.message


def test_translate_never_shows_the_secrets_path() -> None:
    stderr = 'level=fatal msg="reading JSON file \\"/etc/snapwake/secrets/team-a.json\\": unexpected end of JSON input"'
    exc = translate("cannot fetch docker://reg.io/a:v1", stderr, Path("/etc/snapwake/secrets/team-a.json"))
    assert "/etc/snapwake/secrets" not in exc.message
    assert "<secret team-a>" in exc.message


def test_last_words_is_bounded() -> None:
    assert len(last_words("x" * 10_000)) <= 603


@pytest.mark.parametrize(("features", "idmap"), [
    ('{"linux": {"mountExtensions": {"idmap": {"enabled": true}}}}', True),
    ('{"linux": {"mountExtensions": {"idmap": {"enabled": false}}}}', False),
    ('{"linux": {}}', False),
    ("unknown command features", False),
])
def test_parse_features(features: str, idmap: bool) -> None:
    assert parse_features(features) is idmap
