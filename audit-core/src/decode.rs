//! Undoing `Content-Encoding` on captured bodies, before anything parses them.

use std::{borrow::Cow, io::Read};

use http::HeaderMap;

/// Why a body could not be decoded; the record keeps its length and says so.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported content-encoding `{0}`")]
    Unsupported(String),
    #[error("{encoding} body is corrupt or truncated: {source}")]
    Corrupt {
        encoding: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("decoded body exceeds {limit} bytes")]
    TooLarge { limit: usize },
}

/// Decodes `body` per the `Content-Encoding` header (a list, applied in order),
/// refusing to expand past `limit` bytes (a decompression bomb stops here).
pub fn decode_body<'a>(
    headers: &HeaderMap,
    body: Cow<'a, [u8]>,
    limit: usize,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    let mut body = body;
    let encodings: Vec<String> = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty() && e != "identity")
        .collect();
    // Encodings are listed in the order they were applied; undo them in reverse.
    for enc in encodings.iter().rev() {
        body = Cow::Owned(decode_one(enc, &body, limit)?);
    }
    Ok(body)
}

fn decode_one(encoding: &str, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    match encoding {
        "gzip" | "x-gzip" => read_limited("gzip", flate2::read::MultiGzDecoder::new(body), limit),
        "deflate" => {
            // RFC 9110 says zlib-wrapped; some servers send raw deflate. Try both.
            read_limited("deflate", flate2::read::ZlibDecoder::new(body), limit).or_else(|_| {
                read_limited("deflate", flate2::read::DeflateDecoder::new(body), limit)
            })
        }
        "br" => read_limited("br", brotli::Decompressor::new(body, 64 * 1024), limit),
        "zstd" => match zstd::stream::read::Decoder::new(body) {
            Ok(d) => read_limited("zstd", d, limit),
            Err(source) => Err(DecodeError::Corrupt {
                encoding: "zstd",
                source,
            }),
        },
        other => Err(DecodeError::Unsupported(other.to_owned())),
    }
}

fn read_limited(
    encoding: &'static str,
    reader: impl Read,
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|source| DecodeError::Corrupt { encoding, source })?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn headers(enc: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_ENCODING, enc.parse().unwrap());
        h
    }

    #[test]
    fn decodes_every_supported_encoding() {
        let plain = b"{\"hello\":\"world\"}".repeat(50);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            decode_body(&headers("gzip"), Cow::Owned(gz), 1 << 20).unwrap(),
            plain
        );

        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(&plain).unwrap();
        assert_eq!(
            decode_body(
                &headers("deflate"),
                Cow::Owned(zl.finish().unwrap()),
                1 << 20
            )
            .unwrap(),
            plain
        );

        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &plain[..], &mut br, &Default::default()).unwrap();
        assert_eq!(
            decode_body(&headers("br"), Cow::Owned(br), 1 << 20).unwrap(),
            plain
        );

        let zs = zstd::encode_all(&plain[..], 3).unwrap();
        assert_eq!(
            decode_body(&headers("zstd"), Cow::Owned(zs), 1 << 20).unwrap(),
            plain
        );
        assert_eq!(
            decode_body(&HeaderMap::new(), Cow::Borrowed(&plain[..]), 1 << 20).unwrap(),
            plain
        );
    }

    #[test]
    fn bombs_and_garbage_are_errors() {
        let zeros = vec![0u8; 1 << 20];
        let zs = zstd::encode_all(&zeros[..], 3).unwrap();
        assert!(matches!(
            decode_body(&headers("zstd"), Cow::Owned(zs), 1000),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(decode_body(&headers("gzip"), Cow::Borrowed(b"not gzip"), 1000).is_err());
        assert!(matches!(
            decode_body(&headers("compress"), Cow::Borrowed(&[1]), 10),
            Err(DecodeError::Unsupported(_))
        ));
    }
}
