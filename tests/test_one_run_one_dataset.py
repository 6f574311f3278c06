"""A run folder holds one dataset: one input, one set of output settings; nothing of a user's is
deleted, and a refused command changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import FAST_FETCH, read_batches, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image

ROOT = Path(__file__).parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_download_of_another_input_into_a_run_folder_is_refused(tmp_path: Path) -> None:
    first = write_lines(tmp_path / "first.txt", ["http://127.0.0.2:9/a.jpg"])
    other = write_lines(tmp_path / "other.txt", ["http://127.0.0.3:9/b.jpg"])
    out = tmp_path / "out"
    run_cli("prep", first, "--output", out)
    before = snapshot(out)

    result = run_cli("download", other, "--output", out, "--no-profile", check=False)
    assert result.returncode == 2
    assert str(first.resolve()) in result.stderr and str(other.resolve()) in result.stderr
    assert "--previous" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(out) == before  # nothing written, not even config.yaml

    # The same input, even copied elsewhere, is the same run: it resumes.
    copy = tmp_path / "copy" / "first.txt"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    same = run_cli("download", copy, "--output", out, "--no-profile", "--allow-network",
                   "127.0.0.0/25", "--timeout", "1", "--connect-timeout", "1",
                   "--server-down-after", "1", "--no-respect-robots", check=False)
    assert "resuming" in same.stderr, same.stderr

    # --force prepares the new input while nothing was downloaded ...
    fresh = tmp_path / "fresh"
    run_cli("prep", first, "--output", fresh)
    forced = run_cli("download", other, "--output", fresh, "--no-profile", "--force",
                     "--allow-network", "127.0.0.0/25", "--timeout", "1", "--connect-timeout",
                     "1", "--no-respect-robots", "--server-down-after", "1", check=False)
    assert forced.returncode == 0, forced.stderr
    assert read_batches(fresh).column("identifier").to_pylist() == ["http://127.0.0.3:9/b.jpg"]
    # ... and never once something was (the first run's rows are in `out` by now).
    again = run_cli("download", other, "--output", out, "--force", check=False)
    assert again.returncode == 2 and "mix two inputs" in again.stderr


def test_output_settings_are_fixed_by_the_first_fetch(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2")]) as farm:
        server = farm.servers[0]
        urls = []
        for i in range(4):
            server.images[f"{i}.jpg"] = make_small_image(i, (200, 100))
            urls.append(server.url(f"/img/{i}.jpg"))
        source = write_lines(tmp_path / "u.txt", urls[:2])
        out = tmp_path / "out"
        run_cli("download", source, "--output", out, "--image-size", 64, *FAST_FETCH)
        config = (out / "config.yaml").read_text()

        for flags in (["--image-size", "128"], ["--output-format", "webdataset"],
                      ["--image-quality", "80"]):
            result = run_cli("fetch", out, *flags, *FAST_FETCH, check=False)
            assert result.returncode == 2, flags
            assert "keeps the output settings it started with" in result.stderr
            assert (out / "config.yaml").read_text() == config  # the refusal saved nothing
        result = run_cli("download", source, "--output", out, "--image-size", 128,
                         *FAST_FETCH, check=False)
        assert result.returncode == 2 and "image_size 64 (asked: 128)" in result.stderr

        # Without those flags the run goes on as it started.
        run_cli("fetch", out, "--retry-errors", *FAST_FETCH)
        sizes = {tuple(r["resized_size"]) for r in read_successes(out).to_pylist()}
        assert sizes == {(32, 64)}


def test_the_demo_never_deletes_a_folder_it_did_not_make(tmp_path: Path) -> None:
    output = tmp_path / "mine"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), str(output)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not a run of the example" in result.stderr
    assert (output / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in output.iterdir()] == ["thesis.tex"]


def test_blocked_addresses_are_fetched_once_allowed(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2")]) as farm:
        server = farm.servers[0]
        urls = []
        for i in range(3):
            server.images[f"{i}.jpg"] = make_small_image(i)
            urls.append(server.url(f"/img/{i}.jpg"))
        out = tmp_path / "out"
        # The allow-list leaves the server's address out: refused, never contacted.
        result = run_cli("download", write_lines(tmp_path / "u.txt", urls), "--output", out,
                         "--no-profile", "--allow-network", "127.0.0.3/32", "--timeout", "3")
        assert server.log == []
        assert "3 URLs were refused as blocked_address" in result.stderr
        assert "--allow-network" in result.stderr
        run_cli("fetch", out, "--retry-errors", *FAST_FETCH)
        assert {r["identifier"] for r in read_successes(out).to_pylist()} == set(urls)


def test_loosening_flags_apply_to_their_command_only(tmp_path: Path) -> None:
    """--allow-network, --no-respect-robots and a raised --max-rate-limit, given once, are not
    the run's settings afterwards; a gentler flag is kept; every setting not at its default is
    printed with where it came from."""
    import yaml

    with Farm([ServerSpec("127.0.0.2")]) as farm:
        server = farm.servers[0]
        server.images["0.jpg"] = make_small_image(0)
        out = tmp_path / "out"
        result = run_cli("download", write_lines(tmp_path / "u.txt", [server.url("/img/0.jpg")]),
                         "--output", out, "--no-profile", *FAST_FETCH, "--no-respect-robots",
                         "--max-rate-limit", "50", "--max-connections-per-server", "2",
                         "--image-size", "64")
        assert len(read_successes(out)) == 1
    assert "respect_robots = False  (command line, this command only" in result.stdout
    assert "max_rate_limit = 50.0  (command line, this command only" in result.stdout
    assert "image_size = 64  (command line)" in result.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["respect_robots"] is True and saved["max_rate_limit"] is None
    assert saved["allow_network"] == []
    assert (saved["image_size"], saved["max_connections_per_server"]) == (64, 2)  # kept

    again = run_cli("fetch", out)  # nothing left; says where its settings come from
    assert "image_size = 64  (" + str(out / "config.yaml") + ")" in again.stdout
    assert "respect_robots" not in again.stdout

    run_cli("fetch", out, "--no-respect-robots", "--save-overrides")
    assert yaml.safe_load((out / "config.yaml").read_text())["respect_robots"] is False


def test_a_slurm_chain_carries_the_one_off_flags_of_its_submission(tmp_path: Path) -> None:
    from distributed_downloader.config import load_settings
    from distributed_downloader.executors.slurm import job_scripts
    from distributed_downloader.storage import RunLayout

    out = tmp_path / "out"
    settings = load_settings(None, {"output": out, "respect_robots": False,
                                    "allow_network": ["127.0.0.0/8"], "image_size": 64}).settings
    scripts = job_scripts(settings, RunLayout(out))
    fetch_line = next(line for line in scripts["download"].splitlines() if " fetch " in line)
    assert "--no-respect-robots" in fetch_line and "--allow-network 127.0.0.0/8" in fetch_line
    assert "--image-size" not in fetch_line  # a lasting setting: in OUT/config.yaml
    profile_line = scripts["profile"].splitlines()[-1]
    assert "--no-respect-robots" in profile_line and "--allow-network" in profile_line
