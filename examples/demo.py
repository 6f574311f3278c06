"""Run the main job end to end on the bundled example (examples/gbif-small/multimedia.txt).

    python examples/demo.py [OUTPUT]

It prepares the example into OUTPUT (default: ./example-output), then prints where the result
is and a summary. Every URL of the example points at loopback addresses (127.0.0.21-24).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parent / "gbif-small" / "multimedia.txt"


def main() -> int:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "example-output").resolve()
    if output.exists():
        shutil.rmtree(output)
    command = [sys.executable, "-m", "distributed_downloader", "prep", str(EXAMPLE),
               "--output", str(output), "--batch-size", "8"]
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command)
    if result.returncode == 0:
        print(f"\nThe result is in {output}: prep/batches/ holds the rows to download, "
              "by server; prep/summary.json counts what became of every input row.")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
