//! Access logs in Envoy's default format (or as JSON with Envoy's operator names), written by
//! a background thread so a slow disk or pipe never stalls a worker: lines go through a bounded
//! channel and are dropped (and counted) when it is full.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::response_flags::ResponseFlags;

/// Lines waiting for the writer; beyond this, new lines are dropped.
const QUEUE_LINES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// Envoy's default format line, plus the upstream cluster and route name.
    Text,
    /// One JSON object per line, keys named after Envoy's command operators.
    Json,
}

#[derive(Debug, Clone)]
pub struct AccessLogOptions {
    /// A file to append to; `-` or `/dev/stdout` writes to standard output.
    pub path: PathBuf,
    pub format: AccessLogFormat,
}

pub struct AccessLog {
    lines: mpsc::SyncSender<String>,
    format: AccessLogFormat,
}

/// What one access log line says about a request.
pub struct Entry<'a> {
    pub start: SystemTime,
    pub method: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub flags: ResponseFlags,
    pub bytes_received: u64,
    /// `None` when the response length is not known when its headers leave.
    pub bytes_sent: Option<u64>,
    /// Until the response headers were ready.
    pub duration: Duration,
    pub forwarded_for: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub upstream: Option<&'a UpstreamInfo>,
}

/// Where a request went, attached to its response as an extension for the access log.
#[derive(Clone, Debug, Default)]
pub struct UpstreamInfo {
    pub route: String,
    pub cluster: Option<String>,
    /// `address:port` of the endpoint of the last try.
    pub host: Option<String>,
    /// The `x-request-id` sent upstream (generated at the edge).
    pub request_id: Option<String>,
}

/// The endpoint a try was sent to, attached to its response when access logs are on.
#[derive(Clone, Debug)]
pub struct UpstreamHost {
    pub address: String,
    pub request_id: Option<String>,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread.
    pub fn open(options: &AccessLogOptions) -> std::io::Result<AccessLog> {
        let to_stdout = options.path.as_os_str() == "-" || options.path.as_os_str() == "/dev/stdout";
        let mut out: Box<dyn std::io::Write + Send> = if to_stdout {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&options.path)?,
            )
        };
        let (lines, received) = mpsc::sync_channel::<String>(QUEUE_LINES);
        std::thread::Builder::new()
            .name("meshgate-access-log".into())
            .spawn(move || {
                let mut buffer = Vec::with_capacity(64 * 1024);
                while let Ok(line) = received.recv() {
                    buffer.extend_from_slice(line.as_bytes());
                    // Batch what is already queued into one write.
                    while let Ok(more) = received.try_recv() {
                        buffer.extend_from_slice(more.as_bytes());
                        if buffer.len() > 60 * 1024 {
                            break;
                        }
                    }
                    if out.write_all(&buffer).and_then(|()| out.flush()).is_err() {
                        // Nowhere to report it but the log itself; keep consuming lines.
                        tracing::warn!("cannot write the access log");
                    }
                    buffer.clear();
                }
            })?;
        Ok(AccessLog {
            lines,
            format: options.format,
        })
    }

    /// Queues a line already formatted (ending in a newline); `false` when it was dropped.
    pub fn record_line(&self, line: String) -> bool {
        self.lines.try_send(line).is_ok()
    }

    /// Queues the line for `entry`; `false` when it was dropped because the writer is behind.
    pub fn record(&self, entry: &Entry<'_>) -> bool {
        let line = match self.format {
            AccessLogFormat::Text => text_line(entry),
            AccessLogFormat::Json => json_line(entry),
        };
        self.lines.try_send(line).is_ok()
    }
}

/// `[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
/// %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
/// %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
/// "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"`, then `%UPSTREAM_CLUSTER%
/// %ROUTE_NAME%` as Istio's format ends.
fn text_line(e: &Entry<'_>) -> String {
    let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    let mut line = String::with_capacity(256);
    let _ = writeln!(
        line,
        "[{}] \"{} {} {}\" {} {} {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} {}",
        rfc3339_millis(e.start),
        e.method,
        e.path,
        e.protocol,
        e.status,
        e.flags,
        e.bytes_received,
        e.bytes_sent.map_or("-".to_string(), |b| b.to_string()),
        e.duration.as_millis(),
        dash(e.forwarded_for),
        dash(e.user_agent),
        dash(e.request_id),
        dash(e.authority),
        dash(e.upstream.and_then(|u| u.host.as_deref())),
        dash(e.upstream.and_then(|u| u.cluster.as_deref())),
        dash(e.upstream.map(|u| u.route.as_str())),
    );
    line
}

fn json_line(e: &Entry<'_>) -> String {
    let mut object = serde_json::json!({
        "start_time": rfc3339_millis(e.start),
        "method": e.method,
        "path": e.path,
        "protocol": e.protocol,
        "response_code": e.status,
        "response_flags": e.flags.to_string(),
        "bytes_received": e.bytes_received,
        "bytes_sent": e.bytes_sent,
        "duration": e.duration.as_millis() as u64,
        "x_forwarded_for": e.forwarded_for,
        "user_agent": e.user_agent,
        "request_id": e.request_id,
        "authority": e.authority,
        "upstream_host": e.upstream.and_then(|u| u.host.as_deref()),
        "upstream_cluster": e.upstream.and_then(|u| u.cluster.as_deref()),
        "route_name": e.upstream.map(|u| u.route.as_str()),
    });
    if let Some(map) = object.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    let mut line = object.to_string();
    line.push('\n');
    line
}

/// `2026-11-22T09:41:07.123Z`, as Envoy prints `%START_TIME%`.
pub fn rfc3339_millis(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_secs / 3600,
        day_secs % 3600 / 60,
        day_secs % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_339_267_123);
        assert_eq!(rfc3339_millis(t), "2026-11-22T09:21:07.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn text_lines_follow_envoys_default_format() {
        let upstream = UpstreamInfo {
            route: "default/vs[0]".into(),
            cluster: Some("outbound|80||a.test".into()),
            host: Some("127.0.0.1:8080".into()),
            request_id: None,
        };
        let entry = Entry {
            start: UNIX_EPOCH,
            method: "GET",
            path: "/a?b=1",
            protocol: "HTTP/1.1",
            status: 503,
            flags: ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            bytes_received: 0,
            bytes_sent: Some(91),
            duration: Duration::from_millis(12),
            forwarded_for: None,
            user_agent: Some("curl/8"),
            request_id: Some("r1"),
            authority: Some("a.test"),
            upstream: Some(&upstream),
        };
        assert_eq!(
            text_line(&entry),
            "[1970-01-01T00:00:00.000Z] \"GET /a?b=1 HTTP/1.1\" 503 UF 0 91 12 - \"-\" \"curl/8\" \"r1\" \"a.test\" \"127.0.0.1:8080\" outbound|80||a.test default/vs[0]\n"
        );
        let json: serde_json::Value = serde_json::from_str(&json_line(&entry)).unwrap();
        assert_eq!(json["response_flags"], "UF");
        assert_eq!(json["upstream_host"], "127.0.0.1:8080");
        assert!(json.get("x_forwarded_for").is_none());
    }
}
