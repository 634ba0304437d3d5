//! Findings collected during one compilation, shared by every input format.

use crate::finding::{Finding, Severity};
use crate::source::Document;

/// Collected findings for one compilation.
#[derive(Default)]
pub(crate) struct Diag {
    pub(crate) findings: Vec<Finding>,
}

impl Diag {
    pub(crate) fn error(&mut self, doc: &Document, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, doc, field.into(), message.into());
    }

    pub(crate) fn warn(&mut self, doc: &Document, field: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, doc, field.into(), message.into());
    }

    fn push(&mut self, severity: Severity, doc: &Document, field: String, message: String) {
        self.findings.push(Finding {
            severity,
            file: doc.file.clone(),
            resource: resource_name(doc),
            field,
            message,
        });
    }

    /// Reports `doc` as a second definition of the resource `first` already defined.
    pub(crate) fn duplicate(&mut self, doc: &Document, first: &Document) {
        self.error(
            doc,
            "metadata.name",
            format!(
                "duplicate {}: also defined in {} (document {}); this one (document {} of {}) is ignored",
                resource_name(doc),
                first.file.display(),
                first.index,
                doc.index,
                doc.file.display()
            ),
        );
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// `Kind namespace/name`, as findings name resources.
pub(crate) fn resource_name(doc: &Document) -> String {
    format!("{} {}/{}", doc.kind, doc.namespace, doc.name)
}

/// A decoded resource with the document it came from.
pub(crate) struct Res<'a, T> {
    pub doc: &'a Document,
    pub spec: T,
}

/// Joins a field path and a child (`spec.http[0]` + `route` → `spec.http[0].route`).
pub(crate) fn at(base: &str, child: impl std::fmt::Display) -> String {
    format!("{base}.{child}")
}

/// Decodes `value` as `T`, reporting the failing field's path (prefixed with `prefix`, e.g.
/// `spec`) on error.
pub(crate) fn decode_value<T: serde::de::DeserializeOwned>(
    doc: &Document,
    value: &serde_json::Value,
    prefix: &str,
    diag: &mut Diag,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let field = match (path.as_str(), prefix) {
                ("." | "", _) => prefix.to_string(),
                (p, "") => p.to_string(),
                (p, pre) => format!("{pre}.{p}"),
            };
            diag.error(doc, field, e.into_inner().to_string());
            None
        }
    }
}

/// Fields whose value is a map of names to strings (labels, selectors, data): a null value in
/// one is not a field left out but a bad entry, reported as before (dropping it would widen a
/// selector).
const STRING_MAP_FIELDS: &[&str] = &[
    "labels",
    "matchLabels",
    "annotations",
    "selector",
    "sourceLabels",
    "data",
    "stringData",
];

/// `value` with every `field: null` of its objects left out, at any depth. The Kubernetes API
/// server treats a null field as one not given (its default applies), so Kubernetes resources
/// are decoded through this; a list's null items, and null values in the string maps of
/// [`STRING_MAP_FIELDS`], are kept, to be reported.
pub(crate) fn without_null_fields(value: &serde_json::Value) -> std::borrow::Cow<'_, serde_json::Value> {
    fn has_null_field(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::Object(map) => map
                .iter()
                .any(|(k, v)| v.is_null() || (!STRING_MAP_FIELDS.contains(&k.as_str()) && has_null_field(v))),
            serde_json::Value::Array(items) => items.iter().any(has_null_field),
            _ => false,
        }
    }
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.retain(|_, v| !v.is_null());
                for (key, child) in map.iter_mut() {
                    if !STRING_MAP_FIELDS.contains(&key.as_str()) {
                        strip(child);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    if !has_null_field(value) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut owned = value.clone();
    strip(&mut owned);
    std::borrow::Cow::Owned(owned)
}
