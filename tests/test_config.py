"""Settings: defaults, our YAML, the original downloader's YAML and .env, flags on top."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import FIXTURES, prep_summary, run_cli
from distributed_downloader.config import load_settings
from distributed_downloader.errors import ConfigError

# The original downloader's example config, as its users have it.
ORIGINAL_CONFIG = """\
account: "pas2136"
path_to_input: "{input}"
path_to_output_folder: "{output}"

scripts:
  general_submitter: "/users/x/distributed-downloader/scripts/submit_slurm.sh"
  mpi_submitter: "/users/x/distributed-downloader/scripts/submit_mpi_download.sh"
  download_script: "/users/x/distributed-downloader/scripts/server_downloading.slurm"

schedule_rules:
  5000: 40
  1000: 20
  1: 1

output_structure:
  urls_folder: "servers_batched"
  logs_folder: "logs"
  images_folder: "downloaded_images"
  schedules_folder: "schedules"
  profiles_table: "servers_profiles.csv"
  ignored_table: "ignored_servers.csv"
  inner_checkpoint_file: "inner_checkpoint.yaml"
  tools_folder: "tools"

suppress_unchanged_error: False

downloader_parameters:
  num_downloads: 2
  max_nodes: 20
  workers_per_node: 20
  cpu_per_worker: 1
  header: "User-Agent: Imageomics Institute (imageomics-it@example.edu)"
  image_size: 512
  logger_level: "INFO"
  batch_size: 4
  rate_multiplier: 0.5
  default_rate_limit: 3

tools_parameters:
  num_workers: 1
  max_nodes: 4
  workers_per_node: 40
  cpu_per_worker: 1
  threshold_size: 224
  new_resize_size: 720
"""

ORIGINAL_ENV = """\
# If you use a different HPC system, update the variables below.
ACCOUNT=pas2136
GBIF_CACHE_ROOT=/fs/scratch/PAS2136/gbif/data
TIME_STAMP=2024-05-01
DOWNLOAD_DIR={output}
DOWNLOADER_URLS_FOLDER=servers_batched
DOWNLOADER_LOGS_FOLDER=logs
DOWNLOADER_IMAGES_FOLDER=downloaded_images
DOWNLOADER_PROFILES_PATH=servers_profiles.csv
DOWNLOADER_MAX_NODES=6
DOWNLOADER_WORKERS_PER_NODE=5   # per node
DOWNLOADER_CPU_PER_TASK=8
"""


def test_original_config_runs_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(ORIGINAL_CONFIG.format(input=FIXTURES / "multimedia.txt", output=out))
    # INPUT is still given on the command line; the output folder comes from the file.
    result = run_cli("prep", FIXTURES / "multimedia.txt", "--output", out, "--config", config)
    assert "no effect here" in result.stderr and "output_structure" in result.stderr
    assert prep_summary(out)["batch_size"] == 4
    effective = yaml.safe_load((out / "config.yaml").read_text())
    assert effective["batch_size"] == 4
    assert effective["default_rate_limit"] == 3
    assert effective["rate_multiplier"] == 0.5
    assert effective["image_size"] == 512
    assert effective["user_agent"] == "Imageomics Institute (imageomics-it@example.edu)"
    assert effective["schedule_rules"] == {5000: 40, 1000: 20, 1: 1}
    assert (effective["max_nodes"], effective["workers_per_node"]) == (20, 20)
    assert effective["tools_workers_per_node"] == 40
    assert effective["account"] == "pas2136"


def test_flags_override_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text("batch_size: 4\nkeep_duplicates: true\n")
    run_cli("prep", FIXTURES / "multimedia.txt", "--output", out, "--config", config,
            "--batch-size", "2", "--no-keep-duplicates")
    summary = prep_summary(out)
    assert summary["batch_size"] == 2
    assert summary["duplicates"] == 2
    effective = yaml.safe_load((out / "config.yaml").read_text())
    assert (effective["batch_size"], effective["keep_duplicates"]) == (2, False)


def test_saved_settings_are_the_base_of_the_next_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("prep", FIXTURES / "urls.txt", "--output", out, "--batch-size", "7")
    settings = load_settings(None, {"output": out}).settings
    assert settings.prep.batch_size == 7
    assert settings.paths.input == (FIXTURES / "urls.txt").resolve()


def test_unknown_key_names_the_closest_valid_one(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("batchsize: 10\n")
    result = run_cli("prep", FIXTURES / "urls.txt", "--output", tmp_path / "o", "--config",
                     config, check=False)
    assert result.returncode == 2
    assert "unknown setting 'batchsize'; did you mean 'batch_size'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_nested_key_of_the_original(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("downloader_parameters:\n  worker_per_node: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'downloader_parameters.workers_per_node'"):
        load_settings(config)


def test_bad_value_names_the_setting(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("batch_size: -5\n")
    with pytest.raises(ConfigError, match="batch_size: Input should be greater than 0"):
        load_settings(config)


def test_first_version_env_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = tmp_path / "hpc.env"
    env.write_text(ORIGINAL_ENV.format(output=out))
    loaded = load_settings(env)
    settings, without_effect = loaded.settings, loaded.without_effect
    assert settings.cluster.account == "pas2136"
    cluster = settings.cluster
    assert (cluster.max_nodes, cluster.workers_per_node, cluster.cpu_per_worker) == (6, 5, 8)
    assert settings.paths.output == out
    assert settings.politeness.rates == Path("servers_profiles.csv")
    assert "DOWNLOADER_URLS_FOLDER" in without_effect


def test_env_file_with_a_typo(tmp_path: Path) -> None:
    env = tmp_path / "hpc.env"
    env.write_text("DOWNLOADER_MAX_NODE=6\n")
    with pytest.raises(ConfigError, match="did you mean 'DOWNLOADER_MAX_NODES'"):
        load_settings(env)


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    for command in ("download", "prep", "profile", "fetch", "status", "verify", "tools",
                    "slurm"):
        assert f"  {command} " in result.stdout
