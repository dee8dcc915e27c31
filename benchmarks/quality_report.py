"""Render benchmarks/results/quality.json as a Markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(data: dict[str, Any], path: Path) -> None:
    lines = [
        "# Quality benchmark",
        "",
        "Produced by `python -m benchmarks.quality`; raw cells in quality.json.",
        "",
    ]
    for key, value in sorted(data.items()):
        if isinstance(value, dict) and "chrf" in value:
            lines.append(f"| {key} | {value['bleu']} | {value['chrf']} |")
    path.write_text("\n".join(lines) + "\n")
