//! The demo shop's services: small JSON/HTTP servers on loopback, one thread for all.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::{CATALOG_V1_PORT, CATALOG_V2_PORT, FRONTEND_PORT, REVIEWS_PORT};

#[derive(Clone, Copy)]
enum Service {
    Frontend { mesh_port: u16 },
    Catalog { version: &'static str },
    Reviews,
}

/// Binds every demo service, then serves them on a background thread.
pub fn start(address: IpAddr, mesh_port: u16) -> std::io::Result<()> {
    let services = [
        (FRONTEND_PORT, Service::Frontend { mesh_port }),
        (CATALOG_V1_PORT, Service::Catalog { version: "v1" }),
        (CATALOG_V2_PORT, Service::Catalog { version: "v2" }),
        (REVIEWS_PORT, Service::Reviews),
    ];
    let mut listeners = Vec::new();
    for (port, service) in services {
        let addr = SocketAddr::new(address, port);
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("demo service port {addr}: {e}")))?;
        listener.set_nonblocking(true)?;
        listeners.push((listener, service));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new()
        .name("meshgate-demo".into())
        .spawn(move || {
            runtime.block_on(async move {
                for (listener, service) in listeners {
                    match TcpListener::from_std(listener) {
                        Ok(l) => {
                            tokio::spawn(serve(l, service));
                        }
                        Err(e) => tracing::error!(error = %e, "demo service listener"),
                    }
                }
                std::future::pending::<()>().await;
            });
        })?;
    Ok(())
}

async fn serve(listener: TcpListener, service: Service) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(req, service));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn respond(req: Request<Incoming>, service: Service) -> Result<Response<Full<Bytes>>, Infallible> {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (name, version, body) = match service {
        Service::Catalog { version } => {
            let products = if version == "v2" {
                r#"[{"id":1,"name":"Mesh Mug","price":12.5,"rating":4.8},{"id":2,"name":"Gateway Tee","price":20.0,"rating":4.6}]"#
            } else {
                r#"[{"id":1,"name":"Mesh Mug","price":12.5},{"id":2,"name":"Gateway Tee","price":20.0}]"#
            };
            ("catalog", version, format!(r#"{{"service":"catalog","version":"{version}","path":{},"products":{products}}}"#, json_string(req.uri().path())))
        }
        Service::Reviews => (
            "reviews",
            "v1",
            r#"{"service":"reviews","version":"v1","reviews":[{"product":1,"stars":5,"text":"Holds coffee and config."}]}"#.to_string(),
        ),
        Service::Frontend { mesh_port } => {
            let catalog = call_catalog(mesh_port, &request_id).await;
            (
                "frontend",
                "v1",
                format!(r#"{{"service":"frontend","version":"v1","catalog_via_mesh":{catalog}}}"#),
            )
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    let headers = resp.headers_mut();
    headers.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    headers.insert("x-demo-service", hyper::header::HeaderValue::from_static(name));
    headers.insert("x-demo-version", hyper::header::HeaderValue::from_static(version));
    Ok(resp)
}

/// The frontend calls the catalog by service name through the mesh listener, propagating
/// the request id the way an instrumented application would.
async fn call_catalog(mesh_port: u16, request_id: &str) -> String {
    let result: Result<String, String> = async {
        let stream = TcpStream::connect(("127.0.0.1", mesh_port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get("/catalog")
            .header("host", "catalog.shop.svc.cluster.local")
            .header("x-request-id", request_id)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
    .await;
    match result {
        Ok(body) if body.starts_with('{') => body,
        Ok(body) => json_string(&body),
        Err(e) => json_string(&format!("error: {e}")),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
