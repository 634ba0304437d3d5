//! HTTP/2 frame layout (RFC 9113 §4, §6): the 9-octet frame header, frame types, flags,
//! error codes and settings, and writers for the frames the server sends.

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Length of a frame header.
pub const HEAD_LEN: usize = 9;

/// The initial flow-control window of every stream and of the connection (§6.9.2).
pub const DEFAULT_WINDOW: u32 = 65_535;
/// The largest flow-control window (§6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The initial and smallest SETTINGS_MAX_FRAME_SIZE (§6.5.2).
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest SETTINGS_MAX_FRAME_SIZE.
pub const MAX_MAX_FRAME: usize = (1 << 24) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// An error code (§7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => return write!(f, "error code {:#x}", self.0),
        };
        f.write_str(name)
    }
}

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// Reads a frame header from the first 9 octets of `b` (the reserved bit is ignored).
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn write(self, out: &mut Vec<u8>) {
        let len = self.len as u32;
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, self.kind, self.flags]);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

pub fn write_settings(out: &mut Vec<u8>, settings: &[(u16, u32)]) {
    Head {
        len: settings.len() * 6,
        kind: SETTINGS,
        flags: 0,
        stream: 0,
    }
    .write(out);
    for (id, value) in settings {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub fn write_settings_ack(out: &mut Vec<u8>) {
    Head {
        len: 0,
        kind: SETTINGS,
        flags: ACK,
        stream: 0,
    }
    .write(out);
}

pub fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    Head {
        len: 4,
        kind: WINDOW_UPDATE,
        flags: 0,
        stream,
    }
    .write(out);
    out.extend_from_slice(&increment.to_be_bytes());
}

pub fn write_rst_stream(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    Head {
        len: 4,
        kind: RST_STREAM,
        flags: 0,
        stream,
    }
    .write(out);
    out.extend_from_slice(&reason.0.to_be_bytes());
}

pub fn write_goaway(out: &mut Vec<u8>, last_stream: u32, reason: Reason, debug: &[u8]) {
    Head {
        len: 8 + debug.len(),
        kind: GOAWAY,
        flags: 0,
        stream: 0,
    }
    .write(out);
    out.extend_from_slice(&last_stream.to_be_bytes());
    out.extend_from_slice(&reason.0.to_be_bytes());
    out.extend_from_slice(debug);
}

pub fn write_ping_ack(out: &mut Vec<u8>, payload: &[u8]) {
    Head {
        len: 8,
        kind: PING,
        flags: ACK,
        stream: 0,
    }
    .write(out);
    out.extend_from_slice(payload);
}

/// DATA frame header; the payload follows.
pub fn write_data_head(out: &mut Vec<u8>, stream: u32, len: usize, end_stream: bool) {
    Head {
        len,
        kind: DATA,
        flags: if end_stream { END_STREAM } else { 0 },
        stream,
    }
    .write(out);
}

/// A header block as HEADERS plus as many CONTINUATION frames as `max_frame` requires.
pub fn write_header_block(out: &mut Vec<u8>, stream: u32, block: &[u8], end_stream: bool, max_frame: usize) {
    let mut chunks = block.chunks(max_frame.max(1));
    let first = chunks.next().unwrap_or(&[]);
    let last_first = first.len() == block.len();
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if last_first {
        flags |= END_HEADERS;
    }
    Head {
        len: first.len(),
        kind: HEADERS,
        flags,
        stream,
    }
    .write(out);
    out.extend_from_slice(first);
    let mut rest = chunks.peekable();
    while let Some(chunk) = rest.next() {
        Head {
            len: chunk.len(),
            kind: CONTINUATION,
            flags: if rest.peek().is_none() { END_HEADERS } else { 0 },
            stream,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_heads_round_trip_and_drop_the_reserved_bit() {
        let mut out = Vec::new();
        Head {
            len: 0x01_02_03,
            kind: HEADERS,
            flags: END_HEADERS,
            stream: 7,
        }
        .write(&mut out);
        assert_eq!(out, [1, 2, 3, 1, 4, 0, 0, 0, 7]);
        out[5] |= 0x80;
        assert_eq!(Head::parse(&out).stream, 7);
    }

    #[test]
    fn large_header_blocks_continue() {
        let mut out = Vec::new();
        write_header_block(&mut out, 1, &[0xaa; 10], true, 4);
        let heads: Vec<Head> = [0, 13, 26].iter().map(|&i| Head::parse(&out[i..])).collect();
        assert_eq!(heads[0].kind, HEADERS);
        assert_eq!(heads[0].flags, END_STREAM);
        assert_eq!((heads[1].kind, heads[1].flags, heads[1].len), (CONTINUATION, 0, 4));
        assert_eq!(
            (heads[2].kind, heads[2].flags, heads[2].len),
            (CONTINUATION, END_HEADERS, 2)
        );
        assert_eq!(out.len(), 3 * HEAD_LEN + 10);
    }
}
