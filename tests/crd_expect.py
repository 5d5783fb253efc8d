"""The project's own typed schemas of the Istio objects `netlab export k8s` writes, as JSON Schema,
at the pinned releases: AuthorizationPolicy and the Gateway API Gateway.

No upstream CRD file is copied here (project rule); these schemas are written from the facts of
those CRDs -- field names, types, enums, required fields, bounds -- as tests/reference_expect.py
is written from the reference. Where the facts come from:

* AuthorizationPolicy: istio/api ``security/v1beta1/authorization.proto`` (``security.istio.io``;
  served as ``v1beta1`` by Istio 1.18.2 and also as ``v1`` since 1.22, same schema), rendered by
  istio/istio ``manifests/charts/base/crds/crd-all.gen.yaml`` at the pinned tags:
  ``selector.matchLabels`` map of strings; ``rules[].from[].source`` / ``rules[].to[].operation``
  / ``rules[].when[]`` with string lists (``ports`` are strings in the proto, not integers);
  ``action`` one of ALLOW, DENY, AUDIT, CUSTOM; ``provider.name``. Fields added after 1.18
  (``targetRef``, ``targetRefs``, ``serviceAccounts``/``notServiceAccounts``) are only in the
  current schema.
* Gateway: kubernetes-sigs/gateway-api ``config/crd/standard/gateway.networking.k8s.io_gateways.yaml``
  (``v1beta1`` in the v0.6 line Istio 1.18 pairs with; ``v1`` since gateway-api v1.0):
  ``spec.gatewayClassName`` 1-253 characters, required; ``spec.listeners`` 1-64 items, each with
  required ``name`` (a section name: DNS subdomain pattern, at most 253), ``port`` (1-65535) and
  ``protocol`` (1-255, the pattern below); optional ``hostname``, ``tls``, ``allowedRoutes``
  (``namespaces.from`` one of All, Selector, Same).

``additionalProperties: false`` everywhere the CRD's structural schema has fixed fields, so a
misspelt field fails as it would in the API server's pruning/strict validation.
"""

from __future__ import annotations

from typing import Any

_STR_LIST = {"type": "array", "items": {"type": "string"}}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        s["required"] = list(required)
    return s


_METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 253}, "namespace": {"type": "string"},
    "labels": _STR_MAP, "annotations": _STR_MAP}}


def _toplevel(api: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj({"apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": _METADATA, "spec": spec},
                ("apiVersion", "kind", "metadata", "spec"))


# ---- AuthorizationPolicy ----

_SOURCE_1_18 = ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
                "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")


def _authz_spec(current: bool) -> dict[str, Any]:
    source = _SOURCE_1_18 + (("serviceAccounts", "notServiceAccounts") if current else ())
    rule = _obj({
        "from": {"type": "array", "items": _obj({"source": _obj({k: _STR_LIST for k in source})})},
        "to": {"type": "array", "items": _obj({"operation": _obj({k: _STR_LIST for k in _OPERATION})})},
        "when": {"type": "array", "items": _obj({"key": {"type": "string"}, "values": _STR_LIST,
                                                 "notValues": _STR_LIST}, ("key",))},
    })
    props: dict[str, Any] = {
        "selector": _obj({"matchLabels": _STR_MAP}),
        "rules": {"type": "array", "items": rule},
        "action": {"type": "string", "enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
        "provider": _obj({"name": {"type": "string"}}),
    }
    if current:
        ref = _obj({"group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                    "namespace": {"type": "string"}}, ("kind", "name"))
        props["targetRef"] = ref
        props["targetRefs"] = {"type": "array", "items": ref}
    return _obj(props)


# ---- Gateway ----

_SECTION_NAME = {"type": "string", "minLength": 1, "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_PROTOCOL = {"type": "string", "minLength": 1, "maxLength": 255,
             "pattern": r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$|[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                        r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9]+$"}
_LISTENER = _obj({
    "name": _SECTION_NAME,
    "hostname": {"type": "string", "minLength": 1, "maxLength": 253},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    "protocol": _PROTOCOL,
    "tls": {"type": "object"},
    "allowedRoutes": _obj({"namespaces": _obj({"from": {"type": "string", "enum": ["All", "Selector", "Same"]},
                                                "selector": {"type": "object"}}),
                           "kinds": {"type": "array", "items": {"type": "object"}}}),
}, ("name", "port", "protocol"))


def _gateway_spec(current: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "gatewayClassName": {"type": "string", "minLength": 1, "maxLength": 253},
        "listeners": {"type": "array", "minItems": 1, "maxItems": 64, "items": _LISTENER},
        "addresses": {"type": "array", "maxItems": 16, "items": {"type": "object"}},
    }
    if current:
        props["infrastructure"] = {"type": "object"}
    return _obj(props, ("gatewayClassName", "listeners"))


#: (apiVersion, kind) -> JSON Schema of the whole object, per datapath's release
SCHEMAS: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
    "istio-1.18": {
        ("security.istio.io/v1beta1", "AuthorizationPolicy"):
            _toplevel("security.istio.io/v1beta1", "AuthorizationPolicy", _authz_spec(current=False)),
        ("gateway.networking.k8s.io/v1beta1", "Gateway"):
            _toplevel("gateway.networking.k8s.io/v1beta1", "Gateway", _gateway_spec(current=False)),
    },
    "inpod": {
        ("security.istio.io/v1", "AuthorizationPolicy"):
            _toplevel("security.istio.io/v1", "AuthorizationPolicy", _authz_spec(current=True)),
        ("gateway.networking.k8s.io/v1", "Gateway"):
            _toplevel("gateway.networking.k8s.io/v1", "Gateway", _gateway_spec(current=True)),
    },
}
