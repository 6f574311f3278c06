"""The profile stage: polite probes, a starting rate per server, hand-set rates and exclusions."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from conftest import (
    FAST_FETCH,
    FAST_REQUESTS,
    read_errors,
    read_successes,
    run_cli,
    write_lines,
)
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image
from distributed_downloader.policy import advertised_rate
from distributed_downloader.profiles import parse_rate_overrides


def add_images(server, count: int) -> list[str]:
    urls = []
    for i in range(count):
        server.images[f"{i}.jpg"] = make_small_image(i)
        urls.append(server.url(f"/img/{i}.jpg"))
    return urls


def read_profile_rows(out: Path) -> dict[str, dict]:
    with open(out / "profiles" / "servers.csv") as handle:
        return {row["server_name"]: row for row in csv.DictReader(handle)}


def refused_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]  # closed again: connections to it are refused


def test_profile_probes_politely_and_sets_each_servers_rate(tmp_path: Path) -> None:
    specs = [
        ServerSpec("127.0.0.2"),  # answers everything
        ServerSpec("127.0.0.3", rate_limit=3, advertise_limit=True),  # says its limit
        ServerSpec("127.0.0.4", rate_limit=0.5, retry_after=4),  # throttles 1 request/s
        ServerSpec("127.0.0.5", down=True, robots_txt=""),  # 503 to all but robots.txt
    ]
    with Farm(specs) as farm:
        # The throttling server holds few URLs: it is fetched at 1 request per 4 s.
        urls = {spec.host: add_images(farm[spec.host], 3 if spec.rate_limit == 0.5 else 12)
                for spec in specs}
        port = refused_port("127.0.0.6")
        refused = [f"http://127.0.0.6:{port}/img/{i}.jpg" for i in range(12)]
        out = tmp_path / "out"
        source = write_lines(tmp_path / "u.txt", [u for group in urls.values() for u in group]
                             + refused)
        run_cli("prep", source, "--output", out)
        result = run_cli("profile", out, "--default-rate-limit", 8, *FAST_REQUESTS)
        assert "5 servers probed" in result.stdout

        for server in farm.servers:
            # robots.txt first (once), then at most profile_requests probes, 1 request/s.
            assert server.requests_to("/robots.txt") == 1
            assert len(server.log) <= 1 + 5
            assert server.peak_per_second() <= 1  # never faster than 1 request/s
        profiles = read_profile_rows(out)
        ok, advertised, throttled, down503 = (profiles[farm[s.host].address] for s in specs)
        assert (ok["status"], float(ok["rate_limit"])) == ("ok", 8)
        assert ok["latency_ms"] != ""
        assert (advertised["status"], float(advertised["rate_limit"])) == ("probed", 3)
        assert throttled["status"] == "throttled"
        assert float(throttled["rate_limit"]) == pytest.approx(0.25)  # 1 / Retry-After 4
        assert len(farm["127.0.0.4"].log) <= 2  # stops probing once told to wait
        assert down503["status"] == "down"
        refused_profile = next(p for name, p in profiles.items() if name.startswith("127.0.0.6"))
        assert refused_profile["status"] == "down"
        summary = json.loads((out / "profiles" / "summary.json").read_text())
        assert summary["by_status"] == {"ok": 1, "probed": 1, "throttled": 1, "down": 2}

        # Fetch skips the servers found down: their rows become retryable errors, unrequested.
        before = len(farm["127.0.0.5"].log)
        run_cli("fetch", out, *FAST_FETCH, timeout=300)
        assert len(farm["127.0.0.5"].log) == before
        errors = read_errors(out).to_pylist()
        skipped = [r for r in errors if r["error_code"] == "server_unavailable"]
        assert {r["identifier"] for r in skipped} == set(urls["127.0.0.5"]) | set(refused)
        assert all(r["retry_count"] == 0 for r in skipped)
        assert {r["identifier"] for r in read_successes(out).to_pylist()} == \
            set(urls["127.0.0.2"] + urls["127.0.0.3"] + urls["127.0.0.4"])
        # The advertised limit held during the download.
        fetch_times = [r.time for r in farm["127.0.0.3"].log[5:]]
        assert max(sum(1 for t in fetch_times if s <= t < s + 1) for s in fetch_times) <= 3


def test_rates_file_overrides_and_excludes_and_survives_reprofiling(tmp_path: Path) -> None:
    specs = [ServerSpec("127.0.0.2"), ServerSpec("127.0.0.3"), ServerSpec("127.0.0.4")]
    with Farm(specs) as farm:
        slow, excluded, untouched = farm.servers
        urls = {s.spec.host: add_images(s, 10) for s in farm.servers}
        rates = tmp_path / "rates.csv"
        rates.write_text("server_name,rate_limit,max_connections,exclude\n"
                         f"{slow.address},2,1,\n{excluded.address},,,yes\n")
        out = tmp_path / "out"
        source = write_lines(tmp_path / "u.txt", [u for g in urls.values() for u in g])
        run_cli("download", source, "--output", out, "--rates", rates,
                "--default-rate-limit", 10, *FAST_FETCH, timeout=300)

        assert excluded.log == []  # neither probed nor fetched
        errors = read_errors(out).to_pylist()
        assert {r["identifier"] for r in errors} == set(urls["127.0.0.3"])
        assert {r["error_code"] for r in errors} == {"server_excluded"}
        assert read_successes(out).num_rows == 20
        assert slow.peak_per_second() <= 2  # the hand-set rate, not the default 10
        profiles = read_profile_rows(out)
        assert profiles[slow.address]["status"] == "manual"
        assert float(profiles[slow.address]["rate_limit"]) == 2
        assert profiles[untouched.address]["status"] == "ok"

        # The rates were kept with the run: re-profiling without --rates keeps them.
        rates.unlink()
        run_cli("profile", out, *FAST_REQUESTS)
        assert excluded.log == []
        profiles = read_profile_rows(out)
        assert (profiles[slow.address]["status"], float(profiles[slow.address]["rate_limit"])) \
            == ("manual", 2)


def test_rates_file_in_the_original_format_and_bad_rates_files(tmp_path: Path) -> None:
    original = ("server_name,total_batches,success_count,error_count,rate_limit\n"
                "images.example.org,12,0,0,3\nmedia.example.net,1,0,0,20\n")
    overrides = parse_rate_overrides(original, "servers_profiles.csv")
    assert {name: o.rate_limit for name, o in overrides.items()} == \
        {"images.example.org": 3.0, "media.example.net": 20.0}
    assert not any(o.exclude for o in overrides.values())

    out = tmp_path / "out"
    run_cli("prep", write_lines(tmp_path / "u.txt", ["http://127.0.0.2:9/a.jpg"]), "--output", out)
    bad = tmp_path / "bad.csv"
    bad.write_text("host,rate\na,1\n")
    result = run_cli("profile", out, "--rates", bad, check=False)
    assert result.returncode == 2
    assert "needs a server_name column" in result.stderr
    bad.write_text("server_name,rate_limit\n127.0.0.2:9,fast\n")
    result = run_cli("profile", out, "--rates", bad, check=False)
    assert result.returncode == 2 and "bad.csv:2" in result.stderr


@pytest.mark.parametrize(("header", "rate"), [
    ('"default";q=100;w=60', 100 / 60),
    ("10;w=1", 10.0),
    ('"burst";q=5;w=1, "day";q=1000;w=86400', 1000 / 86400),
    ("nonsense", None),
])
def test_advertised_rate(header: str, rate: float | None) -> None:
    assert advertised_rate({"RateLimit-Policy": header}) == pytest.approx(rate)
