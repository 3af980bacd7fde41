#!/usr/bin/env bash
# The benchmark, in one command: custody with auditing on beside direct and nginx (and
# LiteLLM's proxy, unless --no-litellm). Installs nginx from Debian and LiteLLM from PyPI
# when missing, builds release binaries, then runs tests/load/bench.py with the same
# arguments (--quick for a smoke run, --only SCENARIO, --out results.json).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v nginx >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
if [[ " $* " != *" --no-litellm "* ]]; then
  if [ ! -x .venv-litellm/bin/litellm ]; then
    python3 -m venv .venv-litellm
  fi
  .venv-litellm/bin/python -m pip install --quiet --disable-pip-version-check -r tests/load/requirements-litellm.txt
fi
cargo build --release --locked -p custody-proxy -p custody-load
exec python3 tests/load/bench.py "$@"
