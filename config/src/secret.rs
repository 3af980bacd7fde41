//! Keeping operator secrets out of what custody prints and records: a TOML error names
//! the line and column but never echoes the text there, and a URL's password is shown
//! only as `***`.

use std::borrow::Cow;

/// The password of `scheme://user:password@host...`, if the URL has one.
pub fn url_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    userinfo.split_once(':').map(|(_, p)| p)
}

/// `url` with its password replaced by `***`.
pub fn mask_url(url: &str) -> Cow<'_, str> {
    match url_password(url) {
        Some(p) => {
            let start = p.as_ptr() as usize - url.as_ptr() as usize;
            Cow::Owned(format!("{}***{}", &url[..start], &url[start + p.len()..]))
        }
        None => Cow::Borrowed(url),
    }
}

/// A TOML error as `line L, column C: message`, with every quoted value in the message
/// replaced: the parser's own text quotes the offending line and serde quotes the value,
/// and either may be a pasted token.
pub fn parse_message(e: &toml::de::Error, text: &str) -> String {
    let at = e.span().map(|s| {
        let before = &text[..s.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    let mut out = at.unwrap_or_default();
    let mut quoted = false;
    for c in e.message().trim_end().chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_and_masked() {
        assert_eq!(url_password("https://u:p4ss@h:1/x"), Some("p4ss"));
        assert_eq!(url_password("abfss://fs@acct.dfs.core.windows.net/"), None);
        assert_eq!(url_password("s3://bucket/a@b:c"), None);
        assert_eq!(mask_url("http://u:p4ss@h/x"), "http://u:***@h/x");
        assert_eq!(mask_url("http://h/x"), "http://h/x");
    }
}
