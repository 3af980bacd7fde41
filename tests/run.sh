#!/usr/bin/env bash
# Every test custody has, from a fresh checkout: lint, Rust unit and integration tests,
# then the official OpenAI and Anthropic Python SDKs through the real binary.
# Needs only cargo and python3; installs the SDKs into .venv-conformance from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

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
