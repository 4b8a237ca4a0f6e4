//! Reading the project's YAML in tests, with PyYAML from the validator's venv (which
//! scripts/setup.sh makes for kubernetes-validate), so the test build needs no YAML crate.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The venv scripts/setup.sh creates (`VALIDATE_VENV` overrides).
pub fn venv() -> PathBuf {
    PathBuf::from(
        std::env::var("VALIDATE_VENV").unwrap_or_else(|_| "/opt/edge-redirector-dev/venv".into()),
    )
}

/// Every YAML document of `files`, as JSON.
pub fn documents(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let python = venv().join("bin/python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml\nfor f in sys.argv[1:]:\n    for d in yaml.safe_load_all(open(f)):\n        print(json.dumps(d))",
        ])
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", python.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}
