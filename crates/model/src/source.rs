//! Reading configuration files: folders, multi-document YAML, resource identity.
//! (stub: being written)
use std::path::{Path, PathBuf};
use crate::finding::Findings;

/// One YAML document: a Kubernetes-style resource and where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    pub file: PathBuf,
    /// 0-based position of the document in its file.
    pub index: usize,
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// `metadata.namespace`, `default` when absent.
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The whole document as parsed.
    pub body: serde_json::Value,
}

pub fn read_paths(_paths: &[PathBuf]) -> Result<Vec<Document>, Findings> { todo!() }
pub fn read_file(_path: &Path) -> Result<Vec<Document>, Findings> { todo!() }
