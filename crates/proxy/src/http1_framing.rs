//! HTTP/1.1 message framing shared by the upstream client and the downstream server:
//! `Content-Length` values and the chunked transfer coding (RFC 9112 §6 and §7.1).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::Frame;

use crate::upstream::read_buffer::ReadBuffer;

/// A chunk-size line longer than this (extensions included) is a protocol error.
const MAX_CHUNK_LINE: usize = 1024;
/// Trailer section bytes accepted (as a head: Envoy's `max_request_headers_kb` default).
const MAX_TRAILER_BYTES: usize = 60 * 1024;
/// Trailer fields accepted (hyper's and Envoy's header count limit).
const MAX_TRAILERS: usize = 100;

/// The field names nearly every client and upstream sends, in the spellings they use, so the
/// common case skips `HeaderName::from_bytes` (which lower-cases into a scratch buffer and
/// looks the name up again, about 120 instructions per field).
pub(crate) fn common_field_name(name: &[u8]) -> Option<HeaderName> {
    Some(match name {
        b"Host" | b"host" => header::HOST,
        b"User-Agent" | b"user-agent" => header::USER_AGENT,
        b"Accept" | b"accept" => header::ACCEPT,
        b"Accept-Encoding" | b"accept-encoding" => header::ACCEPT_ENCODING,
        b"Server" | b"server" => header::SERVER,
        b"Date" | b"date" => header::DATE,
        b"Content-Type" | b"content-type" => header::CONTENT_TYPE,
        b"Content-Length" | b"content-length" => header::CONTENT_LENGTH,
        b"Connection" | b"connection" => header::CONNECTION,
        b"Transfer-Encoding" | b"transfer-encoding" => header::TRANSFER_ENCODING,
        b"Keep-Alive" | b"keep-alive" => HeaderName::from_static("keep-alive"),
        b"Cache-Control" | b"cache-control" => header::CACHE_CONTROL,
        b"ETag" | b"Etag" | b"etag" => header::ETAG,
        b"Last-Modified" | b"last-modified" => header::LAST_MODIFIED,
        b"Vary" | b"vary" => header::VARY,
        b"Accept-Ranges" | b"accept-ranges" => header::ACCEPT_RANGES,
        b"Content-Encoding" | b"content-encoding" => header::CONTENT_ENCODING,
        b"Location" | b"location" => header::LOCATION,
        b"Set-Cookie" | b"set-cookie" => header::SET_COOKIE,
        b"Expires" | b"expires" => header::EXPIRES,
        _ => return None,
    })
}

/// What the `Content-Length` fields of a message say, as they are read one by one.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Length {
    Absent,
    Valid(u64),
    /// Not a number, or fields that disagree.
    Invalid,
}

impl Length {
    /// Adds one field's value (which may list several, comma-separated).
    pub(crate) fn and(self, raw: &[u8]) -> Length {
        let mut seen = self;
        for part in raw.split(|&b| b == b',') {
            let part = part.trim_ascii();
            let n = if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Length::Invalid;
            } else {
                part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
            };
            seen = match seen {
                Length::Absent => Length::Valid(n),
                Length::Valid(m) if m == n => seen,
                _ => return Length::Invalid,
            };
        }
        seen
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    /// Trailers were handed out; nothing follows.
    End,
}

pub(crate) enum Decoded {
    Frame(Frame<Bytes>),
    End,
    NeedMore,
}

/// Steps the chunked decoder over what `buf` holds.
pub(crate) fn decode_chunked(state: &mut ChunkState, buf: &mut ReadBuffer) -> Result<Decoded, &'static str> {
    loop {
        match *state {
            ChunkState::Size => {
                let Some(line_end) = find_crlf(buf) else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err("chunk size line too long");
                    }
                    return Ok(Decoded::NeedMore);
                };
                let line = &buf[..line_end];
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > 15 {
                    return Err("invalid chunk size");
                }
                // Only whitespace and `;` extensions may follow the size (RFC 9112 §7.1.1), and
                // no control characters (a lone CR or LF could end the line for another parser).
                let rest = &line[digits..];
                let rest = &rest[rest.iter().take_while(|&&b| b == b' ' || b == b'\t').count()..];
                if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b < b' ' && b != b'\t' || b == 0x7f) {
                    return Err("invalid chunk size");
                }
                let size = std::str::from_utf8(&line[..digits])
                    .ok()
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                    .ok_or("invalid chunk size")?;
                buf.advance(line_end + 2);
                *state = if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = left.min(buf.len() as u64);
                let data = buf.split_to(n as usize).freeze();
                *state = if n == left {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left - n)
                };
                return Ok(Decoded::Frame(Frame::data(data)));
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk not followed by CRLF");
                }
                buf.advance(2);
                *state = ChunkState::Size;
            }
            ChunkState::End => return Ok(Decoded::End),
            ChunkState::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    return Ok(Decoded::End);
                }
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                // httparse says where the trailer section ends, so the bytes after it (the
                // next message) stay in the buffer.
                let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
                let (used, trailers) = match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((used, fields))) => {
                        let mut map = HeaderMap::with_capacity(fields.len());
                        for f in fields.iter() {
                            let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| "invalid trailer name")?;
                            let value = HeaderValue::from_bytes(f.value).map_err(|_| "invalid trailer value")?;
                            map.append(name, value);
                        }
                        (used, map)
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILER_BYTES => {
                        return Err("trailers too large");
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(_) => return Err("invalid trailers"),
                };
                buf.advance(used);
                *state = ChunkState::End;
                return Ok(Decoded::Frame(Frame::trailers(trailers)));
            }
        }
    }
}

pub(crate) fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_field_names_are_the_ones_the_general_parser_gives() {
        for name in [
            "Server",
            "date",
            "Content-Type",
            "content-length",
            "ETag",
            "Etag",
            "Set-Cookie",
            "keep-alive",
            "Host",
            "user-agent",
        ] {
            let fast = common_field_name(name.as_bytes());
            assert_eq!(fast, Some(HeaderName::from_bytes(name.as_bytes()).unwrap()), "{name}");
        }
        // Other spellings and other fields take the general parser.
        for name in ["CONTENT-TYPE", "X-Upstream", "content-type "] {
            assert_eq!(common_field_name(name.as_bytes()), None, "{name}");
        }
    }
}
