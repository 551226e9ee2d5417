"""The data anchor: the pretraining loss on training data, added to every GRPO optimiser step (`grpo.data_anchor`).

The reward gradient has no term that keeps the policy on the data: measured on the shipped base, any update built
from the policy's own samples (best-of-group fine-tuning, advantage-weighted regression) loses the held-out reward
within a few steps, while the same number of steps of the pretraining loss on the data leaves it where it was
(proximal matching at the base's last zeta: +0.003 [-0.015, +0.021] after 100 steps at lr 1e-4). Adding that loss
to the update is a restoring force toward the pretrained operator (InstructGPT's PPO-ptx, for a prox model), not a
source of reward: docs/results.md's session 6 table compares it with and without the reward.

Each optimiser step takes the next `grpo.data_anchor_batch` samples of the data stream (rank r of W takes its own
slice), from `data.cursor` on, so a resumed run replays the same batches; its (t, lam, noise) pairs come from the
learner's step generator, which the run state saves.
"""

from __future__ import annotations

import torch

from learner.config import RunConfig
from learner.data import build_source, drop_captions
from proxmodel.losses import in_loss_space, make_score_pairs, make_training_pairs, mse_loss, proximal_matching_loss
from proxmodel.model import ProxT2I
from proxmodel.schedule import VPSchedule


class DataAnchor:
    """The weighted pretraining loss of a model on the data stream's batch for each optimiser step."""

    def __init__(self, cfg: RunConfig, model: ProxT2I, rank: int = 0, world: int = 1):
        mc = model.cfg
        self.weight, self.batch = cfg.grpo.data_anchor, cfg.grpo.data_anchor_batch
        self.source = build_source(cfg.data, mc.image_size, mc.channels)
        self.cursor, self.rank, self.world = cfg.data.cursor, rank, world
        self.dropout = cfg.pretrain.cfg_dropout  # the empty caption (guidance's other branch) is anchored too
        self.zeta = cfg.pretrain.zeta0 / 2  # the last stage of pretraining's loss schedule
        self.t_min = cfg.pretrain.score_t_min
        self.steps = mc.trained_steps or cfg.pretrain.step_candidates
        self.variants = tuple(mc.trained_variants or cfg.pretrain.prox_variants)
        self.schedule = VPSchedule()
        self.target = cfg.pretrain.target  # pretraining's eps target
        self.loss_space = cfg.pretrain.loss_space  # and where its loss measures the error

    def loss(self, engine, model: ProxT2I, step: int, generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
        """weight x the pretraining loss of `engine` on the batch of optimiser step `step` (0-based)."""
        first = self.cursor + (step * self.world + self.rank) * self.batch
        images, captions = self.source.batch(first, self.batch)
        x0 = model.encode_images(images.to(device))
        tokens = model.tokenize(drop_captions(captions, self.dropout, generator), device)
        if model.cfg.kind == "score":
            y, t, xi = make_score_pairs(x0, self.schedule, self.t_min, generator)
            lam = torch.zeros_like(t)
        else:
            y, t, lam, xi = make_training_pairs(x0, self.schedule, self.steps, generator, self.variants,
                                                target=self.target)
        eps, xi = in_loss_space(engine(y, t, lam, tokens=tokens), xi, t, lam, model.cfg.kind, self.schedule,
                                self.loss_space)
        if model.cfg.kind == "score":
            return self.weight * mse_loss(eps, xi)
        return self.weight * proximal_matching_loss(eps, xi, self.zeta)
