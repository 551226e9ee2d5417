"""`ray up` of the on-premises cluster YAML on this machine, a GRPO job submitted to it, and `ray down`.

Opt-in (`pytest -m cluster`; `.ci/run` runs it): it needs root, sshd and rsync (apt-get install openssh-server
rsync). It starts a private sshd on 127.0.0.1:22 with a throw-away key, brings up deploy/local.yaml with the head at
127.0.0.1 (the only changes: this machine's address, user, key and venv instead of a fresh install), submits the
smoke GRPO run with `ray job submit`, checks its summary.json, tears the cluster down, and checks that no process of
that Ray session is left. ~/.bashrc and ~/.ray/auth_token are restored as they were.
"""

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
SSHD = "/usr/sbin/sshd"
pytestmark = pytest.mark.cluster


def run(args: list[str], timeout: float, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture()
def sshd(tmp_path):
    """A private sshd on 127.0.0.1:22 that accepts one fresh key for the current user; stopped by its pid."""
    missing = [tool for tool in (SSHD, shutil.which("rsync"), shutil.which("ssh-keygen")) if not tool or not os.path.exists(tool)]
    if missing or os.geteuid() != 0:
        pytest.fail("this test needs root, sshd and rsync: apt-get install -y openssh-server rsync")
    if port_open(22):
        pytest.fail("127.0.0.1:22 is taken (a system sshd?): stop it, or run this test where port 22 is free")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("client", "host"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], 30)
    shutil.copy(keys / "client.pub", keys / "authorized_keys")
    config = keys / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", "Port 22", f"HostKey {keys / 'host'}", f"AuthorizedKeysFile {keys / 'authorized_keys'}",
        f"PidFile {keys / 'sshd.pid'}", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
    ]) + "\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(keys / "sshd.log")])
    deadline = time.monotonic() + 20
    while not port_open(22):
        assert proc.poll() is None and time.monotonic() < deadline, (keys / "sshd.log").read_text()
        time.sleep(0.1)
    yield keys / "client"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def home_files():
    """~/.bashrc (ray's setup command edits it) and ~/.ray/auth_token (the cluster token), restored afterwards."""
    bashrc, token = Path.home() / ".bashrc", Path.home() / ".ray" / "auth_token"
    saved = bashrc.read_bytes() if bashrc.exists() else None
    made_token = not token.exists()
    if made_token:
        run([RAY, "get-auth-token", "--generate"], 60)
    yield
    if saved is None:
        bashrc.unlink(missing_ok=True)
    else:
        bashrc.write_bytes(saved)
    if made_token:
        token.unlink(missing_ok=True)


def local_cluster_config(key: Path, name: str) -> dict:
    """deploy/local.yaml for a one-host cluster on 127.0.0.1 that reuses this venv instead of installing one."""
    cfg = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    cfg["cluster_name"] = name
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(key)}
    cfg["file_mounts"] = {}  # the checkout and the token are already here
    venv_bin = str(Path(sys.executable).parent)
    path_line = cfg["setup_commands"][-1].replace("proxrl-venv/bin", venv_bin).replace("$HOME/" + venv_bin, venv_bin)
    assert venv_bin in path_line and ">> ~/.bashrc" in path_line
    cfg["setup_commands"] = [path_line]
    # Loopback only, and 4 logical CPUs so the smoke run's 2.5 CPUs of actors fit on a 2-core machine.
    cfg["head_start_ray_commands"] = [
        c.replace("ray start --head", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1 --num-cpus=4")
        for c in cfg["head_start_ray_commands"]
    ]
    return cfg


def processes() -> list[str]:
    """Every process's full command line (ps would cut long ones)."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(f"{cmdline.parent.name} " + cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended while we looked
            pass
    return lines


def head_session(gcs_port: int = 6379) -> str:
    """The Ray session of the GCS listening on `gcs_port` (other Ray instances on this machine are not ours)."""
    for line in processes():
        if "gcs_server" in line and f"--gcs_server_port={gcs_port}" in line:
            return re.search(r"session_[0-9_-]+", line).group(0)
    raise AssertionError(f"ray up reported success but no GCS listens on port {gcs_port}")


def session_processes(session: str) -> list[str]:
    return [line for line in processes() if session in line]


def test_ray_up_runs_the_smoke_grpo_job_and_ray_down_leaves_nothing(sshd, home_files, tmp_path):
    name = f"proxrl-ci-{os.getpid()}"
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(local_cluster_config(sshd, name)))
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    session = None
    try:
        run([RAY, "up", "-y", "--no-config-cache", str(config)], 600, **env)
        session = head_session()
        run_dir = tmp_path / "run"
        job = run([
            RAY, "job", "submit", "--address", "http://127.0.0.1:8265", "--",
            "python", "-m", "learner.main", "--mode", "grpo", "--config", str(ROOT / "configs" / "smoke.yaml"),
            f"run_dir={run_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ], 1200, **env)
        assert "succeeded" in job.stdout + job.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["mode"] == "grpo" and summary["iterations"] == 2
        assert summary["stream"]["pending"] == 0 and summary["stream"]["entries"] == summary["groups_written"] > 0
        assert (Path(summary["checkpoint"]) / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    finally:
        run([RAY, "down", "-y", str(config)], 300, **env)
    deadline = time.monotonic() + 30
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(1)
    assert session_processes(session) == []
