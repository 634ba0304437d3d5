//! The meshgate process under test: started per test on its config file, reloaded through the
//! file watch for `before_step` changes, killed when the test ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub struct Proxy {
    child: Child,
    admin: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

const READY_TIMEOUT: Duration = Duration::from_secs(15);

impl Proxy {
    pub async fn start(binary: &Path, config: &Path, log: &Path) -> anyhow::Result<Proxy> {
        let admin = free_loopback_port()?;
        let log_file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(binary)
            .args(["proxy", "--config"])
            .arg(config)
            .args([
                "--admin-addr",
                &admin.to_string(),
                "--drain-timeout",
                "0s",
                "--workers",
                "2",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut proxy = Proxy {
            child,
            admin,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                bail!("meshgate exited with {status}; log:\n{}", proxy.log_tail());
            }
            if matches!(proxy.admin_get("/ready").await, Ok((200, _))) {
                return Ok(proxy);
            }
            if Instant::now() > deadline {
                bail!(
                    "meshgate not ready within {READY_TIMEOUT:?}; log:\n{}",
                    proxy.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rewrites the config file and waits until the proxy serves the new version.
    pub async fn reload(&self, text: &str) -> anyhow::Result<()> {
        let before = self.config_version().await;
        std::fs::write(&self.config, text).with_context(|| format!("write {}", self.config.display()))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.config_version().await > before {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("config not reloaded within 5 s; log:\n{}", self.log_tail())
    }

    async fn config_version(&self) -> u64 {
        let Ok((_, metrics)) = self.admin_get("/stats/prometheus").await else {
            return 0;
        };
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("meshgate_config_version "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect(self.admin).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
