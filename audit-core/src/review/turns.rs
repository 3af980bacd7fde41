//! A record's conversation as a reviewer reads it: the turns of its request (system,
//! user, assistant, tool calls and results) and of its answer, whatever the provider's
//! shape (OpenAI chat and Responses, Anthropic messages, Gemini contents, completions).
//! Read from the stored (redacted) bodies; a shape not recognised is shown as its JSON.

use serde_json::Value;

/// One turn: who spoke and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// `system`, `user`, `assistant`, `tool` (a tool's result), or as the body says.
    pub role: String,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// A tool the model called, with its arguments as JSON text.
    ToolCall {
        name: String,
        arguments: String,
    },
    /// What a tool returned; `of` names the call (its id or the tool's name).
    ToolResult {
        of: String,
        content: String,
    },
    /// A reasoning summary or thinking block.
    Reasoning(String),
    /// Anything else (an image, a file, an unknown part), as its JSON.
    Other(String),
}

/// The turns of a request body: instructions first, then the messages in order.
pub fn of_request(body: &Value) -> Vec<Turn> {
    let mut out = Vec::new();
    // Anthropic `system`, Responses `instructions`, Gemini `systemInstruction`.
    for key in ["system", "instructions"] {
        if let Some(s) = body.get(key).filter(|s| !s.is_null()) {
            out.push(turn("system", parts(s)));
        }
    }
    if let Some(s) = body.get("systemInstruction") {
        out.push(turn("system", gemini_parts(s.get("parts"))));
    }
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        out.extend(messages.iter().map(message));
    } else if let Some(contents) = body.get("contents").and_then(Value::as_array) {
        out.extend(contents.iter().map(|c| gemini(c, "user")));
    } else if let Some(input) = body.get("input") {
        match input {
            Value::Array(items) => out.extend(items.iter().map(responses_item)),
            other => out.push(turn("user", parts(other))),
        }
    } else if let Some(prompt) = body.get("prompt") {
        out.push(turn("user", parts(prompt)));
    }
    out
}

/// The turns of a response body (every choice or candidate, in order).
pub fn of_response(body: &Value) -> Vec<Turn> {
    if let Some(choices) = body.get("choices").and_then(Value::as_array) {
        return choices
            .iter()
            .map(|c| match c.get("message").or_else(|| c.get("delta")) {
                Some(m) => message(m),
                None => turn("assistant", parts(c.get("text").unwrap_or(&Value::Null))),
            })
            .collect();
    }
    if let Some(candidates) = body.get("candidates").and_then(Value::as_array) {
        return candidates
            .iter()
            .filter_map(|c| c.get("content"))
            .map(|c| gemini(c, "model"))
            .collect();
    }
    if let Some(output) = body.get("output").and_then(Value::as_array) {
        return output.iter().map(responses_item).collect();
    }
    if body.get("content").is_some_and(Value::is_array) {
        return vec![message(body)];
    }
    Vec::new()
}

fn turn(role: &str, parts: Vec<Part>) -> Turn {
    Turn {
        role: role.to_owned(),
        parts,
    }
}

fn str_of(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// An OpenAI or Anthropic message.
fn message(m: &Value) -> Turn {
    let role = m.get("role").and_then(Value::as_str).unwrap_or("assistant");
    let mut ps = parts(m.get("content").unwrap_or(&Value::Null));
    if let Some(r) = m.get("reasoning_content").and_then(Value::as_str) {
        ps.insert(0, Part::Reasoning(r.to_owned()));
    }
    for call in m
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let f = call.get("function").unwrap_or(call);
        ps.push(Part::ToolCall {
            name: str_of(f.get("name")),
            arguments: str_of(f.get("arguments")),
        });
    }
    // An OpenAI tool result is a message of its own.
    if role == "tool" {
        let of = str_of(m.get("tool_call_id").or_else(|| m.get("name")));
        let content = ps
            .drain(..)
            .map(|p| match p {
                Part::Text(t) | Part::Other(t) => t,
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n");
        return turn("tool", vec![Part::ToolResult { of, content }]);
    }
    turn(role, ps)
}

/// Content as parts: a string, or a list of typed parts.
fn parts(content: &Value) -> Vec<Part> {
    match content {
        Value::Null => Vec::new(),
        Value::String(s) => vec![Part::Text(s.clone())],
        Value::Array(items) => items.iter().map(part).collect(),
        other => vec![Part::Other(other.to_string())],
    }
}

fn part(p: &Value) -> Part {
    let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" | "input_text" | "output_text" => Part::Text(str_of(p.get("text"))),
        "thinking" => Part::Reasoning(str_of(p.get("thinking"))),
        "tool_use" | "server_tool_use" => Part::ToolCall {
            name: str_of(p.get("name")),
            arguments: str_of(p.get("input")),
        },
        "tool_result" => Part::ToolResult {
            of: str_of(p.get("tool_use_id")),
            content: text_of_content(p.get("content")),
        },
        _ => match p {
            Value::String(s) => Part::Text(s.clone()),
            other => Part::Other(other.to_string()),
        },
    }
}

/// A tool result's content: a string, or text parts joined.
fn text_of_content(v: Option<&Value>) -> String {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match part(i) {
                Part::Text(t) | Part::Other(t) => t,
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        other => str_of(other),
    }
}

/// A Gemini content (`role` and `parts`).
fn gemini(c: &Value, default_role: &str) -> Turn {
    let role = c
        .get("role")
        .and_then(Value::as_str)
        .unwrap_or(default_role);
    let role = if role == "model" { "assistant" } else { role };
    turn(role, gemini_parts(c.get("parts")))
}

fn gemini_parts(v: Option<&Value>) -> Vec<Part> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            if let Some(t) = p.get("text") {
                if p.get("thought").and_then(Value::as_bool) == Some(true) {
                    return Part::Reasoning(str_of(Some(t)));
                }
                return Part::Text(str_of(Some(t)));
            }
            if let Some(f) = p.get("functionCall") {
                return Part::ToolCall {
                    name: str_of(f.get("name")),
                    arguments: str_of(f.get("args")),
                };
            }
            if let Some(f) = p.get("functionResponse") {
                return Part::ToolResult {
                    of: str_of(f.get("name")),
                    content: str_of(f.get("response")),
                };
            }
            Part::Other(p.to_string())
        })
        .collect()
}

/// A Responses API input or output item.
fn responses_item(i: &Value) -> Turn {
    match i.get("type").and_then(Value::as_str) {
        Some("function_call") => turn(
            "assistant",
            vec![Part::ToolCall {
                name: str_of(i.get("name")),
                arguments: str_of(i.get("arguments")),
            }],
        ),
        Some("function_call_output") => turn(
            "tool",
            vec![Part::ToolResult {
                of: str_of(i.get("call_id")),
                content: str_of(i.get("output")),
            }],
        ),
        Some("reasoning") => turn(
            "assistant",
            i.get("summary")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|s| Part::Reasoning(str_of(s.get("text"))))
                .collect(),
        ),
        _ if i.get("role").is_some() => message(i),
        _ => turn("item", vec![Part::Other(i.to_string())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(t: &str) -> Part {
        Part::Text(t.into())
    }

    #[test]
    fn openai_chat_with_tools_reads_as_turns() {
        let req = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "weather?"}, {"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]});
        let t = of_request(&req);
        assert_eq!(t.len(), 4);
        assert_eq!(t[0], turn("system", vec![text("be brief")]));
        assert_eq!(t[1].parts[0], text("weather?"));
        assert!(matches!(&t[1].parts[1], Part::Other(o) if o.contains("image_url")));
        assert_eq!(
            t[2].parts,
            vec![Part::ToolCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into()
            }]
        );
        assert_eq!(
            t[3],
            turn(
                "tool",
                vec![Part::ToolResult {
                    of: "c1".into(),
                    content: "sunny".into()
                }]
            )
        );
        let resp =
            json!({"choices": [{"message": {"role": "assistant", "content": "It is sunny."}}]});
        assert_eq!(
            of_response(&resp),
            vec![turn("assistant", vec![text("It is sunny.")])]
        );
    }

    #[test]
    fn anthropic_gemini_and_responses_shapes() {
        let req = json!({"system": "sys", "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]}]}]});
        let t = of_request(&req);
        assert_eq!(t[0], turn("system", vec![text("sys")]));
        assert_eq!(
            t[1].parts,
            vec![Part::ToolResult {
                of: "t1".into(),
                content: "42".into()
            }]
        );
        let resp = json!({"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}, {"type": "tool_use", "name": "calc", "input": {"x": 1}}]});
        assert_eq!(
            of_response(&resp)[0].parts,
            vec![
                Part::Reasoning("hm".into()),
                Part::ToolCall {
                    name: "calc".into(),
                    arguments: "{\"x\":1}".into()
                }
            ]
        );
        let gem = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
        assert_eq!(of_request(&gem), vec![turn("user", vec![text("hi")])]);
        let gem =
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "hello"}]}}]});
        assert_eq!(
            of_response(&gem),
            vec![turn("assistant", vec![text("hello")])]
        );
        let r = json!({"instructions": "x", "input": "question"});
        assert_eq!(of_request(&r)[1], turn("user", vec![text("question")]));
        let r = json!({"output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "answer"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"}]});
        let t = of_response(&r);
        assert_eq!(t[0].parts, vec![text("answer")]);
        assert!(matches!(&t[1].parts[0], Part::ToolCall { name, .. } if name == "f"));
        assert!(of_response(&json!("plain text")).is_empty());
    }
}
