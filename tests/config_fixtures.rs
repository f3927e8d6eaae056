//! Every shipped example config parses; every invalid fixture fails with
//! exactly the errors its `.expect` file lists (`key line`, one per error).
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The `*.toml` files in a directory of the crate, sorted.
fn tomls(dir: &str) -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    Ok(files)
}

#[test]
fn example_configs_parse() -> Result<()> {
    let files = tomls("config")?;
    assert!(files.len() >= 5, "found only {files:?}");
    for path in &files {
        let config = holdfast::config::load(path)
            .map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
        assert!(!config.listeners.is_empty());
    }
    Ok(())
}

#[test]
fn invalid_fixtures_fail_with_exactly_the_expected_errors() -> Result<()> {
    let files = tomls("tests/fixtures/invalid")?;
    assert!(files.len() >= 9, "found only {files:?}");
    let mut failures = Vec::new();
    for path in &files {
        let expect_path = path.with_extension("expect");
        let expect = fs::read_to_string(&expect_path)
            .with_context(|| format!("reading {}", expect_path.display()))?;
        let mut want = Vec::new();
        for line in expect.lines().filter(|l| !l.trim().is_empty()) {
            let Some((key, n)) = line.trim().rsplit_once(' ') else {
                bail!("{}: {line:?} is not `key line`", expect_path.display());
            };
            want.push((key.to_owned(), n.parse::<usize>()?));
        }
        assert!(
            !want.is_empty(),
            "{} lists no errors",
            expect_path.display()
        );
        let src = fs::read_to_string(path)?;
        let errors = match holdfast::config::parse(&src) {
            Ok(_) => {
                failures.push(format!("{}: parsed without errors", path.display()));
                continue;
            }
            Err(e) => e,
        };
        let got: Vec<(String, usize)> = errors.0.iter().map(|e| (e.key.clone(), e.line)).collect();
        let missing: Vec<_> = want.iter().filter(|w| !got.contains(w)).collect();
        if !missing.is_empty() || got.len() != want.len() {
            failures.push(format!(
                "{}: expected {want:?}\nmissing {missing:?}\ngot:\n{errors}",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}
