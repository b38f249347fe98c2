"""Combining loss terms: static weights, GradNorm, uncertainty weighting, ratio weighting, and schedules.

A weighting turns the per-term losses ``{name: scalar}`` into the one scalar that
is back-propagated. The term weights are what get logged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from alignkd.errors import ConfigError
from alignkd.terms import ScheduleConfig, role


def schedule_value(s: ScheduleConfig | None, step: int, total_steps: int, default: float) -> float:
    """Value of a schedule at ``step`` (``default`` when there is no schedule)."""
    if s is None:
        return default
    if s.kind == "step":
        switch = s.steps if s.steps is not None else total_steps // 2
        return s.start if step < switch else s.end
    steps = s.steps if s.steps is not None else total_steps
    frac = min(max(step / max(steps, 1), 0.0), 1.0)
    if s.kind == "constant":
        return s.start
    if s.kind == "warmup":
        return s.start * frac
    if s.kind == "linear":
        return s.start + (s.end - s.start) * frac
    if s.kind == "cosine":
        return s.end + (s.start - s.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule kind {s.kind!r}")


class Weighting(nn.Module):
    """Static weights; the base of the dynamic strategies."""

    def __init__(self, names: list[str], init: list[float]):
        super().__init__()
        self.names = list(names)
        self.register_buffer("init", torch.tensor(init, dtype=torch.float32))

    def weights(self) -> torch.Tensor:
        """``[K]`` current weights (no gradient into the model's loss)."""
        return self.init

    def combine(self, losses: dict[str, torch.Tensor], multipliers: list[float]) -> torch.Tensor:
        """Weighted sum of the terms; ``multipliers`` are the weight schedules at this step."""
        w = self.weights().detach()
        return sum(w[i] * multipliers[i] * losses[n] for i, n in enumerate(self.names))

    def due(self, step: int) -> bool:
        """Whether ``update`` runs at this optimizer step (on its first micro-batch)."""
        return False

    def update(
        self, losses: dict[str, torch.Tensor], multipliers: list[float], shared: list[nn.Parameter], reduce=None
    ) -> None:
        """Adjust the weights after a step's forward (no-op for static)."""

    def model_params(self) -> list[nn.Parameter]:
        """Parameters trained by the main optimizer along with the student."""
        return []

    def log(self) -> dict[str, float]:
        return {f"w/{n}": float(v) for n, v in zip(self.names, self.weights().detach().cpu(), strict=True)}


class GradNorm(Weighting):
    """GradNorm (Chen et al., ICML 2018).

    Each term's weighted gradient norm G_i = w_i * ||d L_i / d W|| on shared
    parameters W is pulled towards mean(G) * r_i**alpha, where r_i is the term's
    loss ratio L_i(t) / L_i(0) relative to the mean ratio: terms that train slowly
    get larger weights. The weights are renormalised to sum to the number of terms
    and kept positive.
    """

    def __init__(self, names: list[str], init: list[float], *, alpha: float = 1.5, lr: float = 0.025, every: int = 1):
        super().__init__(names, init)
        self.every = every
        """Update every this many optimizer steps (each update costs one extra backward per term)."""
        k = len(names)
        w0 = torch.tensor(init, dtype=torch.float32).clamp(min=1e-3)
        self.w = nn.Parameter(w0 * k / w0.sum())
        self.alpha = alpha
        self.opt = torch.optim.Adam([self.w], lr=lr)
        self.register_buffer("initial_losses", torch.zeros(k))

    def weights(self) -> torch.Tensor:
        return self.w

    def due(self, step: int) -> bool:
        return step % self.every == 0

    # The weights' own optimizer state travels in state_dict() with the weights.
    def get_extra_state(self):
        return self.opt.state_dict()

    def set_extra_state(self, state) -> None:
        self.opt.load_state_dict(state)

    def update(self, losses, multipliers, shared, reduce=None) -> None:
        k = len(self.names)
        values = torch.stack([losses[n].detach().float() for n in self.names])
        norms = []
        for i, n in enumerate(self.names):
            grads = torch.autograd.grad(multipliers[i] * losses[n], shared, retain_graph=True, allow_unused=True)
            sq = sum((g.float().pow(2).sum() for g in grads if g is not None), torch.zeros((), device=values.device))
            norms.append(sq)
        sq_norms = torch.stack(norms).to(self.w.device)
        values = values.to(self.w.device)
        if reduce is not None:  # every process must take the same step
            sq_norms, values = reduce(sq_norms), reduce(values) / reduce(torch.ones((), device=values.device))
        g = sq_norms.sqrt()
        if float(self.initial_losses.abs().sum()) == 0.0:
            self.initial_losses.copy_(values.clamp(min=1e-12))
        ratio = values / self.initial_losses
        rel = ratio / ratio.mean().clamp(min=1e-12)
        big_g = self.w * g
        target = (big_g.mean() * rel.pow(self.alpha)).detach()
        gradnorm_loss = (big_g - target).abs().sum()
        self.opt.zero_grad(set_to_none=True)
        self.w.grad = torch.autograd.grad(gradnorm_loss, self.w)[0]
        self.opt.step()
        with torch.no_grad():
            self.w.clamp_(min=1e-4)
            self.w.mul_(k / self.w.sum())


class Uncertainty(Weighting):
    """Homoscedastic uncertainty weighting (Kendall et al., CVPR 2018).

    total = sum_i exp(-s_i) * L_i + s_i with learnable log-variances s_i, trained
    with the model by the main optimizer. s_i starts at -log(weight_i) so the
    first step uses the configured weights.
    """

    def __init__(self, names: list[str], init: list[float]):
        super().__init__(names, init)
        w0 = torch.tensor(init, dtype=torch.float32).clamp(min=1e-3)
        self.log_vars = nn.Parameter(-w0.log())

    def weights(self) -> torch.Tensor:
        return torch.exp(-self.log_vars)

    def model_params(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def combine(self, losses, multipliers):
        # The schedule multiplies the whole term, regulariser included, so a term
        # switched off by its schedule leaves its log-variance alone.
        return sum(
            multipliers[i] * (torch.exp(-self.log_vars[i]) * losses[n] + self.log_vars[i])
            for i, n in enumerate(self.names)
        )


class Ratio(Weighting):
    """Each feature term scaled to the output-distribution term's value (Minitron, Muralidharan et al. 2024).

    At every optimizer step (on its first micro-batch, the values averaged over
    processes) feature term i gets w_i = weight_i * L_ref / L_i, both values
    detached, where L_ref is the first kl or dkd term: each feature term then
    weighs as much as the output KL, whatever its own scale. The reference and
    ground-truth terms keep their configured weights. A ratio with a side that is
    0 or not finite (a term with nothing counted) is skipped: the weight keeps its
    last value. The weighted term's gradient is L_ref * grad(log L_i), large while
    L_i is near 0 (an embedding term on a student that copied the teacher's
    embeddings), so such a term is better left to static weights.
    """

    def __init__(self, names: list[str], init: list[float], roles: list[str]):
        super().__init__(names, init)
        if "output" not in roles:
            raise ConfigError(
                "weighting.strategy: ratio scales feature terms to the first kl or dkd term, and there is none; "
                "add one or choose another strategy"
            )
        self.reference = roles.index("output")
        self.scaled = [r == "feature" for r in roles]
        self.register_buffer("w", self.init.clone())

    def weights(self) -> torch.Tensor:
        return self.w

    def due(self, step: int) -> bool:
        return True

    def update(self, losses, multipliers, shared, reduce=None) -> None:
        values = torch.stack([losses[n].detach().float() for n in self.names]).to(self.w.device)
        if reduce is not None:  # every process must use the same weights
            values = reduce(values) / reduce(torch.ones((), device=values.device))
        ref = values[self.reference]
        for i, scaled in enumerate(self.scaled):
            v = values[i]
            if scaled and bool(torch.isfinite(ref) & torch.isfinite(v) & (ref > 0) & (v > 0)):
                self.w[i] = self.init[i] * ref / v


@dataclass(frozen=True)
class WeightingType:
    """One weighting strategy (the value of ``weighting.strategy``): what it does and how it is built."""

    build: Callable[..., Weighting]
    """``(names, init, *, alpha, lr, every, kinds) -> Weighting``."""
    does: str
    """What it does, for the configuration reference."""


def _ratio(names, init, *, kinds=None, **_) -> Weighting:
    if kinds is None:
        raise ValueError("ratio weighting needs the term types (kinds)")
    return Ratio(names, init, [role(k) for k in kinds])


WEIGHTINGS: dict[str, WeightingType] = {
    "static": WeightingType(lambda names, init, **_: Weighting(names, init), "the configured weights, fixed"),
    "gradnorm": WeightingType(
        lambda names, init, *, alpha=1.5, lr=0.025, every=1, **_: GradNorm(
            names, init, alpha=alpha, lr=lr, every=every
        ),
        "GradNorm: weights learned so that the terms' gradient norms train at matching rates",
    ),
    "uncertainty": WeightingType(
        lambda names, init, **_: Uncertainty(names, init), "homoscedastic uncertainty: a learned log-variance per term"
    ),
    "ratio": WeightingType(_ratio, "each feature term scaled to the first kl or dkd term's value at every step"),
}
"""Every weighting strategy by name; ``weighting.strategy`` is checked against these keys."""


def build_weighting(
    strategy: str,
    names: list[str],
    init: list[float],
    *,
    alpha: float = 1.5,
    lr: float = 0.025,
    every: int = 1,
    kinds: list[str] | None = None,
) -> Weighting:
    """The weighting of terms ``names`` (configured weights ``init``; ``kinds``: their types, which ``ratio`` needs)."""
    if strategy not in WEIGHTINGS:
        raise ValueError(f"unknown weighting strategy {strategy!r}; choose one of {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[strategy].build(names, init, alpha=alpha, lr=lr, every=every, kinds=kinds)
