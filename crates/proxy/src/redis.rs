//! A minimal Redis client (RESP2 over TCP) for the rate-limiting plugin's `redis` policy:
//! pipelined commands on pooled connections, each exchange bounded by the configured timeout.
//! Connections are pooled per worker thread, since a socket belongs to its thread's runtime.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use meshgate_model::kong::plugins::RedisTarget;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Idle connections kept per worker and Redis server.
const MAX_IDLE: usize = 8;

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply as a number: an integer, or a bulk string holding one; `None` (a missing
    /// key) counts as 0.
    pub fn as_count(&self) -> Option<u64> {
        match self {
            Reply::Integer(n) => u64::try_from(*n).ok(),
            Reply::Bulk(None) => Some(0),
            Reply::Bulk(Some(bytes)) => std::str::from_utf8(bytes).ok()?.parse().ok(),
            _ => None,
        }
    }
}

type Connection = BufReader<TcpStream>;

#[derive(Default)]
pub struct RedisPool {
    idle: Mutex<HashMap<(std::thread::ThreadId, String), Vec<Connection>>>,
}

fn pool_key(target: &RedisTarget) -> (std::thread::ThreadId, String) {
    (
        std::thread::current().id(),
        format!("{}:{}/{}", target.host, target.port, target.database),
    )
}

impl RedisPool {
    /// Sends `commands` as one pipeline and returns one reply per command. Any error (connect,
    /// timeout, protocol, a Redis error reply) is returned as text and the connection dropped.
    pub async fn pipeline(&self, target: &RedisTarget, commands: &[Vec<String>]) -> Result<Vec<Reply>, String> {
        let timeout = Duration::from_millis(target.timeout_ms.max(1));
        let key = pool_key(target);
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&key)
            .and_then(Vec::pop);
        let mut conn = match pooled {
            Some(c) => c,
            None => tokio::time::timeout(timeout, connect(target))
                .await
                .map_err(|_| format!("connecting to Redis {}:{} timed out", target.host, target.port))??,
        };
        let replies = tokio::time::timeout(timeout, exchange(&mut conn, commands))
            .await
            .map_err(|_| "Redis did not answer in time".to_string())??;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE {
            list.push(conn);
        }
        Ok(replies)
    }
}

async fn connect(target: &RedisTarget) -> Result<Connection, String> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect to Redis {}:{}: {e}", target.host, target.port))?;
    let _ = stream.set_nodelay(true);
    let mut conn = BufReader::new(stream);
    let mut setup: Vec<Vec<String>> = Vec::new();
    if let Some(password) = &target.password {
        let mut auth = vec!["AUTH".to_string()];
        auth.extend(target.username.clone());
        auth.push(password.clone());
        setup.push(auth);
    }
    if target.database != 0 {
        setup.push(vec!["SELECT".to_string(), target.database.to_string()]);
    }
    if !setup.is_empty() {
        exchange(&mut conn, &setup).await?;
    }
    Ok(conn)
}

async fn exchange(conn: &mut Connection, commands: &[Vec<String>]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    for command in commands {
        out.extend_from_slice(&encode(command));
    }
    conn.get_mut()
        .write_all(&out)
        .await
        .map_err(|e| format!("writing to Redis: {e}"))?;
    let mut replies = Vec::with_capacity(commands.len());
    for _ in commands {
        replies.push(read_reply(conn).await?);
    }
    Ok(replies)
}

/// A command as a RESP array of bulk strings.
pub fn encode(args: &[String]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(
    conn: &mut Connection,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, String>> + Send + '_>> {
    Box::pin(async move {
        let mut line = String::new();
        let n = conn
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading from Redis: {e}"))?;
        if n == 0 {
            return Err("Redis closed the connection".to_string());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || rest.parse::<i64>().map_err(|_| format!("bad Redis reply {line:?}"));
        match kind {
            "+" => Ok(Reply::Status(rest.to_string())),
            "-" => Err(format!("Redis error: {rest}")),
            ":" => Ok(Reply::Integer(number()?)),
            "$" => {
                let len = number()?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut data = vec![0; usize::try_from(len).unwrap_or(0) + 2];
                conn.read_exact(&mut data)
                    .await
                    .map_err(|e| format!("reading from Redis: {e}"))?;
                data.truncate(data.len() - 2);
                Ok(Reply::Bulk(Some(data)))
            }
            "*" => {
                let len = number()?;
                let mut items = Vec::new();
                for _ in 0..len.max(0) {
                    items.push(read_reply(conn).await?);
                }
                Ok(Reply::Array(items))
            }
            _ => Err(format!("bad Redis reply {line:?}")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_as_resp_arrays() {
        assert_eq!(
            encode(&["INCRBY".to_string(), "k".to_string(), "1".to_string()]),
            b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$1\r\n1\r\n"
        );
        assert_eq!(Reply::Bulk(None).as_count(), Some(0));
        assert_eq!(Reply::Bulk(Some(b"12".to_vec())).as_count(), Some(12));
    }
}
