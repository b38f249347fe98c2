"""Rendering the report's blocks: a self-contained HTML page and a Markdown file."""

from __future__ import annotations

import base64
import html

from alignkd import __version__
from alignkd.report.document import Block, Table

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #222;
       background: #fff; margin: 0; line-height: 1.5; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 1.6em; margin: 0.2em 0 0.1em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.lead { font-size: 1.05em; background: #f6f8fa; border-left: 4px solid #1f77b4; padding: 10px 14px; }
p.meta { color: #666; font-size: 0.9em; margin-top: 0; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e5e5e5; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; border-bottom: 2px solid #ccc; }
th:first-child, td:first-child { text-align: left; }
tr.group td { text-align: left; font-style: italic; color: #555; background: #fafafa; padding-top: 10px; }
td strong { color: #0b5394; }
pre { background: #f6f8fa; border: 1px solid #e5e5e5; padding: 12px; overflow-x: auto; font-size: 0.85em; }
footer { color: #888; font-size: 0.8em; margin-top: 3em; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
    ]
    lead_done = False
    for kind, body in blocks:
        if kind == "h1":
            out.append(f"<h1>{e(body)}</h1>")
        elif kind == "h2":
            out.append(f"<h2>{e(body)}</h2>")
        elif kind == "meta":
            out.append(f'<p class="meta">{e(body)}</p>')
        elif kind == "p":
            cls = "" if lead_done else ' class="lead"'
            lead_done = True
            out.append(f"<p{cls}>{e(body)}</p>")
        elif kind == "table":
            out.append(_html_table(body))
        elif kind == "plot":
            data = base64.b64encode(body.png).decode("ascii")
            out.append(
                f'<figure><img id="plot-{e(body.name)}" src="data:image/png;base64,{data}" alt="{e(body.title)}">'
                f"<figcaption>{e(body.caption)}</figcaption></figure>"
            )
        elif kind == "code":
            out.append(f"<pre><code>{e(body)}</code></pre>")
    out += [
        f"<footer>Written by alignkd {e(__version__)} (alignkd report).</footer>",
        "</main>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(out)


def _html_table(t: Table) -> str:
    e = html.escape
    rows = ["<table>", "<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr></thead>", "<tbody>"]
    for row in t.rows:
        if isinstance(row, str):
            rows.append(f'<tr class="group"><td colspan="{len(t.columns)}">{e(row)}</td></tr>')
            continue
        tds = []
        for c in row:
            text = e(c.text)
            tds.append(f"<td><strong>{text}</strong></td>" if c.bold else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    rows += ["</tbody>", "</table>"]
    return "\n".join(rows)


def to_markdown(blocks: list[Block], files: dict[str, str]) -> str:
    out = []
    for kind, body in blocks:
        if kind == "h1":
            out.append(f"# {body}")
        elif kind == "h2":
            out.append(f"## {body}")
        elif kind in ("p", "meta"):
            out.append(str(body))
        elif kind == "table":
            out.append(_md_table(body))
        elif kind == "plot":
            out.append(f"![{body.title}]({files[body.name]})\n\n*{body.caption}*")
        elif kind == "code":
            # A fence longer than any run of backticks inside, so nothing in the YAML can close it.
            ticks = "`" * max(3, _longest_backticks(str(body)) + 1)
            out.append(f"{ticks}yaml\n{str(body).rstrip()}\n{ticks}")
    out.append(f"*Written by alignkd {__version__} (alignkd report).*")
    return "\n\n".join(out) + "\n"


def _longest_backticks(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = [
        "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(t.columns) - 1)) + "|",
    ]
    for row in t.rows:
        if isinstance(row, str):
            lines.append("| " + " | ".join([f"*{_md_cell(row)}*"] + [""] * (len(t.columns) - 1)) + " |")
            continue
        lines.append("| " + " | ".join(f"**{_md_cell(c.text)}**" if c.bold else _md_cell(c.text) for c in row) + " |")
    return "\n".join(lines)
