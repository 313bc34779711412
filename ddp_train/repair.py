"""Rebuilding history.csv and metrics.jsonl to a resumed step from what is intact: a line cut
short by a crash (no line end) is dropped, an unreadable line is dropped on its own, every good
line up to the step is kept."""

from __future__ import annotations

import csv
import io
import json
from typing import Any


def _whole_lines(text: str) -> tuple[list[str], int]:
    """The lines that end with a line break, and how many were torn (the last one, if cut short)."""
    lines = text.splitlines(keepends=True)
    torn = 1 if lines and not lines[-1].endswith(("\n", "\r")) else 0
    return lines[:len(lines) - torn], torn


def _number(value: str) -> bool:
    """A figure as history.csv writes it (empty where a row has no such figure)."""
    try:
        return value == "" or float(value) is not None
    except ValueError:
        return False


def history(text: str, step: int) -> tuple[str | None, int]:
    """history.csv rebuilt to `step`: (the new text, rows dropped as torn or unreadable). The text
    is None when the header itself is unreadable (the caller keeps the file aside)."""
    lines, dropped = _whole_lines(text)
    if not lines:
        return "", dropped
    header = next(csv.reader([lines[0]]), [])
    if "step" not in header:
        return None, dropped
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        row = dict(zip(header, fields))
        good = len(fields) == len(header) and row["step"].isdigit() and all(
            _number(v) for k, v in row.items() if k not in ("epoch", "step"))
        if not good:
            dropped += 1
        elif int(row["step"]) <= step:
            writer.writerow(fields)
    return out.getvalue(), dropped


def metrics(text: str, step: int) -> tuple[str, int]:
    """metrics.jsonl rebuilt to `step`: (the new text, lines dropped as torn or unreadable)."""
    lines, dropped = _whole_lines(text)
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            event: Any = json.loads(line)
            at = int(event.get("step", 0))
        except (ValueError, TypeError, AttributeError):
            dropped += 1
            continue
        if at <= step:
            kept.append(line.rstrip("\r\n") + "\n")
    return "".join(kept), dropped
