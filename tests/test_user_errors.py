"""Errors a user can act on: one line, exit 2, before any work, and nothing already written is
changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import FAST_FETCH, FAST_REQUESTS, FIXTURES, read_successes, run_cli, write_lines
from distributed_downloader.testing.farm import Farm, ServerSpec, make_small_image


def assert_one_line_error(result, *parts: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0], errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def without_module(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which `import module` fails, as on a machine without the extra."""
    shadow = tmp_path / f"no-{module}"
    (shadow / module).mkdir(parents=True, exist_ok=True)
    (shadow / module / "__init__.py").write_text(f"raise ImportError('no {module} here')\n")
    # the shadow first, then the code under test (a worktree's PYTHONPATH, if any)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow),
                                                        os.environ.get("PYTHONPATH")]))}


def test_an_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    result = run_cli("prep", FIXTURES / "urls.txt", "-o", afile, check=False)
    assert_one_line_error(result, str(afile), "is a file, not a folder")
    assert afile.read_text() == "mine\n"
    below = run_cli("prep", FIXTURES / "urls.txt", "-o", afile / "run", check=False)
    assert_one_line_error(below, "cannot write into", "Not a directory")


@pytest.fixture
def read_only_run(tmp_path: Path):
    """A prepared run on a file system that is then made read-only (as a full quota or a
    read-only mount would leave it); skipped where mounting is not allowed."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mount / "out"
        run_cli("prep", FIXTURES / "urls.txt", "--output", out)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield out
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_run_folder_is_one_line_for_every_command(read_only_run: Path) -> None:
    before = snapshot(read_only_run)
    for command in (["fetch", read_only_run, *FAST_FETCH], ["verify", read_only_run],
                    ["profile", read_only_run, *FAST_REQUESTS],
                    ["prep", FIXTURES / "urls.txt", "-o", read_only_run / "again"]):
        result = run_cli(*command, check=False)
        assert_one_line_error(result, "cannot write into", "Read-only file system")
    assert snapshot(read_only_run) == before


def test_a_missing_extra_is_named_before_any_work(tmp_path: Path) -> None:
    with Farm([ServerSpec("127.0.0.2")]) as farm:
        server = farm.servers[0]
        server.images["0.jpg"] = make_small_image(0)
        urls = write_lines(tmp_path / "u.txt", [server.url("/img/0.jpg")])
        out = tmp_path / "out"
        result = run_cli("download", urls, "-o", out, "--no-profile", "--output-format", "hdf5",
                         *FAST_FETCH, check=False, env=without_module(tmp_path, "h5py"))
        assert_one_line_error(result, "h5py", "pip install 'distributed-downloader[hdf5]'")
        assert server.log == [] and not (out / "prep").exists()

        run_cli("download", urls, "-o", out, "--no-profile", *FAST_FETCH)
        assert len(read_successes(out)) == 1
    before = snapshot(out)
    export = run_cli("export", out, "--to", "hdf5", check=False,
                     env=without_module(tmp_path, "h5py"))
    assert_one_line_error(export, "pip install 'distributed-downloader[hdf5]'")
    report = run_cli("status", out, "--report", tmp_path / "report.html", check=False,
                     env=without_module(tmp_path, "matplotlib"))
    assert_one_line_error(report, "pip install 'distributed-downloader[report]'")
    assert snapshot(out) == before
