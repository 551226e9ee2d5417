"""Where a GRPO run's actors live: a local Ray or a cluster, the stream's Redis, and whether the actors fit.

Before any actor starts, the actors the config asks for are packed onto the cluster's nodes (the way Ray must place
them: one actor never spans two nodes); a config that asks for more than exists fails with a message saying what
is missing and what to change, instead of hanging on a placement group that can never be scheduled. With
`ray.resource_wait_s`, the autoscaler is asked for the missing nodes first.
"""

from __future__ import annotations

import os
import time
from collections import Counter

from actors.stream import EmbeddedRedis, RedisAddress
from learner.config import ActorsConfig, ConfigError, RunConfig
from proxmodel.env import OFFLINE_ENV

# Environment every actor needs: offline hubs, no telemetry, CPU DeepSpeed where there is no GPU.
ACTOR_ENV_KEYS = (*OFFLINE_ENV, "DS_ACCELERATOR")
# Ray >= 2.49 leaves CUDA_VISIBLE_DEVICES alone for an actor given no GPU (ray-project/ray#54868), so on a GPU node a
# CPU learner rank or reward actor would see every GPU and use cuda:0, one Ray gave to another actor; this restores
# the empty list, so an actor computes on what Ray gave it (tests/test_devices.py).
HIDE_UNASSIGNED_GPUS = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
Bundle = dict[str, float]


def start_ray(cfg: RunConfig):
    """Join `ray.address` / RAY_ADDRESS, or start a private local Ray. Returns (ray, started_here)."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {**{k: os.environ[k] for k in ACTOR_ENV_KEYS if k in os.environ}, **HIDE_UNASSIGNED_GPUS}
    if address:
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        except Exception as e:  # noqa: BLE001 - any failure to connect gets the same advice
            raise ConfigError(
                f"cannot join the Ray cluster at {address!r} ({type(e).__name__}: {e}). Start it with `ray start "
                f"--head` or `ray up deploy/cluster.yaml`, or unset RAY_ADDRESS / ray.address to run locally."
            ) from e
        return ray, False
    needed = sum(b.get("CPU", 0.0) for _, b in actor_bundles(cfg.actors))
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    return ray, True


def stream_server(cfg: RunConfig, on_cluster: bool) -> tuple[RedisAddress, EmbeddedRedis | None]:
    """The experience stream's Redis: `redis.url`, or a private one for this run (stopped with the run).

    On a cluster the private one listens on this node's cluster-internal IP so actors on other nodes reach it;
    its password is `$<redis.password_env>` if set, else random for the run (handed to actors through Ray).
    """
    password = os.environ.get(cfg.redis.password_env)
    if cfg.redis.url:
        return RedisAddress(url=cfg.redis.url, password=password), None
    if on_cluster:
        import ray

        server = EmbeddedRedis(host=ray.util.get_node_ip_address(), password=password,
                               max_memory_mb=cfg.redis.max_memory_mb)
    else:
        server = EmbeddedRedis(password=password, max_memory_mb=cfg.redis.max_memory_mb)
    return server.address, server


def actor_bundles(actors: ActorsConfig) -> list[tuple[str, Bundle]]:
    """One (kind, resources) per actor the run will start."""
    out = []
    for kind, spec in (("learner", actors.learner), ("rollout", actors.rollout), ("reward", actors.reward)):
        bundle = {k: v for k, v in (("CPU", spec.num_cpus), ("GPU", spec.num_gpus)) if v}
        out += [(kind, bundle)] * spec.count
    return out


def unplaced(bundles: list[tuple[str, Bundle]], nodes: list[Bundle]) -> list[tuple[str, Bundle]]:
    """The bundles that do not fit on `nodes` (first fit, largest GPU/CPU demand first)."""
    free = [dict(n) for n in nodes]
    left = []
    for kind, bundle in sorted(bundles, key=lambda kb: (-kb[1].get("GPU", 0.0), -kb[1].get("CPU", 0.0))):
        node = next((f for f in free if all(f.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())), None)
        if node is None:
            left.append((kind, bundle))
        else:
            for k, v in bundle.items():
                node[k] -= v
    return left


def describe_shortfall(bundles: list[tuple[str, Bundle]], nodes: list[Bundle]) -> str:
    left = unplaced(bundles, nodes)
    missing = ", ".join(f"{n} {kind} actor(s) needing {dict(b)} each" for (kind, b), n in
                        Counter((k, tuple(sorted(b.items()))) for k, b in left).items())
    asked = {r: sum(b.get(r, 0.0) for _, b in bundles) for r in ("CPU", "GPU")}
    have = {r: sum(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU")}
    biggest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    return (
        f"The config asks for more than the Ray cluster offers: {missing} cannot be placed. In total it asks for "
        f"{asked['CPU']:g} CPUs and {asked['GPU']:g} GPUs; the cluster has {have['CPU']:g} CPUs and {have['GPU']:g} "
        f"GPUs on {len(nodes)} node(s), the largest with {biggest.get('CPU', 0.0):g} CPUs and "
        f"{biggest.get('GPU', 0.0):g} GPUs (one actor cannot span two nodes). Lower actors.<kind>.count / num_cpus / "
        f"num_gpus, add nodes (deploy/cluster.yaml: max_workers of a GPU node type), or set ray.resource_wait_s so "
        f"the autoscaler can add them."
    )


def cluster_nodes(ray) -> list[Bundle]:
    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def ensure_resources(ray, cfg: RunConfig) -> bool:
    """Fail fast (ConfigError) unless every actor of the config fits; first ask the autoscaler if allowed to wait.
    True when an autoscaler request stands: it persists until replaced, so the run withdraws it when it ends
    (withdraw_request), or the autoscaler keeps the nodes it asked for after the run."""
    bundles = actor_bundles(cfg.actors)
    if not unplaced(bundles, cluster_nodes(ray)):
        return False
    wait = cfg.ray.resource_wait_s
    if wait > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[b for _, b in bundles])
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            if not unplaced(bundles, cluster_nodes(ray)):
                return True
        withdraw_request()
    raise ConfigError(describe_shortfall(bundles, cluster_nodes(ray)))


def withdraw_request() -> None:
    """Replace ensure_resources' autoscaler request with an empty one, so idle nodes can be removed."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])
