//! Every YAML under `deploy/` parses, and the ports, probe service names,
//! config keys and names agree with each other and with the code's defaults;
//! and the hardening the shipped files promise (SPEC §10) is there: paths
//! normalized at the edge, client `x-tollgate-*` headers stripped first, no
//! usable placeholder secret, network policies, Redis behind a password, TLS
//! options that build and validate.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;
use tollgate::config::{Backend, Config};
use tollgate_testkit::process::{KillOnDrop, becomes_ready, free_addr, free_port};

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

fn deploy_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn parse_all(text: &str, what: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every document of every YAML file under deploy/, with its file name.
fn documents() -> Vec<(String, Value)> {
    let root = deploy_root();
    let mut files = Vec::new();
    deploy_files(&root, &mut files);
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for v in parse_all(&text, &f.display().to_string()) {
            docs.push((f.strip_prefix(&root).unwrap().display().to_string(), v));
        }
    }
    docs
}

/// What `kubectl apply -k deploy/k8s` applies (the kustomization's
/// resources), plus the Istio and Envoy files: no component patches.
fn shipped() -> Vec<(String, Value)> {
    let k = kustomization();
    let resources: Vec<String> =
        k["resources"].as_sequence().unwrap().iter().map(|r| format!("k8s/{}", r.as_str().unwrap())).collect();
    documents()
        .into_iter()
        .filter(|(f, _)| resources.contains(f) || f.starts_with("istio/") || f.starts_with("envoy/"))
        .collect()
}

fn kustomization() -> Value {
    let text = std::fs::read_to_string(deploy_root().join("k8s/kustomization.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind}/{name} under deploy/"))
}

fn file<'a>(docs: &'a [(String, Value)], name: &str) -> &'a Value {
    docs.iter().find(|(f, _)| f == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no {name}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn strs(v: &Value) -> Vec<&str> {
    seq(v).iter().filter_map(Value::as_str).collect()
}

/// The env entry `name` of a container, with its position.
fn env<'a>(container: &'a Value, name: &str) -> (usize, &'a Value) {
    seq(&container["env"])
        .iter()
        .enumerate()
        .find(|(_, e)| e["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no env {name}"))
}

fn defaults() -> Config {
    Config::parse("plans: { free: {} }", "defaults").unwrap()
}

#[test]
fn every_deploy_yaml_parses() {
    let docs = documents();
    assert!(docs.len() >= 12, "{} documents", docs.len());
    let files: Vec<&str> = docs.iter().map(|(f, _)| f.as_str()).collect();
    for want in [
        "envoy/envoy.yaml",
        "envoy/envoy-mtls.yaml",
        "k8s/deployment.yaml",
        "k8s/hpa.yaml",
        "k8s/pdb.yaml",
        "k8s/network-policy.yaml",
        "k8s/components/mtls/kustomization.yaml",
        "k8s/components/redis-tls/kustomization.yaml",
        "istio/authorization-policy.yaml",
        "istio/envoy-filter.yaml",
        "istio/telemetry.yaml",
        "istio/route-by-plan.yaml",
    ] {
        assert!(files.contains(&want), "missing {want}");
    }
    // Every file the kustomization names exists and parses.
    let shipped: Vec<String> = shipped().into_iter().map(|(f, _)| f).collect();
    for r in strs(&kustomization()["resources"]) {
        assert!(shipped.contains(&format!("k8s/{r}")), "kustomization resource {r} missing");
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_code() {
    let docs = shipped();
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

    // The admin token: a Secret the operator creates → env var → the config's admin_tokens_env.
    let (_, admin) = env(c, &config.server.admin_tokens_env);
    let secret_ref = &admin["valueFrom"]["secretKeyRef"];
    assert_eq!(secret_ref["name"].as_str(), Some("tollgate-admin"));
    assert_eq!(secret_ref["key"].as_str(), Some("tokens"));
    assert_eq!(secret_ref["optional"].as_bool(), Some(false), "no pod starts without the admin Secret");

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
    let docs = shipped();
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
    // The access-log provider streams to the same Service and port, and the
    // Telemetry resource switches it on for the workload the policy covers.
    let providers = mesh["spec"]["meshConfig"]["extensionProviders"].as_sequence().unwrap();
    let als = providers.iter().find(|p| p["envoyHttpAls"].is_mapping()).expect("an envoyHttpAls provider");
    assert_eq!(als["envoyHttpAls"]["port"].as_u64(), Some(grpc));
    assert_eq!(als["envoyHttpAls"]["service"], ext["service"]);
    let telemetry = kind(&docs, "Telemetry", "tollgate-settlement");
    assert_eq!(telemetry["spec"]["accessLogging"][0]["providers"][0]["name"], als["name"]);
    assert_eq!(telemetry["spec"]["selector"], policy["spec"]["selector"]);
    // Route by plan at the gateway: the ext_authz filter chooses the route
    // again after the Check, and the premium route matches the plan tollgate sets.
    let gateway = kind(&docs, "AuthorizationPolicy", "tollgate-gateway");
    assert_eq!(gateway["spec"]["action"].as_str(), Some("CUSTOM"));
    assert_eq!(gateway["spec"]["provider"]["name"], provider["name"]);
    let after = kind(&docs, "EnvoyFilter", "tollgate-route-after-check");
    let patch = &after["spec"]["configPatches"][0];
    assert_eq!(patch["patch"]["value"]["typed_config"]["clear_route_cache"].as_bool(), Some(true));
    assert_eq!(after["spec"]["workloadSelector"]["labels"], gateway["spec"]["selector"]["matchLabels"]);
    let vs = kind(&docs, "VirtualService", "api-by-plan");
    assert!(vs["spec"]["http"][0]["match"][0]["headers"]["x-tollgate-plan"]["exact"].is_string());
}

#[test]
fn envoy_config_points_at_tollgate_defaults() {
    let docs = shipped();
    let grpc = defaults().server.grpc_listen.port() as u64;
    for name in ENVOY_FILES {
        envoy_points_at_tollgate(file(&docs, name), grpc);
    }
}

fn envoy_points_at_tollgate(envoy: &Value, grpc: u64) {
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
            assert!(allowed.contains(&&*header), "{header} not in allowed_headers");
        }
    }
}

/// The Envoy configs the project ships, relative to deploy/.
const ENVOY_FILES: [&str; 2] = ["envoy/envoy.yaml", "envoy/envoy-mtls.yaml"];

/// The listener's HTTP connection manager config.
fn hcm(envoy: &Value) -> &Value {
    &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
}

fn ext_authz_disabled(route: &Value) -> bool {
    route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"].as_bool() == Some(true)
}

#[test]
fn shipped_envoy_configs_normalize_paths_before_routing() {
    let docs = shipped();
    for name in ENVOY_FILES {
        let h = hcm(file(&docs, name));
        assert_eq!(h["normalize_path"].as_bool(), Some(true), "{name}");
        assert_eq!(h["merge_slashes"].as_bool(), Some(true), "{name}");
        assert_eq!(h["path_with_escaped_slashes_action"].as_str(), Some("REJECT_REQUEST"), "{name}");
        assert_eq!(
            h["common_http_protocol_options"]["headers_with_underscores_action"].as_str(),
            Some("DROP_HEADER"),
            "{name}: x_tollgate_account must not reach CGI-style upstreams"
        );
    }
}

#[test]
fn routes_without_ext_authz_are_exact_and_forward_no_credentials() {
    let docs = shipped();
    for name in ENVOY_FILES {
        let routes = seq(&hcm(file(&docs, name))["route_config"]["virtual_hosts"][0]["routes"]);
        let health = routes.iter().find(|r| ext_authz_disabled(r)).unwrap_or_else(|| panic!("{name}: no health route"));
        assert_eq!(health["match"]["path"].as_str(), Some("/healthz"), "{name}: matched exactly");
        for r in routes.iter().filter(|r| ext_authz_disabled(r)) {
            let m = r["match"].as_mapping().unwrap();
            assert!(m.len() == 1 && r["match"]["path"].is_string(), "{name}: ext_authz off only on exact paths: {m:?}");
            let removed = strs(&r["request_headers_to_remove"]);
            for credential in ["x-api-key", "authorization", "payment-signature", "x-payment"] {
                assert!(removed.contains(&credential), "{name}: {credential} reaches the upstream on {m:?}");
            }
        }
        // The catch-all runs ext_authz.
        let last = routes.last().unwrap();
        assert_eq!(last["match"]["prefix"].as_str(), Some("/"));
        assert!(!ext_authz_disabled(last));
    }
}

/// The header filter every shipped proxy config puts first.
fn header_filter(docs: &[(String, Value)]) -> Value {
    seq(&hcm(file(docs, "envoy/envoy.yaml"))["http_filters"])[0].clone()
}

#[test]
fn the_first_filter_strips_every_client_tollgate_header() {
    let docs = shipped();
    for name in ENVOY_FILES {
        let filters = seq(&hcm(file(&docs, name))["http_filters"]);
        let names: Vec<&str> = filters.iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(names[0], "envoy.filters.http.header_mutation", "{name}: {names:?}");
        let first = &filters[0];
        let mutations = seq(&first["typed_config"]["mutations"]["request_mutations"]);
        for prefix in ["x-tollgate-", "x_tollgate_", "x-tollgate_", "x_tollgate-"] {
            assert!(
                mutations.iter().any(|m| m["remove_on_match"]["key_matcher"]["prefix"].as_str() == Some(prefix)),
                "{name}: {prefix} in {mutations:?}"
            );
        }
        assert_eq!(hcm(file(&docs, name))["strip_trailing_host_dot"].as_bool(), Some(true), "{name}");
        // And before any route is chosen (the first filter runs after Envoy picked one).
        let early = seq(&hcm(file(&docs, name))["early_header_mutation_extensions"]);
        assert_eq!(early.len(), 1, "{name}: {early:?}");
        let early_mutations = seq(&early[0]["typed_config"]["mutations"]);
        for prefix in ["x-tollgate-", "x_tollgate_", "x-tollgate_", "x_tollgate-"] {
            assert!(
                early_mutations.iter().any(|m| m["remove_on_match"]["key_matcher"]["prefix"].as_str() == Some(prefix)),
                "{name}: {prefix} removed before routing: {early_mutations:?}"
            );
        }
        assert!(first["typed_config"]["mutations"]["response_mutations"].is_null(), "{name}: request side only");
        assert_eq!(first, &header_filter(&docs), "{name}: the same filter as envoy.yaml");
        // tollgate sees whatever x-tollgate-* might get past it, as a second layer.
        let authz = filters.iter().find(|f| f["name"].as_str() == Some("envoy.filters.http.ext_authz")).unwrap();
        let prefixes: Vec<&str> = seq(&authz["typed_config"]["allowed_headers"]["patterns"])
            .iter()
            .filter_map(|p| p["prefix"].as_str())
            .collect();
        assert_eq!(prefixes, ["x-tollgate-", "x_tollgate_", "x-tollgate_", "x_tollgate-"], "{name}");
    }
}

#[test]
fn the_mtls_envoy_config_is_envoy_yaml_plus_a_client_certificate_to_tollgate() {
    let docs = shipped();
    let plain = file(&docs, "envoy/envoy.yaml");
    let mut mtls = file(&docs, "envoy/envoy-mtls.yaml").clone();
    let clusters = mtls["static_resources"]["clusters"].as_sequence_mut().unwrap();
    let tollgate = clusters.iter_mut().find(|c| c["name"].as_str() == Some("tollgate")).unwrap();
    let socket = tollgate.as_mapping_mut().unwrap().remove("transport_socket").expect("a transport socket");
    let tls = &socket["typed_config"];
    assert_eq!(
        tls["@type"].as_str(),
        Some("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
    );
    let ctx = &tls["common_tls_context"];
    assert!(ctx["tls_certificates"][0]["certificate_chain"]["filename"].is_string(), "a client certificate");
    assert!(ctx["tls_certificates"][0]["private_key"]["filename"].is_string());
    assert!(ctx["validation_context"]["trusted_ca"]["filename"].is_string(), "tollgate's certificate is verified");
    let san = &ctx["validation_context"]["match_typed_subject_alt_names"][0];
    assert_eq!(san["matcher"]["exact"].as_str(), Some(tollgate_testkit::envoy::TOLLGATE_SAN));
    assert_eq!(tls["sni"].as_str(), Some(tollgate_testkit::envoy::TOLLGATE_SAN));
    // Everything else is the plaintext config (YAML comments do not parse).
    assert_eq!(&mtls, plain, "keep envoy-mtls.yaml in step with envoy.yaml");
}

#[test]
fn every_shipped_envoy_config_passes_envoy_validate() {
    let pki = tollgate_testkit::envoy::Pki::new("validate");
    for name in ENVOY_FILES {
        let text = std::fs::read_to_string(deploy_root().join(name)).unwrap();
        // The mTLS file's certificates, made for the test where it expects them.
        let text = pki.envoy_config(&text);
        if let Err(out) = tollgate_testkit::envoy::validate(&text) {
            panic!("{name} does not validate:\n{out}");
        }
    }
}

#[test]
fn no_secret_with_a_value_is_shipped() {
    // `kubectl apply -k` creates no Secret: the operator does, with real values.
    for (f, v) in shipped() {
        assert_ne!(v["kind"].as_str(), Some("Secret"), "{f} ships a Secret");
    }
    let k = kustomization();
    assert!(k["secretGenerator"].is_null(), "no generated Secret: {:?}", k["secretGenerator"]);
    // The old placeholder appears only in comments, anywhere under deploy/.
    let mut files = Vec::new();
    deploy_files(&deploy_root(), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines().filter(|l| l.contains("change-me-to-a-long-random-token")) {
            let before = &line[..line.find("change-me").unwrap()];
            assert!(before.contains('#'), "{}: placeholder outside a comment: {line}", f.display());
        }
    }
}

/// Every Secret a workload reads, as (workload, secret name, optional flag).
fn secret_refs(docs: &[(String, Value)]) -> Vec<(String, String, Option<bool>)> {
    let mut out = Vec::new();
    for (_, v) in docs {
        let pod = &v["spec"]["template"]["spec"];
        let workload = format!("{}/{}", v["kind"].as_str().unwrap_or(""), v["metadata"]["name"].as_str().unwrap_or(""));
        for c in seq(&pod["containers"]) {
            for e in seq(&c["env"]) {
                let r = &e["valueFrom"]["secretKeyRef"];
                if let Some(name) = r["name"].as_str() {
                    out.push((workload.clone(), name.to_owned(), r["optional"].as_bool()));
                }
            }
        }
        for vol in seq(&pod["volumes"]) {
            if let Some(name) = vol["secret"]["secretName"].as_str() {
                out.push((workload.clone(), name.to_owned(), vol["secret"]["optional"].as_bool()));
            }
        }
    }
    out
}

#[test]
fn pods_do_not_start_without_the_secrets_the_operator_creates() {
    let refs = secret_refs(&documents());
    let names: Vec<&str> = refs.iter().map(|(_, n, _)| n.as_str()).collect();
    for want in ["tollgate-admin", "redis-auth", "tollgate-tls", "redis-tls"] {
        assert!(names.contains(&want), "{want} not referenced: {refs:?}");
    }
    for (workload, name, optional) in &refs {
        assert_eq!(*optional, Some(false), "{workload} reads {name}: say optional: false");
    }
}

/// The pod template labels of a workload.
fn pod_labels(v: &Value) -> &Value {
    &v["spec"]["template"]["metadata"]["labels"]
}

/// Each peer of a rule as (namespace labels, pod labels).
fn peers(rule: &Value) -> Vec<(&Value, &Value)> {
    seq(&rule["from"])
        .iter()
        .map(|p| (&p["namespaceSelector"]["matchLabels"], &p["podSelector"]["matchLabels"]))
        .collect()
}

fn ports(rule: &Value) -> Vec<u64> {
    seq(&rule["ports"]).iter().map(|p| p["port"].as_u64().expect("numeric port")).collect()
}

#[test]
fn network_policies_admit_only_the_gateway_to_grpc_and_only_tollgate_to_redis() {
    let docs = shipped();
    let d = defaults();
    let (grpc, http) = (d.server.grpc_listen.port() as u64, d.server.http_listen.port() as u64);

    let deny = kind(&docs, "NetworkPolicy", "default-deny-ingress");
    assert_eq!(deny["metadata"]["namespace"].as_str(), Some("tollgate"));
    assert_eq!(deny["spec"]["podSelector"].as_mapping().map(|m| m.len()), Some(0), "selects every pod");
    assert_eq!(strs(&deny["spec"]["policyTypes"]), ["Ingress"]);
    assert!(deny["spec"]["ingress"].is_null(), "admits nothing");

    let tollgate = kind(&docs, "NetworkPolicy", "tollgate");
    assert_eq!(&tollgate["spec"]["podSelector"]["matchLabels"], pod_labels(kind(&docs, "Deployment", "tollgate")));
    let rules = seq(&tollgate["spec"]["ingress"]);
    let rule_for = |port: u64| {
        let matching: Vec<&Value> = rules.iter().filter(|r| ports(r).contains(&port)).collect();
        assert_eq!(matching.len(), 1, "one rule for port {port}");
        assert_eq!(ports(matching[0]), [port], "a rule names exactly its port");
        matching[0]
    };
    let mut all_ports: Vec<u64> = rules.iter().flat_map(ports).collect();
    all_ports.sort();
    assert_eq!(all_ports, [http, grpc]);
    // gRPC: the labelled proxies and the Istio ingress gateway, each a pod
    // selector inside a namespace selector (never "any pod" or "any namespace").
    let grpc_peers = peers(rule_for(grpc));
    assert!(!grpc_peers.is_empty());
    for (ns, pod) in &grpc_peers {
        assert!(ns.as_mapping().is_some_and(|m| !m.is_empty()), "grpc peer without a namespace selector");
        assert!(pod.as_mapping().is_some_and(|m| !m.is_empty()), "grpc peer without a pod selector");
    }
    assert!(grpc_peers.iter().any(|(_, pod)| pod["tollgate.io/ext-authz-client"].as_str() == Some("true")));
    assert!(grpc_peers.iter().any(|(ns, pod)| {
        ns["kubernetes.io/metadata.name"].as_str() == Some("istio-system")
            && pod["istio"].as_str() == Some("ingressgateway")
    }));
    // HTTP: Prometheus and the same gateways (Stripe webhooks come through them).
    let http_peers = peers(rule_for(http));
    assert!(http_peers.iter().any(|(_, pod)| pod["app.kubernetes.io/name"].as_str() == Some("prometheus")));
    for peer in &grpc_peers {
        assert!(http_peers.contains(peer), "{peer:?} cannot deliver webhooks");
    }

    let redis = kind(&docs, "NetworkPolicy", "redis");
    assert_eq!(&redis["spec"]["podSelector"]["matchLabels"], pod_labels(kind(&docs, "StatefulSet", "redis")));
    let redis_port = kind(&docs, "Service", "redis")["spec"]["ports"][0]["port"].as_u64().unwrap();
    let rules = seq(&redis["spec"]["ingress"]);
    assert_eq!(rules.len(), 1);
    assert_eq!(ports(&rules[0]), [redis_port]);
    let redis_peers = seq(&rules[0]["from"]);
    assert_eq!(redis_peers.len(), 1);
    assert!(redis_peers[0]["namespaceSelector"].is_null(), "tollgate's namespace only");
    assert_eq!(&redis_peers[0]["podSelector"]["matchLabels"], pod_labels(kind(&docs, "Deployment", "tollgate")));
}

#[test]
fn redis_requires_the_password_tollgate_sends() {
    let docs = shipped();
    let redis = &kind(&docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0];
    let args = strs(&redis["args"]);
    let at = args.iter().position(|a| *a == "--requirepass").expect("--requirepass");
    assert_eq!(args[at + 1], "$(REDIS_PASSWORD)");
    let secret = |c: &Value, var: &str| env(c, var).1["valueFrom"]["secretKeyRef"].clone();
    let auth = secret(redis, "REDIS_PASSWORD");
    assert_eq!((auth["name"].as_str(), auth["key"].as_str()), (Some("redis-auth"), Some("password")));
    assert_eq!(secret(redis, "REDISCLI_AUTH"), auth, "the readiness probe authenticates");
    let probe = strs(&redis["readinessProbe"]["exec"]["command"]).join(" ");
    assert!(probe.contains("PONG"), "redis-cli exits 0 on NOAUTH: the probe must look for PONG: {probe}");

    let tollgate = &kind(&docs, "Deployment", "tollgate")["spec"]["template"]["spec"]["containers"][0];
    let (password_at, _) = env(tollgate, "REDIS_PASSWORD");
    assert_eq!(secret(tollgate, "REDIS_PASSWORD"), auth);
    let (url_at, url) = env(tollgate, "TOLLGATE_REDIS_URL");
    assert!(password_at < url_at, "Kubernetes expands $(REDIS_PASSWORD) only from earlier variables");
    let url = url["value"].as_str().unwrap();
    let cm = kind(&docs, "ConfigMap", "tollgate-config");
    let config = Config::parse(cm["data"]["tollgate.yaml"].as_str().unwrap(), "configmap").unwrap();
    let host = config.store.url.0.strip_prefix("redis://").unwrap();
    assert_eq!(url, format!("redis://:$(REDIS_PASSWORD)@{host}"), "the ConfigMap's address, with the password");
}

#[tokio::test]
async fn the_deployment_redis_url_authenticates_to_a_password_protected_redis() {
    let docs = shipped();
    let tollgate = &kind(&docs, "Deployment", "tollgate")["spec"]["template"]["spec"]["containers"][0];
    let template = env(tollgate, "TOLLGATE_REDIS_URL").1["value"].as_str().unwrap().to_owned();
    let redis = tollgate_testkit::redis::RedisServer::start();
    let password = "0123456789abcdef0123456789abcdef"; // hex, as `openssl rand -hex` makes
    assert_eq!(redis.cli(&["CONFIG", "SET", "requirepass", password]).map(|o| o.trim().to_owned()), Some("OK".into()));
    let local = |url: &str| url.replace("redis.tollgate.svc.cluster.local:6379", &format!("127.0.0.1:{}", redis.port));

    // The binary's path: the ConfigMap's file, then TOLLGATE_REDIS_URL (--redis-url) over store.url.
    let cm = kind(&docs, "ConfigMap", "tollgate-config");
    let dir = std::env::temp_dir().join(format!("tollgate-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, cm["data"]["tollgate.yaml"].as_str().unwrap()).unwrap();
    let ping = |url: String| {
        let path = path.clone();
        async move {
            let config = tollgate::reload::load(Some(&path), Some(&url)).unwrap();
            assert_eq!(config.store.url.0, url, "TOLLGATE_REDIS_URL overrides store.url");
            let store = tollgate::store::open(&config.store, &config.cache, std::sync::Arc::new(|_| {})).unwrap();
            let mut last = None;
            for _ in 0..20 {
                match store.ping().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e.to_string()),
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(last.unwrap())
        }
    };
    let with_password = local(&template.replace("$(REDIS_PASSWORD)", password));
    ping(with_password).await.expect("the expanded URL authenticates");
    let without = local(&template.replace(":$(REDIS_PASSWORD)@", ""));
    assert!(ping(without).await.is_err(), "Redis refuses tollgate without the password");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn istio_normalizes_paths_and_strips_client_headers_first() {
    let docs = shipped();
    let mesh = docs.iter().map(|(_, v)| v).find(|v| v["kind"].as_str() == Some("IstioOperator")).unwrap();
    assert_eq!(
        mesh["spec"]["meshConfig"]["pathNormalization"]["normalization"].as_str(),
        Some("DECODE_AND_MERGE_SLASHES")
    );
    let ext = &mesh["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"];
    assert!(strs(&ext["includeRequestHeadersInCheck"]).contains(&"x-tollgate-*"));

    let policy = kind(&docs, "AuthorizationPolicy", "tollgate");
    // The header-stripping filters (route-by-plan.yaml's clear_route_cache patch is checked with the providers).
    let filters: Vec<&Value> = docs
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["kind"].as_str() == Some("EnvoyFilter"))
        .filter(|v| v["metadata"]["name"].as_str() != Some("tollgate-route-after-check"))
        .filter(|v| v["metadata"]["name"].as_str() != Some("tollgate-strip-client-headers-before-routing"))
        .collect();
    assert!(!filters.is_empty());
    for f in &filters {
        for patch in seq(&f["spec"]["configPatches"]) {
            assert_eq!(patch["applyTo"].as_str(), Some("HTTP_FILTER"));
            assert_eq!(
                patch["match"]["listener"]["filterChain"]["filter"]["name"].as_str(),
                Some("envoy.filters.network.http_connection_manager")
            );
            assert_eq!(patch["patch"]["operation"].as_str(), Some("INSERT_FIRST"));
            assert_eq!(patch["patch"]["value"], header_filter(&docs), "the validated filter from envoy.yaml");
        }
    }
    // Before routing at the gateway: envoy.yaml's early header mutation, merged into its connection manager.
    let early = kind(&docs, "EnvoyFilter", "tollgate-strip-client-headers-before-routing");
    assert_eq!(early["spec"]["workloadSelector"]["labels"]["istio"].as_str(), Some("ingressgateway"));
    let patch = &seq(&early["spec"]["configPatches"])[0];
    assert_eq!(
        (patch["applyTo"].as_str(), patch["match"]["context"].as_str(), patch["patch"]["operation"].as_str()),
        (Some("NETWORK_FILTER"), Some("GATEWAY"), Some("MERGE"))
    );
    assert_eq!(
        patch["patch"]["value"]["typed_config"]["early_header_mutation_extensions"],
        hcm(file(&docs, "envoy/envoy.yaml"))["early_header_mutation_extensions"],
        "the validated early mutation from envoy.yaml"
    );
    // One runs where the CUSTOM policy runs ext_authz: the protected workload's inbound sidecar.
    assert!(filters.iter().any(|f| {
        f["metadata"]["namespace"] == policy["metadata"]["namespace"]
            && f["spec"]["workloadSelector"]["labels"] == policy["spec"]["selector"]["matchLabels"]
            && seq(&f["spec"]["configPatches"])
                .iter()
                .all(|p| p["match"]["context"].as_str() == Some("SIDECAR_INBOUND"))
    }));
}

#[test]
fn the_mtls_component_is_the_configmap_plus_server_tls() {
    let root = deploy_root().join("k8s");
    let base = kind(&shipped(), "ConfigMap", "tollgate-config")["data"]["tollgate.yaml"].as_str().unwrap().to_owned();
    let text = std::fs::read_to_string(root.join("components/mtls/configmap.yaml")).unwrap();
    let patch: Value = serde_yaml_ng::from_str(&text).unwrap();
    let with_tls = patch["data"]["tollgate.yaml"].as_str().unwrap();
    // Differs from the base only by the tls block.
    let without_tls: Vec<&str> = with_tls
        .lines()
        .scan(false, |in_tls, l| {
            if l == "  tls:" {
                *in_tls = true;
            } else if *in_tls && !l.starts_with("    ") {
                *in_tls = false;
            }
            Some((!*in_tls).then_some(l))
        })
        .flatten()
        .collect();
    assert_eq!(without_tls.join("\n"), base.trim_end(), "keep components/mtls/configmap.yaml in step");
    // Valid for the code, with mTLS on, once the Secret's files exist.
    let pki = tollgate_testkit::envoy::Pki::new("component");
    let yaml = with_tls
        .replace("/etc/tollgate-tls/tls.crt", &pki.path("server.crt"))
        .replace("/etc/tollgate-tls/tls.key", &pki.path("server.key"))
        .replace("/etc/tollgate-tls/ca.crt", &pki.path("ca.crt"));
    let config = Config::parse(&yaml, "components/mtls tollgate.yaml").unwrap();
    assert!(config.server.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), "mutual TLS");

    // The Deployment patch mounts the Secret where the config reads it, and
    // probes over HTTP (the kubelet's gRPC probe cannot speak TLS).
    let text = std::fs::read_to_string(root.join("components/mtls/deployment.yaml")).unwrap();
    let patch: Value = serde_yaml_ng::from_str(&text).unwrap();
    let c = &patch["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["volumeMounts"][0]["mountPath"].as_str(), Some("/etc/tollgate-tls"));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert!(c[probe].as_mapping().unwrap().contains_key("grpc") && c[probe]["grpc"].is_null(), "{probe}");
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path));
    }
}

/// `kubectl kustomize` on the base and on an overlay with every component,
/// when kubectl is installed (it is not part of scripts/test.sh's tools).
#[test]
fn kustomize_builds_the_base_and_every_component() {
    let Ok(version) = std::process::Command::new("kubectl").args(["version", "--client"]).output() else {
        eprintln!("kubectl not installed: kustomize builds not checked");
        return;
    };
    assert!(version.status.success());
    let build = |dir: &Path| -> Vec<Value> {
        let out = std::process::Command::new("kubectl").arg("kustomize").arg(dir).output().unwrap();
        assert!(out.status.success(), "{}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
        parse_all(&String::from_utf8_lossy(&out.stdout), "kustomize output")
    };
    let base = build(&deploy_root().join("k8s"));
    // kustomize wants relative paths: the overlay lives inside deploy/'s parent tree.
    let overlay = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("overlay-{}", std::process::id()));
    std::fs::create_dir_all(&overlay).unwrap();
    let rel = relative(&overlay, &deploy_root().join("k8s"));
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!("resources: [{rel}]\ncomponents: [{rel}/components/mtls, {rel}/components/redis-tls]\n"),
    )
    .unwrap();
    let all = build(&overlay);
    let _ = std::fs::remove_dir_all(&overlay);
    for docs in [&base, &all] {
        assert!(!docs.iter().any(|d| d["kind"].as_str() == Some("Secret")), "no Secret is generated");
        let deployment = docs.iter().find(|d| d["kind"].as_str() == Some("Deployment")).unwrap();
        let c = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert!(env(c, "REDIS_PASSWORD").0 < env(c, "TOLLGATE_REDIS_URL").0, "expansion order survives the patches");
        let named: Vec<(String, Value)> = docs.iter().map(|d| (String::new(), d.clone())).collect();
        for (workload, name, optional) in secret_refs(&named) {
            assert_eq!(optional, Some(false), "{workload} reads {name}");
        }
    }
    let c = &all.iter().find(|d| d["kind"].as_str() == Some("Deployment")).unwrap()["spec"]["template"]["spec"]["containers"]
        [0];
    assert!(env(c, "TOLLGATE_REDIS_URL").1["value"].as_str().unwrap().starts_with("rediss://"));
    assert!(c["readinessProbe"]["grpc"].is_null() && c["readinessProbe"]["httpGet"].is_mapping());
    let redis = &all.iter().find(|d| d["kind"].as_str() == Some("StatefulSet")).unwrap()["spec"]["template"]["spec"]["containers"]
        [0];
    let args = strs(&redis["args"]);
    assert!(args.contains(&"--tls-port") && args.contains(&"--requirepass"), "{args:?}");
}

/// `to` relative to `from` (both absolute).
fn relative(from: &Path, to: &Path) -> String {
    let (f, t): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let ups = std::iter::repeat_n("..".to_owned(), f.len() - common);
    let downs = t[common..].iter().map(|c| c.as_os_str().to_string_lossy().into_owned());
    ups.chain(downs).collect::<Vec<_>>().join("/")
}

/// The redis-tls component end to end: redis-server with the component's
/// arguments, and the tollgate binary with the ConfigMap, the component's
/// TOLLGATE_REDIS_URL and SSL_CERT_FILE (certificates made by the test, for
/// `localhost` instead of the Service name).
#[tokio::test]
async fn the_redis_tls_component_connects_tollgate_to_redis_over_tls_with_the_password() {
    let component = deploy_root().join("k8s/components/redis-tls");
    let redis_patch: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(component.join("redis.yaml")).unwrap()).unwrap();
    let tollgate_patch: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(component.join("deployment.yaml")).unwrap()).unwrap();
    let pki = tollgate_testkit::envoy::Pki::new("redis-tls");
    let password = "fedcba9876543210fedcba9876543210";
    let redis_port = free_port();

    let args: Vec<String> = strs(&redis_patch["spec"]["template"]["spec"]["containers"][0]["args"])
        .iter()
        .map(|a| match *a {
            "6379" => redis_port.to_string(),
            "/tls/tls.crt" => pki.path("localhost.crt"),
            "/tls/tls.key" => pki.path("localhost.key"),
            "/tls/ca.crt" => pki.path("ca.crt"),
            "$(REDIS_PASSWORD)" => password.to_owned(),
            other => other.to_owned(),
        })
        .collect();
    assert!(args.contains(&"--tls-port".to_owned()) && args.contains(&"--requirepass".to_owned()));
    let _redis = KillOnDrop(
        std::process::Command::new(tollgate_testkit::redis::server_bin())
            .args(&args)
            .args(["--bind", "127.0.0.1", "--appendonly", "no", "--dir"])
            .arg(&pki.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server"),
    );

    let c = &tollgate_patch["spec"]["template"]["spec"]["containers"][0];
    let url = env(c, "TOLLGATE_REDIS_URL").1["value"].as_str().unwrap();
    assert!(url.starts_with("rediss://"), "{url}");
    let url = url
        .replace("$(REDIS_PASSWORD)", password)
        .replace("redis.tollgate.svc.cluster.local:6379", &format!("localhost:{redis_port}"));
    let ca_file = env(c, "SSL_CERT_FILE").1["value"].as_str().unwrap();
    let mount = seq(&c["volumeMounts"]).iter().find(|m| ca_file.starts_with(m["mountPath"].as_str().unwrap()));
    assert!(mount.is_some(), "SSL_CERT_FILE {ca_file} is in a mounted volume");

    let docs = shipped();
    let (grpc, http) = (free_addr(), free_addr());
    let config = kind(&docs, "ConfigMap", "tollgate-config")["data"]["tollgate.yaml"]
        .as_str()
        .unwrap()
        .replace("0.0.0.0:9191", &grpc.to_string())
        .replace("0.0.0.0:9090", &http.to_string());
    let config_path = pki.dir.join("tollgate.yaml");
    std::fs::write(&config_path, config).unwrap();
    let tollgate = |trust_ca: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("--config")
            .arg(&config_path)
            .env("TOLLGATE_REDIS_URL", &url)
            .env("TOLLGATE_ADMIN_TOKENS", "0123456789abcdef0123456789abcdef0123456789abcdef")
            .env_remove("SSL_CERT_DIR")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if trust_ca {
            cmd.env("SSL_CERT_FILE", pki.path("ca.crt"));
        } else {
            cmd.env("SSL_CERT_FILE", pki.path("tls.crt")); // some other certificate: not the CA
        }
        KillOnDrop(cmd.spawn().expect("tollgate binary"))
    };

    {
        let _t = tollgate(false);
        assert!(
            !becomes_ready(http, std::time::Duration::from_secs(2)).await,
            "ready over TLS without trusting Redis's CA"
        );
    }
    let _t = tollgate(true);
    assert!(
        becomes_ready(http, std::time::Duration::from_secs(15)).await,
        "tollgate never reached Redis over rediss:// with the password"
    );
}

/// `scripts/validate-manifests.py` with the Python packages `scripts/test.sh` installs.
fn validate_manifests(deploy: &Path) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python_path = root.join(".tools/python");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(root.join("scripts/validate-manifests.py")).arg(deploy);
    if python_path.is_dir() {
        cmd.env("PYTHONPATH", &python_path);
    }
    let out = cmd.output().expect("python3 runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Every Kubernetes object (and each component's patches applied to the
/// base) passes the Kubernetes schemas strictly; the Istio and Prometheus
/// Operator resources pass schemas of the fields tollgate uses.
#[test]
fn every_manifest_passes_its_schema() {
    let (ok, out) = validate_manifests(&deploy_root());
    assert!(ok, "{out}");
    for want in [
        "k8s/deployment.yaml: Deployment/tollgate",
        "k8s/network-policy.yaml: NetworkPolicy/tollgate",
        "k8s/components/mtls/deployment.yaml on the base: Deployment/tollgate",
        "k8s/components/redis-tls/redis.yaml on the base: StatefulSet/redis",
        "istio/authorization-policy.yaml: AuthorizationPolicy/tollgate",
        "istio/route-by-plan.yaml: VirtualService/api-by-plan",
        "istio/mesh-config.yaml: IstioOperator",
        "istio/telemetry.yaml: Telemetry/tollgate-settlement",
        "monitoring/prometheus-rule.yaml: PrometheusRule/tollgate",
    ] {
        assert!(out.contains(&format!("ok   {want}")), "{want} not validated:\n{out}");
    }
    // Every YAML resource file under deploy/ was looked at.
    let docs = documents();
    for (file, _) in docs.iter().filter(|(f, _)| f.starts_with("k8s/") || f.starts_with("istio/")) {
        if file.ends_with("kustomization.yaml") {
            continue;
        }
        assert!(out.contains(&format!("ok   {file}")), "{file} not validated:\n{out}");
    }
}

/// The validation fails on what a typo or a wrong value would ship.
#[test]
fn manifest_schemas_catch_misspelt_fields_and_bad_values() {
    let copy = tollgate_testkit::process::temp_dir("deploy-schemas");
    let cp = std::process::Command::new("cp").arg("-r").arg(deploy_root()).arg(&copy).status().unwrap();
    assert!(cp.success());
    let deploy = copy.join("deploy");
    let edit = |file: &str, from: &str, to: &str| {
        let path = deploy.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file}: no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    edit("k8s/deployment.yaml", "  replicas:", "  replica:");
    edit("k8s/components/mtls/deployment.yaml", "readOnly: true", "readonly: true");
    edit("istio/authorization-policy.yaml", "action: CUSTOM", "action: ALLOWED");
    edit("istio/route-by-plan.yaml", "x-tollgate-plan: { exact: pro }", "x-tollgate-plan: { equals: pro }");
    edit(
        "monitoring/prometheus-rule.yaml",
        "    - alert: TollgateStoreUnavailable",
        "    - alerts: TollgateStoreUnavailable",
    );
    let (ok, out) = validate_manifests(&deploy);
    let _ = std::fs::remove_dir_all(&copy);
    assert!(!ok, "{out}");
    for want in [
        "FAIL k8s/deployment.yaml: Deployment/tollgate",
        "FAIL k8s/components/mtls/deployment.yaml on the base: Deployment/tollgate",
        "FAIL istio/authorization-policy.yaml: AuthorizationPolicy",
        "FAIL istio/route-by-plan.yaml: VirtualService",
        "FAIL monitoring/prometheus-rule.yaml: PrometheusRule",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
}
