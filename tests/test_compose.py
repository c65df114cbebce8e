"""The docker-compose demo, checked without a Docker engine: every flag of every service's command exists in the
installed (pinned) Flower binary's --help, the Flower images are the pinned version, and each institution's shard,
key and cache are mounted only into that institution's containers (no CA or SuperLink key anywhere else)."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import flwr
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
NODES = sorted(name.removeprefix("supernode-") for name in SERVICES if name.startswith("supernode-"))


def _image(service: dict) -> str:
    """The default image (`${VAR:-default}` resolved to its default)."""
    found = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", service["image"])
    return found.group(1) if found else service["image"]


def _binary(service: dict) -> str:
    """What the container runs: the service's entrypoint, else its image's (the project's: from the Dockerfile)."""
    if "entrypoint" in service:
        (binary,) = service["entrypoint"]
        return binary
    return (DEPLOY / "Dockerfile").read_text().split('ENTRYPOINT ["', 1)[1].split('"', 1)[0]


@cache
def _flags(binary: str) -> set[str]:
    out = subprocess.run([str(Path(sys.executable).parent / binary), "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of every volume; sources keep their ${VAR:-default} form."""
    out = []
    for entry in service.get("volumes", []):
        source, target = re.match(r"^(\$\{[^}]*\}[^:]*|[^:]+):([^:]+)", entry).groups()
        out.append((source, target))
    return out


def test_the_demo_has_a_superlink_a_server_superexec_and_nodes_in_pairs() -> None:
    assert {"superlink", "superexec-serverapp"} <= set(SERVICES) and len(NODES) >= 2
    assert set(SERVICES) == {"superlink", "superexec-serverapp"} | {f"{kind}-{n}" for n in NODES
                                                                     for kind in ("supernode", "superexec-clientapp")}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_command_flag_exists_in_the_pinned_flower(name: str) -> None:
    service = SERVICES[name]
    binary = _binary(service)
    used = {arg.split("=", 1)[0] for arg in service["command"] if arg.startswith("--")}
    assert used, name
    unknown = used - _flags(binary)
    assert not unknown, f"{name}: {binary} {flwr.__version__} has no {sorted(unknown)}"
    image = _image(service)
    if image.startswith("flwr/"):  # the official image's own entrypoint is the binary the service names
        assert image.endswith(f":{flwr.__version__}"), image
        assert binary == "flower-" + image.split("/", 1)[1].split(":")[0], (name, binary, image)


def test_tls_auth_and_process_isolation() -> None:
    link = SERVICES["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link and "--insecure" not in link
    assert link[link.index("--isolation") + 1] == "process"
    assert "--root-certificates" in SERVICES["superexec-serverapp"]["command"]
    for node in NODES:
        command = SERVICES[f"supernode-{node}"]["command"]
        assert command[command.index("--auth-supernode-private-key") + 1] == f"/keys/node-{node}"
        assert "--root-certificates" in command and "--insecure" not in command
        assert command[command.index("--isolation") + 1] == "process"
        config = command[command.index("--node-config") + 1]
        assert {"data-dir", "cache-dir", "device"} <= set(re.findall(r"([a-z-]+)=", config)), config
        executor = SERVICES[f"superexec-clientapp-{node}"]["command"]
        assert executor[executor.index("--runtime-api-address") + 1] == f"supernode-{node}:9094"


def test_each_node_mounts_only_its_own_shard_key_and_cache() -> None:
    for name, service in SERVICES.items():
        sources = [source for source, _ in _mounts(service)]
        assert not any(s.endswith(("ca.key", "/keys")) for s in sources), f"{name} mounts a CA key or all keys"
        if name != "superlink":
            assert not any(s.endswith(("superlink.key", "/certs")) for s in sources), name
        owner = name.rsplit("-", 1)[1] if name.startswith(("supernode-", "superexec-clientapp-")) else None
        for source in sources:
            found = re.search(r"(?:shards|keys)/node-(\w+)$|^node-(\w+)-cache$", source)
            if found:
                assert owner in found.groups(), f"{name} mounts {source}"
    for node in NODES:
        mounts = dict(_mounts(SERVICES[f"superexec-clientapp-{node}"]))
        assert mounts[f"${{DEPLOY_DIR:-../.deploy}}/shards/node-{node}"] == "/data"  # where its node config points
        assert not any("shards" in s for s, _ in _mounts(SERVICES[f"supernode-{node}"]))
        assert SERVICES[f"superexec-clientapp-{node}"]["networks"] == [f"node-{node}"]
        assert COMPOSE["networks"][f"node-{node}"] == {"internal": True}


def test_the_gpu_override_reserves_a_device_for_a_node_superexec() -> None:
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yml").read_text())["services"]
    for name, service in gpu.items():
        assert name in SERVICES and name.startswith("superexec-clientapp-"), name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        node = name.rsplit("-", 1)[1]
        assert f"device='${{NODE_{node}_DEVICE:-cpu}}'" in " ".join(SERVICES[f"supernode-{node}"]["command"])


def test_the_build_context_holds_no_data_keys_or_venv() -> None:
    lines = [ln.strip() for ln in (DEPLOY.parent / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "the context must start from nothing and allow-list what the image needs"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    assert allowed == {"requirements.lock", "pyproject.toml", "common", "fedxmr_client", "fedxmr_server",
                       "deploy/wheels"}


def test_no_package_index_or_mirror_host_is_named_and_the_mirror_comes_from_apt(tmp_path: Path) -> None:
    """Indexes and mirrors are the user's (build args, flags) or the machine's own configuration: the deploy files
    and the compose check name no host, and the check reads debootstrap's mirror from apt's sources."""
    from scripts.compose_check import apt_mirror

    root = DEPLOY.parent
    files = [*DEPLOY.glob("*"), root / "scripts" / "compose_check.py", root / "Makefile"]
    urls = {f.name: re.findall(r"https?://[^\s\"')]+", f.read_text()) for f in files if f.is_file()}
    assert not {name: found for name, found in urls.items() if found}, "a host is named"
    (tmp_path / "sources.list.d").mkdir()
    assert apt_mirror(tmp_path) is None
    (tmp_path / "sources.list").write_text("# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main\n")
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://archive.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://archive.example/debian/\nSuites: bookworm\n")
    assert apt_mirror(tmp_path) == "http://archive.example/debian"
