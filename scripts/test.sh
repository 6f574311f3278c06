#!/usr/bin/env bash
# Install what the tests need (the package, pytest, OpenMPI and a single-node Slurm), then run
# the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test,mpi]'
if [ "$(id -u)" = 0 ]; then
    bash scripts/setup-cluster.sh
    export DD_REQUIRE_CLUSTER=1  # the MPI and Slurm tests must run, not skip
else
    echo "test.sh: not root, OpenMPI/Slurm not set up; the cluster tests will be skipped" >&2
fi
exec python3 -m pytest "$@"
