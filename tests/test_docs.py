"""The documentation: the mkdocs site builds strictly, and the README stays a landing page whose links resolve.

``mkdocs build --strict`` fails on a broken link or anchor, a page left out of
the nav, and a generation error in ``docs/hooks.py`` (the configuration
reference and the loss table are generated from the code at build time).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 200
# Inline links [text](target "title") and reference definitions [label]: target.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    reference = (site / "configuration" / "index.html").read_text()
    assert 'id="term-kl"' in reference and "teacher.path" in reference, "the configuration reference was not generated"
    assert "alignkd:" not in (site / "losses" / "index.html").read_text(), "a placeholder was left in the loss page"


def test_the_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES} and move the rest into docs/"
    )


def readme_links() -> list[str]:
    text = README.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold no links
    return [a or b for a, b in LINK.findall(text)]


def test_the_readme_links_resolve():
    links = readme_links()
    assert any(link.startswith("docs/") for link in links), "the README links into docs/"
    missing = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):  # a URL (https:, mailto:) or an anchor
            continue
        target = link.split("#", 1)[0]
        if not (ROOT / target).exists():
            missing.append(link)
    assert not missing, f"README.md links to files that do not exist: {missing}"
