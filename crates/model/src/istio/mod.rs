//! Istio networking resources (stub: being written)
use crate::{CompileOptions, Compiled, Findings, source::Document};
pub fn compile(_documents: &[Document], _options: &CompileOptions) -> Result<Compiled, Findings> { todo!() }
