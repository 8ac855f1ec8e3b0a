//! What `deploy/monitoring/` ships: the alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`: the 402 spike and the
//! store outage fire, a steady baseline stays quiet), the PrometheusRule
//! carries the same groups, the Grafana dashboard is valid JSON, and every
//! metric the rules and the dashboard name is one a running tollgate exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;
use tollgate_testkit::process::tool;
use tollgate_testkit::{TestServer, http_check, http_get, rollout_config};

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new(tool("PROMTOOL", "promtool")).args(args).current_dir(monitoring()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

fn yaml(name: &str) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(monitoring().join(name)).unwrap()).unwrap()
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The unit tests cover the alerts the issue names, firing and quiet.
    let tests = std::fs::read_to_string(monitoring().join("alerts.test.yaml")).unwrap();
    for alert in ["TollgatePaymentRequiredSpike", "TollgateStoreUnavailable", "TollgateNotReady"] {
        assert!(tests.contains(&format!("alertname: {alert}\n        exp_alerts: []")), "{alert}: no quiet case");
        assert!(tests.contains(&format!("alertname: {alert}\n        exp_alerts:\n")), "{alert}: no firing case");
    }
}

#[test]
fn the_prometheus_rule_carries_the_rules_file_s_groups() {
    let rule = yaml("prometheus-rule.yaml");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"],
        yaml("alerts.yaml")["groups"],
        "regenerate prometheus-rule.yaml from alerts.yaml"
    );
}

/// Every `tollgate_*` name in `text`.
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    let mut rest = text;
    while let Some(i) = rest.find("tollgate_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        into.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
}

/// The family a sample name belongs to (`tollgate_decisions_total` → `tollgate_decisions`).
fn family(name: &str) -> &str {
    ["_total", "_bucket", "_count", "_sum", "_created"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name)
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_name_is_exported() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap())
            .expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut named = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        for t in targets {
            metric_names(t["expr"].as_str().expect("an expression"), &mut named);
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in ["Decisions by status and code", "402 share by plan", "Check latency", "Cache hit ratio"] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
    for rule in yaml("alerts.yaml")["groups"][0]["rules"].as_sequence().unwrap() {
        metric_names(rule["expr"].as_str().unwrap(), &mut named);
    }
    assert!(named.len() >= 12, "{named:?}");

    // A live scrape, after Checks that give every labelled family a series
    // (a family without one is not in the scrape): plain, denied, shadowed, overage.
    let s = TestServer::start(&rollout_config()).await;
    for key in ["free-key", "pro-key", "canceled-key"] {
        s.check(http_check("GET", "/v1/search", &[("x-api-key", key)])).await;
    }
    s.check(http_check("GET", "/v1/trial-export", &[("x-api-key", "free-key")])).await;
    for _ in 0..11 {
        s.check(http_check("GET", "/v1/search", &[("x-api-key", "soft-key")])).await;
    }
    let (_, _, scrape) = http_get(s.http, "/metrics").await.unwrap();
    s.stop().await;
    let exported: BTreeSet<&str> =
        scrape.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let missing: Vec<&String> = named.iter().filter(|n| !exported.contains(family(n))).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}\nexported: {exported:?}");
    // Samples the 402-by-plan panel and the readiness alert read are there.
    assert!(scrape.contains("tollgate_plan_decisions_total{plan=\"free\",status=\"200\"} 2"), "{scrape}");
    assert!(scrape.contains("tollgate_plan_decisions_total{plan=\"pro\",status=\"402\"} 1"), "{scrape}");
    assert!(scrape.contains("tollgate_ready 1"), "{scrape}");
}
