"""The Slurm chain's decisions and job scripts, without a cluster (sbatch replaced by a counter).

The real chain runs in test_cluster.py; this covers what a real run takes minutes to reach.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from conftest import run_cli, write_lines
from distributed_downloader.config import Settings
from distributed_downloader.executors import slurm


@pytest.fixture
def prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    out = tmp_path / "out"
    run_cli("prep", write_lines(tmp_path / "u.txt", [f"http://a.example/{i}" for i in range(30)]),
            "--output", out, "--batch-size", 10)
    (out / "profiles").mkdir()
    (out / "profiles" / "summary.json").write_text("{}")
    ids = itertools.count(100)
    monkeypatch.setattr(slurm, "sbatch", lambda script, after=None: str(next(ids)))
    return Settings(output=out, num_downloads=3, time_limit="10", stop_margin=60)


def test_a_stalled_chain_ends_and_a_new_submission_starts_afresh(prepared: Settings) -> None:
    chain = slurm.submit_chain(prepared)
    first = chain.downloads[0].id
    assert slurm.start_period(prepared, first)[0]  # period 1 fetches, queues period 2
    second = slurm.read_chain(slurm.RunLayout(prepared.output)).downloads[-1].id
    fetch, reason = slurm.start_period(prepared, second)  # nothing was committed meanwhile
    assert not fetch and "committed no row" in reason
    assert slurm.read_chain(slurm.RunLayout(prepared.output)).state == "stalled"

    # Submitted again: its first period fetches, whatever the old submission's history.
    chain = slurm.submit_chain(prepared)
    assert chain.state == "running" and len(chain.downloads) == 1
    assert slurm.start_period(prepared, chain.downloads[0].id)[0]


def test_the_chain_stops_after_num_downloads_periods(prepared: Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    layout = slurm.RunLayout(prepared.output)
    chain = slurm.submit_chain(prepared)
    job = chain.downloads[0].id
    decisions = []
    for rows in range(5):
        # Every period commits some rows: the chain never stalls, it runs out of periods.
        monkeypatch.setattr(slurm, "committed_rows", lambda root, n=rows: n)
        fetch, _ = slurm.start_period(prepared, job)
        decisions.append(fetch)
        if not fetch:
            break
        job = slurm.read_chain(layout).downloads[-1].id
    assert decisions == [True, True, True, False]  # num_downloads = 3
    assert slurm.read_chain(layout).state == "period_limit"


def test_job_scripts_stop_before_the_limit_and_keep_the_cores(prepared: Settings) -> None:
    settings = prepared.model_copy(update={"workers_per_node": 3, "cpu_per_worker": 4,
                                           "max_nodes": 2, "account": "lab",
                                           "partition": "cpu"})
    scripts = slurm.job_scripts(settings, slurm.RunLayout(settings.output))
    download = scripts["download"]
    for line in ("#SBATCH --account=lab", "#SBATCH --partition=cpu", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=3", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --time=10", "#SBATCH --signal=B:USR1@60",
                 "ranks=$(( SLURM_JOB_NUM_NODES * 3 + 1 ))", "--cpu-bind=none"):
        assert line in download
    assert f"if [ $decision = {slurm.STOP_CHAIN} ]; then exit 0; fi" in download
    mpirun = slurm.job_scripts(settings.model_copy(update={"launcher": "mpirun"}),
                               slurm.RunLayout(settings.output))["download"]
    assert "mpirun --oversubscribe --bind-to none -n $ranks" in mpirun


@pytest.mark.parametrize(("limit", "seconds"), [
    ("10", 600), ("10:30", 630), ("02:00:00", 7200), ("1-00", 86400), ("1-02:30", 95400),
    ("1-00:00:05", 86405)])
def test_time_limits_in_slurm_formats(limit: str, seconds: int) -> None:
    assert slurm.time_limit_seconds(limit) == seconds
