"""The command line reads one way everywhere: the run folder, list flags, defaults, tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import FIXTURES, run_cli

RUN_FOLDER_COMMANDS = [["prep"], ["download"], ["fetch"], ["profile"], ["status"], ["verify"],
                       ["plan"], ["export"], ["tools", "resize"], ["tools", "size_based"],
                       ["slurm", "submit"], ["slurm", "status"], ["slurm", "cancel"]]


def help_text(*command: str) -> str:
    return run_cli(*command, "--help").stdout


@pytest.mark.parametrize("command", RUN_FOLDER_COMMANDS, ids=" ".join)
def test_every_command_takes_the_run_folder_as_output_or_o(command: list[str]) -> None:
    text = help_text(*command)
    assert re.search(r"-o, --output", text), text
    assert "(default:" not in text  # defaults are written one way: [default: ...]


def test_output_positional_or_flag_is_the_same_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "urls.txt", "-o", out)
    by_position = run_cli("status", out, "--json").stdout
    by_flag = run_cli("status", "-o", out, "--json").stdout
    assert by_position.replace("\n", "") and by_flag == by_position
    both = run_cli("status", out, "--output", tmp_path / "other", check=False)
    assert both.returncode == 2 and "does not exist" in both.stderr
    other = tmp_path / "other"
    other.mkdir()
    two = run_cli("status", out, "-o", other, check=False)
    assert two.returncode == 2 and "two run folders given" in two.stderr
    none = run_cli("status", check=False)
    assert none.returncode == 2 and "the run's folder is missing" in none.stderr


def test_list_flags_say_how_to_give_several() -> None:
    text = " ".join(help_text("download").split()).replace("comma- separated", "comma-separated")
    for flag in ("--keep-columns", "--allow-network", "--opt-out-directives", "--dns-servers"):
        described = text.split(flag, 1)[1].split(" --", 1)[0]
        assert "comma-separated" in described, (flag, described)
    assert "Repeat for several" in text.split("--previous ", 1)[1]


def test_previous_mode_only_where_previous_is() -> None:
    assert "--previous-mode" in help_text("download") and "--previous-mode" in help_text("prep")
    assert "--previous-mode" not in help_text("fetch")


def test_each_tool_shows_its_own_options() -> None:
    resize, size_based = help_text("tools", "resize"), help_text("tools", "size_based")
    assert "--new-resize-size" in resize and "--threshold-size" not in resize
    assert "--threshold-size" in size_based and "--new-resize-size" not in size_based
    # One name per setting: the flags of the first versions are accepted, not shown.
    assert "--image-size" not in resize and "--min-side" not in size_based
    listing = help_text("tools")
    for name in ("resize", "image_verification", "duplication_based", "size_based"):
        assert name in listing


def test_every_flag_is_its_settings_name() -> None:
    """`--input-format` is `input_format`, `--new-resize-size` is `new_resize_size`: no flag
    shown under another name than its setting's."""
    from distributed_downloader.config import SETTING_NAMES

    flags = set()
    for command in (["prep"], ["download"], ["fetch"], ["profile"], ["tools", "resize"],
                    ["tools", "size_based"], ["slurm", "submit"], ["plan"]):
        flags |= set(re.findall(r"^\s+(?:-\w, )?--([a-z][a-z-]+)", help_text(*command), re.M))
    own = {"help", "output", "config", "force", "retry-errors", "profile", "save-overrides",
           "restart", "workers", "executor", "json", "worker-speed"}
    names = {name.replace("_", "-") for name in SETTING_NAMES}
    negated = {f"no-{name}" for name in names}
    assert flags - own - names - negated == set()
    assert "format" not in flags and "image-size" in flags  # image_size is a setting too
