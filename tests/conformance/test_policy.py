"""Policies through the official SDKs: a flag in the record, a block the SDK sees as
its permission error (and the upstream never sees), a sanitized prompt, an observe-mode
rule that blocks nothing, and a reload mid-traffic. The mock provider records what it
received; the trail is read back with the custody CLI."""

import json

import anthropic
import openai
import pytest

from conftest import Stack, anthropic_client, openai_client

CARD = "4111 1111 1111 1111"
SSN = "536-22-8514"

POLICIES = """
[policy_terms]
codenames = ["Project Nightingale", "blue falcon"]

[[policy]]
name = "codename-flag"
when = "request.text.containsAny(terms.codenames)"
action = "flag"
severity = "medium"

[[policy]]
name = "no-internal-hosts"
when = "request.text.contains('internal.corp')"
action = "block"
severity = "high"
message = "custody: internal host names may not leave the company"

[[policy]]
name = "strip-cards"
when = "request.entities.CREDIT_CARD > 0"
action = "sanitize"
severity = "high"
entities = ["CREDIT_CARD"]

[[policy]]
name = "observe-ssn"
when = "request.entities.US_SSN > 0"
action = "block"
severity = "critical"
mode = "observe"
"""

# The reload adds an enforcing block on a codename.
BLOCK_CODENAMES = """
[[policy]]
name = "codename-block"
when = "request.text.containsAny(terms.codenames)"
action = "block"
severity = "critical"
message = "custody: code names stay inside"
"""


@pytest.fixture(scope="module")
def pstack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("policy"), POLICIES)
    yield s
    if not s.stopped:
        s.custody.kill()
        s.mock.kill()


@pytest.fixture(scope="module")
def oai(pstack):
    return openai_client(pstack)


@pytest.fixture(scope="module")
def claude(pstack):
    return anthropic_client(pstack)


def chat(oai, text, **kw):
    return oai.chat.completions.create(
        model=kw.pop("model", "gpt-4o-mini"), messages=[{"role": "user", "content": text}], **kw
    )


def upstream_saw(pstack, needle):
    return any(needle in r["body"] for r in pstack.upstream_requests())


def test_flagged_exchange_goes_through(oai):
    r = chat(oai, "status of Project Nightingale? marker-flag-1")
    assert r.choices[0].message.content.startswith("Hello from the mock provider")


def test_blocked_request_is_the_sdks_permission_error_and_never_reaches_the_upstream(
    pstack, oai, claude
):
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(oai, "ping build.internal.corp marker-block-openai")
    assert e.value.status_code == 403
    assert "internal host names may not leave the company" in str(e.value)
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        claude.messages.create(
            model="claude-mock-1",
            max_tokens=50,
            messages=[{"role": "user", "content": "see wiki.internal.corp marker-block-anthropic"}],
        )
    assert e.value.status_code == 403
    assert "internal host names" in str(e.value)
    assert not upstream_saw(pstack, "marker-block-openai")
    assert not upstream_saw(pstack, "marker-block-anthropic")


def test_sanitized_request_reaches_the_upstream_without_the_card(pstack, oai):
    r = chat(oai, f"charge {CARD} please marker-sanitize")
    # The mock echoes the prompt it received: the card never reached it.
    assert CARD not in r.choices[0].message.content
    got = [q["body"] for q in pstack.upstream_requests() if "marker-sanitize" in q["body"]]
    assert len(got) == 1
    assert CARD not in got[0] and "[CREDIT_CARD]" in got[0]
    json.loads(got[0])


def test_observe_mode_blocks_nothing(pstack, oai):
    r = chat(oai, f"my ssn is {SSN} marker-observe")
    assert r.choices
    assert upstream_saw(pstack, "marker-observe")


def test_reload_mid_traffic_applies_to_new_requests(pstack, oai):
    # A stream admitted before the reload finishes under the old rules.
    stream = chat(oai, "blue falcon, slowly marker-inflight", model="slow", stream=True)
    first = next(iter(stream))
    status, answer = pstack.reload(POLICIES + BLOCK_CODENAMES)
    assert status == 200, answer
    rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert first is not None and rest
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(oai, "blue falcon again marker-after-reload")
    assert "code names stay inside" in str(e.value)
    assert not upstream_saw(pstack, "marker-after-reload")


def test_a_bad_rule_is_refused_on_reload_and_the_old_set_stays(pstack, oai):
    broken = POLICIES + BLOCK_CODENAMES + """
[[policy]]
name = "broken"
when = "request.txt == 'x'"
action = "flag"
severity = "low"
"""
    status, answer = pstack.reload(broken)
    assert status == 422
    assert "broken" in answer["error"] and "no field `txt`" in answer["error"]
    with pytest.raises(openai.PermissionDeniedError):
        chat(oai, "blue falcon still blocked marker-still-blocked")


def test_zz_every_decision_is_in_the_trail(pstack):
    pstack.stop()
    out = pstack.cli("log", "search", "--dir", str(pstack.audit_dir), "--json", "--limit", "1000")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]

    def one(marker):
        found = [r for r in records if marker in json.dumps(r)]
        assert len(found) == 1, marker
        return found[0]

    def decisions(r):
        return {d["name"]: d for d in r["policy"]["decisions"]}

    flagged = one("marker-flag-1")
    assert flagged["outcome"] == "ok"
    assert decisions(flagged)["codename-flag"]["effect"] == "flagged"
    assert decisions(flagged)["codename-flag"]["severity"] == "medium"
    assert len(flagged["policy"]["version"]) == 16

    for marker in ["marker-block-openai", "marker-block-anthropic"]:
        blocked = one(marker)
        assert blocked["outcome"] == "blocked"
        assert blocked["http"]["status"] == 403
        assert decisions(blocked)["no-internal-hosts"]["effect"] == "blocked"
        assert "no-internal-hosts" in blocked["error"]

    sanitized = one("marker-sanitize")
    assert sanitized["policy"]["sanitized"] == {"CREDIT_CARD": 1}
    assert decisions(sanitized)["strip-cards"]["effect"] == "sanitized"
    assert CARD not in json.dumps(sanitized)

    observed = one("marker-observe")
    assert observed["outcome"] == "ok"
    d = decisions(observed)["observe-ssn"]
    assert (d["mode"], d["effect"]) == ("observe", "would_block")
    assert SSN not in json.dumps(observed)

    inflight = one("marker-inflight")
    assert inflight["outcome"] == "ok"
    after = one("marker-after-reload")
    assert after["outcome"] == "blocked"
    assert decisions(after)["codename-block"]["effect"] == "blocked"
    assert after["policy"]["version"] != flagged["policy"]["version"]

    # The reload is a config event naming the new rule; the refused one is not.
    events = pstack.cli("log", "search", "--dir", str(pstack.audit_dir), "--events", "--json")
    reloads = [json.loads(e)["event"] for e in events.stdout.splitlines()]
    reloads = [e for e in reloads if e.get("type") == "config" and e.get("reason") == "reload"]
    assert len(reloads) == 1
    assert "codename-block" in json.dumps(reloads[0]["changed"])
    assert reloads[0]["policy_version"] == after["policy"]["version"]
    assert "Project Nightingale" not in json.dumps(reloads[0])

    # Searches by policy, severity and outcome.
    def search(*args):
        r = pstack.cli("log", "search", "--dir", str(pstack.audit_dir), "--json", *args)
        assert r.returncode == 0, r.stderr
        return [json.loads(line)["id"] for line in r.stdout.splitlines()]

    assert search("--policy", "strip-cards") == [sanitized["id"]]
    assert set(search("--outcome", "blocked")) == {
        one(m)["id"]
        for m in ["marker-block-openai", "marker-block-anthropic", "marker-after-reload", "marker-still-blocked"]
    }
    assert observed["id"] in search("--severity", "critical")
    assert flagged["id"] not in search("--severity", "high")

    verify = pstack.cli("log", "verify", "--dir", str(pstack.audit_dir), "--pubkey", str(pstack.pubkey))
    assert verify.returncode == 0, verify.stdout + verify.stderr
