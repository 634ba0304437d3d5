//! Reading configuration files: folders, multi-document YAML, resource identity.
//!
//! Every problem is collected rather than stopping at the first, so one run shows the user
//! everything to fix. Documents are parsed into `serde_json::Value` first (so the typed
//! decoding later can report JSON-style field paths) with YAML 1.2 booleans: only
//! `true`/`false` become booleans, so a label value `no` or a header value `on` stays the
//! string the user meant (typed boolean fields still accept the YAML 1.1 spellings, see
//! `istio::types`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::finding::{Finding, Findings, Severity};

/// One YAML document: a Kubernetes-style resource and where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: PathBuf,
    /// 0-based position of the document in its file, counting only non-empty documents
    /// (items of a `kind: List` share their list's index).
    pub index: usize,
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The whole document as parsed.
    pub body: serde_json::Value,
}

/// Reads every path: a file, or a folder whose `*.yaml`/`*.yml` files (recursively) are read
/// in path order so that document order, and thus route order, is deterministic.
pub fn read_paths(paths: &[PathBuf]) -> Result<Vec<Document>, Findings> {
    let mut findings = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            collect_yaml_files(path, &mut found, &mut findings);
            found.sort();
            files.extend(found);
        } else {
            // Missing files are reported by `read_file`.
            files.push(path.clone());
        }
    }
    let mut documents = Vec::new();
    for file in &files {
        match read_file(file) {
            Ok(docs) => documents.extend(docs),
            Err(Findings(f)) => findings.extend(f),
        }
    }
    if findings.is_empty() {
        Ok(documents)
    } else {
        Err(Findings(findings))
    }
}

fn collect_yaml_files(dir: &Path, out: &mut Vec<PathBuf>, findings: &mut Vec<Finding>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            findings.push(file_error(dir, format!("cannot read folder: {e}")));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                findings.push(file_error(dir, format!("cannot read folder: {e}")));
                continue;
            }
        };
        let path = entry.path();
        if path.is_dir() {
            collect_yaml_files(&path, out, findings);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
}

/// Reads one multi-document YAML file. Empty and null documents are skipped; a
/// `kind: List` (as `kubectl get -o yaml` prints) is flattened into its items.
pub fn read_file(path: &Path) -> Result<Vec<Document>, Findings> {
    let text = match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                return Err(Findings(vec![file_error(path, format!("file is not UTF-8: {e}"))]));
            }
        },
        Err(e) => {
            return Err(Findings(vec![file_error(path, format!("cannot read file: {e}"))]));
        }
    };
    parse_str(path, &text)
}

/// Parses YAML text as if it came from `path` (which only labels findings and documents).
pub fn parse_str(path: &Path, text: &str) -> Result<Vec<Document>, Findings> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
    };
    let values: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, options) {
        Ok(v) => v,
        Err(e) => {
            let location = e
                .location()
                .map(|l| format!(" at line {}, column {}", l.line(), l.column()))
                .unwrap_or_default();
            let message = first_line(&e.to_string());
            return Err(Findings(vec![file_error(
                path,
                format!("malformed YAML{location}: {message}"),
            )]));
        }
    };
    let mut documents = Vec::new();
    let mut findings = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        let is_list = value.get("kind").and_then(Value::as_str) == Some("List")
            && value.get("items").is_some_and(Value::is_array);
        if is_list {
            if let Value::Object(mut map) = value
                && let Some(Value::Array(items)) = map.remove("items")
            {
                for (i, item) in items.into_iter().enumerate() {
                    let at = format!("document {index}, items[{i}]");
                    match to_document(path, index, item, &at) {
                        Ok(d) => documents.push(d),
                        Err(f) => findings.push(f),
                    }
                }
            }
            continue;
        }
        match to_document(path, index, value, &format!("document {index}")) {
            Ok(d) => documents.push(d),
            Err(f) => findings.push(f),
        }
    }
    if findings.is_empty() {
        Ok(documents)
    } else {
        Err(Findings(findings))
    }
}

fn to_document(path: &Path, index: usize, body: Value, at: &str) -> Result<Document, Finding> {
    let Some(object) = body.as_object() else {
        return Err(file_error(
            path,
            format!("{at}: expected a mapping (a Kubernetes resource)"),
        ));
    };
    if crate::kong::is_declarative_config(&body) {
        // A decK file is one document without Kubernetes metadata; it is named after its file.
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kong".to_string());
        return Ok(Document {
            file: path.to_path_buf(),
            index,
            api_version: crate::kong::API_VERSION.to_string(),
            kind: crate::kong::KIND.to_string(),
            name,
            namespace: "default".to_string(),
            labels: BTreeMap::new(),
            body,
        });
    }
    let string_at = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let metadata = object.get("metadata");
    let api_version = string_at(object.get("apiVersion"));
    let kind = string_at(object.get("kind"));
    let name = string_at(metadata.and_then(|m| m.get("name")));
    let missing: Vec<&str> = [
        ("apiVersion", api_version.is_none()),
        ("kind", kind.is_none()),
        ("metadata.name", name.as_deref().is_none_or(str::is_empty)),
    ]
    .into_iter()
    .filter_map(|(f, m)| m.then_some(f))
    .collect();
    let (Some(api_version), Some(kind), Some(name), true) = (api_version, kind, name, missing.is_empty()) else {
        return Err(file_error(
            path,
            format!("{at}: missing or non-string {}", missing.join(", ")),
        ));
    };
    let namespace = string_at(metadata.and_then(|m| m.get("namespace")))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let mut labels = BTreeMap::new();
    if let Some(Value::Object(map)) = metadata.and_then(|m| m.get("labels")) {
        for (k, v) in map {
            if let Some(s) = scalar_to_string(v) {
                labels.insert(k.clone(), s);
            }
        }
    }
    Ok(Document {
        file: path.to_path_buf(),
        index,
        api_version,
        kind,
        name,
        namespace,
        labels,
        body,
    })
}

/// Label values are strings in Kubernetes; numbers and booleans written unquoted
/// (`version: 2`) are kept as their text rather than dropped.
pub(crate) fn scalar_to_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn file_error(path: &Path, message: String) -> Finding {
    Finding {
        severity: Severity::Error,
        file: path.to_path_buf(),
        resource: String::new(),
        field: String::new(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Document>, Findings> {
        parse_str(Path::new("test.yaml"), text)
    }

    #[test]
    fn multi_document_with_empty_and_null_documents() {
        let docs = parse(
            "---\n---\napiVersion: v1\nkind: A\nmetadata:\n  name: a\n  labels:\n    version: 2\n    off: no\n---\n~\n---\napiVersion: v1\nkind: B\nmetadata: {name: b, namespace: prod}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].namespace, "default");
        assert_eq!(docs[0].labels["version"], "2");
        // YAML 1.1 booleans stay strings.
        assert_eq!(docs[0].labels["off"], "no");
        assert_eq!(docs[1].namespace, "prod");
        assert_eq!(docs[1].kind, "B");
    }

    #[test]
    fn yaml_mapping_keys_become_json_strings() {
        let docs = parse("apiVersion: v1\nkind: A\nmetadata: {name: a}\nspec:\n  80: x\n  true: y\n  on: z\n").unwrap();
        let spec = &docs[0].body["spec"];
        assert_eq!(spec["80"], "x");
        assert_eq!(spec["true"], "y");
        assert_eq!(spec["on"], "z");
    }

    #[test]
    fn list_items_are_flattened() {
        let docs = parse(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: A\n  metadata: {name: a}\n- apiVersion: v1\n  kind: B\n  metadata: {name: b}\n",
        )
        .unwrap();
        assert_eq!(docs.iter().map(|d| d.kind.as_str()).collect::<Vec<_>>(), ["A", "B"]);
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let err = parse("apiVersion: v1\nkind: [unclosed\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].file, Path::new("test.yaml"));
        assert!(err.0[0].message.contains("malformed YAML"), "{}", err.0[0].message);
        assert!(err.0[0].message.contains("line"), "{}", err.0[0].message);
    }

    #[test]
    fn missing_identity_fields_are_all_reported() {
        let err = parse("kind: A\n---\napiVersion: v1\nkind: B\nmetadata: {}\n---\n- 1\n").unwrap_err();
        assert_eq!(err.0.len(), 3);
        assert!(err.0[0].message.contains("document 0") && err.0[0].message.contains("apiVersion"));
        assert!(err.0[1].message.contains("document 1") && err.0[1].message.contains("metadata.name"));
        assert!(err.0[2].message.contains("mapping"));
    }

    #[test]
    fn folders_are_read_recursively_in_order_and_missing_files_reported() {
        let dir = std::env::temp_dir().join(format!("meshgate-source-{}", fastrand::u64(..)));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b.yaml"), "apiVersion: v1\nkind: B\nmetadata: {name: b}\n").unwrap();
        std::fs::write(dir.join("sub/a.yml"), "apiVersion: v1\nkind: C\nmetadata: {name: c}\n").unwrap();
        std::fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: A\nmetadata: {name: a}\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
        let docs = read_paths(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(
            docs.iter().map(|d| d.kind.as_str()).collect::<Vec<_>>(),
            ["A", "B", "C"]
        );

        let missing = dir.join("missing.yaml");
        let err = read_paths(&[missing.clone(), dir.clone()]).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].file, missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
