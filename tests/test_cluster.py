"""Running on a cluster: actors fit the nodes or the run fails with advice; checkpoints need no shared filesystem."""

import subprocess
import sys

import pytest
import torch

from actors.checkpoint import load_packed, pack
from learner.cluster import actor_bundles, describe_shortfall, ensure_resources, unplaced
from learner.config import ConfigError, load_config
from proxmodel.model import save_model

GPU_NODE = {"CPU": 8.0, "GPU": 4.0}
CPU_NODE = {"CPU": 16.0}


def bundles(**overrides):
    return actor_bundles(load_config(None, [f"actors.{k}={v}" for k, v in overrides.items()]).actors)


def test_actors_are_packed_per_node_not_against_the_cluster_total():
    # Four learner ranks with 2 GPUs each need 8 GPUs; two 4-GPU nodes hold them, one 8-CPU node cannot.
    b = bundles(**{"learner.count": 4, "learner.num_gpus": 2, "rollout.num_gpus": 0, "reward.num_gpus": 0})
    assert unplaced(b, [GPU_NODE, GPU_NODE, CPU_NODE]) == []
    # The same total of GPUs split over four 2-GPU nodes also holds them; a 3-GPU actor fits none of them.
    assert unplaced(b, [{"CPU": 8.0, "GPU": 2.0}] * 4 + [CPU_NODE]) == []
    big = bundles(**{"learner.count": 1, "learner.num_gpus": 3})
    left = unplaced(big, [{"CPU": 8.0, "GPU": 2.0}] * 4)
    assert [kind for kind, _ in left] == ["learner"]


def test_fractional_gpus_share_a_device():
    b = bundles(**{"reward.count": 4, "reward.num_gpus": 0.25, "rollout.count": 2, "rollout.num_gpus": 0.5})
    assert unplaced(b, [{"CPU": 16.0, "GPU": 2.0}]) == []
    # One GPU: the two rollout halves fill it (largest first), the four reward quarters are left over.
    assert [kind for kind, _ in unplaced(b, [{"CPU": 16.0, "GPU": 1.0}])] == ["reward"] * 4


def test_shortfall_message_names_what_is_missing_and_the_fix():
    b = bundles(**{"rollout.count": 2, "rollout.num_gpus": 1})
    message = describe_shortfall(b, [{"CPU": 2.0}])
    assert "2 rollout actor(s) needing {'CPU': 1.0, 'GPU': 1.0}" in message
    assert "the cluster has 2 CPUs and 0 GPUs on 1 node(s)" in message
    for fix in ("actors.<kind>.count", "max_workers", "ray.resource_wait_s"):
        assert fix in message


def test_an_autoscaler_request_that_is_not_met_is_withdrawn(monkeypatch):
    """The request persists until replaced. Would catch: a failed wait leaving the autoscaler to keep adding (and
    keeping) the GPU nodes it asked for after the run has given up."""
    requests = []
    monkeypatch.setattr("ray.autoscaler.sdk.request_resources",
                        lambda num_cpus=None, bundles=None: requests.append(bundles))

    class OneNode:  # the cluster view of Ray: a CPU node that never grows
        def nodes(self):
            return [{"Alive": True, "Resources": {"CPU": 8.0}}]

    cfg = load_config(None, ["actors.rollout.num_gpus=1", "ray.resource_wait_s=0.2"])
    with pytest.raises(ConfigError, match="cannot be placed"):
        ensure_resources(OneNode(), cfg)
    assert {"CPU": 1.0, "GPU": 1.0} in requests[0] and requests[-1] == [] and len(requests) == 2
    assert ensure_resources(OneNode(), load_config(None, [])) is False  # it fits: nothing asked, nothing to withdraw


def test_a_run_asking_for_a_gpu_on_a_cpu_machine_fails_before_any_actor(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", "--mode", "grpo", "--config", "configs/smoke.yaml",
         "actors.rollout.num_gpus=1", f"run_dir={run_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "1 rollout actor(s) needing {'CPU': 1.0, 'GPU': 1.0} each cannot be placed" in proc.stderr
    assert not (run_dir / "summary.json").exists()
    # Nothing was trained, so the folder takes the corrected command (its run.json made it a run to --resume,
    # which refuses the changed key, and a new run there was refused too).
    assert "takes the corrected command" in proc.stderr
    assert not (run_dir / "run.json").exists() and not (run_dir / "config.yaml").exists()
    from learner.main import prepare_run_dir
    from learner.resume import release_run_dirs

    try:
        assert prepare_run_dir(load_config("configs/smoke.yaml", [f"run_dir={run_dir}"]), "grpo") == run_dir
    finally:
        release_run_dirs()


def test_packed_checkpoint_loads_the_same_model(tiny_model, tmp_path):
    folder = save_model(tiny_model, tmp_path / "ckpt")
    packed = pack(folder)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "scheduler/scheduler_config.json"} <= set(packed)  # subfolders travel too
    loaded = load_packed(packed)
    for (name, a), b in zip(tiny_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_actor_loads_a_packed_checkpoint_and_an_empty_folder_is_refused(tiny_model, tmp_path):
    """Would catch load_checkpoint reading the packed mapping as a path (an actor on another node then fails), and
    an empty or missing folder packed into nothing (each actor then fails later, far from the cause)."""
    from actors.checkpoint import load_checkpoint

    loaded = load_checkpoint(pack(save_model(tiny_model, tmp_path / "ckpt")))
    for (name, a), b in zip(tiny_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(FileNotFoundError, match="empty or missing"):
            pack(folder)

def test_packed_checkpoint_cannot_write_outside_its_folder(tiny_model, tmp_path):
    packed = pack(save_model(tiny_model, tmp_path / "ckpt"))
    packed["../../escaped.json"] = b"{}"
    with pytest.raises(ValueError, match="outside its folder"):
        load_packed(packed)
