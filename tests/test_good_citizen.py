"""A good citizen: an honest User-Agent with a contact, and the hosts' opt-out headers obeyed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import FAST_FETCH, read_errors, read_successes, run_cli, write_lines
from distributed_downloader.config import Settings
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image
from distributed_downloader.fetch import starting_servers
from distributed_downloader.storage import RunLayout


def add_images(server, count: int) -> list[str]:
    for i in range(count):
        server.images[f"{i}.jpg"] = make_small_image(i)
    return [server.url(f"/img/{i}.jpg") for i in range(count)]


def test_opt_out_headers_make_error_rows_without_images(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2")]) as farm:
        server = farm["127.0.0.2"]
        urls = add_images(server, 12)
        tagged = {
            server.url("/optout/0.jpg?tag=noai"): True,
            server.url("/optout/1.jpg?tag=noimageai"): True,
            server.url("/optout/2.jpg?tag=noml"): True,
            server.url("/optout/3.jpg?tag=noindex,%20nofollow"): True,
            server.url("/optout/4.jpg?tag=distributed-downloader:%20noimageindex"): True,
            server.url("/optout/5.jpg?tag=otherbot:%20noai"): False,  # not addressed to us
            server.url("/optout/6.jpg?tag=nofollow"): False,
        }
        out = tmp_path / "out"
        run_cli("download", write_lines(tmp_path / "u.txt", urls + list(tagged)), "--output",
                out, "--no-profile", "--contact", "data-team@example.org", *FAST_FETCH)
        errors = {r["identifier"]: r for r in read_errors(out).to_pylist()}
        successes = {r["identifier"] for r in read_successes(out).to_pylist()}
        assert {url for url, opted in tagged.items() if opted} == set(errors)
        assert all(r["error_code"] == "opted_out" for r in errors.values())
        assert successes == set(urls) | {url for url, opted in tagged.items() if not opted}
        agents = {record.user_agent for record in server.log}
        assert agents == {"distributed-downloader/0.1.0 (+data-team@example.org)"}


def test_a_server_that_opts_out_of_everything_stops_being_asked(tmp_path: Path) -> None:
    specs = [ServerSpec("127.0.0.2", robots_tag="noai, noimageai"), ServerSpec("127.0.0.3")]
    with Farm(specs) as farm:
        opted, normal = farm.servers
        opted_urls = add_images(opted, 200)
        normal_urls = add_images(normal, 10)
        out = tmp_path / "out"
        result = run_cli("download", write_lines(tmp_path / "u.txt", opted_urls + normal_urls),
                         "--output", out, "--no-profile", "--default-rate-limit", 20,
                         *FAST_FETCH, timeout=300)
        assert "no contact" in result.stderr  # download warns once without --contact
        assert len(opted.log) <= 10 + 8  # the first 10 answers, and those already in flight
        errors = read_errors(out).to_pylist()
        codes = {r["error_code"] for r in errors}
        assert codes == {"opted_out", "opted_out_server"}
        assert len(errors) == 200
        assert sum(r["error_code"] == "opted_out_server" for r in errors) >= 180
        assert read_successes(out).num_rows == 10
        # Remembered: the next run over this folder does not ask that server again.
        with open(out / "profiles" / "servers.csv") as handle:
            statuses = {row["server_name"]: row["status"] for row in csv.DictReader(handle)}
        assert statuses[opted.address] == "opted_out"
        states = {state.name: state for state, _ in
                  starting_servers(RunLayout(out), Settings(output=out))}
        assert states[opted.address].dead
        assert states[opted.address].give_up.code == "opted_out_server"
        assert not states[normal.address].dead

        # --ignore-opt-out fetches them, and says what it overrode.
        ignored = tmp_path / "ignored"
        result = run_cli("download", write_lines(tmp_path / "v.txt", opted_urls[:5]), "--output",
                         ignored, "--no-profile", "--ignore-opt-out", *FAST_FETCH)
        assert read_successes(ignored).num_rows == 5
        summary = json.loads((ignored / "fetch_summary.json").read_text())
        assert summary["opt_outs_ignored"] == 5
        assert "ignored the opt-out" in result.stderr
