"""`export`: WebDataset, files and HDF5 read back with their own libraries give the same images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import pyarrow.parquet as pq
import pytest

from conftest import FAST_FETCH, read_errors, read_successes, run_cli, stored_images, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image


def serve_pictures(farm: Farm) -> list[str]:
    """9 distinct pictures and a 404 on each server; their URLs."""
    urls = []
    for server in farm.servers:
        for i in range(9):
            server.images[f"{i}.jpg"] = make_small_image(i + len(urls))
            urls.append(server.url(f"/img/{i}.jpg"))
        urls.append(server.url("/missing/x"))
    return urls


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3")]) as farm:
        urls = serve_pictures(farm)
        out = tmp / "out"
        run_cli("download", write_lines(tmp / "u.txt", urls), "--output", out, "--batch-size", 4,
                "--no-profile", *FAST_FETCH, timeout=300)
    return out


def expected(out: Path) -> dict[str, tuple[str, str]]:
    """uuid -> (md5 of the stored image, hashsum_original)."""
    return {r["uuid"]: (hashlib.md5(r["image"]).hexdigest(), r["hashsum_original"])
            for r in read_successes(out).to_pylist()}


def exported_errors(root: Path) -> set[str]:
    return {r["uuid"] for path in root.glob("*/*/errors.parquet")
            for r in pq.read_table(path).to_pylist()}


def test_webdataset_shards_read_back_with_the_webdataset_library(downloaded: Path) -> None:
    import webdataset as wds

    result = run_cli("export", downloaded, "--to", "webdataset")
    assert "18 images, 2 errors in 6 batches" in result.stdout
    root = downloaded / "export" / "webdataset"
    shards = sorted(str(p) for p in root.glob("*/*/images.tar"))
    assert len(shards) == 6
    seen = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        metadata = json.loads(sample["json"])
        assert metadata["uuid"] == sample["__key__"]
        seen[sample["__key__"]] = (hashlib.md5(sample["jpg"]).hexdigest(),
                                   metadata["hashsum_original"])
        assert metadata["hashsum_resized"] == seen[sample["__key__"]][0]
    assert seen == expected(downloaded)
    assert exported_errors(root) == {r["uuid"] for r in read_errors(downloaded).to_pylist()}
    assert len(list(root.glob("*/*/_completed"))) == 6
    again = run_cli("export", downloaded, "--to", "webdataset")  # resumes: nothing left
    assert "in 0 batches this run (6 in all)" in again.stdout


def test_files_export_has_one_file_per_uuid_and_its_metadata(downloaded: Path) -> None:
    run_cli("export", downloaded, "--to", "files")
    root = downloaded / "export" / "files"
    seen = {}
    for metadata in root.glob("*/*/metadata.parquet"):
        for row in pq.read_table(metadata).to_pylist():
            assert row["file"].startswith("images/")
            data = (metadata.parent / row["file"]).read_bytes()
            seen[row["uuid"]] = (hashlib.md5(data).hexdigest(), row["hashsum_original"])
    assert seen == expected(downloaded)
    assert len(exported_errors(root)) == 2


def test_hdf5_export_reads_back_with_h5py_alone(downloaded: Path) -> None:
    run_cli("export", downloaded, "--to", "hdf5")
    root = downloaded / "export" / "hdf5"
    seen = {}
    for path in root.glob("*/*/images.h5"):
        with h5py.File(path, "r") as store:
            uuids = [u.decode() for u in store["uuid"][:]]
            assert uuids == sorted(uuids)  # indexed by UUID
            assert store["original_size"].shape == (len(uuids), 2)
            for index, uuid in enumerate(uuids):
                image = bytes(store["image"][index])
                seen[uuid] = (hashlib.md5(image).hexdigest(),
                              store["hashsum_original"][index].decode())
    assert seen == expected(downloaded)
    assert len(exported_errors(root)) == 2


@pytest.mark.parametrize("output_format", ["webdataset", "files", "hdf5"])
def test_download_in_each_output_format(output_format: str, downloaded: Path,
                                        tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3")]) as farm:
        urls = serve_pictures(farm)
        out = tmp_path / output_format
        run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                "--batch-size", 4, "--no-profile", "--output-format", output_format,
                *FAST_FETCH, timeout=300)
    batches = sorted(p.parent for p in out.glob("downloaded_images/*/*/_completed"))
    assert len(batches) == 6
    seen = {}
    for folder in batches:
        for chunk in folder.glob("successes-*.parquet"):
            assert "image" not in pq.read_schema(chunk).names  # the images are beside it
        for row, image in stored_images(folder, output_format):
            seen[row["uuid"]] = (hashlib.md5(image).hexdigest(), row["hashsum_original"])
            assert seen[row["uuid"]][0] == row["hashsum_resized"]
    # The same images as the Parquet download of the same pictures (on other ports: the URLs,
    # and so the UUIDs, differ).
    assert sorted(seen.values()) == sorted(expected(downloaded).values())
    assert "every finished batch is sound" in run_cli("verify", out).stdout
    status = json.loads(run_cli("status", out, "--json").stdout)
    assert (status["successes"], status["errors"]) == (18, 2)
    run_cli("tools", "resize", out, "--image-size", 16)
    assert len(list(out.glob("tools/resize/*/*/_completed"))) == 6
