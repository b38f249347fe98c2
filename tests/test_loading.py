"""The one rule for "local path or hub id" that model loading, data reading and evaluation share."""

from __future__ import annotations

import os

import pytest

from alignkd import testing as tiny
from alignkd.data import FILE_SUFFIXES, DataError, read_texts
from alignkd.models import ModelError, load_tokenizer, looks_local


@pytest.mark.parametrize(
    "path, local",
    [
        ("gpt2", False),  # name
        ("HuggingFaceTB/SmolLM2-135M", False),  # owner/name
        ("Qwen/Qwen2.5-0.5B", False),  # a dot inside a hub name
        ("./teacher", True),
        ("../runs/student", True),
        (".teacher", True),
        ("~/models/teacher", True),
        ("/abs/teacher", True),
        ("runs/a/student", True),  # more than one "/"
        ("owner/name/", True),
        ("corpus.jsonl", False),  # a suffix counts only where the caller names it
    ],
)
def test_looks_local(path, local):
    assert looks_local(path) is local


@pytest.mark.parametrize("path", ["corpus.jsonl", "owner/notes.TXT", "data.csv", "dump.parquet"])
def test_a_data_file_suffix_makes_it_local(path):
    assert looks_local(path, FILE_SUFFIXES)
    assert not looks_local("owner/corpus", FILE_SUFFIXES)


@pytest.mark.skipif(os.sep == "/", reason="backslash is a separator only on Windows")
def test_backslash_is_local_on_windows():
    assert looks_local("runs\\student")


def test_missing_local_paths_name_what_is_missing(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelError, match=f"^teacher: model folder not found: {missing}$"):
        load_tokenizer(missing, what="teacher")
    with pytest.raises(DataError, match=f"^data file not found: {missing}$"):
        read_texts(missing)


def test_a_new_classification_head_is_one_line_and_the_library_report_waits_for_debug(
    tmp_path, capfd, caplog, monkeypatch
):
    from alignkd.display import DEBUG
    from alignkd.models import load_model

    path = tiny.save_model(tmp_path / "lm", "llama", layers=1, width=32)
    capfd.readouterr()
    caplog.clear()
    load_model(str(path), task="sequence_classification", what="teacher")
    err = capfd.readouterr().err
    assert "teacher: a new 2-class head (score.weight), initialised randomly" in err
    assert "LOAD REPORT" not in err + caplog.text and "newly initialized" not in err + caplog.text
    load_model(str(path), task="causal_lm", what="teacher")  # nothing missing: nothing said
    assert "initialised randomly" not in capfd.readouterr().err
    monkeypatch.setenv(DEBUG, "1")  # alignkd --debug: transformers' own report is logged as well
    load_model(str(path), task="sequence_classification", what="teacher")
    assert "LOAD REPORT" in caplog.text
