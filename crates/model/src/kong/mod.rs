//! Kong declarative configuration (decK files, `_format_version` "3.0" or "2.1") → snapshot.
//!
//! Services become clusters (an upstream entity's targets, or the service's own host), routes
//! become snapshot routes on the Kong proxy listener (`--listen`, Kong's `proxy_listen`,
//! default port 8000), ordered by the priority Kong's `traditional_compatible` router gives
//! them: more matching fields first, then plain (non-wildcard) hosts, more headers, regex paths
//! before prefixes, `regex_priority`, longer prefixes; a route whose paths differ in kind or
//! length is split into one route per group as Kong does. Paths are rewritten as Kong's
//! `strip_path` and `path_handling: v0` do, and the Host sent upstream is the service's (or the
//! upstream's `host_header`) unless `preserve_host`.
//!
//! Plugins are chained per route in Kong's priority order, the most specific instance of each
//! winning (route, service, global; consumer-scoped instances above those, in a chain per
//! consumer). Security plugins meshgate does not implement make the configuration fail
//! (serving the routes without them would open them up); other unknown plugins are ignored
//! with a warning.

pub mod plugins;
pub mod schemas;
pub mod types;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use serde_json::Value;

use crate::CompileOptions;
use crate::diag::{Diag, at, decode_value};
use crate::istio::registry::Registry;
use crate::matcher::{HeaderMatch, PathMatch, StringMatch};
use crate::snapshot::{
    Cluster, ClusterId, ConnectionPoolSettings, CookieKey, DirectResponse, Discovery, Endpoint, Forward,
    GeneratedCookie, GeneratedCookieValue, HashKey, HeaderOps, Listener, ListenerFlavor, ListenerTls, LoadBalancer,
    PathRewrite, PemFile, RequestMatch, RetryOn, RetryPolicy, Rewrite, Route, RouteAction, RouteTable, Snapshot,
    TlsCertificate, UpstreamProtocol, UpstreamTls, VirtualHost, WeightedDestination,
};
use crate::source::Document;
use plugins::{Consumer, Consumers, PluginChain};
use types::{KongConfig, Plugin, Route as KongRoute, Service, Upstream};

/// The `kind` the source reader gives a decK file (it has no `kind` of its own).
pub const KIND: &str = "KongDeclarativeConfig";
pub const API_VERSION: &str = "configuration.konghq.com/declarative";
/// Kong's default `proxy_listen` port.
pub const DEFAULT_PROXY_PORT: u16 = 8000;

const FORMAT_VERSIONS: &[&str] = &["3.0", "2.1", "1.1"];
/// Kong's defaults for services.
const DEFAULT_RETRIES: u32 = 5;
const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Kong's default port for targets that name none.
const DEFAULT_TARGET_PORT: u16 = 8000;

/// Plugins whose absence would weaken security or protection: a config using them is refused
/// until meshgate implements them.
const ENFORCING_PLUGINS: &[&str] = &[
    "hmac-auth",
    "oauth2",
    "ldap-auth",
    "openid-connect",
    "rate-limiting-advanced",
    "bot-detection",
    "mtls-auth",
];

/// One Kong route (or one path group of it) ready to be placed on virtual hosts.
struct Entry {
    /// Lower-cased host patterns (`*.example.com` allowed); empty matches every host.
    hosts: Vec<String>,
    /// The route's `protocols` allow plain HTTP (`http`/`grpc`) and TLS (`https`/`grpcs`).
    plain: bool,
    tls: bool,
    priority: Priority,
    /// Declaration order, the last tie-breaker.
    seq: usize,
    route: Route,
}

/// Kong's `traditional_compatible` route priority; greater sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Priority {
    match_weight: u8,
    plain_hosts_only: bool,
    headers: u8,
    regex: bool,
    regex_priority: u64,
    prefix_length: usize,
}

/// What routes need from a compiled service.
struct ServiceTarget {
    name: String,
    cluster: ClusterId,
    /// The Host sent upstream when the route does not preserve the client's.
    host_header: String,
    path: String,
    retries: u32,
    read_timeout: Duration,
}

pub(crate) fn build(
    documents: &[Document],
    registry: &mut Registry<'_>,
    options: &CompileOptions,
    snapshot: &mut Snapshot,
    diag: &mut Diag,
) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut certificates: Vec<TlsCertificate> = Vec::new();
    let mut any = false;
    for doc in documents.iter().filter(|d| d.kind == KIND) {
        any = true;
        let Some(config) = decode_value::<KongConfig>(doc, &doc.body, "", diag) else {
            continue;
        };
        compile_config(doc, &config, registry, diag, &mut entries);
        if let Some(list) = &config.certificates {
            certificates.extend(compile_certificates(doc, list, diag));
        }
    }
    if !any {
        return;
    }
    let listens: Vec<(Option<IpAddr>, u16)> = if options.kong_listen.is_empty() {
        vec![(None, DEFAULT_PROXY_PORT)]
    } else {
        options.kong_listen.iter().map(|a| (Some(a.ip()), a.port())).collect()
    };
    for (address, port) in listens {
        snapshot.listeners.push(Listener {
            name: format!("{}_{port}", address.map_or("0.0.0.0".to_string(), |a| a.to_string())),
            address,
            port,
            tls: None,
            routes: route_table(&entries, port, false),
            flavor: ListenerFlavor::Kong,
        });
    }
    let tls_listens: Vec<(Option<IpAddr>, u16)> = if !options.kong_listen_tls.is_empty() {
        options
            .kong_listen_tls
            .iter()
            .map(|a| (Some(a.ip()), a.port()))
            .collect()
    } else if options.kong_listen.is_empty() && !certificates.is_empty() {
        vec![(None, DEFAULT_PROXY_TLS_PORT)]
    } else {
        Vec::new()
    };
    if certificates.is_empty() {
        if !options.kong_listen_tls.is_empty()
            && let Some(doc) = documents.iter().find(|d| d.kind == KIND)
        {
            diag.warn(
                doc,
                "certificates",
                "no certificate to serve: the TLS proxy listener (--listen-tls) starts once one is added",
            );
        }
        return;
    }
    // The TLS listener picks the most specific SNI match (exact names before wildcards, as
    // Kong does) and the first certificate when the client sends no or an unknown name: a
    // certificate without SNIs, Kong's default, goes first.
    certificates.sort_by_key(|c| c.sni_hosts.iter().all(|h| h != "*"));
    for (address, port) in tls_listens {
        snapshot.listeners.push(Listener {
            name: format!("{}_{port}", address.map_or("0.0.0.0".to_string(), |a| a.to_string())),
            address,
            port,
            tls: Some(ListenerTls {
                certificates: certificates.clone(),
                alpn: vec!["h2".to_string(), "http/1.1".to_string()],
                versions: Default::default(),
                client_certificates: None,
            }),
            routes: route_table(&entries, port, true),
            flavor: ListenerFlavor::Kong,
        });
    }
}

/// Kong's default TLS `proxy_listen` port.
const DEFAULT_PROXY_TLS_PORT: u16 = 8443;

/// One decK certificate: PEM certificate chain and key, served for its `snis`.
#[allow(dead_code)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeckCertificate {
    cert: String,
    key: String,
    cert_alt: Option<String>,
    key_alt: Option<String>,
    id: Option<String>,
    #[serde(default)]
    snis: Vec<DeckSni>,
    #[serde(default)]
    tags: Vec<String>,
    created_at: Option<Value>,
    updated_at: Option<Value>,
}

/// An SNI: decK writes `{name: ..}`; a bare name is accepted too.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum DeckSni {
    Name(String),
    Entity {
        name: String,
        #[allow(dead_code)]
        id: Option<String>,
        #[serde(default)]
        #[allow(dead_code)]
        tags: Vec<String>,
        #[allow(dead_code)]
        created_at: Option<Value>,
        #[allow(dead_code)]
        certificate: Option<Value>,
    },
}

fn compile_certificates(doc: &Document, list: &Value, diag: &mut Diag) -> Vec<TlsCertificate> {
    let Some(items) = list.as_array() else {
        diag.error(doc, "certificates", "expected a list");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, value) in items.iter().enumerate() {
        let path = format!("certificates[{i}]");
        let Some(cert) = decode_value::<DeckCertificate>(doc, value, &path, diag) else {
            continue;
        };
        if !cert.cert.contains("-----BEGIN CERTIFICATE-----") {
            diag.error(doc, at(&path, "cert"), "not a PEM certificate");
            continue;
        }
        if !cert.key.contains("PRIVATE KEY-----") {
            diag.error(doc, at(&path, "key"), "not a PEM private key");
            continue;
        }
        if cert.cert_alt.is_some() || cert.key_alt.is_some() {
            diag.warn(
                doc,
                at(&path, "cert_alt"),
                "alternate certificates are not supported yet; ignored",
            );
        }
        let mut sni_hosts = Vec::new();
        for (j, sni) in cert.snis.iter().enumerate() {
            let name = match sni {
                DeckSni::Name(n) | DeckSni::Entity { name: n, .. } => n.to_ascii_lowercase(),
            };
            if name.is_empty() || name.contains(['/', ':', ' ']) || name.chars().skip(1).any(|c| c == '*') {
                diag.error(doc, format!("{path}.snis[{j}]"), format!("invalid SNI {name:?}"));
                continue;
            }
            sni_hosts.push(name);
        }
        if sni_hosts.is_empty() {
            sni_hosts.push("*".to_string());
        }
        let name = cert.id.clone().unwrap_or_else(|| path.clone());
        out.push(TlsCertificate {
            sni_hosts,
            cert_path: std::path::PathBuf::from(format!("{}#certificates/{name}", doc.file.display())),
            key_path: std::path::PathBuf::from(format!("{}#certificates/{name}/key", doc.file.display())),
            cert_pem: cert.cert.into_bytes(),
            key_pem: cert.key.into_bytes(),
        });
    }
    out
}

fn compile_config(
    doc: &Document,
    config: &KongConfig,
    registry: &mut Registry<'_>,
    diag: &mut Diag,
    entries: &mut Vec<Entry>,
) {
    if !FORMAT_VERSIONS.contains(&config.format_version.as_str()) {
        diag.error(
            doc,
            "_format_version",
            format!(
                "unsupported decK format version {:?} (supported: {})",
                config.format_version,
                FORMAT_VERSIONS.join(", ")
            ),
        );
        return;
    }
    warn_unsupported_top_level(doc, config, diag);
    let consumers = Arc::new(compile_consumers(doc, &config.consumers, diag));

    // Upstreams by name and id, with top-level targets attached.
    let mut upstreams: HashMap<&str, (usize, Vec<&types::Target>)> = HashMap::new();
    for (i, upstream) in config.upstreams.iter().enumerate() {
        let targets: Vec<&types::Target> = upstream.targets.iter().collect();
        upstreams.insert(upstream.name.as_str(), (i, targets.clone()));
        if let Some(id) = &upstream.id {
            upstreams.insert(id.as_str(), (i, targets));
        }
    }
    for (i, target) in config.targets.iter().enumerate() {
        let key = target.upstream.as_ref().and_then(|u| u.key());
        match key.and_then(|k| upstreams.get_mut(k)) {
            Some((index, targets)) => {
                let index = *index;
                targets.push(target);
                // Keep the name and id entries in step.
                let upstream = &config.upstreams[index];
                for alias in [Some(upstream.name.as_str()), upstream.id.as_deref()]
                    .into_iter()
                    .flatten()
                {
                    if let Some((_, list)) = upstreams.get_mut(alias)
                        && !list.iter().any(|t| std::ptr::eq(*t, target))
                    {
                        list.push(target);
                    }
                }
            }
            None => diag.error(
                doc,
                format!("targets[{i}].upstream"),
                "names no upstream defined in this file",
            ),
        }
    }

    // Plugins nested in consumers are scoped to them.
    let mut nested_consumer_plugins: Vec<(String, String, Plugin)> = Vec::new();
    for (i, value) in config.consumers.iter().enumerate() {
        let Some(list) = value.get("plugins") else { continue };
        let key = value
            .get("id")
            .or_else(|| value.get("username"))
            .or_else(|| value.get("custom_id"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let path = format!("consumers[{i}].plugins");
        if let Some(plugins) = decode_value::<Vec<Plugin>>(doc, list, &path, diag) {
            for (j, plugin) in plugins.into_iter().enumerate() {
                nested_consumer_plugins.push((format!("{path}[{j}]"), key.clone(), plugin));
            }
        }
    }

    // Plugin instances by scope: global, per service (name or id), per route (name or id),
    // per consumer (with or without a route or service).
    let mut scoped = ScopedPlugins::default();
    let consumer_scoped = config
        .plugins
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let key = p.consumer.as_ref()?.key()?.to_string();
            Some((format!("plugins[{i}]"), key, p))
        })
        .chain(
            nested_consumer_plugins
                .iter()
                .map(|(path, key, p)| (path.clone(), key.clone(), p)),
        );
    for (path, key, plugin) in consumer_scoped {
        if NO_CONSUMER_PLUGINS.contains(&plugin.name.as_str()) {
            diag.error(
                doc,
                at(&path, "consumer"),
                format!("plugin {:?} cannot be scoped to a consumer (as in Kong)", plugin.name),
            );
            continue;
        }
        let Some(consumer) = consumers
            .list
            .iter()
            .position(|c| c.id == key || c.username.as_deref() == Some(key.as_str()))
        else {
            diag.error(doc, at(&path, "consumer"), format!("no consumer {key:?} in this file"));
            continue;
        };
        scoped.by_consumer.push(ConsumerScoped {
            consumer,
            route: plugin.route.as_ref().and_then(|r| r.key()),
            service: plugin.service.as_ref().and_then(|s| s.key()),
            path,
            plugin,
        });
    }
    for (i, plugin) in config.plugins.iter().enumerate() {
        let path = format!("plugins[{i}]");
        if plugin.consumer.is_some() {
            continue;
        }
        if plugin.consumer_group.is_some() {
            diag.error(
                doc,
                at(&path, "consumer_group"),
                "consumer-group-scoped plugins are not supported yet",
            );
            continue;
        }
        match (
            plugin.route.as_ref().and_then(|r| r.key()),
            plugin.service.as_ref().and_then(|s| s.key()),
        ) {
            (Some(route), _) => scoped.by_route.entry(route).or_default().push((path, plugin)),
            (None, Some(service)) => scoped.by_service.entry(service).or_default().push((path, plugin)),
            (None, None) => scoped.global.push((path, plugin)),
        }
    }

    let mut service_index: HashMap<&str, usize> = HashMap::new();
    let mut targets: Vec<Option<ServiceTarget>> = Vec::new();
    let mut seq = entries.len();
    for (si, service) in config.services.iter().enumerate() {
        let path = format!("services[{si}]");
        targets.push(compile_service(doc, &path, service, config, &upstreams, registry, diag));
        for key in [service.name.as_deref(), service.id.as_deref()].into_iter().flatten() {
            service_index.insert(key, si);
        }
    }
    let ctx = ChainContext {
        doc,
        config,
        scoped: &scoped,
        consumers: &consumers,
    };
    for (si, service) in config.services.iter().enumerate() {
        let Some(target) = &targets[si] else { continue };
        for (ri, route) in service.routes.iter().enumerate() {
            let path = format!("services[{si}].routes[{ri}]");
            let plugins = ctx.chain(si, route, &path, diag);
            compile_route(doc, &path, route, target, plugins, &mut seq, diag, entries);
        }
    }
    for (ri, route) in config.routes.iter().enumerate() {
        let path = format!("routes[{ri}]");
        let Some(key) = route.service.as_ref().and_then(|s| s.key()) else {
            diag.error(doc, at(&path, "service"), "a top-level route needs `service`");
            continue;
        };
        match service_index.get(key) {
            Some(&si) => {
                if let Some(target) = &targets[si] {
                    let plugins = ctx.chain(si, route, &path, diag);
                    compile_route(doc, &path, route, target, plugins, &mut seq, diag, entries);
                }
            }
            None => diag.error(
                doc,
                at(&path, "service"),
                format!("service {key:?} is not defined in this file"),
            ),
        }
    }
}

/// Plugin instances by where they are attached, with their field path.
#[derive(Default)]
struct ScopedPlugins<'c> {
    global: Vec<(String, &'c Plugin)>,
    by_service: HashMap<&'c str, Vec<(String, &'c Plugin)>>,
    by_route: HashMap<&'c str, Vec<(String, &'c Plugin)>>,
    by_consumer: Vec<ConsumerScoped<'c>>,
}

/// A plugin instance scoped to a consumer, maybe also to a route or service.
struct ConsumerScoped<'c> {
    /// Index in [`Consumers::list`].
    consumer: usize,
    route: Option<&'c str>,
    service: Option<&'c str>,
    path: String,
    plugin: &'c Plugin,
}

/// Plugins Kong's schemas mark `no_consumer`: they identify or filter consumers, so scoping
/// them to one makes no sense.
const NO_CONSUMER_PLUGINS: [&str; 9] = [
    "key-auth",
    "basic-auth",
    "jwt",
    "hmac-auth",
    "oauth2",
    "ldap-auth",
    "acl",
    "cors",
    "session",
];

/// A route's plugins: the chain run on requests, and the CORS policy the route answers with.
struct RoutePlugins {
    chain: Option<Arc<PluginChain>>,
    cors: Option<crate::snapshot::CorsPolicy>,
}

/// What building a route's plugin chain needs.
struct ChainContext<'a, 'c> {
    doc: &'a Document,
    config: &'c KongConfig,
    scoped: &'a ScopedPlugins<'c>,
    consumers: &'a Arc<Consumers>,
}

impl ChainContext<'_, '_> {
    /// The chain of `route` (of service `si`): for each plugin name the most specific instance
    /// (route, then service, then global), compiled, highest priority first.
    fn chain(&self, si: usize, route: &KongRoute, route_path: &str, diag: &mut Diag) -> RoutePlugins {
        let service = &self.config.services[si];
        let mut chosen: Vec<(String, &Plugin)> = Vec::new();
        fn add<'p>(path: String, plugin: &'p Plugin, chosen: &mut Vec<(String, &'p Plugin)>) {
            if !chosen.iter().any(|(_, p)| p.name == plugin.name) {
                chosen.push((path, plugin));
            }
        }
        // Most specific first: a later, less specific instance of the same name is skipped.
        for (i, plugin) in route.plugins.iter().enumerate() {
            add(format!("{route_path}.plugins[{i}]"), plugin, &mut chosen);
        }
        for key in [route.name.as_deref(), route.id.as_deref()].into_iter().flatten() {
            for (path, plugin) in self.scoped.by_route.get(key).into_iter().flatten() {
                add(path.clone(), plugin, &mut chosen);
            }
        }
        for (i, plugin) in service.plugins.iter().enumerate() {
            add(format!("services[{si}].plugins[{i}]"), plugin, &mut chosen);
        }
        for key in [service.name.as_deref(), service.id.as_deref()].into_iter().flatten() {
            for (path, plugin) in self.scoped.by_service.get(key).into_iter().flatten() {
                add(path.clone(), plugin, &mut chosen);
            }
        }
        for (path, plugin) in &self.scoped.global {
            add(path.clone(), plugin, &mut chosen);
        }
        let (plugins, cors) = self.compile_chosen(&chosen, diag);

        // Per consumer with plugins scoped to it on this route: the chain it continues with
        // once authenticated. Kong's precedence: consumer + route, then consumer + service,
        // then consumer alone, each above every instance not scoped to a consumer.
        let route_keys = [route.name.as_deref(), route.id.as_deref()];
        let service_keys = [service.name.as_deref(), service.id.as_deref()];
        let mut by_consumer = HashMap::new();
        let mut consumers: Vec<usize> = self.scoped.by_consumer.iter().map(|c| c.consumer).collect();
        consumers.sort_unstable();
        consumers.dedup();
        for consumer in consumers {
            let mut own: Vec<(String, &Plugin)> = Vec::new();
            let applies = |c: &&ConsumerScoped<'_>, on_route: bool, on_service: bool| {
                c.consumer == consumer
                    && c.route.is_some() == on_route
                    && c.service.is_some() == on_service
                    && c.route.is_none_or(|r| route_keys.contains(&Some(r)))
                    && c.service.is_none_or(|s| service_keys.contains(&Some(s)))
            };
            for (on_route, on_service) in [(true, true), (true, false), (false, true), (false, false)] {
                let enabled = |c: &&ConsumerScoped<'_>| c.plugin.enabled != Some(false);
                for c in self
                    .scoped
                    .by_consumer
                    .iter()
                    .filter(|c| applies(c, on_route, on_service) && enabled(c))
                {
                    add(c.path.clone(), c.plugin, &mut own);
                }
            }
            if own.is_empty() {
                continue;
            }
            for (path, plugin) in &chosen {
                add(path.clone(), plugin, &mut own);
            }
            let (consumer_plugins, _) = self.compile_chosen(&own, diag);
            by_consumer.insert(
                consumer,
                Arc::new(PluginChain {
                    plugins: consumer_plugins,
                    by_consumer: HashMap::new(),
                }),
            );
        }
        RoutePlugins {
            chain: (!plugins.is_empty() || !by_consumer.is_empty())
                .then(|| Arc::new(PluginChain { plugins, by_consumer })),
            cors,
        }
    }

    /// Compiles the chosen instances, highest priority first; CORS is returned apart.
    fn compile_chosen(
        &self,
        chosen: &[(String, &Plugin)],
        diag: &mut Diag,
    ) -> (Vec<plugins::Plugin>, Option<crate::snapshot::CorsPolicy>) {
        let mut plugins = Vec::new();
        let mut cors = None;
        for (path, plugin) in chosen {
            if plugin.enabled == Some(false) {
                continue;
            }
            match compile_plugin(self.doc, path, plugin, self.consumers, diag) {
                Some(plugins::Plugin::Cors(policy)) => cors = Some(policy),
                Some(compiled) => plugins.push(compiled),
                None => {}
            }
        }
        plugins.sort_by_key(|p| std::cmp::Reverse(p.priority()));
        (plugins, cors)
    }
}

fn warn_unsupported_top_level(doc: &Document, config: &KongConfig, diag: &mut Diag) {
    let unsupported: [(&str, bool); 14] = [
        ("_konnect", config.konnect.is_some()),
        ("consumer_groups", config.consumer_groups.is_some()),
        ("snis", config.snis.is_some()),
        ("vaults", config.vaults.is_some()),
        ("keys", config.keys.is_some()),
        ("key_sets", config.key_sets.is_some()),
        ("filter_chains", config.filter_chains.is_some()),
        ("parameters", config.parameters.is_some()),
        ("keyauth_credentials", config.keyauth_credentials.is_some()),
        ("basicauth_credentials", config.basicauth_credentials.is_some()),
        ("jwt_secrets", config.jwt_secrets.is_some()),
        ("acls", config.acls.is_some()),
        ("hmacauth_credentials", config.hmacauth_credentials.is_some()),
        ("oauth2_credentials", config.oauth2_credentials.is_some()),
    ];
    for (field, set) in unsupported {
        if set {
            diag.warn(doc, field, "not supported yet; ignored");
        }
    }
    if config.mtls_auth_credentials.is_some() {
        diag.warn(doc, "mtls_auth_credentials", "not supported yet; ignored");
    }
}

/// A decK consumer with the credentials meshgate reads.
/// Fields decK has that meshgate accepts without using are kept so unknown ones stay errors.
#[allow(dead_code)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeckConsumer {
    username: Option<String>,
    custom_id: Option<String>,
    id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    keyauth_credentials: Vec<DeckKey>,
    #[serde(default)]
    acls: Vec<DeckAcl>,
    #[serde(default)]
    basicauth_credentials: Vec<DeckBasic>,
    #[serde(default)]
    jwt_secrets: Vec<DeckJwt>,
    hmacauth_credentials: Option<Value>,
    oauth2_credentials: Option<Value>,
    mtls_auth_credentials: Option<Value>,
    plugins: Option<Value>,
    groups: Option<Value>,
    created_at: Option<Value>,
    updated_at: Option<Value>,
}

/// Fields decK has that meshgate accepts without using are kept so unknown ones stay errors.
#[allow(dead_code)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeckKey {
    key: String,
    id: Option<String>,
    ttl: Option<Value>,
    #[serde(default)]
    tags: Vec<String>,
    created_at: Option<Value>,
}

/// Fields decK has that meshgate accepts without using are kept so unknown ones stay errors.
#[allow(dead_code)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeckJwt {
    key: Option<String>,
    secret: Option<String>,
    rsa_public_key: Option<String>,
    algorithm: Option<String>,
    id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    created_at: Option<Value>,
}

#[allow(dead_code)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeckBasic {
    username: String,
    password: String,
    id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    created_at: Option<Value>,
}

#[allow(dead_code)]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeckAcl {
    group: String,
    id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    created_at: Option<Value>,
}

fn compile_consumers(doc: &Document, list: &[Value], diag: &mut Diag) -> Consumers {
    let mut consumers = Consumers::default();
    for (i, value) in list.iter().enumerate() {
        let path = format!("consumers[{i}]");
        let Some(consumer) = decode_value::<DeckConsumer>(doc, value, &path, diag) else {
            continue;
        };
        let Some(id) = consumer
            .id
            .clone()
            .or_else(|| consumer.username.clone())
            .or_else(|| consumer.custom_id.clone())
        else {
            diag.error(doc, &path, "a consumer needs a username or custom_id");
            continue;
        };
        for (field, set) in [
            ("hmacauth_credentials", consumer.hmacauth_credentials.is_some()),
            ("oauth2_credentials", consumer.oauth2_credentials.is_some()),
            ("mtls_auth_credentials", consumer.mtls_auth_credentials.is_some()),
            ("groups", consumer.groups.is_some()),
        ] {
            if set {
                diag.warn(doc, at(&path, field), "not supported yet; ignored");
            }
        }
        let index = consumers.list.len();
        for (k, key) in consumer.keyauth_credentials.iter().enumerate() {
            if key.key.is_empty() {
                diag.error(doc, format!("{path}.keyauth_credentials[{k}].key"), "must not be empty");
                continue;
            }
            if key.ttl.is_some() {
                diag.warn(
                    doc,
                    format!("{path}.keyauth_credentials[{k}].ttl"),
                    "key expiry is not supported yet; the key does not expire",
                );
            }
            let credential = key.id.clone().unwrap_or_else(|| format!("{id}-key-{k}"));
            if consumers.keys.insert(key.key.clone(), (index, credential)).is_some() {
                diag.error(
                    doc,
                    format!("{path}.keyauth_credentials[{k}].key"),
                    "this key is already given to a consumer",
                );
            }
        }
        for (b, basic) in consumer.basicauth_credentials.iter().enumerate() {
            let credential = basic.id.clone().unwrap_or_else(|| format!("{id}-basic-{b}"));
            let entry = (index, credential, basic.password.clone());
            if consumers.basic.insert(basic.username.clone(), entry).is_some() {
                diag.error(
                    doc,
                    format!("{path}.basicauth_credentials[{b}].username"),
                    "this username is already used by another credential",
                );
            }
        }
        for (j, secret) in consumer.jwt_secrets.iter().enumerate() {
            let jpath = format!("{path}.jwt_secrets[{j}]");
            let Some(key) = secret.key.clone().filter(|k| !k.is_empty()) else {
                diag.error(
                    doc,
                    at(&jpath, "key"),
                    "required (the value of the key claim, `iss` by default)",
                );
                continue;
            };
            let algorithm = secret.algorithm.clone().unwrap_or_else(|| "HS256".to_string());
            let (shared, public_key) = match algorithm.as_str() {
                "HS256" | "HS384" | "HS512" => match &secret.secret {
                    Some(s) if !s.is_empty() => (s.as_bytes().to_vec(), Vec::new()),
                    _ => {
                        diag.error(
                            doc,
                            at(&jpath, "secret"),
                            format!("required with algorithm {algorithm}"),
                        );
                        continue;
                    }
                },
                "RS256" | "RS384" | "RS512" | "ES256" | "ES384" => {
                    let Some(pem) = &secret.rsa_public_key else {
                        diag.error(
                            doc,
                            at(&jpath, "rsa_public_key"),
                            format!("required with algorithm {algorithm}"),
                        );
                        continue;
                    };
                    match plugins::public_key_from_pem(pem) {
                        Ok(k) => (Vec::new(), k),
                        Err(e) => {
                            diag.error(doc, at(&jpath, "rsa_public_key"), e);
                            continue;
                        }
                    }
                }
                other => {
                    diag.error(
                        doc,
                        at(&jpath, "algorithm"),
                        format!("unsupported algorithm {other:?} (HS256/384/512, RS256/384/512, ES256/384)"),
                    );
                    continue;
                }
            };
            let entry = plugins::JwtSecret {
                consumer: index,
                id: secret.id.clone().unwrap_or_else(|| format!("{id}-jwt-{j}")),
                algorithm,
                secret: shared,
                public_key,
            };
            if consumers.jwt.insert(key, entry).is_some() {
                diag.error(
                    doc,
                    at(&jpath, "key"),
                    "this key is already used by another jwt credential",
                );
            }
        }
        consumers.list.push(Consumer {
            id,
            username: consumer.username,
            custom_id: consumer.custom_id,
            groups: consumer.acls.into_iter().map(|a| a.group).collect(),
        });
    }
    consumers
}

/// The Redis server of `policy: redis`, from `redis.*` (Kong 3.7+) or the flat `redis_*`.
fn redis_target(
    doc: &Document,
    config_path: &str,
    c: &plugins::RateLimitingConfig,
    diag: &mut Diag,
) -> Option<plugins::RedisTarget> {
    let nested = c.redis.as_ref();
    let text = |v: &Option<Value>| v.as_ref().and_then(|v| v.as_str().map(str::to_string));
    let number = |v: &Option<Value>| v.as_ref().and_then(Value::as_u64);
    let host = nested.and_then(|r| r.host.clone()).or_else(|| text(&c.redis_host));
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        diag.error(doc, at(config_path, "redis.host"), "required with policy redis");
        return None;
    };
    if nested.and_then(|r| r.ssl).unwrap_or(false) || c.redis_ssl.as_ref().and_then(Value::as_bool).unwrap_or(false) {
        diag.error(doc, at(config_path, "redis.ssl"), "TLS to Redis is not supported yet");
        return None;
    }
    let port = nested
        .and_then(|r| r.port)
        .or_else(|| number(&c.redis_port).and_then(|p| u16::try_from(p).ok()))
        .unwrap_or(6379);
    Some(plugins::RedisTarget {
        host,
        port,
        username: nested
            .and_then(|r| r.username.clone())
            .or_else(|| text(&c.redis_username)),
        password: nested
            .and_then(|r| r.password.clone())
            .or_else(|| text(&c.redis_password)),
        database: nested
            .and_then(|r| r.database)
            .or_else(|| number(&c.redis_database).and_then(|d| u32::try_from(d).ok()))
            .unwrap_or(0),
        timeout_ms: nested
            .and_then(|r| r.timeout)
            .or_else(|| number(&c.redis_timeout))
            .unwrap_or(2000),
    })
}

/// The `anonymous` consumer of an auth plugin: `Some(None)` when unset, `None` (an error)
/// when it names no consumer.
fn resolve_anonymous(
    doc: &Document,
    config_path: &str,
    reference: Option<&str>,
    consumers: &Consumers,
    diag: &mut Diag,
) -> Option<Option<usize>> {
    match reference.filter(|a| !a.is_empty()) {
        Some(reference) => match consumers.find(reference) {
            Some(i) => Some(Some(i)),
            None => {
                diag.error(
                    doc,
                    at(config_path, "anonymous"),
                    format!("no consumer {reference:?} in this file"),
                );
                None
            }
        },
        None => Some(None),
    }
}

/// request-/response-transformer: `name:value` pairs (`old:new` for rename), header names
/// lower-cased; body and JSON edits are not supported yet and are errors.
fn transformer(
    doc: &Document,
    config_path: &str,
    c: &plugins::TransformerConfig,
    request: bool,
    diag: &mut Diag,
) -> Option<plugins::Transformer> {
    let mut out = plugins::Transformer {
        method: c.http_method.clone(),
        uri: c.replace.uri.clone(),
        ..Default::default()
    };
    if !request && (c.http_method.is_some() || c.replace.uri.is_some()) {
        diag.error(
            doc,
            config_path,
            "http_method and replace.uri belong to request-transformer",
        );
        return None;
    }
    let sections = [
        ("remove", &c.remove),
        ("rename", &c.rename),
        ("replace", &c.replace),
        ("add", &c.add),
        ("append", &c.append),
    ];
    for (section, values) in sections {
        if !values.body.is_empty() || !values.json.is_empty() || !values.json_types.is_empty() {
            diag.error(
                doc,
                format!("{config_path}.{section}"),
                "body and json transformations are not supported yet",
            );
            return None;
        }
        if !request && !values.querystring.is_empty() {
            diag.error(
                doc,
                format!("{config_path}.{section}.querystring"),
                "only request-transformer edits the query string",
            );
            return None;
        }
        for (field, list, ops) in [
            ("headers", &values.headers, &mut out.headers),
            ("querystring", &values.querystring, &mut out.querystring),
        ] {
            for (i, item) in list.iter().enumerate() {
                let lower = |s: &str| {
                    if field == "headers" {
                        s.trim().to_ascii_lowercase()
                    } else {
                        s.trim().to_string()
                    }
                };
                if section == "remove" {
                    ops.remove.push(lower(item));
                    continue;
                }
                let Some((name, value)) = item.split_once(':') else {
                    diag.error(
                        doc,
                        format!("{config_path}.{section}.{field}[{i}]"),
                        format!("expected name:value, got {item:?}"),
                    );
                    return None;
                };
                let pair = (lower(name), value.trim().to_string());
                match section {
                    "rename" => ops.rename.push((pair.0, lower(&pair.1))),
                    "replace" => ops.replace.push(pair),
                    "add" => ops.add.push(pair),
                    _ => ops.append.push(pair),
                }
            }
        }
    }
    Some(out)
}

/// Compiles one plugin instance; `None` when it is ignored (warned) or invalid (error).
fn compile_plugin(
    doc: &Document,
    path: &str,
    plugin: &Plugin,
    consumers: &Arc<Consumers>,
    diag: &mut Diag,
) -> Option<plugins::Plugin> {
    let empty = Value::Object(Default::default());
    let config = plugin.config.as_ref().unwrap_or(&empty);
    let config_path = at(path, "config");
    match plugin.name.as_str() {
        "key-auth" => {
            let c: plugins::KeyAuthConfig = decode_value(doc, config, &config_path, diag)?;
            if c.key_in_body {
                diag.warn(
                    doc,
                    at(&config_path, "key_in_body"),
                    "keys in the body are not read yet: such requests are refused",
                );
            }
            let anonymous = resolve_anonymous(doc, &config_path, c.anonymous.as_deref(), consumers, diag)?;
            Some(plugins::Plugin::KeyAuth(plugins::KeyAuth {
                key_names: c.key_names.iter().map(|k| k.to_ascii_lowercase()).collect(),
                key_in_header: c.key_in_header,
                key_in_query: c.key_in_query,
                hide_credentials: c.hide_credentials,
                run_on_preflight: c.run_on_preflight,
                anonymous,
                realm: c.realm.unwrap_or_else(|| "kong".to_string()),
                consumers: consumers.clone(),
            }))
        }
        "jwt" => {
            let c: plugins::JwtConfig = decode_value(doc, config, &config_path, diag)?;
            if let Some(bad) = c.claims_to_verify.iter().find(|c| *c != "exp" && *c != "nbf") {
                diag.error(
                    doc,
                    at(&config_path, "claims_to_verify"),
                    format!("{bad:?} cannot be verified (exp, nbf)"),
                );
                return None;
            }
            let anonymous = resolve_anonymous(doc, &config_path, c.anonymous.as_deref(), consumers, diag)?;
            Some(plugins::Plugin::Jwt(plugins::Jwt {
                uri_param_names: c.uri_param_names,
                cookie_names: c.cookie_names,
                header_names: c.header_names.iter().map(|h| h.to_ascii_lowercase()).collect(),
                claims_to_verify: c.claims_to_verify,
                key_claim_name: c.key_claim_name,
                secret_is_base64: c.secret_is_base64,
                anonymous,
                run_on_preflight: c.run_on_preflight,
                maximum_expiration: c.maximum_expiration,
                consumers: consumers.clone(),
            }))
        }
        "basic-auth" => {
            let c: plugins::BasicAuthConfig = decode_value(doc, config, &config_path, diag)?;
            let anonymous = resolve_anonymous(doc, &config_path, c.anonymous.as_deref(), consumers, diag)?;
            Some(plugins::Plugin::BasicAuth(plugins::BasicAuth {
                hide_credentials: c.hide_credentials,
                anonymous,
                realm: c.realm.unwrap_or_else(|| "service".to_string()),
                consumers: consumers.clone(),
            }))
        }
        "request-size-limiting" => {
            let c: plugins::RequestSizeLimitingConfig = decode_value(doc, config, &config_path, diag)?;
            let unit: u64 = match c.size_unit.as_str() {
                "megabytes" => 1 << 20,
                "kilobytes" => 1 << 10,
                "bytes" => 1,
                other => {
                    diag.error(
                        doc,
                        at(&config_path, "size_unit"),
                        format!("unknown unit {other:?} (megabytes, kilobytes, bytes)"),
                    );
                    return None;
                }
            };
            Some(plugins::Plugin::RequestSizeLimiting(plugins::RequestSizeLimiting {
                limit: c.allowed_payload_size.saturating_mul(unit),
                require_content_length: c.require_content_length,
            }))
        }
        "request-transformer" | "response-transformer" => {
            let c: plugins::TransformerConfig = decode_value(doc, config, &config_path, diag)?;
            let transformer = transformer(doc, &config_path, &c, plugin.name == "request-transformer", diag)?;
            Some(if plugin.name == "request-transformer" {
                plugins::Plugin::RequestTransformer(transformer)
            } else {
                plugins::Plugin::ResponseTransformer(transformer)
            })
        }
        "file-log" => {
            let c: plugins::FileLogConfig = decode_value(doc, config, &config_path, diag)?;
            if c.path.is_empty() {
                diag.error(doc, at(&config_path, "path"), "required");
                return None;
            }
            if c.custom_fields_by_lua.is_some() {
                diag.warn(
                    doc,
                    at(&config_path, "custom_fields_by_lua"),
                    "Lua is not supported; ignored",
                );
            }
            // Relative paths are relative to the decK file, as meshgate reads other paths.
            let path = std::path::Path::new(&c.path);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                doc.file.parent().unwrap_or(std::path::Path::new(".")).join(path)
            };
            Some(plugins::Plugin::FileLog(plugins::FileLog { path }))
        }
        "http-log" => {
            let c: plugins::HttpLogConfig = decode_value(doc, config, &config_path, diag)?;
            if !c.http_endpoint.starts_with("http://") {
                diag.error(
                    doc,
                    at(&config_path, "http_endpoint"),
                    "only http:// endpoints are supported (no TLS to log servers yet)",
                );
                return None;
            }
            if c.custom_fields_by_lua.is_some() {
                diag.warn(
                    doc,
                    at(&config_path, "custom_fields_by_lua"),
                    "Lua is not supported; ignored",
                );
            }
            Some(plugins::Plugin::HttpLog(plugins::HttpLog {
                endpoint: c.http_endpoint,
                method: c.method.to_ascii_uppercase(),
                content_type: c.content_type,
                timeout_ms: c.timeout.max(1),
                headers: c.headers.into_iter().collect(),
            }))
        }
        "cors" => {
            let c: plugins::CorsConfig = decode_value(doc, config, &config_path, diag)?;
            if c.preflight_continue {
                diag.warn(
                    doc,
                    at(&config_path, "preflight_continue"),
                    "not supported yet: preflights are answered by meshgate",
                );
            }
            let origins = if c.origins.is_empty() {
                vec!["*".to_string()]
            } else {
                c.origins
            };
            Some(plugins::Plugin::Cors(crate::snapshot::CorsPolicy {
                allow_origins: origins,
                allow_methods: c.methods.unwrap_or_else(|| {
                    [
                        "GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT",
                    ]
                    .iter()
                    .map(|m| m.to_string())
                    .collect()
                }),
                allow_headers: if c.headers.is_empty() {
                    vec!["*".to_string()]
                } else {
                    c.headers.iter().map(|h| h.to_ascii_lowercase()).collect()
                },
                expose_headers: c.exposed_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
                allow_credentials: c.credentials,
                max_age: c.max_age,
                origin_matches: Vec::new(),
                forward_unmatched_preflights: false,
            }))
        }
        "ip-restriction" => {
            let c: plugins::IpRestrictionConfig = decode_value(doc, config, &config_path, diag)?;
            let parse = |list: &Option<Vec<String>>, field: &str, diag: &mut Diag| -> Option<Vec<plugins::IpNet>> {
                let mut out = Vec::new();
                for (i, text) in list.iter().flatten().enumerate() {
                    match plugins::IpNet::parse(text) {
                        Ok(net) => out.push(net),
                        Err(e) => {
                            diag.error(doc, format!("{config_path}.{field}[{i}]"), e);
                            return None;
                        }
                    }
                }
                Some(out)
            };
            let allow = parse(&c.allow, "allow", diag)?;
            let deny = parse(&c.deny, "deny", diag)?;
            if allow.is_empty() && deny.is_empty() {
                diag.error(doc, &config_path, "at least one of allow or deny is required");
                return None;
            }
            Some(plugins::Plugin::IpRestriction(plugins::IpRestriction {
                allow,
                deny,
                status: c.status,
                message: c
                    .message
                    .unwrap_or_else(|| "Your IP address is not allowed".to_string()),
            }))
        }
        "acl" => {
            let c: plugins::AclConfig = decode_value(doc, config, &config_path, diag)?;
            let allow = c.allow.unwrap_or_default();
            let deny = c.deny.unwrap_or_default();
            if allow.is_empty() == deny.is_empty() {
                diag.error(doc, &config_path, "exactly one of allow or deny is required");
                return None;
            }
            Some(plugins::Plugin::Acl(plugins::Acl {
                allow,
                deny,
                hide_groups_header: c.hide_groups_header,
                consumers: consumers.clone(),
            }))
        }
        "rate-limiting" => {
            let c: plugins::RateLimitingConfig = decode_value(doc, config, &config_path, diag)?;
            let limits: Vec<(plugins::Window, u64)> = plugins::Window::ALL
                .iter()
                .filter_map(|(window, name)| {
                    let value = match *name {
                        "second" => c.second,
                        "minute" => c.minute,
                        "hour" => c.hour,
                        "day" => c.day,
                        "month" => c.month,
                        _ => c.year,
                    };
                    value.map(|v| (*window, v))
                })
                .collect();
            if limits.is_empty() {
                diag.error(
                    doc,
                    &config_path,
                    "at least one of second, minute, hour, day, month or year is required",
                );
                return None;
            }
            let redis = match c.policy.as_str() {
                "local" => None,
                "cluster" => {
                    diag.warn(
                        doc,
                        at(&config_path, "policy"),
                        "policy cluster needs Kong's database: counters are kept per meshgate process (policy local)",
                    );
                    None
                }
                "redis" => Some(redis_target(doc, &config_path, &c, diag)?),
                other => {
                    diag.error(
                        doc,
                        at(&config_path, "policy"),
                        format!("unknown policy {other:?} (local, cluster, redis)"),
                    );
                    return None;
                }
            };
            let limit_by = match c.limit_by.as_str() {
                "consumer" => plugins::LimitBy::Consumer,
                "credential" => plugins::LimitBy::Credential,
                "ip" => plugins::LimitBy::Ip,
                "service" => plugins::LimitBy::Service(path.to_string()),
                "header" => match c.header_name.filter(|h| !h.is_empty()) {
                    Some(h) => plugins::LimitBy::Header(h.to_ascii_lowercase()),
                    None => {
                        diag.error(doc, at(&config_path, "header_name"), "required with limit_by header");
                        return None;
                    }
                },
                "path" => match c.path.filter(|p| !p.is_empty()) {
                    Some(p) => plugins::LimitBy::Path(p),
                    None => {
                        diag.error(doc, at(&config_path, "path"), "required with limit_by path");
                        return None;
                    }
                },
                other => {
                    diag.error(
                        doc,
                        at(&config_path, "limit_by"),
                        format!("unknown value {other:?} (consumer, credential, ip, service, header, path)"),
                    );
                    return None;
                }
            };
            Some(plugins::Plugin::RateLimiting(plugins::RateLimiting {
                // Identical on every node loading the same file, so Redis counters are shared.
                instance: plugin.id.clone().unwrap_or_else(|| path.to_string()),
                limits,
                limit_by,
                hide_client_headers: c.hide_client_headers,
                error_code: c.error_code,
                error_message: c.error_message,
                redis,
                fault_tolerant: c.fault_tolerant,
            }))
        }
        "request-termination" => {
            let c: plugins::RequestTerminationConfig = decode_value(doc, config, &config_path, diag)?;
            if !(100..=599).contains(&c.status_code) {
                diag.error(doc, at(&config_path, "status_code"), "must be 100..599");
                return None;
            }
            if c.echo || c.trigger.is_some() {
                diag.warn(
                    doc,
                    &config_path,
                    "echo and trigger are not supported yet; every request is terminated",
                );
            }
            Some(plugins::Plugin::RequestTermination(plugins::RequestTermination {
                status: c.status_code,
                message: c.message,
                body: c.body,
                content_type: c.content_type,
            }))
        }
        "proxy-cache" => {
            let c: plugins::ProxyCacheConfig = decode_value(doc, config, &config_path, diag)?;
            if c.strategy != "memory" {
                diag.error(
                    doc,
                    at(&config_path, "strategy"),
                    format!("strategy {:?} is not supported (memory)", c.strategy),
                );
                return None;
            }
            if c.cache_control {
                diag.warn(
                    doc,
                    at(&config_path, "cache_control"),
                    "Cache-Control is not followed yet: cache_ttl applies",
                );
            }
            if c.cache_ttl == 0 {
                diag.error(doc, at(&config_path, "cache_ttl"), "must be at least 1 (seconds)");
                return None;
            }
            Some(plugins::Plugin::ProxyCache(plugins::ProxyCache {
                request_methods: c.request_method.iter().map(|m| m.to_ascii_uppercase()).collect(),
                response_codes: c.response_code,
                content_types: c.content_type.iter().map(|t| t.to_ascii_lowercase()).collect(),
                ttl: Duration::from_secs(c.cache_ttl),
                vary_headers: c.vary_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
                vary_query_params: c.vary_query_params,
                instance: plugin.id.clone().unwrap_or_else(|| path.to_string()),
            }))
        }
        "prometheus" => {
            // meshgate's metrics are always collected; the plugin's options choose what Kong
            // would add, which meshgate's series already cover. Accepted without effect.
            let known = [
                "per_consumer",
                "status_code_metrics",
                "latency_metrics",
                "bandwidth_metrics",
                "upstream_health_metrics",
                "ai_metrics",
                "wasm_metrics",
            ];
            if let Some(bad) = config
                .as_object()
                .and_then(|m| m.keys().find(|k| !known.contains(&k.as_str())))
            {
                diag.error(doc, at(&config_path, bad), format!("unknown field `{bad}`"));
            }
            None
        }
        "correlation-id" => {
            let c: plugins::CorrelationIdConfig = decode_value(doc, config, &config_path, diag)?;
            if !matches!(c.generator.as_str(), "uuid" | "uuid#counter" | "tracker") {
                diag.error(
                    doc,
                    at(&config_path, "generator"),
                    "must be uuid, uuid#counter or tracker",
                );
                return None;
            }
            Some(plugins::Plugin::CorrelationId(plugins::CorrelationId {
                header_name: c.header_name,
                generator: c.generator,
                echo_downstream: c.echo_downstream,
            }))
        }
        name if ENFORCING_PLUGINS.contains(&name) => {
            diag.error(
                doc,
                at(path, "name"),
                format!("plugin {name} is not supported yet; refusing to serve these routes without it"),
            );
            None
        }
        name => {
            diag.warn(
                doc,
                at(path, "name"),
                format!("plugin {name} is not supported yet; ignored"),
            );
            None
        }
    }
}

/// The parts of a service URL: `protocol://host[:port][/path]`.
fn parse_url(url: &str) -> Option<(String, String, Option<u16>, Option<String>)> {
    let (protocol, rest) = url.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(rest[i..].to_string())),
        None => (rest, None),
    };
    let (host, port) = split_host_port(authority)?;
    Some((protocol.to_ascii_lowercase(), host, port, path))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.is_empty() {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host.to_string(), Some(port.parse().ok()?))),
        Some(_) => Some((authority.to_string(), None)),
        None => Some((authority.to_string(), None)),
    }
}

fn compile_service(
    doc: &Document,
    path: &str,
    service: &Service,
    config: &KongConfig,
    upstreams: &HashMap<&str, (usize, Vec<&types::Target>)>,
    registry: &mut Registry<'_>,
    diag: &mut Diag,
) -> Option<ServiceTarget> {
    let name = service
        .name
        .clone()
        .or_else(|| service.id.clone())
        .unwrap_or_else(|| path.to_string());
    for (field, set) in [("tls_verify_depth", service.tls_verify_depth.is_some())] {
        if set {
            diag.warn(doc, at(path, field), "not supported yet; ignored");
        }
    }
    if service.enabled == Some(false) {
        diag.warn(doc, at(path, "enabled"), "service disabled: its routes are not served");
        return None;
    }
    let (protocol, host, port, url_path) = match &service.url {
        Some(url) => match parse_url(url) {
            Some(parts) => parts,
            None => {
                diag.error(doc, at(path, "url"), format!("not a URL: {url:?}"));
                return None;
            }
        },
        None => {
            let Some(host) = service.host.clone() else {
                diag.error(doc, path, "a service needs `url` or `host`");
                return None;
            };
            (
                service.protocol.clone().unwrap_or_else(|| "http".to_string()),
                host,
                service.port,
                service.path.clone(),
            )
        }
    };
    let upstream_protocol = match protocol.as_str() {
        "http" | "https" => UpstreamProtocol::Http1,
        "grpc" | "grpcs" => UpstreamProtocol::Http2,
        other => {
            diag.error(
                doc,
                at(path, "protocol"),
                format!("protocol {other:?} is not an HTTP protocol (http, grpc)"),
            );
            return None;
        }
    };
    let tls = if matches!(protocol.as_str(), "https" | "grpcs") {
        Some(kong_service_tls(doc, path, service, config, diag)?)
    } else {
        None
    };
    let port = port.unwrap_or(if tls.is_some() { 443 } else { 80 });
    // Clusters are shared by name between services; TLS settings are per service in Kong, so
    // they are part of the name.
    let tls_key = tls.as_ref().map_or_else(String::new, kong_tls_key);
    if let Some(p) = &url_path
        && !p.starts_with('/')
    {
        diag.error(doc, at(path, "path"), "must start with /");
        return None;
    }
    let (cluster, host_header) = match upstreams.get(host.as_str()) {
        Some((index, targets)) => {
            let upstream = &config.upstreams[*index];
            let upath = format!("upstreams[{index}]");
            let cluster = upstream_cluster(
                doc,
                &upath,
                upstream,
                targets,
                upstream_protocol,
                kong_pool(service),
                &tls_key,
                registry,
                diag,
            )?;
            (cluster, upstream.host_header.clone().unwrap_or_else(|| host.clone()))
        }
        None => {
            let cluster = registry.add_cluster(kong_cluster(
                format!("kong|{host}:{port}{tls_key}"),
                host.clone(),
                port,
                upstream_protocol,
                LoadBalancer::RoundRobin,
                vec![Endpoint {
                    address: host.clone(),
                    port,
                    weight: 1,
                    labels: Default::default(),
                }],
                kong_pool(service),
            ));
            let header = if port == 80 {
                host.clone()
            } else {
                format!("{host}:{port}")
            };
            (cluster, header)
        }
    };
    if let Some(tls) = tls
        && let Some(c) = registry.cluster_mut(cluster)
    {
        c.tls = Some(tls);
    }
    let timeout_ms = service.read_timeout.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 {
        diag.error(doc, at(path, "read_timeout"), "must be at least 1 (milliseconds)");
        return None;
    }
    Some(ServiceTarget {
        name,
        cluster,
        host_header,
        path: url_path.unwrap_or_default(),
        retries: service.retries.unwrap_or(DEFAULT_RETRIES),
        read_timeout: Duration::from_millis(timeout_ms),
    })
}

/// TLS to an `https`/`grpcs` service as Kong does it: the server name is the host sent
/// upstream (nginx `proxy_ssl_name $upstream_host`), and the certificate is checked only with
/// `tls_verify: true`, against the service's `ca_certificates` (CA certificate entities) or else
/// the system's roots (Kong's `lua_ssl_trusted_certificate` default); unset or `false` follows
/// nginx's default, no check, which a warning points out. `client_certificate` names a
/// certificate entity presented to the upstream.
fn kong_service_tls(
    doc: &Document,
    path: &str,
    service: &Service,
    config: &KongConfig,
    diag: &mut Diag,
) -> Option<UpstreamTls> {
    let verify = match &service.tls_verify {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            diag.error(doc, at(path, "tls_verify"), format!("must be a boolean, got {other}"));
            return None;
        }
    };
    let ca_certificates = match service.ca_certificates.as_ref().filter(|v| !v.is_null()) {
        None => None,
        Some(ids) => Some(kong_ca_bundle(doc, &at(path, "ca_certificates"), ids, config, diag)?),
    };
    let client_certificate = match service.client_certificate.as_ref().filter(|v| !v.is_null()) {
        None => None,
        Some(reference) => Some(kong_client_certificate(
            doc,
            &at(path, "client_certificate"),
            reference,
            config,
            diag,
        )?),
    };
    if !verify {
        diag.warn(
            doc,
            at(path, "tls_verify"),
            "the upstream's certificate is not checked (Kong's default); set tls_verify: true to check it",
        );
    }
    Some(UpstreamTls {
        sni: None,
        subject_alt_names: Vec::new(),
        insecure_skip_verify: !verify,
        ca_certificates: ca_certificates.filter(|_| verify),
        client_certificate,
    })
}

/// The part of a cluster name that tells TLS settings apart: `|tls` (Kong's default, no
/// check), `|tls-verify`, and a digest of the CA and client certificates when given.
fn kong_tls_key(tls: &UpstreamTls) -> String {
    use std::hash::{Hash, Hasher};
    let mut key = String::from("|tls");
    if !tls.insecure_skip_verify {
        key.push_str("-verify");
    }
    if tls.ca_certificates.is_some() || tls.client_certificate.is_some() {
        let mut digest = std::hash::DefaultHasher::new();
        tls.ca_certificates.as_ref().map(|f| &f.pem).hash(&mut digest);
        tls.client_certificate.as_ref().map(|(c, _)| &c.pem).hash(&mut digest);
        key.push_str(&format!("-{:016x}", digest.finish()));
    }
    key
}

/// An entity's `id` as decK writes references: a bare id or `{id: ..}`.
fn reference_id(value: &Value) -> Option<&str> {
    value.as_str().or_else(|| value.get("id").and_then(Value::as_str))
}

/// The PEM bundle of the CA certificate entities a service lists by id.
fn kong_ca_bundle(doc: &Document, path: &str, ids: &Value, config: &KongConfig, diag: &mut Diag) -> Option<PemFile> {
    let Some(ids) = ids.as_array() else {
        diag.error(doc, path.to_string(), "expected a list of CA certificate ids");
        return None;
    };
    let entities = config.ca_certificates.as_ref().and_then(Value::as_array);
    let mut pem = String::new();
    for (i, id) in ids.iter().enumerate() {
        let Some(id) = reference_id(id) else {
            diag.error(doc, format!("{path}[{i}]"), "expected a CA certificate id");
            return None;
        };
        let cert = entities
            .into_iter()
            .flatten()
            .find(|e| e.get("id").and_then(Value::as_str) == Some(id))
            .and_then(|e| e.get("cert"))
            .and_then(Value::as_str);
        match cert {
            Some(cert) if cert.contains("-----BEGIN CERTIFICATE-----") => {
                pem.push_str(cert);
                pem.push('\n');
            }
            Some(_) => {
                diag.error(
                    doc,
                    format!("{path}[{i}]"),
                    format!("CA certificate {id}: not a PEM certificate"),
                );
                return None;
            }
            None => {
                diag.error(
                    doc,
                    format!("{path}[{i}]"),
                    format!("no ca_certificates entry with id {id}"),
                );
                return None;
            }
        }
    }
    Some(PemFile {
        path: std::path::PathBuf::from(format!("{}#{path}", doc.file.display())),
        pem: pem.into_bytes(),
    })
}

/// The certificate entity a service presents to its upstream, as (chain, key).
fn kong_client_certificate(
    doc: &Document,
    path: &str,
    reference: &Value,
    config: &KongConfig,
    diag: &mut Diag,
) -> Option<(PemFile, PemFile)> {
    let Some(id) = reference_id(reference) else {
        diag.error(doc, path.to_string(), "expected a certificate id");
        return None;
    };
    let entity = config
        .certificates
        .as_ref()
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e.get("id").and_then(Value::as_str) == Some(id));
    let (Some(cert), Some(key)) = (
        entity.and_then(|e| e.get("cert")).and_then(Value::as_str),
        entity.and_then(|e| e.get("key")).and_then(Value::as_str),
    ) else {
        diag.error(
            doc,
            path.to_string(),
            format!("no certificates entry with id {id} (and a cert and key)"),
        );
        return None;
    };
    let file = |suffix: &str, pem: &str| PemFile {
        path: std::path::PathBuf::from(format!("{}#certificates/{id}{suffix}", doc.file.display())),
        pem: pem.as_bytes().to_vec(),
    };
    Some((file("", cert), file("/key", key)))
}

/// One place builds Kong's clusters, so fields added to [`Cluster`] get their Kong value here.
fn kong_cluster(
    name: String,
    service: String,
    port: u16,
    protocol: UpstreamProtocol,
    load_balancer: LoadBalancer,
    endpoints: Vec<Endpoint>,
    pool: ConnectionPoolSettings,
) -> Cluster {
    let discovery = if endpoints.iter().all(|e| e.address.parse::<IpAddr>().is_ok()) {
        Discovery::Static
    } else {
        Discovery::Dns
    };
    Cluster {
        name,
        service,
        subset: String::new(),
        port,
        protocol,
        load_balancer,
        discovery,
        endpoints,
        pool,
        outlier: None,
        health_check: None,
        tls: None,
    }
}

/// A service's connection settings: its `connect_timeout`, and Kong's 60 s idle keepalive
/// (`upstream_keepalive_idle_timeout`); no circuit-breaker limits, as Kong has none.
fn kong_pool(service: &Service) -> ConnectionPoolSettings {
    ConnectionPoolSettings {
        connect_timeout: Duration::from_millis(service.connect_timeout.unwrap_or(DEFAULT_TIMEOUT_MS).max(1)),
        idle_timeout: Duration::from_secs(60),
        ..ConnectionPoolSettings::ISTIO_DEFAULT
    }
}

#[allow(clippy::too_many_arguments)]
fn upstream_cluster(
    doc: &Document,
    path: &str,
    upstream: &Upstream,
    targets: &[&types::Target],
    protocol: UpstreamProtocol,
    pool: ConnectionPoolSettings,
    tls_key: &str,
    registry: &mut Registry<'_>,
    diag: &mut Diag,
) -> Option<ClusterId> {
    let name = format!("kong|{}{tls_key}", upstream.name);
    if registry.has_cluster(&name) {
        return Some(registry.add_cluster(kong_cluster(
            name,
            upstream.name.clone(),
            0,
            protocol,
            LoadBalancer::RoundRobin,
            Vec::new(),
            pool,
        )));
    }
    let health_check = upstream
        .healthchecks
        .as_ref()
        .and_then(|h| kong_active_health_check(doc, &at(path, "healthchecks"), h, diag));
    let hashing = hash_key(doc, path, upstream, diag);
    let load_balancer = match upstream.algorithm.as_deref().unwrap_or("round-robin") {
        "round-robin" => LoadBalancer::RoundRobin,
        "least-connections" => LoadBalancer::LeastRequest,
        "latency" => {
            diag.warn(
                doc,
                at(path, "algorithm"),
                "latency balancing is approximated by least-request (fewest requests in flight)",
            );
            LoadBalancer::LeastRequest
        }
        "consistent-hashing" => match hashing {
            Ok(Some(key)) => LoadBalancer::ConsistentHash(key),
            Ok(None) => {
                diag.warn(
                    doc,
                    at(path, "hash_on"),
                    "consistent-hashing with hash_on none hashes the empty string: every request goes to one target, as in Kong",
                );
                LoadBalancer::ConsistentHash(HashKey::FirstPresent(Vec::new()))
            }
            // Reported: the config is rejected.
            Err(()) => LoadBalancer::RoundRobin,
        },
        other => {
            diag.error(
                doc,
                at(path, "algorithm"),
                format!("unknown algorithm {other:?} (round-robin, least-connections, consistent-hashing, latency)"),
            );
            return None;
        }
    };
    let mut endpoints = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let weight = target.weight.unwrap_or(100);
        if weight > 65_535 {
            diag.error(doc, format!("{path}.targets[{i}].weight"), "must be 0..65535");
            return None;
        }
        if weight == 0 {
            continue;
        }
        let Some((host, port)) = split_host_port(&target.target) else {
            diag.error(
                doc,
                format!("{path}.targets[{i}].target"),
                format!("not host[:port]: {:?}", target.target),
            );
            return None;
        };
        endpoints.push(Endpoint {
            address: host,
            port: port.unwrap_or(DEFAULT_TARGET_PORT),
            weight,
            labels: Default::default(),
        });
    }
    if endpoints.is_empty() {
        diag.warn(
            doc,
            path,
            "no target with a weight above 0: requests answer 503 no healthy upstream",
        );
    }
    let id = registry.add_cluster(kong_cluster(
        name,
        upstream.name.clone(),
        0,
        protocol,
        load_balancer,
        endpoints,
        pool,
    ));
    let outlier = upstream
        .healthchecks
        .as_ref()
        .and_then(|h| kong_passive_health_check(doc, &at(path, "healthchecks"), h, health_check.is_some(), diag));
    if let Some(cluster) = registry.cluster_mut(id) {
        cluster.health_check = health_check;
        cluster.outlier = outlier;
    }
    Some(id)
}

/// Kong's `healthchecks.passive` (circuit breaker), on when one of its `unhealthy` counters
/// is above 0, as meshgate's outlier detection: `http_failures` responses with a status in
/// `unhealthy.http_statuses` in a row, or `tcp_failures`/`timeouts` (connection failures,
/// resets, timeouts: meshgate counts them together, against the lower non-zero threshold) take
/// a target out. As in Kong, passive checks never bring it back: an active check that finds it
/// healthy does.
fn kong_passive_health_check(
    doc: &Document,
    path: &str,
    value: &Value,
    has_active: bool,
    diag: &mut Diag,
) -> Option<crate::snapshot::OutlierDetection> {
    let passive = value.get("passive")?;
    let count = |field: &str, diag: &mut Diag| -> Option<u32> {
        match passive.pointer(&format!("/unhealthy/{field}")) {
            None | Some(Value::Null) => Some(0),
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n <= 255) {
                Some(n) => Some(n),
                None => {
                    diag.error(
                        doc,
                        format!("{path}.passive.unhealthy.{field}"),
                        "must be an integer 0..255",
                    );
                    None
                }
            },
        }
    };
    let http_failures = count("http_failures", diag)?;
    let tcp_failures = count("tcp_failures", diag)?;
    let timeouts = count("timeouts", diag)?;
    if http_failures == 0 && tcp_failures == 0 && timeouts == 0 {
        return None;
    }
    let kind = passive.get("type").and_then(Value::as_str).unwrap_or("http");
    if kind != "http" && kind != "https" {
        diag.warn(
            doc,
            at(path, "passive.type"),
            format!("{kind} passive checks count only connection failures"),
        );
    }
    let statuses: Vec<u16> = match passive.pointer("/unhealthy/http_statuses") {
        None | Some(Value::Null) => vec![429, 500, 503],
        Some(list) => {
            let parsed: Option<Vec<u16>> = list.as_array().and_then(|a| {
                a.iter()
                    .map(|v| {
                        v.as_u64()
                            .and_then(|n| u16::try_from(n).ok())
                            .filter(|n| (100..=999).contains(n))
                    })
                    .collect()
            });
            match parsed {
                Some(p) => p,
                None => {
                    diag.error(
                        doc,
                        format!("{path}.passive.unhealthy.http_statuses"),
                        "must be a list of HTTP statuses",
                    );
                    return None;
                }
            }
        }
    };
    let local = [tcp_failures, timeouts]
        .into_iter()
        .filter(|n| *n > 0)
        .min()
        .unwrap_or(0);
    if !has_active {
        diag.warn(
            doc,
            at(path, "passive"),
            "without active checks, a target taken out by passive checks stays out (as in Kong) until the upstream changes or meshgate restarts",
        );
    }
    Some(crate::snapshot::OutlierDetection {
        consecutive_5xx: http_failures,
        consecutive_gateway: 0,
        split_local_origin: true,
        consecutive_local_origin: local,
        interval: Duration::from_secs(10),
        // Kong has no ejection time: out until an active check says otherwise.
        base_ejection_time: Duration::from_secs(10 * 365 * 24 * 3600),
        max_ejection_percent: 100,
        min_health_percent: 0,
        failure_statuses: Some(statuses),
    })
}

/// Kong's `healthchecks.active` (HTTP probes): on when `healthy.interval` or
/// `unhealthy.interval` is above 0, as in Kong.
fn kong_active_health_check(
    doc: &Document,
    path: &str,
    value: &Value,
    diag: &mut Diag,
) -> Option<crate::snapshot::HealthCheck> {
    let active = value.get("active")?;
    let kind = match active.get("type") {
        None | Some(Value::Null) => "http",
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => {
            diag.error(doc, at(path, "active.type"), "expected a string");
            return None;
        }
    };
    if kind != "http" && kind != "https" {
        diag.warn(
            doc,
            at(path, "active.type"),
            format!("{kind} probes are not supported yet (http, https); ignored"),
        );
        return None;
    }
    // Kong's limits: seconds are numbers 0..65535, counters integers 0..255. Anything else
    // (a string, -1, 1e308) is an error naming the field, as Kong's schema rejects it; an
    // out-of-range interval would otherwise be a Duration that cannot exist.
    let number = |pointer: &str, default: f64, diag: &mut Diag| -> Option<f64> {
        let (max, integer) = if pointer.ends_with("interval") || pointer.ends_with("timeout") {
            (65_535.0, false)
        } else {
            (255.0, true)
        };
        match active.pointer(pointer) {
            None | Some(Value::Null) => Some(default),
            Some(v) => {
                let n = v
                    .as_f64()
                    .filter(|n| (0.0..=max).contains(n) && (!integer || n.fract() == 0.0));
                if n.is_none() {
                    diag.error(
                        doc,
                        format!("{path}.active{}", pointer.replace('/', ".")),
                        if integer {
                            "must be an integer 0..255"
                        } else {
                            "must be a number of seconds 0..65535"
                        },
                    );
                }
                n
            }
        }
    };
    let healthy_interval = number("/healthy/interval", 0.0, diag);
    let unhealthy_interval = number("/unhealthy/interval", 0.0, diag);
    // Kong's default probe timeout: 1 s.
    let timeout = number("/timeout", 1.0, diag);
    let successes = number("/healthy/successes", 0.0, diag);
    let http_failures = number("/unhealthy/http_failures", 0.0, diag);
    let tcp_failures = number("/unhealthy/tcp_failures", 0.0, diag);
    let timeouts = number("/unhealthy/timeouts", 0.0, diag);
    let (
        Some(healthy_interval),
        Some(unhealthy_interval),
        Some(timeout),
        Some(successes),
        Some(http_failures),
        Some(tcp_failures),
        Some(timeouts),
    ) = (
        healthy_interval,
        unhealthy_interval,
        timeout,
        successes,
        http_failures,
        tcp_failures,
        timeouts,
    )
    else {
        return None;
    };
    let interval = if healthy_interval > 0.0 {
        healthy_interval
    } else {
        unhealthy_interval
    };
    if interval <= 0.0 {
        return None;
    }
    // Kong's schema: HTTP statuses 100..999; anything else is an error, not left out.
    let statuses: Vec<u16> = match active.pointer("/healthy/http_statuses") {
        None | Some(Value::Null) => vec![200, 302],
        Some(Value::Array(list)) => {
            let mut statuses = Vec::with_capacity(list.len());
            for (i, v) in list.iter().enumerate() {
                match v.as_u64().filter(|n| (100..=999).contains(n)) {
                    Some(n) => statuses.push(n as u16),
                    None => {
                        diag.error(
                            doc,
                            format!("{path}.active.healthy.http_statuses[{i}]"),
                            "must be an HTTP status 100..999",
                        );
                        return None;
                    }
                }
            }
            statuses
        }
        Some(_) => {
            diag.error(
                doc,
                at(path, "active.healthy.http_statuses"),
                "expected a list of HTTP statuses",
            );
            return None;
        }
    };
    let failures = http_failures.max(tcp_failures).max(timeouts);
    Some(crate::snapshot::HealthCheck {
        // `https` probes go over the service's TLS; `http` ones in plain text, even to an
        // `https` service, as in Kong.
        plain_text: kind == "http",
        path: active
            .get("http_path")
            .and_then(Value::as_str)
            .unwrap_or("/")
            .to_string(),
        interval: Duration::from_secs_f64(interval),
        timeout: Duration::from_secs_f64(timeout.clamp(0.001, 3600.0)),
        healthy_threshold: (successes as u32).max(1),
        unhealthy_threshold: (failures as u32).max(1),
        healthy_statuses: statuses,
    })
}

/// The hash input of an upstream: `hash_on`, then `hash_fallback` when the request lacks the
/// first (Kong hashes the empty string when it lacks both). `Ok(None)`: `hash_on: none`;
/// `Err`: invalid settings, reported. Kong checks these whatever the algorithm.
fn hash_key(doc: &Document, path: &str, upstream: &Upstream, diag: &mut Diag) -> Result<Option<HashKey>, ()> {
    let hash_on = upstream.hash_on.as_deref().unwrap_or("none");
    let fallback = upstream.hash_fallback.as_deref().unwrap_or("none");
    if fallback != "none" && matches!(hash_on, "none" | "cookie") {
        diag.error(
            doc,
            at(path, "hash_fallback"),
            format!("must be \"none\" when hash_on is {hash_on:?}"),
        );
        return Err(());
    }
    let primary = hash_input(doc, path, upstream, HashSide::On, diag).ok_or(())?;
    let fallback = hash_input(doc, path, upstream, HashSide::Fallback, diag).ok_or(())?;
    let Some(primary) = primary else {
        return Ok(None);
    };
    let fallback = match fallback {
        Some(key) if key == primary => {
            // Kong's `distinct` compares the settings as written: header names differing
            // only in case pass it, though they name the same header.
            let same_as_written = match &key {
                HashKey::Header(_) => upstream.hash_on_header == upstream.hash_fallback_header,
                _ => true,
            };
            if same_as_written {
                diag.error(
                    doc,
                    at(path, "hash_fallback"),
                    "must differ from hash_on (for header, query_arg and uri_capture, by name)",
                );
                return Err(());
            }
            diag.warn(
                doc,
                at(path, "hash_fallback_header"),
                "names the hash_on_header header (header names are case-insensitive), so it is never used",
            );
            None
        }
        other => other,
    };
    Ok(Some(HashKey::FirstPresent(
        std::iter::once(primary).chain(fallback).collect(),
    )))
}

/// `hash_on` or `hash_fallback`, whose fields are named `hash_on_*` or `hash_fallback_*`.
#[derive(Clone, Copy, PartialEq)]
enum HashSide {
    On,
    Fallback,
}

/// One side's input: `Some(None)` for `none`, `None` when the settings are invalid (reported).
fn hash_input(
    doc: &Document,
    path: &str,
    upstream: &Upstream,
    side: HashSide,
    diag: &mut Diag,
) -> Option<Option<HashKey>> {
    let (kind_field, kind, header, query_arg, uri_capture) = match side {
        HashSide::On => (
            "hash_on",
            &upstream.hash_on,
            ("hash_on_header", &upstream.hash_on_header),
            ("hash_on_query_arg", &upstream.hash_on_query_arg),
            ("hash_on_uri_capture", &upstream.hash_on_uri_capture),
        ),
        HashSide::Fallback => (
            "hash_fallback",
            &upstream.hash_fallback,
            ("hash_fallback_header", &upstream.hash_fallback_header),
            ("hash_fallback_query_arg", &upstream.hash_fallback_query_arg),
            ("hash_fallback_uri_capture", &upstream.hash_fallback_uri_capture),
        ),
    };
    let named = |(field, value): (&str, &Option<String>), diag: &mut Diag| -> Option<String> {
        match value {
            Some(v) if !v.is_empty() => Some(v.clone()),
            _ => {
                diag.error(doc, at(path, field), format!("required by {kind_field}"));
                None
            }
        }
    };
    let key = match kind.as_deref().unwrap_or("none") {
        "none" => return Some(None),
        "ip" => HashKey::SourceIp,
        "consumer" => HashKey::Consumer,
        "path" => HashKey::Path,
        "header" => HashKey::Header(named(header, diag)?.to_ascii_lowercase()),
        "query_arg" => HashKey::QueryArgument(named(query_arg, diag)?),
        "uri_capture" => HashKey::UriCapture(named(uri_capture, diag)?),
        // Kong gives a request without the cookie a new UUID and sets it on the response.
        "cookie" => {
            let name = named(("hash_on_cookie", &upstream.hash_on_cookie), diag)?;
            // The name goes into Set-Cookie as is: an HTTP token, as Kong requires.
            if !CookieKey::is_valid_name(&name) {
                diag.error(
                    doc,
                    at(path, "hash_on_cookie"),
                    format!("{name:?} is not a valid cookie name"),
                );
                return None;
            }
            let cookie_path = upstream.hash_on_cookie_path.as_deref().unwrap_or("/");
            if !cookie_path.starts_with('/') || cookie_path.bytes().any(|b| b == b';' || !b.is_ascii_graphic()) {
                diag.error(
                    doc,
                    at(path, "hash_on_cookie_path"),
                    format!("{cookie_path:?} is not a cookie path (it starts with '/', without ';' or spaces)"),
                );
                return None;
            }
            HashKey::Cookie(CookieKey {
                name,
                generate: Some(GeneratedCookie {
                    value: GeneratedCookieValue::Uuid,
                    // Kong's attributes, its `Same-Site` spelling included.
                    attributes: format!("; Path={cookie_path}; Same-Site=Lax; HttpOnly"),
                }),
            })
        }
        other => {
            diag.error(
                doc,
                at(path, kind_field),
                format!("unknown value {other:?} (none, consumer, ip, header, cookie, path, query_arg, uri_capture)"),
            );
            return None;
        }
    };
    Some(Some(key))
}

/// Paths Kong prioritises together: the prefix length (`None`: the regex group) and the
/// paths with their index in `paths`.
type PathGroup<'p> = (Option<usize>, Vec<(usize, &'p String)>);

/// Compiles a Kong route into one entry per path group (all regexes; each prefix length).
#[allow(clippy::too_many_arguments)]
fn compile_route(
    doc: &Document,
    path: &str,
    route: &KongRoute,
    service: &ServiceTarget,
    plugins: RoutePlugins,
    seq: &mut usize,
    diag: &mut Diag,
    entries: &mut Vec<Entry>,
) {
    for (field, set) in [
        ("sources", route.sources.is_some()),
        ("destinations", route.destinations.is_some()),
        ("expression", route.expression.is_some()),
        ("priority", route.priority.is_some()),
    ] {
        if set {
            diag.error(
                doc,
                at(path, field),
                "not supported yet (traditional HTTP routes only); the route would match more than it should",
            );
            return;
        }
    }
    if route.path_handling.as_deref().is_some_and(|h| h != "v0" && h != "v1") {
        diag.error(doc, at(path, "path_handling"), "must be v0 or v1");
        return;
    }
    let protocols: Vec<String> = route
        .protocols
        .clone()
        .unwrap_or_else(|| vec!["http".to_string(), "https".to_string()]);
    if let Some(bad) = protocols
        .iter()
        .find(|p| !matches!(p.as_str(), "http" | "https" | "grpc" | "grpcs"))
    {
        diag.error(
            doc,
            at(path, "protocols"),
            format!("protocol {bad:?} is not supported (http, https, grpc, grpcs)"),
        );
        return;
    }
    let paths = route.paths.clone().unwrap_or_default();
    let methods = route.methods.clone().unwrap_or_default();
    let hosts_in = route.hosts.clone().unwrap_or_default();
    let headers = route.headers.clone().unwrap_or_default();
    let Some(snis) = route_snis(doc, path, route.snis.as_ref(), &protocols, diag) else {
        return;
    };
    if paths.is_empty() && methods.is_empty() && hosts_in.is_empty() && headers.is_empty() && snis.is_empty() {
        diag.error(
            doc,
            path,
            "a route needs at least one of paths, hosts, methods, headers or snis",
        );
        return;
    }
    let mut hosts = Vec::new();
    for (i, host) in hosts_in.iter().enumerate() {
        let host = host.to_ascii_lowercase();
        let host = match split_host_port(&host) {
            Some((h, _)) => h,
            None => host,
        };
        if host.ends_with(".*") {
            diag.warn(
                doc,
                format!("{path}.hosts[{i}]"),
                "suffix wildcards (example.*) are not supported yet; this host is ignored",
            );
            continue;
        }
        hosts.push(host);
    }
    if !hosts_in.is_empty() && hosts.is_empty() {
        return;
    }
    let header_matches = match header_matches(doc, path, &headers, diag) {
        Some(h) => h,
        None => return,
    };
    let method = if methods.is_empty() {
        None
    } else {
        let alternation: Vec<String> = methods.iter().map(|m| regex::escape(&m.to_ascii_uppercase())).collect();
        StringMatch::regex(&alternation.join("|")).ok()
    };

    // Path groups: one for every regex path, one per prefix length.
    let mut groups: Vec<PathGroup<'_>> = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let key = if p.starts_with('~') { None } else { Some(p.len()) };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, list)) => list.push((i, p)),
            None => groups.push((key, vec![(i, p)])),
        }
    }
    if groups.is_empty() {
        groups.push((Some(0), Vec::new()));
    }
    let plain_hosts_only = !hosts.is_empty() && hosts.iter().all(|h| !h.contains('*'));
    let base_weight = [
        !methods.is_empty(),
        !hosts.is_empty(),
        !headers.is_empty(),
        !paths.is_empty(),
        !snis.is_empty(),
    ]
    .iter()
    .filter(|b| **b)
    .count() as u8;
    let route_name = format!(
        "kong/{}/{}",
        service.name,
        route
            .name
            .clone()
            .or_else(|| route.id.clone())
            .unwrap_or_else(|| path.to_string())
    );
    let strip = route.strip_path.unwrap_or(true);
    let legacy_concat = route.path_handling.as_deref() == Some("v1");
    let https_only = !protocols.iter().any(|p| p == "http" || p == "grpc");
    for (key, group) in groups {
        let regex_group = key.is_none();
        let mut matches = Vec::new();
        let mut strip_regex = None;
        for (i, p) in &group {
            let matcher = if let Some(pattern) = p.strip_prefix('~') {
                // Kong anchors regex paths at the start only.
                match StringMatch::regex(&format!("(?:{pattern})(?s:.*)")) {
                    Ok(m) => {
                        if group.len() == 1 {
                            strip_regex = Regex::new(&format!("^(?:{pattern})")).ok();
                        }
                        m
                    }
                    Err(e) => {
                        diag.error(doc, format!("{path}.paths[{i}]"), format!("invalid regex: {e}"));
                        return;
                    }
                }
            } else {
                if !p.starts_with('/') {
                    diag.error(
                        doc,
                        format!("{path}.paths[{i}]"),
                        "must start with / (or ~ for a regex)",
                    );
                    return;
                }
                StringMatch::Prefix((*p).clone())
            };
            matches.push(RequestMatch {
                path: Some(PathMatch {
                    matcher,
                    ignore_case: false,
                    segment_prefix: false,
                }),
                headers: header_matches.clone(),
                method: method.clone(),
                sni: snis.clone(),
                ..RequestMatch::default()
            });
        }
        if group.is_empty() {
            matches.push(RequestMatch {
                headers: header_matches.clone(),
                method: method.clone(),
                sni: snis.clone(),
                ..RequestMatch::default()
            });
        }
        if regex_group && strip && group.len() > 1 {
            diag.warn(
                doc,
                at(path, "paths"),
                "with several regex paths and strip_path, the matched part is not stripped",
            );
        }
        let action = RouteAction::Forward(forward(service, route, strip, strip_regex, legacy_concat));
        entries.push(Entry {
            hosts: hosts.clone(),
            plain: !https_only,
            tls: protocols.iter().any(|p| p == "https" || p == "grpcs"),
            priority: Priority {
                match_weight: base_weight,
                plain_hosts_only,
                headers: headers.len().min(255) as u8,
                regex: regex_group && !group.is_empty(),
                regex_priority: if regex_group {
                    route.regex_priority.unwrap_or(0)
                } else {
                    0
                },
                prefix_length: key.unwrap_or(0),
            },
            seq: *seq,
            route: Route {
                name: route_name.clone(),
                matches,
                action,
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                mirrors: Vec::new(),
                cors: plugins.cors.clone(),
                plugins: plugins.chain.clone(),
            },
        });
        *seq += 1;
    }
}

/// A route's `snis`, lower-cased; `None` when they are invalid (reported). Kong allows them
/// only on routes that take TLS, checks them on TLS connections only, and matches them
/// exactly (wildcards are not supported here).
fn route_snis(
    doc: &Document,
    path: &str,
    snis: Option<&Value>,
    protocols: &[String],
    diag: &mut Diag,
) -> Option<Vec<String>> {
    let Some(snis) = snis.filter(|v| !v.is_null()) else {
        return Some(Vec::new());
    };
    let Some(list) = snis.as_array() else {
        diag.error(doc, at(path, "snis"), "expected a list of server names");
        return None;
    };
    if !list.is_empty() && !protocols.iter().any(|p| p == "https" || p == "grpcs") {
        diag.error(
            doc,
            at(path, "snis"),
            "snis can only be set when protocols has 'https' or 'grpcs'",
        );
        return None;
    }
    let mut names = Vec::with_capacity(list.len());
    for (i, sni) in list.iter().enumerate() {
        // Kong drops a trailing dot (the root label) before matching.
        let name = sni
            .as_str()
            .map(|n| n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase())
            .unwrap_or_default();
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .split('.')
                .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid {
            diag.error(doc, format!("{path}.snis[{i}]"), format!("invalid SNI {sni}"));
            return None;
        }
        names.push(name);
    }
    Some(names)
}

fn header_matches(
    doc: &Document,
    path: &str,
    headers: &std::collections::BTreeMap<String, Vec<String>>,
    diag: &mut Diag,
) -> Option<Vec<HeaderMatch>> {
    let mut out = Vec::new();
    for (name, values) in headers {
        let lower = name.to_ascii_lowercase();
        if lower == "host" {
            diag.error(doc, at(path, "headers.host"), "use `hosts` to match the Host header");
            return None;
        }
        if values.is_empty() {
            diag.error(doc, format!("{path}.headers.{name}"), "needs at least one value");
            return None;
        }
        // Kong compares header values case-insensitively; `~*` marks a regex.
        let alternatives: Vec<String> = values
            .iter()
            .map(|v| match v.strip_prefix("~*") {
                Some(re) => format!("(?:{re})"),
                None => regex::escape(v),
            })
            .collect();
        match StringMatch::regex(&format!("(?i:{})", alternatives.join("|"))) {
            Ok(matcher) => out.push(HeaderMatch {
                name: lower,
                matcher: Some(matcher),
                invert: false,
            }),
            Err(e) => {
                diag.error(doc, format!("{path}.headers.{name}"), format!("invalid regex: {e}"));
                return None;
            }
        }
    }
    Some(out)
}

fn forward(
    service: &ServiceTarget,
    route: &KongRoute,
    strip: bool,
    strip_regex: Option<Regex>,
    legacy_concat: bool,
) -> Forward {
    let retry = (service.retries > 0).then(|| RetryPolicy {
        num_retries: service.retries,
        per_try_timeout: Some(service.read_timeout),
        // Kong (nginx `proxy_next_upstream error timeout`) retries failed connections and
        // timeouts, never an HTTP status, immediately and on another target.
        retry_on: RetryOn::CONNECT_FAILURE | RetryOn::RESET,
        retriable_status_codes: Vec::new(),
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        avoid_previous_hosts: true,
        budget: None,
    });
    Forward {
        fault: None,
        destinations: vec![WeightedDestination {
            cluster: service.cluster,
            weight: 100,
            invalid: false,
            request_headers: HeaderOps::default(),
            response_headers: HeaderOps::default(),
        }],
        total_weight: 100,
        rewrite: Some(Rewrite {
            path: Some(PathRewrite::Kong {
                service_path: service.path.clone(),
                strip,
                strip_regex,
                legacy_concat,
            }),
            authority: (!route.preserve_host.unwrap_or(false)).then(|| service.host_header.clone()),
        }),
        timeout: None,
        backend_timeout: retry.is_none().then_some(service.read_timeout),
        retry,
    }
}

/// Virtual hosts for the Kong listener: one per host pattern used by a route (holding the
/// routes for that host and the host-less ones), plus `*` for host-less routes, each ordered
/// by Kong's priority.
/// The routes of a plain (`tls` false) or TLS proxy listener: routes whose `protocols` leave
/// the listener's scheme out are not served there, except that HTTPS-only routes answer
/// plain requests with Kong's 426.
fn route_table(entries: &[Entry], port: u16, tls: bool) -> RouteTable {
    let upgrade = |mut route: Route| {
        route.action = RouteAction::DirectResponse(DirectResponse {
            status: 426,
            body: bytes::Bytes::from_static(b"{\"message\":\"Please use HTTPS protocol\"}"),
        });
        route.plugins = None;
        route
    };
    let listener_entries: Vec<Entry> = entries
        .iter()
        .filter(|e| if tls { e.tls } else { e.plain || e.tls })
        .map(|e| Entry {
            hosts: e.hosts.clone(),
            plain: e.plain,
            tls: e.tls,
            priority: e.priority,
            seq: e.seq,
            route: if !tls && !e.plain {
                upgrade(e.route.clone())
            } else {
                e.route.clone()
            },
        })
        .collect();
    let entries = &listener_entries;
    let mut domains: Vec<&str> = Vec::new();
    for entry in entries {
        for host in &entry.hosts {
            if !domains.contains(&host.as_str()) {
                domains.push(host);
            }
        }
    }
    let applies = |entry: &Entry, domain: &str| {
        entry.hosts.is_empty()
            || entry.hosts.iter().any(|h| {
                h == domain
                    || (!domain.starts_with('*') && h.strip_prefix('*').is_some_and(|suffix| domain.ends_with(suffix)))
            })
    };
    let mut table = RouteTable::default();
    for domain in domains {
        table
            .virtual_hosts
            .push(virtual_host(entries, domain, port, |e| applies(e, domain)));
    }
    if entries.iter().any(|e| e.hosts.is_empty()) {
        table
            .virtual_hosts
            .push(virtual_host(entries, "*", port, |e| e.hosts.is_empty()));
    }
    table.index();
    table
}

fn virtual_host(entries: &[Entry], domain: &str, port: u16, include: impl Fn(&Entry) -> bool) -> VirtualHost {
    let mut chosen: Vec<&Entry> = entries.iter().filter(|e| include(e)).collect();
    chosen.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
    VirtualHost {
        name: format!("{domain}:{port}"),
        domains: vec![domain.to_string()],
        routes: chosen.into_iter().map(|e| e.route.clone()).collect(),
        https_redirect: false,
    }
}

/// A decK document as YAML text, keys in the order decK writes them (`_format_version` first).
pub fn to_deck_yaml(document: &Value) -> Result<String, String> {
    let mut ordered = serde_json::Map::new();
    if let Some(Value::Object(map)) = Some(document) {
        for key in ["_format_version", "_transform", "_workspace", "_info"] {
            if let Some(v) = map.get(key) {
                ordered.insert(key.to_string(), v.clone());
            }
        }
        for (k, v) in map {
            ordered.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    serde_saphyr::to_string(&Value::Object(ordered)).map_err(|e| e.to_string())
}

/// Whether a document is a decK file (it has `_format_version` instead of `kind`).
pub fn is_declarative_config(value: &Value) -> bool {
    value.get("_format_version").is_some() && value.get("kind").is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls_split_into_parts() {
        assert_eq!(
            parse_url("http://orders.internal:8080/api"),
            Some(("http".into(), "orders.internal".into(), Some(8080), Some("/api".into())))
        );
        assert_eq!(
            parse_url("http://[::1]:9000"),
            Some(("http".into(), "::1".into(), Some(9000), None))
        );
        assert_eq!(parse_url("orders.internal"), None);
    }

    #[test]
    fn priority_orders_like_kong() {
        let p = |match_weight, plain_hosts_only, headers, regex, prefix_length| Priority {
            match_weight,
            plain_hosts_only,
            headers,
            regex,
            regex_priority: 0,
            prefix_length,
        };
        // More fields beat a longer path; regexes beat prefixes; longer prefixes win.
        assert!(p(2, true, 0, false, 1) > p(1, false, 0, false, 30));
        assert!(p(1, false, 0, true, 0) > p(1, false, 0, false, 30));
        assert!(p(1, false, 0, false, 5) > p(1, false, 0, false, 4));
    }
}
