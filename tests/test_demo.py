"""The demo's stages end to end on tiny stand-ins for the packaged assets."""

import csv
import json

import pytest

from alignkd import demo
from alignkd.assets import Assets
from alignkd.testing import save_model, write_corpus


@pytest.fixture
def tiny_assets(tmp_path, monkeypatch) -> Assets:
    teacher = save_model(tmp_path / "teacher", "llama", layers=10, width=32)
    # The demo evaluates with 512-token windows; rotary llama takes any length.
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (teacher / "config.json").write_text(json.dumps(cfg))
    sotu = write_corpus(tmp_path / "sotu", docs=12)
    moby = write_corpus(tmp_path / "moby", docs=20)
    sentiment = tmp_path / "sentiment"
    sentiment.mkdir()
    with open(sentiment / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(24):
            w.writerow(
                [("a fine warm film" if i % 2 else "a dull cold plot") + f" {i}", "positive" if i % 2 else "negative"]
            )
    assets = Assets(teacher=teacher, sotu=sotu, moby_dick=moby, sentiment=sentiment)
    monkeypatch.setattr("alignkd.assets.prepare", lambda **kw: assets)
    return assets


@pytest.mark.slow  # about 20 s, in process
def test_demo_runs_every_stage_and_reports(tiny_assets, tmp_path):
    result = demo.run(steps=4, out=tmp_path / "demo")
    out = tmp_path / "demo"
    assert set(result["timings_s"]) == {"assets", "distill", "baseline", "eval", "report", "total"}
    assert json.loads((out / "demo_timings.json").read_text())["steps"] == 4
    ev = json.loads((out / "distilled" / "eval.json").read_text())
    assert set(ev["models"]) == {"teacher", "student", "baseline"}
    assert ev["models"]["student"]["metrics"]["params"] < 0.6 * ev["models"]["teacher"]["metrics"]["params"]
    assert "perplexity" in ev["retention"]["student"]
    # The headline judges generation, which the teacher does well; accuracy (at chance for SmolLM2) is not run.
    assert "accuracy" not in ev["models"]["teacher"]["metrics"]
    labels = [row[0] for row in result["headline"]]
    assert any("Teacher-judged NLL" in label for label in labels) and any("Distinct-2" in label for label in labels)
    assert not any("ccuracy" in label for label in labels)
    for role in ("student", "baseline"):
        assert ev["models"][role]["metrics"]["gen_teacher_nll"] > 0
        assert 0 <= ev["models"][role]["metrics"]["gen_distinct2"] <= 1
    assert (out / "distilled" / "report.html").is_file() and (out / "distilled" / "report.md").is_file()
    # Same steps, same student blocks, different losses.
    import yaml

    d = yaml.safe_load((out / "distilled" / "config.yaml").read_text())
    b = yaml.safe_load((out / "baseline" / "config.yaml").read_text())
    # The distillation chose its blocks by Block Influence (recorded, with the scores the report plots);
    # the baseline trains those same blocks.
    assert d["student"]["from_teacher"]["select"] == "importance"
    assert d["student"]["from_teacher"]["layers"] == b["student"]["from_teacher"]["layers"]
    assert len(b["student"]["from_teacher"]["layers"]) == 2 and d["train"]["steps"] == b["train"]["steps"] == 4
    assert [t["type"] for t in d["losses"]] == ["kl"] and [t["type"] for t in b["losses"]] == ["ce"]
    assert (out / "distilled" / "block_scores.json").is_file()
    assert "Block selection" in (out / "distilled" / "report.md").read_text()
