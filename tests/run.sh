#!/usr/bin/env bash
# Every test custody has, from a fresh checkout: lint, Rust unit and integration tests,
# the official OpenAI and Anthropic Python SDKs through the real binary, a smoke run of
# the load harness, and the Kubernetes manifests.
# Needs cargo, python3 and kubectl; installs from PyPI the SDKs (.venv-conformance), moto
# for the object-storage tests (.venv-moto), an OTLP receiver and graph loaders
# (.venv-tools) and the manifest validator (.venv-deploy), and
# from Debian Chromium and chromedriver for the browser tests, zstd for tar --zstd, and
# prometheus for promtool (the alerting rules and the dashboard's queries).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== moto (S3-protocol server for the shipping tests, from PyPI)"
moto=.venv-moto
if [ ! -x "$moto/bin/python" ]; then
  python3 -m venv "$moto"
fi
"$moto/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements-moto.txt
export CUSTODY_MOTO_SERVER="$PWD/$moto/bin/moto_server"

echo "== tools (OTLP receiver, Kuzu and NetworkX for the graph export, from PyPI)"
tools=.venv-tools
if [ ! -x "$tools/bin/python" ]; then
  python3 -m venv "$tools"
fi
"$tools/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements-tools.txt
export CUSTODY_TOOLS_PYTHON="$PWD/$tools/bin/python"

echo "== Chromium and chromedriver (Debian), for the browser tests; zstd, for tar --zstd; promtool"
if ! command -v chromedriver > /dev/null || ! command -v chromium > /dev/null || ! command -v zstd > /dev/null \
  || ! command -v promtool > /dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver zstd prometheus
fi
export CUSTODY_CHROMEDRIVER="$(command -v chromedriver)"
export CUSTODY_CHROMIUM="$(command -v chromium)"

echo "== cargo test"
cargo build --locked -p custody-proxy --bin custody
cargo test --workspace --locked

echo "== SDK conformance (openai, anthropic)"
venv=.venv-conformance
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/conformance/requirements.txt
CUSTODY_BIN="$PWD/target/debug/custody" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/conformance

echo "== load harness smoke run (debug build: checks the tools and records = requests, not speed)"
cargo build --locked -p custody-load
python3 tests/load/bench.py --quick --bin-dir target/debug --no-litellm --targets direct,hyper,custody,custody-durable \
  --only chat-1k-c32 --only sse-c32 > /dev/null

echo "== monitoring: alerting rules and their unit tests, the dashboard's queries (promtool)"
promtool check rules deploy/monitoring/custody-alerts.yaml
(cd deploy/monitoring && promtool test rules custody-alerts.test.yaml)
dashrules=$(mktemp --suffix=.yaml)
python3 deploy/monitoring/check-dashboard.py deploy/monitoring/custody-dashboard.json > "$dashrules"
promtool check rules "$dashrules"
rm -f "$dashrules"

echo "== deploy manifests (kubectl kustomize, kubernetes-validate --strict)"
target/debug/custody config check deploy/k8s/base/custody.toml
kvenv=.venv-deploy
if [ ! -x "$kvenv/bin/python" ]; then
  python3 -m venv "$kvenv"
fi
"$kvenv/bin/python" -m pip install --quiet --disable-pip-version-check -r deploy/requirements.txt
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for overlay in base overlays/sidecar overlays/gateway; do
  out="$rendered/$(basename "$overlay").yaml"
  kubectl kustomize "deploy/k8s/$overlay" > "$out"
  "$kvenv/bin/kubernetes-validate" --strict --quiet -k 1.32.0 "$out"
done
echo "deploy manifests: ok"
