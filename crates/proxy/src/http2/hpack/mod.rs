//! HPACK, the header compression of HTTP/2 (RFC 7541).
//!
//! The decoder turns a header block straight into typed fields: pseudo-headers become the
//! `http` crate's `Method`, `Scheme`, `Authority` and `PathAndQuery`, other fields a validated
//! `HeaderName` and `HeaderValue`. Dynamic table entries keep that typed form, so a field the
//! client sends again as an index (most of a request's fields after the first) costs a clone
//! of shared bytes, with no parsing or validation.
//!
//! The encoder indexes the response fields that repeat (server, content type, date) in the
//! peer's dynamic table, so later responses send them as one octet each, and sends string
//! literals raw: no per-field hashing and no Huffman coding.

mod huffman;

use std::collections::VecDeque;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, StatusCode};

/// Per-entry overhead counted in table and header list sizes (RFC 7541 §4.1).
pub const ENTRY_OVERHEAD: usize = 32;

/// A decoded header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Method(Method),
    Scheme(Scheme),
    Authority(Authority),
    Path(PathAndQuery),
    /// `:protocol`, of extended CONNECT (RFC 8441).
    Protocol(Bytes),
    /// `:status`, which only responses carry.
    Status(Bytes),
    Header(HeaderName, HeaderValue),
    /// A field HTTP/2 does not allow (RFC 9113 §8.2.1, §8.3): an unknown or unparsable
    /// pseudo-header, a name with upper case or invalid characters, or a value with control
    /// characters or surrounding whitespace. The message carrying it is malformed.
    Malformed,
}

/// A header block that cannot be decoded: a connection error of type COMPRESSION_ERROR
/// (RFC 9113 §4.3), since the two dynamic tables can no longer be kept in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HPACK: {}", self.0)
    }
}

/// The name part of a static table entry.
enum StaticName {
    Authority,
    Method,
    Path,
    Scheme,
    Status,
    Header(HeaderName),
}

/// RFC 7541 Appendix A. Index 1 is the first entry.
static STATIC_TABLE: [(StaticName, &str); 61] = [
    (StaticName::Authority, ""),
    (StaticName::Method, "GET"),
    (StaticName::Method, "POST"),
    (StaticName::Path, "/"),
    (StaticName::Path, "/index.html"),
    (StaticName::Scheme, "http"),
    (StaticName::Scheme, "https"),
    (StaticName::Status, "200"),
    (StaticName::Status, "204"),
    (StaticName::Status, "206"),
    (StaticName::Status, "304"),
    (StaticName::Status, "400"),
    (StaticName::Status, "404"),
    (StaticName::Status, "500"),
    (StaticName::Header(header::ACCEPT_CHARSET), ""),
    (StaticName::Header(header::ACCEPT_ENCODING), "gzip, deflate"),
    (StaticName::Header(header::ACCEPT_LANGUAGE), ""),
    (StaticName::Header(header::ACCEPT_RANGES), ""),
    (StaticName::Header(header::ACCEPT), ""),
    (StaticName::Header(header::ACCESS_CONTROL_ALLOW_ORIGIN), ""),
    (StaticName::Header(header::AGE), ""),
    (StaticName::Header(header::ALLOW), ""),
    (StaticName::Header(header::AUTHORIZATION), ""),
    (StaticName::Header(header::CACHE_CONTROL), ""),
    (StaticName::Header(header::CONTENT_DISPOSITION), ""),
    (StaticName::Header(header::CONTENT_ENCODING), ""),
    (StaticName::Header(header::CONTENT_LANGUAGE), ""),
    (StaticName::Header(header::CONTENT_LENGTH), ""),
    (StaticName::Header(header::CONTENT_LOCATION), ""),
    (StaticName::Header(header::CONTENT_RANGE), ""),
    (StaticName::Header(header::CONTENT_TYPE), ""),
    (StaticName::Header(header::COOKIE), ""),
    (StaticName::Header(header::DATE), ""),
    (StaticName::Header(header::ETAG), ""),
    (StaticName::Header(header::EXPECT), ""),
    (StaticName::Header(header::EXPIRES), ""),
    (StaticName::Header(header::FROM), ""),
    (StaticName::Header(header::HOST), ""),
    (StaticName::Header(header::IF_MATCH), ""),
    (StaticName::Header(header::IF_MODIFIED_SINCE), ""),
    (StaticName::Header(header::IF_NONE_MATCH), ""),
    (StaticName::Header(header::IF_RANGE), ""),
    (StaticName::Header(header::IF_UNMODIFIED_SINCE), ""),
    (StaticName::Header(header::LAST_MODIFIED), ""),
    (StaticName::Header(header::LINK), ""),
    (StaticName::Header(header::LOCATION), ""),
    (StaticName::Header(header::MAX_FORWARDS), ""),
    (StaticName::Header(header::PROXY_AUTHENTICATE), ""),
    (StaticName::Header(header::PROXY_AUTHORIZATION), ""),
    (StaticName::Header(header::RANGE), ""),
    (StaticName::Header(header::REFERER), ""),
    (StaticName::Header(header::REFRESH), ""),
    (StaticName::Header(header::RETRY_AFTER), ""),
    (StaticName::Header(header::SERVER), ""),
    (StaticName::Header(header::SET_COOKIE), ""),
    (StaticName::Header(header::STRICT_TRANSPORT_SECURITY), ""),
    (StaticName::Header(header::TRANSFER_ENCODING), ""),
    (StaticName::Header(header::USER_AGENT), ""),
    (StaticName::Header(header::VARY), ""),
    (StaticName::Header(header::VIA), ""),
    (StaticName::Header(header::WWW_AUTHENTICATE), ""),
];

/// A field name as received, parsed once.
#[derive(Clone, Debug)]
enum Name {
    Pseudo(&'static str),
    Header(HeaderName),
    /// Not a name HTTP/2 allows; its length still counts in table sizes.
    Invalid(usize),
}

impl Name {
    fn from_static(i: usize) -> Self {
        match &STATIC_TABLE[i].0 {
            StaticName::Authority => Name::Pseudo(":authority"),
            StaticName::Method => Name::Pseudo(":method"),
            StaticName::Path => Name::Pseudo(":path"),
            StaticName::Scheme => Name::Pseudo(":scheme"),
            StaticName::Status => Name::Pseudo(":status"),
            StaticName::Header(h) => Name::Header(h.clone()),
        }
    }

    /// Names must be lower case (RFC 9113 §8.2.1); pseudo-headers only those defined.
    fn from_literal(raw: &[u8]) -> Self {
        match raw {
            b":authority" => Name::Pseudo(":authority"),
            b":method" => Name::Pseudo(":method"),
            b":path" => Name::Pseudo(":path"),
            b":scheme" => Name::Pseudo(":scheme"),
            b":status" => Name::Pseudo(":status"),
            b":protocol" => Name::Pseudo(":protocol"),
            _ => match HeaderName::from_lowercase(raw) {
                Ok(h) => Name::Header(h),
                Err(_) => Name::Invalid(raw.len()),
            },
        }
    }

    fn len(&self) -> usize {
        match self {
            Name::Pseudo(s) => s.len(),
            Name::Header(h) => h.as_str().len(),
            Name::Invalid(n) => *n,
        }
    }

    /// The typed field for this name and a value, as received.
    fn with_value(&self, value: Bytes) -> Field {
        match self {
            Name::Pseudo(p) => pseudo_field(p, value),
            Name::Header(h) => header_field(h.clone(), value),
            Name::Invalid(_) => Field::Malformed,
        }
    }
}

fn pseudo_field(name: &'static str, value: Bytes) -> Field {
    let parsed = match name {
        ":method" => Method::from_bytes(&value).ok().map(Field::Method),
        ":scheme" => match &value[..] {
            b"http" => Some(Field::Scheme(Scheme::HTTP)),
            b"https" => Some(Field::Scheme(Scheme::HTTPS)),
            other => Scheme::try_from(other).ok().map(Field::Scheme),
        },
        ":authority" => Authority::from_maybe_shared(value).ok().map(Field::Authority),
        // §8.3.1: never empty.
        ":path" if value.is_empty() => None,
        ":path" => PathAndQuery::from_maybe_shared(value).ok().map(Field::Path),
        ":status" => Some(Field::Status(value)),
        _ => Some(Field::Protocol(value)),
    };
    parsed.unwrap_or(Field::Malformed)
}

/// RFC 9113 §8.2.1: no leading or trailing whitespace; `HeaderValue` rejects NUL, CR, LF
/// (and the other control characters but tab).
fn header_field(name: HeaderName, value: Bytes) -> Field {
    let padded = matches!(value.first(), Some(b' ' | b'\t')) || matches!(value.last(), Some(b' ' | b'\t'));
    if padded {
        return Field::Malformed;
    }
    match HeaderValue::from_maybe_shared(value) {
        Ok(v) => Field::Header(name, v),
        Err(_) => Field::Malformed,
    }
}

/// A static table entry with its value.
fn static_field(i: usize) -> Field {
    let (name, value) = &STATIC_TABLE[i];
    match name {
        StaticName::Method => Field::Method(if *value == "GET" { Method::GET } else { Method::POST }),
        StaticName::Scheme => Field::Scheme(if *value == "http" { Scheme::HTTP } else { Scheme::HTTPS }),
        StaticName::Path => Field::Path(PathAndQuery::from_static(value)),
        StaticName::Status => Field::Status(Bytes::from_static(value.as_bytes())),
        // An empty :authority is not a valid authority.
        StaticName::Authority => Field::Malformed,
        StaticName::Header(h) => Field::Header(h.clone(), HeaderValue::from_static(value)),
    }
}

/// A dynamic table entry: the name is kept apart so a literal can reuse it even when the
/// entry's value made the field malformed.
#[derive(Clone)]
struct Entry {
    name: Name,
    field: Field,
    size: usize,
}

/// The decoder's dynamic table (RFC 7541 §2.3.2, §4): newest entry first.
struct DynamicTable {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl DynamicTable {
    fn insert(&mut self, entry: Entry) {
        let size = entry.size;
        if size > self.max {
            // §4.4: an entry larger than the table empties it and is not added.
            self.entries.clear();
            self.size = 0;
            return;
        }
        while self.size + size > self.max {
            self.evict();
        }
        self.size += size;
        self.entries.push_front(entry);
    }

    fn set_max(&mut self, max: usize) {
        self.max = max;
        while self.size > max {
            self.evict();
        }
    }

    fn evict(&mut self) {
        if let Some(entry) = self.entries.pop_back() {
            self.size -= entry.size;
        }
    }
}

/// Decodes header blocks, keeping the dynamic table between them.
pub struct Decoder {
    table: DynamicTable,
    /// The table size this end allows the peer (our SETTINGS_HEADER_TABLE_SIZE).
    allowed_max: usize,
    huffman: Vec<u8>,
}

impl Decoder {
    /// `allowed_max`: the SETTINGS_HEADER_TABLE_SIZE this end advertises (4,096 by default).
    pub fn new(allowed_max: usize) -> Self {
        Decoder {
            table: DynamicTable {
                entries: VecDeque::new(),
                size: 0,
                max: allowed_max,
            },
            allowed_max,
            huffman: Vec::new(),
        }
    }

    /// Decodes one complete header block (a HEADERS payload and its CONTINUATIONs), handing
    /// each field to `emit` with its size as counted against SETTINGS_MAX_HEADER_LIST_SIZE.
    /// Literal values share `block`'s memory. The whole block is always decoded, even past
    /// malformed fields, so the dynamic table stays in step with the peer's.
    pub fn decode(&mut self, block: &Bytes, mut emit: impl FnMut(Field, usize)) -> Result<(), DecodeError> {
        let mut pos = 0;
        let mut fields_seen = false;
        while pos < block.len() {
            let first = block[pos];
            if first & 0x80 != 0 {
                // §6.1 Indexed Header Field.
                let index = decode_int(block, &mut pos, 7)?;
                let (field, size) = self.indexed(index)?;
                emit(field, size);
                fields_seen = true;
            } else if first & 0xe0 == 0x20 {
                // §6.3 Dynamic Table Size Update: only before the first field (§4.2).
                if fields_seen {
                    return Err(DecodeError("dynamic table size update after a field"));
                }
                let max = decode_int(block, &mut pos, 5)?;
                if max > self.allowed_max {
                    return Err(DecodeError("dynamic table size update above the allowed size"));
                }
                self.table.set_max(max);
            } else {
                // §6.2 Literal Header Field: with incremental indexing (01), without indexing
                // (0000) or never indexed (0001).
                let (prefix, index_it) = if first & 0xc0 == 0x40 { (6, true) } else { (4, false) };
                let index = decode_int(block, &mut pos, prefix)?;
                let name = if index == 0 {
                    Name::from_literal(&self.string(block, &mut pos)?)
                } else {
                    self.name_at(index)?
                };
                let value = self.string(block, &mut pos)?;
                // A value kept in the table gets its own copy: a slice would keep the whole
                // read buffer it came in alive for as long as the entry lives.
                let value = if index_it {
                    Bytes::copy_from_slice(&value)
                } else {
                    value
                };
                let size = name.len() + value.len() + ENTRY_OVERHEAD;
                let field = name.with_value(value);
                if index_it {
                    self.table.insert(Entry {
                        name,
                        field: field.clone(),
                        size,
                    });
                }
                emit(field, size);
                fields_seen = true;
            }
        }
        Ok(())
    }

    fn indexed(&self, index: usize) -> Result<(Field, usize), DecodeError> {
        match index {
            0 => Err(DecodeError("index 0")),
            1..=61 => {
                let i = index - 1;
                let size = Name::from_static(i).len() + STATIC_TABLE[i].1.len() + ENTRY_OVERHEAD;
                Ok((static_field(i), size))
            }
            _ => match self.table.entries.get(index - 62) {
                Some(entry) => Ok((entry.field.clone(), entry.size)),
                None => Err(DecodeError("index past the end of the dynamic table")),
            },
        }
    }

    fn name_at(&self, index: usize) -> Result<Name, DecodeError> {
        match index {
            1..=61 => Ok(Name::from_static(index - 1)),
            _ => match self.table.entries.get(index - 62) {
                Some(entry) => Ok(entry.name.clone()),
                None => Err(DecodeError("name index past the end of the dynamic table")),
            },
        }
    }

    /// §5.2 String Literal: shared with `block` when raw, decoded when Huffman-coded.
    fn string(&mut self, block: &Bytes, pos: &mut usize) -> Result<Bytes, DecodeError> {
        let huffman = block.get(*pos).ok_or(DecodeError("truncated string"))? & 0x80 != 0;
        let len = decode_int(block, pos, 7)?;
        let end = pos.checked_add(len).filter(|&e| e <= block.len());
        let end = end.ok_or(DecodeError("string longer than the header block"))?;
        let raw = &block[*pos..end];
        let value = if huffman {
            self.huffman.clear();
            huffman::decode(raw, &mut self.huffman).map_err(DecodeError)?;
            Bytes::copy_from_slice(&self.huffman)
        } else {
            block.slice(*pos..end)
        };
        *pos = end;
        Ok(value)
    }
}

/// §5.1 Integer Representation with an `prefix`-bit prefix, starting at `block[*pos]`.
/// Values past 2^28 are refused: no size or index in HTTP/2 needs them.
fn decode_int(block: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, DecodeError> {
    let mask = (1usize << prefix) - 1;
    let first = *block.get(*pos).ok_or(DecodeError("truncated integer"))?;
    *pos += 1;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*pos).ok_or(DecodeError("truncated integer"))?;
        *pos += 1;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 21 {
            return Err(DecodeError("integer too large"));
        }
    }
}

/// §5.1 Integer Representation: `flags` fills the bits above the prefix of the first octet.
fn encode_int(value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A raw (not Huffman-coded) string literal.
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_int(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

/// Index (1-based) of a response field's name in the static table.
fn static_name_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    })
}

/// The largest dynamic table the encoder keeps, whatever larger size the peer allows: enough
/// for the fields a response repeats (server, content type, date, CORS, cache control).
const ENCODER_TABLE_LIMIT: usize = 4096;

/// Fields whose values rarely repeat, so indexing them would only push useful entries out
/// (the list nghttp2 uses).
fn worth_indexing(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::CONTENT_LENGTH
            | header::LOCATION
            | header::SET_COOKIE
            | header::ETAG
            | header::IF_MODIFIED_SINCE
            | header::IF_NONE_MATCH
            | header::LAST_MODIFIED
            | header::AGE
    )
}

/// Encodes header blocks. Repeated response fields go into the peer's dynamic table and are
/// then sent as one-octet indexes; the table is searched linearly, which is cheap for the few
/// dozen entries a response's fields fill.
pub struct Encoder {
    /// Newest entry first, as the peer's decoder numbers them.
    table: VecDeque<(HeaderName, HeaderValue, usize)>,
    size: usize,
    max: usize,
    /// The smallest size used since the last block, when a size update is due.
    size_update_due: Option<usize>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            table: VecDeque::new(),
            size: 0,
            max: ENCODER_TABLE_LIMIT,
            size_update_due: None,
        }
    }
}

impl Encoder {
    /// The peer sent SETTINGS_HEADER_TABLE_SIZE (its decoder's limit). RFC 7541 §4.2: a
    /// change of the table size this encoder uses is announced at the start of the next block.
    pub fn peer_table_size_changed(&mut self, peer_max: usize) {
        let max = peer_max.min(ENCODER_TABLE_LIMIT);
        self.max = max;
        self.evict_to(max);
        self.size_update_due = Some(self.size_update_due.map_or(max, |smallest| smallest.min(max)));
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.table.pop_back() {
                Some((_, _, size)) => self.size -= size,
                None => break,
            }
        }
    }

    /// §4.2: after several changes, the smallest size comes first, then the final one.
    fn start_block(&mut self, out: &mut Vec<u8>) {
        if let Some(smallest) = self.size_update_due.take() {
            if smallest < self.max {
                encode_int(smallest, 5, 0x20, out);
            }
            encode_int(self.max, 5, 0x20, out);
        }
    }

    /// A response head: `:status`, then the fields. Connection-specific fields must already be
    /// gone (RFC 9113 §8.2.2).
    pub fn encode_response(&mut self, status: StatusCode, headers: &HeaderMap, out: &mut Vec<u8>) {
        self.start_block(out);
        let index = match status.as_u16() {
            200 => 8,
            204 => 9,
            206 => 10,
            304 => 11,
            400 => 12,
            404 => 13,
            500 => 14,
            _ => 0,
        };
        if index != 0 {
            out.push(0x80 | index);
        } else {
            // Literal without indexing, name `:status` (static index 8).
            encode_int(8, 4, 0x00, out);
            encode_string(status.as_str().as_bytes(), out);
        }
        self.encode_fields(headers, out);
    }

    /// A trailer block: fields only.
    pub fn encode_trailers(&mut self, headers: &HeaderMap, out: &mut Vec<u8>) {
        self.start_block(out);
        self.encode_fields(headers, out);
    }

    fn encode_fields(&mut self, headers: &HeaderMap, out: &mut Vec<u8>) {
        for (name, value) in headers {
            self.encode_field(name, value, out);
        }
    }

    fn encode_field(&mut self, name: &HeaderName, value: &HeaderValue, out: &mut Vec<u8>) {
        if value.is_sensitive() {
            // Never indexed (§7.1.3), so no intermediary indexes it either.
            self.encode_literal(name, value, 0x10, 4, out);
            return;
        }
        if let Some(i) = self.table.iter().position(|(n, v, _)| n == name && v == value) {
            encode_int(62 + i, 7, 0x80, out);
            return;
        }
        let size = name.as_str().len() + value.len() + ENTRY_OVERHEAD;
        if size <= self.max / 2 && worth_indexing(name) {
            // Literal with incremental indexing (§6.2.1): both tables add it.
            self.encode_literal(name, value, 0x40, 6, out);
            self.evict_to(self.max - size);
            self.size += size;
            self.table.push_front((name.clone(), value.clone(), size));
        } else {
            self.encode_literal(name, value, 0x00, 4, out);
        }
    }

    fn encode_literal(&self, name: &HeaderName, value: &HeaderValue, flags: u8, prefix: u8, out: &mut Vec<u8>) {
        match static_name_index(name) {
            Some(i) => encode_int(i, prefix, flags, out),
            None => {
                out.push(flags);
                encode_string(name.as_str().as_bytes(), out);
            }
        }
        encode_string(value.as_bytes(), out);
    }
}

#[cfg(test)]
mod tests;
