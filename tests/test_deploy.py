"""The deployment files: Ray's own validation of the cluster YAMLs, the manifests, the image, the GPU-scale config.

Beyond "it parses", these check that the pieces agree with each other: one Ray version everywhere, one image name,
the GPU config's actors fit the nodes each deployment offers, and the security defaults (token auth, dashboard on
loopback, no committed secrets) hold in every file.
"""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from learner.cluster import actor_bundles, unplaced
from learner.config import CONFIG_DIR, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CLUSTER_YAMLS = sorted(DEPLOY.glob("*.yaml"))
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))
IMAGE = "proxrl:0.1.0"


def pinned(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==")[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_a_cloud_and_an_on_premises_cluster_yaml():
    assert {p.name for p in CLUSTER_YAMLS} == {"cluster.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_own_validation(path):
    validate_config(prepare_config(load(path)))


def test_rays_validation_rejects_a_broken_cluster_yaml():
    cfg = load(DEPLOY / "cluster.yaml")
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_1x"]["max_wokers"] = 3  # a typo must not pass silently
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_security_defaults(path):
    cfg = load(path)
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard/job API must stay on the head's loopback"
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "the token comes from the user's machine"
    assert any("-c ~/proxrl/constraints.txt" in c and "-e ~/proxrl" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/proxrl"] == "."
    assert not re.search(r"password\s*[:=]\s*\S", path.read_text(), re.I), "no secret may be committed"


def test_on_premises_yaml_puts_ray_on_the_ssh_shell_path():
    # `ray down` runs a bare `ray stop` in an ssh shell that reads only ~/.bashrc.
    commands = " ".join(load(DEPLOY / "local.yaml")["setup_commands"])
    assert "proxrl-venv/bin" in commands and ">> ~/.bashrc" in commands


def test_cloud_image_carries_the_pinned_ray():
    cfg = load(DEPLOY / "cluster.yaml")
    assert cfg["docker"]["image"] == f"rayproject/ray:{pinned('ray')}-py311-gpu"


def node_types(cfg: dict) -> list[dict[str, float]]:
    """Every node the cloud cluster can grow to (head included), as resource dicts."""
    nodes = []
    for name, spec in cfg["available_node_types"].items():
        count = 1 if name == cfg["head_node_type"] else spec["max_workers"]
        nodes += [{k: float(v) for k, v in spec["resources"].items()}] * count
    return nodes


def pod_resources(container: dict, ray_start: dict) -> dict[str, float]:
    limits = container["resources"]["limits"]
    cpu = float(ray_start.get("num-cpus", limits["cpu"]))
    return {"CPU": cpu, "GPU": float(limits.get("nvidia.com/gpu", 0))}


def kuberay_nodes(spec: dict) -> list[dict[str, float]]:
    head = spec["headGroupSpec"]
    nodes = [pod_resources(head["template"]["spec"]["containers"][0], head["rayStartParams"])]
    for group in spec["workerGroupSpecs"]:
        pod = pod_resources(group["template"]["spec"]["containers"][0], group["rayStartParams"])
        nodes += [pod] * group["maxReplicas"]
    return nodes


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def test_gpu_config_passes_the_schema_and_uses_gpus():
    cfg = load_config(CONFIG_DIR / "gpu.yaml")
    assert cfg.deepspeed.bf16 and cfg.actors.learner.count > 1
    assert cfg.model.vae and cfg.model.text.pretrained != "none"  # latent space, a pretrained text encoder
    assert cfg.actors.rollout.num_gpus > 0 and cfg.actors.reward.num_gpus > 0
    assert {"hpsv2", "image_reward", "clip_score"} <= {r.name for r in cfg.rewards}


def test_gpu_config_fits_every_deployment():
    actors = actor_bundles(load_config(CONFIG_DIR / "gpu.yaml").actors)
    assert unplaced(actors, node_types(load(DEPLOY / "cluster.yaml"))) == []
    for path in KUBERAY:
        assert unplaced(actors, kuberay_nodes(cluster_spec(load(path)))) == [], path.name


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_names_image_version_auth_and_gpus(path):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = cluster_spec(manifest)
    assert spec["rayVersion"] == pinned("ray")
    assert spec["authOptions"] == {"mode": "token"}
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    assert all(c["image"] == IMAGE for pod in pods for c in pod["spec"]["containers"])
    gpus = [pod_resources(g["template"]["spec"]["containers"][0], {})["GPU"] for g in spec["workerGroupSpecs"]]
    assert min(gpus) >= 1
    # The image runs as an unprivileged user; a volume claim is root's unless the pod hands it to that user's group.
    uid = int(re.search(r"useradd .*--uid (\d+)", (DEPLOY / "Dockerfile").read_text()).group(1))
    for pod in pods:
        if any(c.get("volumeMounts") for c in pod["spec"]["containers"]):
            assert pod["spec"].get("securityContext", {}).get("fsGroup") == uid, pod["spec"]["containers"][0]["name"]


def test_rayjob_runs_grpo_with_a_config_that_exists():
    manifest = load(DEPLOY / "kuberay" / "rayjob.yaml")
    assert manifest["kind"] == "RayJob" and manifest["spec"]["shutdownAfterJobFinishes"] is True
    words = shlex.split(manifest["spec"]["entrypoint"])
    command = shlex.split(words[-1])  # bash -c "cd /runs && python -m learner.main ..."
    assert command[command.index("python"):][:5] == ["python", "-m", "learner.main", "--mode", "grpo"]
    config = command[command.index("--config") + 1]
    assert config.startswith("/app/") and (ROOT / config.removeprefix("/app/")).is_file()
    assert manifest["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == IMAGE


def test_dockerfile_builds_the_image_the_manifests_use():
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {IMAGE} ." in text
    assert re.search(r"^FROM python:3\.11", text, re.M), "the same Python as the cluster image (py311)"
    assert "pip install -c constraints.txt -e ." in text
    assert re.search(r"apt-get install .*\bwget\b", text), "KubeRay's health probes run wget"
    copied = set(re.findall(r"^COPY (\w+) \1$", text, re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = set(re.findall(r'"(\w+)\*"', pyproject))
    assert packages | {"configs"} <= copied


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` in shell command lines (up to the next ;, &&, || or |)."""
    found = []
    for command in commands:
        lexer = shlex.shlex(command.replace("\\\n", " "), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i, word in enumerate(words[:-1]):
            if word.endswith("pip") and words[i + 1] == "install":
                args = words[i + 2:]
                found.append(args[: next((k for k, a in enumerate(args) if a in (";", "&&", "||", "|")), len(args))])
    return found


def installed_without_deps(commands: list[str]) -> set[str]:
    """Packages installed with --no-deps under the constraints file (how the preference rewards must go in)."""
    names = set()
    for args in pip_installs(commands):
        if "--no-deps" in args and "-c" in args and args[args.index("-c") + 1].endswith("constraints.txt"):
            names |= {a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] not in ("-c", "-e")}
    return names


def dockerfile_commands() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.removeprefix("RUN ") for line in text.splitlines() if line.startswith("RUN ")]


SETUPS = {  # KubeRay runs the Dockerfile's image
    "Dockerfile": dockerfile_commands,
    "cluster.yaml": lambda: load(DEPLOY / "cluster.yaml")["setup_commands"],
    "local.yaml": lambda: load(DEPLOY / "local.yaml")["setup_commands"],
    ".ci/run": lambda: (ROOT / ".ci" / "run").read_text().replace("\\\n", " ").splitlines(),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_every_reward_a_shipped_config_names_is_installed_by_every_setup(setup):
    from rewards.compat import EXTRAS

    installed = installed_without_deps(SETUPS[setup]())
    for config in sorted(CONFIG_DIR.glob("*.yaml")):
        for reward in load_config(config).rewards:
            missing = sorted(set(EXTRAS.get(reward.name, ())) - installed)
            assert not missing, f"{config.name} asks for {reward.name}, but {setup} never installs {missing}"
            assert all(pinned(package) for package in EXTRAS.get(reward.name, ()))
