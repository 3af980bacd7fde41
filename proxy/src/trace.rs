//! W3C Trace Context (`traceparent`, `tracestate`): kept when the client sent a valid
//! one, started otherwise, so that every record joins a distributed trace.

use custody_audit::TraceContext;
use http::{HeaderMap, HeaderName, HeaderValue};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace context of the upstream request. A valid `traceparent` is forwarded as it
/// came; otherwise a new trace is started and sent (and an orphan `tracestate` dropped,
/// as the specification requires).
pub fn propagate(headers: &mut HeaderMap) -> TraceContext {
    if let Some(t) = headers.get(&TRACEPARENT).and_then(|v| parse(v.as_bytes())) {
        return t;
    }
    headers.remove(&TRACESTATE);
    let t = TraceContext {
        trace_id: nonzero(|| fastrand::u128(..)).to_be_bytes(),
        span_id: nonzero(|| fastrand::u64(..)).to_be_bytes(),
        generated: true,
    };
    // `00-{trace}-{span}-01`, written in place: no string formatting per request.
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let hexed = hex::encode_to_slice(t.trace_id, &mut v[3..35])
        .and_then(|()| hex::encode_to_slice(t.span_id, &mut v[36..52]));
    if let (Ok(()), Ok(v)) = (hexed, HeaderValue::from_bytes(&v)) {
        headers.insert(TRACEPARENT, v);
    }
    t
}

fn nonzero<T: PartialEq + Default>(mut f: impl FnMut() -> T) -> T {
    loop {
        let v = f();
        if v != T::default() {
            return v;
        }
    }
}

/// `version-traceid-parentid-flags`: lowercase hex, ids not all zero, version not `ff`;
/// a later version may append fields after a `-`.
fn parse(v: &[u8]) -> Option<TraceContext> {
    if v.len() < 55 || (v.len() > 55 && (v[..2] == *b"00" || v[55] != b'-')) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' || &v[..2] == b"ff" {
        return None;
    }
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex(&v[..2])
        || !lower_hex(&v[3..35])
        || !lower_hex(&v[36..52])
        || !lower_hex(&v[53..55])
    {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    hex::decode_to_slice(&v[3..35], &mut trace_id).ok()?;
    hex::decode_to_slice(&v[36..52], &mut span_id).ok()?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceContext {
        trace_id,
        span_id,
        generated: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_valid_parent_and_replaces_a_bad_one() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, good.parse().unwrap());
        h.insert(TRACESTATE, "congo=t61rcWkgMzE".parse().unwrap());
        let t = propagate(&mut h);
        assert!(!t.generated);
        assert_eq!(hex::encode(t.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h.get(TRACEPARENT).unwrap(), good);
        assert!(h.contains_key(TRACESTATE));

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, bad.parse().unwrap());
            h.insert(TRACESTATE, "a=b".parse().unwrap());
            let t = propagate(&mut h);
            assert!(t.generated, "{bad}");
            let sent = h.get(TRACEPARENT).unwrap().to_str().unwrap();
            assert_eq!(
                parse(sent.as_bytes()),
                Some(TraceContext {
                    generated: false,
                    ..t
                })
            );
            assert!(!h.contains_key(TRACESTATE));
        }
        // A later version with an extra field is accepted.
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz"
                .parse()
                .unwrap(),
        );
        assert!(!propagate(&mut h).generated);
    }
}
