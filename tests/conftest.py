"""Shared helpers: run the real CLI in a child process and read back what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: object, check: bool = True, timeout: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> CliResult:
    """Run `distributed-downloader ARGS...` as a user would, in a child process."""
    command = [sys.executable, "-m", "distributed_downloader", *map(str, args)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    result = CliResult(completed.returncode, completed.stdout, completed.stderr)
    if check and completed.returncode != 0:
        raise AssertionError(
            f"command failed ({completed.returncode}): {' '.join(command)}\n"
            f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        )
    return result


def read_batches(out: Path) -> pa.Table:
    """All prepared rows, read back as one Hive-partitioned table with DuckDB."""
    pattern = out / "prep" / "batches" / "*" / "*" / "*.parquet"
    return duckdb.sql(
        f"SELECT * EXCLUDE (file_row_number) FROM read_parquet('{pattern}', "
        "hive_partitioning = true, file_row_number = true) "
        "ORDER BY server_name, partition_id, file_row_number"
    ).to_arrow_table()


def read_parquet(path: Path) -> pa.Table:
    return duckdb.sql(f"SELECT * FROM read_parquet('{path}')").to_arrow_table()


def prep_summary(out: Path) -> dict:
    return json.loads((out / "prep" / "summary.json").read_text())


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
