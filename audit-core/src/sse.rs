//! A server-sent events parser for captured bodies (WHATWG "event stream" rules:
//! `\n`, `\r\n` or `\r` line ends, `data:` lines joined with `\n`, a blank line ends an event).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Splits a whole captured stream into events. An event cut off by the end of the
/// capture is still returned: a broken stream keeps what it delivered.
pub fn parse(body: &str) -> Vec<SseEvent> {
    let mut events = Vec::new();
    let mut event: Option<String> = None;
    let mut data = String::new();
    let mut has_data = false;
    let mut rest = body;
    loop {
        let (line, next) = match rest.find(['\r', '\n']) {
            Some(i) => {
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                (&rest[..i], Some(&rest[i + skip..]))
            }
            None => (rest, None),
        };
        if line.is_empty() {
            if has_data {
                events.push(SseEvent {
                    event: event.take(),
                    data: std::mem::take(&mut data),
                });
                has_data = false;
            }
            event = None;
        } else if !line.starts_with(':') {
            let (field, value) = match line.find(':') {
                Some(i) => (
                    &line[..i],
                    line[i + 1..].strip_prefix(' ').unwrap_or(&line[i + 1..]),
                ),
                None => (line, ""),
            };
            match field {
                "data" => {
                    if has_data {
                        data.push('\n');
                    }
                    data.push_str(value);
                    has_data = true;
                }
                "event" => event = Some(value.to_owned()),
                _ => {}
            }
        }
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    if has_data {
        events.push(SseEvent { event, data });
    }
    events
}

/// Whether the last event of a captured stream's tail is its protocol-level end:
/// OpenAI's `data: [DONE]`, Anthropic's `message_stop`, a Responses API
/// `response.completed` (or `failed`/`incomplete`). A client that read it has the whole
/// answer, even if it closed before the upstream's own end of body.
pub fn ends_with_terminal_event(tail: &[u8]) -> bool {
    let end = tail
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let body = &tail[..end];
    let start = [&b"\n\n"[..], b"\r\n\r\n", b"\r\r"]
        .iter()
        .filter_map(|sep| memchr::memmem::rfind(body, sep).map(|i| i + sep.len()))
        .max()
        .unwrap_or(0);
    let last = &body[start..];
    let head = &last[..last.len().min(256)];
    let has = |needle: &[u8]| memchr::memmem::find(head, needle).is_some();
    last == b"data: [DONE]"
        || last == b"data:[DONE]"
        || has(b"message_stop")
        || has(b"response.completed")
        || has(b"response.failed")
        || has(b"response.incomplete")
}

#[cfg(test)]
mod terminal_tests {
    #[test]
    fn terminal_events_are_recognized_and_others_not() {
        for end in [
            "data: {\"x\":1}\n\ndata: [DONE]\n\n",
            "event: message_delta\ndata: {}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{}}\n\n",
        ] {
            assert!(super::ends_with_terminal_event(end.as_bytes()), "{end}");
        }
        assert!(!super::ends_with_terminal_event(b"data: {\"x\":1}\n\n"));
        assert!(!super::ends_with_terminal_event(
            b"data: [DONE]\n\ndata: {\"late\":1}\n\n"
        ));
    }

    use super::*;

    #[test]
    fn parses_events_across_line_endings() {
        let evs = parse(
            "event: a\r\ndata: 1\r\ndata:2\r\n\r\n: comment\n\ndata: x\rdata: y\r\rdata: cut",
        );
        assert_eq!(evs.len(), 3);
        assert_eq!(
            evs[0],
            SseEvent {
                event: Some("a".into()),
                data: "1\n2".into()
            }
        );
        assert_eq!(evs[1].data, "x\ny");
        assert_eq!(evs[2].data, "cut");
    }
}
