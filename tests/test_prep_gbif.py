"""prep on GBIF multimedia files: the filter, URL checks, UUIDs, duplicates, batches."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from conftest import FIXTURES, prep_summary, read_batches, read_parquet, run_cli
from distributed_downloader.prep.partition import uuid_v5_python

MULTIMEDIA = FIXTURES / "multimedia.txt"

# What the fixture's 24 data rows must become (see tests/fixtures/multimedia.txt).
EXPECTED_DROPPED = {
    "missing_gbif_id": 1,
    "not_still_image": 2,
    "not_image_format": 1,  # text/html (an empty format is kept: see below)
    "unsupported_scheme": 3,  # javascript:, file:, ftp:
    "invalid_url": 1,  # relative
    "empty_url": 1,
    "malformed_row": 2,  # too few and too many fields
    "invalid_utf8": 1,
}
EXPECTED_DOWNLOADS = {
    # source_id: (identifier, server_name)
    "1001": ("http://127.0.0.2:8001/img/1.jpg", "127.0.0.2:8001"),
    "1002": ("http://127.0.0.2:8001/img/2.png", "127.0.0.2:8001"),
    "1008": ("http://127.0.0.2:8001/img/8.jpg", "127.0.0.2:8001"),
    "1007": ("http://127.0.0.2:8001/img/7.jpg", "127.0.0.2:8001"),  # format empty
    "1022": ("http://127.0.0.2:8001/img/UPPER.jpg", "127.0.0.2:8001"),
    "1009": ("http://127.0.0.3:8002/photos/Aus%20bus%20%C3%BC.jpg", "127.0.0.3:8002"),
    "1024": ("http://127.0.0.3:8002/photos/trailing.jpg", "127.0.0.3:8002"),
    "1021": ("http://127.0.0.4:8003/", "127.0.0.4:8003"),
    "1023": ("http://127.0.0.2/default-port.jpg", "127.0.0.2"),
    "1025": ("http://127.0.0.5:8004/last.jpg", "127.0.0.5:8004"),
}


@pytest.fixture(scope="module")
def gbif_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gbif") / "out"
    run_cli("prep", MULTIMEDIA, "--output", out)
    return out


def test_counts_every_row_by_what_became_of_it(gbif_out: Path) -> None:
    summary = prep_summary(gbif_out)
    assert summary["formats"] == ["gbif"]
    assert summary["rows_read"] == 24
    assert summary["dropped"] == EXPECTED_DROPPED
    assert summary["rows_kept"] == 12
    assert summary["kept_without_image_format"] == 1
    assert summary["duplicates"] == 2
    assert summary["download_rows"] == 10
    assert summary["rows_read"] == summary["rows_kept"] + sum(summary["dropped"].values())
    assert (summary["servers"], summary["batches"]) == (5, 5)


def test_keeps_the_right_rows_with_normalised_urls(gbif_out: Path) -> None:
    rows = read_batches(gbif_out).to_pylist()
    assert {r["source_id"]: (r["identifier"], r["server_name"]) for r in rows} == \
        EXPECTED_DOWNLOADS
    by_id = {r["source_id"]: r for r in rows}
    # GBIF files are not quoted: stray quotes are part of the value.
    assert by_id["1001"]["title"] == 'Specimen "A 1'
    assert by_id["1008"]["title"] == '"quoted" title"'
    assert by_id["1001"]["is_license_full"] is True
    assert by_id["1002"]["is_license_full"] is False  # no license
    assert by_id["1002"]["license"] is None


def test_rejected_rows_name_line_value_and_reason(gbif_out: Path) -> None:
    rejected = read_parquet(gbif_out / "prep" / "rejected.parquet").to_pylist()
    got = [(r["row_number"], r["reason"]) for r in rejected]
    assert got == [
        (17, "unsupported_scheme"), (18, "unsupported_scheme"), (19, "unsupported_scheme"),
        (20, "invalid_url"), (21, "empty_url"), (22, "malformed_row"), (23, "malformed_row"),
        (24, "invalid_utf8"),
    ]
    assert rejected[0]["raw_value"] == "javascript:alert(1)"
    assert rejected[5]["raw_value"].endswith("\ttoo few")
    assert "Espa\\xf1a" in rejected[7]["raw_value"]
    assert {r["source_file"] for r in rejected} == {str(MULTIMEDIA)}
    lines = MULTIMEDIA.read_bytes().split(b"\n")
    assert lines[17 - 1].split(b"\t")[3] == b"javascript:alert(1)"  # row_number is the line


def test_rows_the_filter_dropped_can_be_inspected_with_their_reason(gbif_out: Path) -> None:
    dropped = read_parquet(gbif_out / "prep" / "dropped.parquet").to_pylist()
    by_reason = Counter(row["reason"] for row in dropped)
    assert by_reason == {reason: count for reason, count in EXPECTED_DROPPED.items()
                         if reason in ("missing_gbif_id", "not_still_image", "not_image_format")}
    lines = MULTIMEDIA.read_bytes().split(b"\n")
    for row in dropped:
        fields = lines[row["row_number"] - 1].decode().split("\t")
        assert row["identifier"] == fields[3]  # the URL as written, on the line it names
        assert row["source_file"] == str(MULTIMEDIA)
    assert {row["value"] for row in dropped if row["reason"] == "not_image_format"} == \
        {"text/html"}
    assert all(row["value"] in (None, "") for row in dropped if row["reason"] == "missing_gbif_id")


def test_uuids_are_v5_of_source_id_and_url_and_unique(gbif_out: Path) -> None:
    batches = read_batches(gbif_out).to_pylist()
    duplicates = read_parquet(gbif_out / "prep" / "duplicates.parquet").to_pylist()
    all_uuids = [r["uuid"] for r in batches] + [r["uuid"] for r in duplicates]
    assert len(all_uuids) == len(set(all_uuids)) == 12
    for row in batches:
        assert row["uuid"] == uuid_v5_python(row["source_id"], row["identifier"])
        assert uuid.UUID(row["uuid"]).version == 5


def test_duplicate_urls_download_once_and_map_to_their_carrier(gbif_out: Path) -> None:
    carrier = next(r for r in read_batches(gbif_out).to_pylist() if r["source_id"] == "1001")
    duplicates = read_parquet(gbif_out / "prep" / "duplicates.parquet").to_pylist()
    assert [(d["source_id"], d["identifier"], d["carrier_uuid"]) for d in duplicates] == [
        ("1015", carrier["identifier"], carrier["uuid"]),
        ("1001", carrier["identifier"], carrier["uuid"]),  # the same occurrence and URL again
    ]
    # A repeated (source_id, URL) pair still gets a UUID of its own, made unique by its rank.
    assert duplicates[1]["uuid"] == uuid_v5_python("1001", carrier["identifier"], repeat=1)
    assert duplicates[0]["server_name"] == "127.0.0.2:8001"


def test_servers_table_counts_rows_and_batches(gbif_out: Path) -> None:
    servers = read_parquet(gbif_out / "prep" / "servers.parquet").to_pylist()
    assert servers[0] == {"server_name": "127.0.0.2:8001", "rows": 5, "batches": 1,
                          "reused_rows": 0}
    assert sum(s["rows"] for s in servers) == 10
    assert {s["server_name"] for s in servers} == {v[1] for v in EXPECTED_DOWNLOADS.values()}


def test_batches_read_as_one_table_with_pyarrow_too(gbif_out: Path) -> None:
    dataset = ds.dataset(gbif_out / "prep" / "batches", format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 10
    assert {"uuid", "source_id", "identifier", "is_license_full", "license", "source", "title",
            "server_name", "partition_id"} == set(table.column_names)


def test_same_input_gives_identical_batches(gbif_out: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run_cli("prep", MULTIMEDIA, "--output", again)
    first = sorted((gbif_out / "prep" / "batches").rglob("*.parquet"))
    second = sorted((again / "prep" / "batches").rglob("*.parquet"))
    assert [p.relative_to(gbif_out) for p in first] == [p.relative_to(again) for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()


def test_random_uuids_on_request(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", MULTIMEDIA, "--output", out, "--uuid", "random")
    rows = read_batches(out).to_pylist()
    assert {uuid.UUID(r["uuid"]).version for r in rows} == {4}
    assert len({r["uuid"] for r in rows}) == 10


def test_keep_duplicates_downloads_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", MULTIMEDIA, "--output", out, "--keep-duplicates")
    rows = read_batches(out).to_pylist()
    assert len(rows) == 12
    assert Counter(r["identifier"] for r in rows)["http://127.0.0.2:8001/img/1.jpg"] == 3
    assert read_parquet(out / "prep" / "duplicates.parquet").num_rows == 0
    assert len({r["uuid"] for r in rows}) == 12


def test_gzip_and_dwca_zip_give_the_same_rows(gbif_out: Path, tmp_path: Path) -> None:
    expected = read_batches(gbif_out).to_pylist()
    for name in ("multimedia.txt.gz", "dwca-gbif.zip"):
        out = tmp_path / name
        run_cli("prep", FIXTURES / name, "--output", out)
        assert read_batches(out).to_pylist() == expected, name
        assert prep_summary(out)["dropped"] == EXPECTED_DROPPED


def test_unzipped_dwca_folder_reads_meta_xml(tmp_path: Path) -> None:
    import zipfile

    folder = tmp_path / "archive"
    zipfile.ZipFile(FIXTURES / "dwca-gbif.zip").extractall(folder)
    out = tmp_path / "out"
    run_cli("prep", folder, "--output", out)
    assert prep_summary(out)["formats"] == ["dwca"]
    assert read_batches(out).num_rows == 10


def test_audubon_core_media_archive(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "dwca-audubon.zip", "--output", out)
    rows = read_batches(out).to_pylist()
    # The URL is ac:accessURI (not dc:identifier); meta.xml's default fills the license.
    assert [(r["source_id"], r["identifier"], r["license"]) for r in rows] == [
        ("m1", "http://127.0.0.6:8005/ac/1.jpg", "CC0_1_0"),
        ("m2", "http://127.0.0.6:8005/ac/2.jpg", "CC0_1_0"),
    ]
    assert rows[1]["title"] == "Two\nlines"  # a quoted field across lines
    assert prep_summary(out)["dropped"] == {"not_still_image": 1}


def test_the_strict_format_rule_of_the_original_on_request(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", MULTIMEDIA, "--output", out, "--strict-image-format")
    summary = prep_summary(out)
    assert summary["dropped"]["not_image_format"] == 2
    assert summary["kept_without_image_format"] == 0
    assert "1007" not in {r["source_id"] for r in read_batches(out).to_pylist()}


def test_a_prep_that_keeps_nothing_says_why(tmp_path: Path) -> None:
    lines = MULTIMEDIA.read_text(encoding="utf-8", errors="replace").splitlines()
    sounds = [lines[0]] + [line.replace("StillImage", "Sound") for line in lines[1:12]]
    source = tmp_path / "multimedia.txt"
    source.write_text("\n".join(sounds) + "\n")
    result = run_cli("prep", source, "--output", tmp_path / "out")
    assert "no row kept" in result.stderr and "not_still_image" in result.stderr


def test_keep_columns_are_carried_along(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", MULTIMEDIA, "--output", out, "--keep-columns", "creator,created")
    row = next(r for r in read_batches(out).to_pylist() if r["source_id"] == "1001")
    assert (row["creator"], row["created"]) == ("A. Collector", "2020-01-01")
    duplicates = read_parquet(out / "prep" / "duplicates.parquet")
    assert "creator" in duplicates.column_names
