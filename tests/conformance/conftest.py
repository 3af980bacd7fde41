"""Starts the loopback mock provider and custody (the real binary) for the SDK tests."""

import os
import pathlib
import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request

import anthropic
import openai
import pytest

API_KEY = "sk-conformance-0123456789abcdefghij"
ANTHROPIC_KEY = "sk-ant-api03-conformance0123456789abcdef"


def openai_client(stack):
    """The OpenAI SDK pointed at custody's OpenAI route; no retries hide a failure."""
    return openai.OpenAI(base_url=stack.openai_base, api_key=API_KEY, max_retries=0)


def anthropic_client(stack):
    """The Anthropic SDK pointed at custody's Anthropic route."""
    return anthropic.Anthropic(base_url=stack.anthropic_base, api_key=ANTHROPIC_KEY, max_retries=0)

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("CUSTODY_BIN", str(ROOT / "target" / "debug" / "custody"))


def _closed_port():
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args):
    """Runs a custody subcommand and returns (process, address from its first line)."""
    proc = subprocess.Popen([BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc, line.strip().rsplit("http://", 1)[1]


ADMIN_TOKEN = "conformance-admin-token"


class Stack:
    def __init__(self, tmp: pathlib.Path, extra: str = ""):
        self.mock, mock_addr = _spawn(["mock-provider"])
        self.mock_addr = mock_addr
        self.audit_dir = tmp / "audit"
        keys = tmp / "keys"
        subprocess.run([BIN, "keygen", "--out", str(keys)], check=True, capture_output=True)
        self.pubkey = keys / "custody.pub"
        self.config = tmp / "custody.toml"
        self.base_config = f"""
[listen]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[audit]
dir = "{self.audit_dir}"
signing_key = "{keys / 'custody.key'}"

[[route]]
name = "openai"
prefix = "/v1/"
upstream = "http://{mock_addr}"
provider = "openai"

[[route]]
name = "anthropic"
prefix = "/anthropic/"
strip_prefix = true
upstream = "http://{mock_addr}"
provider = "anthropic"

# Nothing listens there: the provider is down.
[[route]]
name = "down"
prefix = "/down/"
strip_prefix = true
upstream = "http://127.0.0.1:{_closed_port()}"
provider = "openai"
"""
        self.config.write_text(self.base_config + extra)
        self.custody, self.addr = _spawn(["serve", "--config", str(self.config)])
        admin_line = self.custody.stdout.readline()
        self.admin = admin_line.strip().rsplit("http://", 1)[1]
        self.stopped = False

    def reload(self, extra: str):
        """Rewrites the configuration file and asks custody to apply it; returns
        (HTTP status, JSON answer) once the reload is in force or refused."""
        self.config.write_text(self.base_config + extra)
        req = urllib.request.Request(
            f"http://{self.admin}/admin/reload",
            method="POST",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def upstream_requests(self):
        """What the mock provider received, oldest first."""
        with urllib.request.urlopen(f"http://{self.mock_addr}/mock/requests", timeout=30) as r:
            return json.loads(r.read())["requests"]

    @property
    def openai_base(self):
        return f"http://{self.addr}/v1"

    @property
    def down_base(self):
        return f"http://{self.addr}/down/v1"

    @property
    def anthropic_base(self):
        return f"http://{self.addr}/anthropic"

    def stop(self):
        """SIGTERM: custody drains and closes the trail, and must exit 0."""
        if self.stopped:
            return
        self.stopped = True
        self.custody.send_signal(signal.SIGTERM)
        code = self.custody.wait(timeout=60)
        self.mock.kill()
        self.mock.wait()
        assert code == 0, f"custody exited {code}"

    def cli(self, *args):
        return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("custody"))
    yield s
    if not s.stopped:
        s.custody.kill()
        s.mock.kill()
