"""A full disk (or a quota, or an unwritable folder) while a run writes: one line, exit 2, nothing half-written.

A checkpoint or the export that fails for want of room is reported by the CLI as
one line naming what could not be written where, the room it needed and has, and
the last good checkpoint, which ``--resume`` continues from. The half-written
temporary folder is gone, and the next start removes any a kill left. Other errors
are raised as they were. The failures are injected as torch, safetensors and
transformers raise them; where this process may mount a small tmpfs (root), the
same runs also fill a real file system.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from test_engine import make_cfg, read_metrics
from transformers import AutoModelForCausalLM, PreTrainedModel

import alignkd.backend.strategy as strategy
import alignkd.disk as disk
import alignkd.engine.checkpoint as checkpoint
import alignkd.engine.loop as loop
import alignkd.engine.run as run_mod
from alignkd.cli import main
from alignkd.errors import DiskError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LOSSES = [{"type": "kl"}, {"type": "hidden"}]
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
"""What safetensors (and so ``save_pretrained``) raises on a full disk."""


# ---------------------------------------------------------------- telling a full disk from other failures


def _with_context(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__context__ = inner
    return outer


@pytest.mark.parametrize(
    "exc, code",
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        # torch.save into a Python file: its zip writer's error, the file's OSError in the context
        (_with_context(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                       OSError(errno.ENOSPC, "No space left on device")), errno.ENOSPC),
        (SafetensorError(FULL), errno.ENOSPC),
        (RuntimeError("write(): fd 3 failed with No space left on device"), errno.ENOSPC),  # torch's legacy writer
        (SafetensorError("I/O error: Disk quota exceeded (os error 122)"), errno.EDQUOT),
        (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
        (PermissionError(errno.EACCES, "Permission denied"), errno.EACCES),
        (ValueError("a bug"), None),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), None),
        (RuntimeError("CUDA error: device-side assert triggered"), None),
    ],
)  # fmt: skip
def test_the_reason_is_found_in_each_writer_s_words(exc, code):
    assert disk.disk_errno(exc) == code


def test_torch_s_reasonless_write_failure_counts_as_a_full_disk_only_where_no_room_is_left(tmp_path, monkeypatch):
    exc = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10 << 30)
    assert disk.disk_errno(exc, tmp_path, needed=1 << 20) is None
    monkeypatch.setattr(disk, "free_bytes", lambda path: 4096)
    assert disk.disk_errno(exc, tmp_path, needed=1 << 20) == errno.ENOSPC
    assert disk.disk_errno(exc) is None  # no folder to look at


def test_sizes_read_as_people_write_them():
    assert [disk.human(n) for n in (512, 345_678, 25_300_000, 3_200_000_000)] == [
        "512 B",
        "345.7 kB",
        "25.3 MB",
        "3.2 GB",
    ]


# ---------------------------------------------------------------- a run whose writes fail


def write_config(tmp_path: Path, teacher: Path, corpus: Path, out: Path) -> Path:
    cfg = make_cfg(teacher, corpus, out, losses=LOSSES, steps=6, save_every=2, keep_checkpoints=2)
    path = tmp_path / f"distill-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def one_error_line(code: int, capsys, command: str = "distill") -> str:
    """The run's own lines, then exactly one error line, last, and no traceback."""
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"alignkd {command}: error: "), err
    assert sum(line.startswith(f"alignkd {command}:") for line in lines) == 1, err
    return lines[-1]


def fails_writing(what: str, real, when):
    """``real`` (a writer called with its destination second) raising as a full disk does once ``when(dest)``:
    part of the file is written first."""

    def write(obj, dest, *args, **kwargs):
        if when(str(dest)):
            Path(dest).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device") if what == "oserror" else SafetensorError(FULL)
        return real(obj, dest, *args, **kwargs)

    return write


def resume_continues_from_step_2(cfg: Path, out: Path, capsys) -> None:
    # A kill during an earlier write leaves temporary folders: the next start removes them.
    (out / "checkpoints" / ".step-9.tmp").mkdir()
    (out / ".student.tmp").mkdir()
    assert main(["distill", str(cfg), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoints' / 'step-2'} (step 2)" in err.replace("\n", ""), err
    rows, _ = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert not (out / ".student.tmp").exists()
    assert (out / "student" / "model.safetensors").is_file()


@pytest.mark.parametrize("writer", ["state.pt", "side.safetensors"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes(teacher, corpus, tmp_path, capsys, writer):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, teacher, corpus, out)
    at_step_4 = lambda dest: ".step-4.tmp" in dest  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        if writer == "state.pt":  # torch.save, raising the file's OSError
            mp.setattr(checkpoint, "save_torch", fails_writing("oserror", checkpoint.save_torch, at_step_4))
        else:  # safetensors, raising its own error type
            mp.setattr(strategy, "save_model", fails_writing("safetensors", save_model, at_step_4))
        line = one_error_line(main(["distill", str(cfg)]), capsys)
    last_good = out / "checkpoints" / "step-2"
    assert f"checkpoint step-4 to {out / 'checkpoints'}" in line, line
    assert "no space left" in line and " free there" in line and "needs about" in line, line
    assert f"the last good checkpoint is {last_good}" in line and "--resume" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # the half-written one is gone
    resume_continues_from_step_2(cfg, out, capsys)


def test_a_full_disk_at_the_export_is_one_line_and_resume_exports(teacher, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, teacher, corpus, out)
    real = PreTrainedModel.save_pretrained

    def full(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
        raise SafetensorError(FULL)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    line = one_error_line(main(["distill", str(cfg)]), capsys)
    assert f"the exported student to {out / 'student'}" in line and "no space left" in line, line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-6'}" in line and "--resume" in line, line
    assert not (out / ".student.tmp").exists() and not (out / "student").exists()
    assert not (out / ".projectors.safetensors.tmp").exists()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert main(["distill", str(cfg), "--resume"]) == 0
    assert f"{out / 'checkpoints' / 'step-6'} (step 6)" in capsys.readouterr().err.replace("\n", "")
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.num_hidden_layers == 1


def test_another_error_while_writing_is_raised_as_it_was(teacher, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, teacher, corpus, out)
    real = checkpoint.save_torch

    def broken(obj, dest):
        if ".step-4.tmp" in str(dest):
            raise ValueError("a bug in the writer")
        real(obj, dest)

    monkeypatch.setattr(checkpoint, "save_torch", broken)
    with pytest.raises(ValueError, match="a bug in the writer"):
        main(["distill", str(cfg)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


def test_a_full_disk_while_caching_the_teacher_is_one_line(teacher, corpus, tmp_path, capsys, monkeypatch):
    import alignkd.engine.cache_teacher as cache_teacher

    cache = tmp_path / "cache"
    cfg = make_cfg(teacher, corpus, tmp_path / "out", losses=[{"type": "kl"}])
    cfg["teacher"]["cache"] = str(cache)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(cache_teacher, "save_file", fails_writing("safetensors", save_file, lambda dest: True))
    line = one_error_line(main(["cache-teacher", str(path)]), capsys, "cache-teacher")
    assert f"could not write the teacher cache to {cache}: no space left" in line and "needs about" in line, line
    assert "run alignkd cache-teacher again" in line, line
    assert not cache.exists() and not (tmp_path / ".cache.tmp").exists()


def test_the_library_raises_a_disk_error_from_the_writer_s(teacher, corpus, tmp_path, monkeypatch):
    import alignkd

    cfg = make_cfg(teacher, corpus, tmp_path / "out", losses=LOSSES, steps=2, save_every=2)
    monkeypatch.setattr(checkpoint, "save_torch", fails_writing("oserror", checkpoint.save_torch, lambda d: True))
    with pytest.raises(DiskError, match="no checkpoint was saved yet") as caught:
        alignkd.distill(cfg)
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, OSError)
    assert isinstance(caught.value, OSError)  # callers catching OSError still do


# ---------------------------------------------------------------- a real, small file system


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``folder``'s file system."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(shutil.disk_usage(folder).free - leave, 0))
    return filler


@pytest.mark.parametrize(
    "name, write",
    [
        ("torch.save", lambda obj, path: torch.save(obj, path)),
        ("save_torch", disk.save_torch),
        ("save_file", lambda obj, path: save_file(obj, str(path))),
    ],
)
def test_each_writer_s_full_disk_is_recognised(small_fs, name, write):
    filler = fill(small_fs, 64_000)
    with pytest.raises(Exception) as caught:
        write({"w": torch.zeros(100_000)}, small_fs / "x")
    assert disk.disk_errno(caught.value, small_fs, needed=400_000) == errno.ENOSPC, repr(caught.value)
    filler.unlink()


@pytest.mark.parametrize("stage, leave", [(4, 150_000), (4, 20_000), ("export", 50_000)])
def test_a_really_full_disk_is_one_line_and_the_run_resumes(teacher, corpus, tmp_path, small_fs, capsys, stage, leave):
    # At step 4 with 150 kB left side.safetensors fits and state.pt does not; with 20 kB
    # neither; at the export the student's weights do not fit.
    out = small_fs / "out"
    cfg = write_config(tmp_path, teacher, corpus, out)
    filled = []
    real_save, real_export = loop.save_checkpoint, run_mod.save_outputs

    def save(run, step):
        if step == stage:
            filled.append(fill(small_fs, leave))
        return real_save(run, step)

    def export(run):
        if stage == "export":
            filled.append(fill(small_fs, leave))
        return real_export(run)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "save_checkpoint", save)
        mp.setattr(run_mod, "save_outputs", export)
        line = one_error_line(main(["distill", str(cfg)]), capsys)
    last_good = out / "checkpoints" / ("step-2" if stage == 4 else "step-6")
    assert "no space left" in line and f"the last good checkpoint is {last_good}" in line, line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    filled[0].unlink()
    assert main(["distill", str(cfg), "--resume"]) == 0
    assert f"{last_good} (step" in capsys.readouterr().err.replace("\n", "")
    assert load_file(str(out / "student" / "model.safetensors"))
