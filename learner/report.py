"""What a finished run prints above its summary path: the numbers a user looks for first, from summary.json.

GRPO: the held-out change of every reward with its interval (a single iteration's reward is not a result), the checks
the run was not trained on, the drift monitors against the start, the hacking verdict, and which checkpoint to use.
Pretraining: each reward of the final samples on held-out captions with its interval, and the checkpoint. Sampling:
where the images are, and their rewards with their intervals when scored.
"""

from __future__ import annotations


def _change(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def grpo_report(summary: dict) -> list[str]:
    """Lines for a finished GRPO run's summary (as written to summary.json)."""
    held_out = summary["eval"]
    rewards, checks = held_out["rewards"], held_out["checks"]
    rows = [(name, r, "") for name, r in rewards.items() if not (name == "total" and len(rewards) == 2)]  # one reward
    rows += [(name, r, "  (a check, not trained on)") for name, r in checks.items()]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"held out, {held_out['prompts']} prompts x {held_out['seeds']} noise seeds (before -> after, change "
             f"[{held_out['level']:.0%} interval over prompts]):"]
    lines += [f"  {name:<{width}}  {r['before']['mean']:.3f} -> {r['after']['mean']:.3f}  {_change(r['difference'])}"
              f"{note}" for name, r, note in rows]
    after = summary["monitors"]["after"]
    lines.append(f"against the start: saturation {after['saturation_ratio']:.2f}x, within-group diversity "
                 f"{after['diversity_ratio']:.2f}x, KL {after['kl_ref_per_transition']:.2f} nats per transition")
    lines.append("hacking signs: " + ("; ".join(summary["hacking"]) or "none"))
    if summary["checkpoint"] == summary["last_checkpoint"]:
        lines.append(f"checkpoint: {summary['checkpoint']}")
    else:  # grpo.stop_on_hacking kept an earlier evaluation's weights
        lines.append(f"checkpoint: {summary['checkpoint']} (step {summary['best']['step']}, the best evaluation "
                     f"without a sign of hacking; the last weights: {summary['last_checkpoint']})")
    return lines


def _means(rewards: dict) -> list[str]:
    width = max((len(name) for name in rewards), default=0)
    return [f"  {name:<{width}}  {r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
            for name, r in rewards.items()]


def pretrain_report(summary: dict) -> list[str]:
    """Lines for a finished pretraining run's summary."""
    held_out = summary["eval"]
    return [f"held out, {held_out['prompts']} captions x {held_out['seeds']} noise seeds (mean "
            f"[{held_out['level']:.0%} interval over captions]):", *_means(held_out["rewards"]),
            f"checkpoint: {summary['checkpoint']}"]


def sample_report(summary: dict) -> list[str]:
    """Lines for a finished `--mode sample` run's summary (rewards only with sample.score)."""
    lines = [f"{summary['images']} images of {summary['prompts']} prompts: {summary['grid']}, {summary['samples']}"]
    if summary["rewards"]:
        lines += ["rewards (mean [95% interval over prompts]):", *_means(summary["rewards"])]
    return lines


REPORTS = {"grpo": grpo_report, "pretrain": pretrain_report, "sample": sample_report}
