//! The admin listener (Envoy's port 15000): readiness, liveness, config dump and metrics.
//! It binds to loopback unless told otherwise, because the config dump reveals topology.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match req.uri().path() {
        "/ready" => {
            if shared.is_ready() {
                (StatusCode::OK, "text/plain", "LIVE\n".to_string())
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "NOT READY\n".to_string())
            }
        }
        "/healthz" => (StatusCode::OK, "text/plain", "OK\n".to_string()),
        "/config_dump" => {
            let active = shared.active.load();
            let dump = serde_json::json!({
                "version": active.version,
                "snapshot": &active.snapshot,
            });
            (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        "/stats/prometheus" | "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.stats.render_prometheus(),
        ),
        "/" => (
            StatusCode::OK,
            "text/plain",
            "meshgate admin: /ready /healthz /config_dump /stats/prometheus\n".to_string(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    Ok(resp)
}
