//! `gateway-api-conformance`: feeds the Kubernetes Gateway API HTTPRoute conformance cases
//! (`../shared/conformance/gateway-api`, see its README) to a meshgate process and reports
//! `N passed, N failed` with the failing case ids.
//!
//! Every Gateway gets its own loopback address (127.0.1.x) and binds its declared ports
//! (80, 443, 8080, 8090), so the runner needs CAP_NET_BIND_SERVICE (CI runs as root).

mod client;
mod config;
mod echo;
mod evaluate;
mod proxy;
mod runner;
mod suite;
mod websocket;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use crate::runner::{CaseResult, Consistency, Runner};
use crate::suite::Case;

/// The SupportedFeatures meshgate claims: every core and extended feature the suite's HTTP
/// cases require. A test needing a feature not listed here is NOT_SUPPORTED, as upstream.
const SUPPORTED_FEATURES: &[&str] = &[
    "Gateway",
    "GatewayHTTPListenerIsolation",
    "GatewayHTTPSListenerDetectMisdirectedRequests",
    "GatewayPort8080",
    "HTTPRoute",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
    "HTTPRouteBackendProtocolH2C",
    "HTTPRouteBackendProtocolWebSocket",
    "HTTPRouteBackendRequestHeaderModification",
    "HTTPRouteBackendRequestRedirect",
    "HTTPRouteBackendTimeout",
    "HTTPRouteBackendURLRewrite",
    "HTTPRouteCORS",
    "HTTPRouteHostRewrite",
    "HTTPRouteMethodMatching",
    "HTTPRouteNamedRouteRule",
    "HTTPRouteParentRefPort",
    "HTTPRoutePathRedirect",
    "HTTPRoutePathRewrite",
    "HTTPRoutePortRedirect",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteRequestMirror",
    "HTTPRouteRequestMultipleMirrors",
    "HTTPRouteRequestPercentageMirror",
    "HTTPRouteRequestTimeout",
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteRetry",
    "HTTPRouteRetryBackendTimeout",
    "HTTPRouteRetryConnectionError",
    "HTTPRouteSchemeRedirect",
    "ListenerSet",
    "ReferenceGrant",
];

#[derive(Parser)]
#[command(about = "Run the Gateway API HTTPRoute conformance cases against meshgate")]
struct Args {
    /// The suite folder (cases.json, backends.json, manifests/).
    #[arg(long)]
    suite: Option<PathBuf>,
    /// The meshgate binary; default: `meshgate` next to this runner.
    #[arg(long)]
    meshgate: Option<PathBuf>,
    /// Run only these tests (upstream short names); repeatable.
    #[arg(long = "test")]
    tests: Vec<String>,
    /// `eventual`: upstream's rule (3 consecutive passes within 30 s); `strict`: the first 3
    /// attempts must pass.
    #[arg(long, value_enum, default_value = "eventual")]
    consistency: ConsistencyArg,
    /// A Markdown file whose table rows start with `` | `CaseId` | ``: the cases known to fail.
    /// With it, the exit code is 0 when every failing case is listed there.
    #[arg(long)]
    known_failures: Option<PathBuf>,
    /// Where configs and meshgate logs are written.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ConsistencyArg {
    Eventual,
    Strict,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let suite = match args.suite {
        Some(suite) => suite,
        None => default_suite().context("no suite folder found; pass --suite")?,
    };
    let binary = match args.meshgate {
        Some(binary) => binary,
        None => std::env::current_exe()?.with_file_name("meshgate"),
    };
    let consistency = match args.consistency {
        ConsistencyArg::Eventual => Consistency::Eventual,
        ConsistencyArg::Strict => Consistency::Strict,
    };
    let run_dir = args
        .run_dir
        .unwrap_or_else(|| std::env::temp_dir().join("meshgate-conformance"));
    let known_failures = match &args.known_failures {
        Some(path) => read_known_failures(path)?,
        None => BTreeSet::new(),
    };

    let cases = suite::load_cases(&suite)?;
    let mut tests: Vec<(String, Vec<Case>)> = Vec::new();
    for case in cases {
        if !args.tests.is_empty() && !args.tests.contains(&case.test) {
            continue;
        }
        match tests.iter_mut().find(|(name, _)| *name == case.test) {
            Some((_, cases)) => cases.push(case),
            None => tests.push((case.test.clone(), vec![case])),
        }
    }
    if tests.is_empty() {
        anyhow::bail!("no test matches {:?}", args.tests);
    }
    println!(
        "Gateway API conformance: {} tests from {} (meshgate {}, consistency {consistency:?}, logs in {})",
        tests.len(),
        suite.display(),
        binary.display(),
        run_dir.display()
    );

    let mut runner = Runner::new(&suite, &binary, &run_dir, consistency).await?;
    let mut results: Vec<CaseResult> = Vec::new();
    let mut not_supported: Vec<String> = Vec::new();
    for (test, cases) in &tests {
        let missing: Vec<&String> = cases[0]
            .feature
            .required
            .iter()
            .filter(|f| !SUPPORTED_FEATURES.contains(&f.as_str()))
            .collect();
        if !missing.is_empty() {
            println!("NOT_SUPPORTED {test} (needs {missing:?})");
            not_supported.push(test.clone());
            continue;
        }
        let test_results = runner.run_test(cases).await;
        let failed: Vec<&CaseResult> = test_results.iter().filter(|r| r.outcome.is_err()).collect();
        let verdict = if failed.is_empty() { "PASS" } else { "FAIL" };
        println!(
            "{verdict} {test} ({}/{} cases)",
            test_results.len() - failed.len(),
            test_results.len()
        );
        for result in failed {
            if let Err(why) = &result.outcome {
                println!("    {} ({}): {why}", result.case.id, result.case.name);
            }
        }
        results.extend(test_results);
    }

    print_profile_summary(&results, &not_supported, &tests);
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.outcome.is_err())
        .map(|r| r.case.id.as_str())
        .collect();
    let passed = results.len() - failed.len();
    println!("{passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        println!("failing cases: {}", failed.join(" "));
    }
    let unexpected: Vec<&str> = failed
        .iter()
        .copied()
        .filter(|id| !known_failures.contains(*id))
        .collect();
    let now_passing: Vec<&String> = known_failures
        .iter()
        .filter(|id| results.iter().any(|r| &r.case.id == *id && r.outcome.is_ok()))
        .collect();
    if !now_passing.is_empty() {
        println!("listed as known failures but passing now (update the list): {now_passing:?}");
    }
    if !unexpected.is_empty() {
        if args.known_failures.is_some() {
            println!("failing and not listed as known failures: {}", unexpected.join(" "));
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Upstream's GATEWAY-HTTP report: core and extended results, and each extended feature's.
fn print_profile_summary(results: &[CaseResult], not_supported: &[String], tests: &[(String, Vec<Case>)]) {
    let mut by_test: BTreeMap<&str, (bool, &Case)> = BTreeMap::new();
    for result in results {
        let entry = by_test.entry(&result.case.test).or_insert((true, &result.case));
        entry.0 &= result.outcome.is_ok();
    }
    for level in ["core", "extended"] {
        let level_tests: Vec<(&str, bool)> = by_test
            .iter()
            .filter(|(_, (_, case))| case.feature.level == level)
            .map(|(test, (ok, _))| (*test, *ok))
            .collect();
        let skipped = tests
            .iter()
            .filter(|(name, cases)| not_supported.contains(name) && cases[0].feature.level == level)
            .count();
        let failed = level_tests.iter().filter(|(_, ok)| !ok).count();
        let verdict = match (failed, skipped) {
            (0, 0) => "Success",
            (0, _) => "Partial",
            _ => "Failure",
        };
        println!(
            "GATEWAY-HTTP {level}: {verdict} ({} tests passed, {failed} failed, {skipped} not supported)",
            level_tests.len() - failed
        );
    }
    let mut features: BTreeMap<&str, bool> = BTreeMap::new();
    for (ok, case) in by_test.values() {
        if case.feature.level == "extended" {
            *features.entry(case.feature.name.as_str()).or_insert(true) &= *ok;
        }
    }
    let failing: Vec<&str> = features.iter().filter(|(_, ok)| !**ok).map(|(f, _)| *f).collect();
    println!(
        "extended features: {} passing, failing: {:?}",
        features.len() - failing.len(),
        failing
    );
}

/// `<repo>/../shared/conformance/gateway-api`, the layout of the team's machines.
fn default_suite() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        repo.join("../shared/conformance/gateway-api"),
        PathBuf::from("/work/shared/conformance/gateway-api"),
    ]
    .into_iter()
    .find(|p| p.join("cases.json").is_file())
}

fn read_known_failures(path: &Path) -> anyhow::Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(id, _)| id.to_string()))
        .filter(|id| id.contains('/'))
        .collect())
}
