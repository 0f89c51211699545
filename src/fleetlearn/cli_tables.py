"""Tables the CLI prints, fitted to the terminal: whole headers, whole values.

A `FitTable` knows its columns in display order and which matter most
(`priority`: lower first).  `render` keeps the most important columns that fit the
console's width at their natural width (the widest of header and values), in
display order, and names the rest in one line under the table with how to see them
(`--wide`, or `--columns a,b,...`).  Nothing is cut to an ellipsis: a table that
would not fit is narrowed by dropping columns, never by truncating them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rich.console import Console
from rich.table import Table


class ColumnError(ValueError):
    """`--columns` named a column the table does not have."""


@dataclass
class FitTable:
    title: str
    columns: Sequence[str]
    priority: Sequence[str] = ()  # most important first; columns not named come after, in display order
    justify: str = "left"
    rows: list[list[str]] = field(default_factory=list)

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: a row of {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    # -- choosing columns ---------------------------------------------------------------------
    def natural_widths(self) -> list[int]:
        return [max([len(h)] + [len(r[i]) for r in self.rows]) for i, h in enumerate(self.columns)]

    def choose(self, width: int, wide: bool = False, only: Sequence[str] | None = None) -> list[int]:
        """Indices of the columns to show, in display order."""
        if only:
            unknown = [c for c in only if c not in self.columns]
            if unknown:
                raise ColumnError(f"--columns: no column {', '.join(map(repr, unknown))}; this table has "
                                  + ", ".join(self.columns))
            wanted = set(only)
            return [i for i, c in enumerate(self.columns) if c in wanted]
        if wide:
            return list(range(len(self.columns)))
        nat = self.natural_widths()
        order = [self.columns.index(c) for c in self.priority if c in self.columns]
        order += [i for i in range(len(self.columns)) if i not in order]
        chosen: list[int] = []
        used = 1  # the left border
        for i in order:
            cost = nat[i] + 3  # one space each side and the border after
            if used + cost <= width or not chosen:  # the first column always shows
                chosen.append(i)
                used += cost
        return sorted(chosen)

    def needed_width(self, shown: Sequence[int]) -> int:
        nat = self.natural_widths()
        return 1 + sum(nat[i] + 3 for i in shown)

    # -- printing -------------------------------------------------------------------------------
    def render(self, console: Console, wide: bool = False, only: Sequence[str] | None = None) -> list[str]:
        """Print the table; returns the names of the columns left out (empty when all shown)."""
        shown = self.choose(console.width, wide=wide, only=only)
        nat = self.natural_widths()
        t = Table(title=self.title)
        for i in shown:
            t.add_column(self.columns[i], justify=self.justify, no_wrap=True, min_width=nat[i])
        for r in self.rows:
            t.add_row(*(r[i] for i in shown))
        need = self.needed_width(shown)
        if need > console.width:  # --wide or --columns asked for more than the terminal: print it whole anyway
            Console(width=need, file=console.file, force_terminal=console.is_terminal, no_color=console.no_color).print(t)
        else:
            console.print(t)
        hidden = [c for i, c in enumerate(self.columns) if i not in shown]
        if hidden and not only:
            console.print(f"[dim]{len(hidden)} column{'s' if len(hidden) > 1 else ''} left out to fit {console.width} characters: "
                          f"{', '.join(hidden)} (--wide shows every column; --columns a,b,... chooses)[/dim]", soft_wrap=True)
        return hidden


def parse_columns(value: str | None) -> list[str] | None:
    """`--columns "round,accuracy, uplink"` -> ["round", "accuracy", "uplink"]."""
    if value is None:
        return None
    cols = [c.strip() for c in value.split(",") if c.strip()]
    if not cols:
        raise ColumnError("--columns: give at least one column name, comma-separated")
    return cols
