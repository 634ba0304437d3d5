//! Per-worker upstream connection pools, one per endpoint.
//!
//! Each worker thread keeps its own idle HTTP/1.1 connections (and one multiplexed HTTP/2
//! connection) per endpoint, so checking a connection out touches no lock another core holds
//! and no hash map: the endpoint index chosen by the load balancer is the pool's index.
//! A connection goes back to its pool only when its response body has been read to the end;
//! a response abandoned half-way closes its connection, so it can never answer the next
//! request with the previous one's bytes.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_model::snapshot::TryFailure;
use tokio::net::TcpStream;

use super::connector::{CountedStream, DEFAULT_CONNECT_TIMEOUT};
use crate::body::UpstreamBody;
use crate::stats::UpstreamStats;

/// Idle HTTP/1.1 connections kept per endpoint and worker; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Why an upstream request failed before a response arrived.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made (Envoy's `UF`, "connection failure").
    Connect(String),
    /// The connection broke before response headers (Envoy's `UC`, "connection termination").
    Reset(String),
    /// The HTTP/2 upstream refused the stream (`REFUSED_STREAM`): it did not process the
    /// request, so it is safe to send again.
    RefusedStream(String),
}

impl UpstreamError {
    /// The failure as retry conditions distinguish it.
    pub fn failure(&self) -> TryFailure {
        match self {
            UpstreamError::Connect(_) => TryFailure::ConnectFailure,
            UpstreamError::Reset(_) => TryFailure::Reset,
            UpstreamError::RefusedStream(_) => TryFailure::RefusedStream,
        }
    }

    fn from_http2(e: hyper::Error) -> Self {
        // hyper does not expose h2's reason code; h2 names it in the error's text.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.to_string().contains("refused stream") {
                return UpstreamError::RefusedStream(e.to_string());
            }
            source = err.source();
        }
        UpstreamError::Reset(e.to_string())
    }
}

/// The connections of one worker to one endpoint.
#[derive(Default)]
pub struct EndpointPool {
    idle: Mutex<Vec<http1::SendRequest<UpstreamBody>>>,
    http2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands an HTTP/1.1 connection back to its pool once the response body is fully read.
pub struct PoolReturn {
    sender: http1::SendRequest<UpstreamBody>,
    pool: Arc<EndpointPool>,
}

impl PoolReturn {
    pub fn release(self) {
        let mut idle = locked(&self.pool.idle);
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(self.sender);
        }
    }
}

impl EndpointPool {
    /// Sends `req` over HTTP/1.1 on an idle connection, or a new one. A request that an idle
    /// connection could not even start sending (the upstream closed it meanwhile) is retried
    /// once on a fresh connection, as Envoy and hyper's pool do.
    pub async fn send_http1(
        self: &Arc<Self>,
        address: &str,
        stats: &Arc<UpstreamStats>,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, PoolReturn), UpstreamError> {
        loop {
            let idle = locked(&self.idle).pop();
            let Some(mut sender) = idle else { break };
            if sender.is_closed() || sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        PoolReturn {
                            sender,
                            pool: self.clone(),
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Reset(e.into_error().to_string())),
                },
            }
        }
        let mut sender = self.connect_http1(address, stats).await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok((
                resp,
                PoolReturn {
                    sender,
                    pool: self.clone(),
                },
            )),
            Err(e) => Err(UpstreamError::Reset(e.to_string())),
        }
    }

    async fn connect_http1(
        &self,
        address: &str,
        stats: &Arc<UpstreamStats>,
    ) -> Result<http1::SendRequest<UpstreamBody>, UpstreamError> {
        let io = connect(address, stats).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Sends `req` over the endpoint's multiplexed HTTP/2 connection, opening it if needed.
    pub async fn send_http2(
        &self,
        address: &str,
        stats: &Arc<UpstreamStats>,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let existing = locked(&self.http2).as_ref().filter(|s| !s.is_closed()).cloned();
        let mut sender = match existing {
            Some(s) => s,
            None => {
                let io = connect(address, stats).await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(io)
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                *locked(&self.http2) = Some(sender.clone());
                sender
            }
        };
        sender.ready().await.map_err(UpstreamError::from_http2)?;
        sender.send_request(req).await.map_err(UpstreamError::from_http2)
    }
}

async fn connect(address: &str, stats: &Arc<UpstreamStats>) -> Result<TokioIo<CountedStream>, UpstreamError> {
    let connecting = tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, TcpStream::connect(address));
    match connecting.await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(TokioIo::new(CountedStream::new(stream, stats.clone())))
        }
        Ok(Err(e)) => {
            stats.connect_failures.fetch_add(1, Relaxed);
            Err(UpstreamError::Connect(e.to_string()))
        }
        Err(_) => {
            stats.connect_failures.fetch_add(1, Relaxed);
            Err(UpstreamError::Connect("connect timeout".to_string()))
        }
    }
}
