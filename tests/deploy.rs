//! Every YAML under `deploy/` parses, and the ports, probe service names,
//! config keys and names agree with each other and with the code's defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;
use tollgate::config::{Backend, Config};

fn deploy_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            deploy_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Every document of every YAML file under deploy/, with its file name.
fn documents() -> Vec<(String, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    deploy_files(&root, &mut files);
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.strip_prefix(&root).unwrap().display().to_string(), v));
            }
        }
    }
    docs
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind}/{name} under deploy/"))
}

fn defaults() -> Config {
    Config::parse("plans: { free: {} }", "defaults").unwrap()
}

#[test]
fn every_deploy_yaml_parses() {
    let docs = documents();
    assert!(docs.len() >= 12, "{} documents", docs.len());
    let files: Vec<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
    for want in
        ["envoy/envoy.yaml", "k8s/deployment.yaml", "k8s/hpa.yaml", "k8s/pdb.yaml", "istio/authorization-policy.yaml"]
    {
        assert!(files.contains(&want), "missing {want}");
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_code() {
    let docs = documents();
    let d = defaults();
    let (grpc, http) = (d.server.grpc_listen.port() as u64, d.server.http_listen.port() as u64);

    let cm = kind(&docs, "ConfigMap", "tollgate-config");
    let config = Config::parse(cm["data"]["tollgate.yaml"].as_str().unwrap(), "configmap tollgate.yaml").unwrap();
    assert_eq!(config.server.grpc_listen.port() as u64, grpc);
    assert_eq!(config.server.http_listen.port() as u64, http);
    assert_eq!(config.store.backend, Backend::Redis);

    let deployment = kind(&docs, "Deployment", "tollgate");
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    let c = &pod["spec"]["containers"][0];
    let port = |name: &str| {
        c["ports"].as_sequence().unwrap().iter().find(|p| p["name"].as_str() == Some(name)).unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((port("grpc"), port("http")), (grpc, http));
    assert_eq!(c["readinessProbe"]["grpc"]["port"].as_u64(), Some(grpc));
    assert_eq!(c["readinessProbe"]["grpc"]["service"].as_str(), Some("envoy.service.auth.v3.Authorization"));
    assert_eq!(c["livenessProbe"]["grpc"]["port"].as_u64(), Some(grpc));
    assert_eq!(c["livenessProbe"]["grpc"]["service"].as_str(), Some(""));
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"].as_str(), Some(http.to_string().as_str()));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string());

    // The admin token: Secret key → env var → the config's admin_tokens_env.
    let env = c["env"].as_sequence().unwrap();
    let admin = env.iter().find(|e| e["name"].as_str() == Some(config.server.admin_tokens_env.as_str())).unwrap();
    let secret_ref = &admin["valueFrom"]["secretKeyRef"];
    let secret = kind(&docs, "Secret", secret_ref["name"].as_str().unwrap());
    assert!(secret["stringData"][secret_ref["key"].as_str().unwrap()].is_string());

    // The config file is mounted where args point.
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(args.contains(&format!("{mount}/tollgate.yaml").as_str()), "{args:?}");

    // The drain fits in the grace period.
    let grace = pod["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!((config.server.drain_delay + config.server.drain_timeout).as_secs() < grace);

    let svc = kind(&docs, "Service", "tollgate");
    assert_eq!(&svc["spec"]["selector"], labels);
    let svc_ports: Vec<u64> =
        svc["spec"]["ports"].as_sequence().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
    assert_eq!(svc_ports, vec![grpc, http]);

    let hpa = kind(&docs, "HorizontalPodAutoscaler", "tollgate");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some("tollgate"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"].as_str(), Some("Deployment"));
    let pdb = kind(&docs, "PodDisruptionBudget", "tollgate");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    // The store URL names the Redis Service.
    let redis = kind(&docs, "Service", "redis");
    let redis_port = redis["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert!(
        config.store.url.0.contains(&format!("redis.tollgate.svc.cluster.local:{redis_port}")),
        "{:?}",
        config.store.url
    );
    kind(&docs, "StatefulSet", "redis");
}

#[test]
fn istio_provider_and_policy_agree_with_the_service() {
    let docs = documents();
    let grpc = defaults().server.grpc_listen.port() as u64;
    let mesh = docs.iter().map(|(_, v)| v).find(|v| v["kind"].as_str() == Some("IstioOperator")).unwrap();
    let provider = &mesh["spec"]["meshConfig"]["extensionProviders"][0];
    let ext = &provider["envoyExtAuthzGrpc"];
    assert_eq!(ext["port"].as_u64(), Some(grpc));
    assert_eq!(
        ext["service"].as_str(),
        Some("tollgate.tollgate.svc.cluster.local"),
        "Service tollgate in namespace tollgate"
    );
    assert_eq!(ext["failOpen"].as_bool(), Some(false));
    let policy = kind(&docs, "AuthorizationPolicy", "tollgate");
    assert_eq!(policy["spec"]["action"].as_str(), Some("CUSTOM"));
    assert_eq!(policy["spec"]["provider"]["name"], provider["name"]);
}

#[test]
fn envoy_config_points_at_tollgate_defaults() {
    let docs = documents();
    let grpc = defaults().server.grpc_listen.port() as u64;
    let envoy = docs.iter().find(|(f, _)| f == "envoy/envoy.yaml").map(|(_, v)| v).unwrap();
    let clusters = envoy["static_resources"]["clusters"].as_sequence().unwrap();
    let tollgate = clusters.iter().find(|c| c["name"].as_str() == Some("tollgate")).unwrap();
    let endpoint =
        &tollgate["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(endpoint["port_value"].as_u64(), Some(grpc));
    assert_eq!(
        tollgate["health_checks"][0]["grpc_health_check"]["service_name"].as_str(),
        Some("envoy.service.auth.v3.Authorization")
    );
    let hcm = &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filters = hcm["http_filters"].as_sequence().unwrap();
    let authz = filters.iter().find(|f| f["name"].as_str() == Some("envoy.filters.http.ext_authz")).unwrap();
    let t = &authz["typed_config"];
    assert_eq!(t["transport_api_version"].as_str(), Some("V3"));
    assert_eq!(t["grpc_service"]["envoy_grpc"]["cluster_name"].as_str(), Some("tollgate"));
    assert!(t.get("with_request_body").is_none(), "bodies stay with the upstream");
    let names: Vec<&str> = filters.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names.last(), Some(&"envoy.filters.http.router"));
    // The headers Envoy sends are the ones the default identity sources read.
    let allowed: Vec<&str> =
        t["allowed_headers"]["patterns"].as_sequence().unwrap().iter().filter_map(|p| p["exact"].as_str()).collect();
    for source in defaults().identity {
        if let tollgate::identity::IdentitySource::ApiKey { header, .. } = source {
            assert!(allowed.contains(&header.as_str()), "{header} not in allowed_headers");
        }
    }
}
