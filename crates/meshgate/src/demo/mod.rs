//! `meshgate demo`: a gateway, a Kong-style API edge and a small bookinfo-like shop on
//! loopback, no Kubernetes.
//!
//! The shop's services (frontend, catalog v1 and v2, reviews) are tiny HTTP servers built into
//! the binary. The proxy serves `demo/istio.yaml` (embedded, written to a temp folder so edits
//! hot-reload): a 90/10 canary, header- and cookie-based A/B routing, and a mesh listener the
//! frontend uses to call the catalog by name, the way a sidecar's outbound listener works.
//! `demo/kong.yaml` (also embedded) is loaded into the Kong Admin API's SQLite database (port
//! 8001): the catalog behind key-auth and rate limiting on Kong's port 8000.

mod services;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use meshgate_model::CompileOptions;
use meshgate_proxy::ProxyOptions;

/// The demo's Istio config, the same file as `demo/istio.yaml` in the repository.
pub const DEMO_CONFIG: &str = include_str!("../../../../demo/istio.yaml");
/// The demo's Kong (decK) config, the same file as `demo/kong.yaml`.
pub const DEMO_KONG_CONFIG: &str = include_str!("../../../../demo/kong.yaml");

/// The Kong proxy listener (Kong's default `proxy_listen` port) and the Admin API.
pub const KONG_PORT: u16 = 8000;
pub const KONG_ADMIN_PORT: u16 = 8001;

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
    let dir = std::env::temp_dir().join(format!("meshgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let database = meshgate_proxy::kong_store::StoreLocation::Sqlite(dir.join("admin.db"));
    let config_paths = match args.config {
        Some(path) => vec![path],
        None => {
            let path = dir.join("istio.yaml");
            std::fs::write(&path, DEMO_CONFIG).with_context(|| format!("writing {}", path.display()))?;
            // The Kong half starts as the Admin API's state, as `deck gateway sync` would
            // leave a Kong database, so consumers added through the API join the same config.
            seed_admin_api(&database)?;
            vec![path]
        }
    };
    services::start(loopback, MESH_PORT).context("starting demo services")?;
    let kong_admin = SocketAddr::new(loopback, KONG_ADMIN_PORT);
    print_banner(&config_paths, args.admin_addr, kong_admin);
    let options = ProxyOptions {
        config_paths,
        bind_address: loopback,
        admin_addr: args.admin_addr,
        workers: args.workers,
        drain_timeout: std::time::Duration::from_secs(1),
        request_headers_timeout: Some(std::time::Duration::from_secs(30)),
        idle_timeout: Some(std::time::Duration::from_secs(3600)),
        http2_server: meshgate_proxy::Http2Server::default(),
        http1_server: meshgate_proxy::Http1Server::default(),
        access_log: None,
        kong_admin: Some(meshgate_proxy::kong_admin::KongAdminOptions {
            addr: kong_admin,
            token: None,
            database,
        }),
        compile: CompileOptions {
            mesh_port: Some(MESH_PORT),
            mesh_address: Some(loopback),
            kong_listen: vec![SocketAddr::new(loopback, KONG_PORT)],
            ..CompileOptions::default()
        },
    };
    meshgate_proxy::run(options).map_err(anyhow::Error::msg)
}

/// Imports `demo/kong.yaml` into the demo's Admin API database.
fn seed_admin_api(database: &meshgate_proxy::kong_store::StoreLocation) -> anyhow::Result<()> {
    let docs = meshgate_model::source::parse_str(std::path::Path::new("demo/kong.yaml"), DEMO_KONG_CONFIG)
        .map_err(|f| anyhow::anyhow!("{f}"))?;
    let deck = docs
        .into_iter()
        .next()
        .map(|d| d.body)
        .context("demo/kong.yaml is empty")?;
    let options = CompileOptions {
        kong_listen: vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), KONG_PORT)],
        ..CompileOptions::default()
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(meshgate_proxy::kong_admin::import(database, deck, &options))
        .map_err(anyhow::Error::msg)
        .context("loading demo/kong.yaml into the Admin API")?;
    Ok(())
}

fn print_banner(configs: &[PathBuf], admin: SocketAddr, kong_admin: SocketAddr) {
    let g = format!("http://127.0.0.1:{GATEWAY_PORT}");
    let k = format!("http://127.0.0.1:{KONG_PORT}");
    let configs: Vec<String> = configs.iter().map(|p| p.display().to_string()).collect();
    println!(
        "\
meshgate demo: a gateway, a mesh listener, a Kong-style API edge and four services on loopback.

  gateway         {g}  (Istio Gateway + VirtualServices)
  mesh listener   http://127.0.0.1:{MESH_PORT}  (what a sidecar's outbound listener does)
  API edge        {k}  (Kong decK: key-auth, rate limiting, 90/10 upstream canary)
  Kong Admin API  http://{kong_admin}  (state in SQLite; changes apply at once)
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

  curl -i {k}/api/catalog                                # 401: no API key
  curl -i -H 'apikey: demo-key' {k}/api/catalog          # 200, with X-RateLimit-* headers (30 a minute)
  curl -X POST http://{kong_admin}/consumers --data username=you
  curl -X POST http://{kong_admin}/consumers/you/key-auth --data key=your-key
  curl -H 'apikey: your-key' {k}/api/catalog             # a consumer added through the Admin API

Ctrl-C stops everything.",
        configs.join(", ")
    );
}
