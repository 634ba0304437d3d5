//! Bad configuration gives findings, never a panic: a deterministic mutation test.
//!
//! Seed inputs are the Gateway API conformance manifests, the ```yaml blocks of `docs/*.md`,
//! the YAML of the repository's tests (raw string literals with `apiVersion:` or
//! `_format_version`) and `demo/*.yaml`. Each case corrupts one seed (1-3 mutations of its
//! parsed value tree, re-serialised as YAML, or a text-level edit) with a fixed-seed PRNG,
//! then runs `source::parse_str` + `compile` inside `catch_unwind`. Every panic is reported
//! with the seed, the case number, the mutations and a reproducer.
//!
//! `MESHGATE_NO_PANIC_CASES=100000 MESHGATE_NO_PANIC_SEED=7 cargo nextest run -p meshgate-model
//! --test no_panic` searches further (about 2 s per 1000 cases in a debug build).
//!
//! The targeted tests at the end are reproducers of panics this test (or reading the code
//! it pointed at) found, kept as assertions on the findings they now give.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshgate_model::{CompileOptions, Compiled, Finding, Findings, Severity, compile, source};
use serde_json::{Value, json};

/// Total mutated inputs run; sized to stay well under 20 s in a debug build on 2 cores.
const CASES: u64 = 3000;
const SEED: u64 = 0x6d65_7368_6761_7465; // "meshgate"

const CONFORMANCE: &str = "/work/shared/conformance/gateway-api";
const CLASS: &str = "meshgate-test";
const GATEWAY_CLASS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: meshgate-test}
spec:
  controllerName: meshgate.io/gateway-controller
"#;
const TLS_SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: tls-validity-checks-certificate, namespace: gateway-conformance-infra}
type: kubernetes.io/tls
stringData:
  tls.crt: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
  tls.key: "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"
"#;

/// The repository root; the runtime value first, as `docs_examples.rs` explains.
fn repo_root() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.join("../..")
}

// ---------------------------------------------------------------------------------------------
// PRNG

/// xorshift64*: small, deterministic, good enough to pick nodes and mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so neighbouring case numbers start far apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds

struct Seed {
    name: String,
    /// YAML loaded unchanged alongside the mutated text (the GatewayClass and base manifest a
    /// conformance manifest refers to).
    fixed: String,
    /// The text that is mutated.
    text: String,
    /// Gateway API Gateways get a loopback address each, as the conformance runner does.
    conformance: bool,
}

fn conformance_seeds() -> Vec<Seed> {
    let dir = Path::new(CONFORMANCE).join("manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("manifest entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .replace("{GATEWAY_CLASS_NAME}", CLASS)
    };
    let base = read(&dir.join("base.yaml"));
    files
        .iter()
        .map(|file| {
            let name = file.file_name().expect("file name").to_string_lossy();
            let is_base = name == "base.yaml";
            let mut fixed = format!("{GATEWAY_CLASS}---\n{TLS_SECRET}");
            if !is_base {
                fixed.push_str("---\n");
                fixed.push_str(&base);
            }
            Seed {
                name: format!("conformance/manifests/{name}"),
                fixed,
                text: read(file),
                conformance: true,
            }
        })
        .collect()
}

fn docs_seeds(root: &Path) -> Vec<Seed> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs folder")
        .map(|e| e.expect("docs entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    let mut seeds = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable markdown");
        let name = file.file_name().expect("file name").to_string_lossy().into_owned();
        let mut current: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            match current.as_mut() {
                None if line.trim() == "```yaml" => current = Some((i + 1, String::new())),
                None => {}
                Some(_) if line.trim() == "```" => {
                    let (at, text) = current.take().expect("open block");
                    seeds.push(plain_seed(format!("docs/{name}:{at}"), text));
                }
                Some((_, block)) => {
                    block.push_str(line);
                    block.push('\n');
                }
            }
        }
    }
    seeds
}

fn plain_seed(name: String, text: String) -> Seed {
    Seed {
        name,
        fixed: String::new(),
        text,
        conformance: false,
    }
}

/// The raw string literals (`r#"..."#`) of a Rust file holding Istio, Gateway API or Kong YAML.
/// `format!` templates are expanded with the file's `const NAME: &str` literals, other
/// placeholders becoming a port number (most are ports; the rest leave YAML that only the
/// text-level mutations use).
fn rust_literal_seeds(file: &Path, label: &str) -> Vec<Seed> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    // (line, text, the NAME of `const NAME: &str =` before it, whether it is `format!`'s template)
    let mut literals = Vec::new();
    let mut rest = text.as_str();
    let mut offset = 0;
    while let Some(start) = rest.find("r#\"") {
        let body = &rest[start + 3..];
        let Some(end) = body.find("\"#") else { break };
        let line = text[..offset + start].matches('\n').count() + 1;
        let before = text[..offset + start].rsplit('\n').next().unwrap_or("");
        let const_name = before
            .trim()
            .strip_prefix("const ")
            .and_then(|s| s.split(':').next())
            .map(|s| s.trim().to_string());
        let is_format = text[..offset + start].trim_end().ends_with("format!(");
        literals.push((line, body[..end].to_string(), const_name, is_format));
        let consumed = start + 3 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    let consts: BTreeMap<String, String> = literals
        .iter()
        .filter_map(|(_, t, c, _)| c.clone().map(|c| (c, t.clone())))
        .collect();
    literals
        .into_iter()
        .filter(|(_, t, _, _)| t.contains("apiVersion:") || t.contains("_format_version"))
        .map(|(line, t, _, is_format)| {
            let t = if is_format { expand_format(&t, &consts) } else { t };
            plain_seed(format!("{label}:{line}"), t)
        })
        .collect()
}

/// A `format!` template with `{{`/`}}` unescaped and `{name}` (or `{name:spec}`) replaced by
/// `consts[name]`, else by a port number (or nothing at a line's start).
fn expand_format(template: &str, consts: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                for c in chars.by_ref() {
                    if c == '}' {
                        break;
                    }
                    name.push(c);
                }
                let name = name.split(':').next().unwrap_or("");
                // One at a line's start stands for YAML documents or lines, left out.
                let unknown = if out.is_empty() || out.ends_with('\n') {
                    ""
                } else {
                    "18080"
                };
                out.push_str(consts.get(name).map_or(unknown, String::as_str));
            }
            c => out.push(c),
        }
    }
    out
}

fn seeds() -> Vec<Seed> {
    let root = repo_root();
    let mut seeds = conformance_seeds();
    seeds.extend(docs_seeds(&root));
    for dir in ["crates/model/tests", "crates/meshgate/tests"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("test entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .filter(|p| !p.ends_with("no_panic.rs"))
            .collect();
        files.sort();
        for file in files {
            let label = format!("{dir}/{}", file.file_name().expect("file name").to_string_lossy());
            seeds.extend(rust_literal_seeds(&file, &label));
        }
    }
    let mut demo: Vec<PathBuf> = std::fs::read_dir(root.join("demo"))
        .expect("demo folder")
        .map(|e| e.expect("demo entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    demo.sort();
    for file in demo {
        let text = std::fs::read_to_string(&file).expect("demo file");
        seeds.push(plain_seed(
            format!("demo/{}", file.file_name().expect("file name").to_string_lossy()),
            text,
        ));
    }
    seeds
}

// ---------------------------------------------------------------------------------------------
// Mutations

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `document 1: spec.http[0].route`, for reproducers.
fn show_path(doc: usize, path: &[Seg]) -> String {
    let mut s = format!("document {doc}: ");
    for (i, seg) in path.iter().enumerate() {
        match seg {
            Seg::Key(k) if i == 0 => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(n) => s.push_str(&format!("[{n}]")),
        }
    }
    if path.is_empty() {
        s.push_str("<root>");
    }
    s
}

fn collect_paths(value: &Value, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(path.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                path.push(Seg::Key(k.clone()));
                collect_paths(v, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                collect_paths(v, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// `apiVersion`, `kind`, `metadata.name` and their parents, or a decK `_format_version`.
fn is_identity(path: &[Seg]) -> bool {
    match path {
        [Seg::Key(k)] => ["apiVersion", "kind", "metadata", "_format_version"].contains(&k.as_str()),
        [Seg::Key(m), Seg::Key(n)] => m == "metadata" && n == "name",
        _ => false,
    }
}

fn node_mut<'a>(mut value: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    for seg in path {
        value = match seg {
            Seg::Key(k) => value.as_object_mut()?.get_mut(k)?,
            Seg::Index(i) => value.as_array_mut()?.get_mut(*i)?,
        };
    }
    Some(value)
}

/// Scalars a corrupted config might hold, with how a reproducer shows them.
fn scalars() -> Vec<(String, Value)> {
    let long = "a".repeat(10_000);
    let mut out: Vec<(String, Value)> = vec![("<10000 x 'a'>".to_string(), Value::String(long))];
    let strings = [
        "",
        "nul\0byte",
        "ünïcödé ☃ 𝄞 \u{202e}",
        "*",
        "~",
        "(",
        "[",
        "\\",
        "-",
        "/",
        ".",
        "*.",
        "**",
        "NaN",
        "-1",
        "1e308",
        "-1s",
        "0s",
        "99999999999999999999h",
        "1.5",
        "65536",
        "0.0.0.0/99",
        "::::",
        "%",
        "101%",
        "a..b",
        "host:",
        ":80",
        "[::1]:99999",
        "1-",
    ];
    out.extend(strings.iter().map(|s| (format!("{s:?}"), json!(s))));
    let others = [
        json!(-1),
        json!(0),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(true),
        json!(false),
        Value::Null,
    ];
    out.extend(others.into_iter().map(|v| (v.to_string(), v)));
    out
}

fn containers() -> Vec<Value> {
    vec![json!({}), json!([]), json!({"a": 1}), json!(["x"]), json!([{}])]
}

/// Sets every number, or every string outside the documents' identity fields, to `to`.
fn set_all(value: &mut Value, path: &mut Vec<Seg>, numbers: bool, to: &Value) {
    match value {
        Value::Number(_) if numbers => *value = to.clone(),
        Value::String(_) if !numbers && !is_identity(path) => *value = to.clone(),
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                path.push(Seg::Key(k.clone()));
                set_all(v, path, numbers, to);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                path.push(Seg::Index(i));
                set_all(v, path, numbers, to);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Applies one random mutation to the documents; a description of what it did.
fn mutate_tree(docs: &mut [Value], rng: &mut Rng, scalars: &[(String, Value)]) -> String {
    // Now and then a change everywhere: every number to an edge value (-1 most often), or
    // every string to an odd one.
    if rng.below(6) == 0 {
        let numbers = [
            json!(-1),
            json!(0),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1e308),
            json!(0.5),
        ];
        let to = if rng.below(3) == 0 {
            json!(-1)
        } else {
            numbers[rng.below(numbers.len())].clone()
        };
        docs.iter_mut().for_each(|d| set_all(d, &mut Vec::new(), true, &to));
        return format!("every number set to {to}");
    }
    if rng.below(12) == 0 {
        let (shown, to) = &scalars[rng.below(scalars.len())];
        docs.iter_mut().for_each(|d| set_all(d, &mut Vec::new(), false, to));
        return format!("every string (but apiVersion, kind, metadata.name) set to {shown}");
    }
    let d = rng.below(docs.len());
    let mut paths = Vec::new();
    collect_paths(&docs[d], &mut Vec::new(), &mut paths);
    // The root itself is only replaced now and then: it is one simple case for `source`.
    let pick = |rng: &mut Rng| {
        if paths.len() > 1 && rng.below(20) != 0 {
            paths[1 + rng.below(paths.len() - 1)].clone()
        } else {
            paths[0].clone()
        }
    };
    let mut path = pick(rng);
    // A document without its identity fails in `source` before any format reads it, so those
    // fields are mostly left alone in favour of the rest.
    if is_identity(&path) && rng.below(8) != 0 {
        path = pick(rng);
    }
    let at = show_path(d, &path);
    let Some(node) = node_mut(&mut docs[d], &path) else {
        return format!("{at}: gone");
    };
    match node {
        Value::Object(map) if !map.is_empty() && rng.below(3) == 0 => {
            let mut key = map.keys().nth(rng.below(map.len())).cloned().expect("key");
            if is_identity(&[path.clone(), vec![Seg::Key(key.clone())]].concat()) && rng.below(8) != 0 {
                key = map.keys().nth(rng.below(map.len())).cloned().expect("key");
            }
            map.remove(&key);
            format!("{at}: key {key:?} deleted")
        }
        Value::Array(items) if !items.is_empty() && rng.below(3) == 0 => {
            let i = rng.below(items.len());
            let item = items[i].clone();
            items.insert(i, item);
            format!("{at}: item [{i}] duplicated")
        }
        Value::Array(items) if !items.is_empty() && rng.below(4) == 0 => {
            items.clear();
            format!("{at}: emptied")
        }
        Value::Object(_) | Value::Array(_) => {
            let (shown, v) = &scalars[rng.below(scalars.len())];
            *node = v.clone();
            format!("{at}: replaced by scalar {shown}")
        }
        _ if rng.below(5) == 0 => {
            let all = containers();
            let v = all[rng.below(all.len())].clone();
            let shown = v.to_string();
            *node = v;
            format!("{at}: scalar replaced by {shown}")
        }
        _ => {
            let (shown, v) = &scalars[rng.below(scalars.len())];
            *node = v.clone();
            format!("{at}: replaced by {shown}")
        }
    }
}

fn char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate_text(text: &str, rng: &mut Rng) -> (String, String) {
    let lines: Vec<&str> = text.lines().collect();
    match rng.below(4) {
        0 => {
            let at = char_boundary(text, rng.below(text.len() + 1));
            (text[..at].to_string(), format!("text truncated at byte {at}"))
        }
        1 => {
            let at = char_boundary(text, rng.below(text.len() + 1));
            (
                format!("{}\t{}", &text[..at], &text[at..]),
                format!("tab inserted at byte {at}"),
            )
        }
        2 if !lines.is_empty() => {
            let i = rng.below(lines.len());
            let mut out = lines.clone();
            out.insert(i, lines[i]);
            (out.join("\n") + "\n", format!("line {} duplicated", i + 1))
        }
        _ if !lines.is_empty() => {
            let i = rng.below(lines.len());
            let mut out = lines.clone();
            out.remove(i);
            (out.join("\n") + "\n", format!("line {} deleted", i + 1))
        }
        _ => (text.to_string(), "unchanged".to_string()),
    }
}

fn parse_values(text: &str) -> Option<Vec<Value>> {
    let options = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_multiple_with_options(text, options).ok()
}

/// YAML text of the documents; JSON (which is YAML) when the YAML writer declines one.
fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_saphyr::to_string(d).unwrap_or_else(|_| serde_json::to_string_pretty(d).expect("json")))
        .collect::<Vec<_>>()
        .join("---\n")
}

// ---------------------------------------------------------------------------------------------
// Running a case

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic hook that records the message and location of panics on a thread running a case,
/// instead of printing them (other threads keep the default report).
fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAPTURING.with(Cell::get) {
                previous(info);
                return;
            }
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "<non-string panic>".to_string());
            let mut location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            if location.starts_with("/rustc/") || location.contains("/.cargo/") {
                // A panic inside std or a dependency (`Duration::from_secs_f64`, slicing):
                // name the first caller of ours.
                let trace = std::backtrace::Backtrace::force_capture().to_string();
                if let Some(caller) = trace
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("at "))
                    .find(|l| !l.starts_with("/rustc/") && !l.contains("/.cargo/") && !l.contains("no_panic.rs"))
                {
                    location = format!("{location}, called from {caller}");
                }
            }
            PANIC.with(|p| *p.borrow_mut() = Some(format!("{message} (at {location})")));
        }));
    });
}

fn run(seed: &Seed, fixed: &[source::Document], text: &str) -> Result<Compiled, Findings> {
    let mut docs = fixed.to_vec();
    docs.extend(source::parse_str(Path::new(&seed.name), text)?);
    if seed.conformance {
        let mut n = 0;
        for doc in docs
            .iter_mut()
            .filter(|d| d.kind == "Gateway" && d.api_version.starts_with("gateway.networking.k8s.io/"))
        {
            if let Some(spec) = doc.body.get_mut("spec").and_then(Value::as_object_mut)
                && !spec.contains_key("addresses")
            {
                spec.insert(
                    "addresses".to_string(),
                    json!([{"type": "IPAddress", "value": format!("127.0.0.{}", 10 + n)}]),
                );
                n += 1;
            }
        }
    }
    compile(&docs, &CompileOptions::default())
}

/// How the cases ended: compiled, failed in `parse_str`, failed in `compile`.
#[derive(Default, Debug)]
struct Outcomes {
    compiled: usize,
    parse_errors: usize,
    compile_errors: usize,
}

/// The panic message when running `text` panics.
fn panics(seed: &Seed, fixed: &[source::Document], text: &str, outcomes: &mut Outcomes) -> Option<String> {
    install_hook();
    CAPTURING.with(|c| c.set(true));
    PANIC.with(|p| p.borrow_mut().take());
    let result = catch_unwind(AssertUnwindSafe(|| run(seed, fixed, text)));
    CAPTURING.with(|c| c.set(false));
    match result {
        Ok(Ok(_)) => outcomes.compiled += 1,
        Ok(Err(f)) if f.0.iter().all(|f| f.resource.is_empty()) => outcomes.parse_errors += 1,
        Ok(Err(_)) => outcomes.compile_errors += 1,
        Err(_) => {
            return Some(
                PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "<no message>".to_string()),
            );
        }
    }
    None
}

/// `MESHGATE_NO_PANIC_CASES` / `MESHGATE_NO_PANIC_SEED` override the case count and seed,
/// to search further by hand; the defaults are what CI runs.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Failure {
    seed: String,
    case: u64,
    mutations: Vec<String>,
    message: String,
    text: String,
}

#[test]
fn corrupted_configs_give_findings_not_panics() {
    let started = Instant::now();
    let seeds = seeds();
    assert!(seeds.len() >= 100, "only {} seed inputs found", seeds.len());
    let fixed: Vec<Vec<source::Document>> = seeds
        .iter()
        .map(|s| source::parse_str(Path::new("fixed.yaml"), &s.fixed).unwrap_or_else(|f| panic!("{}: {f}", s.name)))
        .collect();
    let parsed: Vec<Option<Vec<Value>>> = seeds
        .iter()
        .map(|s| parse_values(&s.text).filter(|v| !v.is_empty()))
        .collect();
    let tree_seeds = parsed.iter().filter(|p| p.is_some()).count();
    assert!(tree_seeds * 10 >= seeds.len() * 9, "most seeds should parse");
    // The unmutated seeds must not panic either.
    let cases = env_u64("MESHGATE_NO_PANIC_CASES", CASES);
    let base_seed = env_u64("MESHGATE_NO_PANIC_SEED", SEED);
    let mut outcomes = Outcomes::default();
    let mut failures = Vec::new();
    for (seed, fixed) in seeds.iter().zip(&fixed) {
        if let Some(message) = panics(seed, fixed, &seed.text, &mut outcomes) {
            failures.push(Failure {
                seed: seed.name.clone(),
                case: u64::MAX,
                mutations: vec!["unmutated".to_string()],
                message,
                text: seed.text.clone(),
            });
        }
    }
    let scalars = scalars();
    for case in 0..cases {
        let i = (case % seeds.len() as u64) as usize;
        let seed = &seeds[i];
        let mut rng = Rng::new(base_seed ^ case);
        let (text, mutations) = match &parsed[i] {
            Some(values) if rng.below(8) != 0 => {
                let mut values = values.clone();
                let n = 1 + rng.below(3);
                let mutations: Vec<String> = (0..n).map(|_| mutate_tree(&mut values, &mut rng, &scalars)).collect();
                (to_yaml(&values), mutations)
            }
            _ => {
                let (text, mutation) = mutate_text(&seed.text, &mut rng);
                (text, vec![mutation])
            }
        };
        if let Some(message) = panics(seed, &fixed[i], &text, &mut outcomes) {
            failures.push(Failure {
                seed: seed.name.clone(),
                case,
                mutations,
                message,
                text,
            });
        }
    }
    println!(
        "{} seeds ({} with a value tree), {cases} mutated cases in {:.1?}: {outcomes:?} (seeds included)",
        seeds.len(),
        tree_seeds,
        started.elapsed()
    );
    if failures.is_empty() {
        return;
    }
    // One reproducer per distinct panic message (location included), up to 10.
    let mut distinct: BTreeMap<&str, (usize, &Failure)> = BTreeMap::new();
    for f in &failures {
        distinct.entry(f.message.as_str()).or_insert((0, f)).0 += 1;
    }
    let mut report = format!(
        "{} of {cases} cases panicked ({} distinct panics; seed {base_seed:#x}):\n",
        failures.len(),
        distinct.len()
    );
    for (message, (count, f)) in distinct.iter().take(10) {
        let text: String = f.text.chars().take(3000).collect();
        report.push_str(&format!(
            "\n=== {count} case(s): {message}\nseed {}, case {}, mutations: {:?}\n--- input ---\n{text}\n",
            f.seed, f.case, f.mutations
        ));
    }
    panic!("{report}");
}

// ---------------------------------------------------------------------------------------------
// Reproducers of panics found above, now findings.

fn errors(yaml: &str) -> Vec<Finding> {
    let docs = source::parse_str(Path::new("repro.yaml"), yaml).unwrap_or_else(|f| panic!("{f}"));
    match compile(&docs, &CompileOptions::default()) {
        Ok(c) => panic!("expected errors, got warnings {:?}", c.warnings),
        Err(f) => f.0.into_iter().filter(|f| f.severity == Severity::Error).collect(),
    }
}

fn assert_error(findings: &[Finding], field: &str, message: &str) {
    assert!(
        findings
            .iter()
            .any(|f| f.field == field && f.message.contains(message) && f.file == Path::new("repro.yaml")),
        "no error on {field} containing {message:?}: {findings:#?}"
    );
}

#[test]
fn the_harness_catches_and_reports_panics() {
    let seed = plain_seed("harness".to_string(), String::new());
    let mut outcomes = Outcomes::default();
    let text = "apiVersion: v1\nkind: A\nmetadata: {name: a}\n";
    assert_eq!(panics(&seed, &[], text, &mut outcomes), None);
    install_hook();
    CAPTURING.with(|c| c.set(true));
    let caught = catch_unwind(|| Duration::from_secs_f64(f64::MAX));
    CAPTURING.with(|c| c.set(false));
    assert!(caught.is_err());
    let message = PANIC.with(|p| p.borrow_mut().take()).expect("captured");
    assert!(message.contains("too big"), "{message}");
}

/// Kong `healthchecks.active` numbers went unchecked into `Duration::from_secs_f64`, which
/// panics on 1e308 or u64::MAX (found from docs/resilience.md's example with every number
/// set so); they are now checked against Kong's limits.
#[test]
fn kong_active_health_check_numbers_out_of_range_are_errors() {
    let cases = [
        ("1e308", "1", "2"),
        ("18446744073709551615", "1e308", "-1"),
        ("-1", "\"1\"", "2.5"),
    ];
    for (interval, timeout, successes) in cases {
        let yaml = format!(
            r#"_format_version: "3.0"
upstreams:
- name: orders-upstream
  targets: [{{target: 10.0.0.11:8080}}]
  healthchecks:
    active:
      timeout: {timeout}
      healthy: {{interval: {interval}, successes: {successes}}}
services:
- name: orders
  host: orders-upstream
  routes: [{{name: orders, paths: [/orders]}}]
"#
        );
        let findings = errors(&yaml);
        let at = "upstreams[0].healthchecks.active";
        assert_error(
            &findings,
            &format!("{at}.healthy.interval"),
            "must be a number of seconds 0..65535",
        );
        if timeout != "1" {
            assert_error(
                &findings,
                &format!("{at}.timeout"),
                "must be a number of seconds 0..65535",
            );
        }
        if successes != "2" {
            assert_error(
                &findings,
                &format!("{at}.healthy.successes"),
                "must be an integer 0..255",
            );
        }
    }
}

/// Kong's schema for `healthchecks.active`: `type` is a string and `healthy.http_statuses`
/// are statuses 100..999; anything else is an error, not silently dropped or defaulted.
#[test]
fn kong_active_health_check_type_and_statuses_are_checked() {
    for (active, field) in [
        (
            "{type: 7, healthy: {interval: 1}}",
            "upstreams[0].healthchecks.active.type",
        ),
        (
            "{healthy: {interval: 1, http_statuses: [200, 42]}}",
            "upstreams[0].healthchecks.active.healthy.http_statuses[1]",
        ),
        (
            "{healthy: {interval: 1, http_statuses: 200}}",
            "upstreams[0].healthchecks.active.healthy.http_statuses",
        ),
    ] {
        let yaml = format!(
            r#"_format_version: "3.0"
upstreams:
- name: orders-upstream
  targets: [{{target: 10.0.0.11:8080}}]
  healthchecks:
    active: {active}
services:
- name: orders
  host: orders-upstream
  routes: [{{name: orders, paths: [/orders]}}]
"#
        );
        let findings = errors(&yaml);
        assert!(findings.iter().any(|f| f.field == field), "{field}: {findings:?}");
    }
}

/// A duration whose whole seconds fit in u128 nanoseconds but whose fraction does not
/// overflowed in the fraction's addition.
#[test]
fn duration_overflowing_in_its_fraction_is_an_error() {
    let findings = errors(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    timeout: 340282366920938463463374607431.9s
"#,
    );
    assert_error(&findings, "spec.http[0].timeout", "too large");
}

/// An HTTPRoute rule's backendRef weights (each at most 1000000) were summed into a u32.
#[test]
fn gateway_api_weights_summing_past_u32_are_an_error() {
    let mut yaml = format!(
        "{GATEWAY_CLASS}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  gatewayClassName: {CLASS}
  listeners: [{{name: http, port: 8080, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: heavy}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - backendRefs:
"
    );
    for _ in 0..4295 {
        yaml.push_str("    - {name: app, port: 80, weight: 1000000}\n");
    }
    let findings = errors(&yaml);
    assert_error(&findings, "spec.rules[0].backendRefs", "the weights sum to 4295000000");
}
