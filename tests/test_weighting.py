"""Tests of alignkd.align.weighting: schedules, static weights, GradNorm, uncertainty and ratio weighting.

GradNorm is checked on a toy multi-task problem (one shared linear layer, losses
whose gradients differ by orders of magnitude) for the properties the paper
states: weights stay positive and sum to the number of terms, terms with large
gradients are damped, and terms that train slowly (high loss ratio) gain weight.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from alignkd.align.weighting import GradNorm, Ratio, Uncertainty, Weighting, build_weighting, schedule_value
from alignkd.config import ScheduleConfig

# ---------------------------------------------------------------- schedules


def sched(kind, start=1.0, end=1.0, steps=None):
    return ScheduleConfig(kind=kind, start=start, end=end, steps=steps)


def test_no_schedule_gives_the_default():
    assert schedule_value(None, 0, 100, 2.5) == 2.5
    assert schedule_value(None, 99, 100, 0.7) == 0.7


@pytest.mark.parametrize("step", [0, 50, 100, 1000])
def test_constant(step):
    assert schedule_value(sched("constant", start=0.3, end=9.0, steps=100), step, 100, 5.0) == 0.3


@pytest.mark.parametrize(("step", "value"), [(0, 0.0), (5, 1.0), (10, 2.0), (15, 2.0), (1000, 2.0)])
def test_warmup(step, value):
    assert schedule_value(sched("warmup", start=2.0, steps=10), step, 100, 0.0) == pytest.approx(value)


@pytest.mark.parametrize(("step", "value"), [(0, 2.0), (5, 1.5), (10, 1.0), (20, 1.0)])
def test_linear(step, value):
    assert schedule_value(sched("linear", start=2.0, end=1.0, steps=10), step, 100, 0.0) == pytest.approx(value)


@pytest.mark.parametrize(
    ("step", "value"),
    [(0, 4.0), (25, 2.0 + 1.0 * (1 + math.cos(math.pi / 4))), (50, 3.0), (100, 2.0), (150, 2.0)],
)
def test_cosine(step, value):
    assert schedule_value(sched("cosine", start=4.0, end=2.0, steps=100), step, 1000, 0.0) == pytest.approx(value)


@pytest.mark.parametrize(("step", "value"), [(0, 1.0), (29, 1.0), (30, 0.0), (99, 0.0)])
def test_step_switches_from_start_to_end_at_steps(step, value):
    assert schedule_value(sched("step", start=1.0, end=0.0, steps=30), step, 100, 5.0) == value


def test_step_without_steps_switches_at_half_the_run():
    s = sched("step", start=0.0, end=2.0)
    assert [schedule_value(s, i, 10, 9.0) for i in (0, 4, 5, 9)] == [0.0, 0.0, 2.0, 2.0]


def test_cosine_falls_monotonically():
    s = sched("cosine", start=1.0, end=0.0, steps=20)
    values = [schedule_value(s, i, 20, 0.0) for i in range(21)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(
    ("kind", "start", "end", "middle"),
    [("warmup", 3.0, 0.0, 1.5), ("linear", 0.0, 1.0, 0.5), ("cosine", 0.0, 1.0, 0.5), ("constant", 0.4, 1.0, 0.4)],
)
def test_steps_none_spans_the_whole_run(kind, start, end, middle):
    s = sched(kind, start=start, end=end, steps=None)
    assert schedule_value(s, 200, 400, 9.0) == pytest.approx(middle)
    full = start if kind in ("warmup", "constant") else end
    assert schedule_value(s, 400, 400, 9.0) == pytest.approx(full)


def test_unknown_schedule_kind():
    with pytest.raises(ValueError, match="sawtooth"):
        schedule_value(sched("sawtooth"), 0, 10, 1.0)


# ---------------------------------------------------------------- static


def test_static_combine_is_the_weighted_sum():
    w = Weighting(["a", "b", "c"], [1.0, 0.5, 2.0])
    losses = {"a": torch.tensor(3.0), "b": torch.tensor(4.0), "c": torch.tensor(0.25)}
    assert w.combine(losses, [1.0, 1.0, 1.0]).item() == pytest.approx(3.0 + 2.0 + 0.5)
    assert w.combine(losses, [0.0, 2.0, 1.0]).item() == pytest.approx(0.0 + 4.0 + 0.5)
    assert w.log() == {"w/a": 1.0, "w/b": 0.5, "w/c": 2.0}
    assert w.model_params() == []


def test_static_combine_gradients_are_the_weights():
    w = Weighting(["a", "b"], [0.25, 3.0])
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    w.combine({"a": x[0] ** 2, "b": x[1]}, [1.0, 0.5]).backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.25 * 2 * 1.0, 3.0 * 0.5]))


def test_static_update_changes_nothing():
    w = Weighting(["a"], [0.7])
    p = nn.Parameter(torch.ones(2))
    w.update({"a": p.sum()}, [1.0], [p])
    assert w.weights().tolist() == pytest.approx([0.7])


def test_build_weighting_passes_the_options():
    g = build_weighting("gradnorm", ["a", "b"], [1.0, 1.0], alpha=0.5, lr=0.1)
    assert isinstance(g, GradNorm) and g.alpha == 0.5 and g.opt.param_groups[0]["lr"] == 0.1
    assert isinstance(build_weighting("uncertainty", ["a"], [1.0]), Uncertainty)
    assert type(build_weighting("static", ["a"], [1.0])) is Weighting


# ---------------------------------------------------------------- GradNorm


class Toy:
    """A shared linear layer and three regression losses whose gradients differ 100x each."""

    scales = {"big": 10.0, "mid": 1.0, "small": 0.1}

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.layer = nn.Linear(4, 4)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(4, 4, generator=g))
            self.layer.bias.zero_()
        self.x = torch.randn(32, 4, generator=g)
        self.y = {n: torch.randn(32, 4, generator=g) for n in self.scales}

    @property
    def shared(self):
        return list(self.layer.parameters())

    def losses(self) -> dict[str, torch.Tensor]:
        h = self.layer(self.x)
        return {n: s * (h - self.y[n]).pow(2).mean() for n, s in self.scales.items()}

    def grad_norms(self) -> torch.Tensor:
        out = []
        for loss in self.losses().values():
            grads = torch.autograd.grad(loss, self.shared, retain_graph=True)
            out.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        return torch.stack(out)


def test_gradnorm_initial_weights_are_normalised():
    g = GradNorm(["a", "b", "c"], [1.0, 2.0, 3.0])
    torch.testing.assert_close(g.weights().detach(), torch.tensor([0.5, 1.0, 1.5]))
    g1 = GradNorm(["a", "b"], [1.0, 1.0])
    assert g1.weights().tolist() == [1.0, 1.0]


def test_gradnorm_balances_gradient_scales():
    toy = Toy()
    names = list(Toy.scales)
    g = GradNorm(names, [1.0, 1.0, 1.0], alpha=1.5, lr=0.05)
    w0 = g.weights().detach().clone()
    spread0 = (w0 * toy.grad_norms()).max() / (w0 * toy.grad_norms()).min()
    for _ in range(40):
        g.update(toy.losses(), [1.0, 1.0, 1.0], toy.shared)
        w = g.weights().detach()
        assert (w > 0).all(), w
        assert w.sum().item() == pytest.approx(3.0, abs=1e-5)
    assert (w - w0).abs().max() > 0.5, "weights did not move"
    big, mid, small = w.tolist()
    assert big < mid < small, f"large gradients must get small weights, got {w.tolist()}"
    weighted = w * toy.grad_norms()
    assert weighted.max() / weighted.min() < spread0 / 10, "weighted gradient norms did not get closer"
    # The weights are the GradNorm parameter, trained by its own optimizer only.
    assert g.model_params() == []
    assert all(p.grad is None for p in toy.shared)


def test_gradnorm_favours_the_term_that_trains_slowly():
    # Same gradients for both terms; the value of "slow" stays at its initial
    # level while "fast" drops to a fifth, so "slow" has the larger loss ratio.
    toy = Toy()
    g = GradNorm(["slow", "fast"], [1.0, 1.0], alpha=1.5, lr=0.05)
    for step in range(30):
        h = toy.layer(toy.x)
        base = (h - toy.y["mid"]).pow(2).mean()
        scale = 1.0 if step == 0 else 0.2
        losses = {"slow": base, "fast": base + (scale - 1.0) * base.detach()}  # value scaled, gradient not
        g.update(losses, [1.0, 1.0], toy.shared)
    slow, fast = g.weights().detach().tolist()
    assert slow > 1.2 and fast < 0.8, (slow, fast)
    assert slow + fast == pytest.approx(2.0, abs=1e-5)


def test_gradnorm_records_the_first_losses():
    toy = Toy()
    g = GradNorm(list(Toy.scales), [1.0, 1.0, 1.0])
    first = {k: v.detach() for k, v in toy.losses().items()}
    g.update(toy.losses(), [1.0, 1.0, 1.0], toy.shared)
    torch.testing.assert_close(g.initial_losses, torch.stack(list(first.values())))
    g.update({k: v * 0.5 for k, v in toy.losses().items()}, [1.0, 1.0, 1.0], toy.shared)
    torch.testing.assert_close(g.initial_losses, torch.stack(list(first.values())))


def test_gradnorm_combine_does_not_train_the_weights():
    g = GradNorm(["a", "b"], [1.0, 3.0])
    x = torch.tensor(2.0, requires_grad=True)
    total = g.combine({"a": x, "b": x * x}, [1.0, 1.0])
    assert total.item() == pytest.approx(0.5 * 2.0 + 1.5 * 4.0)
    total.backward()
    assert g.w.grad is None
    assert x.grad.item() == pytest.approx(0.5 + 1.5 * 4.0)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_gradnorm_state_dict_round_trips_with_its_optimizer():
    toy = Toy()
    names = list(Toy.scales)
    a = GradNorm(names, [1.0, 1.0, 1.0], lr=0.05)
    for _ in range(5):
        a.update(toy.losses(), [1.0, 1.0, 1.0], toy.shared)
    state = _roundtrip(a.state_dict())
    assert "_extra_state" in state, "the optimizer state must travel in state_dict()"

    b = GradNorm(names, [1.0, 1.0, 1.0], lr=0.05)
    b.load_state_dict(state)
    torch.testing.assert_close(b.w.detach(), a.w.detach(), rtol=0, atol=0)
    torch.testing.assert_close(b.initial_losses, a.initial_losses, rtol=0, atol=0)
    sa, sb = a.opt.state_dict()["state"][0], b.opt.state_dict()["state"][0]
    assert set(sa) == set(sb) and float(sb["step"]) == 5.0
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0)
    # b's optimizer drives b's own weights.
    assert b.opt.param_groups[0]["params"][0] is b.w

    # Both continue identically.
    for _ in range(3):
        losses = toy.losses()
        a.update(losses, [1.0, 1.0, 1.0], toy.shared)
        b.update(losses, [1.0, 1.0, 1.0], toy.shared)
    torch.testing.assert_close(b.w.detach(), a.w.detach(), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- uncertainty


def test_uncertainty_starts_at_the_configured_weights():
    u = Uncertainty(["a", "b", "c"], [1.0, 0.5, 2.0])
    torch.testing.assert_close(u.weights().detach(), torch.tensor([1.0, 0.5, 2.0]))
    torch.testing.assert_close(u.weights(), torch.exp(-u.log_vars))
    assert u.model_params() == [u.log_vars]
    assert u.model_params()[0] is u.log_vars and u.log_vars.requires_grad


def test_uncertainty_weights_follow_the_log_variances():
    u = Uncertainty(["a", "b"], [1.0, 1.0])
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(u.weights().detach(), torch.tensor([math.exp(-0.5), math.exp(1.0)]))
    assert u.log()["w/b"] == pytest.approx(math.e, rel=1e-6)


def test_uncertainty_combine_value_and_gradients():
    u = Uncertainty(["a", "b", "c"], [1.0, 0.5, 2.0])
    with torch.no_grad():
        u.log_vars.copy_(torch.tensor([0.3, -0.7, 1.1]))
    s = u.log_vars.detach().clone()
    raw = torch.tensor([2.0, 0.5, 3.0], requires_grad=True)
    mult = [1.0, 0.5, 2.0]
    losses = {"a": raw[0], "b": raw[1], "c": raw[2]}
    total = u.combine(losses, mult)
    m = torch.tensor(mult)
    # The schedule multiplier scales the whole term, regulariser included.
    expected = (m * (torch.exp(-s) * raw.detach() + s)).sum()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    # d/ds [m (exp(-s) L + s)] = m (1 - exp(-s) L) ; d/dL = m exp(-s)
    torch.testing.assert_close(u.log_vars.grad, m * (1 - torch.exp(-s) * raw.detach()))
    torch.testing.assert_close(raw.grad, torch.exp(-s) * m)


def test_uncertainty_with_unit_multipliers_matches_the_hand_derivative():
    u = Uncertainty(["a", "b"], [1.0, 0.25])
    L = torch.tensor([0.8, 4.0])
    u.combine({"a": L[0], "b": L[1]}, [1.0, 1.0]).backward()
    s = u.log_vars.detach()
    torch.testing.assert_close(u.log_vars.grad, 1 - torch.exp(-s) * L)
    # At the optimum exp(-s) = 1 / L the gradient vanishes.
    with torch.no_grad():
        u.log_vars.copy_(L.log())
    u.log_vars.grad = None
    u.combine({"a": L[0], "b": L[1]}, [1.0, 1.0]).backward()
    torch.testing.assert_close(u.log_vars.grad, torch.zeros(2), atol=1e-6, rtol=0)


def test_uncertainty_trains_with_the_main_optimizer():
    u = Uncertainty(["a", "b"], [1.0, 1.0])
    opt = torch.optim.SGD(u.model_params(), lr=0.1)
    L = {"a": torch.tensor(4.0), "b": torch.tensor(0.25)}
    for _ in range(200):
        opt.zero_grad()
        u.combine(L, [1.0, 1.0]).backward()
        opt.step()
    # Terms with large losses are down-weighted: the weights approach 1 / L.
    torch.testing.assert_close(u.weights().detach(), torch.tensor([0.25, 4.0]), rtol=0.05, atol=0.0)


# ---------------------------------------------------------------- ratio (Minitron)

RATIO_TERMS = {"kl": "kl", "ce": "ce", "hidden": "hidden", "embedding": "embedding", "kl_2": "kl"}


def ratio(init=None) -> Ratio:
    init = init or [1.0, 0.5, 1.0, 2.0, 0.3]
    return build_weighting("ratio", list(RATIO_TERMS), init, kinds=list(RATIO_TERMS.values()))


def test_ratio_scales_each_feature_term_to_the_first_output_term():
    w = ratio()
    assert isinstance(w, Ratio)
    values = {"kl": 3.0, "ce": 5.0, "hidden": 0.25, "embedding": 12.0, "kl_2": 7.0}
    w.update({n: torch.tensor(v) for n, v in values.items()}, [1.0] * 5, [])
    # Feature terms: configured weight * L_kl / L_term; kl, ce and the second kl keep theirs.
    expected = [1.0, 0.5, 1.0 * 3.0 / 0.25, 2.0 * 3.0 / 12.0, 0.3]
    assert w.weights().tolist() == pytest.approx(expected)
    assert w.log() == pytest.approx({f"w/{n}": e for n, e in zip(RATIO_TERMS, expected, strict=True)})
    assert w.due(0) and w.due(7) and w.model_params() == []


def test_ratio_combine_value_and_gradients_against_the_plain_formula():
    """total = sum_i m_i * w_i * L_i with w_i = weight_i * L_kl / L_i held fixed: a weighted feature term is worth
    its configured weight times L_kl, and its gradient is that weight times L_kl * grad(L_i) / L_i."""
    w = ratio()
    x = torch.tensor([0.7, 1.3, -0.4, 2.2, 0.9], dtype=torch.float64, requires_grad=True)
    losses = {
        "kl": x[0] ** 2 + 1,
        "ce": x[1] ** 2,
        "hidden": (x[2] - 1) ** 2,
        "embedding": x[3] ** 4,
        "kl_2": x[4] ** 2,
    }
    mult = [1.0, 0.5, 2.0, 1.0, 1.0]
    w.update(losses, mult, [])
    total = w.combine(losses, mult)
    total.backward()

    kl, ce, hid, emb, kl2 = (float(v.detach()) for v in losses.values())
    ref = 1.0 * kl + 0.5 * 0.5 * ce + 2.0 * 1.0 * kl + 1.0 * 2.0 * kl + 0.3 * kl2
    assert total.item() == pytest.approx(ref)
    a, b, c, d, e = x.tolist()
    grads = [
        2 * a,  # the reference term's own gradient: no gradient through the ratio (detached)
        0.5 * 0.5 * 2 * b,
        2.0 * 1.0 * (kl / hid) * 2 * (c - 1),
        1.0 * 2.0 * (kl / emb) * 4 * d**3,
        0.3 * 2 * e,
    ]
    torch.testing.assert_close(x.grad, torch.tensor(grads, dtype=torch.float64))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_ratio_keeps_the_last_weight_when_a_side_is_zero_or_not_finite(bad):
    """A term with nothing counted gives 0: its ratio is skipped, never inf or NaN (nor is a bad reference's)."""
    w = ratio()
    w.update(
        {
            "kl": torch.tensor(2.0),
            "ce": torch.tensor(1.0),
            "hidden": torch.tensor(4.0),
            "embedding": torch.tensor(1.0),
            "kl_2": torch.tensor(1.0),
        },
        [1.0] * 5,
        [],
    )
    before = w.weights().tolist()
    assert before[2] == pytest.approx(0.5) and before[3] == pytest.approx(4.0)
    w.update(
        {
            "kl": torch.tensor(2.0),
            "ce": torch.tensor(1.0),
            "hidden": torch.tensor(bad),
            "embedding": torch.tensor(8.0),
            "kl_2": torch.tensor(1.0),
        },
        [1.0] * 5,
        [],
    )
    after = w.weights().tolist()
    assert after[2] == pytest.approx(before[2]) and after[3] == pytest.approx(2.0 * 2.0 / 8.0)
    w.update(
        {
            "kl": torch.tensor(bad),
            "ce": torch.tensor(1.0),
            "hidden": torch.tensor(1.0),
            "embedding": torch.tensor(1.0),
            "kl_2": torch.tensor(1.0),
        },
        [1.0] * 5,
        [],
    )
    assert w.weights().tolist() == pytest.approx(after)
    assert all(math.isfinite(v) for v in w.weights().tolist())
    if bad == 0.0:  # an all-masked feature term contributes exactly 0 to a finite total
        total = w.combine(
            {
                "kl": torch.tensor(2.0),
                "ce": torch.tensor(1.0),
                "hidden": torch.tensor(0.0),
                "embedding": torch.tensor(1.0),
                "kl_2": torch.tensor(1.0),
            },
            [1.0] * 5,
        )
        assert math.isfinite(total.item())


def test_ratio_uses_the_mean_over_processes():
    """Every process gets the same weights: the values are summed over processes and divided by their count."""
    w = ratio([1.0, 1.0, 1.0, 1.0, 1.0])
    here = {
        "kl": torch.tensor(1.0),
        "ce": torch.tensor(1.0),
        "hidden": torch.tensor(1.0),
        "embedding": torch.tensor(2.0),
        "kl_2": torch.tensor(1.0),
    }
    there = torch.tensor([3.0, 1.0, 5.0, 2.0, 1.0])  # the other process's values, in term order

    def reduce(v):  # a 2-process all-reduce(sum) as the engine's reduce sees it
        return v + (there if v.dim() else torch.tensor(1.0))

    w.update(here, [1.0] * 5, [], reduce=reduce)
    assert w.weights().tolist() == pytest.approx([1.0, 1.0, 2.0 / 3.0, 2.0 / 2.0, 1.0])


def test_ratio_state_dict_round_trips():
    a = ratio()
    a.update(
        {
            "kl": torch.tensor(2.0),
            "ce": torch.tensor(1.0),
            "hidden": torch.tensor(0.1),
            "embedding": torch.tensor(3.0),
            "kl_2": torch.tensor(1.0),
        },
        [1.0] * 5,
        [],
    )
    b = ratio()
    b.load_state_dict(_roundtrip(a.state_dict()))
    torch.testing.assert_close(b.weights(), a.weights(), rtol=0, atol=0)


def test_ratio_needs_an_output_term_and_the_types():
    from alignkd.errors import ConfigError

    with pytest.raises(ConfigError, match="^weighting.strategy: ratio .* kl or dkd"):
        build_weighting("ratio", ["ce", "hidden"], [1.0, 1.0], kinds=["ce", "hidden"])
    with pytest.raises(ValueError, match="kinds"):
        build_weighting("ratio", ["kl"], [1.0])
    dkd = build_weighting("ratio", ["dkd", "blockwise"], [1.0, 1.0], kinds=["dkd", "blockwise"])
    dkd.update({"dkd": torch.tensor(4.0), "blockwise": torch.tensor(2.0)}, [1.0, 1.0], [])
    assert dkd.weights().tolist() == pytest.approx([1.0, 2.0])  # block-wise KD is a feature term


def test_ratio_without_an_output_term_is_a_one_line_config_error():
    from alignkd.config import ConfigError, load_config

    base = {
        "teacher": {"path": "t"},
        "student": {"from_teacher": {"num_layers": 1}},
        "data": {"train": "x.txt"},
        "weighting": {"strategy": "ratio"},
    }
    with pytest.raises(ConfigError) as info:
        load_config(data={**base, "losses": [{"type": "ce"}, {"type": "hidden"}, {"type": "embedding"}]})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("weighting.strategy: ratio") and "add {type: kl}" in msg
    cfg = load_config(
        data={**base, "losses": [{"type": "dkd"}, {"type": "hidden", "weight": 0.0}]}
    )  # dkd is a reference too
    assert cfg.weighting.strategy == "ratio" and cfg.losses[1].weight == 0.0  # 0 stays 0 under ratio: allowed
