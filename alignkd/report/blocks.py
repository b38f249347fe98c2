"""The report's block-selection section: the scores of ``block_scores.json`` and the blocks the student kept."""

from __future__ import annotations

from alignkd.report.document import Block, Plot
from alignkd.report.plots import STYLE, new_figure, png

KEPT, DROPPED = "#1f77b4", "#c7c7c7"


def block_blocks(scores: dict | None) -> list[Block]:
    """A heading, a sentence and one bar chart per measured score; nothing without ``block_scores.json``."""
    if not scores or "layers" not in scores:
        return []
    import matplotlib

    kept = set(scores["layers"])
    panels = [
        (key, label)
        for key, label in (
            ("block_influence", "Block influence: 1 - cos(block input, block output)"),
            ("block_removal_loss_increase", "Calibration loss increase when the block alone is removed"),
        )
        if scores.get(key)
    ]
    text = (
        f"The student keeps teacher blocks {scores['layers']} of {scores['teacher_blocks']}, chosen by "
        f"{scores.get('rule', scores.get('select'))} on {scores.get('calibration_sequences')} calibration sequences."
    )
    if scores.get("candidates"):
        text += (
            " Search probes: "
            + "; ".join(f"{c['rule']} {c['layers']}: held-out loss {c['probe_loss']:.4g}" for c in scores["candidates"])
            + "."
        )
    blocks: list[Block] = [("h2", "Block selection"), ("p", text)]
    if not panels:
        return blocks
    with matplotlib.rc_context(STYLE):
        fig = new_figure(2.2 * len(panels) + 0.4)
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, (key, label) in zip(axes, panels, strict=True):
            values = scores[key]
            ax.bar(range(len(values)), values, color=[KEPT if i in kept else DROPPED for i in range(len(values))])
            ax.set_title(label, loc="left")
            ax.set_xticks(range(len(values)))
            ax.tick_params(axis="x", labelsize=7)
        axes[-1].set_xlabel("teacher block (blue: kept by the student)")
        image = png(fig)
    caption = "Per-block scores on calibration text; the kept blocks in blue."
    blocks.append(("plot", Plot("blocks", "Block scores", caption, image)))
    return blocks
