"""Smoke pretrain + GRPO through the real stack: DeepSpeed, Ray actors, a Redis stream, an MLflow store."""

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import safetensors.torch
import torch
from mlflow.tracking import MlflowClient

from actors.stream import EmbeddedRedis
from tests.cli import SMOKE, grpo_args, last_line, run_cli, summary_of

CHECKPOINT_FILES = ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                    "scheduler/scheduler_config.json", "README.md")


def test_pretrain_writes_summary_checkpoint_and_mlflow_run(pretrained, store):
    root, uri = store
    assert pretrained["mode"] == "pretrain" and pretrained["iterations"] == 6 and pretrained["device"] == "cpu"
    for key in ("wall_time_s", "samples_per_s", "mlflow_run_id", "checkpoint", "loss_final"):
        assert key in pretrained
    ckpt = Path(pretrained["checkpoint"])
    assert all((ckpt / name).is_file() for name in CHECKPOINT_FILES)
    card = (ckpt / "README.md").read_text()  # the model card says how it was made
    assert "mode: pretrain" in card and "iterations: 6 of 6" in card and "config_fingerprint: " in card
    assert "held_out_rewards" in card and '"ci95": {"compositional": [' in card
    # The final samples' rewards on held-out captions, each with its interval, as summary.json, MLflow and the
    # report printed above the summary's path give them.
    held_out = pretrained["eval"]
    assert held_out["prompts"] == 8 and held_out["seeds"] == 2
    assert set(held_out["rewards"]) == {"compositional", "jpeg_compressibility"}  # configs/smoke.yaml's
    score = held_out["rewards"]["compositional"]
    assert score["ci_low"] <= score["mean"] <= score["ci_high"] and score["ci_low"] < score["ci_high"]
    assert pretrained["eval_reward"] == {name: r["mean"] for name, r in held_out["rewards"].items()}
    printed = (root / "pretrain.stdout").read_text().splitlines()
    row = ["compositional", f"{score['mean']:.3f}", f"[{score['ci_low']:.3f},", f"{score['ci_high']:.3f}]"]
    assert row in [line.split() for line in printed], printed
    from proxmodel.model import load_model  # the checkpoint records what it was trained on
    recorded = load_model(ckpt).cfg
    assert recorded.trained_target == "conditional" and recorded.trained_steps == [3]
    client = MlflowClient(uri)
    run = client.get_run(pretrained["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {f"checkpoint/{name.split('/')[0]}" for name in CHECKPOINT_FILES} <= logged
    assert "loss" in run.data.metrics
    assert [run.data.metrics[f"eval_reward_compositional{part}"] for part in ("", "_ci_low", "_ci_high")] == \
        pytest.approx([score["mean"], score["ci_low"], score["ci_high"]])
    # MLflow's system metrics (mlflow.system_metrics, on by default), sampled every second in this run
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert "nonfinite_updates" not in run.data.metrics  # no step was skipped: the counter stays out of the log


def test_grpo_end_to_end_acks_every_entry_and_logs_every_iteration(pretrained, store):
    root, uri = store
    with EmbeddedRedis() as server:  # a real redis-server the test can inspect after the run
        proc = run_cli(
            "--mode", "grpo", "--config", str(SMOKE), f"run_dir={root / 'grpo'}", f"mlflow.tracking_uri={uri}",
            f"init_from={pretrained['checkpoint']}", f"redis.url=unix://{server.socket}",
            "grpo.stochastic_steps=1",  # the default's policy (stochastic early, then the ODE), 1 of smoke's 2
            "grpo.check_rewards=[compositional_strict]",  # a held-out check, as the default has
            env={"PROXRL_REDIS_PASSWORD": server.password},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(Path(last_line(proc)).read_text())
        # Above the path, what a user reads first: every held-out change and check as summary.json has it.
        report = proc.stdout.strip().splitlines()[:-1]
        for name, parts in {**summary["eval"]["rewards"], **summary["eval"]["checks"]}.items():
            row = next((line for line in report if line.split()[:1] == [name]), None)
            change = parts["difference"]
            assert row is not None and f"{parts['before']['mean']:.3f} -> {parts['after']['mean']:.3f}" in row and \
                f"{change['mean']:+.3f} [{change['ci_low']:+.3f}, {change['ci_high']:+.3f}]" in row, (name, report)
        assert f"checkpoint: {summary['checkpoint']}" in report and "hacking signs: " in "\n".join(report)

        client = redis.Redis(unix_socket_path=server.socket, password=server.password)
        key = f"proxrl:{summary['mlflow_run_id']}:experience"
        iterations, groups = 2, 2  # configs/smoke.yaml
        assert summary["groups_written"] == iterations * groups
        assert client.xlen(key) == 0  # every entry was acknowledged by every rank, then trimmed
        groups_info = client.xinfo_groups(key)
        assert [g["name"] for g in groups_info] == [b"learner-0"]  # one learner rank
        for info in groups_info:  # every entry was delivered to every rank, and acknowledged
            assert info["pending"] == 0
            assert info["last-delivered-id"] == client.xinfo_stream(key)["last-generated-id"]

    assert summary["mode"] == "grpo" and summary["iterations"] == iterations
    for key in ("wall_time_s", "samples_per_s", "checkpoint", "reward_first", "reward_last"):
        assert key in summary
    ckpt = Path(summary["checkpoint"])
    assert all((ckpt / name).is_file() for name in CHECKPOINT_FILES)
    card = (ckpt / "README.md").read_text()
    assert "mode: grpo" in card and "held_out: " in card and '"compositional": {"before": ' in card
    mlflow = MlflowClient(uri)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["grpo.stochastic_steps"] == "1"
    rewards = mlflow.get_metric_history(run.info.run_id, "reward_mean")
    assert sorted(m.step for m in rewards) == list(range(iterations))
    assert rewards[0].value == pytest.approx(summary["reward_first"])
    # Two rewards are mixed (0.7 compositional + 0.3 JPEG compressibility): each has its own curve.
    per_model = {name: {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, f"reward_{name}")}
                 for name in ("compositional", "jpeg_compressibility")}
    for name, curve in per_model.items():
        assert sorted(curve) == list(range(iterations)), name
    for step in range(iterations):
        mixed = 0.7 * per_model["compositional"][step] + 0.3 * per_model["jpeg_compressibility"][step]
        assert {m.step: m.value for m in rewards}[step] == pytest.approx(mixed, abs=1e-5)
    # On-policy (one optimiser step per batch): the policy ratio is 1, through Ray, Redis and DeepSpeed.
    # ... which first_pass_log_ratio_max measures; sync mode, one update per batch, no skipped step: the metrics
    # these settings fix at 0 are not logged every iteration.
    for constant in ("ratio_max_dev", "clip_frac", "policy_lag_max", "groups_stale", "acked", "nonfinite_updates"):
        assert constant not in run.data.metrics, constant
    first_pass = mlflow.get_metric_history(run.info.run_id, "first_pass_log_ratio_max")
    # (grpo.recompute=batch re-scores all groups in one call: 1 to kernel rounding, 0 here, <= 4e-7 measured elsewhere)
    assert sorted(m.step for m in first_pass) == list(range(iterations)) and all(m.value <= 1e-6 for m in first_pass)
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"samples.png", "config.yaml", "summary.json", "eval_prompts.txt", "checkpoint"} <= artifacts
    assert {"checkpoint/model_index.json", "checkpoint/unet", "checkpoint/README.md"} <= {
        a.path for a in mlflow.list_artifacts(run.info.run_id, "checkpoint")}
    # Each evaluation's images with their captions and rewards: the held-out prompts, in order, scored as logged.
    prompts = Path(mlflow.download_artifacts(run.info.run_id, "eval_prompts.txt", str(root))).read_text().splitlines()
    for step in (0, iterations):
        table = json.loads(Path(mlflow.download_artifacts(run.info.run_id, f"samples/step{step:05d}.json",
                                                          str(root))).read_text())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert [r["prompt"] for r in rows] == prompts
        assert all(0.0 <= r["compositional"] <= 1.0 and r["image"] for r in rows)
    # Held-out evaluation: each reward and the total, before / after / paired difference, each with its interval.
    held_out = summary["eval"]
    assert held_out["prompts"] == 4 and held_out["seeds"] == 2
    assert set(held_out["rewards"]) == {"compositional", "jpeg_compressibility", "total"}
    assert set(held_out["checks"]) == {"compositional_strict"}
    for name, parts in held_out["rewards"].items():
        for part in ("before", "after", "difference"):
            assert parts[part]["ci_low"] <= parts[part]["mean"] <= parts[part]["ci_high"], (name, part)
        assert parts["difference"]["mean"] == pytest.approx(parts["after"]["mean"] - parts["before"]["mean"])
    # ... and every prompt's scores under each noise seed, the matrices those intervals came from (for paired
    # comparisons between runs): the same prompts, the means summary.json reports, the first noise the logged table's.
    scores = json.loads(Path(mlflow.download_artifacts(run.info.run_id, "held_out_scores.json", str(root))).read_text())
    assert scores["prompts"] == prompts and Path(summary["held_out_scores"]).is_file()
    for part, means in (("before", summary["eval_reward_before"]), ("after", summary["eval_reward_after"])):
        assert set(scores[part]) == set(means)
        for name, matrix in scores[part].items():
            assert np.asarray(matrix).shape == (4, 2) and np.mean(matrix) == pytest.approx(means[name]), (part, name)
    final_table = [r["compositional"] for r in rows]  # (rows: the last table read above, the final evaluation's)
    assert [row[0] for row in scores["after"]["compositional"]] == pytest.approx(final_table)
    metrics = run.data.metrics
    for key in ("eval_reward_total_ci_low", "eval_reward_gain_total", "monitor_prompt_diversity_ratio",
                "monitor_kl_ref_per_transition"):
        assert key in metrics, key
    # Memory of every kind of process, each iteration (the reward actors at each evaluation: smoke's eval_every 1),
    # so growth over a run shows as a curve: resident MB of a live Python process with torch, and the Redis
    # server's used memory.
    for name, steps in (("learner_rss_mb", range(iterations)), ("rollout_rss_mb", range(iterations)),
                        ("driver_rss_mb", range(iterations)), ("reward_rss_mb", range(iterations + 1))):
        history = mlflow.get_metric_history(run.info.run_id, f"memory/{name}")
        assert sorted(m.step for m in history) == list(steps) and all(100 < m.value < 24 * 1024 for m in history), name
    redis_mb = mlflow.get_metric_history(run.info.run_id, "memory/redis_used_mb")
    assert len(redis_mb) == iterations and all(0 < m.value < 4096 for m in redis_mb)


def test_unknown_config_key_fails_fast_naming_it(tmp_path):
    start = time.monotonic()
    proc = run_cli("--mode", "grpo", "--config", str(SMOKE), "nonexistent.key=1", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert "nonexistent" in proc.stderr and "unknown config key" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing started, nothing written
    assert time.monotonic() - start < 60


def first_entry_seen(server, stop: threading.Event, seen: dict) -> None:
    """Poll the stream for its first entry while a run writes it (acknowledged entries are trimmed right away)."""
    client = server.address.connect()
    while not stop.is_set() and not seen:
        for key in client.scan_iter(match="proxrl:*:experience"):
            entries = client.xrange(key, count=1)
            if entries:
                seen["fields"] = entries[0][1]
                return
        time.sleep(0.02)


def grpo_watching_the_stream(pretrained: dict, root: Path, uri: str, name: str, *overrides: str) -> tuple[dict, dict]:
    """A smoke GRPO run on its own embedded Redis (no mid-run evaluation) while a thread reads the stream's first
    entry: (the run's summary, that entry's safetensors tensors)."""
    seen, stop = {}, threading.Event()
    with EmbeddedRedis() as server:
        watcher = threading.Thread(target=first_entry_seen, args=(server, stop, seen), daemon=True)
        watcher.start()
        proc = run_cli(
            "--mode", "grpo", "--config", str(SMOKE), f"run_dir={root / name}", f"mlflow.tracking_uri={uri}",
            f"init_from={pretrained['checkpoint']}", f"redis.url=unix://{server.socket}", "grpo.eval_every=0",
            *overrides, env={"PROXRL_REDIS_PASSWORD": server.password},
        )
        stop.set()
        watcher.join()
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(Path(last_line(proc)).read_text())
        assert seen, "no stream entry was seen while the run wrote them"
        tensors = safetensors.torch.load(seen["fields"][b"tensors"])
    assert summary["stream"]["pending"] == 0 and summary["stream"]["entries"] == summary["groups_written"]
    return summary, tensors


@pytest.mark.slow  # (the default suite runs the default objective's and the policy gradient's end to end)
def test_forward_objective_runs_end_to_end_without_trajectories_on_the_wire(pretrained, store):
    root, uri = store
    summary, tensors = grpo_watching_the_stream(pretrained, root, uri, "forward", "grpo.objective=forward")
    assert "samples" in tensors and "states" not in tensors and "log_probs" not in tensors
    history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "forward_loss")
    assert len(history) == summary["iterations"] and all(math.isfinite(m.value) for m in history)


def test_the_defaults_direct_objective_trains_the_final_prox_through_the_whole_stack(pretrained, store):
    """configs/default.yaml's objective (direct: the dense verifier's pixel gradient through the replayed final prox)
    through Ray, Redis, DeepSpeed and MLflow: the rollouts must ship their recorded states (the replay needs them),
    the learner must build the differentiable reward itself and log its value and the KL every iteration, and the
    exported weights must differ from the start. Catches a stack that wires only the policy gradient."""
    root, uri = store
    summary, tensors = grpo_watching_the_stream(pretrained, root, uri, "direct", "grpo.objective=direct",
                                                "grpo.stochastic_steps=null",
                                                "grpo.direct_reward=compositional_soft_strict")
    assert "states" in tensors  # y_N..y_1 of every rollout: the replay starts from them
    client = MlflowClient(uri)
    for metric in ("direct_reward", "kl"):
        history = client.get_metric_history(summary["mlflow_run_id"], metric)
        assert len(history) == summary["iterations"] and all(math.isfinite(m.value) for m in history), metric
    unet = "unet/diffusion_pytorch_model.safetensors"
    start = safetensors.torch.load_file(str(Path(pretrained["checkpoint"]) / unet))
    end = safetensors.torch.load_file(str(Path(summary["checkpoint"]) / unet))
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)


@pytest.mark.slow
def test_async_grpo_respects_the_staleness_bound(pretrained, store):
    root, uri = store
    proc = run_cli(
        "--mode", "grpo", "--config", str(SMOKE), f"run_dir={root / 'async'}", f"mlflow.tracking_uri={uri}",
        f"init_from={pretrained['checkpoint']}", "grpo.max_staleness=1", "grpo.iterations=3", "grpo.eval_every=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(Path(last_line(proc)).read_text())
    assert summary["stream"]["pending"] == 0 and summary["stream"]["entries"] == summary["groups_written"] == 6
    mlflow = MlflowClient(uri)
    lag = {m.step: m.value for m in mlflow.get_metric_history(summary["mlflow_run_id"], "policy_lag_trained_max")}
    # Iteration 0 trains on the starting policy's data; after that rollouts run one version ahead, never more.
    assert lag == {0: 0.0, 1: 1.0, 2: 1.0}
    stale = mlflow.get_metric_history(summary["mlflow_run_id"], "groups_stale")
    assert [m.value for m in stale] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_an_async_run_times_both_layouts_and_the_actors_follow_the_one_it_keeps(pretrained, store):
    """async_probe 1 on 7 iterations: 0 warm-up and 1 timed synchronous (all cores each), 2 the switch and 3 timed
    overlapped (the node's cores split between the rollout actor and the learner), then the faster. Would catch:
    thread counts never changed (or changed after the rollout had run), the loop overlapping while it times the
    synchronous layout, a choice that contradicts the times."""
    import os

    root, uri = store
    proc = run_cli(*grpo_args(root, uri, pretrained, "layout", "grpo.max_staleness=1", "grpo.async_probe=1",
                              "grpo.iterations=7", "actors.torch_threads=0"))
    summary = summary_of(proc)
    layout = summary["layout"]
    assert len(layout["times"]["sync"]) == len(layout["times"]["async"]) == 1
    per_group = {n: layout["times"][n][0] / max(1, layout["groups"][n][0]) for n in ("sync", "async")}
    faster = "async" if per_group["async"] < per_group["sync"] else "sync"
    assert layout["chosen"] == faster and "layout: " in proc.stdout
    history = MlflowClient(uri).get_metric_history
    run_id = summary["mlflow_run_id"]
    lag = {m.step: m.value for m in history(run_id, "policy_lag_trained_max")}
    rollout = {m.step: m.value for m in history(run_id, "threads_rollout")}
    learner = {m.step: m.value for m in history(run_id, "threads_learner")}
    cores = os.cpu_count()
    split = max(1, cores // 2)  # smoke: one rollout actor and one learner rank on this node
    assert [lag[s] for s in range(4)] == [0, 0, 0, 1]  # synchronous until the switch; then one version ahead
    assert [rollout[s] for s in range(4)] == [cores, cores, split, split]
    assert [learner[s] for s in range(4)] == [cores, cores, split, split]
    kept = {"sync": cores, "async": split}[layout["chosen"]]
    assert rollout[5] == rollout[6] == learner[4] == learner[6] == kept  # (rollout 4 was launched overlapped)
    assert lag[6] == (1 if layout["chosen"] == "async" else 0)
    assert summary["stream"]["pending"] == 0 and summary["groups_written"] == 14


@pytest.mark.slow
def test_time_limit_stops_launching_and_trains_what_is_in_flight(pretrained, store):
    """Also in bf16 (deepspeed.bf16 reaches the rollout actors: their log-probs are the learner's exactly)."""
    root, uri = store
    proc = run_cli(
        "--mode", "grpo", "--config", str(SMOKE), f"run_dir={root / 'timed'}", f"mlflow.tracking_uri={uri}",
        f"init_from={pretrained['checkpoint']}", "grpo.iterations=100", "grpo.time_limit_s=0.000001",
        "grpo.eval_every=0", "deepspeed.bf16=true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(Path(last_line(proc)).read_text())
    assert summary["iterations"] == 1 and summary["groups_written"] == 2
    assert summary["stream"]["pending"] == 0
    assert (root / "timed" / "samples" / "step00001.png").is_file()
    first_pass = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "first_pass_log_ratio_max")
    assert len(first_pass) == 1 and first_pass[0].value <= 1e-6  # bf16 both sides, up to the batch call's rounding


@pytest.mark.slow
def test_the_time_limit_counts_training_not_the_evaluations_in_between(pretrained, store):
    """Every iteration is followed by a held-out evaluation (1536 images, 8 s here) that alone takes longer than the whole
    limit (3 s), while an iteration of training takes a fraction of it (0.3-0.4 s here). Would catch: evaluation time
    counted against grpo.time_limit_s (the run would stop after its first iteration), which gave the policies of
    benchmarks/grpo_reward_vs_time.py unequal training time. How many iterations fit is read from the run's own
    iteration_s, not assumed, so a loaded machine (slower iterations) changes the expected count, not the verdict."""
    root, uri = store
    limit = 3.0
    proc = run_cli(
        "--mode", "grpo", "--config", str(SMOKE), f"run_dir={root / 'timed-evals'}", f"mlflow.tracking_uri={uri}",
        f"init_from={pretrained['checkpoint']}", "grpo.iterations=3", "grpo.eval_every=1", "grpo.eval_prompts=128",
        "grpo.eval_seeds=12", f"grpo.time_limit_s={limit}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(Path(last_line(proc)).read_text())
    client = MlflowClient(uri)
    evals = client.get_metric_history(summary["mlflow_run_id"], "eval_s")
    trained = [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], "iteration_s"),
                                       key=lambda m: m.step)]
    assert trained[0] < limit, f"the first iteration ({trained[0]:.1f} s) must fit the limit for the test to mean anything"
    assert min(m.value for m in evals) > limit, f"an evaluation ({evals}) must outlast the limit for the test to mean anything"
    # iteration k + 1 is launched while the training time so far (the evaluations excluded) is under the limit
    expected = 1 + sum(1 for k in (1, 2) if sum(trained[:k]) < limit)
    assert summary["iterations"] == expected >= 2, (summary, trained)
    assert [m.step for m in evals] == list(range(1, expected))  # the evaluations between iterations, each timed
    assert summary["eval_time_s"] == pytest.approx(sum(m.value for m in evals), rel=0.01)
    assert summary["wall_time_s"] - summary["eval_time_s"] == pytest.approx(sum(trained), abs=1.0)  # what it counted


@pytest.mark.slow
def test_the_driver_holds_no_reward_model_and_runs_no_network(pretrained, store, monkeypatch):
    """GRPO's evaluations (the start's, each eval_every, the end's) are drawn by the rollout actors and scored by the
    reward actors: the run goes in this process, where any network evaluation or any reward model built fails it (Ray's
    actors are other processes, untouched). Two rollout actors share the held-out prompts in chunks of two; the
    start's logged rewards must be the base's own on each chunk's noise, in the prompts' order."""
    import numpy as np
    import torch

    import learner.grpo
    import rewards
    import rewards.base
    from actors.rollout import eval_seed
    from learner.main import main
    from proxmodel.generate import generate
    from proxmodel.model import ProxT2I, load_model

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"the driver {what}")
        return fail

    monkeypatch.setattr(ProxT2I, "_net", forbidden("ran the network"))
    for module in (rewards, rewards.base):
        monkeypatch.setattr(module, "build", forbidden("built a reward model"))
    monkeypatch.setattr(learner.grpo, "EVAL_CHUNK", 2)
    root, uri = store
    run_dir = root / "driver"
    code = main(["--mode", "grpo", "--config", str(SMOKE), f"run_dir={run_dir}", f"mlflow.tracking_uri={uri}",
                 f"init_from={pretrained['checkpoint']}", "actors.rollout.count=2", "actors.rollout.num_cpus=0.5",
                 "grpo.iterations=1", "grpo.check_rewards=[compositional_strict]"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"]["prompts"] == 4 and summary["eval"]["seeds"] == 2
    assert set(summary["eval"]["checks"]) == {"compositional_strict"}
    assert summary["devices"] == {"rollout": ["cpu", "cpu"], "reward": ["cpu"], "learner": ["cpu"]}
    assert {"diversity", "saturation", "kl_ref", "prompt_diversity"} <= set(summary["monitors"]["after"])

    monkeypatch.undo()  # the network and rewards again, for the test's own computation of what was logged
    table = json.loads(Path(MlflowClient(uri).download_artifacts(summary["mlflow_run_id"], "samples/step00000.json",
                                                                 str(root))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    base = load_model(pretrained["checkpoint"]).eval()
    reward = rewards.build("compositional")
    expected = []
    for chunk in range(2):
        prompts = [r["prompt"] for r in rows[2 * chunk: 2 * chunk + 2]]
        with torch.no_grad():
            images = generate(base, prompts, 3, eval_seed(0, 0, chunk), 1.0, "hybrid", 1.0)
        expected += reward.score(images, prompts).tolist()
    np.testing.assert_allclose([r["compositional"] for r in rows], expected, atol=1e-6)


def grpo_summary(rewards: dict, checks: dict, hacking: list, best_step: int = 4) -> dict:
    """The parts of a GRPO summary.json the report reads; each reward's mean before and after, and its change."""
    def row(before, after, low, high):
        return {"before": {"mean": before}, "after": {"mean": after},
                "difference": {"mean": after - before, "ci_low": low, "ci_high": high}}

    return {"eval": {"prompts": 8, "seeds": 2, "level": 0.95, "rewards": {k: row(*v) for k, v in rewards.items()},
                     "checks": {k: row(*v) for k, v in checks.items()}},
            "monitors": {"after": {"saturation_ratio": 1.5, "diversity_ratio": 0.25, "kl_ref_per_transition": 0.25}},
            "hacking": hacking, "checkpoint": f"/runs/g/best-it{best_step:05d}",
            "last_checkpoint": "/runs/g/checkpoint", "best": {"step": best_step}}


def test_the_report_says_what_changed_what_was_not_trained_on_and_which_checkpoint_to_use():
    """The lines a finished run prints above its summary path, without a run. Would catch: before and after swapped,
    an interval's ends swapped or unsigned, a check shown as trained on, the total hidden when several rewards add
    up to it (or shown when it is the one reward again), the monitors mixed up, no verdict when there is no sign of
    hacking, the kept earlier checkpoint unexplained, or a sampling run's rewards left out."""
    from learner.report import REPORTS

    one = grpo_summary({"compositional": (0.5, 0.75, 0.125, 0.375), "total": (0.5, 0.75, 0.125, 0.375)},
                       {"clip": (0.25, 0.125, -0.25, -0.05)}, [])
    one["checkpoint"] = one["last_checkpoint"]
    lines = REPORTS["grpo"](one)
    assert lines[0] == "held out, 8 prompts x 2 noise seeds (before -> after, change [95% interval over prompts]):"
    assert lines[1].split() == ["compositional", "0.500", "->", "0.750", "+0.250", "[+0.125,", "+0.375]"]
    assert lines[2].split()[:7] == ["clip", "0.250", "->", "0.125", "-0.125", "[-0.250,", "-0.050]"]
    assert lines[2].endswith("(a check, not trained on)") and "a check" not in lines[1]
    assert not any(line.split()[:1] == ["total"] for line in lines)  # one reward: the total is that reward again
    assert lines[3] == "against the start: saturation 1.50x, within-group diversity 0.25x, KL 0.25 nats per transition"
    assert lines[4:] == ["hacking signs: none", "checkpoint: /runs/g/checkpoint"]

    two = grpo_summary({"a": (0.5, 0.5, -0.1, 0.1), "b": (0.5, 0.5, -0.1, 0.1), "total": (1.0, 1.0, -0.2, 0.2)}, {},
                       ["saturation 3.0x", "diversity 0.1x"])
    lines = REPORTS["grpo"](two)
    assert [line.split()[0] for line in lines[1:4]] == ["a", "b", "total"]
    assert "hacking signs: saturation 3.0x; diversity 0.1x" in lines
    assert lines[-1] == ("checkpoint: /runs/g/best-it00004 (step 4, the best evaluation without a sign of hacking; "
                         "the last weights: /runs/g/checkpoint)")

    pretrain = {"eval": {"prompts": 8, "seeds": 2, "level": 0.95,
                         "rewards": {"compositional": {"mean": 0.5, "ci_low": 0.25, "ci_high": 0.75}}},
                "checkpoint": "/runs/p/checkpoint"}
    assert REPORTS["pretrain"](pretrain) == [
        "held out, 8 captions x 2 noise seeds (mean [95% interval over captions]):",
        "  compositional  0.500 [0.250, 0.750]", "checkpoint: /runs/p/checkpoint"]
    pretrain["eval"]["rewards"] = {}  # (no reward configured: the header and the checkpoint still print)
    assert REPORTS["pretrain"](pretrain)[-1] == "checkpoint: /runs/p/checkpoint"
    sample = {"images": 8, "prompts": 4, "grid": "/runs/s/samples.png", "samples": "/runs/s/samples.json",
              "rewards": {"clip": {"mean": 0.25, "ci_low": 0.125, "ci_high": 0.375}}}
    assert REPORTS["sample"](sample) == ["8 images of 4 prompts: /runs/s/samples.png, /runs/s/samples.json",
                                         "rewards (mean [95% interval over prompts]):", "  clip  0.250 [0.125, 0.375]"]
    assert REPORTS["sample"]({**sample, "rewards": {}}) == [  # not scored (sample.score false)
        "8 images of 4 prompts: /runs/s/samples.png, /runs/s/samples.json"]
