"""Incremental snapshots: `--previous OLD` reuses what an earlier download stored, asks the
servers only for new URLs (and earlier retryable failures), and reports the overlap exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

from conftest import FAST_FETCH, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image


def add(server, names: list[str], seed: int) -> list[str]:
    for i, name in enumerate(names):
        server.images[name] = make_small_image(seed + i)
    return [server.url(f"/img/{name}") for name in names]


def paths_after(server, mark: int) -> list[str]:
    return [record.path for record in server.log[mark:] if record.path != "/robots.txt"]


def test_a_new_snapshot_fetches_only_what_is_new(tmp_path: Path) -> None:
    specs = [ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3"),
             ServerSpec("127.0.0.4", down=True, robots_txt="")]  # down during the first run
    with Farm(specs) as farm:
        museum, herbarium, flaky = farm.servers
        museum_old = add(museum, [f"{i}.jpg" for i in range(10)], 0)
        museum_missing = [museum.url(f"/missing/{i}.jpg") for i in range(2)]
        museum_new = add(museum, [f"{i}.jpg" for i in range(10, 15)], 10)
        herbarium_old = add(herbarium, [f"{i}.jpg" for i in range(10)], 100)
        flaky_urls = add(flaky, [f"{i}.jpg" for i in range(5)], 200)

        old = tmp_path / "old"
        run_cli("download", write_lines(tmp_path / "old.txt", museum_old + museum_missing
                                        + herbarium_old + flaky_urls),
                "--output", old, "--no-profile", "--server-down-after", 3, *FAST_FETCH,
                timeout=300)
        old_hashes = {row["identifier"]: row["hashsum_original"]
                      for row in read_successes(old).to_pylist()}
        assert set(old_hashes) == set(museum_old + herbarium_old)
        assert {row["error_code"] for row in read_errors(old).to_pylist()} <= \
            {"http_404", "server_unavailable", "http_503"}  # 404: final; the others: retryable

        # A month later: half the old URLs, the 404s again, five new ones, the flaky server's
        # URLs (back up now), one line twice; the rest is gone.
        flaky.spec.down = False
        marks = {server.address: len(server.log) for server in farm.servers}
        new_input = (museum_old[:5] + museum_missing + museum_new + herbarium_old[:5]
                     + flaky_urls + [museum_old[0]])
        new = tmp_path / "new"
        run_cli("download", write_lines(tmp_path / "new.txt", new_input), "--output", new,
                "--previous", old, *FAST_FETCH, timeout=300)

        # Asked for (by the profile's probes, then fetch): the new URLs and the earlier
        # retryable failures, and nothing else.
        assert set(paths_after(museum, marks[museum.address])) == \
            {f"/img/{i}.jpg" for i in range(10, 15)}
        assert paths_after(herbarium, marks[herbarium.address]) == []
        assert set(paths_after(flaky, marks[flaky.address])) == \
            {f"/img/{i}.jpg" for i in range(5)}

        # The overlap, exact, in distinct URLs, overall and by server.
        summary = json.loads((new / "prep" / "summary.json").read_text())
        assert summary["overlap"] == {"new": 5, "reused": 10, "carried_errors": 2,
                                      "fetched_again": 5, "gone": 10}
        assert summary["reused_rows"] == 12
        by_server = {row.pop("server_name"): row
                     for row in pq.read_table(new / "prep" / "overlap.parquet").to_pylist()}
        assert by_server == {
            museum.address: {"new": 5, "reused": 5, "carried_errors": 2, "fetched_again": 0,
                             "gone": 5},
            herbarium.address: {"new": 0, "reused": 5, "carried_errors": 0,
                                "fetched_again": 0, "gone": 5},
            flaky.address: {"new": 0, "reused": 0, "carried_errors": 0, "fetched_again": 5,
                            "gone": 0},
        }

        # Complete: every URL of the new input has its image (linked, or fetched) or its error.
        successes = read_successes(new).to_pylist()
        expected = set(museum_old[:5] + museum_new + herbarium_old[:5] + flaky_urls)
        assert {row["identifier"] for row in successes} == expected
        linked = [row for row in successes if row["linked_from"]]
        assert {row["identifier"] for row in linked} == set(museum_old[:5] + herbarium_old[:5])
        assert all(row["linked_from"].startswith(str(old.resolve())) and row["image"] is None
                   for row in linked)
        assert all(row["hashsum_original"] == old_hashes[row["identifier"]] for row in linked)
        errors = read_errors(new).to_pylist()
        assert {row["identifier"]: row["error_code"] for row in errors} == \
            {url: "http_404" for url in museum_missing}
        assert (new / "prep" / "duplicates.parquet").exists()

        # Readers follow the links: verify decodes them, export copies them out.
        run_cli("verify", new)
        run_cli("export", new, "--to", "files")
        exported = {path.stem: hashlib.md5(path.read_bytes()).hexdigest()
                    for path in (new / "export" / "files").glob("*/*/images/*")}
        assert len(exported) == 20
        assert {exported[row["uuid"]] for row in linked} == \
            {row["hashsum_resized"] for row in linked}
        # A tool that rewrites images stores them itself: its result links nowhere.
        run_cli("tools", "resize", new, "--image-size", 32)
        resized = [row for path in (new / "tools" / "resize").glob("*/*/successes-*.parquet")
                   for row in pq.read_table(path).to_pylist()]
        assert len(resized) == 20 and not any(row["linked_from"] for row in resized)
        assert all(hashlib.md5(row["image"]).hexdigest() == row["hashsum_resized"]
                   for row in resized)
        status = json.loads(run_cli("status", new, "--json").stdout)
        assert status["reused"]["rows"] == 12 and status["phase"] == "finished"
        run_cli("status", new, "--report", tmp_path / "report.html")
        page = (tmp_path / "report.html").read_text()
        assert "reused from earlier downloads" in page and "12 rows" in page

        # A third snapshot, over the second: links lead to where the bytes are, not to links;
        # nothing at all is requested.
        marks = {server.address: len(server.log) for server in farm.servers}
        newer = tmp_path / "newer"
        run_cli("download", write_lines(tmp_path / "newer.txt", museum_old[:5] + museum_new),
                "--output", newer, "--previous", new, "--previous", old, "--no-profile",
                *FAST_FETCH, timeout=300)
        assert all(paths_after(server, marks[server.address]) == [] for server in farm.servers)
        rows = read_successes(newer).to_pylist()
        assert len(rows) == 10
        sources = {row["identifier"]: row["linked_from"] for row in rows}
        assert all(sources[url].startswith(str(old.resolve())) for url in museum_old[:5])
        assert all(sources[url].startswith(str(new.resolve())) for url in museum_new)
        run_cli("verify", newer)


def test_copy_mode_stores_the_images_themselves(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2")]) as farm:
        server = farm.servers[0]
        urls = add(server, [f"{i}.jpg" for i in range(6)], 0)
        old = tmp_path / "old"
        run_cli("download", write_lines(tmp_path / "old.txt", urls[:4]), "--output", old,
                "--no-profile", "--output-format", "webdataset", *FAST_FETCH)
        mark = len(server.log)
        copy = tmp_path / "copy"
        run_cli("download", write_lines(tmp_path / "new.txt", urls), "--output", copy,
                "--no-profile", "--previous", old, "--previous-mode", "copy", *FAST_FETCH)
        assert sorted(paths_after(server, mark)) == ["/img/4.jpg", "/img/5.jpg"]
        rows = read_successes(copy).to_pylist()
        assert len(rows) == 6
        assert all(row["image"] is not None and row["linked_from"] is None for row in rows)
        assert all(hashlib.md5(row["image"]).hexdigest() == row["hashsum_resized"]
                   for row in rows)
        # The copy stands alone: the earlier download can go.
        for path in sorted(old.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        run_cli("verify", copy)


def test_previous_must_be_a_download(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "u.txt", ["http://127.0.0.2:9/img/0.jpg"])
    result = run_cli("prep", source, "--output", tmp_path / "out", "--previous",
                     tmp_path / "nothing", check=False)
    assert result.returncode != 0
    assert "not a download folder" in result.stderr
