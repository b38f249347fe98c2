"""Tests of alignkd.align.maps: layer maps, projectors and adaptive layer mixtures."""

from __future__ import annotations

import pytest
import torch

from alignkd.align.maps import AdaptiveMix, LayerMapError, Projector, auto_map, resolve_map


def reference_auto(ls: int, lt: int) -> list[tuple[int, int]]:
    """round((i + 1) * L_t / L_s) - 1 in exact integer arithmetic, halves rounded up."""
    return [(i, (2 * (i + 1) * lt + ls) // (2 * ls) - 1) for i in range(ls)]


# ---------------------------------------------------------------- auto / last / explicit


def test_auto_map_known_cases():
    assert auto_map(6, 30) == [(0, 4), (1, 9), (2, 14), (3, 19), (4, 24), (5, 29)]
    assert auto_map(1, 2) == [(0, 1)]
    assert auto_map(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert auto_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    # (i + 1) * 6 / 4 = 1.5, 3, 4.5, 6: halves round up, not to even.
    assert auto_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]


@pytest.mark.parametrize("lt", range(1, 33))
def test_auto_map_matches_the_formula(lt):
    for ls in range(1, lt + 1):
        got = auto_map(ls, lt)
        assert got == reference_auto(ls, lt), (ls, lt)
        students = [s for s, _ in got]
        teachers = [t for _, t in got]
        assert students == list(range(ls))
        assert teachers[-1] == lt - 1, "the last student block meets the last teacher block"
        assert all(0 <= t < lt for t in teachers)
        assert teachers == sorted(set(teachers)), "strictly increasing, no teacher block twice"


@pytest.mark.parametrize(("ls", "lt"), [(3, 1), (5, 2), (8, 3), (4, 4)])
def test_auto_map_never_names_a_missing_teacher_block(ls, lt):
    # A student deeper than its teacher (a ``student.config`` with more layers) must
    # either map onto real teacher blocks or fail with a LayerMapError, never name
    # block -1 (which then fails later as an IndexError with a traceback).
    try:
        pairs = resolve_map("auto", ls, lt, "losses[0].layers")
    except LayerMapError:
        return
    assert all(0 <= t < lt for _, t in pairs), pairs
    assert [s for s, _ in pairs] == list(range(ls))


def test_adaptive_centres_follow_the_auto_map():
    assert resolve_map("adaptive", 3, 12, "x") == auto_map(3, 12)
    assert resolve_map("auto", 2, 7, "x") == auto_map(2, 7)


def test_last():
    assert resolve_map("last", 4, 30, "x") == [(3, 29)]
    assert resolve_map("last", 1, 1, "x") == [(0, 0)]


def test_explicit_pairs_with_negative_indices():
    assert resolve_map([[0, 3], [1, 7], [-1, -1], [-4, -8]], 4, 8, "x") == [(0, 3), (1, 7), (3, 7), (0, 0)]


@pytest.mark.parametrize(
    ("pairs", "side", "index", "n"),
    [
        ([[4, 0]], "student", 4, 4),
        ([[-5, 0]], "student", -5, 4),
        ([[0, 8]], "teacher", 8, 8),
        ([[0, 1], [1, -9]], "teacher", -9, 8),
    ],
)
def test_explicit_out_of_range_names_side_index_and_range(pairs, side, index, n):
    with pytest.raises(LayerMapError) as info:
        resolve_map(pairs, 4, 8, "losses[2].layers")
    msg = str(info.value)
    assert msg.startswith("losses[2].layers")
    assert f"{side} layer {index}" in msg
    assert f"{n} blocks (0..{n - 1})" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- projector


@pytest.mark.parametrize("norm", [False, True])
def test_projector_shapes(norm):
    torch.manual_seed(0)
    p = Projector(24, 40, norm=norm)
    x = torch.randn(2, 5, 24)
    y = p(x)
    assert y.shape == (2, 5, 40)
    assert p.linear.weight.shape == (40, 24) and p.linear.bias is None
    assert isinstance(p.norm, torch.nn.LayerNorm) == norm


def test_projector_linear_is_a_plain_matmul():
    torch.manual_seed(0)
    p = Projector(8, 12)
    x = torch.randn(3, 8)
    torch.testing.assert_close(p(x), x @ p.linear.weight.T)


def test_projector_linear_norm_normalises_each_row():
    torch.manual_seed(0)
    p = Projector(8, 16, norm=True)
    y = p(torch.randn(4, 7, 8) * 5 + 3)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4, 7), atol=1e-3, rtol=0)


def test_projector_casts_its_input_to_its_dtype():
    p = Projector(8, 4)
    assert p(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_projector_trains():
    torch.manual_seed(0)
    p = Projector(6, 10)
    p(torch.randn(3, 6)).pow(2).sum().backward()
    assert p.linear.weight.grad is not None and p.linear.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- adaptive mixture


def test_adaptive_rows_sum_to_one_and_peak_at_the_centre():
    centres = [2, 5, 11]
    mix = AdaptiveMix(centres, 12)
    w = mix.weights().detach()
    assert w.shape == (3, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert (w > 0).all()
    assert w.argmax(-1).tolist() == centres
    # Symmetric around the centre and falling away from it.
    row = w[1]
    assert row[4] == pytest.approx(row[6].item()) and row[3] == pytest.approx(row[7].item())
    assert row[5] > row[4] > row[3] > row[2]


def test_adaptive_sharpness_sets_the_peak():
    soft, sharp = AdaptiveMix([3], 8, sharpness=0.5).weights(), AdaptiveMix([3], 8, sharpness=5.0).weights()
    assert sharp[0, 3] > soft[0, 3]
    assert sharp[0, 3] > 0.98


def test_adaptive_output_is_the_weighted_sum():
    torch.manual_seed(0)
    mix = AdaptiveMix([0, 3], 4)
    with torch.no_grad():
        mix.logits.copy_(torch.randn(2, 4))
    hidden = [torch.randn(2, 3, 5) for _ in range(4)]
    for row in range(2):
        w = torch.softmax(mix.logits[row].detach().double(), -1)
        expected = sum(w[j] * hidden[j].double() for j in range(4))
        torch.testing.assert_close(mix(row, hidden).double(), expected, rtol=1e-5, atol=1e-6)


def test_adaptive_output_is_float32_for_low_precision_states():
    mix = AdaptiveMix([1], 2)
    out = mix(0, [torch.randn(1, 2, 3, dtype=torch.bfloat16) for _ in range(2)])
    assert out.dtype == torch.float32


def test_adaptive_gradient_reaches_the_logits():
    torch.manual_seed(0)
    mix = AdaptiveMix([1, 2], 3)
    hidden = [torch.randn(2, 4, 6) for _ in range(3)]
    target = torch.randn(2, 4, 6)
    loss = (mix(1, hidden) - target).pow(2).mean()
    loss.backward()
    g = mix.logits.grad
    assert g is not None and torch.isfinite(g).all()
    assert g[1].abs().sum() > 0, "the used row gets a gradient"
    assert (g[0] == 0).all(), "an unused row gets none"
    # Softmax logits: each row's gradient sums to zero.
    assert g[1].sum().abs() < 1e-6

    # And it matches a finite difference.
    eps = 1e-3
    with torch.no_grad():
        bumped = AdaptiveMix([1, 2], 3)
        bumped.logits.copy_(mix.logits)
        bumped.logits[1, 0] += eps
        up = (bumped(1, hidden) - target).pow(2).mean()
        bumped.logits[1, 0] -= 2 * eps
        down = (bumped(1, hidden) - target).pow(2).mean()
    assert g[1, 0].item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-2, abs=1e-5)


def test_source_map_pairs_copied_blocks_with_their_origin():
    from alignkd.align.maps import LayerMapError, resolve_map

    assert resolve_map("source", 3, 30, "losses[0].layers", source=[0, 14, 29]) == [(0, 0), (1, 14), (2, 29)]
    with pytest.raises(LayerMapError, match="from_teacher"):
        resolve_map("source", 3, 30, "losses[0].layers")


def test_plan_uses_the_blocks_a_depth_pruned_student_came_from():
    from alignkd.align.plan import build_plan
    from alignkd.models.student import depth_pruned
    from alignkd.terms.features import HiddenConfig
    from alignkd.testing import build

    teacher = build("llama", layers=4, width=32)
    student = depth_pruned(teacher, [0, 3], None)
    plan = build_plan([HiddenConfig(name="hidden", layers="source")], student, teacher)
    assert plan.terms[0].pairs == [(0, 0), (1, 3)]
    assert plan.teacher_needs.hidden == {0, 3}
