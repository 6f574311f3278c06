"""Bad input: a clear one-line error, or a rejected row; never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FIXTURES, run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("does-not-exist.txt", ["no such file or folder"]),
        ("empty.txt", ["empty file"]),
        ("header-only.txt", ["no data rows"]),
        ("no-url-column.csv", ["no URL column", "--url-column", "id, name, notes"]),
        ("truncated.zip", ["not a readable zip file", "truncated"]),
        ("no-multimedia.zip", ["no multimedia data", "Occurrence"]),
    ],
)
def test_unusable_inputs(tmp_path: Path, name: str, fragments: list[str]) -> None:
    out = tmp_path / "out"
    result = run_cli("prep", FIXTURES / name, "--output", out, check=False)
    assert_one_line_error(result, name, *fragments)
    assert not (out / "prep" / "summary.json").exists()
    assert not (out / "prep" / "batches").exists()


def test_unknown_format(tmp_path: Path) -> None:
    result = run_cli("prep", FIXTURES / "urls.txt", "--output", tmp_path / "o", "--format",
                     "xlsx", check=False)
    assert result.returncode == 2
    assert "'xlsx' is not one of" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_url_column_given_by_flag(tmp_path: Path) -> None:
    result = run_cli("prep", FIXTURES / "urls.csv", "--output", tmp_path / "o",
                     "--url-column", "photo", check=False)
    assert_one_line_error(result, "no column 'photo'", "--url-column")


def test_gbif_format_forced_on_a_file_without_gbif_columns(tmp_path: Path) -> None:
    result = run_cli("prep", FIXTURES / "urls.tsv", "--output", tmp_path / "o",
                     "--format", "gbif", check=False)
    assert_one_line_error(result, "no type, format column", "--format tsv")


def test_binary_file_given_as_text(tmp_path: Path) -> None:
    blob = tmp_path / "photo.txt"
    blob.write_bytes(bytes(range(256)) * 4)
    result = run_cli("prep", blob, "--output", tmp_path / "out", check=False)
    assert_one_line_error(result, "photo.txt", "binary data, not a text list of URLs")


def test_every_url_rejected_still_finishes(tmp_path: Path) -> None:
    source = tmp_path / "bad.txt"
    source.write_text("javascript:alert(1)\nfile:///etc/passwd\nftp://127.0.0.1/a\n/rel\n")
    out = tmp_path / "out"
    run_cli("prep", source, "--output", out)
    import json

    summary = json.loads((out / "prep" / "summary.json").read_text())
    assert summary["download_rows"] == 0
    assert summary["dropped"] == {"unsupported_scheme": 3, "invalid_url": 1}
