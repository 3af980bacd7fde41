//! Body commitments: how a record's request and response bodies can be removed later
//! (content retention, a data subject's request) while its chain hash still holds.
//!
//! A record written with commitments declares where its bodies lie, in its chain:
//! `"chain":{...,"bodies":[o1,n1,o2,n2],"prev":"P","hash":"H"}}`: a member `"body":V`
//! starts at byte `o` of the line as written, and `V` is `n` bytes long. The chain hash
//! is taken over the line in which each declared member is replaced by its *purged
//! form* `"body_sha256":"<hex SHA-256 of V>"` (and `H` by zeros). Purging writes that
//! form into the line: the hash does not change, and verify finds either form by
//! position, without parsing JSON. A line without `bodies` (written before commitments)
//! is hashed whole, as it always was.

use std::io::Write as _;

use sha2::{Digest, Sha256};

const BODY_KEY: &[u8] = b"\"body\":";
const PURGED_KEY: &[u8] = b"\"body_sha256\":\"";
/// `"body_sha256":"<64 hex>"`
const PURGED_LEN: usize = PURGED_KEY.len() + 64 + 1;
const BODIES_KEY: &[u8] = b"\"bodies\":[";
const PREV_KEY: &[u8] = b"\"prev\":\"";
/// From `"prev":"` to the hash digits: `"prev":"<64>","hash":"`.
const PREV_TO_HASH: usize = PREV_KEY.len() + 64 + 10;
/// The longest declaration read back: four offsets and lengths of 20 digits.
const MAX_DECLARATION: usize = 4 * 21;

/// What hashing a line found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashed {
    pub digest: [u8; 32],
    /// Declared bodies still present, and in their purged form.
    pub present: u32,
    pub purged: u32,
}

/// One declared body, in the line as it now is.
#[derive(Debug, Clone, Copy)]
struct Member {
    at: usize,
    /// Length of the member as it now is (`"body":V`, or the purged form).
    len: usize,
    purged: bool,
}

/// Declared bodies: (offset of `"body":` in the line as written, length of the value).
type Spans = Vec<(usize, usize)>;

/// Where the declaration starts (`"bodies":[`) and its spans, if the line has one.
/// `hash_at` is where the 64 hash digits start.
fn declared(line: &[u8], hash_at: usize) -> Result<Option<(usize, Spans)>, &'static str> {
    let Some(prev_at) = hash_at.checked_sub(PREV_TO_HASH) else {
        return Ok(None);
    };
    if line.get(prev_at..prev_at + PREV_KEY.len()) != Some(PREV_KEY)
        || prev_at < 2
        || line[prev_at - 1] != b','
        || line[prev_at - 2] != b']'
    {
        return Ok(None);
    }
    let close = prev_at - 2;
    let from = close.saturating_sub(MAX_DECLARATION + 1);
    let open = line[from..close]
        .iter()
        .rposition(|&b| b == b'[')
        .map(|i| from + i)
        .ok_or("chain.bodies is malformed")?;
    let start = (open + 1)
        .checked_sub(BODIES_KEY.len())
        .filter(|&s| &line[s..=open] == BODIES_KEY)
        .ok_or("chain.bodies is malformed")?;
    let mut numbers = Vec::with_capacity(4);
    for n in line[open + 1..close].split(|&b| b == b',') {
        if n.is_empty() || n.len() > 20 || !n.iter().all(u8::is_ascii_digit) {
            return Err("chain.bodies is malformed");
        }
        let v: usize = std::str::from_utf8(n)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("chain.bodies is malformed")?;
        numbers.push(v);
    }
    if numbers.len() % 2 != 0 || numbers.len() > 4 {
        return Err("chain.bodies is malformed");
    }
    let spans = numbers.chunks(2).map(|c| (c[0], c[1])).collect();
    Ok(Some((start, spans)))
}

/// The declared members as they now stand in the line: each found by its offset in the
/// line as written, shifted by the purges before it.
fn members(
    line: &[u8],
    decl_at: usize,
    spans: &[(usize, usize)],
) -> Result<Vec<Member>, &'static str> {
    let mut out = Vec::with_capacity(spans.len());
    let (mut shift, mut last) = (0isize, 0usize);
    for &(offset, n) in spans {
        // A declaration is read from a trail that may be edited: no length or offset
        // past the line, so nothing below can overflow.
        if n > line.len() || offset > line.len() {
            return Err("chain.bodies does not match the record");
        }
        let at = offset
            .checked_add_signed(shift)
            .filter(|&a| a >= last)
            .ok_or("chain.bodies does not match the record")?;
        let rest = &line[at.min(decl_at)..decl_at];
        let member = if rest.starts_with(BODY_KEY) {
            let len = BODY_KEY.len() + n;
            Member {
                at,
                len,
                purged: false,
            }
        } else if rest.starts_with(PURGED_KEY) {
            shift += PURGED_LEN as isize - (BODY_KEY.len() + n) as isize;
            Member {
                at,
                len: PURGED_LEN,
                purged: true,
            }
        } else {
            return Err("chain.bodies does not point at a body (content was altered)");
        };
        // The member must end inside its object, before the declaration.
        let end = member.at + member.len;
        if end >= decl_at || !matches!(line[end], b',' | b'}') {
            return Err("chain.bodies does not match the record");
        }
        if member.purged && line[end - 1] != b'"' {
            return Err("a purged body is malformed");
        }
        last = end;
        out.push(member);
    }
    Ok(out)
}

/// The chain hash of a line (its hash digits, at `hash_at`, taken as zeros).
pub(crate) fn line_digest(line: &[u8], hash_at: usize) -> Result<Hashed, &'static str> {
    const ZEROS: &[u8; 64] = &[b'0'; 64];
    let mut h = Sha256::new();
    let mut out = Hashed {
        digest: [0; 32],
        present: 0,
        purged: 0,
    };
    let mut from = 0;
    if let Some((decl_at, spans)) = declared(line, hash_at)? {
        for m in members(line, decl_at, &spans)? {
            if m.purged {
                out.purged += 1;
                continue;
            }
            out.present += 1;
            h.update(&line[from..m.at]);
            h.update(PURGED_KEY);
            let mut body_hex = [0u8; 64];
            let body = Sha256::digest(&line[m.at + BODY_KEY.len()..m.at + m.len]);
            // 32 bytes always fit 64 hex digits.
            let _ = hex::encode_to_slice(body, &mut body_hex);
            h.update(body_hex);
            h.update(b"\"");
            from = m.at + m.len;
        }
    }
    h.update(&line[from..hash_at]);
    h.update(ZEROS);
    h.update(&line[hash_at + 64..]);
    out.digest = h.finalize().into();
    Ok(out)
}

/// Writes `"bodies":[...],` into a line whose chain ends in `"prev":"P","hash":"H"}}`:
/// `spans` are (offset of `"body":`, length of the value) in the line as it is. The
/// spans lie before the chain, so inserting the declaration moves none of them. `false`
/// (and the line untouched) when a span does not hold a body member.
pub(crate) fn declare(line: &mut Vec<u8>, hash_at: usize, spans: &[(usize, usize)]) -> bool {
    let Some(prev_at) = hash_at.checked_sub(PREV_TO_HASH) else {
        return false;
    };
    if spans.is_empty()
        || spans.len() > 2
        || line.get(prev_at..prev_at + PREV_KEY.len()) != Some(PREV_KEY)
    {
        return false;
    }
    // The declaration goes in at `prev_at`, after every body: their offsets hold as
    // they are, so the line is checked before it is changed.
    if !members(line, prev_at, spans).is_ok_and(|m| m.iter().all(|m| !m.purged)) {
        return false;
    }
    let mut decl = Vec::with_capacity(BODIES_KEY.len() + MAX_DECLARATION + 2);
    decl.extend_from_slice(BODIES_KEY);
    for (i, (o, n)) in spans.iter().enumerate() {
        if i > 0 {
            decl.push(b',');
        }
        let _ = write!(decl, "{o},{n}");
    }
    decl.extend_from_slice(b"],");
    line.splice(prev_at..prev_at, decl);
    true
}

/// The line with every declared body still present replaced by its purged form; `None`
/// when there is nothing to purge (no declaration, or all purged already).
pub(crate) fn purge(line: &[u8], hash_at: usize) -> Result<Option<Vec<u8>>, &'static str> {
    let Some((decl_at, spans)) = declared(line, hash_at)? else {
        return Ok(None);
    };
    let members = members(line, decl_at, &spans)?;
    if members.iter().all(|m| m.purged) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(line.len());
    let mut from = 0;
    for m in members.iter().filter(|m| !m.purged) {
        out.extend_from_slice(&line[from..m.at]);
        out.extend_from_slice(PURGED_KEY);
        let value = &line[m.at + BODY_KEY.len()..m.at + m.len];
        out.extend_from_slice(hex::encode(Sha256::digest(value)).as_bytes());
        out.push(b'"');
        from = m.at + m.len;
    }
    out.extend_from_slice(&line[from..]);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use crate::segment::{check_line, declare_bodies, purge_line, seal_line};

    const Z: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_forged_declaration_is_an_error_not_a_panic() {
        for decl in [
            "[20,18446744073709551615]",
            "[20,18446744073709551600]",
            "[7,18446744073709551615]",
            "[18446744073709551615,3]",
            "[9,3,1,18446744073709551615]",
            "[0,0]",
            "[99999,1]",
        ] {
            let line = format!(
                "{{\"seq\":1,\"request\":{{\"body\":{{}}}},\"chain\":{{\"bodies\":{decl},\"prev\":\"{Z}\",\"hash\":\"{Z}\"}}}}"
            );
            assert!(check_line(line.as_bytes()).is_err(), "{decl}");
            assert!(purge_line(line.as_bytes()).is_err(), "{decl}");
        }
    }

    /// A line as the writer makes it: bodies declared, then sealed.
    fn written(req: &str, resp: &str) -> Vec<u8> {
        let mut line = format!(
            "{{\"seq\":1,\"request\":{{\"body\":{req},\"content_type\":\"application/json\"}},\"response\":{{\"body\":{resp}}},\"chain\":{{\"prev\":\"{Z}\",\"hash\":\"{Z}\"}}}}"
        )
        .into_bytes();
        let text = String::from_utf8(line.clone()).unwrap();
        let a = text.find("\"body\":").unwrap();
        let b = text[a + 7 + req.len()..].find("\"body\":").unwrap() + a + 7 + req.len();
        assert!(declare_bodies(
            &mut line,
            &[(a, req.len()), (b, resp.len())]
        ));
        seal_line(&mut line).unwrap();
        line
    }

    #[test]
    fn a_purged_line_keeps_its_hash_and_any_other_change_breaks_it() {
        // A short body grows when purged, a long one shrinks: both keep the hash.
        let line = written(
            r#"{"messages":[{"content":"alice@example.com"}]}"#,
            r#""ok""#,
        );
        let (hash, found) = check_line(&line).unwrap();
        assert_eq!((found.present, found.purged), (2, 0));
        let purged = purge_line(&line).unwrap().unwrap();
        let text = String::from_utf8(purged.clone()).unwrap();
        assert!(
            !text.contains("alice") && !text.contains("\"ok\""),
            "{text}"
        );
        assert_eq!(text.matches("\"body_sha256\":\"").count(), 2);
        let (again, found) = check_line(&purged).unwrap();
        assert_eq!((again, found.present, found.purged), (hash, 0, 2));
        // Nothing left to purge.
        assert_eq!(purge_line(&purged).unwrap(), None);

        // A changed body, a changed digest in the purged form, a changed declaration.
        let edited = String::from_utf8(line.clone())
            .unwrap()
            .replace("alice", "alicx");
        assert!(check_line(edited.as_bytes()).is_err());
        let at = text.find("\"body_sha256\":\"").unwrap() + 15;
        let mut forged = purged.clone();
        forged[at] = if forged[at] == b'a' { b'b' } else { b'a' };
        assert!(check_line(&forged).is_err());
        let moved =
            String::from_utf8(line.clone())
                .unwrap()
                .replacen("\"bodies\":[", "\"bodies\":[1", 1);
        assert!(check_line(moved.as_bytes()).is_err());
    }

    #[test]
    fn one_body_purged_by_hand_is_seen_and_a_line_without_bodies_hashes_whole() {
        let line = written(r#"{"a":1}"#, r#"{"b":[1,2,3]}"#);
        let text = String::from_utf8(line.clone()).unwrap();
        // Only the response purged: the request is found after the shift.
        let resp = r#"{"b":[1,2,3]}"#;
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(resp.as_bytes()));
        let half = text.replacen(
            &format!("\"body\":{resp}"),
            &format!("\"body_sha256\":\"{digest}\""),
            1,
        );
        let (_, found) = check_line(half.as_bytes()).unwrap();
        assert_eq!((found.present, found.purged), (1, 1));

        let mut plain =
            format!("{{\"seq\":1,\"chain\":{{\"prev\":\"{Z}\",\"hash\":\"{Z}\"}}}}").into_bytes();
        seal_line(&mut plain).unwrap();
        let (_, found) = check_line(&plain).unwrap();
        assert_eq!((found.present, found.purged), (0, 0));
        assert_eq!(purge_line(&plain).unwrap(), None);
        // A declaration that does not point at bodies is refused when it is written.
        let mut wrong =
            format!("{{\"seq\":1,\"chain\":{{\"prev\":\"{Z}\",\"hash\":\"{Z}\"}}}}").into_bytes();
        assert!(!declare_bodies(&mut wrong, &[(1, 3)]));
    }
}
