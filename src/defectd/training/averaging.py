"""Weight averaging over the end of a run (stochastic weight averaging, Izmailov et al. 2018).

``defectd train --average-last F`` adds the network's weights after every epoch that ends in
the last ``F`` of the run (by the schedule's progress: steps or wall time, whichever is
further along) to a running mean. The final model is that mean, with the batch-norm
statistics recomputed on one epoch of training draws: averaged weights need their own
statistics, the running ones belong to the last epoch's weights.

Why: the epochs at the end of a run differ more on unseen parts than a small validation split
can tell apart (docs/training.md, "Which checkpoint"); the mean of many of them sits between
them instead of on one of them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from defectd.model.unet import UNet


class WeightAverage:
    """Running mean of a network's parameters, in float32, over :meth:`add` calls."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: dict[str, torch.Tensor] = {}

    def add(self, net: UNet) -> None:
        self.count += 1
        with torch.no_grad():
            for name, p in net.named_parameters():
                value = p.detach().float()
                if name not in self._mean:
                    self._mean[name] = value.clone()
                else:
                    self._mean[name] += (value - self._mean[name]) / self.count

    def network(
        self,
        net: UNet,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        bf16: bool = False,
    ) -> UNet:
        """A copy of ``net`` holding the mean weights and batch-norm statistics recomputed
        over ``batches`` (the training loader: one epoch of the draws the run trained on)."""
        if not self.count:
            raise ValueError("no weights were averaged")
        avg = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in avg.named_parameters():
                p.copy_(self._mean[name].to(p.dtype))
        norms = [m for m in avg.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return avg.eval()
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative mean over the batches
        was_training = avg.training
        avg.train()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x, _ in batches:
                avg(x.contiguous(memory_format=torch.channels_last))
        for m, momentum in momenta.items():
            m.momentum = momentum
        avg.train(was_training)
        return avg

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": dict(self._mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self._mean = {k: v.float() for k, v in state["mean"].items()}
