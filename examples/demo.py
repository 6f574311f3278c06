"""Run the main job end to end on the bundled example: a small GBIF multimedia.txt.

    python examples/demo.py [OUTPUT]

It starts the example's image servers (a loopback farm on 127.0.0.21-24, port 8470, each
allowing 10 requests/s), then runs `distributed-downloader download` on
examples/gbif-small/multimedia.txt into OUTPUT (default: ./example-output) and prints where the
result is. Only loopback addresses are ever contacted. Run again on the same OUTPUT, it resumes
(there is nothing left to do); it never deletes anything, and refuses an OUTPUT that holds
something else than a run of the example.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from distributed_downloader.testing.farm import Farm, ServerSpec

EXAMPLE = Path(__file__).parent / "gbif-small" / "multimedia.txt"
HOSTS = ("127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24")
PORT = 8470


def _is_example_run(output: Path) -> bool:
    """An empty folder, or one where this demo already ran (its prep names the example)."""
    if output.is_dir() and not any(output.iterdir()):
        return True
    try:
        summary = json.loads((output / "prep" / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("input") == str(EXAMPLE.resolve())


def main() -> int:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "example-output").resolve()
    if output.exists() and not _is_example_run(output):
        print(f"{output} exists and is not a run of the example: nothing was changed; give "
              "the demo a new or empty folder", file=sys.stderr)
        return 2
    specs = [ServerSpec(host, PORT, rate_limit=10, generate_images=True) for host in HOSTS]
    try:
        farm = Farm(specs)
        farm.start()
    except OSError as exc:
        print(f"cannot start the example's servers on port {PORT}: {exc}", file=sys.stderr)
        return 1
    try:
        command = [sys.executable, "-m", "distributed_downloader", "download", str(EXAMPLE),
                   "--output", str(output), "--batch-size", "8", "--default-rate-limit", "10",
                   "--allow-network", "127.0.0.0/24"]
        print("$", " ".join(command), flush=True)
        result = subprocess.run(command)
    finally:
        farm.stop()
    if result.returncode == 0:
        print(f"\nThe result is in {output}:\n"
              f"  downloaded_images/server_name=HOST/partition_id=N/successes-*.parquet  images\n"
              f"  download_errors/server_name=HOST/partition_id=N/errors-*.parquet  what failed, why\n"
              f"  prep/  the batches, duplicates and rejected rows; fetch_summary.json  counts")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
