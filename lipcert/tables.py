"""Tables that stay readable in any terminal width.

A :class:`FoldingTable` is a rich table when it fits the terminal unwrapped. When it does
not (80 columns, a CI log), the columns marked ``fold`` (long free text: notes, attributes)
leave the grid and are printed under their row, word-wrapped to the width and never broken
inside a word; the remaining columns keep their alignment.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Column:
    header: str
    justify: str = "left"
    fold: bool = False  # long free text: printed under the row when the table is too wide


@dataclass
class FoldingTable:
    title: str
    columns: list[Column]
    rows: list[tuple[list[str], str | None]] = field(default_factory=list)
    caption: str | None = None

    def add_row(self, *cells: str, style: str | None = None) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(([str(c) for c in cells], style))

    def full(self) -> Table:
        """The plain rich table with every column."""
        table = Table(title=self.title)
        for col in self.columns:
            table.add_column(col.header, justify=col.justify, overflow="fold")
        for cells, style in self.rows:
            table.add_row(*cells, style=style)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = self.full()
        width = options.max_width
        natural = Measurement.get(console, options.update(max_width=1 << 20), table).maximum
        if natural <= width:
            yield table
        else:
            yield from self._folded(width)
        if self.caption:  # below the table, wrapped to the terminal, one paragraph a line
            for paragraph in Text.from_markup(self.caption).plain.split("\n"):
                yield from (Text(t) for t in _wrap(paragraph, width, "", "  "))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)

    def _folded(self, width: int) -> RenderResult:
        plain = [[" ".join(Text.from_markup(c).plain.split("\n")) for c in cells]
                 for cells, _ in self.rows]
        cell_width = [max([len(col.header)] + [len(row[i]) for row in plain])
                      for i, col in enumerate(self.columns)]
        kept = [i for i, c in enumerate(self.columns) if not c.fold]
        while len(kept) > 1 and sum(cell_width[i] for i in kept) + 2 * (len(kept) - 1) > width:
            kept.remove(max(kept[1:], key=lambda i: cell_width[i]))  # the widest goes under
        folded = [i for i in range(len(self.columns)) if i not in kept]
        yield Text(self.title, style="italic")
        header = "  ".join(self.columns[i].header.ljust(cell_width[i]) for i in kept).rstrip()
        yield Text(header, style="bold")
        yield Text("─" * min(width, max(len(header), 1)))
        for cells, style in self.rows:
            line = Text(style=style or "")
            for k, i in enumerate(kept):
                cell = Text.from_markup(cells[i].replace("\n", " "))
                cell.align("right" if self.columns[i].justify == "right" else "left",
                           cell_width[i])
                if k:
                    line.append("  ")
                line.append(cell)
            line.rstrip()
            yield line
            for i in folded:
                yield from _wrapped(self.columns[i].header, cells[i], width)


def _wrap(text: str, width: int, first: str, rest: str | None = None) -> list[str]:
    """Word-wrap; a word longer than the line stays whole (it is never split)."""
    rest = first if rest is None else rest
    return textwrap.wrap(text, width=max(width, len(first) + 20, len(rest) + 20),
                         initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False)


def _wrapped(header: str, markup: str, width: int) -> RenderResult:
    """A folded cell: each of its lines (notes) starts a paragraph, the first one labelled."""
    parts = [p for p in Text.from_markup(markup).plain.split("\n") if p.strip()]
    for k, part in enumerate(parts):
        first = f"    {header}: " if k == 0 else "    " + " " * (len(header) + 2)
        for line in _wrap(part, width, first, " " * len(first)):
            yield Text(line, style="dim")
