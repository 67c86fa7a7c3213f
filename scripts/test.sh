#!/usr/bin/env bash
# Run the test suite (fast tests; add -m slow for the long ones). Installs what it needs first.
source "$(dirname "$0")/env.sh"
exec "$PY" -m pytest -q "$@"
