//! The scanners that need no automaton: e-mail addresses around each `@` (memchr), and
//! numbers (cards, SSNs, phones, IBANs, IPv4) from digit runs found eight bytes at a time.

use super::{rules::is_word, validate, EntityId, Span};

/// Which number entities are on (an `Off` entity is not looked for at all).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NumberEntities {
    pub card: Option<EntityId>,
    pub ssn: Option<EntityId>,
    pub phone: Option<EntityId>,
    pub iban: Option<EntityId>,
    pub ip: Option<EntityId>,
}

impl NumberEntities {
    pub fn any(&self) -> bool {
        self.card.is_some()
            || self.ssn.is_some()
            || self.phone.is_some()
            || self.iban.is_some()
            || self.ip.is_some()
    }
}

// === e-mail ===

pub(crate) fn emails(b: &[u8], entity: EntityId, out: &mut Vec<Span>) {
    let mut after = 0;
    for at in memchr::memchr_iter(b'@', b) {
        if at < after {
            continue;
        }
        if let Some((start, end)) = email_at(b, at) {
            out.push(Span { start, end, entity });
            after = end;
        }
    }
}

fn email_at(b: &[u8], at: usize) -> Option<(usize, usize)> {
    // Non-ASCII bytes count as local-part characters (RFC 6531 addresses); the scan
    // still stops on an ASCII byte, so the start stays on a character boundary.
    let local_char = |c: u8| c.is_ascii_alphanumeric() || c >= 0x80 || b"._%+-'".contains(&c);
    let domain_char = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
    let mut start = at;
    while start > 0 && local_char(b[start - 1]) && at - start < 64 {
        start -= 1;
    }
    // The length cap can stop inside a multi-byte character: move to its end.
    while start < at && b[start] & 0xC0 == 0x80 {
        start += 1;
    }
    while start < at && matches!(b[start], b'.' | b'\'' | b'-' | b'+') {
        start += 1;
    }
    let local = &b[start..at];
    if local.is_empty() || local.ends_with(b".") || local.windows(2).any(|w| w == b"..") {
        return None;
    }
    let mut end = at + 1;
    while end < b.len() && domain_char(b[end]) && end - at <= 253 {
        end += 1;
    }
    while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &b[at + 1..end];
    let mut labels = 0;
    let mut last: &[u8] = &[];
    for l in domain.split(|&c| c == b'.') {
        if l.is_empty() || l.len() > 63 || l.starts_with(b"-") || l.ends_with(b"-") {
            return None;
        }
        labels += 1;
        last = l;
    }
    let tld_ok = (2..=24).contains(&last.len()) && last.iter().all(u8::is_ascii_alphabetic);
    (labels >= 2 && tld_ok).then_some((start, end))
}

// === numbers ===

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The high bit of each of the eight bytes that is an ASCII digit (bytes >= 0x80 never
/// count). Exact per byte: no carry or borrow crosses bytes.
#[inline]
fn digit_mask(x: u64) -> u64 {
    let t = x & (LO * 0x7f);
    (LO * (0x7f + b'9' as u64 + 1)).wrapping_sub(t)
        & !x
        & (t + LO * (0x7f - (b'0' as u64 - 1)))
        & HI
}

#[inline]
fn word_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// Words before an unseparated number that make it an identifier, not a card.
const NOT_A_CARD: &[&[u8]] = &[
    b"order",
    b"invoice",
    b"tracking",
    b"shipment",
    b"ticket",
    b"ref",
    b"ean",
    b"isbn",
    b"sku",
    b"upc",
    b"gtin",
    b"serial",
    b"barcode",
];

/// Words before a bare nine-digit number that make it an SSN.
const SSN_CONTEXT: &[&[u8]] = &[b"ssn", b"social security"];

const MAX_GROUPS: usize = 12;
const MAX_DIGITS: usize = 24;

/// A run of digit groups and what separates them.
struct Token {
    /// `(start, end)` of each digit group.
    groups: [(usize, usize); MAX_GROUPS],
    /// The separator bytes between group k and k+1 (one or two bytes).
    seps: [[u8; 2]; MAX_GROUPS],
    n: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lead {
    None,
    Plus,
    Paren,
}

pub(crate) fn numbers(b: &[u8], ents: &NumberEntities, out: &mut Vec<Span>) {
    let n = b.len();
    let mut i = 0;
    while i < n {
        if i + 8 <= n {
            let m = digit_mask(word_at(b, i));
            if m == 0 {
                i += 8;
                continue;
            }
            // Straight to the first digit in these eight bytes (little-endian order).
            i += (m.trailing_zeros() / 8) as usize;
        }
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        if i > 0 && is_word(b[i - 1]) && !iban_lead(b, i) {
            // Digits inside a word (hex digests, ids, versions like v2): skip the word.
            while i < n && is_word(b[i]) {
                i += 1;
            }
            continue;
        }
        i = token(b, i, ents, out).max(i + 1);
    }
}

/// Two capital letters right before `d`, at the start of a word: an IBAN's country code.
fn iban_lead(b: &[u8], d: usize) -> bool {
    d >= 2
        && b[d - 2].is_ascii_uppercase()
        && b[d - 1].is_ascii_uppercase()
        && (d == 2 || !is_word(b[d - 3]))
}

/// Examines the number starting at digit `d`; returns where scanning resumes.
fn token(b: &[u8], d: usize, ents: &NumberEntities, out: &mut Vec<Span>) -> usize {
    if iban_lead(b, d) {
        if let Some(id) = ents.iban {
            if let Some(end) = iban(b, d - 2) {
                out.push(Span {
                    start: d - 2,
                    end,
                    entity: id,
                });
                return end;
            }
        }
        return (d..b.len()).find(|&i| !is_word(b[i])).unwrap_or(b.len());
    }
    let (start, lead) = match d.checked_sub(1).map(|p| b[p]) {
        Some(b'+') => (d - 1, Lead::Plus),
        Some(b'(') => (d - 1, Lead::Paren),
        _ => (d, Lead::None),
    };
    // `x-123`, `a.5`, `a+1`: the number continues a word.
    if start > 0 && is_word(b[start - 1]) {
        return d + 1;
    }
    if start >= 2 && matches!(b[start - 1], b'-' | b'.') && is_word(b[start - 2]) {
        return skip_number(b, d);
    }
    // Fast path for the common case, a short number on its own ("12", "2026", "3.5"):
    // nothing is shorter than 8 digits unless it has separators (IPv4 has at least 3).
    let mut g_end = d;
    while g_end < b.len() && b[g_end].is_ascii_digit() {
        g_end += 1;
    }
    let separated = g_end + 1 < b.len()
        && matches!(b[g_end], b' ' | b'-' | b'.' | b'(' | b')' | b'/')
        && (b[g_end + 1].is_ascii_digit() || b.get(g_end + 2).is_some_and(u8::is_ascii_digit));
    if !separated && g_end - d < 8 {
        return g_end;
    }
    let mut t = Token {
        groups: [(0, 0); MAX_GROUPS],
        seps: [[0; 2]; MAX_GROUPS],
        n: 0,
    };
    let mut pos = d;
    let mut digits = 0;
    loop {
        let gs = pos;
        while pos < b.len() && b[pos].is_ascii_digit() {
            pos += 1;
        }
        digits += pos - gs;
        if t.n == MAX_GROUPS || digits > MAX_DIGITS {
            // Too long to be any entity: skip it whole.
            return skip_number(b, pos);
        }
        t.groups[t.n] = (gs, pos);
        let mut q = pos;
        while q < b.len() && q - pos < 2 && matches!(b[q], b' ' | b'-' | b'.' | b'(' | b')' | b'/')
        {
            q += 1;
        }
        if q > pos && q < b.len() && b[q].is_ascii_digit() {
            t.seps[t.n] = [b[pos], if q - pos == 2 { b[pos + 1] } else { 0 }];
            t.n += 1;
            pos = q;
        } else {
            t.n += 1;
            break;
        }
    }
    let token_end = t.groups[t.n - 1].1;
    // Longest first; a shorter prefix only where it ends at a space or slash
    // (`<card> 12/25`), never inside a dotted or dashed run (`10.0.0.1.5`, `123-45-6789-0`).
    for k in (0..t.n).rev() {
        let end = t.groups[k].1;
        if end < b.len() && is_word(b[end]) {
            continue;
        }
        if k + 1 < t.n && !matches!(t.seps[k], [b' ', 0] | [b'/', 0]) {
            continue;
        }
        if let Some((s, id)) = classify(b, &t, k + 1, start, lead, ents) {
            out.push(Span {
                start: s,
                end,
                entity: id,
            });
            return end;
        }
    }
    token_end
}

/// The end of a number glued to a word or too long to be anything (`v1.2.3-4`); a
/// space ends it, so the next number is still looked at.
fn skip_number(b: &[u8], from: usize) -> usize {
    (from..b.len())
        .find(|&i| {
            !(is_word(b[i])
                || matches!(b[i], b'-' | b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        })
        .unwrap_or(b.len())
}

/// Decides what the first `ng` groups of `t` are, if anything; returns the span start.
fn classify(
    b: &[u8],
    t: &Token,
    ng: usize,
    start: usize,
    lead: Lead,
    ents: &NumberEntities,
) -> Option<(usize, EntityId)> {
    let groups = &t.groups[..ng];
    let seps = &t.seps[..ng - 1];
    let mut d = [0u8; MAX_DIGITS];
    let mut nd = 0;
    for &(s, e) in groups {
        for &c in &b[s..e] {
            d[nd] = c - b'0';
            nd += 1;
        }
    }
    let d = &d[..nd];
    let lens = |want: &[usize]| {
        groups.len() == want.len() && groups.iter().zip(want).all(|(g, w)| g.1 - g.0 == *w)
    };
    let one_kind = |allowed: &[u8]| {
        seps.first()
            .is_none_or(|f| f[1] == 0 && allowed.contains(&f[0]) && seps.iter().all(|s| s == f))
    };
    let first_digit = groups[0].0;

    if lead == Lead::Plus {
        let id = ents.phone?;
        let seps_ok = seps.iter().all(|s| {
            s.iter()
                .all(|&c| matches!(c, 0 | b' ' | b'-' | b'.' | b'(' | b')'))
        });
        let nanp_ok = d[0] != 1 || (nd == 11 && validate::nanp(&d[1..]));
        return ((8..=15).contains(&nd) && d[0] != 0 && seps_ok && nanp_ok).then_some((start, id));
    }
    if lead == Lead::Paren {
        // (415) 555-2671
        let id = ents.phone?;
        let close = matches!(seps.first(), Some([b')', 0]) | Some([b')', b' ']));
        let rest_ok = seps
            .get(1)
            .is_some_and(|s| matches!(s, [b'-', 0] | [b'.', 0] | [b' ', 0]));
        return (lens(&[3, 3, 4]) && close && rest_ok && validate::nanp(d)).then_some((start, id));
    }
    if let Some(id) = ents.card {
        let grouped = ng == 1 || (one_kind(b" -") && groups.iter().all(|g| g.1 - g.0 >= 3));
        if grouped && validate::card(d) && (ng > 1 || !context_before(b, first_digit, NOT_A_CARD)) {
            return Some((first_digit, id));
        }
    }
    if let Some(id) = ents.ssn {
        let dashed = lens(&[3, 2, 4]) && one_kind(b"- ");
        let bare = ng == 1 && nd == 9 && context_before(b, first_digit, SSN_CONTEXT);
        if (dashed || bare) && validate::ssn(d) {
            return Some((first_digit, id));
        }
    }
    if let Some(id) = ents.ip {
        let end = groups[ng - 1].1;
        let dotted = ng == 4 && one_kind(b".");
        let octets_ok = groups.iter().all(|&(s, e)| {
            let g = &b[s..e];
            g.len() <= 3
                && (g.len() == 1 || g[0] != b'0')
                && g.iter().fold(0u32, |v, &c| v * 10 + u32::from(c - b'0')) <= 255
        });
        let continues = b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(u8::is_ascii_digit);
        if dotted && octets_ok && !continues {
            return Some((first_digit, id));
        }
    }
    if let Some(id) = ents.phone {
        let nanp = (lens(&[3, 3, 4]) && one_kind(b"-. ") && validate::nanp(d))
            || (lens(&[1, 3, 3, 4]) && d[0] == 1 && one_kind(b"-. ") && validate::nanp(&d[1..]));
        let national = (10..=11).contains(&nd)
            && d[0] == 0
            && d[1] != 0
            && ng >= 2
            && one_kind(b" -")
            && groups.iter().all(|g| g.1 - g.0 >= 2);
        if nanp || national {
            return Some((first_digit, id));
        }
    }
    None
}

/// Whether one of `words` (lowercase) appears in the 32 bytes before `at`.
fn context_before(b: &[u8], at: usize, words: &[&[u8]]) -> bool {
    let from = at.saturating_sub(32);
    let window = b[from..at].to_ascii_lowercase();
    words
        .iter()
        .any(|w| memchr::memmem::find(&window, w).is_some())
}

/// An IBAN starting at `s` (country code), optionally in groups of four separated by
/// single spaces; returns its end.
fn iban(b: &[u8], s: usize) -> Option<usize> {
    let mut compact = [0u8; 34];
    let mut n = 0;
    let mut i = s;
    let mut end = s;
    while i < b.len() && n < 34 {
        let c = b[i];
        if c.is_ascii_digit() || c.is_ascii_uppercase() {
            compact[n] = c;
            n += 1;
            i += 1;
            end = i;
        } else if c == b' '
            && n % 4 == 0
            && b.get(i + 1)
                .is_some_and(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        {
            i += 1;
        } else {
            break;
        }
    }
    if end < b.len() && is_word(b[end]) {
        return None;
    }
    // The registry length decides where a spaced IBAN ends.
    for len in (15..=n).rev() {
        if validate::iban(&compact[..len]) {
            let mut count = 0;
            let mut j = s;
            while count < len {
                if b[j] != b' ' {
                    count += 1;
                }
                j += 1;
            }
            if j < b.len() && is_word(b[j]) {
                return None;
            }
            return Some(j);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swar_digit_test_matches_the_byte_test() {
        for x in 0u8..=255 {
            let w = u64::from_le_bytes([b'a', x, b'z', 0xff, 0x80, b' ', b'/', b':']);
            assert_eq!(digit_mask(w) != 0, x.is_ascii_digit(), "byte {x}");
            assert_eq!(
                digit_mask(w),
                if x.is_ascii_digit() { 0x80 << 8 } else { 0 }
            );
        }
    }
}
