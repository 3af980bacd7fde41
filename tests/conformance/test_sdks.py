"""The official OpenAI and Anthropic Python SDKs, unchanged but for the base URL,
through custody to a mock provider; then the trail is checked with the custody CLI."""

import json

import anthropic
import openai
import pytest

from conftest import API_KEY, ANTHROPIC_KEY, anthropic_client, openai_client

EMAIL = "alice.conformance@example.org"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def oai(stack):
    return openai_client(stack)


@pytest.fixture(scope="module")
def claude(stack):
    return anthropic_client(stack)


def test_chat(oai):
    r = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"Write to {EMAIL} please"}],
        temperature=0.3,
        max_tokens=50,
    )
    assert r.choices[0].message.content.startswith("Hello from the mock provider")
    assert r.model == "gpt-4o-mini-2026-01-01"
    assert r.usage.completion_tokens > 0


def test_streamed_chat_with_usage(oai):
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from the mock provider. You said: stream me"
    assert usage is not None and usage.prompt_tokens > 0


def test_streamed_tool_calls(oai):
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS,
        stream=True,
    )
    name, args, finish = "", "", None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert name == "get_weather"
    assert json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_embeddings(oai):
    r = oai.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8


def test_streamed_responses_api(oai):
    stream = oai.responses.create(model="gpt-4.1", input="respond please", stream=True)
    deltas, completed = "", None
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type == "response.completed":
            completed = event.response
    assert completed is not None and completed.status == "completed"
    assert deltas == completed.output_text == "Hello from the mock provider. You said: respond please"


def test_anthropic_messages(claude):
    m = claude.messages.create(
        model="claude-mock-1",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi claude"}],
    )
    assert m.content[0].text == "Hello from the mock provider. You said: hi claude"
    assert m.stop_reason == "end_turn"


def test_anthropic_messages_streamed(claude):
    with claude.messages.stream(
        model="claude-mock-1",
        max_tokens=100,
        messages=[{"role": "user", "content": "stream claude"}],
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from the mock provider. You said: stream claude"
    assert final.usage.output_tokens > 0


def test_rate_limit_passes_through_with_retry_after(oai):
    with pytest.raises(openai.RateLimitError) as e:
        oai.chat.completions.create(model="rate-limited", messages=[{"role": "user", "content": "x"}])
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.status_code == 429


def test_two_megabyte_prompt(oai):
    prompt = "lorem ipsum " * (2 * 1024 * 1024 // 12 + 1)
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    assert r.choices[0].message.content.startswith("Hello from the mock provider. You said: lorem ipsum")
    assert r.usage.prompt_tokens > 500_000


def test_provider_errors_reach_the_sdk_unchanged(oai, claude):
    """400, 401 and 500 come back as the SDKs' own exception types, with the body's message."""
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="bad-request", messages=msgs)
    assert e.value.status_code == 400 and "mock: bad-request" in str(e.value)
    with pytest.raises(openai.AuthenticationError) as e:
        oai.chat.completions.create(model="unauthorized", messages=msgs)
    assert e.value.status_code == 401
    with pytest.raises(openai.InternalServerError) as e:
        oai.chat.completions.create(model="server-error", messages=msgs)
    assert e.value.status_code == 500
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="bad-request", max_tokens=10, messages=msgs)
    assert e.value.status_code == 400 and e.value.body["error"]["type"] == "invalid_request_error"


def test_provider_down_is_a_502_the_sdk_understands(stack):
    """Custody's own error for an unreachable upstream is OpenAI-shaped JSON."""
    down = openai.OpenAI(base_url=stack.down_base, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        down.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "anyone?"}])
    assert e.value.status_code == 502
    assert e.value.body["code"] == "upstream_unreachable", e.value.body
    assert e.value.code == "upstream_unreachable"


def test_client_cancels_a_stream_midway(oai, claude):
    """The SDK closes a stream after its first event; the trail keeps what was streamed."""
    stream = oai.chat.completions.create(
        model="slow", stream=True, messages=[{"role": "user", "content": "cancel me part way please"}]
    )
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    with claude.messages.stream(
        model="slow", max_tokens=50, messages=[{"role": "user", "content": "cancel me too"}]
    ) as s:
        next(iter(s))


def test_client_timeout_cancels_the_request(oai):
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.3).chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "too slow"}]
        )


def test_zz_trail_holds_every_exchange(stack):
    """Runs last: stop custody, then read the trail as a reviewer would."""
    stack.stop()
    export = stack.cli("log", "export", "--dir", str(stack.audit_dir))
    assert export.returncode == 0, export.stderr
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, 19))
    # The trail opens with the start's config event; then one record per exchange.
    assert lines[0]["event"]["type"] == "config"
    records = lines[1:]
    assert len(records) == 17
    assert all(r["schema"] == "custody.record/v1" for r in records)
    assert len({r["config"]["version"] for r in records}) == 1
    assert all(len(r["trace"]["id"]) == 32 for r in records)
    by_path = {}
    for r in records:
        by_path.setdefault(r["http"]["path"], []).append(r)

    chat = by_path["/v1/chat/completions"]
    # Errors are recorded as the client saw them; a cancelled request has no status
    # when the client left before the answer's head.
    assert [r["http"].get("status") for r in chat] == [200, 200, 200, 429, 200, 400, 401, 500, 200, None]
    assert [r["outcome"] for r in chat][5:] == ["ok", "ok", "ok", "client_cancelled", "client_cancelled"]
    assert chat[5]["response"]["body"]["error"]["message"] == "mock: bad-request"
    assert chat[8]["response"]["streamed"] is True
    assert chat[8]["response"]["body"]["choices"][0]["finish_reason"] is None, "cut before the end"
    assert chat[9]["gen_ai"]["request"]["model"] == "slow"
    down = by_path["/down/v1/chat/completions"][0]
    assert down["http"]["status"] == 502 and down["outcome"] == "upstream_error"
    assert "Connection refused" in down["error"]
    assert down["gen_ai"]["request"]["model"] == "gpt-4o-mini", "the attempted prompt is recorded"
    assert down["request"]["body"]["messages"][0]["content"] == "anyone?"
    assert chat[0]["gen_ai"]["request"]["temperature"] == 0.3
    assert chat[0]["gen_ai"]["request"]["max_tokens"] == 50
    assert chat[0]["gen_ai"]["response"]["model"] == "gpt-4o-mini-2026-01-01"
    assert "[EMAIL_ADDRESS]" in chat[0]["request"]["body"]["messages"][0]["content"]
    assert chat[1]["response"]["streamed"] is True
    assert chat[1]["gen_ai"]["usage"]["input_tokens"] > 0
    tool = chat[2]["response"]["body"]["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(tool["function"]["arguments"]) == {"city": "Paris"}
    assert chat[4]["http"]["request_bytes"] > 2 * 1024 * 1024
    assert by_path["/v1/embeddings"][0]["gen_ai"]["operation"]["name"] == "embeddings"
    resp = by_path["/v1/responses"][0]
    assert resp["response"]["body"]["status"] == "completed"
    msgs = by_path["/anthropic/v1/messages"]
    assert [m["gen_ai"]["provider"]["name"] for m in msgs] == ["anthropic"] * 4
    assert [m["http"]["status"] for m in msgs] == [200, 200, 400, 200]
    assert msgs[3]["outcome"] == "client_cancelled" and msgs[3]["response"]["body"]["stop_reason"] is None
    assert msgs[1]["response"]["body"]["content"][0]["text"].startswith("Hello from the mock provider")
    assert msgs[1]["gen_ai"]["usage"]["output_tokens"] > 0
    assert len({r["client"]["key_id"] for r in records}) == 2

    verify = stack.cli("log", "verify", "--dir", str(stack.audit_dir), "--pubkey", str(stack.pubkey))
    assert verify.returncode == 0, verify.stderr
    assert "records: 17 (+1 events) in 1 segments" in verify.stdout, verify.stdout
    assert "signatures: all checked against" in verify.stdout, verify.stdout
    assert verify.stdout.endswith("ok\n"), verify.stdout

    for path in stack.audit_dir.iterdir():
        raw = path.read_bytes()
        for secret in (API_KEY, ANTHROPIC_KEY, EMAIL):
            assert secret.encode() not in raw, f"{secret} in {path.name}"
    for secret in (API_KEY, ANTHROPIC_KEY, EMAIL):
        assert secret not in export.stdout


def test_zz_trail_as_parquet_reads_in_duckdb(stack, tmp_path):
    """The Parquet export opens in DuckDB, and docs/scaling.md's query runs on it."""
    import duckdb

    stack.stop()
    out = tmp_path / "fleet.parquet"
    export = stack.cli("log", "export", "--dir", str(stack.audit_dir), "--format", "parquet", "-o", str(out))
    assert export.returncode == 0, export.stderr
    jsonl = stack.cli("log", "export", "--dir", str(stack.audit_dir)).stdout.splitlines()

    db = duckdb.connect()
    rows = db.execute(f"SELECT seq, schema, record FROM '{out}' ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(jsonl) + 1))
    # `record` is the stored line, byte for byte.
    assert [r[2] for r in rows] == jsonl

    by_model = db.execute(
        f"""
        SELECT "user", key_id, request_model, response_model,
               count(*) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               max(duration_ms) AS slowest_ms
        FROM '{out}'
        WHERE schema = 'custody.record/v1' AND time_start >= TIMESTAMPTZ '2026-11-01 00:00:00+00'
        GROUP BY ALL ORDER BY calls DESC
        """
    ).fetchall()
    assert sum(r[4] for r in by_model) == 17
    assert any(r[3] == "gpt-4o-mini-2026-01-01" and r[5] > 0 for r in by_model), by_model

    statuses = db.execute(
        f"SELECT status, count(*) FROM '{out}' WHERE path = '/v1/chat/completions' GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert statuses == [(200, 5), (400, 1), (401, 1), (429, 1), (500, 1), (None, 1)]
    # Which entities were redacted, per record, without parsing `record`.
    emails = db.execute(
        f"SELECT count(*) FROM '{out}' WHERE CAST(redactions->>'$.EMAIL_ADDRESS' AS INTEGER) > 0"
    ).fetchone()
    assert emails[0] >= 1
    events = db.execute(f"SELECT event_type FROM '{out}' WHERE event_type IS NOT NULL").fetchall()
    assert events == [("config",)]
    streamed = db.execute(
        f"SELECT count(*) FROM '{out}' WHERE stream AND record->>'$.response.streamed' = 'true'"
    ).fetchone()
    assert streamed[0] >= 3
    db.execute(
        f"""
        SELECT request_model, record->>'$.gen_ai.request.reasoning_effort' AS effort, count(*)
        FROM '{out}' WHERE schema = 'custody.record/v1' GROUP BY ALL
        """
    ).fetchall()
