#!/usr/bin/env python3
"""Validates every manifest under deploy/ against published schemas.

- Kubernetes objects (deploy/k8s, and each component's patches applied to
  the base as kustomize would: strategic merge, lists merged by their
  Kubernetes merge keys, `null` deleting) against the Kubernetes OpenAPI
  schemas bundled in the `kubernetes-validate` package, strictly (an
  unknown field is an error).
- Istio (deploy/istio) and Prometheus Operator (deploy/monitoring) custom
  resources against schemas written here from their API references, for
  the fields tollgate uses: strict at every level we define (a misspelt
  field fails), free-form where the API is (EnvoyFilter patch values,
  which `envoy --mode validate` checks elsewhere).
- kustomize's own files are checked for the keys kustomize reads.

Usage: validate-manifests.py [deploy dir]. Needs `kubernetes_validate` (and
its jsonschema) importable: scripts/tools.sh installs it into
.tools/python. Prints one line per object; exits 1 if any fails.
"""

import copy
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.33.0"

# The Kubernetes merge keys of the lists our patches touch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def merge(base, patch, key=None):
    """A strategic merge patch of `patch` onto `base`, for the shapes used here."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out):
                if isinstance(existing, dict) and existing.get(mk) == item.get(mk):
                    out[i] = merge(existing, item)
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def obj(props, required=()):
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


STR = {"type": "string"}
STRS = {"type": "array", "items": STR}
LABELS = {"type": "object", "additionalProperties": STR}
ANY = {}
METADATA = obj(
    {"name": STR, "namespace": STR, "labels": LABELS, "annotations": LABELS},
    ["name"],
)
SELECTOR = obj({"matchLabels": LABELS})
STRING_MATCH = {
    "type": "object",
    "properties": {"exact": STR, "prefix": STR, "regex": STR},
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
}


def resource(api_version, kind, spec, metadata_required=True):
    return obj(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
        ["apiVersion", "kind", "spec"] + (["metadata"] if metadata_required else []),
    )


# https://istio.io/latest/docs/reference/config/security/authorization-policy/
AUTHORIZATION_POLICY = obj(
    {
        "selector": SELECTOR,
        "action": {"enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
        "provider": obj({"name": STR}, ["name"]),
        "rules": {
            "type": "array",
            "items": obj(
                {
                    "from": {"type": "array", "items": obj({"source": {"type": "object"}})},
                    "to": {
                        "type": "array",
                        "items": obj(
                            {
                                "operation": obj(
                                    {
                                        "hosts": STRS,
                                        "notHosts": STRS,
                                        "ports": STRS,
                                        "notPorts": STRS,
                                        "methods": STRS,
                                        "notMethods": STRS,
                                        "paths": STRS,
                                        "notPaths": STRS,
                                    }
                                )
                            }
                        ),
                    },
                    "when": {"type": "array", "items": obj({"key": STR, "values": STRS, "notValues": STRS}, ["key"])},
                }
            ),
        },
    }
)

# https://istio.io/latest/docs/reference/config/networking/envoy-filter/
ENVOY_FILTER = obj(
    {
        "workloadSelector": obj({"labels": LABELS}),
        "priority": {"type": "integer"},
        "configPatches": {
            "type": "array",
            "minItems": 1,
            "items": obj(
                {
                    "applyTo": {
                        "enum": [
                            "INVALID", "LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER",
                            "ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG",
                            "BOOTSTRAP", "LISTENER_FILTER",
                        ]
                    },
                    "match": obj(
                        {
                            "context": {"enum": ["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"]},
                            "proxy": obj({"proxyVersion": STR, "metadata": LABELS}),
                            "listener": obj(
                                {
                                    "portNumber": {"type": "integer"},
                                    "name": STR,
                                    "filterChain": obj(
                                        {
                                            "name": STR,
                                            "sni": STR,
                                            "transportProtocol": STR,
                                            "applicationProtocols": STR,
                                            "destinationPort": {"type": "integer"},
                                            "filter": obj({"name": STR, "subFilter": obj({"name": STR})}),
                                        }
                                    ),
                                }
                            ),
                        }
                    ),
                    "patch": obj(
                        {
                            "operation": {
                                "enum": [
                                    "INVALID", "MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER",
                                    "INSERT_FIRST", "REPLACE",
                                ]
                            },
                            "value": ANY,
                            "filterClass": {"enum": ["UNSPECIFIED", "AUTHN", "AUTHZ", "STATS"]},
                        },
                        ["operation"],
                    ),
                },
                ["applyTo", "patch"],
            ),
        },
    },
    ["configPatches"],
)

# https://istio.io/latest/docs/reference/config/networking/virtual-service/
VIRTUAL_SERVICE = obj(
    {
        "hosts": STRS,
        "gateways": STRS,
        "exportTo": STRS,
        "http": {
            "type": "array",
            "items": obj(
                {
                    "name": STR,
                    "match": {
                        "type": "array",
                        "items": obj(
                            {
                                "name": STR,
                                "uri": STRING_MATCH,
                                "method": STRING_MATCH,
                                "authority": STRING_MATCH,
                                "headers": {"type": "object", "additionalProperties": STRING_MATCH},
                                "port": {"type": "integer"},
                            }
                        ),
                    },
                    "route": {
                        "type": "array",
                        "items": obj(
                            {
                                "destination": obj(
                                    {"host": STR, "subset": STR, "port": obj({"number": {"type": "integer"}})},
                                    ["host"],
                                ),
                                "weight": {"type": "integer"},
                            },
                            ["destination"],
                        ),
                    },
                    "timeout": STR,
                }
            ),
        },
    },
    ["hosts"],
)

# https://istio.io/latest/docs/reference/config/telemetry/
TELEMETRY = obj(
    {
        "selector": SELECTOR,
        "accessLogging": {
            "type": "array",
            "items": obj(
                {
                    "providers": {"type": "array", "items": obj({"name": STR}, ["name"])},
                    "disabled": {"type": "boolean"},
                    "filter": obj({"expression": STR}),
                    "match": obj({"mode": {"enum": ["CLIENT_AND_SERVER", "CLIENT", "SERVER"]}}),
                }
            ),
        },
    }
)

# https://istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/ (meshConfig) in an IstioOperator.
EXT_AUTHZ_GRPC = obj(
    {
        "service": STR,
        "port": {"type": "integer"},
        "timeout": STR,
        "failOpen": {"type": "boolean"},
        "statusOnError": STR,
        "clearRouteCache": {"type": "boolean"},
        "includeRequestHeadersInCheck": STRS,
        "includeAdditionalHeadersInCheck": LABELS,
        "includeRequestBodyInCheck": {"type": "object"},
    },
    ["service", "port"],
)
HTTP_ALS = obj(
    {
        "service": STR,
        "port": {"type": "integer"},
        "logName": STR,
        "filterStateObjectsToLog": STRS,
        "additionalRequestHeadersToLog": STRS,
        "additionalResponseHeadersToLog": STRS,
        "additionalRequestTrailersToLog": STRS,
        "additionalResponseTrailersToLog": STRS,
    },
    ["service", "port"],
)
ISTIO_OPERATOR = obj(
    {
        "profile": STR,
        "meshConfig": obj(
            {
                "pathNormalization": obj(
                    {"normalization": {"enum": ["DEFAULT", "NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]}}
                ),
                "extensionProviders": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": STR, "envoyExtAuthzGrpc": EXT_AUTHZ_GRPC, "envoyHttpAls": HTTP_ALS},
                        "required": ["name"],
                        "additionalProperties": False,
                        "minProperties": 2,
                        "maxProperties": 2,
                    },
                },
            }
        ),
    }
)

# https://prometheus-operator.dev/docs/api-reference/api/#monitoring.coreos.com/v1.PrometheusRule
PROMETHEUS_RULE = obj(
    {
        "groups": {
            "type": "array",
            "items": obj(
                {
                    "name": STR,
                    "interval": STR,
                    "rules": {
                        "type": "array",
                        "items": {
                            "oneOf": [
                                obj(
                                    {"alert": STR, "expr": STR, "for": STR, "keep_firing_for": STR,
                                     "labels": LABELS, "annotations": LABELS},
                                    ["alert", "expr"],
                                ),
                                obj({"record": STR, "expr": STR, "labels": LABELS}, ["record", "expr"]),
                            ]
                        },
                    },
                },
                ["name", "rules"],
            ),
        }
    },
    ["groups"],
)

CUSTOM = {
    ("security.istio.io/v1", "AuthorizationPolicy"): resource("security.istio.io/v1", "AuthorizationPolicy", AUTHORIZATION_POLICY),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): resource("networking.istio.io/v1alpha3", "EnvoyFilter", ENVOY_FILTER),
    ("networking.istio.io/v1", "VirtualService"): resource("networking.istio.io/v1", "VirtualService", VIRTUAL_SERVICE),
    ("telemetry.istio.io/v1", "Telemetry"): resource("telemetry.istio.io/v1", "Telemetry", TELEMETRY),
    ("install.istio.io/v1alpha1", "IstioOperator"): resource(
        "install.istio.io/v1alpha1", "IstioOperator", ISTIO_OPERATOR, metadata_required=False  # `istioctl install -f` names none
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): resource("monitoring.coreos.com/v1", "PrometheusRule", PROMETHEUS_RULE),
}

KUSTOMIZE = {
    "Kustomization": obj(
        {"apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"}, "kind": STR, "namespace": STR,
         "resources": STRS, "components": STRS, "labels": {"type": "array"}, "images": {"type": "array"},
         "patches": {"type": "array", "items": obj({"path": STR, "target": {"type": "object"}})}},
        ["apiVersion", "kind"],
    ),
    "Component": obj(
        {"apiVersion": {"const": "kustomize.config.k8s.io/v1alpha1"}, "kind": STR,
         "resources": STRS, "patches": {"type": "array", "items": obj({"path": STR, "target": {"type": "object"}})}},
        ["apiVersion", "kind", "patches"],
    ),
}


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def validate_k8s(name, doc, failures):
    ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        print(f"ok   {name}: {ident} (Kubernetes {K8S_VERSION}, strict)")
    except kubernetes_validate.ValidationError as e:
        failures.append(f"{name}: {ident}: {e.message} at {'.'.join(str(p) for p in e.path)}")
    except kubernetes_validate.SchemaNotFoundError as e:
        failures.append(f"{name}: {ident}: no schema ({e})")


def validate_custom(name, doc, failures):
    key = (doc.get("apiVersion"), doc.get("kind"))
    schema = CUSTOM.get(key)
    if schema is None:
        failures.append(f"{name}: no schema for {key}")
        return
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        for e in errors:
            failures.append(f"{name}: {key[1]}: {e.message} at {'.'.join(str(p) for p in e.path)}")
    else:
        print(f"ok   {name}: {key[1]}/{doc.get('metadata', {}).get('name', '-')} ({key[0]}, fields tollgate uses)")


def main():
    deploy = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "deploy")
    deploy = os.path.normpath(deploy)
    failures = []
    k8s = os.path.join(deploy, "k8s")

    kustomization = load(os.path.join(k8s, "kustomization.yaml"))[0]
    errors = list(jsonschema.Draft7Validator(KUSTOMIZE["Kustomization"]).iter_errors(kustomization))
    failures += [f"k8s/kustomization.yaml: {e.message}" for e in errors]
    base = []
    for r in kustomization["resources"]:
        for doc in load(os.path.join(k8s, r)):
            base.append((f"k8s/{r}", doc))
            validate_k8s(f"k8s/{r}", doc, failures)

    # Each component: its patches applied to the base objects they name.
    components = os.path.join(k8s, "components")
    for c in sorted(os.listdir(components)):
        cdir = os.path.join(components, c)
        comp = load(os.path.join(cdir, "kustomization.yaml"))[0]
        errors = list(jsonschema.Draft7Validator(KUSTOMIZE["Component"]).iter_errors(comp))
        failures += [f"k8s/components/{c}/kustomization.yaml: {e.message}" for e in errors]
        for p in comp.get("patches", []):
            for patch in load(os.path.join(cdir, p["path"])):
                target = [
                    d for _, d in base
                    if d["kind"] == patch["kind"] and d["metadata"]["name"] == patch["metadata"]["name"]
                ]
                if len(target) != 1:
                    failures.append(f"k8s/components/{c}/{p['path']}: patches no single base object")
                    continue
                validate_k8s(f"k8s/components/{c}/{p['path']} on the base", merge(target[0], patch), failures)

    for sub in ["istio", "monitoring"]:
        d = os.path.join(deploy, sub)
        for f in sorted(os.listdir(d)):
            if not f.endswith(".yaml") or f in ("alerts.yaml", "alerts.test.yaml"):
                continue  # Prometheus rule files, not resources: promtool checks them.
            for doc in load(os.path.join(d, f)):
                validate_custom(f"{sub}/{f}", doc, failures)

    for f in failures:
        print(f"FAIL {f}")
    print(f"{len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
