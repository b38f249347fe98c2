"""mkdocs hook: the parts of the docs that are generated from alignkd's own code.

A page holds a placeholder line (an HTML comment, so the raw Markdown still reads
well); at build time ``on_page_markdown`` replaces it:

- ``<!-- alignkd:config-reference -->`` (configuration.md): every section of the run
  config, field by field (key, type, default, docstring), walked from ``Config``'s
  dataclasses, and every loss term type of ``TERM_TYPES`` with its own fields;
- ``<!-- alignkd:loss-terms -->`` (losses.md): the loss term types at a glance.

Nothing here names a config section or a term type: add a field, a section or a
term type to the code and the next build lists it. A page that lost its
placeholder fails the build.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # build the docs of this checkout's alignkd, whatever else is installed
    sys.path.insert(0, str(ROOT))

from alignkd.config import Config, field_docs  # noqa: E402
from alignkd.terms import TERM_TYPES, TermConfig  # noqa: E402

CONFIG_REFERENCE = "<!-- alignkd:config-reference -->"
LOSS_TERMS = "<!-- alignkd:loss-terms -->"
PLACEHOLDERS = {"configuration.md": CONFIG_REFERENCE, "losses.md": LOSS_TERMS}
REFERENCE_PAGE = "configuration.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    """mkdocs event: fill in the placeholders of the pages that hold them."""
    name = page.file.src_uri
    mark = PLACEHOLDERS.get(name)
    if mark is not None and mark not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{name} lost its placeholder line {mark}; the generated part has nowhere to go")
    if CONFIG_REFERENCE in markdown:
        markdown = markdown.replace(CONFIG_REFERENCE, config_reference())
    if LOSS_TERMS in markdown:
        link = "" if name == REFERENCE_PAGE else REFERENCE_PAGE
        markdown = markdown.replace(LOSS_TERMS, loss_terms_table(link))
    return markdown


# ----------------------------------------------------------------------------- rendering


def anchor(path: str) -> str:
    """A heading id for a dotted config path: ``student.from_teacher`` -> ``student-from_teacher``."""
    return path.replace("[i]", "").replace(".", "-")


def term_anchor(name: str) -> str:
    return f"term-{name}"


def inner_dataclass(hint) -> type | None:
    """The dataclass a field holds, directly, optionally or as list items; None for plain values."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):
        found = inner_dataclass(arg)
        if found is not None:
            return found
    return None


def is_list(hint) -> bool:
    return typing.get_origin(hint) is list


def type_text(hint) -> str:
    """A field's type as a user writes it in YAML terms: ``str``, ``int | null``, ``list[int]``, ``mapping``."""
    if hint is typing.Any:
        return "any"
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(hint))
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in typing.get_args(hint))}]"
    if dataclasses.is_dataclass(hint):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def default_text(f: dataclasses.Field) -> str:
    """A field's default as YAML: ``null``, ``true``, ``[q, k, v]``; ``required`` when it has none."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "its fields' defaults"
    if value == "":
        return '""'
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


CODE_SPAN = re.compile(r"(`+).+?\1")


def cell(text: str) -> str:
    """Table-cell-safe Markdown: one line, pipes escaped outside code spans (inside them a pipe is kept as it is)."""
    text = " ".join(text.split())
    out, at = [], 0
    for span in CODE_SPAN.finditer(text):
        out += [text[at : span.start()].replace("|", "\\|"), span.group()]
        at = span.end()
    return "".join([*out, text[at:].replace("|", "\\|")])


def field_table(cls: type, prefix: str, skip: set[str], seen: dict[type, str]) -> tuple[list[str], list[tuple]]:
    """The table of ``cls``'s fields (keys written ``prefix.name``), and the nested dataclasses it links to."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = ["| key | type | default | what it sets |", "|---|---|---|---|"]
    nested = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        key = f"{prefix}.{f.name}"
        kind = cell(f"`{type_text(hint)}`")
        inner = inner_dataclass(hint)
        if inner is not None:
            if inner not in seen:
                seen[inner] = key
                nested.append((key, inner))
            kind += f" ([fields](#{anchor(seen[inner])}))"
        doc = docs.get(f.name, "")
        rows.append(f"| `{key}` | {kind} | {cell(f'`{default_text(f)}`')} | {cell(doc)} |")
    return rows, nested


def dataclass_section(cls: type, path: str, level: int, doc: str, seen: dict[type, str]) -> list[str]:
    """A heading for the config section at ``path``, its docstrings, its field table, then its nested sections."""
    lines = [f"{'#' * level} `{path}` {{#{anchor(path)}}}", ""]
    about = [t for t in (doc, (cls.__doc__ or "").strip()) if t]
    if about:
        lines += [" ".join(" ".join(about).split()), ""]
    rows, nested = field_table(cls, path, set(), seen)
    lines += [*rows, ""]
    for key, inner in nested:
        lines += dataclass_section(inner, key, min(level + 1, 4), "", seen)
    return lines


def terms_section(path: str, level: int, doc: str, seen: dict[type, str]) -> list[str]:
    """The loss term list: the fields every term has, then each type of ``TERM_TYPES`` with its own fields."""
    common = {f.name for f in dataclasses.fields(TermConfig)}
    item = f"{path}[i]"
    lines = [f"{'#' * level} `{path}` {{#{anchor(path)}}}", ""]
    lines += [
        f"{doc} A list of terms, each a mapping with a `type` (one of "
        + ", ".join(f"[`{name}`](#{term_anchor(name)})" for name in TERM_TYPES)
        + "). These fields apply to every term; each type adds its own, below.",
        "",
    ]
    rows, nested = field_table(TermConfig, item, set(), seen)
    lines += [*rows, ""]
    for key, inner in nested:
        lines += dataclass_section(inner, key, level + 1, "", seen)
    for name, kind in TERM_TYPES.items():
        lines += [f"{'#' * (level + 1)} Term type `{name}` {{#{term_anchor(name)}}}", ""]
        about = " ".join((kind.config.__doc__ or "").split())
        lines += [
            f"Matches: {kind.matches}. {about}",
            "",
            f"Trains from a teacher cache (`teacher.cache`): {'yes' if kind.cached else 'no'}.",
            "",
        ]
        own = [f.name for f in dataclasses.fields(kind.config) if f.name not in common]
        if not own:
            lines += ["No fields beyond the common ones.", ""]
            continue
        rows, nested = field_table(kind.config, item, common, seen)
        lines += ["Its fields, besides the common ones:", "", *rows, ""]
        for key, inner in nested:
            lines += dataclass_section(inner, key, level + 2, "", seen)
    return lines


def config_reference() -> str:
    """Every section of ``Config``: one heading each, its field table, nested sections and the loss term types."""
    hints = typing.get_type_hints(Config)
    docs = field_docs(Config)
    seen: dict[type, str] = {}
    lines: list[str] = []
    for f in dataclasses.fields(Config):
        hint = hints[f.name]
        inner = inner_dataclass(hint)
        doc = docs.get(f.name, "")
        if inner is not None and is_list(hint) and issubclass(inner, TermConfig):
            lines += terms_section(f.name, 2, doc, seen)
        elif inner is not None:
            lines += dataclass_section(inner, f.name, 2, doc, seen)
        else:  # a plain top-level value
            lines += [
                f"## `{f.name}` {{#{anchor(f.name)}}}",
                "",
                f"`{type_text(hint)}`, default `{default_text(f)}`: {doc}",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def loss_terms_table(reference: str = REFERENCE_PAGE) -> str:
    """One row per term type: what it matches, its own fields with defaults, whether a teacher cache serves it."""
    common = {f.name for f in dataclasses.fields(TermConfig)} | {"temperature_schedule"}
    rows = ["| `type` | what it matches | its own fields (defaults) | from `teacher.cache` |", "|---|---|---|---|"]
    for name, kind in TERM_TYPES.items():
        cells = []
        for f in dataclasses.fields(kind.config):
            if f.name in common:
                continue
            default = default_text(f)
            cells.append(f"`{f.name}`" + ("" if default == "null" else f" ({cell(default)})"))
        link = f"[`{name}`]({reference}#{term_anchor(name)})"
        rows.append(f"| {link} | {cell(kind.matches)} | {', '.join(cells) or '-'} | {'yes' if kind.cached else 'no'} |")
    return "\n".join(rows) + "\n"
