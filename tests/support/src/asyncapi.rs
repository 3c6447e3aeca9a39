//! The official AsyncAPI parser (`@asyncapi/parser`, run with node from `tests/asyncapi`) on
//! documents farine generated. `scripts/test` installs it (`npm ci`) when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The directory of the parser's package.
fn package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../asyncapi")
        .canonicalize()
        .expect("tests/asyncapi exists")
}

/// What the parser said of some documents.
#[derive(Debug)]
pub struct Validation {
    /// Every diagnostic: `{"file", "severity" (0 error .. 3 hint), "code", "message", "path"}`.
    pub diagnostics: Vec<Value>,
    /// The parser's exit status was 0: every document parsed, without an error.
    pub passed: bool,
}

impl Validation {
    /// The diagnostics of severity error.
    pub fn errors(&self) -> Vec<&Value> {
        self.of_severity(0)
    }

    /// The diagnostics of severity `severity` (0 error, 1 warning, 2 info, 3 hint).
    pub fn of_severity(&self, severity: u64) -> Vec<&Value> {
        self.diagnostics
            .iter()
            .filter(|d| d["severity"] == severity)
            .collect()
    }

    /// Panics with the diagnostics unless every document parsed with no error and no warning.
    pub fn assert_clean(&self) {
        assert!(
            self.passed && self.errors().is_empty(),
            "errors: {:#?}",
            self.diagnostics
        );
        let warnings = self.of_severity(1);
        assert!(warnings.is_empty(), "no warning either: {warnings:#?}");
    }
}

/// Parses each of `files` with `@asyncapi/parser`. Panics, saying how to install it, when the
/// parser is not installed; panics when node cannot be run.
pub fn validate(files: &[&Path]) -> Validation {
    let package = package();
    assert!(
        package.join("node_modules/@asyncapi/parser").is_dir(),
        "the AsyncAPI parser is not installed in {}: run scripts/test, which installs it, or `npm ci --prefix tests/asyncapi`",
        package.display()
    );
    let output = Command::new("node")
        .arg(package.join("validate.mjs"))
        .args(files)
        .current_dir(&package)
        .output()
        .expect("node runs (the AsyncAPI parser needs node 18 or later)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let diagnostics = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "the validator prints JSON lines ({e}): {line}\n{}",
                    String::from_utf8_lossy(&output.stderr)
                )
            })
        })
        .collect();
    assert!(
        output.status.code().is_some(),
        "the validator ended by a signal: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Validation {
        diagnostics,
        passed: output.status.success(),
    }
}
