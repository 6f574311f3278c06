"""`plan`: the expected duration of a prepared run from its servers and their rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write_lines
from distributed_downloader.plan import fair_shares


def test_fair_shares_fill_the_small_claims_first() -> None:
    assert fair_shares(10, [1, 2, 100]) == [1, 2, 7]
    assert fair_shares(100, [1, 2, 3]) == [1, 2, 3]
    assert sum(fair_shares(9, [5, 5, 5])) == pytest.approx(9)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared run for the module: `plan` only reads it (test_plan_changes_nothing_in_the_run
    checks that)."""
    # 600 rows on a.example, 300 on b.example, 30 on c.example (no request is ever made).
    urls = [f"http://a.example/{i}.jpg" for i in range(600)] + \
        [f"http://b.example/{i}.jpg" for i in range(300)] + \
        [f"http://c.example/{i}.jpg" for i in range(30)]
    folder = tmp_path_factory.mktemp("plan")
    out = folder / "out"
    run_cli("prep", write_lines(folder / "u.txt", urls), "--output", out, "--batch-size", 100)
    return out


def plan(out: Path, *args: object) -> dict:
    return json.loads(run_cli("plan", out, "--json", *args).stdout)


def test_plan_is_bound_by_the_largest_server_when_cores_are_plenty(prepared: Path,
                                                                     tmp_path: Path) -> None:
    result = plan(prepared, "--max-nodes", 2, "--workers-per-node", 4, "--default-rate-limit", 10)
    assert result["rows"] == 930 and result["workers"] == 8
    assert result["seconds"] == pytest.approx(60.0)  # a.example: 600 rows at 10/s
    assert [row["server"] for row in result["largest"]] == ["a.example", "b.example",
                                                            "c.example"]
    assert result["largest"][0]["share_of_run"] == pytest.approx(1.0)
    assert result["original_nominal_seconds"] == pytest.approx(930 / 420)

    # Hand-set rates move the bound: a.example at 20/s finishes in 30 s, b.example then binds.
    rates = write_lines(tmp_path / "rates.csv", ["server_name,rate_limit", "a.example,20"])
    result = plan(prepared, "--max-nodes", 2, "--workers-per-node", 4, "--default-rate-limit", 10,
                  "--rates", rates)
    assert result["seconds"] == pytest.approx(30.0)


def test_plan_is_bound_by_the_cores_when_servers_allow_more(prepared: Path) -> None:
    # One worker decoding 5 images/s for 930 rows, every server allowing 1000/s: 186 s.
    result = plan(prepared, "--max-nodes", 1, "--workers-per-node", 1, "--worker-speed", 5,
                  "--default-rate-limit", 1000)
    assert result["seconds"] == pytest.approx(930 / 5)
    assert result["capacity_bound_seconds"] == pytest.approx(930 / 5)
    # Shared fairly, the smallest servers finish first.
    finishes = {row["server"]: row["finish_seconds"] for row in result["largest"]}
    assert finishes["c.example"] < finishes["b.example"] < finishes["a.example"]


def test_plan_changes_nothing_in_the_run(prepared: Path, tmp_path: Path) -> None:
    before = sorted(str(p) for p in prepared.rglob("*"))
    rates = write_lines(tmp_path / "rates.csv", ["server_name,rate_limit", "a.example,20"])
    plan(prepared, "--rates", rates)
    assert sorted(str(p) for p in prepared.rglob("*")) == before
