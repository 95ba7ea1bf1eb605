//! Finding the cluster's binaries in the cargo target directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The dispatcher binary's name.
pub const DISPATCHER: &str = "sipalias-dispatcher";
/// The processor binary's name.
pub const PROCESSOR: &str = "sipalias-processor";
/// The billing binary's name.
pub const BILLING: &str = "sipalias-billing";

/// Path of a workspace binary built next to this test executable.
///
/// Tests run from `<target>/<profile>/deps/`, so the binaries are two levels up. When that
/// guess fails, `$CARGO_TARGET_DIR/debug/` is tried. The binaries are not built on demand:
/// building inside a test would race other tests for cargo's lock.
pub fn path(name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    let exe = std::env::current_exe().context("locating the test executable")?;
    if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
        candidates.push(profile_dir.join(name));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug").join(name));
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!(
        "binary {name} not found (looked at {candidates:?}); run `cargo build --workspace --bins` \
         before the end-to-end tests"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_error_says_how_to_build() {
        let err = path("sipalias-no-such-binary").expect_err("must be missing");
        assert!(err.to_string().contains("cargo build --workspace --bins"), "{err}");
    }
}
