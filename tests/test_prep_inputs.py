"""prep on URL lists that are not GBIF: CSV, TSV, TXT, Parquet, folders of them."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import FIXTURES, prep_summary, read_batches, read_parquet, run_cli


def ids_and_urls(out: Path) -> list[tuple[str, str]]:
    return sorted((r["source_id"], r["identifier"]) for r in read_batches(out).to_pylist())


def test_csv_with_quotes_newlines_and_a_short_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "urls.csv", "--output", out, "--id-column", "record",
            "--keep-columns", "notes")
    rows = {r["source_id"]: r for r in read_batches(out).to_pylist()}
    assert sorted(rows) == ["r1", "r2", "r3", "r5"]  # r4 is short, r6 repeats r1's URL
    assert rows["r1"]["title"] == "Leaf, upper side"
    assert rows["r2"]["title"] == 'A title with "quotes"'
    assert rows["r3"]["title"] == "Multi\nline title"
    assert rows["r3"]["is_license_full"] is False and rows["r1"]["is_license_full"] is True
    assert rows["r5"]["notes"] == "fifth"
    rejected = read_parquet(out / "prep" / "rejected.parquet").to_pylist()
    assert [(r["row_number"], r["reason"]) for r in rejected] == [(6, "malformed_row")]
    assert prep_summary(out)["duplicates"] == 1


def test_csv_without_id_column_uses_line_numbers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "urls.csv", "--output", out)
    assert [sid for sid, _ in ids_and_urls(out)] == ["2", "3", "4", "7"]


def test_tsv_with_crlf_and_a_stray_quote(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "urls.tsv", "--output", out)
    rows = read_batches(out).to_pylist()
    assert [(r["source_id"], r["identifier"], r["title"]) for r in rows] == [
        ("x1", "http://127.0.0.11:8010/s/1.jpg", "One"),
        ("x2", "http://127.0.0.11:8010/s/2.jpg", '"Two'),
    ]
    assert prep_summary(out)["formats"] == ["tsv"]


def test_txt_one_url_a_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "urls.txt", "--output", out)
    assert ids_and_urls(out) == [
        ("2", "http://127.0.0.10:8009/t/1.jpg"),
        ("4", "http://127.0.0.10:8009/t/2.jpg"),  # after a blank line, with CRLF
        ("5", "http://127.0.0.10:8009/t/3%20with%20space.jpg"),
    ]
    rejected = read_parquet(out / "prep" / "rejected.parquet").to_pylist()
    assert [(r["row_number"], r["raw_value"], r["reason"]) for r in rejected] == [
        (6, "not a url", "invalid_url")
    ]


def test_txt_without_header(tmp_path: Path) -> None:
    source = tmp_path / "list.txt"
    source.write_text("http://127.0.0.12:8011/1.jpg\nhttp://127.0.0.12:8011/2.jpg\n")
    out = tmp_path / "out"
    run_cli("prep", source, "--output", out)
    assert ids_and_urls(out) == [("1", "http://127.0.0.12:8011/1.jpg"),
                                 ("2", "http://127.0.0.12:8011/2.jpg")]


def test_parquet_with_non_string_columns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "urls.parquet", "--output", out, "--id-column", "record_id",
            "--keep-columns", "width")
    rows = read_batches(out).to_pylist()
    assert [(r["source_id"], r["identifier"], r["width"]) for r in rows] == [
        ("7", "http://127.0.0.7:8006/p/7.jpg", "640"),
        ("8", "http://127.0.0.7:8006/p/8.jpg", "800"),
    ]
    assert prep_summary(out)["dropped"] == {"unsupported_scheme": 1, "empty_url": 1}


def test_folder_of_files_is_one_input(tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    (folder / "more").mkdir(parents=True)
    shutil.copy(FIXTURES / "urls.txt", folder / "a.txt")
    shutil.copy(FIXTURES / "urls.csv", folder / "more" / "b.csv")
    (folder / ".hidden.txt").write_text("http://127.0.0.99:1/never.jpg\n")
    (folder / "empty.txt").write_text("")
    out = tmp_path / "out"
    result = run_cli("prep", folder, "--output", out)
    keys = [sid for sid, _ in ids_and_urls(out)]
    # Without an id column, rows are keyed by file and line, so keys stay unique.
    assert keys == ["a.txt:2", "a.txt:4", "a.txt:5", "more/b.csv:2", "more/b.csv:3",
                    "more/b.csv:4", "more/b.csv:7"]
    summary = prep_summary(out)
    assert summary["formats"] == ["csv", "txt"]
    assert "empty.txt: empty file, skipped" in " ".join(summary["warnings"])
    assert "empty.txt" in result.stderr
    rejected = read_parquet(out / "prep" / "rejected.parquet").to_pylist()
    assert {r["source_file"] for r in rejected} == {str(folder / "a.txt"),
                                                    str(folder / "more" / "b.csv")}


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # As plain TSV the GBIF filter is off: the Sound and text/html rows are kept.
    run_cli("prep", FIXTURES / "multimedia.txt", "--output", out, "--format", "tsv")
    summary = prep_summary(out)
    assert summary["formats"] == ["tsv"]
    assert "not_still_image" not in summary["dropped"]
    assert summary["rows_kept"] == 16
