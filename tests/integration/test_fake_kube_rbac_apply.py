"""The fake Kubernetes API server's RBAC (identities, authorization, escalation prevention),
server-side apply and immutable fields, against the real `kubernetes` client and kubectl.

Every expectation comes from Kubernetes' documentation or source, cited beside it; the fake's
own docstrings are not a reference. One server for the module, `reset()` before each test.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import kubernetes
import pytest
from kubernetes.client import (
    AppsV1Api,
    AuthorizationV1Api,
    CoreV1Api,
    NetworkingV1Api,
    RbacAuthorizationV1Api,
)
from kubernetes.client.rest import ApiException

from tests.fakes.kube_apiserver import FakeKubeAPIServer, KubeAPIError
from tests.integration.fake_kube_support import kubectl  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

APPLY = "application/apply-patch+yaml"
RBAC = "rbac.authorization.k8s.io"
SA_USER = "system:serviceaccount:ns:sa"
SA_GROUPS = '["system:serviceaccounts" "system:serviceaccounts:ns" "system:authenticated"]'


@pytest.fixture(scope="module")
def server():
    with FakeKubeAPIServer(ready_delay=0.2, terminate_delay=0.2) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(server):
    server.reset()
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})


@pytest.fixture
def connect(server):
    """An ApiClient for the admin (no token given) or for a token."""
    clients = []

    def make(token: str | None = None) -> kubernetes.client.ApiClient:
        clients.append(kubernetes.config.new_client_from_config_dict(
            server.kubeconfig(token=token)))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def admin(connect):
    return connect()


@pytest.fixture
def sa_client(server, admin, connect):
    """The client of ServiceAccount ns/sa, which no RBAC object mentions yet."""
    CoreV1Api(admin).create_namespaced_service_account("ns", {"metadata": {"name": "sa"}})
    return connect(server.service_account_token("ns", "sa"))


def fails(fn, *args, **kwargs) -> dict:
    with pytest.raises(ApiException) as info:
        fn(*args, **kwargs)
    body = json.loads(info.value.body)
    assert body["kind"] == "Status" and body["code"] == info.value.status
    return body


def role(name: str, *rules: dict, kind: str = "Role") -> dict:
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": {"name": name},
            "rules": list(rules)}


def rule(resources: list[str], verbs: list[str], groups: tuple[str, ...] = ("",),
         **extra) -> dict:
    return {"apiGroups": list(groups), "resources": resources, "verbs": verbs, **extra}


def binding(name: str, role_name: str, *subjects: dict, kind: str = "RoleBinding",
            role_kind: str = "Role") -> dict:
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": {"name": name},
            "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role_name},
            "subjects": list(subjects)}


SA = {"kind": "ServiceAccount", "name": "sa", "namespace": "ns"}


def grant(admin, *rules: dict, name: str = "granted") -> None:
    """Bind ns/sa to a Role of `rules` in namespace ns."""
    rbac = RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role("ns", role(name, *rules))
    rbac.create_namespaced_role_binding("ns", binding(name, name, SA))


def can_i(client, verb: str, resource: str, namespace: str = "ns", group: str = "",
          subresource: str = "", name: str = ""):
    return AuthorizationV1Api(client).create_self_subject_access_review({"spec": {
        "resourceAttributes": {"verb": verb, "resource": resource, "group": group,
                               "namespace": namespace, "subresource": subresource,
                               "name": name}}}).status


def deployment(name: str = "d", replicas: int = 1, *, secrets: tuple[str, ...] = ("reg",),
               labels: dict | None = None) -> dict:
    pod_spec = {"containers": [{"name": "main", "image": "nginx:1",
                                "ports": [{"containerPort": 80}]}]}
    if secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in secrets]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": "ns", "labels": labels or {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}}}


def config_map(name: str = "c", **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "ns"}, "data": data}


def apply_deployment(admin, body: dict, manager: str = "airfleet", force: bool = True):
    """The call shape Airfleet's backend uses (include/airfleet/backends/kubernetes/kube.py)."""
    return AppsV1Api(admin).patch_namespaced_deployment(
        body["metadata"]["name"], "ns", body, field_manager=manager, force=force,
        _content_type=APPLY)


def apply_config_map(admin, body: dict, manager: str = "airfleet", **kwargs):
    return CoreV1Api(admin).patch_namespaced_config_map(
        body["metadata"]["name"], "ns", body, field_manager=manager, _content_type=APPLY,
        **kwargs)


def managers(obj: dict) -> dict[tuple[str, str], dict]:
    """(manager, operation) -> fieldsV1 of an object read through the fake's state API."""
    return {(m["manager"], m["operation"]): m["fieldsV1"]
            for m in obj["metadata"].get("managedFields", [])}


# --- identities ---------------------------------------------------------------------------------

def test_token_request_answers_a_bound_token(server, admin):
    """TokenRequest (https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/
    token-request-v1/, pkg/registry/core/serviceaccount/storage/token.go): POST to
    serviceaccounts/<name>/token answers 201 with status.token and expirationTimestamp;
    expirationSeconds defaults to 3600 and audiences to the API server's; 404 without the
    ServiceAccount."""
    core = CoreV1Api(admin)
    core.create_namespaced_service_account("ns", {"metadata": {"name": "sa"}})
    answer = core.create_namespaced_service_account_token("sa", "ns", {"spec": {}},
                                                          _preload_content=False)
    assert answer.status == 201
    body = json.loads(answer.data)
    assert body["kind"] == "TokenRequest" and body["apiVersion"] == "authentication.k8s.io/v1"
    assert body["spec"]["expirationSeconds"] == 3600
    assert body["spec"]["audiences"] == ["https://kubernetes.default.svc.cluster.local"]
    expires = datetime.strptime(body["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    left = (expires.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
    assert 3500 < left <= 3600 and body["status"]["token"].count(".") == 2  # a JWT
    missing = fails(core.create_namespaced_service_account_token, "nobody", "ns", {"spec": {}})
    assert (missing["code"], missing["message"]) == (404, 'serviceaccounts "nobody" not found')
    with pytest.raises(KubeAPIError) as info:
        server.service_account_token("ns", "nobody")
    assert info.value.code == 404


def test_a_service_account_token_dies_with_its_service_account(server, admin, sa_client,
                                                               connect):
    """Bound tokens are invalid once the ServiceAccount they name is deleted, and a new
    ServiceAccount of the same name (another uid) does not revive them
    (https://kubernetes.io/docs/reference/access-authn-authz/service-accounts-admin/
    #bound-service-account-token-volume); the API answers 401 to an invalid token."""
    grant(admin, rule(["configmaps"], ["list"]))
    assert CoreV1Api(sa_client).list_namespaced_config_map("ns").items == []
    core = CoreV1Api(admin)
    core.delete_namespaced_service_account("sa", "ns")
    assert fails(CoreV1Api(sa_client).list_namespaced_config_map, "ns")["code"] == 401
    core.create_namespaced_service_account("ns", {"metadata": {"name": "sa"}})
    assert fails(CoreV1Api(sa_client).list_namespaced_config_map, "ns")["reason"] == "Unauthorized"
    # a token for another audience is not one for the API server (--api-audiences)
    elsewhere = connect(server.service_account_token("ns", "sa", audiences=["vault"]))
    assert fails(CoreV1Api(elsewhere).list_namespaced_config_map, "ns")["code"] == 401


def test_a_service_account_is_allowed_only_what_rbac_grants(server, admin, sa_client):
    """RBAC (https://kubernetes.io/docs/reference/access-authn-authz/rbac/): nothing is allowed
    without a binding; a RoleBinding grants its Role in its own namespace only; 403 bodies as
    responsewriters/errors.go forbiddenMessage writes them."""
    core = CoreV1Api(sa_client)
    watch = fails(core.list_namespaced_pod, "ns", watch=True, timeout_seconds=1)
    assert watch["reason"] == "Forbidden" and watch["details"] == {"kind": "pods"}
    assert watch["message"] == (f'pods is forbidden: User "{SA_USER}" cannot watch resource '
                                '"pods" in API group "" in the namespace "ns"')
    nodes = fails(core.list_node)
    assert nodes["message"] == (f'nodes is forbidden: User "{SA_USER}" cannot list resource '
                                '"nodes" in API group "" at the cluster scope')
    grant(admin, rule(["pods"], ["get", "list", "watch"]))
    assert core.list_namespaced_pod("ns").items == []
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    assert fails(core.list_namespaced_pod, "other")["code"] == 403
    created = fails(AppsV1Api(sa_client).create_namespaced_deployment, "ns", deployment())
    assert created["message"] == (f'deployments.apps is forbidden: User "{SA_USER}" cannot '
                                  'create resource "deployments" in API group "apps" in the '
                                  'namespace "ns"')


def test_rule_semantics(server, admin, sa_client):
    """PolicyRule matching (pkg/apis/rbac/v1/evaluation_helpers.go): resourceNames restrict
    named requests (a list is never allowed by them), "pods/log" and "*/scale" name
    subresources, "*" matches any verb or group, a RoleBinding may bind a ClusterRole within
    its namespace, Group subjects match the ServiceAccount's groups."""
    rbac = RbacAuthorizationV1Api(admin)
    grant(admin, rule(["configmaps"], ["get"], resourceNames=["allowed"]),
          rule(["pods/log"], ["get"]), rule(["*/scale"], ["*"], groups=("*",)))
    server.create({**config_map("allowed"), "metadata": {"name": "allowed", "namespace": "ns"}})
    server.create({**config_map("other"), "metadata": {"name": "other", "namespace": "ns"}})
    core = CoreV1Api(sa_client)
    assert core.read_namespaced_config_map("allowed", "ns").metadata.name == "allowed"
    assert fails(core.read_namespaced_config_map, "other", "ns")["code"] == 403
    assert fails(core.list_namespaced_config_map, "ns")["code"] == 403
    assert can_i(sa_client, "get", "pods", subresource="log").allowed
    assert not can_i(sa_client, "get", "pods").allowed
    server.create({**deployment(), "metadata": {"name": "d", "namespace": "ns"}})
    assert AppsV1Api(sa_client).read_namespaced_deployment_scale("d", "ns").spec.replicas == 1
    assert fails(AppsV1Api(sa_client).read_namespaced_deployment, "d", "ns")["code"] == 403
    rbac.create_cluster_role(role("secret-reader", rule(["secrets"], ["list"]),
                                  kind="ClusterRole"))
    rbac.create_namespaced_role_binding("ns", binding(
        "group", "secret-reader", {"kind": "Group", "name": "system:serviceaccounts:ns"},
        role_kind="ClusterRole"))
    assert core.list_namespaced_secret("ns").items == []
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    assert fails(core.list_namespaced_secret, "other")["code"] == 403


def test_access_reviews_name_the_binding_that_allows(server, admin, sa_client):
    """SelfSubjectAccessReviews are evaluated for the caller; an allow's reason names the
    binding as rule.go's describers do, a denial has none unless a binding's role is missing
    (rbac.go: "RBAC: " + the resolution errors, also appended to the 403 message)."""
    assert can_i(sa_client, "list", "pods").to_dict() == {
        "allowed": False, "denied": None, "evaluation_error": None, "reason": None}
    grant(admin, rule(["pods"], ["list"]), name="r")
    assert can_i(sa_client, "list", "pods").reason == \
        'RBAC: allowed by RoleBinding "r/ns" of Role "r" to ServiceAccount "sa/ns"'
    RbacAuthorizationV1Api(admin).create_cluster_role_binding(binding(
        "viewers", "view", SA, kind="ClusterRoleBinding", role_kind="ClusterRole"))
    missing = can_i(sa_client, "get", "secrets")
    assert not missing.allowed
    assert missing.reason == 'RBAC: clusterrole.rbac.authorization.k8s.io "view" not found'
    forbidden = fails(CoreV1Api(sa_client).list_namespaced_secret, "ns")
    assert forbidden["message"].endswith(
        '"secrets" in API group "" in the namespace "ns": '
        'RBAC: clusterrole.rbac.authorization.k8s.io "view" not found')


def test_discovery_is_open_to_every_authenticated_identity(server, admin, sa_client):
    """The bootstrap ClusterRoles system:discovery and system:public-info-viewer, bound to
    system:authenticated, allow discovery (https://kubernetes.io/docs/reference/access-authn-authz/
    rbac/#discovery-roles)."""
    token = server.service_account_token("ns", "sa")
    for path in ("/api", "/api/v1", "/apis", "/apis/apps/v1", "/version", "/openapi/v3"):
        answer = httpx.get(server.url + path, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, path
    review = AuthorizationV1Api(sa_client).create_self_subject_access_review({"spec": {
        "nonResourceAttributes": {"path": "/apis", "verb": "get"}}}).status
    assert review.allowed and "system:discovery" in review.reason


def test_users_from_add_user_and_system_masters(server, admin, connect):
    """Static tokens authenticate a user with its groups plus system:authenticated; User and
    Group subjects bind them; system:masters is allowed everything and may escalate
    (pkg/registry/rbac/escalation_check.go EscalationAllowed)."""
    server.add_user("alice-token", "alice", ["team"])
    alice = connect("alice-token")
    assert fails(CoreV1Api(alice).list_namespaced_config_map, "ns")["message"].startswith(
        'configmaps is forbidden: User "alice" cannot list')
    RbacAuthorizationV1Api(admin).create_namespaced_role("ns", role("cm", rule(["configmaps"],
                                                                               ["list"])))
    RbacAuthorizationV1Api(admin).create_namespaced_role_binding("ns", binding(
        "team", "cm", {"kind": "Group", "name": "team", "apiGroup": RBAC}))
    assert CoreV1Api(alice).list_namespaced_config_map("ns").items == []
    server.add_user("root-token", "root", ["system:masters"])
    root = connect("root-token")
    RbacAuthorizationV1Api(root).create_cluster_role(role("all", rule(["*"], ["*"], ("*",)),
                                                          kind="ClusterRole"))
    assert can_i(root, "escalate", "roles", group=RBAC).allowed


def test_kubectl_create_token_and_a_service_account_kubeconfig(server, admin, kubectl):
    """`kubectl create token` prints a TokenRequest's token
    (https://kubernetes.io/docs/reference/kubectl/generated/kubectl_create/kubectl_create_token/);
    kubectl with it is that ServiceAccount: `Error from server (Forbidden)` with the 403
    message, and `kubectl auth can-i` answers from RBAC."""
    CoreV1Api(admin).create_namespaced_service_account("ns", {"metadata": {"name": "sa"}})
    token = kubectl("-n", "ns", "create", "token", "sa").stdout.strip()
    denied = kubectl("-n", "ns", "get", "pods", token=token, check=False)
    assert denied.returncode == 1
    assert denied.stderr.strip() == (
        f'Error from server (Forbidden): pods is forbidden: User "{SA_USER}" cannot list '
        'resource "pods" in API group "" in the namespace "ns"')
    assert kubectl("auth", "can-i", "list", "pods", "-n", "ns", token=token,
                   check=False).stdout.strip() == "no"
    grant(admin, rule(["pods"], ["list"]))
    assert kubectl("auth", "can-i", "list", "pods", "-n", "ns", token=token).stdout.strip() == "yes"
    assert "No resources found" in kubectl("-n", "ns", "get", "pods", token=token).stderr
    missing = kubectl("-n", "ns", "create", "token", "nobody", check=False)
    assert 'serviceaccounts "nobody" not found' in missing.stderr


# --- escalation prevention ----------------------------------------------------------------------

POD_READER = rule(["pods", "endpoints", "services"], ["get", "list", "watch"])
ENDPOINTS_WATCH = '{APIGroups:[""], Resources:["endpoints"], Verbs:["watch"]}'


def test_a_denied_admin_cannot_grant_what_it_was_denied(server, admin):
    """https://kubernetes.io/docs/reference/access-authn-authz/rbac/#restrictions-on-role-creation-
    or-update: a Role may be created or updated only by someone holding all it grants
    (ConfirmNoEscalation in pkg/registry/rbac/validation/rule.go writes the message; missing
    rules are compacted by policy_compact.go and printed by CompactString). Every write
    (POST, PUT, merge patch, server-side apply) is refused and nothing is stored."""
    rbac = RbacAuthorizationV1Api(admin)
    server.deny("watch", "endpoints")
    assert not can_i(admin, "watch", "endpoints").allowed
    expected = ('roles.rbac.authorization.k8s.io "reader" is forbidden: user "fake-user" '
                '(groups=["system:authenticated"]) is attempting to grant RBAC permissions not '
                f"currently held:\n{ENDPOINTS_WATCH}")
    refused = fails(rbac.create_namespaced_role, "ns", role("reader", POD_READER))
    assert (refused["code"], refused["message"]) == (403, expected)
    assert refused["details"] == {"name": "reader", "group": RBAC, "kind": "roles"}
    assert server.get("Role", "reader", "ns") is None
    rbac.create_namespaced_role("ns", role("reader", rule(["pods"], ["get", "list", "watch"])))
    assert fails(rbac.replace_namespaced_role, "reader", "ns",
                 role("reader", POD_READER))["message"] == expected
    assert fails(rbac.patch_namespaced_role, "reader", "ns", {"rules": [POD_READER]})["code"] == 403
    applied = fails(rbac.patch_namespaced_role, "reader", "ns", role("reader", POD_READER),
                    field_manager="airfleet", force=True, _content_type=APPLY)
    assert applied["message"] == expected
    assert server.get("Role", "reader", "ns")["rules"] == [rule(["pods"], ["get", "list", "watch"])]


def test_a_namespaced_denial_still_blocks_cluster_wide_grants(server, admin):
    """A ClusterRole is checked against what the writer holds cluster-wide (RulesFor with no
    namespace): a permission missing in one namespace is not held at the cluster scope."""
    rbac = RbacAuthorizationV1Api(admin)
    server.deny("watch", "endpoints", namespace="elsewhere")
    rbac.create_namespaced_role("ns", role("reader", POD_READER))
    refused = fails(rbac.create_cluster_role, role("reader", POD_READER, kind="ClusterRole"))
    assert refused["message"].startswith(
        'clusterroles.rbac.authorization.k8s.io "reader" is forbidden: user "fake-user"')
    assert refused["message"].endswith(ENDPOINTS_WATCH)


def test_a_denied_admin_cannot_bind_a_role_granting_the_denied(server, admin):
    """https://kubernetes.io/docs/reference/access-authn-authz/rbac/#restrictions-on-role-binding-
    creation-or-update: a binding needs every permission of its role, or `bind` on it; a
    restricted admin holds no `bind`."""
    rbac = RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role("ns", role("reader", POD_READER))
    server.deny("watch", "endpoints")
    refused = fails(rbac.create_namespaced_role_binding, "ns", binding("reader", "reader", SA))
    assert refused["message"] == (
        'rolebindings.rbac.authorization.k8s.io "reader" is forbidden: user "fake-user" '
        '(groups=["system:authenticated"]) is attempting to grant RBAC permissions not '
        f"currently held:\n{ENDPOINTS_WATCH}")
    assert server.get("RoleBinding", "reader", "ns") is None
    rbac.create_namespaced_role("ns", role("pods", rule(["pods"], ["get"])))
    rbac.create_namespaced_role_binding("ns", binding("pods", "pods", SA))


def test_escalate_and_bind_verbs_of_a_service_account(server, admin, sa_client):
    """A ServiceAccount allowed to create roles may grant only what it holds (the missing
    rules listed, sorted, verbs of one resource compacted); `escalate` lifts that for roles and
    `bind` (optionally by resourceNames) for bindings; without `bind` a binding to a missing
    role is 404 (GetRoleReferenceRules)."""
    grant(admin, rule(["roles", "rolebindings"], ["create"], groups=(RBAC,)),
          rule(["pods"], ["get", "list"]), name="writer")
    rbac = RbacAuthorizationV1Api(sa_client)
    refused = fails(rbac.create_namespaced_role, "ns", role(
        "more", rule(["pods", "secrets"], ["get", "watch", "delete"])))
    assert refused["message"] == (
        f'roles.rbac.authorization.k8s.io "more" is forbidden: user "{SA_USER}" '
        f"(groups={SA_GROUPS}) is attempting to grant RBAC permissions not currently held:\n"
        '{APIGroups:[""], Resources:["pods"], Verbs:["watch" "delete"]}\n'
        '{APIGroups:[""], Resources:["secrets"], Verbs:["get" "watch" "delete"]}')
    rbac.create_namespaced_role("ns", role("less", rule(["pods"], ["get"])))
    RbacAuthorizationV1Api(admin).create_namespaced_role("ns", role("secrets", rule(
        ["secrets"], ["get"])))
    assert fails(rbac.create_namespaced_role_binding, "ns",
                 binding("b", "secrets", SA))["code"] == 403
    missing = fails(rbac.create_namespaced_role_binding, "ns", binding("b", "missing", SA))
    assert (missing["code"], missing["message"]) == (
        404, 'roles.rbac.authorization.k8s.io "missing" not found')
    rbac.create_namespaced_role_binding("ns", binding("less", "less", SA))
    grant(admin, rule(["roles"], ["escalate"], groups=(RBAC,)),
          rule(["roles"], ["bind"], groups=(RBAC,), resourceNames=["secrets"]), name="power")
    rbac.create_namespaced_role("ns", role("more", rule(["secrets"], ["delete"])))
    rbac.create_namespaced_role_binding("ns", binding("b", "secrets", SA))


# --- server-side apply --------------------------------------------------------------------------

def test_apply_creates_then_updates_and_records_the_manager(server, admin):
    """https://kubernetes.io/docs/reference/using-api/server-side-apply/: an apply creates a
    missing object (201), records managedFields per manager (operation Apply, FieldsV1); lists
    are owned per key (containers by name, container ports by containerPort+protocol with
    protocol's default, imagePullSecrets by name), LabelSelector is atomic, labels granular
    (the OpenAPI x-kubernetes-* markers). Generation moves on spec changes only."""
    created = AppsV1Api(admin).patch_namespaced_deployment(
        "d", "ns", deployment(), field_manager="airfleet", force=True, _content_type=APPLY,
        _preload_content=False)
    assert created.status == 201
    entry = json.loads(created.data)["metadata"]["managedFields"][0]
    assert {k: entry[k] for k in ("manager", "operation", "apiVersion", "fieldsType")} == {
        "manager": "airfleet", "operation": "Apply", "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1"}
    assert entry["fieldsV1"] == {
        "f:metadata": {"f:labels": {"f:app": {}}},
        "f:spec": {"f:replicas": {}, "f:selector": {}, "f:template": {
            "f:metadata": {"f:labels": {"f:app": {}}},
            "f:spec": {"f:containers": {'k:{"name":"main"}': {
                ".": {}, "f:image": {}, "f:name": {}, "f:ports": {
                    'k:{"containerPort":80,"protocol":"TCP"}': {".": {}, "f:containerPort": {}}}}},
                "f:imagePullSecrets": {'k:{"name":"reg"}': {}}}}}}
    updated = apply_deployment(admin, deployment(replicas=3))
    assert updated.spec.replicas == 3 and updated.metadata.generation == 2
    assert apply_deployment(admin, deployment(replicas=3)).metadata.generation == 2


def test_a_no_op_apply_changes_nothing(server, admin):
    """An apply that changes no field and no ownership writes nothing: same resourceVersion,
    no watch event (fieldmanager: the managers' time moves only when the object changes)."""
    first = apply_config_map(admin, config_map(a="1"))
    again = apply_config_map(admin, config_map(a="1"))
    assert again.metadata.resource_version == first.metadata.resource_version
    assert again.metadata.managed_fields[0].time == first.metadata.managed_fields[0].time


def test_apply_requires_a_field_manager_and_force_belongs_to_apply(server, admin):
    """PatchOptions validation (staging/.../apiserver/pkg/apis/meta/v1/validation,
    ValidatePatchOptions): fieldManager is required for apply, force is forbidden on other
    patches; both answer 422 Invalid on PatchOptions."""
    core = CoreV1Api(admin)
    core.create_namespaced_config_map("ns", config_map(a="1"))
    missing = fails(core.patch_namespaced_config_map, "c", "ns", config_map(a="2"),
                    _content_type=APPLY)
    assert (missing["code"], missing["message"]) == (
        422, 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is '
             'required for apply patch')
    assert missing["details"]["causes"] == [{"reason": "FieldValueRequired",
                                             "message": "Required value: is required for apply "
                                                        "patch", "field": "fieldManager"}]
    forced = fails(core.patch_namespaced_config_map, "c", "ns", {"data": {"a": "2"}}, force=True)
    assert forced["message"] == ('PatchOptions.meta.k8s.io "" is invalid: force: Forbidden: may '
                                 'not be specified for non-apply patch')


def test_fields_dropped_from_an_applied_configuration_are_removed(server, admin):
    """"If you remove a field from a manifest and apply that manifest, Server-Side Apply
    checks for any other field managers that also own the field. If the field is not owned
    by any other field managers, it is either deleted from the live object or reset to its
    default value" (server-side-apply docs, Merge strategy). Fields other managers own stay."""
    networking = NetworkingV1Api(admin)
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "i", "namespace": "ns"},
               "spec": {"ingressClassName": "nginx", "defaultBackend": {
                   "service": {"name": "s", "port": {"number": 80}}}}}
    networking.patch_namespaced_ingress("i", "ns", ingress, field_manager="airfleet",
                                        force=True, _content_type=APPLY)
    del ingress["spec"]["ingressClassName"]
    assert networking.patch_namespaced_ingress(
        "i", "ns", ingress, field_manager="airfleet", force=True,
        _content_type=APPLY).spec.ingress_class_name is None
    apply_deployment(admin, deployment(secrets=("reg", "old")))
    AppsV1Api(admin).patch_namespaced_deployment(
        "d", "ns", {"metadata": {"labels": {"team": "x"}}}, field_manager="kubectl-label")
    live = apply_deployment(admin, deployment(secrets=("reg",)))
    assert [s.name for s in live.spec.template.spec.image_pull_secrets] == ["reg"]
    assert live.metadata.labels == {"app": "d", "team": "x"}
    live = apply_deployment(admin, deployment(secrets=()))
    assert live.spec.template.spec.image_pull_secrets is None


def test_a_field_shared_by_two_managers_stays_until_both_drop_it(server, admin):
    """Applying the value another manager holds makes both owners, without conflict; the
    field goes only when no manager owns it ("Conflicts" and "Merge strategy" in the docs)."""
    apply_config_map(admin, config_map(a="1", b="2"), manager="one")
    shared = apply_config_map(admin, config_map(b="2"), manager="two")
    assert shared.data == {"a": "1", "b": "2"}
    assert apply_config_map(admin, config_map(a="1"), manager="one").data == {"a": "1", "b": "2"}
    assert apply_config_map(admin, config_map(), manager="two").data == {"a": "1"}


def test_apply_conflicts_with_another_manager_unless_forced(server, admin):
    """Changing a field another manager owns is a 409 Conflict naming each conflict
    (fieldmanager's NewConflictError: "Apply failed with 1 conflict: conflict with
    \\"kubectl-edit\\" using apps/v1: .spec.replicas", causes of type FieldManagerConflict);
    force=true takes the fields over and the other manager loses them."""
    apply_deployment(admin, deployment(replicas=1))
    AppsV1Api(admin).patch_namespaced_deployment("d", "ns", {"spec": {"replicas": 3}},
                                                 field_manager="kubectl-edit")
    conflict = fails(apply_deployment, admin, deployment(replicas=2), force=False)
    assert (conflict["code"], conflict["reason"]) == (409, "Conflict")
    assert conflict["message"] == ('Apply failed with 1 conflict: conflict with "kubectl-edit" '
                                   'using apps/v1: .spec.replicas')
    assert conflict["details"] == {"causes": [{
        "reason": "FieldManagerConflict", "message": 'conflict with "kubectl-edit" using apps/v1',
        "field": ".spec.replicas"}]}
    assert server.get("Deployment", "d", "ns")["spec"]["replicas"] == 3
    assert apply_deployment(admin, deployment(replicas=2), force=True).spec.replicas == 2
    assert ("kubectl-edit", "Update") not in managers(server.get("Deployment", "d", "ns"))


def test_several_conflicts_are_listed_per_manager(server, admin):
    """getConflictMessage: more than one conflict is listed by manager, one path a line."""
    apply_config_map(admin, config_map(a="1", b="1"), manager="mine")
    CoreV1Api(admin).patch_namespaced_config_map("c", "ns", {"data": {"a": "2", "b": "2"}},
                                                 field_manager="editor")
    conflict = fails(apply_config_map, admin, config_map(a="1", b="1"), manager="mine",
                     force=False)
    assert conflict["message"] == ('Apply failed with 2 conflicts: conflicts with "editor" using '
                                   'v1:\n- .data.a\n- .data.b')
    assert [c["field"] for c in conflict["details"]["causes"]] == [".data.a", ".data.b"]


def test_other_writes_are_recorded_as_update_operations(server, admin, connect):
    """Non-apply writes record operation Update under the fieldManager parameter or, without
    one, the User-Agent up to its first "/" (handlers/rest.go managerOrUserAgent); a map the
    write created is itself owned ("." in FieldsV1)."""
    core = CoreV1Api(admin)
    core.create_namespaced_config_map("ns", config_map(a="1"))
    core.patch_namespaced_config_map("c", "ns", {"data": {"b": "2"}}, field_manager="patcher")
    custom = connect()
    custom.user_agent = "airfleet-tests/1.0 (linux)"
    CoreV1Api(custom).patch_namespaced_config_map("c", "ns", {"data": {"c": "3"}})
    owned = managers(server.get("ConfigMap", "c", "ns"))
    assert owned == {("OpenAPI-Generator", "Update"): {"f:data": {".": {}, "f:a": {}}},
                     ("patcher", "Update"): {"f:data": {"f:b": {}}},
                     ("airfleet-tests", "Update"): {"f:data": {"f:c": {}}}}
    entry = server.get("ConfigMap", "c", "ns")["metadata"]["managedFields"][0]
    assert entry["apiVersion"] == "v1" and entry["fieldsType"] == "FieldsV1" and entry["time"]


def test_objects_written_before_any_manager_get_before_first_apply(server, admin):
    """An object with no managedFields: its fields get the manager "before-first-apply" on
    the first apply (fieldmanager/internal/skipnonapplied.go), so changing them conflicts."""
    server.create(config_map(a="1"))  # the state API records no manager
    conflict = fails(apply_config_map, admin, config_map(a="2"), force=False)
    assert conflict["message"] == ('Apply failed with 1 conflict: conflict with '
                                   '"before-first-apply" using v1: .data.a')


def test_managed_fields_can_be_stripped_and_dry_run_stores_nothing(server, admin):
    """A write with managedFields [{}] strips them ("Clearing managedFields" in the docs);
    dryRun=All answers as if applied and stores nothing."""
    core = CoreV1Api(admin)
    preview = core.patch_namespaced_config_map("c", "ns", config_map(a="1"),
                                               field_manager="airfleet", dry_run="All",
                                               _content_type=APPLY, _preload_content=False)
    assert preview.status == 201 and server.get("ConfigMap", "c", "ns") is None
    apply_config_map(admin, config_map(a="1"))
    core.patch_namespaced_config_map("c", "ns", [{"op": "replace",
                                                  "path": "/metadata/managedFields",
                                                  "value": [{}]}])
    assert "managedFields" not in server.get("ConfigMap", "c", "ns")["metadata"]


def test_kubectl_apply_server_side(server, kubectl):
    """`kubectl apply --server-side` (manager "kubectl") creates and updates, fails on a
    conflict and takes fields over with --force-conflicts; --show-managed-fields shows the
    entries (https://kubernetes.io/docs/reference/using-api/server-side-apply/)."""
    manifest = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: ns}\n"
                "data: {a: '1', b: '2'}\n")
    assert kubectl("apply", "--server-side", "-f", "-", stdin=manifest).stdout.strip() == \
        "configmap/c serverside-applied"
    kubectl("-n", "ns", "patch", "configmap", "c", "-p", '{"data": {"a": "9"}}')
    conflict = kubectl("apply", "--server-side", "-f", "-", stdin=manifest, check=False)
    assert conflict.returncode == 1
    assert conflict.stderr.startswith('error: Apply failed with 1 conflict: conflict with '
                                      '"kubectl-patch" using v1: .data.a')
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=manifest)
    kubectl("apply", "--server-side", "-f", "-", stdin=manifest.replace(", b: '2'", ""))
    live = json.loads(kubectl("-n", "ns", "get", "configmap", "c", "-o", "json",
                              "--show-managed-fields").stdout)
    assert live["data"] == {"a": "1"}
    assert [(m["manager"], m["operation"], m["fieldsV1"]) for m in
            live["metadata"]["managedFields"]] == [("kubectl", "Apply", {"f:data": {"f:a": {}}})]


# --- immutable fields ---------------------------------------------------------------------------

def test_a_claims_spec_is_immutable_but_a_bound_claim_may_grow(server, admin):
    """ValidatePersistentVolumeClaimUpdate (pkg/apis/core/validation/validation.go): the spec
    is immutable but resources.requests of a bound claim; a smaller request than
    status.capacity is refused (RecoverVolumeExpansionFailure, beta since v1.32). 422, nothing
    stored."""
    core = CoreV1Api(admin)
    core.create_namespaced_persistent_volume_claim("ns", {"metadata": {"name": "data"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
        "resources": {"requests": {"storage": "1Gi"}}}})
    refused = fails(core.patch_namespaced_persistent_volume_claim, "data", "ns",
                    {"spec": {"storageClassName": "fast"}})
    assert refused["code"] == 422 and refused["reason"] == "Invalid"
    assert refused["message"].startswith(
        'PersistentVolumeClaim "data" is invalid: spec: Forbidden: spec is immutable after '
        'creation except resources.requests for bound claims\n')
    assert refused["details"]["causes"][0]["field"] == "spec"
    assert fails(core.patch_namespaced_persistent_volume_claim, "data", "ns",
                 {"spec": {"accessModes": ["ReadWriteMany"]}})["code"] == 422
    grow = {"spec": {"resources": {"requests": {"storage": "2Gi"}}}}
    assert fails(core.patch_namespaced_persistent_volume_claim, "data", "ns", grow)["code"] == 422
    claim = server.get("PersistentVolumeClaim", "data", "ns")
    server.update({**claim, "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}})
    grown = core.patch_namespaced_persistent_volume_claim("data", "ns", grow)
    assert grown.spec.resources.requests == {"storage": "2Gi"}
    shrink = fails(core.patch_namespaced_persistent_volume_claim, "data", "ns",
                   {"spec": {"resources": {"requests": {"storage": "512Mi"}}}})
    assert shrink["message"] == ('PersistentVolumeClaim "data" is invalid: '
                                 'spec.resources.requests.storage: Forbidden: field can not be '
                                 'less than status.capacity')
    assert server.get("PersistentVolumeClaim", "data", "ns")["spec"]["resources"] == \
        {"requests": {"storage": "2Gi"}}


def test_a_deployments_selector_is_immutable(server, admin):
    """apps/v1 Deployment spec.selector is immutable (pkg/registry/apps/deployment/strategy.go
    ValidateUpdate, ValidateImmutableField: "field is immutable", the value printed with %#v),
    whichever way the update comes."""
    apply_deployment(admin, deployment())
    changed = deployment()
    changed["spec"]["selector"] = {"matchLabels": {"app": "d", "tier": "web"}}
    changed["spec"]["template"]["metadata"]["labels"]["tier"] = "web"
    expected = ('Deployment.apps "d" is invalid: spec.selector: Invalid value: '
                'v1.LabelSelector{MatchLabels:map[string]string{"app":"d", "tier":"web"}, '
                'MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: field is immutable')
    refused = fails(apply_deployment, admin, changed)
    assert (refused["code"], refused["message"]) == (422, expected)
    assert refused["details"]["causes"] == [{
        "reason": "FieldValueInvalid", "field": "spec.selector",
        "message": expected.split("spec.selector: ", 1)[1]}]
    assert fails(AppsV1Api(admin).replace_namespaced_deployment, "d", "ns",
                 changed)["message"] == expected
    assert server.get("Deployment", "d", "ns")["spec"]["selector"] == {"matchLabels": {"app": "d"}}


def test_a_services_cluster_ip_may_not_change_once_set(server, admin):
    """validateUpgradeDowngradeClusterIPs: clusterIPs "may not change once set"; an update
    omitting clusterIP keeps the allocated one (service storage patchAllocatedValues)."""
    core = CoreV1Api(admin)
    made = core.create_namespaced_service("ns", {"metadata": {"name": "s"}, "spec": {
        "ports": [{"port": 80}]}})
    ip = made.spec.cluster_ip
    assert made.spec.cluster_ips == [ip]
    kept = core.replace_namespaced_service("s", "ns", {"metadata": {"name": "s"}, "spec": {
        "ports": [{"port": 81}]}})
    assert (kept.spec.cluster_ip, kept.spec.cluster_ips) == (ip, [ip])
    refused = fails(core.patch_namespaced_service, "s", "ns", {"spec": {"clusterIP": "10.96.9.9"}})
    assert refused["message"] == ('Service "s" is invalid: spec.clusterIPs[0]: Invalid value: '
                                  '[]string{"10.96.9.9"}: may not change once set')


def test_a_bindings_role_ref_cannot_change(server, admin):
    """ValidateRoleBindingUpdate (pkg/apis/rbac/validation/validation.go): "cannot change
    roleRef", for RoleBindings and ClusterRoleBindings alike."""
    rbac = RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role_binding("ns", binding("b", "first", SA))
    refused = fails(rbac.replace_namespaced_role_binding, "b", "ns", binding("b", "second", SA))
    assert refused["message"] == (
        'RoleBinding.rbac.authorization.k8s.io "b" is invalid: roleRef: Invalid value: '
        'rbac.RoleRef{APIGroup:"rbac.authorization.k8s.io", Kind:"Role", Name:"second"}: '
        'cannot change roleRef')
    rbac.create_cluster_role_binding(binding("cb", "first", SA, kind="ClusterRoleBinding",
                                             role_kind="ClusterRole"))
    applied = fails(rbac.patch_cluster_role_binding, "cb", binding(
        "cb", "second", SA, kind="ClusterRoleBinding", role_kind="ClusterRole"),
        field_manager="airfleet", force=True, _content_type=APPLY)
    assert applied["code"] == 422 and applied["message"].endswith("cannot change roleRef")
