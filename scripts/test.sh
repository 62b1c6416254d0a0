#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the whole test suite:
# unit tests without privileges, then end-to-end tests in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
