"""Reading TSV pairs: the happy path and every error a user can make, each a DataError."""

from __future__ import annotations

from pathlib import Path

import pytest

from pema.data import Pair, dataset_fingerprint, read_pairs, write_pairs
from pema.errors import DataError


def _tsv(tmp_path: Path, text: str, name: str = "d.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_pairs_by_column_name(tmp_path: Path) -> None:
    path = _tsv(tmp_path, "id\ttarget\tsource\n1\tYou are.\tThou art.\n2\tGo.\t Get thee hence. \n")
    assert read_pairs(path) == [Pair("Thou art.", "You are."), Pair("Get thee hence.", "Go.")]
    assert read_pairs(path, max_pairs=1) == [Pair("Thou art.", "You are.")]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _tsv(tmp_path, "source\ttarget\n\na\tb\n\n")
    assert read_pairs(path) == [Pair("a", "b")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "absent.tsv")
    with pytest.raises(DataError):
        read_pairs(tmp_path)  # a folder is not a file


def test_missing_column(tmp_path: Path) -> None:
    path = _tsv(tmp_path, "source\ttranslation\na\tb\n")
    with pytest.raises(DataError, match="target"):
        read_pairs(path)


def test_empty_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data rows"):
        read_pairs(_tsv(tmp_path, "source\ttarget\n"))
    with pytest.raises(DataError, match="empty file"):
        read_pairs(_tsv(tmp_path, "", "empty.tsv"))


@pytest.mark.parametrize("row", ["only-one-field", "a\tb\tc", "a\tb\t"])
def test_malformed_row(tmp_path: Path, row: str) -> None:
    path = _tsv(tmp_path, f"source\ttarget\nok\tfine\n{row}\n")
    with pytest.raises(DataError, match=r":3: malformed row"):
        read_pairs(path)


def test_empty_field_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty source or target"):
        read_pairs(_tsv(tmp_path, "source\ttarget\n  \tb\n"))
    path = tmp_path / "latin1.tsv"
    path.write_bytes("source\ttarget\nna\u00efve\tb\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_pairs(path)


@pytest.mark.parametrize("max_pairs", [0, -1])
def test_max_pairs_below_one(tmp_path: Path, max_pairs: int) -> None:
    path = _tsv(tmp_path, "source\ttarget\na\tb\n")
    with pytest.raises(DataError, match="at least 1"):
        read_pairs(path, max_pairs=max_pairs)


def test_fingerprint_depends_on_content_and_order() -> None:
    a, b = Pair("x", "y"), Pair("u", "v")
    assert dataset_fingerprint([a, b]) == dataset_fingerprint([Pair("x", "y"), Pair("u", "v")])
    assert dataset_fingerprint([a, b]) != dataset_fingerprint([b, a])
    # The separators keep field boundaries: ("ab", "c") is not ("a", "bc").
    assert dataset_fingerprint([Pair("ab", "c")]) != dataset_fingerprint([Pair("a", "bc")])


def test_quotes_are_raw_text(tmp_path: Path) -> None:
    """Verse and chat data is full of quotes: they are characters, never TSV syntax."""
    text = (
        'source\ttarget\n"He said, "go"\t"He said: go"\n'
        '"unbalanced opening\tfirst\nnext line\tsecond\n'
        'a ""doubled"" one\t\'single\'\n'
    )
    assert read_pairs(_tsv(tmp_path, text)) == [
        Pair('"He said, "go"', '"He said: go"'),
        Pair('"unbalanced opening', "first"),  # does not swallow the next line
        Pair("next line", "second"),
        Pair('a ""doubled"" one', "'single'"),
    ]


def test_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "excel.tsv"
    path.write_bytes("\ufeffsource\ttarget\r\nThou art.\tYou are.\r\n\r\nGo.\tGo.\r\n".encode())
    assert read_pairs(path) == [Pair("Thou art.", "You are."), Pair("Go.", "Go.")]


def test_errors_and_origins_name_the_file_line(tmp_path: Path) -> None:
    path = _tsv(tmp_path, 'source\ttarget\n\n"a\tb\n\nc\td\n"e\tf\textra\n')
    with pytest.raises(DataError, match=r"d\.tsv:6: malformed row"):
        read_pairs(path)
    pairs = read_pairs(path, max_pairs=2)
    assert [p.origin for p in pairs] == [f"{path}:3", f"{path}:5"]


def test_write_pairs_round_trips(tmp_path: Path) -> None:
    pairs = [Pair('"quoted" start', 'end "quoted"'), Pair("a 'b' c", "\u00e9\u00e8")]
    path = write_pairs(tmp_path / "w.tsv", pairs)
    assert read_pairs(path) == pairs
    with pytest.raises(DataError, match="tab or line break"):
        write_pairs(tmp_path / "x.tsv", [Pair("a\tb", "c")])
