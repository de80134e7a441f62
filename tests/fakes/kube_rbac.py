"""Who a request to the fake kube-apiserver is, and what RBAC lets it do.

Authentication: the server's admin token, tokens registered with `add_user`, and bound
ServiceAccount tokens issued by the TokenRequest API (a JWT naming the ServiceAccount and its
uid; rejected once that ServiceAccount is gone or was recreated, and once expired, as
kube-apiserver's bound-token authenticator does).

Authorization of every identity but the admin is the RBAC authorizer over the Roles,
ClusterRoles and bindings in the fake's store, with the real rule semantics, plus the roles
every authenticated user holds in a real cluster (system:discovery, system:basic-user) and the
system:masters short cut. Writes of RBAC objects go through the RBAC registry's escalation
prevention. The admin keeps the fake's older model: everything is allowed except what `deny()`
lists. While no `deny()` is in effect it is a cluster-admin; once one is, it is modelled as an
identity whose roles list every permission but the denied ones, and none of the verbs that let
their holder grant itself anything (escalate, bind, impersonate, "*"): holding those beside a
restriction would make the restriction void, and no real cluster hands them out that way.

Kubernetes sources followed (kubernetes/kubernetes):
- plugin/pkg/auth/authorizer/rbac/rbac.go and pkg/apis/rbac/v1/evaluation_helpers.go
  (RuleAllows, VerbMatches, ResourceMatches, ResourceNameMatches, CompactString)
- pkg/registry/rbac/validation/rule.go (rule resolution, describers, ConfirmNoEscalation),
  policy_compact.go, staging/.../component-helpers/auth/rbac/validation/policy_comparator.go
- pkg/registry/rbac/escalation_check.go and pkg/registry/rbac/*/policybased/storage.go
- staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go (403 text)
- pkg/registry/core/serviceaccount/storage/token.go (TokenRequest)
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

RBAC_GROUP = "rbac.authorization.k8s.io"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # kube-apiserver's --api-audiences
AUTHENTICATED = "system:authenticated"
PRIVILEGED_GROUP = "system:masters"
ADMIN_REASON = ('RBAC: allowed by ClusterRoleBinding "fake-admin" of ClusterRole '
                '"cluster-admin" to User "{user}"')
DISCOVERY_REASON = ('RBAC: allowed by ClusterRoleBinding "system:discovery" of ClusterRole '
                    '"system:discovery" to Group "system:authenticated"')
# what the bootstrap ClusterRoles system:discovery and system:public-info-viewer grant
DISCOVERY_URLS = ("/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version",
                  "/version/", "/healthz", "/livez", "/readyz")
# verbs whose holder can grant itself anything: a restricted admin does not hold them
SELF_GRANTING = ("escalate", "bind", "impersonate", "*")
FULL_AUTHORITY = ({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                  {"nonResourceURLs": ["*"], "verbs": ["*"]})


def _api_error(code: int, message: str, details: dict | None = None) -> Exception:
    # imported here: kube_apiserver imports this module
    from tests.fakes.kube_apiserver import KubeAPIError
    return KubeAPIError(code, message, details)


def go_quote(text: str) -> str:
    """Go's %q of a string (strconv.Quote), for the printable text found in names."""
    return json.dumps(text, ensure_ascii=False)


def go_quote_list(items: tuple[str, ...] | list[str]) -> str:
    """Go's %q of a []string: ["a" "b"]."""
    return "[" + " ".join(go_quote(i) for i in items) + "]"


def aggregate(errors: list[str]) -> str:
    """utilerrors.NewAggregate(...).Error()."""
    return errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"


# --- identities -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = (AUTHENTICATED,)
    admin: bool = False  # the constructor's token: allowed all but deny()


@dataclass(frozen=True)
class Attributes:
    """authorizer.Attributes of a request (a resource request when `resource` is set)."""
    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""

    @property
    def combined_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


# --- rules ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    api_groups: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()
    resource_names: tuple[str, ...] = ()
    non_resource_urls: tuple[str, ...] = ()

    @classmethod
    def of(cls, rule: dict) -> Rule:
        return cls(*(tuple(rule.get(k) or ()) for k in (
            "apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs")))

    def allows(self, a: Attributes) -> bool:
        """RuleAllows."""
        if not ("*" in self.verbs or a.verb in self.verbs):
            return False
        if not a.resource:
            return any(u == "*" or u == a.path or (u.endswith("*") and a.path.startswith(u[:-1]))
                       for u in self.non_resource_urls)
        return (("*" in self.api_groups or a.group in self.api_groups)
                and self._resource_matches(a)
                and (not self.resource_names or a.name in self.resource_names))

    def _resource_matches(self, a: Attributes) -> bool:
        for resource in self.resources:
            if resource in ("*", a.combined_resource):
                return True
            if a.subresource and resource == f"*/{a.subresource}":
                return True
        return False

    def breakdown(self) -> list[Rule]:
        """BreakdownRule: one rule per group, resource, verb and resource name."""
        subrules = [Rule((g,), (r,), (v,), (n,) if n else ())
                    for g in self.api_groups for r in self.resources for v in self.verbs
                    for n in (self.resource_names or ("",))]
        subrules += [Rule(verbs=(v,), non_resource_urls=(u,))
                     for u in self.non_resource_urls for v in self.verbs]
        return subrules

    def covers(self, sub: Rule) -> bool:
        """ruleCovers: whether this (owner) rule covers a broken-down rule."""
        def has_all(owner: tuple[str, ...], wanted: tuple[str, ...]) -> bool:
            return "*" in owner or set(wanted) <= set(owner)

        names = (not self.resource_names) or (bool(sub.resource_names)
                                              and set(sub.resource_names) <= set(self.resource_names))
        return (has_all(self.verbs, sub.verbs) and has_all(self.api_groups, sub.api_groups)
                and self._resources_cover(sub.resources) and names
                and all(any(o == u or (o.endswith("*") and u.startswith(o[:-1]))
                            for o in self.non_resource_urls) for u in sub.non_resource_urls))

    def _resources_cover(self, wanted: tuple[str, ...]) -> bool:
        if "*" in self.resources:
            return True
        return all(r in self.resources or ("/" in r and f"*/{r.split('/', 1)[1]}" in self.resources)
                   for r in wanted)

    def compact_string(self) -> str:
        parts = [(label, values) for label, values in (
            ("APIGroups", self.api_groups), ("Resources", self.resources),
            ("NonResourceURLs", self.non_resource_urls), ("ResourceNames", self.resource_names),
            ("Verbs", self.verbs)) if values]
        return "{" + ", ".join(f"{label}:{go_quote_list(values)}" for label, values in parts) + "}"


def compact(rules: list[Rule]) -> list[Rule]:
    """CompactRules: simple rules (one group, one resource, at most one name) that differ only
    by verb are merged, keeping the order of the verbs."""
    merged: dict[tuple, Rule] = {}
    others = []
    for rule in rules:
        if len(rule.api_groups) == 1 and len(rule.resources) == 1 \
                and len(rule.resource_names) <= 1 and not rule.non_resource_urls:
            key = (rule.api_groups, rule.resources, rule.resource_names)
            seen = merged.get(key)
            merged[key] = Rule(*key[:2], (seen.verbs if seen else ()) + rule.verbs, key[2]) \
                if seen else rule
        else:
            others.append(rule)
    return others + list(merged.values())


# --- the authorizer ---------------------------------------------------------------------------

@dataclass
class _Owner:
    """What an identity holds in one namespace, for the escalation checks."""
    holds: Callable[[Rule], bool]
    errors: list[str] = field(default_factory=list)


class RBAC:
    """Authentication and RBAC authorization over the fake's store.

    :param objects: the stored objects of a kind ("Role", "ServiceAccount", ...)
    :param denials: the admin's `deny()` entries (verb, resource, group, namespace, subresource)
    :param admin_token: the admin's current bearer token
    """

    def __init__(self, objects: Callable[[str], list[dict]], denials: list[tuple],
                 admin_token: Callable[[], str]):
        self._objects, self._denials, self._admin_token = objects, denials, admin_token
        self._users: dict[str, Identity] = {}
        self._secret = os.urandom(32)

    def reset(self) -> None:
        self._users.clear()

    def add_user(self, token: str, name: str, groups: tuple[str, ...] | list[str] = ()) -> None:
        """A static token (the --token-auth-file kind); the authenticator adds
        system:authenticated to every user, as kube-apiserver does."""
        groups = tuple(groups)
        self._users[token] = Identity(name, groups + (() if AUTHENTICATED in groups
                                                      else (AUTHENTICATED,)))

    # --- authentication -----------------------------------------------------------------------

    def authenticate(self, token: str) -> Identity | None:
        if token and hmac.compare_digest(token.encode(), self._admin_token().encode()):
            return Identity("fake-user", admin=True)
        return self._users.get(token) or self._service_account(token)

    def issue_token(self, account: dict, audiences: list[str], seconds: int) -> tuple[str, str]:
        """A bound token for a ServiceAccount: (token, expirationTimestamp)."""
        meta = account["metadata"]
        now = datetime.now(UTC).replace(microsecond=0)
        expiry = now + timedelta(seconds=seconds)
        claims = {"aud": audiences, "exp": int(expiry.timestamp()), "iat": int(now.timestamp()),
                  "iss": API_AUDIENCE, "jti": str(uuid.uuid4()),
                  "kubernetes.io": {"namespace": meta["namespace"], "serviceaccount": {
                      "name": meta["name"], "uid": meta["uid"]}},
                  "nbf": int(now.timestamp()),
                  "sub": f"system:serviceaccount:{meta['namespace']}:{meta['name']}"}
        header = {"alg": "HS256", "kid": "fake"}
        signed = f"{_b64(_compact(header))}.{_b64(_compact(claims))}"
        token = f"{signed}.{_b64(self._sign(signed))}"
        return token, expiry.strftime("%Y-%m-%dT%H:%M:%SZ")

    def token_request(self, account: dict | None, body: dict, namespace: str, name: str) -> dict:
        """The TokenRequest subresource's answer (404 for a missing ServiceAccount)."""
        body = copy.deepcopy(body or {})
        spec = body.get("spec") or {}
        seconds = spec.get("expirationSeconds") or 3600
        if seconds < 600:  # ValidateTokenRequest
            raise _api_error(422, 'TokenRequest.authentication.k8s.io "" is invalid: '
                                  f'spec.expirationSeconds: Invalid value: {seconds}: may not '
                                  'specify a duration less than 10 minutes', {
                                      "group": "authentication.k8s.io", "kind": "TokenRequest",
                                      "causes": [{"reason": "FieldValueInvalid",
                                                  "field": "spec.expirationSeconds",
                                                  "message": f"Invalid value: {seconds}: may not "
                                                             "specify a duration less than 10 "
                                                             "minutes"}]})
        if account is None:
            raise _api_error(404, f'serviceaccounts "{name}" not found',
                             {"name": name, "kind": "serviceaccounts"})
        audiences = spec.get("audiences") or [API_AUDIENCE]
        token, expiry = self.issue_token(account, audiences, seconds)
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace,
                             "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
                "spec": {"audiences": audiences, "expirationSeconds": seconds,
                         "boundObjectRef": spec.get("boundObjectRef")},
                "status": {"token": token, "expirationTimestamp": expiry}}

    def _sign(self, text: str) -> bytes:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).digest()

    def _service_account(self, token: str) -> Identity | None:
        try:
            signed, _, signature = token.rpartition(".")
            if not hmac.compare_digest(_unb64(signature), self._sign(signed)):
                return None
            claims = json.loads(_unb64(signed.split(".")[1]))
        except (ValueError, IndexError):
            return None
        bound = claims["kubernetes.io"]
        namespace, account = bound["namespace"], bound["serviceaccount"]
        live = next((o for o in self._objects("ServiceAccount")
                     if o["metadata"]["namespace"] == namespace
                     and o["metadata"]["name"] == account["name"]), None)
        if live is None or live["metadata"]["uid"] != account["uid"] \
                or claims["exp"] <= datetime.now(UTC).timestamp() or API_AUDIENCE not in claims["aud"]:
            return None
        return Identity(claims["sub"], ("system:serviceaccounts",
                                        f"system:serviceaccounts:{namespace}", AUTHENTICATED))

    # --- authorization ------------------------------------------------------------------------

    def authorize(self, who: Identity, a: Attributes) -> tuple[bool, str]:
        """(allowed, reason) as the authorizer chain answers: the reason of an allow names the
        binding; a denial has a reason only when rule resolution failed."""
        if who.admin:
            allowed = self._admin_allows(a)
            return allowed, ADMIN_REASON.format(user=who.user) if allowed else ""
        if PRIVILEGED_GROUP in who.groups:
            return True, ""
        if not a.resource and a.verb in ("get", "head") and Rule(
                verbs=("get", "head"), non_resource_urls=DISCOVERY_URLS).allows(a):
            return True, DISCOVERY_REASON
        errors = []
        for source, rule, error in self._visit(who, a.namespace, registry=False):
            if error:
                errors.append(error)
            elif rule.allows(a):
                return True, f"RBAC: allowed by {source}"
        return False, f"RBAC: {aggregate(errors)}" if errors else ""

    def review(self, who: Identity, spec: dict) -> tuple[bool, str]:
        """A SelfSubjectAccessReview's spec evaluated for `who`."""
        if attrs := spec.get("resourceAttributes"):
            return self.authorize(who, Attributes(**{k: attrs.get(k) or "" for k in (
                "verb", "group", "resource", "subresource", "namespace", "name")}))
        attrs = spec.get("nonResourceAttributes") or {}
        return self.authorize(who, Attributes(attrs.get("verb", ""), path=attrs.get("path", "")))

    def _admin_allows(self, a: Attributes) -> bool:
        if not a.resource:
            return True
        if any(self._denial_matches(d, a) for d in self._denials):
            return False
        return not (self._denials and a.verb in SELF_GRANTING)

    @staticmethod
    def _denial_matches(denial: tuple, a: Attributes) -> bool:  # as FakeKubeAPIServer._denied
        verb, resource, group, namespace, subresource = denial
        return (verb in ("*", a.verb) and resource in ("*", a.resource) and group in ("*", a.group)
                and (namespace is None or namespace == a.namespace) and subresource == a.subresource)

    def _visit(self, who: Identity, namespace: str,
               registry: bool) -> Iterator[tuple[str, Rule | None, str | None]]:
        """VisitRulesFor: (source, rule, None) for each rule bound to `who`, (None, None, error)
        for a binding whose role is missing (the authorizer's listers name the resource in
        the singular, the registry's getters in the plural)."""
        scopes = [("ClusterRoleBinding", "")] + ([("RoleBinding", namespace)] if namespace else [])
        for kind, scope in scopes:
            bindings = sorted((b for b in self._objects(kind)
                               if b["metadata"].get("namespace", "") == scope),
                              key=lambda b: b["metadata"]["name"])
            for binding in bindings:
                subject = next((s for s in binding.get("subjects") or []
                                if _applies(who, s, scope)), None)
                if subject is None:
                    continue
                ref = binding.get("roleRef") or {}
                rules = self.role_rules(ref, scope)
                if rules is None:
                    yield None, None, _role_missing(ref, registry)
                    continue
                source = _describe(kind, binding, ref, subject, scope)
                for rule in rules:
                    yield source, rule, None

    def role_rules(self, ref: dict, namespace: str) -> list[Rule] | None:
        """GetRoleReferenceRules; None when the role does not exist."""
        kind = ref.get("kind")
        if kind not in ("Role", "ClusterRole"):
            return None
        scope = namespace if kind == "Role" else ""
        role = next((r for r in self._objects(kind) if r["metadata"]["name"] == ref.get("name")
                     and r["metadata"].get("namespace", "") == scope), None)
        return None if role is None else [Rule.of(r) for r in role.get("rules") or []]

    # --- escalation prevention ----------------------------------------------------------------

    def check_write(self, who: Identity, kind: str, namespace: str, url_name: str | None,
                    new: dict, old: dict | None) -> None:
        """The RBAC registry's checks before a Role, ClusterRole or binding is stored: 403
        when it grants what the writer does not hold (escalate / bind aside)."""
        if kind not in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding") \
                or PRIVILEGED_GROUP in who.groups:  # EscalationAllowed
            return
        if old is not None and _only_gc_fields_change(new, old):
            return
        plural = kind.lower() + "s"
        name = new["metadata"].get("name", "")
        if kind.endswith("Binding"):
            message = self._binding_escalation(who, new.get("roleRef") or {}, namespace)
        else:
            message = self._role_escalation(who, kind, plural, namespace, url_name or "", new)
        if message:
            raise _api_error(403, f'{plural}.{RBAC_GROUP} "{name}" is forbidden: {message}',
                             {"name": name, "group": RBAC_GROUP, "kind": plural})

    def _role_escalation(self, who: Identity, kind: str, plural: str, namespace: str,
                         url_name: str, role: dict) -> str | None:
        escalate = Attributes("escalate", RBAC_GROUP, plural, namespace=namespace, name=url_name)
        if self.authorize(who, escalate)[0]:  # RoleEscalationAuthorized
            return None
        if kind == "ClusterRole" and (role.get("aggregationRule") or {}).get(
                "clusterRoleSelectors"):
            if self.confirm_no_escalation(who, namespace, [Rule.of(r) for r in FULL_AUTHORITY]):
                return "must have cluster-admin privileges to use the aggregationRule"
        return self.confirm_no_escalation(who, namespace,
                                          [Rule.of(r) for r in role.get("rules") or []])

    def _binding_escalation(self, who: Identity, ref: dict, namespace: str) -> str | None:
        bind = Attributes("bind", ref.get("apiGroup", ""),
                          {"Role": "roles", "ClusterRole": "clusterroles"}.get(ref.get("kind"), ""),
                          namespace=namespace, name=ref.get("name", ""))
        if bind.resource and self.authorize(who, bind)[0]:  # BindingAuthorized
            return None
        rules = self.role_rules(ref, namespace)
        if rules is None:
            plural = {"Role": "roles", "ClusterRole": "clusterroles"}.get(ref.get("kind"))
            if plural is None:
                raise _api_error(500, f'unsupported role reference kind: "{ref.get("kind")}"')
            raise _api_error(404, f'{plural}.{RBAC_GROUP} "{ref.get("name")}" not found',
                             {"name": ref.get("name"), "group": RBAC_GROUP, "kind": plural})
        return self.confirm_no_escalation(who, namespace, rules)

    def confirm_no_escalation(self, who: Identity, namespace: str, rules: list[Rule]) -> str | None:
        """ConfirmNoEscalation: None when `who` holds every rule, else the real message."""
        owner = self._owner(who, namespace)
        missing = [sub for rule in rules for sub in rule.breakdown() if not owner.holds(sub)]
        if not missing:
            return None
        lines = sorted({r.compact_string() for r in compact(missing)})
        message = (f"user {go_quote(who.user)} (groups={go_quote_list(who.groups)}) is "
                   "attempting to grant RBAC permissions not currently held:\n" + "\n".join(lines))
        if owner.errors:
            message += f"; resolution errors: [{aggregate(owner.errors)}]"
        return message

    def _owner(self, who: Identity, namespace: str) -> _Owner:
        if who.admin:
            return _Owner(lambda sub: self._admin_holds(sub, namespace))
        rules, errors = [], []
        for _, rule, error in self._visit(who, namespace, registry=True):
            if error:
                errors.append(error)
            else:
                rules.append(rule)
        return _Owner(lambda sub: any(r.covers(sub) for r in rules), errors)

    def _admin_holds(self, sub: Rule, namespace: str) -> bool:
        """Whether the admin holds a broken-down rule in `namespace` ("" for the cluster
        scope, where a denial in any namespace counts)."""
        if not self._denials:
            return True
        if sub.verbs[0] in SELF_GRANTING:
            return False
        if sub.non_resource_urls:
            return True
        return not any(_denial_overlaps(d, sub, namespace) for d in self._denials)


def _denial_overlaps(denial: tuple, sub: Rule, namespace: str) -> bool:
    """Whether a deny() entry takes away any of a broken-down rule (wildcards on both sides)."""
    verb, resource, group, where, subresource = denial
    wanted = sub.resources[0]
    base, _, wanted_sub = wanted.partition("/")
    resource_overlaps = wanted == "*" or (
        wanted_sub == subresource and (base == "*" or resource in ("*", base)))
    return (_overlap(verb, sub.verbs[0]) and _overlap(group, sub.api_groups[0])
            and resource_overlaps and (where is None or not namespace or where == namespace))


def _overlap(a: str, b: str) -> bool:
    return "*" in (a, b) or a == b


def _applies(who: Identity, subject: dict, namespace: str) -> bool:
    """appliesToUser."""
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return who.user == name
    if kind == "Group":
        return name in who.groups
    if kind == "ServiceAccount":
        sa_namespace = subject.get("namespace") or namespace
        return bool(sa_namespace) and who.user == f"system:serviceaccount:{sa_namespace}:{name}"
    return False


def _describe(kind: str, binding: dict, ref: dict, subject: dict, namespace: str) -> str:
    """The describers of rule.go, e.g. RoleBinding "rb/ns" of Role "r" to ServiceAccount "sa/ns"."""
    name = binding["metadata"]["name"] + (f"/{namespace}" if kind == "RoleBinding" else "")
    who = subject.get("name", "")
    if subject.get("kind") == "ServiceAccount":
        who += "/" + (subject.get("namespace") or namespace)
    return (f"{kind} {go_quote(name)} of {ref.get('kind')} {go_quote(ref.get('name', ''))} "
            f"to {subject.get('kind')} {go_quote(who)}")


def _role_missing(ref: dict, registry: bool) -> str:
    resource = ref.get("kind", "").lower() + ("s" if registry else "")
    return f'{resource}.{RBAC_GROUP} "{ref.get("name")}" not found'


def _only_gc_fields_change(new: dict, old: dict) -> bool:
    """IsOnlyMutatingGCFields: only ownerReferences and finalizers differ."""
    def without_gc(obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.get("metadata") or {}
        for key in ("ownerReferences", "finalizers", "managedFields", "resourceVersion",
                    "generation", "uid", "creationTimestamp"):
            meta.pop(key, None)
        return obj
    return without_gc(new) == without_gc(old)


def _compact(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
