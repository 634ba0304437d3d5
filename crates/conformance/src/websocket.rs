//! The little of RFC 6455 the suite needs: the echo server's handshake and frame echo, and a
//! client that opens a connection through the proxy and checks that frames come back.

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::echo::text_reply;

const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xA;
/// Frames larger than this are refused; the suite sends a few bytes.
const MAX_PAYLOAD: u64 = 1 << 20;

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn accept_key(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{ACCEPT_GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Server side: answers the handshake (403 without a URL-like `Origin`, as
/// `golang.org/x/net/websocket` does) and echoes every data frame on the upgraded connection.
pub fn accept(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let origin_ok = req
        .headers()
        .get(http::header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.contains("://"));
    if !origin_ok {
        return text_reply(StatusCode::FORBIDDEN, "");
    }
    let Some(key) = req.headers().get("sec-websocket-key").and_then(|k| k.to_str().ok()) else {
        return text_reply(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let accept = accept_key(key);
    tokio::spawn(async move {
        if let Ok(upgraded) = hyper::upgrade::on(req).await {
            let _ = echo_frames(TokioIo::new(upgraded)).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| text_reply(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

async fn echo_frames<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> anyhow::Result<()> {
    loop {
        let (opcode, payload) = read_frame(&mut io).await?;
        match opcode {
            OPCODE_CLOSE => {
                write_frame(&mut io, OPCODE_CLOSE, &payload, false).await?;
                return Ok(());
            }
            OPCODE_PING => write_frame(&mut io, OPCODE_PONG, &payload, false).await?,
            OPCODE_PONG => {}
            _ => write_frame(&mut io, opcode, &payload, false).await?,
        }
    }
}

/// Reads one frame (unmasking it if masked); fragmented messages are not needed here.
async fn read_frame<S: AsyncRead + Unpin>(io: &mut S) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await?;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let mut len = u64::from(head[1] & 0x7F);
    if len == 126 {
        len = u64::from(io.read_u16().await?);
    } else if len == 127 {
        len = io.read_u64().await?;
    }
    if len > MAX_PAYLOAD {
        bail!("websocket frame of {len} bytes");
    }
    let mut mask = [0u8; 4];
    if masked {
        io.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len as usize];
    io.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok((opcode, payload))
}

/// Writes one final frame; clients must mask (RFC 6455 §5.3), servers must not.
async fn write_frame<S: AsyncWrite + Unpin>(io: &mut S, opcode: u8, payload: &[u8], mask: bool) -> anyhow::Result<()> {
    let mut frame = vec![0x80 | opcode];
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key: [u8; 4] = fastrand::u32(..).to_be_bytes();
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        frame.extend_from_slice(payload);
    }
    io.write_all(&frame).await?;
    Ok(())
}

/// One message of a case: a text or binary frame that must come back unchanged.
pub struct Message {
    pub binary: bool,
    pub payload: Vec<u8>,
}

/// Client side: opens `ws://host/path` over `stream`, then sends each message and expects
/// the same frame back. Errors say which step failed.
pub async fn exchange(
    mut stream: TcpStream,
    host: &str,
    path: &str,
    origin: &str,
    messages: &[Message],
) -> anyhow::Result<()> {
    let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_be_bytes());
    let handshake = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
    );
    stream.write_all(handshake.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("handshake response headers too long");
        }
        let byte = tokio::time::timeout(Duration::from_secs(10), stream.read_u8())
            .await
            .context("no handshake response within 10 s")??;
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "101" {
        bail!("handshake answered {}", head.lines().next().unwrap_or(""));
    }
    let expected_accept = accept_key(&key);
    let accept_ok = head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(n, v)| n.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == expected_accept)
    });
    if !accept_ok {
        bail!("handshake response lacks the right Sec-WebSocket-Accept");
    }
    for message in messages {
        let opcode = if message.binary { OPCODE_BINARY } else { OPCODE_TEXT };
        write_frame(&mut stream, opcode, &message.payload, true).await?;
        let (got_opcode, payload) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream))
            .await
            .context("no echoed frame within 10 s")??;
        if got_opcode != opcode || payload != message.payload {
            bail!(
                "sent opcode {opcode} {:?}, got opcode {got_opcode} {payload:?}",
                message.payload
            );
        }
    }
    let _ = write_frame(&mut stream, OPCODE_CLOSE, &[], true).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            super::accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
