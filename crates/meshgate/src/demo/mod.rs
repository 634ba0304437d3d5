//! `meshgate demo`: a gateway and a small bookinfo-like shop on loopback, no Kubernetes.
//!
//! The shop's services (frontend, catalog v1 and v2, reviews) are tiny HTTP servers built into
//! the binary. The proxy serves `demo/istio.yaml` (embedded, written to a temp folder so edits
//! hot-reload): a 90/10 canary, header- and cookie-based A/B routing, and a mesh listener the
//! frontend uses to call the catalog by name, the way a sidecar's outbound listener works.

mod services;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use meshgate_model::CompileOptions;
use meshgate_proxy::ProxyOptions;

/// The demo's Istio config, the same file as `demo/istio.yaml` in the repository.
pub const DEMO_CONFIG: &str = include_str!("../../../../demo/istio.yaml");

/// The gateway port declared in `demo/istio.yaml`.
pub const GATEWAY_PORT: u16 = 8080;
/// The outbound (sidecar-style) listener the frontend calls other services through.
pub const MESH_PORT: u16 = 15001;

/// Demo service ports, as the ServiceEntries in `demo/istio.yaml` declare them.
pub const FRONTEND_PORT: u16 = 19081;
pub const CATALOG_V1_PORT: u16 = 19082;
pub const CATALOG_V2_PORT: u16 = 19083;
pub const REVIEWS_PORT: u16 = 19084;

pub struct DemoArgs {
    pub config: Option<PathBuf>,
    pub admin_addr: SocketAddr,
    pub workers: usize,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let config = match args.config {
        Some(path) => path,
        None => {
            let dir = std::env::temp_dir().join(format!("meshgate-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join("istio.yaml");
            std::fs::write(&path, DEMO_CONFIG).with_context(|| format!("writing {}", path.display()))?;
            path
        }
    };
    services::start(loopback, MESH_PORT).context("starting demo services")?;
    print_banner(&config, args.admin_addr);
    let options = ProxyOptions {
        config_paths: vec![config],
        bind_address: loopback,
        admin_addr: args.admin_addr,
        workers: args.workers,
        drain_timeout: std::time::Duration::from_secs(1),
        access_log: None,
        kong_admin: None,
        compile: CompileOptions {
            mesh_port: Some(MESH_PORT),
            mesh_address: Some(loopback),
            ..CompileOptions::default()
        },
    };
    meshgate_proxy::run(options).map_err(anyhow::Error::msg)
}

fn print_banner(config: &std::path::Path, admin: SocketAddr) {
    let g = format!("http://127.0.0.1:{GATEWAY_PORT}");
    println!(
        "\
meshgate demo: a gateway, a mesh listener and four services on loopback.

  gateway         {g}
  mesh listener   http://127.0.0.1:{MESH_PORT}  (what a sidecar's outbound listener does)
  admin           http://{admin}  (/ready /config_dump /stats/prometheus)
  config          {}  (edit it: changes apply within a second)

Try:
  curl {g}/                                              # frontend, which calls the catalog through the mesh
  for i in $(seq 20); do curl -s {g}/catalog | grep -o '\"version\":\"v.\"'; done   # 90/10 canary
  curl -H 'x-user-group: beta' {g}/catalog               # header-based routing: always v2
  curl -H 'cookie: experiment=new-ui' {g}/catalog        # cookie-based routing: always v2
  curl {g}/reviews
  curl -i {g}/shop                                       # redirect
  curl http://{admin}/stats/prometheus | grep meshgate_requests_total

Ctrl-C stops everything.",
        config.display()
    );
}
