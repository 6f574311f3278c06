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
    assert "--image-size" in resize and "--min-side" not in resize
    assert "--min-side" in size_based and "--image-size" not in size_based
    listing = help_text("tools")
    for name in ("resize", "image_verification", "duplication_based", "size_based"):
        assert name in listing
