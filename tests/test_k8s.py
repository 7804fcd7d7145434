"""cdimover.cdi.k8s: clone manifests, CDI's clone validation, and the offline RBAC evaluator."""

from __future__ import annotations

import json
import random
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cdimover.errors import CloneValidationError
from cdimover.cdi.k8s import (
    ANN_PERMISSIVE_CLONE,
    CloneRequest,
    SourceInfo,
    allowed,
    can_clone,
    clone_rbac_manifests,
    clone_requests,
    service_account_username,
    subject_access_review,
    validate_clone,
)
from cdimover.sizing import required_space, usable_space

MiB, GiB = 1 << 20, 1 << 30

Obj = dict[str, Any]


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# =================================================================================================
# Manifests


DV_PVC = y("""
    apiVersion: cdi.kubevirt.io/v1beta1
    kind: DataVolume
    metadata:
      name: cloned-datavolume
      namespace: vms
      annotations:
        cdi.kubevirt.io/storage.bind.immediate.requested: "true"
    spec:
      source:
        pvc:
          namespace: golden
          name: source-datavolume
      pvc:
        accessModes:
          - ReadWriteOnce
        volumeMode: Block
        resources:
          requests:
            storage: 500Mi
    """)


def test_datavolume_with_pvc() -> None:
    [r] = clone_requests(DV_PVC)
    assert r == CloneRequest(
        source_namespace="golden", source_name="source-datavolume",
        target_namespace="vms", target_name="cloned-datavolume",
        size=500 * MiB, access_modes=("ReadWriteOnce",), volume_mode="Block",
        content_type="kubevirt", preallocation=False,
        annotations=(("cdi.kubevirt.io/storage.bind.immediate.requested", "true"),))
    assert r.annotation_map["cdi.kubevirt.io/storage.bind.immediate.requested"] == "true"
    assert r.cross_namespace
    hash(r)


def test_datavolume_with_storage_defaults() -> None:
    [r] = clone_requests(y("""
        apiVersion: cdi.kubevirt.io/v1beta1
        kind: DataVolume
        metadata:
          name: copy
        spec:
          source:
            pvc:
              name: disk
          storage: {}
        """), default_namespace="team-a")
    # no size: CDI sizes the target from the source; namespaces default to the target's
    assert (r.size, r.volume_mode, r.access_modes) == (None, None, ())
    assert (r.source_namespace, r.target_namespace) == ("team-a", "team-a")
    assert (r.content_type, r.preallocation, r.annotations) == ("kubevirt", False, ())
    assert not r.cross_namespace


def test_datavolume_storage_fields_archive_preallocation() -> None:
    [r] = clone_requests(y("""
        apiVersion: cdi.kubevirt.io/v1beta1
        kind: DataVolume
        metadata: {name: files, namespace: ns1}
        spec:
          contentType: archive
          preallocation: true
          source: {pvc: {name: src, namespace: ns2}}
          storage:
            accessModes: [ReadWriteMany]
            volumeMode: Filesystem
            resources: {requests: {storage: 1.5Gi}}
        """))
    assert (r.content_type, r.preallocation, r.size) == ("archive", True, 3 * GiB // 2)
    assert (r.access_modes, r.volume_mode) == (("ReadWriteMany",), "Filesystem")


@pytest.mark.parametrize("storage, size", [
    ("10Gi", 10 * GiB),
    ("1G", 10**9),
    ("1e9", 10**9),
    ("1E3", 1000),
    ("0.5Ki", 512),
    ("1500m", 2),
    ("'1073741824'", GiB),
    ("1073741824", GiB),        # a YAML int
    ("1.5", 2),                 # a YAML float, rounded up like Quantity.Value()
])
def test_size_quantities(storage: str, size: int) -> None:
    text = DV_PVC.replace("storage: 500Mi", f"storage: {storage}")
    [r] = clone_requests(text)
    assert r.size == size


def test_virtual_machine_templates() -> None:
    reqs = clone_requests(y("""
        apiVersion: kubevirt.io/v1
        kind: VirtualMachine
        metadata:
          name: vm1
          namespace: vms
        spec:
          running: false
          dataVolumeTemplates:
            - metadata:
                name: vm1-root
                annotations: {cdi.kubevirt.io/permissiveClone: "true"}
              spec:
                source:
                  pvc: {name: fedora-golden, namespace: golden}
                storage:
                  resources: {requests: {storage: 30Gi}}
            - metadata:
                name: vm1-scratch
              spec:
                source:
                  blank: {}
                storage:
                  resources: {requests: {storage: 1Gi}}
            - metadata:
                name: vm1-data
              spec:
                source:
                  pvc: {name: data-golden}
                pvc:
                  accessModes: [ReadWriteOnce]
                  resources: {requests: {storage: 2Gi}}
          template:
            spec: {domain: {devices: {}}}
        """))
    assert [(r.target_namespace, r.target_name, r.source_namespace, r.source_name, r.size)
            for r in reqs] == [
        ("vms", "vm1-root", "golden", "fedora-golden", 30 * GiB),
        ("vms", "vm1-data", "vms", "data-golden", 2 * GiB),   # source ns defaults to the VM's
    ]
    assert reqs[0].annotation_map == {ANN_PERMISSIVE_CLONE: "true"}


def test_multi_document_skips_other_kinds() -> None:
    text = "\n---\n".join([
        y("""
          apiVersion: v1
          kind: ConfigMap
          metadata: {name: cm}
          data: {a: b}
          """),
        DV_PVC,
        y("""
          apiVersion: cdi.kubevirt.io/v1beta1
          kind: DataVolume
          metadata: {name: imported}
          spec:
            source: {http: {url: "https://example.com/disk.img"}}
            storage: {resources: {requests: {storage: 1Gi}}}
          """),
        y("""
          apiVersion: cdi.kubevirt.io/v1beta1
          kind: DataVolume
          metadata: {name: from-source-ref}
          spec:
            sourceRef: {kind: DataSource, name: fedora}
            storage: {}
          """),
        "",               # an empty document
        "just a string",  # a scalar document
        y("""
          apiVersion: v1
          kind: PersistentVolumeClaim
          metadata: {name: pvc}
          spec:
            source: {pvc: {name: not-a-datavolume}}
          """),
        y("""
          apiVersion: cdi.kubevirt.io/v1beta1
          kind: DataVolume
          metadata: {name: second, namespace: other}
          spec:
            source: {pvc: {name: disk2, namespace: golden}}
            storage: {resources: {requests: {storage: 3Gi}}}
          """),
    ])
    reqs = clone_requests(text)
    assert [(r.target_namespace, r.target_name) for r in reqs] == [
        ("vms", "cloned-datavolume"), ("other", "second")]


def test_list_kind() -> None:
    doc = {"apiVersion": "v1", "kind": "List",
           "items": [yaml.safe_load(DV_PVC), {"kind": "Service"}]}
    [r] = clone_requests(yaml.safe_dump(doc))
    assert r.target_name == "cloned-datavolume"


BASE: Obj = yaml.safe_load(DV_PVC)


def _with(path: str, value: Any) -> str:
    """BASE with the field at dotted PATH set to VALUE (or deleted when VALUE is ...)."""
    doc = json.loads(json.dumps(BASE))
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is ...:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("path, value, field", [
    ("metadata.name", ..., "metadata.name"),
    ("metadata.name", "", "metadata.name"),
    ("metadata.name", "Not_Valid", "metadata.name"),
    ("metadata.name", 7, "metadata.name"),
    ("metadata", ..., "metadata"),
    ("metadata.namespace", "UPPER", "metadata.namespace"),
    ("metadata.annotations", ["a"], "metadata.annotations"),
    ("metadata.annotations.flag", True, "metadata.annotations.flag"),
    ("spec", ..., "spec"),
    ("spec", "text", "spec"),
    ("spec.source.pvc", "disk", "spec.source.pvc"),
    ("spec.source.pvc.name", ..., "spec.source.pvc.name"),
    ("spec.source.pvc.namespace", 5, "spec.source.pvc.namespace"),
    ("spec.source.http", {"url": "https://x"}, "spec.source"),
    ("spec.storage", {"resources": {"requests": {"storage": "1Gi"}}}, "spec"),
    ("spec.pvc", ..., "spec.pvc"),
    ("spec.pvc", [1], "spec.pvc"),
    ("spec.pvc.resources.requests.storage", "10GB", "spec.pvc.resources.requests.storage"),
    ("spec.pvc.resources.requests.storage", "-1Gi", "spec.pvc.resources.requests.storage"),
    ("spec.pvc.resources.requests.storage", "0", "spec.pvc.resources.requests.storage"),
    ("spec.pvc.resources.requests.storage", True, "spec.pvc.resources.requests.storage"),
    ("spec.pvc.resources.requests.storage", ..., "spec.pvc.resources.requests.storage"),
    ("spec.pvc.resources.requests", "10Gi", "spec.pvc.resources.requests"),
    ("spec.pvc.resources", ..., "spec.pvc.resources.requests.storage"),
    ("spec.pvc.volumeMode", "block", "spec.pvc.volumeMode"),
    ("spec.pvc.volumeMode", 1, "spec.pvc.volumeMode"),
    ("spec.pvc.accessModes", "ReadWriteOnce", "spec.pvc.accessModes"),
    ("spec.pvc.accessModes", ["ReadWriteSometimes"], "spec.pvc.accessModes[0]"),
    ("spec.contentType", "raw", "spec.contentType"),
    ("spec.contentType", 1, "spec.contentType"),
    ("spec.preallocation", "yes", "spec.preallocation"),
])
def test_invalid_fields_name_the_path(path: str, value: Any, field: str) -> None:
    with pytest.raises(CloneValidationError) as info:
        clone_requests(_with(path, value))
    assert str(info.value).startswith(f"{field}: "), str(info.value)
    assert "document 1" in str(info.value)


def test_error_is_a_value_error_naming_the_quantity() -> None:
    with pytest.raises(ValueError, match=r"^spec\.pvc\.resources\.requests\.storage: .*'10GB'"):
        clone_requests(_with("spec.pvc.resources.requests.storage", "10GB"))


def test_vm_template_errors_name_the_template() -> None:
    text = y("""
        apiVersion: kubevirt.io/v1
        kind: VirtualMachine
        metadata: {name: vm1, namespace: vms}
        spec:
          dataVolumeTemplates:
            - metadata: {name: ok}
              spec:
                source: {pvc: {name: a}}
                storage: {}
            - metadata: {}
              spec:
                source: {pvc: {name: b}}
                storage: {}
        """)
    with pytest.raises(CloneValidationError,
                       match=r"^spec\.dataVolumeTemplates\[1\]\.metadata\.name: required"):
        clone_requests(text)
    other_ns = text.replace("metadata: {name: ok}", "metadata: {name: ok, namespace: x}")
    with pytest.raises(CloneValidationError,
                       match=r"^spec\.dataVolumeTemplates\[0\]\.metadata\.namespace: "):
        clone_requests(other_ns)
    not_list = "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: {name: v}\n" \
               "spec: {dataVolumeTemplates: {}}\n"
    with pytest.raises(CloneValidationError, match=r"^spec\.dataVolumeTemplates: "):
        clone_requests(not_list)


@pytest.mark.parametrize("text", [
    "kind: DataVolume\n  bad: [indent",
    "a: b\n- c",
    "{unclosed",
    "key: \"unterminated",
])
def test_yaml_syntax_errors(text: str) -> None:
    with pytest.raises(CloneValidationError, match="invalid YAML"):
        clone_requests(text)


def test_default_namespace_checked() -> None:
    with pytest.raises(ValueError):
        clone_requests(DV_PVC, default_namespace="Bad_NS")


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5)
    | st.sampled_from(["DataVolume", "cdi.kubevirt.io/v1beta1", "pvc", "storage", "10Gi"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["apiVersion", "kind", "metadata", "name", "namespace", "spec",
                         "source", "pvc", "storage", "resources", "requests", "volumeMode",
                         "contentType", "accessModes", "annotations", "dataVolumeTemplates",
                         "items", "preallocation"]), children, max_size=5),
    max_leaves=25))
def test_junk_manifests_never_crash(doc: Any) -> None:
    for variant in (doc, {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                          "metadata": {"name": "x"}, "spec": doc},
                    {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                     "metadata": {"name": "x"}, "spec": {"dataVolumeTemplates": [doc]}}):
        try:
            result = clone_requests(yaml.safe_dump(variant))
        except CloneValidationError:
            continue
        assert all(isinstance(r, CloneRequest) for r in result)


# =================================================================================================
# validate_clone


def req(size: int | None, mode: str | None = "Filesystem", content: str = "kubevirt",
        annotations: tuple[tuple[str, str], ...] = ()) -> CloneRequest:
    return CloneRequest("golden", "src", "vms", "dst", size, ("ReadWriteOnce",), mode, content,
                        False, annotations)


def test_valid_same_mode() -> None:
    src = SourceInfo("Filesystem", 10 * GiB)
    assert validate_clone(req(required_space(10 * GiB)), src) == []
    assert validate_clone(req(10 * GiB, "Block"), SourceInfo("Block", 10 * GiB)) == []


def test_kubevirt_cross_mode_allowed() -> None:
    assert validate_clone(req(20 * GiB, "Filesystem"), SourceInfo("Block", 10 * GiB)) == []
    assert validate_clone(req(10 * GiB, "Block"), SourceInfo("Filesystem", 10 * GiB)) == []


def test_archive_mode_mismatch() -> None:
    problems = validate_clone(req(20 * GiB, "Block", "archive"),
                              SourceInfo("Filesystem", GiB, "archive"))
    assert "source volumeMode (Filesystem) and target volumeMode (Block) do not match, " \
           "contentType (archive)" in problems
    assert any(p.startswith("ContentType Archive cannot have block volumeMode") for p in problems)
    # an unspecified target mode is Filesystem: archive Filesystem -> Filesystem is fine
    assert validate_clone(req(20 * GiB, None, "archive"),
                          SourceInfo("Filesystem", GiB, "archive")) == []
    # archive can never be Block, even Block -> Block
    assert any(p.startswith("ContentType Archive cannot have block volumeMode")
               for p in validate_clone(req(20 * GiB, "Block", "archive"),
                                       SourceInfo("Block", GiB, "archive")))


def test_content_type_mismatch() -> None:
    problems = validate_clone(req(20 * GiB, content="archive"), SourceInfo("Filesystem", GiB))
    assert problems == ["Source contentType (kubevirt) and target contentType (archive) "
                        "do not match"]


def test_size_overhead_filesystem_vs_block() -> None:
    src = SourceInfo("Block", 10 * GiB)
    # 10 GiB of Filesystem volume has only 9660 MiB usable with 6 % overhead
    [problem] = validate_clone(req(10 * GiB, "Filesystem"), src)
    assert problem.startswith("target resources requests storage size is smaller than the source")
    assert "9.4 GiB" in problem and "10.0 GiB" in problem
    # the same size as a Block volume holds it
    assert validate_clone(req(10 * GiB, "Block"), src) == []
    # an unspecified mode is Filesystem
    assert len(validate_clone(req(10 * GiB, None), src)) == 1
    # with no overhead it fits on Filesystem too
    assert validate_clone(req(10 * GiB, "Filesystem"), src, filesystem_overhead=0) == []
    # required_space() sizes a volume that holds it; the ceil() inside usable_space() makes
    # the smallest such size 11381663334 (ceil(11381663334 / 1.06) = 10 GiB), one byte less
    need = required_space(10 * GiB)
    assert validate_clone(req(need), src) == []
    assert usable_space(11_381_663_334) == 10 * GiB
    assert validate_clone(req(11_381_663_334), src) == []
    assert usable_space(11_381_663_333) < 10 * GiB
    assert len(validate_clone(req(11_381_663_333), src)) == 1
    # Block: one byte short fails
    assert len(validate_clone(req(10 * GiB - 1, "Block"), src)) == 1


def test_permissive_clone_skips_size_check() -> None:
    src = SourceInfo("Filesystem", 10 * GiB)
    small = req(GiB, annotations=((ANN_PERMISSIVE_CLONE, "true"),))
    assert validate_clone(small, src) == []
    # CDI tests the annotation's presence, not its value
    assert validate_clone(req(GiB, annotations=((ANN_PERMISSIVE_CLONE, ""),)), src) == []
    # other rules still apply
    assert len(validate_clone(req(GiB, "Block", "archive", ((ANN_PERMISSIVE_CLONE, "true"),)),
                              SourceInfo("Filesystem", GiB, "archive"))) == 2


def test_unspecified_size_is_taken_from_source() -> None:
    assert validate_clone(req(None), SourceInfo("Block", 100 * GiB)) == []


def test_validate_from_parsed_manifest() -> None:
    [r] = clone_requests(DV_PVC)  # Block, 500Mi
    assert validate_clone(r, SourceInfo("Filesystem", 500 * MiB)) == []
    assert len(validate_clone(r, SourceInfo("Filesystem", 500 * MiB + 1))) == 1


def test_bad_overhead_raises() -> None:
    with pytest.raises(ValueError):
        validate_clone(req(GiB), SourceInfo("Filesystem", 1), filesystem_overhead=1.5)


@pytest.mark.parametrize("kwargs", [
    {"volume_mode": "block", "virtual_size": 1},
    {"volume_mode": "Block", "virtual_size": -1},
    {"volume_mode": "Block", "virtual_size": 1.0},
    {"volume_mode": "Block", "virtual_size": True},
    {"volume_mode": "Block", "virtual_size": 1, "content_type": "raw"},
    {"volume_mode": "Block", "virtual_size": 1, "capacity": -5},
])
def test_source_info_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SourceInfo(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"size": -1}, {"size": 1.5}, {"volume_mode": "block"}, {"content_type": "Kubevirt"},
])
def test_clone_request_validates(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = dict(source_namespace="a", source_name="b", target_namespace="c",
                                target_name="d", size=1)
    with pytest.raises(ValueError):
        CloneRequest(**{**base, **kwargs})


# =================================================================================================
# RBAC


SRC, TGT = "golden", "vms"
TARGET_SA = service_account_username(TGT, "default")
OTHER_NS_SA = service_account_username("elsewhere", "default")
OTHER_SA = service_account_username(TGT, "builder")


def cluster_role(name: str = "datavolume-cloner", *, verbs: Iterable[str] = ("*",),
                 groups: Iterable[str] = ("cdi.kubevirt.io",),
                 resources: Iterable[str] = ("datavolumes/source",),
                 names: Iterable[str] | None = None, labels: Mapping[str, str] | None = None,
                 kind: str = "ClusterRole", namespace: str | None = None) -> Obj:
    rule: Obj = {"apiGroups": list(groups), "resources": list(resources), "verbs": list(verbs)}
    if names is not None:
        rule["resourceNames"] = list(names)
    meta: Obj = {"name": name}
    if labels:
        meta["labels"] = dict(labels)
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
            "rules": [rule]}


def sa(ns: str | None = TGT, name: str = "default") -> Obj:
    s: Obj = {"kind": "ServiceAccount", "name": name}
    if ns is not None:
        s["namespace"] = ns
    return s


def group(name: str) -> Obj:
    return {"kind": "Group", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def user(name: str) -> Obj:
    return {"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def role_binding(*subjects: Obj, ns: str = SRC, role: str = "datavolume-cloner",
                 role_kind: str = "ClusterRole") -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "b", "namespace": ns}, "subjects": list(subjects),
            "roleRef": {"kind": role_kind, "name": role, "apiGroup": "rbac.authorization.k8s.io"}}


def cluster_role_binding(*subjects: Obj, role: str = "datavolume-cloner") -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "cb"}, "subjects": list(subjects),
            "roleRef": {"kind": "ClusterRole", "name": role,
                        "apiGroup": "rbac.authorization.k8s.io"}}


SEED = [cluster_role(), role_binding(sa())]

# (id, objects, user, groups, expected); each id says which RBAC rule decides.
RBAC_TABLE: list[tuple[str, list[Obj], str, tuple[str, ...], bool]] = [
    # The seed: ClusterRole on datavolumes/source bound in the source namespace to the target
    # namespace's default ServiceAccount.
    ("seed-allows-target-sa", SEED, TARGET_SA, (), True),
    # ServiceAccount subjects match namespace AND name.
    ("seed-denies-other-sa-name", SEED, OTHER_SA, (), False),
    ("seed-denies-same-name-other-namespace", SEED, OTHER_NS_SA, (), False),
    ("seed-denies-plain-user", SEED, "default", (), False),
    # A RoleBinding grants only in its own namespace: bound in the target namespace, no grant
    # in the source namespace.
    ("binding-in-wrong-namespace", [cluster_role(), role_binding(sa(), ns=TGT)], TARGET_SA, (),
     False),
    # Verbs must contain "create" or "*".
    ("verb-get-only", [cluster_role(verbs=["get", "list"]), role_binding(sa())], TARGET_SA, (),
     False),
    ("verb-create", [cluster_role(verbs=["create"]), role_binding(sa())], TARGET_SA, (), True),
    # apiGroups must contain cdi.kubevirt.io or "*".
    ("wrong-group-core", [cluster_role(groups=[""]), role_binding(sa())], TARGET_SA, (), False),
    ("wrong-group-kubevirt", [cluster_role(groups=["kubevirt.io"]), role_binding(sa())],
     TARGET_SA, (), False),
    # "datavolumes" does not grant the subresource "datavolumes/source".
    ("datavolumes-without-subresource", [cluster_role(resources=["datavolumes"]),
                                         role_binding(sa())], TARGET_SA, (), False),
    # Kubernetes has no "resource/*" wildcard.
    ("resource-slash-star-is-literal", [cluster_role(resources=["datavolumes/*"]),
                                        role_binding(sa())], TARGET_SA, (), False),
    # "*/source" matches the subresource of any resource.
    ("star-slash-subresource", [cluster_role(resources=["*/source"]), role_binding(sa())],
     TARGET_SA, (), True),
    ("star-slash-other-subresource", [cluster_role(resources=["*/status"]), role_binding(sa())],
     TARGET_SA, (), False),
    # Full wildcards.
    ("wildcards-everything", [cluster_role(verbs=["*"], groups=["*"], resources=["*"]),
                              role_binding(sa())], TARGET_SA, (), True),
    ("wildcard-group-only", [cluster_role(groups=["*"]), role_binding(sa())], TARGET_SA, (), True),
    # Group subjects: a ServiceAccount is implicitly in system:serviceaccounts,
    # system:serviceaccounts:<ns> and system:authenticated.
    ("group-serviceaccounts-of-target-ns",
     [cluster_role(), role_binding(group(f"system:serviceaccounts:{TGT}"))], TARGET_SA, (), True),
    ("group-serviceaccounts-of-target-ns-other-sa",
     [cluster_role(), role_binding(group(f"system:serviceaccounts:{TGT}"))], OTHER_SA, (), True),
    ("group-serviceaccounts-of-target-ns-other-ns",
     [cluster_role(), role_binding(group(f"system:serviceaccounts:{TGT}"))], OTHER_NS_SA, (),
     False),
    ("group-all-serviceaccounts", [cluster_role(), role_binding(group("system:serviceaccounts"))],
     OTHER_NS_SA, (), True),
    ("group-all-serviceaccounts-not-a-user",
     [cluster_role(), role_binding(group("system:serviceaccounts"))], "joe", (), False),
    ("group-authenticated", [cluster_role(), role_binding(group("system:authenticated"))],
     TARGET_SA, (), True),
    ("group-given-explicitly", [cluster_role(), role_binding(group("storage-admins"))], "alice",
     ("storage-admins",), True),
    ("group-not-held", [cluster_role(), role_binding(group("storage-admins"))], "alice",
     ("devs",), False),
    # User subjects match the exact, case-sensitive name.
    ("user-subject", [cluster_role(), role_binding(user("joe"))], "joe", (), True),
    ("user-subject-case", [cluster_role(), role_binding(user("joe"))], "Joe", (), False),
    # A ClusterRoleBinding grants its ClusterRole in every namespace.
    ("cluster-role-binding", [cluster_role(), cluster_role_binding(sa())], TARGET_SA, (), True),
    # A ServiceAccount subject without a namespace takes the RoleBinding's namespace (appliesToUser)
    # ...
    ("sa-subject-defaults-to-binding-ns", [cluster_role(), role_binding(sa(None))],
     service_account_username(SRC, "default"), (), True),
    ("sa-subject-default-ns-is-not-target", [cluster_role(), role_binding(sa(None))], TARGET_SA,
     (), False),
    # ... and matches nobody in a ClusterRoleBinding, which has no namespace.
    ("sa-subject-without-ns-in-crb", [cluster_role(), cluster_role_binding(sa(None))], TARGET_SA,
     (), False),
    # A RoleBinding's Role is looked up in the binding's namespace: a Role in another namespace
    # does not apply.
    ("rolebinding-to-role-in-other-namespace",
     [cluster_role("cloner", kind="Role", namespace=TGT),
      role_binding(sa(), role="cloner", role_kind="Role")], TARGET_SA, (), False),
    ("rolebinding-to-role-in-same-namespace",
     [cluster_role("cloner", kind="Role", namespace=SRC),
      role_binding(sa(), role="cloner", role_kind="Role")], TARGET_SA, (), True),
    # A binding to a role that does not exist grants nothing.
    ("rolebinding-to-missing-clusterrole", [role_binding(sa())], TARGET_SA, (), False),
    # A ClusterRoleBinding can only reference a ClusterRole; a roleRef to a Role grants nothing.
    ("clusterrolebinding-to-role",
     [cluster_role("cloner", kind="Role", namespace=SRC),
      {**cluster_role_binding(sa()), "roleRef": {"kind": "Role", "name": "cloner",
                                                 "apiGroup": "rbac.authorization.k8s.io"}}],
     TARGET_SA, (), False),
    # resourceNames restrict the rule to named objects; can_clone without a source name asks
    # without one, which such a rule does not match.
    ("resource-names-without-name", [cluster_role(names=["fedora-golden"]), role_binding(sa())],
     TARGET_SA, (), False),
    ("resource-names-empty-list", [cluster_role(names=[]), role_binding(sa())], TARGET_SA, (),
     True),
    # CDI's second review: create pods (core group) in the source namespace also allows.
    ("pods-create-fallback", [cluster_role(groups=[""], resources=["pods"], verbs=["create"]),
                              role_binding(sa())], TARGET_SA, (), True),
    ("pods-get-not-enough", [cluster_role(groups=[""], resources=["pods"], verbs=["get"]),
                             role_binding(sa())], TARGET_SA, (), False),
    ("pods-in-wrong-group", [cluster_role(groups=["apps"], resources=["pods"]),
                             role_binding(sa())], TARGET_SA, (), False),
    # Aggregated ClusterRoles gain the rules of the ClusterRoles their selectors match.
    ("aggregated-role",
     [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
       "metadata": {"name": "admin"},
       "aggregationRule": {"clusterRoleSelectors": [
           {"matchLabels": {"rbac.authorization.k8s.io/aggregate-to-admin": "true"}}]},
       "rules": []},
      cluster_role("cdi.kubevirt.io:admin", verbs=["create"],
                   labels={"rbac.authorization.k8s.io/aggregate-to-admin": "true"}),
      role_binding(sa(), role="admin")], TARGET_SA, (), True),
    ("aggregated-role-label-mismatch",
     [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
       "metadata": {"name": "admin"},
       "aggregationRule": {"clusterRoleSelectors": [
           {"matchExpressions": [{"key": "rbac.authorization.k8s.io/aggregate-to-admin",
                                  "operator": "In", "values": ["true"]}]}]}},
      cluster_role("cdi.kubevirt.io:admin", verbs=["create"],
                   labels={"rbac.authorization.k8s.io/aggregate-to-admin": "false"}),
      role_binding(sa(), role="admin")], TARGET_SA, (), False),
    # Objects of other API groups are not RBAC objects.
    ("clusterrole-wrong-apiversion",
     [{**cluster_role(), "apiVersion": "v1"}, role_binding(sa())], TARGET_SA, (), False),
    # A roleRef must name the RBAC API group.
    ("roleref-without-apigroup",
     [cluster_role(), {**role_binding(sa()), "roleRef": {"kind": "ClusterRole",
                                                        "name": "datavolume-cloner"}}],
     TARGET_SA, (), False),
    # Wrapped in a List, as `kubectl get -o yaml` prints them.
    ("list-wrapper", [{"apiVersion": "v1", "kind": "List", "items": SEED}], TARGET_SA, (), True),
    ("no-objects", [], TARGET_SA, (), False),
]


@pytest.mark.parametrize("objects, who, groups, expected",
                         [case[1:] for case in RBAC_TABLE], ids=[case[0] for case in RBAC_TABLE])
def test_can_clone_table(objects: list[Obj], who: str, groups: tuple[str, ...],
                         expected: bool) -> None:
    assert can_clone(who, SRC, objects, groups=groups) is expected
    # order never matters, and a one-shot iterator works
    assert can_clone(who, SRC, reversed(objects), groups=groups) is expected
    assert can_clone(who, SRC, iter(objects), groups=groups) is expected


def test_cluster_role_binding_applies_in_every_namespace() -> None:
    objects = [cluster_role(), cluster_role_binding(sa())]
    assert all(can_clone(TARGET_SA, ns, objects) for ns in ("golden", "default", "x"))
    # a RoleBinding does not
    assert not can_clone(TARGET_SA, "default", SEED)


def test_resource_names_with_source_name() -> None:
    objects = [cluster_role(names=["fedora-golden"]), role_binding(sa())]
    assert can_clone(TARGET_SA, SRC, objects, source_name="fedora-golden")
    assert not can_clone(TARGET_SA, SRC, objects, source_name="windows-golden")
    assert not can_clone(TARGET_SA, SRC, objects)


def test_same_namespace_needs_no_rbac() -> None:
    # CDI skips the reviews when the target is in the source namespace.
    assert can_clone(TARGET_SA, SRC, [], target_namespace=SRC)
    assert not can_clone(TARGET_SA, SRC, [], target_namespace=TGT)


def test_allowed_general_requests() -> None:
    reader = cluster_role("pod-reader", kind="Role", namespace="ns1", groups=[""],
                          resources=["pods", "pods/log"], verbs=["get", "list"])
    objects = [reader, role_binding(user("ann"), ns="ns1", role="pod-reader", role_kind="Role")]
    assert allowed("ann", (), "get", "", "pods", "", "ns1", objects=objects)
    assert allowed("ann", (), "list", "", "pods", "log", "ns1", name="p", objects=objects)
    assert not allowed("ann", (), "get", "", "pods", "exec", "ns1", objects=objects)
    assert not allowed("ann", (), "delete", "", "pods", "", "ns1", objects=objects)
    assert not allowed("ann", (), "get", "", "pods", "", "ns2", objects=objects)
    # a cluster-scoped request ("" namespace) sees ClusterRoleBindings only
    assert not allowed("ann", (), "get", "", "pods", "", "", objects=objects)
    crb = [cluster_role("nodes", groups=[""], resources=["nodes"], verbs=["get"]),
           cluster_role_binding(user("ann"), role="nodes")]
    assert allowed("ann", (), "get", "", "nodes", "", "", objects=crb)


@pytest.mark.parametrize("objects", [
    [None, 1, "x", [], {}],
    [{"kind": "ClusterRole"}, {"kind": "RoleBinding"}, {"kind": "ClusterRoleBinding"}],
    [{"kind": "ClusterRole", "metadata": "x", "rules": "x"}],
    [{**cluster_role(), "rules": "everything"}, role_binding(sa())],
    [{**cluster_role(), "rules": [None, "rule", {"verbs": "*", "apiGroups": "*",
                                                  "resources": "*"}]}, role_binding(sa())],
    [cluster_role(names="fedora"), role_binding(sa())],          # resourceNames not a list
    [cluster_role(), {**role_binding(sa()), "subjects": None}],
    [cluster_role(), {**role_binding(sa()), "subjects": [None, {"kind": "User"}, {"name": 5}]}],
    [cluster_role(), {**role_binding(sa()), "roleRef": None}],
    [cluster_role(), {**role_binding(sa()), "roleRef": {"kind": "ClusterRole", "name": 5,
                                                        "apiGroup": "rbac.authorization.k8s.io"}}],
    [cluster_role(), {**role_binding(sa()), "metadata": {"name": "b"}}],  # no namespace
    [cluster_role(), role_binding({"kind": "ServiceAccount", "name": "default",
                                   "namespace": 7})],
    [{**cluster_role(), "aggregationRule": {"clusterRoleSelectors": [None, "x", {"matchLabels": 1},
                                                                     {"matchExpressions": [{}]}]}},
     role_binding(sa(), role="nothing")],
    [{"kind": "List", "items": [None, {"kind": "List", "items": "x"}]}],
])
def test_malformed_objects_grant_nothing(objects: list[Any]) -> None:
    assert can_clone(TARGET_SA, SRC, objects) is False


def test_aggregation_cycles_terminate() -> None:
    a = {**cluster_role("a", verbs=["get"], labels={"agg": "yes"}),
         "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "yes"}}]}}
    b = {**cluster_role("b", labels={"agg": "yes"}),
         "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "yes"}}]}}
    assert can_clone(TARGET_SA, SRC, [a, b, role_binding(sa(), role="a")])


# --- an independent model of the RBAC rules, on well-formed random policies ------------------------

VERBS = ["create", "get", "*"]
GROUPS = ["cdi.kubevirt.io", "", "*", "kubevirt.io"]
RESOURCES = ["datavolumes", "datavolumes/source", "*", "*/source", "datavolumes/*", "pods"]
NAMESPACES = [SRC, TGT, "elsewhere"]
SUBJECTS = [sa(), sa(None), sa("elsewhere"), sa(TGT, "builder"), group("system:serviceaccounts"),
            group(f"system:serviceaccounts:{TGT}"), user(TARGET_SA), user("joe")]


def model_can_clone(who: str, objects: list[Obj]) -> bool:
    """A plain restatement of the rules for the generated subset of objects."""
    sa_ns = who.split(":")[2] if who.startswith("system:serviceaccount:") else None
    my_groups = {"system:serviceaccounts", f"system:serviceaccounts:{sa_ns}",
                 "system:authenticated"} if sa_ns else set()

    def subject_is_me(s: Obj, binding_ns: str) -> bool:
        if s["kind"] == "User":
            return bool(s["name"] == who)
        if s["kind"] == "Group":
            return s["name"] in my_groups
        ns = s.get("namespace") or binding_ns
        return bool(ns) and who == f"system:serviceaccount:{ns}:{s['name']}"

    def rule_ok(r: Obj) -> bool:
        dv = (set(r["verbs"]) & {"create", "*"} and set(r["apiGroups"]) & {"cdi.kubevirt.io", "*"}
              and set(r["resources"]) & {"datavolumes/source", "*", "*/source"})
        pod = (set(r["verbs"]) & {"create", "*"} and set(r["apiGroups"]) & {"", "*"}
               and set(r["resources"]) & {"pods", "*"})
        return bool(dv or pod) and not r.get("resourceNames")

    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("Role", "ClusterRole")}
    for b in objects:
        if b["kind"] == "ClusterRoleBinding":
            ns, role_key = "", ("ClusterRole", "", b["roleRef"]["name"])
        elif b["kind"] == "RoleBinding" and b["metadata"]["namespace"] == SRC:
            ns = SRC
            rk = b["roleRef"]["kind"]
            role_key = (rk, SRC if rk == "Role" else "", b["roleRef"]["name"])
        else:
            continue
        if not any(subject_is_me(s, ns) for s in b["subjects"]):
            continue
        role = roles.get(role_key)
        if role and any(rule_ok(r) for r in role["rules"]):
            return True
    return False


@st.composite
def policies(draw: st.DrawFn) -> list[Obj]:
    objects: list[Obj] = []
    role_names = ["r1", "r2"]
    for name in role_names:
        kind = draw(st.sampled_from(["ClusterRole", "Role"]))
        objects.append(cluster_role(
            name, kind=kind, namespace=draw(st.sampled_from(NAMESPACES)) if kind == "Role" else None,
            verbs=draw(st.lists(st.sampled_from(VERBS), min_size=1, max_size=2)),
            groups=draw(st.lists(st.sampled_from(GROUPS), min_size=1, max_size=2)),
            resources=draw(st.lists(st.sampled_from(RESOURCES), min_size=1, max_size=2)),
            names=draw(st.sampled_from([None, [], ["src"]]))))
    for _ in range(draw(st.integers(0, 3))):
        subjects = draw(st.lists(st.sampled_from(SUBJECTS), min_size=1, max_size=2))
        role = draw(st.sampled_from(role_names))
        if draw(st.booleans()):
            objects.append(cluster_role_binding(*subjects, role=role))
        else:
            objects.append(role_binding(*subjects, ns=draw(st.sampled_from(NAMESPACES)), role=role,
                                        role_kind=draw(st.sampled_from(["Role", "ClusterRole"]))))
    return objects


WHO = [TARGET_SA, OTHER_SA, OTHER_NS_SA, service_account_username(SRC, "default"), "joe"]


@given(policies(), st.sampled_from(WHO), st.randoms(use_true_random=False))
def test_rbac_agrees_with_model(objects: list[Obj], who: str, rnd: random.Random) -> None:
    expected = model_can_clone(who, objects)
    assert can_clone(who, SRC, objects) is expected
    shuffled = list(objects)
    rnd.shuffle(shuffled)
    assert can_clone(who, SRC, shuffled) is expected
    # RBAC is additive: more objects never take a permission away
    if expected:
        assert can_clone(who, SRC, objects + SEED)


# --- SubjectAccessReview and generated manifests -----------------------------------------------------

def test_subject_access_review_for_service_account() -> None:
    body = subject_access_review(TARGET_SA, SRC)
    assert body == {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": "system:serviceaccount:vms:default",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:vms",
                       "system:authenticated"],
            "resourceAttributes": {"namespace": "golden", "verb": "create",
                                   "group": "cdi.kubevirt.io", "resource": "datavolumes",
                                   "subresource": "source"},
        },
    }
    json.dumps(body)


def test_subject_access_review_for_user() -> None:
    body = subject_access_review("joe", SRC, groups=["devs", "devs"], name="fedora-golden")
    assert body["spec"]["user"] == "joe"
    assert body["spec"]["groups"] == ["devs"]
    assert body["spec"]["resourceAttributes"]["name"] == "fedora-golden"
    assert "groups" not in subject_access_review("joe", SRC)["spec"]


def test_clone_rbac_manifests_shape() -> None:
    text = clone_rbac_manifests("datavolume-cloner", SRC, TGT)
    role, binding = yaml.safe_load_all(text)
    assert role == {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": "datavolume-cloner"},
                    "rules": [{"apiGroups": ["cdi.kubevirt.io"],
                               "resources": ["datavolumes/source"], "verbs": ["create"]}]}
    assert binding["kind"] == "RoleBinding"
    assert binding["metadata"]["namespace"] == SRC
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default",
                                    "namespace": TGT}]
    assert binding["roleRef"] == {"kind": "ClusterRole", "name": "datavolume-cloner",
                                  "apiGroup": "rbac.authorization.k8s.io"}
    assert text.count("\n---\n") == 1
    star = list(yaml.safe_load_all(clone_rbac_manifests("c", SRC, TGT, verbs=("*",))))
    assert star[0]["rules"][0]["verbs"] == ["*"]


@pytest.mark.parametrize("verbs", [("create",), ("*",)])
def test_clone_rbac_manifests_round_trip(verbs: tuple[str, ...]) -> None:
    objects = list(yaml.safe_load_all(
        clone_rbac_manifests("datavolume-cloner", SRC, TGT, "importer", verbs=verbs)))
    assert can_clone(service_account_username(TGT, "importer"), SRC, objects)
    assert not can_clone(service_account_username("elsewhere", "importer"), SRC, objects)
    assert not can_clone(service_account_username(TGT, "default"), SRC, objects)
    assert not can_clone(service_account_username(TGT, "importer"), "other-source", objects)
    body = subject_access_review(service_account_username(TGT, "importer"), SRC)
    spec, attrs = body["spec"], body["spec"]["resourceAttributes"]
    assert allowed(spec["user"], spec["groups"], attrs["verb"], attrs["group"], attrs["resource"],
                   attrs["subresource"], attrs["namespace"], objects=objects)


@pytest.mark.parametrize("args", [
    ("Bad_Role", SRC, TGT, "default"),
    ("", SRC, TGT, "default"),
    ("r", "Golden", TGT, "default"),
    ("r", "golden.images", TGT, "default"),     # a namespace is a label: no dots
    ("r", SRC, "x" * 64, "default"),
    ("r", SRC, TGT, "-default"),
    ("r", SRC, TGT, ""),
    ("r" * 250, SRC, TGT, "default"),            # the RoleBinding name would pass 253
])
def test_clone_rbac_manifests_rejects_names(args: tuple[str, str, str, str]) -> None:
    with pytest.raises(ValueError):
        clone_rbac_manifests(*args)


def test_clone_rbac_manifests_rejects_empty_verbs() -> None:
    with pytest.raises(ValueError):
        clone_rbac_manifests("r", SRC, TGT, verbs=())
