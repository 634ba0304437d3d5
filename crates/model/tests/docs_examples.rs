//! Every ```yaml block in `docs/*.md` is a complete configuration that loads.
//!
//! A block whose first line is `# expect-error: <text>` must instead fail with an error
//! finding containing `<text>`; a block whose first line is `# skip-test` (followed by the
//! reason) is not checked, for examples that need files such as certificates.

use std::path::{Path, PathBuf};

use meshgate_model::{CompileOptions, Findings, Severity, compile, source};

struct Block {
    /// `docs/<file>.md:<line>` of the opening fence.
    origin: String,
    text: String,
}

/// The runtime value first: a test binary reused from a build in another checkout (a shared
/// target folder) would otherwise read that checkout's docs.
fn docs_dir() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.join("../../docs")
}

fn yaml_blocks() -> Vec<Block> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(docs_dir())
        .expect("docs folder")
        .map(|e| e.expect("docs entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    let mut blocks = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable markdown");
        let name = file.file_name().expect("file name").to_string_lossy().into_owned();
        let mut current: Option<Block> = None;
        for (i, line) in text.lines().enumerate() {
            match current.as_mut() {
                None if line.trim_start().starts_with("```yaml") => {
                    assert_eq!(
                        line.trim(),
                        "```yaml",
                        "docs/{name}:{}: indented or annotated yaml fence",
                        i + 1
                    );
                    current = Some(Block {
                        origin: format!("docs/{name}:{}", i + 1),
                        text: String::new(),
                    });
                }
                None => {}
                Some(_) if line.trim() == "```" => blocks.extend(current.take()),
                Some(block) => {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
        }
        assert!(current.is_none(), "docs/{name}: unterminated ```yaml block");
    }
    blocks
}

/// Parses and compiles one block; the error findings on failure.
fn load(block: &Block) -> Result<Vec<String>, Findings> {
    let docs = source::parse_str(Path::new(&block.origin), &block.text)?;
    let compiled = compile(&docs, &CompileOptions::default())?;
    Ok(compiled.warnings.iter().map(ToString::to_string).collect())
}

#[test]
fn every_yaml_example_in_the_docs_loads_or_fails_as_documented() {
    let blocks = yaml_blocks();
    assert!(blocks.len() >= 10, "only {} yaml blocks found in docs/", blocks.len());
    let mut failures = Vec::new();
    for block in &blocks {
        let first = block.text.lines().next().unwrap_or("").trim();
        if first.starts_with("# skip-test") {
            assert!(
                first.len() > "# skip-test".len() + 2,
                "{}: `# skip-test` needs a reason",
                block.origin
            );
            continue;
        }
        match (first.strip_prefix("# expect-error:").map(str::trim), load(block)) {
            // Shown with `--nocapture`, to review what each example warns about.
            (None, Ok(warnings)) => println!("{}: {} warning(s) {warnings:#?}", block.origin, warnings.len()),
            (None, Err(findings)) => failures.push(format!("{}: unexpected errors:\n{findings}", block.origin)),
            (Some(expected), Ok(warnings)) => failures.push(format!(
                "{}: expected an error containing {expected:?}, but it loaded (warnings: {warnings:?})",
                block.origin
            )),
            (Some(expected), Err(findings)) => {
                let found = findings
                    .0
                    .iter()
                    .any(|f| f.severity == Severity::Error && f.to_string().contains(expected));
                if !found {
                    failures.push(format!(
                        "{}: no error contains {expected:?}; findings:\n{findings}",
                        block.origin
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
