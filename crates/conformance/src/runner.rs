//! Executing tests: one proxy per test on that test's configuration, steps in order, the cases
//! of a step concurrently, each case judged by its kind (README §1, §7, §8).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use tokio::task::JoinSet;

use crate::client::{self, Outgoing, Protocol};
use crate::config::{self, GatewayAddresses, TlsMaterial};
use crate::evaluate::{self, RequestUrl};
use crate::proxy::Proxy;
use crate::suite::{Backends, Case, CaseRequest, Deletion, Expect};
use crate::websocket;

/// How a case's requests must agree before it passes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Consistency {
    /// Upstream's rule: 3 consecutive passing attempts within 30 s, 100 ms after a failure.
    Eventual,
    /// The first 3 attempts must all pass (the proxy loads its config before serving).
    Strict,
}

const CONSECUTIVE_PASSES: usize = 3;
const MAX_TIME_TO_CONSISTENCY: Duration = Duration::from_secs(30);
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(100);

pub struct CaseResult {
    pub case: Case,
    pub outcome: Result<(), String>,
}

/// What every case task needs, shared across tasks.
struct Context {
    backends: Backends,
    trust: Arc<client::PinnedCertificate>,
    consistency: Consistency,
}

pub struct Runner {
    suite: PathBuf,
    binary: PathBuf,
    run_dir: PathBuf,
    context: Arc<Context>,
    tls: TlsMaterial,
    addresses: GatewayAddresses,
}

impl Runner {
    pub async fn new(suite: &Path, binary: &Path, run_dir: &Path, consistency: Consistency) -> anyhow::Result<Runner> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("create {}", run_dir.display()))?;
        let (tls, trust) = self_signed_certificate()?;
        Ok(Runner {
            suite: suite.to_path_buf(),
            binary: binary.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            context: Arc::new(Context {
                backends: Backends::start(suite).await?,
                trust,
                consistency,
            }),
            tls,
            addresses: GatewayAddresses::default(),
        })
    }

    /// Runs the cases of one test (all with the same `test`, in suite order).
    pub async fn run_test(&mut self, cases: &[Case]) -> Vec<CaseResult> {
        let failed_all = |why: String| {
            cases
                .iter()
                .map(|c| CaseResult {
                    case: c.clone(),
                    outcome: Err(why.clone()),
                })
                .collect()
        };
        let Some(first) = cases.first() else {
            return Vec::new();
        };
        let test = first.test.clone();
        let mut deletions: Vec<Deletion> = Vec::new();
        let config_path = self.run_dir.join(format!("{test}.yaml"));
        let log_path = self.run_dir.join(format!("{test}.log"));
        let proxy = match self.render(&first.manifest, &deletions).and_then(|text| {
            std::fs::write(&config_path, text).with_context(|| format!("write {}", config_path.display()))
        }) {
            Ok(()) => match Proxy::start(&self.binary, &config_path, &log_path).await {
                Ok(proxy) => proxy,
                Err(e) => return failed_all(format!("{e:#}")),
            },
            Err(e) => return failed_all(format!("{e:#}")),
        };
        let mut steps: BTreeMap<u32, Vec<&Case>> = BTreeMap::new();
        for case in cases {
            steps.entry(case.step).or_default().push(case);
        }
        let mut results = Vec::new();
        for (_, step_cases) in steps {
            let step_changes: Vec<Deletion> = step_cases.iter().flat_map(|c| c.before_step.clone()).collect();
            if !step_changes.is_empty() {
                deletions.extend(step_changes);
                let reloaded = match self.render(&first.manifest, &deletions) {
                    Ok(text) => proxy.reload(&text).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = reloaded {
                    let why = format!("{e:#}");
                    results.extend(step_cases.iter().map(|c| CaseResult {
                        case: (*c).clone(),
                        outcome: Err(why.clone()),
                    }));
                    continue;
                }
            }
            let mut tasks = JoinSet::new();
            for (index, case) in step_cases.iter().enumerate() {
                let gateway = SocketAddr::from((
                    self.addresses.address(&case.gateway.namespace, &case.gateway.name),
                    case.gateway.port,
                ));
                let context = self.context.clone();
                let case = (*case).clone();
                tasks.spawn(async move {
                    let outcome = run_case(&context, &case, gateway).await;
                    (index, CaseResult { case, outcome })
                });
            }
            let mut step_results: Vec<(usize, CaseResult)> = tasks.join_all().await;
            step_results.sort_by_key(|(index, _)| *index);
            results.extend(step_results.into_iter().map(|(_, r)| r));
        }
        if results.iter().any(|r| r.outcome.is_err()) {
            println!(
                "  {test}: meshgate config {} and log {}",
                config_path.display(),
                log_path.display()
            );
        }
        proxy.stop().await;
        results
    }

    fn render(&mut self, manifest: &str, deletions: &[Deletion]) -> anyhow::Result<String> {
        config::render(
            &self.suite,
            manifest,
            deletions,
            &self.context.backends,
            &self.tls,
            &mut self.addresses,
        )
    }
}

/// The certificate the Go suite creates for the HTTPS listeners (README §5): self-signed
/// RSA-2048, CN `default`, O `Acme Co`, DNS SANs `*.org` and `*.wildcard.org`.
fn self_signed_certificate() -> anyhow::Result<(TlsMaterial, Arc<client::PinnedCertificate>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .or_else(|_| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256))
        .context("generate key")?;
    let names = vec!["*.org".to_string(), "*.wildcard.org".to_string()];
    let mut params = rcgen::CertificateParams::new(names.clone()).context("certificate parameters")?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "default");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Acme Co");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).context("self-sign certificate")?;
    let trust = Arc::new(client::PinnedCertificate::new(cert.der().clone(), names));
    Ok((
        TlsMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        trust,
    ))
}

async fn run_case(context: &Context, case: &Case, gateway: SocketAddr) -> Result<(), String> {
    let target = Target { context, gateway };
    match case.kind.as_str() {
        "http" => {
            let request_id = uuid();
            target
                .until_consistent(|| target.attempt(&case.request, &case.expect, &request_id))
                .await
        }
        "mirror" => run_mirror(&target, case).await,
        "mirror_percentage" => run_mirror_percentage(&target, case).await,
        "weights" => run_weights(&target, case).await,
        "backend_header_consistency" => run_backend_header_consistency(&target, case).await,
        "websocket" => target.until_consistent(|| target.websocket(case)).await,
        other => Err(format!("unknown case kind {other:?}")),
    }
}

/// One Gateway address a case talks to.
struct Target<'a> {
    context: &'a Context,
    gateway: SocketAddr,
}

impl Target<'_> {
    async fn until_consistent<F, Fut>(&self, mut attempt: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<Value>, String>>,
    {
        match self.context.consistency {
            Consistency::Strict => {
                for n in 1..=CONSECUTIVE_PASSES {
                    attempt().await.map_err(|e| format!("attempt {n}: {e}"))?;
                }
                Ok(())
            }
            Consistency::Eventual => {
                let deadline = Instant::now() + MAX_TIME_TO_CONSISTENCY;
                let mut passes = 0;
                loop {
                    match attempt().await {
                        Ok(_) => {
                            passes += 1;
                            if passes >= CONSECUTIVE_PASSES {
                                return Ok(());
                            }
                        }
                        Err(e) => {
                            passes = 0;
                            if Instant::now() > deadline {
                                return Err(e);
                            }
                            tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
                        }
                    }
                }
            }
        }
    }

    /// The Host a Go client sends when a case gives none: the Gateway address, with the port
    /// unless it is the scheme's default.
    fn default_host(&self, scheme: &str) -> String {
        let ip = self.gateway.ip();
        match (scheme, self.gateway.port()) {
            ("http" | "ws", 80) | ("https", 443) => ip.to_string(),
            (_, port) => format!("{ip}:{port}"),
        }
    }

    /// Sends one request and judges it; returns the echo JSON when the response had one.
    async fn attempt(&self, request: &CaseRequest, expect: &Expect, request_id: &str) -> Result<Option<Value>, String> {
        self.attempt_with(request, expect, request_id, None).await
    }

    async fn attempt_with(
        &self,
        request: &CaseRequest,
        expect: &Expect,
        request_id: &str,
        replace_headers: Option<(String, String)>,
    ) -> Result<Option<Value>, String> {
        let attempt_uuid = uuid();
        let substitute = |s: &str| s.replace("{request_id}", request_id).replace("{uuid}", &attempt_uuid);
        let path = substitute(&request.path);
        let mut expect = expect.clone();
        expect.path_seen_by_backend = expect.path_seen_by_backend.as_deref().map(substitute);
        let host = request
            .host
            .clone()
            .unwrap_or_else(|| self.default_host(&request.scheme));
        let protocol = match request.protocol.as_str() {
            "h2" => Protocol::H2,
            "h2c-prior-knowledge" => Protocol::H2cPriorKnowledge,
            _ => Protocol::Http1,
        };
        let mut headers: Vec<(String, String)> = match replace_headers {
            Some(header) => vec![header],
            None => request.headers.iter().map(|(n, v)| (n.clone(), v.clone())).collect(),
        };
        let echo_set: Vec<String> = request
            .echo_set_response_headers
            .iter()
            .map(|(n, v)| format!("{n}:{v}"))
            .collect();
        headers.push(("X-Echo-Set-Header".to_string(), echo_set.join(",")));
        let user_agent = if protocol == Protocol::Http1 {
            "Go-http-client/1.1"
        } else {
            "Go-http-client/2.0"
        };
        headers.push(("User-Agent".to_string(), user_agent.to_string()));
        headers.push(("Accept-Encoding".to_string(), "gzip".to_string()));
        let server_name = request
            .tls
            .as_ref()
            .map(|t| t.server_name.clone())
            .unwrap_or_else(|| host.split(':').next().unwrap_or("").to_string());
        let out = Outgoing {
            connect: self.gateway,
            protocol,
            tls: (request.scheme == "https").then_some(client::Tls {
                server_name: &server_name,
                trust: &self.context.trust,
            }),
            method: &request.method,
            host: &host,
            path: &path,
            headers,
        };
        let got = client::send(&out)
            .await
            .map_err(|e| format!("{} {path}: {e:#}", request.method))?;
        let url = RequestUrl {
            scheme: &request.scheme,
            host: &host,
            path: &path,
        };
        evaluate::check(&expect, &request.method, &url, &got)
            .map_err(|e| format!("{} {host}{path}: {e}", request.method))?;
        let is_json = got
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v == "application/json");
        Ok(is_json.then(|| serde_json::from_slice(&got.body).ok()).flatten())
    }

    async fn websocket(&self, case: &Case) -> Result<Option<Value>, String> {
        let check = case.websocket.as_ref().ok_or("websocket case without `websocket`")?;
        let messages: Vec<websocket::Message> = check
            .messages
            .iter()
            .map(|m| websocket::Message {
                binary: m.kind == "binary",
                payload: match &m.send_hex {
                    Some(hex) => decode_hex(hex),
                    None => m.send.clone().unwrap_or_default().into_bytes(),
                },
            })
            .collect();
        let origin = case.request.headers.get("Origin").cloned().unwrap_or_default();
        let host = case.request.host.clone().unwrap_or_else(|| self.default_host("ws"));
        let stream = tokio::net::TcpStream::connect(self.gateway)
            .await
            .map_err(|e| format!("connect {}: {e}", self.gateway))?;
        websocket::exchange(stream, &host, &case.request.path, &origin, &messages)
            .await
            .map_err(|e| format!("websocket {}: {e:#}", case.request.path))?;
        Ok(None)
    }

    /// Sends `total` requests, `concurrency` at a time; `one(n)` sends the n-th.
    async fn load<F, Fut>(&self, total: usize, concurrency: usize, one: F) -> Vec<Result<Option<Value>, String>>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<Option<Value>, String>>,
    {
        let next = AtomicUsize::new(0);
        let results = std::sync::Mutex::new(Vec::with_capacity(total));
        let worker = || async {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                let result = one(n).await;
                if let Ok(mut results) = results.lock() {
                    results.push(result);
                }
            }
        };
        let workers: Vec<_> = (0..concurrency.max(1)).map(|_| worker()).collect();
        join_all(workers).await;
        results.into_inner().unwrap_or_default()
    }
}

/// Polls `f` every 100 ms until it holds or `timeout` passes.
async fn eventually(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_mirror(target: &Target<'_>, case: &Case) -> Result<(), String> {
    let mirror = case.mirror.as_ref().ok_or("mirror case without `mirror`")?;
    let request_id = uuid();
    target
        .until_consistent(|| target.attempt(&case.request, &case.expect, &request_id))
        .await?;
    let path = case.request.path.replace("{request_id}", &request_id);
    let timeout = Duration::from_secs(mirror.timeout_seconds.unwrap_or(10));
    for to in &mirror.mirrored_to {
        let echo = target
            .context
            .backends
            .echo(&to.namespace, &to.backend)
            .ok_or_else(|| format!("no echo backend {}/{}", to.namespace, to.backend))?;
        if !eventually(timeout, || echo.served_count(&path) > 0).await {
            return Err(format!("{} never received the mirrored {path}", to.backend));
        }
    }
    Ok(())
}

async fn run_mirror_percentage(target: &Target<'_>, case: &Case) -> Result<(), String> {
    let mirror = case.mirror.as_ref().ok_or("mirror_percentage case without `mirror`")?;
    let precheck = case
        .precheck
        .as_ref()
        .ok_or("mirror_percentage case without `precheck`")?;
    target
        .until_consistent(|| target.attempt(&precheck.request, &precheck.expect, ""))
        .await
        .map_err(|e| format!("precheck: {e}"))?;
    let total = mirror.total_requests.unwrap_or(500);
    let mut last = String::new();
    for attempt in 0..mirror.max_attempts.unwrap_or(5) {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(mirror.pause_between_attempts_seconds.unwrap_or(2))).await;
        }
        let request_id = uuid();
        let results = target
            .load(total, mirror.concurrency.unwrap_or(10), |_| {
                let request_id = request_id.clone();
                async move {
                    // Each request is repeated until it passes once.
                    let deadline = Instant::now() + MAX_TIME_TO_CONSISTENCY;
                    loop {
                        match target.attempt(&case.request, &case.expect, &request_id).await {
                            Ok(echo) => return Ok(echo),
                            Err(e) if Instant::now() > deadline => return Err(e),
                            Err(_) => tokio::time::sleep(PAUSE_AFTER_FAILURE).await,
                        }
                    }
                }
            })
            .await;
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            return Err(e.clone());
        }
        let path = case.request.path.replace("{request_id}", &request_id);
        // Mirrors are fire-and-forget: let the counts settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut all_within = true;
        for to in &mirror.mirrored_to {
            let echo = target
                .context
                .backends
                .echo(&to.namespace, &to.backend)
                .ok_or_else(|| format!("no echo backend {}/{}", to.namespace, to.backend))?;
            let count = echo.served_count(&path) as f64;
            let (min, max) = (to.min_count.unwrap_or(0.0), to.max_count.unwrap_or(f64::MAX));
            if count < min || count > max {
                all_within = false;
                last = format!(
                    "{} received {count} of {total} mirrored requests, want [{min:.1}, {max:.1}]",
                    to.backend
                );
            }
        }
        if all_within {
            return Ok(());
        }
    }
    Err(last)
}

async fn run_weights(target: &Target<'_>, case: &Case) -> Result<(), String> {
    let distribution = case
        .distribution
        .as_ref()
        .ok_or("weights case without `distribution`")?;
    target
        .until_consistent(|| target.attempt(&case.request, &case.expect, ""))
        .await?;
    let mut last = String::new();
    for _ in 0..distribution.max_attempts {
        let results = target
            .load(distribution.total_requests, distribution.concurrency, |_| {
                // Go's AddEntropy: half the requests carry only a random X-Jitter header.
                let jitter = fastrand::bool().then(|| ("X-Jitter".to_string(), fastrand::u32(0..10_000).to_string()));
                target.attempt_with(&case.request, &case.expect, "", jitter)
            })
            .await;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for result in results {
            let echo = result?.ok_or("response without an echo body")?;
            let pod = echo.get("pod").and_then(Value::as_str).unwrap_or("");
            let parts: Vec<&str> = pod.split('-').collect();
            let backend = parts[..parts.len().saturating_sub(2)].join("-");
            *counts.entry(backend).or_default() += 1;
        }
        match judge_distribution(&counts, distribution) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn judge_distribution(
    counts: &BTreeMap<String, usize>,
    distribution: &crate::suite::Distribution,
) -> Result<(), String> {
    let total: usize = counts.values().sum();
    for backend in counts.keys() {
        if distribution.expected_weights.get(backend).copied().unwrap_or(0.0) <= 0.0 {
            return Err(format!("{backend} received traffic, want none (counts {counts:?})"));
        }
    }
    for (backend, weight) in &distribution.expected_weights {
        let share = counts.get(backend).copied().unwrap_or(0) as f64 / total.max(1) as f64;
        if *weight > 0.0 && share == 0.0 {
            return Err(format!("{backend} received no traffic (counts {counts:?})"));
        }
        if (share - weight).abs() > distribution.tolerance {
            return Err(format!(
                "{backend} share {share:.3}, want {weight} ± {} (counts {counts:?})",
                distribution.tolerance
            ));
        }
    }
    Ok(())
}

async fn run_backend_header_consistency(target: &Target<'_>, case: &Case) -> Result<(), String> {
    let repeat = case
        .repeat
        .as_ref()
        .ok_or("backend_header_consistency case without `repeat`")?;
    target
        .until_consistent(|| target.attempt(&case.request, &case.expect, ""))
        .await?;
    for n in 0..repeat.count {
        let echo = target
            .attempt(&case.request, &case.expect, "")
            .await?
            .ok_or("response without an echo body")?;
        let pod = echo.get("pod").and_then(Value::as_str).unwrap_or("");
        let values: Vec<&str> = echo
            .get("headers")
            .and_then(Value::as_object)
            .and_then(|h| h.iter().find(|(name, _)| name.eq_ignore_ascii_case(&repeat.header)))
            .and_then(|(_, v)| v.as_array())
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match values.as_slice() {
            [value] if pod.starts_with(value) => {}
            _ => {
                return Err(format!(
                    "request {n}: pod {pod:?} saw {}: {values:?}, want exactly one value naming the pod's backend",
                    repeat.header
                ));
            }
        }
    }
    Ok(())
}

/// Awaits all futures concurrently on the current task.
async fn join_all<F: Future<Output = ()>>(futures: Vec<F>) {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// A random (version 4) UUID for `{request_id}` and `{uuid}`.
fn uuid() -> String {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn decode_hex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect()
}
