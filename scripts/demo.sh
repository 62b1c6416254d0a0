#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the demo of the README:
# a Service load-balancing real connections across Pods in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python examples/demo.py "$@"
