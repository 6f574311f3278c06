"""Settings by stage: typed frozen groups behind one flat name per setting (YAML, flag, saved)."""

from __future__ import annotations

from pathlib import Path

import click
import pydantic
import pytest
import yaml
from test_config import ORIGINAL_CONFIG, ORIGINAL_ENV

from distributed_downloader.cli import cli
from distributed_downloader.config import (
    FETCH_SETTINGS,
    GROUP_OF,
    GROUPS,
    PREP_SETTINGS,
    PROFILE_SETTINGS,
    SETTING_NAMES,
    Settings,
    load_settings,
    read_settings_file,
    setting_field,
    settings_as_yaml,
    validate,
)
from distributed_downloader.errors import UserError
from distributed_downloader.executors.slurm import submit_chain
from distributed_downloader.fetch import run_fetch
from distributed_downloader.fetch.retry import RetryPolicy
from distributed_downloader.plan import make_plan
from distributed_downloader.policy import RatePolicy
from distributed_downloader.profile import run_profile


def test_every_setting_has_one_flat_name_a_default_and_a_description() -> None:
    names = [name for model in GROUPS.values() for name in model.model_fields]
    assert len(names) == len(set(names)) == len(SETTING_NAMES)
    assert not set(GROUPS) & set(names), "a group name would shadow a setting's name"
    for name in SETTING_NAMES:
        field = setting_field(name)
        assert (field.description or "").strip(), f"{name} has no description"
        assert not field.is_required(), f"{name} has no default"
    assert set(FETCH_SETTINGS + PROFILE_SETTINGS + PREP_SETTINGS) <= set(SETTING_NAMES)


def test_groups_are_frozen_and_settings_built_from_flat_names() -> None:
    settings = Settings(batch_size=7, default_rate_limit=3, dns_servers="127.0.0.1, ::1")
    assert settings.prep.batch_size == 7 and settings.value("batch_size") == 7
    assert settings.politeness.default_rate_limit == 3.0
    assert settings.network.dns_servers == ["127.0.0.1", "::1"]
    with pytest.raises(pydantic.ValidationError):
        settings.prep.batch_size = 8  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        settings.prep = settings.prep  # type: ignore[misc]
    copy = settings.model_copy(update={"num_downloads": 3})
    assert copy.cluster.num_downloads == 3 and copy.prep.batch_size == 7
    assert list(settings.flat()) == list(SETTING_NAMES)


def test_every_setting_flag_is_its_flat_name() -> None:
    """`--batch-size` is `batch_size` on every command that takes it (old flags stay hidden)."""
    def commands(group: click.Group):
        for command in group.commands.values():
            yield from commands(command) if isinstance(command, click.Group) else [command]

    seen = set()
    for command in commands(cli):
        for param in command.params:
            if isinstance(param, click.Option) and param.name in GROUP_OF and not param.hidden:
                assert "--" + param.name.replace("_", "-") in param.opts, (command.name, param)
                seen.add(param.name)
    assert {"batch_size", "default_rate_limit", "image_size", "account"} <= seen


def test_the_seed_yaml_and_env_load_into_the_groups(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(ORIGINAL_CONFIG.format(input=tmp_path / "in.txt", output=tmp_path / "out"))
    settings = load_settings(config).settings
    assert settings.paths.output == tmp_path / "out"
    assert settings.cluster.account == "pas2136"
    assert settings.cluster.schedule_rules == {5000: 40, 1000: 20, 1: 1}
    assert (settings.cluster.num_downloads, settings.cluster.max_nodes) == (2, 20)
    assert settings.network.user_agent == "Imageomics Institute (imageomics-it@example.edu)"
    assert (settings.images.image_size, settings.prep.batch_size) == (512, 4)
    assert (settings.politeness.rate_multiplier, settings.politeness.default_rate_limit) == \
        (0.5, 3.0)
    assert (settings.tools.tools_max_nodes, settings.tools.tools_workers_per_node) == (4, 40)

    env = tmp_path / "hpc.env"
    env.write_text(ORIGINAL_ENV.format(output=tmp_path / "out"))
    settings = load_settings(env).settings
    assert settings.cluster.account == "pas2136"
    assert settings.politeness.rates == Path("servers_profiles.csv")
    assert settings.cluster.cpu_per_worker == 8


def test_the_saved_settings_stay_flat_and_load_back(tmp_path: Path) -> None:
    settings = Settings(output=tmp_path, batch_size=7, max_throttles=4, schedule_rules={10: 2})
    text = settings_as_yaml(settings)
    assert list(yaml.safe_load(text)) == list(SETTING_NAMES)
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    again = validate(read_settings_file(saved).values, str(saved))
    assert again == settings


def test_a_setting_without_a_flag_is_set_in_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("max_throttles: 3\nretry_delay_growth: 2\ndns_min_ttl: 0\n")
    settings = load_settings(config).settings
    assert settings.politeness.max_throttles == 3
    assert RetryPolicy.from_settings(settings.politeness).growth == 2.0
    assert settings.network.dns_min_ttl == 0.0
    assert RatePolicy.from_settings(settings.politeness).warm_up_steps == 3
    config.write_text("stall_periods: 0\n")
    with pytest.raises(UserError, match="stall_periods: Input should be greater than or equal"):
        load_settings(config)


@pytest.mark.parametrize("stage, message", [
    (run_profile, "profile needs the run's folder OUT"),
    (lambda settings: run_fetch(settings, executor=None), "fetch needs the run's folder OUT"),
    (lambda settings: make_plan(settings, 1, 1), "plan needs the run's folder OUT"),
    (submit_chain, "slurm submit needs the run's folder (--output or path_to_output_folder)"),
])
def test_a_stage_without_the_run_folder_says_so_in_one_line(stage, message: str) -> None:
    with pytest.raises(UserError) as raised:
        stage(Settings())
    assert str(raised.value) == message
