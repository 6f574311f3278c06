"""Post-processing tools: each result checked row by row, resumable, never touching the download."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import FAST_FETCH, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image

# (name, size): three copies of one picture under different URLs, small and large images.
SIZES = {"tiny": (40, 30), "small": (64, 48), "big": (200, 150), "wide": (300, 60)}


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tools")
    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3")]) as farm:
        urls = []
        for number, server in enumerate(farm.servers):
            for i, (name, size) in enumerate(SIZES.items()):
                for copy in range(3):
                    server.images[f"{name}{copy}.png"] = make_small_image(
                        number * 10 + i, size, image_format="PNG")
                    urls.append(server.url(f"/img/{name}{copy}.png"))
        # The same bytes on both servers too: one picture, six URLs.
        farm.servers[1].images["same.png"] = farm.servers[0].images["big0.png"]
        urls.append(farm.servers[1].url("/img/same.png"))
        out = tmp / "out"
        run_cli("download", write_lines(tmp / "u.txt", urls), "--output", out, "--batch-size", 5,
                "--image-size", 0, "--no-profile", *FAST_FETCH, timeout=300)
    assert read_successes(out).num_rows == 25
    return out


def download_files(out: Path) -> dict[str, str]:
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest()
            for p in (out / "downloaded_images").rglob("*") if p.is_file()}


def tool_rows(out: Path, name: str, file: str = "successes-*.parquet") -> list[dict]:
    pattern = out / "tools" / name / "*" / "*" / file
    return duckdb.sql(f"SELECT * FROM read_parquet('{pattern}')").to_arrow_table().to_pylist()


def test_resize_makes_large_images_smaller_and_resumes(downloaded: Path) -> None:
    before = download_files(downloaded)
    result = run_cli("tools", "resize", downloaded, "--image-size", 50, "--workers", 2)
    # Over 50 px: small, big and wide (3 copies on 2 servers) and "same"; tiny stays.
    assert "resized 19" in result.stdout and "unchanged 6" in result.stdout
    originals = {r["uuid"]: r for r in read_successes(downloaded).to_pylist()}
    rows = tool_rows(downloaded, "resize")
    assert sorted(r["uuid"] for r in rows) == sorted(originals)
    for row in rows:
        original = originals[row["uuid"]]
        height, width = original["resized_size"]
        assert row["hashsum_original"] == original["hashsum_original"]
        assert row["original_size"] == original["original_size"]
        with Image.open(io.BytesIO(row["image"])) as image:
            assert [image.height, image.width] == row["resized_size"]
        assert hashlib.md5(row["image"]).hexdigest() == row["hashsum_resized"]
        if max(height, width) <= 50:
            assert row["image"] == original["image"]  # never upscaled, untouched
        else:
            assert max(row["resized_size"]) == 50
            assert row["resized_size"][0] / row["resized_size"][1] == pytest.approx(
                height / width, rel=0.1)
    assert download_files(downloaded) == before  # the download itself is never rewritten

    # Resume: a batch lost (as if killed before its rename) and a half-written scratch folder.
    tool = downloaded / "tools" / "resize"
    lost = sorted(tool.glob("*/partition_id=0"))[0]
    shutil.rmtree(lost)
    (lost.parent / ".partition_id=0.dead").mkdir()
    again = run_cli("tools", "resize", downloaded, "--image-size", 50)
    assert "batches this run 1" in again.stdout
    assert not list(tool.glob("*/.partition_id=*"))
    assert sorted(r["uuid"] for r in tool_rows(downloaded, "resize")) == sorted(originals)
    other = run_cli("tools", "resize", downloaded, "--image-size", 40, check=False)
    assert other.returncode == 2 and "--restart" in other.stderr


def test_image_verification_lists_exactly_the_images_that_fail(downloaded: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(downloaded, out)
    shutil.rmtree(out / "tools", ignore_errors=True)
    chunk = sorted(out.glob("downloaded_images/*/*/successes-*.parquet"))[0]
    table = pq.read_table(chunk)
    images = table.column("image").to_pylist()
    images[1] = images[1][: len(images[1]) // 3]  # cut short
    bad_uuid = table.column("uuid")[1].as_py()
    table = table.set_column(table.schema.get_field_index("image"), "image",
                             pa.array(images, pa.binary()))
    pq.write_table(table, chunk)
    result = run_cli("tools", "image_verification", out)
    assert "images 25, failed 1" in result.stdout
    failures = tool_rows(out, "image_verification", "failures.parquet")
    assert [f["uuid"] for f in failures] == [bad_uuid]


def test_duplication_based_keeps_the_lowest_uuid_per_original(downloaded: Path) -> None:
    run_cli("tools", "duplication_based", downloaded)
    mapping = pq.read_table(downloaded / "tools" / "duplication_based" /
                            "duplicates.parquet").to_pylist()
    by_hash: dict[str, list[str]] = {}
    for row in read_successes(downloaded).to_pylist():
        by_hash.setdefault(row["hashsum_original"], []).append(row["uuid"])
    expected = {(uuid, min(uuids)) for uuids in by_hash.values() for uuid in uuids
                if uuid != min(uuids)}
    assert {(r["uuid"], r["kept_uuid"]) for r in mapping} == expected
    # Copies 0-2 of each picture share bytes (8 groups of 3), and "same" joins one of them.
    assert len(expected) == 8 * 2 + 1
    summary = json.loads((downloaded / "tools" / "duplication_based" / "summary.json")
                         .read_text())
    assert summary["duplicates_removed"] == 17


def test_size_based_lists_originals_smaller_than_the_minimum(downloaded: Path) -> None:
    run_cli("tools", "size_based", downloaded, "--min-side", 50)
    removed = pq.read_table(downloaded / "tools" / "size_based" / "removed.parquet").to_pylist()
    expected = {r["uuid"] for r in read_successes(downloaded).to_pylist()
                if min(r["original_size"]) < 50}
    assert {r["uuid"] for r in removed} == expected
    assert len(expected) == 12  # tiny (30 px high) and small (48), 3 copies, 2 servers
