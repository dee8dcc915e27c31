"""Parallel text pairs: reading TSV files and fingerprinting datasets."""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pema.errors import DataError

DATA_ENV = "PEMA_DATA_DIR"
_FALLBACK_DATA_DIR = Path("/work/shared/data")


def shared_data_dir() -> Path:
    """The evaluation data: $PEMA_DATA_DIR, else the first `shared/data` beside the project or one
    of its parents (the layout of this workplace), else /work/shared/data."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    for base in (here, *here.parents):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return _FALLBACK_DATA_DIR


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    # Where the pair was read ("file:line"), for error messages; not part of its identity.
    origin: str = field(default="", compare=False, repr=False)


# Fields are raw text: tabs and line ends are the only structure. csv's default quoting would read
# `"He said, "go"` as `He said, go"` and let an unbalanced quote swallow the next lines.
_DIALECT = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None, "strict": True}


def read_pairs(path: str | Path, max_pairs: int | None = None) -> list[Pair]:
    """Read a TSV with a header naming `source` and `target` columns (others are ignored).

    Quotes are ordinary characters; a UTF-8 byte-order mark and CRLF line ends are accepted.
    Errors name the file and its 1-based line."""
    path = Path(path)
    if max_pairs is not None and max_pairs < 1:
        raise DataError(f"--max-pairs must be at least 1, got {max_pairs}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    pairs: list[Pair] = []
    reader = None
    try:
        # utf-8-sig drops the byte-order mark that Excel and Notepad put before the header.
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, **_DIALECT)  # type: ignore[arg-type]
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (expected a header with source and target)")
            missing = [c for c in ("source", "target") if c not in header]
            if missing:
                raise DataError(
                    f"{path}: header lacks column(s) {', '.join(missing)} (found: {', '.join(header)})"
                )
            si, ti = header.index("source"), header.index("target")
            for row in reader:
                line_no = reader.line_num  # one record is one line under QUOTE_NONE
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{line_no}: malformed row, {len(row)} fields where the header has "
                        f"{len(header)}"
                    )
                source, target = row[si].strip(), row[ti].strip()
                if not source or not target:
                    raise DataError(f"{path}:{line_no}: empty source or target")
                pairs.append(Pair(source, target, f"{path}:{line_no}"))
                if max_pairs is not None and len(pairs) >= max_pairs:
                    break
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        where = f"{path}:{reader.line_num}" if reader is not None else str(path)
        raise DataError(f"{where}: malformed TSV ({e})") from None
    if not pairs:
        raise DataError(f"{path}: no data rows")
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> Path:
    """Write pairs as `read_pairs` reads them back unchanged: raw fields, no quoting."""
    path = Path(path)
    for p in pairs:
        for text in (p.source, p.target):
            if "\t" in text or "\n" in text or "\r" in text:
                raise DataError(f"{p.origin or path}: a field holds a tab or line break: {text!r}")
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n", **_DIALECT)  # type: ignore[arg-type]
        w.writerow(["source", "target"])
        w.writerows([p.source, p.target] for p in pairs)
    return path


def pair_origin(pairs: Sequence[Pair], index: int) -> str:
    """Where pair `index` came from, for an error message: its file line, else its position."""
    origin = pairs[index].origin if 0 <= index < len(pairs) else ""
    return origin or f"pair {index + 1}"


def dataset_fingerprint(pairs: Sequence[Pair]) -> str:
    """A content hash of the pairs, in order: equal data gives an equal fingerprint."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.source.encode())
        h.update(b"\x1f")
        h.update(p.target.encode())
        h.update(b"\x1e")
    return h.hexdigest()[:32]
