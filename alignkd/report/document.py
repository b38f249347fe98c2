"""The report as a list of blocks, built once and rendered to both HTML and Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    columns: list[str]  # the first is the row-label column
    rows: list[list[Cell] | str] = field(default_factory=list)  # a str is a group heading row


@dataclass
class Plot:
    name: str  # file stem and img id
    title: str  # alt text
    caption: str
    png: bytes


# Blocks: ("h1"|"h2"|"p", str), ("table", Table), ("plot", Plot), ("code", str).
Block = tuple[str, object]
