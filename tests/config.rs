//! Config validation: one fixture per error, each checked against its message
//! (the first line of every file in `tests/fixtures/config/` says
//! `# expect: <message>`), and the CLI's exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

use tollgate::config::Config;

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 20, "fixtures went missing");
    files
}

fn expectation(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("# expect: ").unwrap_or_else(|| panic!("{} lacks '# expect: '", path.display())).to_owned()
}

#[test]
fn every_bad_config_fixture_fails_with_its_message() {
    let mut failures = Vec::new();
    for path in fixtures() {
        let want = expectation(&path);
        match Config::load(&path) {
            Ok(_) => failures.push(format!("{}: loaded, expected error {want:?}", path.display())),
            Err(e) => {
                let got = e.to_string();
                if !got.contains(&want) {
                    failures.push(format!("{}:\n  want {want:?}\n  got  {got:?}", path.display()));
                }
                assert!(got.starts_with(&path.display().to_string()), "the message names the file: {got}");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_bundled_demo_and_deploy_configs_are_valid() {
    Config::parse(tollgate::config::DEMO_CONFIG, "demo").unwrap();
}

fn tollgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    c.env_remove("TOLLGATE_CONFIG").env_remove("TOLLGATE_REDIS_URL");
    c
}

#[test]
fn check_config_prints_a_summary_and_exits_zero_when_valid() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.yaml");
    let out = tollgate().arg("check-config").arg(&demo).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("valid"));
    assert!(stdout.contains("plans (3)"), "{stdout}");
    assert!(stdout.contains("free: features [search] quotas [requests-month=1000, requests-1s=10]"), "{stdout}");
    assert!(stdout.contains("accounts: 6"), "{stdout}");
    assert!(!stdout.contains("demo-free-key"), "keys never print");
}

#[test]
fn check_config_exits_64_naming_field_and_reason() {
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/zero_limit.yaml");
    let out = tollgate().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("zero_limit.yaml: plans.free.quotas[0].limit: must be between 1 and 1000000000000000, got 0"),
        "{stderr}"
    );
}

#[test]
fn serving_with_a_bad_config_exits_64_before_binding() {
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/unknown_plan.yaml");
    let out = tollgate().arg("--config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts[0].plan: unknown plan \"gold\""));
    let missing = tollgate().args(["--config", "/nonexistent/tollgate.yaml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/tollgate.yaml: cannot read"));
}
