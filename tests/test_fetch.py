"""fetch on a loopback farm: every URL ends once, with the right outcome, politely."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import FAST_FETCH, read_batches, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.errors import RETRYABLE, ErrorCode
from distributed_downloader.testing.farm import Farm, ServerSpec, make_photo, make_small_image

GOOD_PER_SERVER = 15
LIMIT = 5

# path on server A -> expected error code (None: expected to succeed)
FAULTS = {
    "/missing/1": "http_404",
    "/forbidden/1": "http_403",
    "/gone/1": "http_410",
    "/flaky/f.jpg": None,  # two 503s, then the image
    "/slow/s.jpg": None,  # 1 s late, inside the timeout
    "/redirect/r.jpg": None,
    "/redirect-loop/1": "too_many_redirects",
    "/html/1": "not_an_image",
    "/truncated/t.jpg": "truncated_image",
    "/bomb/1": "decompression_bomb",
    "/large/1": "too_large",
    "/large-chunked/1": "too_large",
    "/huge-headers/h.jpg": "headers_too_large",
    "/trickle/1": "timeout",
    "/reset/1": "connection_error",
}


@pytest.fixture(scope="module")
def farm_run(tmp_path_factory: pytest.TempPathFactory):
    specs = [
        ServerSpec("127.0.0.2", rate_limit=LIMIT, slow_seconds=1.0, large_size=1_500_000),
        ServerSpec("127.0.0.3", rate_limit=LIMIT),
        ServerSpec("127.0.0.4", rate_limit=LIMIT),
        ServerSpec("127.0.0.250"),  # the canary: outside allow_network, must see nothing
    ]
    with Farm(specs) as farm:
        a, canary = farm["127.0.0.2"], farm["127.0.0.250"]
        expected: dict[str, bytes] = {}  # URL -> the bytes served
        urls = []
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            server = farm[host]
            for i in range(GOOD_PER_SERVER):
                server.images[f"{i}.jpg"] = make_small_image(hash((host, i)) % 100_000)
                urls.append(server.url(f"/img/{i}.jpg"))
                expected[urls[-1]] = server.images[f"{i}.jpg"]
        a.images["rotated.jpg"] = make_small_image(1, (120, 40), exif_orientation=6)
        a.images["alpha.png"] = make_small_image(2, (50, 50), image_format="PNG")
        a.images["big.jpg"] = make_photo(1600, 1200, seed=3)
        for name in ("rotated.jpg", "alpha.png", "big.jpg"):
            urls.append(a.url(f"/img/{name}"))
            expected[urls[-1]] = a.images[name]
        for name in ("f.jpg", "s.jpg", "r.jpg", "h.jpg"):
            a.images[name] = make_small_image(len(name) + ord(name[0]))
        a.images["t.jpg"] = make_photo(800, 600, seed=4)
        for path in FAULTS:
            urls.append(a.url(path))
        urls.append(a.url(f"/redirect-to?url={canary.url('/canary.jpg')}"))
        out = tmp_path_factory.mktemp("fetch") / "out"
        source = write_lines(out.parent / "urls.txt", urls)
        # The servers' limit is the run's budget: no climb above it (test_policy covers that).
        result = run_cli("download", source, "--output", out, "--default-rate-limit", LIMIT,
                         "--max-rate-limit", LIMIT, "--max-body-size", 1_000_000, *FAST_FETCH,
                         timeout=300)
        yield {"farm": farm, "out": out, "expected": expected, "a": a, "result": result,
               "urls": urls}


def test_every_good_url_succeeds_once_with_the_right_md5(farm_run) -> None:
    successes = read_successes(farm_run["out"]).to_pylist()
    by_url = Counter(row["identifier"] for row in successes)
    for url, body in farm_run["expected"].items():
        assert by_url[url] == 1, url
    for row in successes:
        if row["identifier"] in farm_run["expected"]:
            assert row["hashsum_original"] == \
                hashlib.md5(farm_run["expected"][row["identifier"]]).hexdigest()
        assert row["hashsum_resized"] == hashlib.md5(row["image"]).hexdigest()
        assert Image.open(io.BytesIO(row["image"])).format == "JPEG"


def test_every_bad_url_has_the_right_error_code(farm_run) -> None:
    a = farm_run["a"]
    errors = {row["identifier"]: row for row in read_errors(farm_run["out"]).to_pylist()}
    successes = {row["identifier"] for row in read_successes(farm_run["out"]).to_pylist()}
    for path, code in FAULTS.items():
        url = a.url(path)
        if code is None:
            assert url in successes, path
        else:
            assert errors[url]["error_code"] == code, (path, errors[url])
    assert errors[a.url("/missing/1")]["http_status"] == 404
    assert errors[a.url("/missing/1")]["retry_count"] == 1  # final: not retried
    assert errors[a.url("/reset/1")]["retry_count"] == 5  # retried up to max_retries
    # 100 KB of headers will not get shorter: final, asked once.
    assert errors[a.url("/huge-headers/h.jpg")]["retry_count"] == 1
    assert a.requests_to("/huge-headers/") == 1
    assert ErrorCode.HEADERS_TOO_LARGE not in RETRYABLE  # `--retry-errors` leaves it too
    assert a.requests_to("/reset/") == 5
    assert a.requests_to("/flaky/") == 3  # 503, 503, then the image


def test_redirect_outside_allow_network_is_refused_and_the_canary_untouched(farm_run) -> None:
    canary = farm_run["farm"]["127.0.0.250"]
    errors = read_errors(farm_run["out"]).to_pylist()
    blocked = [row for row in errors if row["error_code"] == "blocked_address"]
    assert len(blocked) == 1 and "127.0.0.250" in blocked[0]["error_msg"]
    assert canary.log == []


def test_each_prepared_row_ends_exactly_once(farm_run) -> None:
    out = farm_run["out"]
    prepared = read_batches(out).column("uuid").to_pylist()
    finished = read_successes(out).column("uuid").to_pylist() + \
        read_errors(out).column("uuid").to_pylist()
    assert sorted(finished) == sorted(prepared)
    assert len(prepared) == len(farm_run["urls"])
    for marker in out.glob("downloaded_images/*/*/_completed"):
        counts = json.loads(marker.read_text())
        errors = out / "download_errors" / marker.parent.parent.name / marker.parent.name
        rows = sum(pq.read_metadata(p).num_rows
                   for p in [*marker.parent.glob("*.parquet"), *errors.glob("*.parquet")])
        assert rows == counts["rows"] == counts["successes"] + counts["errors"]


def test_servers_were_not_overloaded(farm_run) -> None:
    farm = farm_run["farm"]
    requests = 0
    throttled = 0
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        server = farm[host]
        assert server.peak_per_second() <= 1.2 * LIMIT, host
        requests += len(server.log)
        throttled += server.status_count(429)
    # Paced 5% under a strict sliding 1-s limit, a request delayed on a busy machine may land
    # in the same second as the next: a couple of 429s, never a pattern.
    assert throttled <= max(2, 0.02 * requests), (throttled, requests)


def test_images_are_resized_oriented_and_flattened(farm_run) -> None:
    a = farm_run["a"]
    rows = {row["identifier"]: row for row in read_successes(farm_run["out"]).to_pylist()}
    big = rows[a.url("/img/big.jpg")]
    assert big["original_size"] == [1200, 1600]
    assert big["resized_size"] == [540, 720]
    assert Image.open(io.BytesIO(big["image"])).size == (720, 540)
    rotated = rows[a.url("/img/rotated.jpg")]  # stored 120x40, EXIF says: turn a quarter
    assert rotated["original_size"] == [120, 40]
    assert Image.open(io.BytesIO(rotated["image"])).size == (40, 120)
    small = rows[a.url("/img/0.jpg")]
    assert small["resized_size"] == small["original_size"] == [64, 96]  # never upscaled
    alpha = Image.open(io.BytesIO(rows[a.url("/img/alpha.png")]["image"]))
    assert alpha.mode == "RGB"
    assert {"license", "source", "title", "source_id", "is_license_full", "image_format"} <= \
        set(big)


def test_learned_rates_are_saved_for_the_next_run(farm_run) -> None:
    with open(farm_run["out"] / "profiles" / "servers.csv") as handle:
        profiles = {row["server_name"]: row for row in csv.DictReader(handle)}
    assert len(profiles) == 3
    for row in profiles.values():
        # What each server tolerated: a rate that held (never above its limit) and when it was
        # last asked, so that the next run starts there without a burst.
        assert 0 < float(row["rate_held"]) <= LIMIT
        assert float(row["rate_limit"]) <= LIMIT
        assert float(row["last_request"]) > 1.7e9


def test_summary_and_exit(farm_run) -> None:
    assert "fetch summary" in farm_run["result"].stdout
    summary = json.loads((farm_run["out"] / "fetch_summary.json").read_text())
    assert summary["finished"] is True
    assert summary["successes"] + summary["errors"] == len(farm_run["urls"])
