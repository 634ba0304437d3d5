//! `meshgate`: one binary for the API gateway and the service mesh.

mod allocator;
mod demo;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use meshgate_model::CompileOptions;
use meshgate_proxy::ProxyOptions;
use meshgate_proxy::access_log::{AccessLogFormat, AccessLogOptions};
use meshgate_proxy::kong_store::StoreLocation;

/// The Admin API's database when none is given: a SQLite file in the working directory.
const DEFAULT_ADMIN_DATABASE: &str = "meshgate-admin.db";

#[derive(Parser)]
#[command(name = "meshgate", version, about = "Service mesh and API gateway in one binary")]
struct Cli {
    /// Log filter, e.g. `info`, `debug`, `meshgate_proxy=debug` (also RUST_LOG).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a standalone data plane from config files (no control plane).
    Proxy(Box<ProxyArgs>),
    /// Run a gateway and a demo shop on loopback.
    Demo(DemoArgs),
    /// Validate configuration files without serving them (like `istioctl analyze`): prints
    /// every finding with severity, file, resource and field; exits 0 only without errors.
    Analyze(AnalyzeArgs),
    /// Import a decK file into the Admin API's state, or export that state as decK.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(clap::Subcommand)]
enum ConfigCommand {
    /// Validate a decK file and make it the Admin API's state (a running proxy applies it).
    Import {
        file: PathBuf,
        /// The Admin API's database (`--admin-api-database` of the proxy).
        #[arg(long, env = "MESHGATE_ADMIN_DATABASE", default_value = DEFAULT_ADMIN_DATABASE)]
        database: String,
    },
    /// Print the Admin API's state as a decK file (like `deck gateway dump`).
    Export {
        #[arg(long, env = "MESHGATE_ADMIN_DATABASE", default_value = DEFAULT_ADMIN_DATABASE)]
        database: String,
        /// Keep every entity's id (otherwise only ids other entities refer to are kept).
        #[arg(long)]
        with_id: bool,
    },
}

#[derive(clap::Args)]
struct AnalyzeArgs {
    /// YAML files or folders.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Labels of the proxy the config is meant for (default `istio=ingressgateway`).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Serve the Gateway API GatewayClasses with this `controllerName`.
    #[arg(long, default_value = meshgate_model::DEFAULT_CONTROLLER_NAME)]
    controller_name: String,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// A YAML file or a folder of them (multi-document). Repeatable. Reloaded on change.
    #[arg(long, short, required_unless_present = "admin_api")]
    config: Vec<PathBuf>,
    /// Address the listeners bind to.
    #[arg(long, default_value = "0.0.0.0")]
    bind_address: IpAddr,
    /// Admin listener: /ready /healthz /config_dump /stats/prometheus.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Worker threads (default: the number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// This proxy's labels, matched against Istio Gateway selectors
    /// (default `istio=ingressgateway`). Repeatable: `--label istio=ingressgateway`.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Serve an outbound (sidecar-style) listener on this port for VirtualServices bound to
    /// the `mesh` gateway and every known service host.
    #[arg(long)]
    mesh_port: Option<u16>,
    /// Serve the Gateway API GatewayClasses with this `controllerName`.
    #[arg(long, default_value = meshgate_model::DEFAULT_CONTROLLER_NAME)]
    controller_name: String,
    /// Kong decK files: the proxy listener's address (Kong's `proxy_listen`; default port
    /// 8000 on --bind-address). Repeatable.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Kong decK files: TLS proxy listeners serving the decK `certificates` by SNI (Kong's
    /// `proxy_listen ... ssl`; default port 8443 when there are certificates and no
    /// --listen). Repeatable.
    #[arg(long)]
    listen_tls: Vec<SocketAddr>,
    /// On SIGTERM/SIGINT: stop reporting ready and let requests in flight finish for at most
    /// this long (e.g. `10s`, `500ms`) before exiting.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: std::time::Duration,
    /// Close an HTTP/1.1 connection whose client takes longer than this to send a request
    /// head, counting from when the connection starts waiting for one, so idle keep-alive time
    /// counts too (Envoy's `request_headers_timeout` starts at the first byte instead); `0s`
    /// turns it off. Checked every half second.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    request_headers_timeout: std::time::Duration,
    /// Send GOAWAY to, and close, an HTTP/2 connection that has had no open stream for this
    /// long (Envoy's `idle_timeout`, 1 hour by default there too); `0s` turns it off. An idle
    /// HTTP/1.1 connection is bounded by --request-headers-timeout.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    idle_timeout: std::time::Duration,
    /// What serves HTTP/2 to clients: meshgate's own codec, or hyper with the `h2` crate
    /// (the implementation used before; kept as a fallback).
    #[arg(long, value_enum, default_value = "meshgate")]
    http2_server: Http2ServerArg,
    /// What serves HTTP/1.1 to clients: meshgate's own codec, or hyper's server (the
    /// implementation used before; kept as a fallback). Upgrade requests (WebSocket,
    /// CONNECT) are served by hyper either way.
    #[arg(long, value_enum, default_value = "meshgate")]
    http1_server: Http1ServerArg,
    /// Write an access log line per request to this file (`-` for standard output), in
    /// Envoy's default format, or JSON with `--access-log-format json`.
    #[arg(long)]
    access_log: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    access_log_format: LogFormat,
    /// Serve a Kong-compatible Admin API here (e.g. 127.0.0.1:8001).
    #[arg(long)]
    admin_api: Option<SocketAddr>,
    /// Required as `Kong-Admin-Token` on Admin API requests; mandatory when the Admin API is
    /// reachable beyond loopback (also from MESHGATE_ADMIN_TOKEN).
    #[arg(long)]
    admin_api_token: Option<String>,
    /// Where the Admin API keeps its state: a SQLite file (created when missing) or a
    /// `postgres://user:password@host:port/db` URL shared by several instances.
    #[arg(long, env = "MESHGATE_ADMIN_DATABASE", default_value = DEFAULT_ADMIN_DATABASE)]
    admin_api_database: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Http2ServerArg {
    Meshgate,
    Hyper,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Http1ServerArg {
    Meshgate,
    Hyper,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Serve this config instead of the built-in demo/istio.yaml.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    meshgate_model::duration::parse(s)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label must be KEY=VALUE, got `{s}`")),
    }
}

fn main() {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Proxy(args) => run_proxy(*args),
        Command::Analyze(args) => analyze(args),
        Command::Config(command) => config(command),
        Command::Demo(args) => demo::run(demo::DemoArgs {
            config: args.config,
            admin_addr: args.admin_addr,
            workers: args.workers.max(1),
        }),
    };
    if let Err(e) = result {
        eprintln!("meshgate: {e:#}");
        std::process::exit(1);
    }
}

/// `meshgate config import|export`: decK files in and out of the Admin API's state file.
fn config(command: ConfigCommand) -> anyhow::Result<()> {
    let read_deck = |path: &PathBuf| -> anyhow::Result<serde_json::Value> {
        let docs = meshgate_model::source::read_file(path).map_err(|f| anyhow::anyhow!("{f}"))?;
        match docs.into_iter().next() {
            Some(doc) if doc.kind == meshgate_model::kong::KIND => Ok(doc.body),
            _ => bail!("{}: not a decK file (no _format_version)", path.display()),
        }
    };
    match command {
        ConfigCommand::Import { file, database } => {
            let deck = read_deck(&file)?;
            let location = StoreLocation::parse(&database);
            let revision = single_thread_runtime()?
                .block_on(meshgate_proxy::kong_admin::import(
                    &location,
                    deck,
                    &CompileOptions::default(),
                ))
                .map_err(|e| {
                    println!("{e}");
                    anyhow::anyhow!("{} not imported", file.display())
                })?;
            println!("imported {} into {location} (revision {revision})", file.display());
            Ok(())
        }
        ConfigCommand::Export { database, with_id } => {
            let location = StoreLocation::parse(&database);
            let deck = single_thread_runtime()?
                .block_on(meshgate_proxy::kong_admin::export(&location, with_id))
                .map_err(anyhow::Error::msg)?;
            print!(
                "{}",
                meshgate_model::kong::to_deck_yaml(&deck).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
    }
}

fn single_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Runs the same load and validation as the proxy's reload path and reports the findings.
fn analyze(args: AnalyzeArgs) -> anyhow::Result<()> {
    let mut options = CompileOptions {
        controller_name: args.controller_name,
        ..CompileOptions::default()
    };
    if !args.labels.is_empty() {
        options.gateway_labels = args.labels.into_iter().collect();
    }
    let (findings, failed) = match meshgate_model::load(&args.paths, &options) {
        Ok(compiled) => (compiled.warnings, false),
        Err(findings) => (findings.0, true),
    };
    for finding in &findings {
        println!("{finding}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == meshgate_model::Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    if failed || errors > 0 {
        bail!("{errors} error(s), {warnings} warning(s)");
    }
    println!("no errors ({warnings} warning(s))");
    Ok(())
}

fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let workers = match args.workers {
        Some(0) => bail!("--workers must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let mut compile = CompileOptions::default();
    if !args.labels.is_empty() {
        compile.gateway_labels = args.labels.into_iter().collect::<BTreeMap<_, _>>();
    }
    compile.mesh_port = args.mesh_port;
    compile.controller_name = args.controller_name;
    compile.kong_listen = args.listen;
    compile.kong_listen_tls = args.listen_tls;
    let config_paths = args.config;
    let kong_admin = args.admin_api.map(|addr| meshgate_proxy::kong_admin::KongAdminOptions {
        addr,
        token: args
            .admin_api_token
            .clone()
            .or_else(|| std::env::var("MESHGATE_ADMIN_TOKEN").ok().filter(|t| !t.is_empty())),
        database: StoreLocation::parse(&args.admin_api_database),
    });
    let options = ProxyOptions {
        config_paths,
        bind_address: args.bind_address,
        admin_addr: args.admin_addr,
        workers,
        compile,
        drain_timeout: args.drain_timeout,
        request_headers_timeout: (!args.request_headers_timeout.is_zero()).then_some(args.request_headers_timeout),
        idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
        http2_server: match args.http2_server {
            Http2ServerArg::Meshgate => meshgate_proxy::Http2Server::Meshgate,
            Http2ServerArg::Hyper => meshgate_proxy::Http2Server::Hyper,
        },
        http1_server: match args.http1_server {
            Http1ServerArg::Meshgate => meshgate_proxy::Http1Server::Meshgate,
            Http1ServerArg::Hyper => meshgate_proxy::Http1Server::Hyper,
        },
        kong_admin,
        access_log: args.access_log.map(|path| AccessLogOptions {
            path,
            format: match args.access_log_format {
                LogFormat::Text => AccessLogFormat::Text,
                LogFormat::Json => AccessLogFormat::Json,
            },
        }),
    };
    meshgate_proxy::run(options)
        .map_err(anyhow::Error::msg)
        .context("proxy")
}

#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;
