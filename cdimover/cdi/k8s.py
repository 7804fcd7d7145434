"""Kubernetes-side rules of a CDI clone, evaluated offline: manifests, validation and RBAC.

- :func:`clone_requests` reads DataVolume and VirtualMachine manifests and returns one
  :class:`CloneRequest` per PVC-sourced clone they ask for.
- :func:`validate_clone` applies CDI's clone rules (content type, volume modes, size) to a request
  and what is known of its source (:class:`SourceInfo`), returning CDI-worded problems.
- :func:`allowed` is an offline Kubernetes RBAC authorizer over Role, ClusterRole, RoleBinding and
  ClusterRoleBinding objects; :func:`can_clone` asks it CDI's cross-namespace clone question, and
  :func:`subject_access_review` builds the request CDI sends to the API server for that question.
- :func:`clone_rbac_manifests` writes the ClusterRole and RoleBinding that grant it.

Sources followed (kubevirt/containerized-data-importer unless noted):
``pkg/controller/datavolume/pvc-clone-controller.go`` (validateClone, messages),
``pkg/controller/clone-controller.go`` (ValidateCanCloneSourceAndTargetSpec, permissive clone),
``pkg/controller/common/util.go`` (AnnPermissiveClone, archive/Block rule),
``api/pkg/apis/core/v1beta1/authorize.go`` (the SubjectAccessReviews), ``doc/RBAC.md``;
kubernetes/kubernetes ``pkg/apis/rbac/v1/evaluation_helpers.go`` (rule matching),
``pkg/registry/rbac/validation/rule.go`` (binding resolution, appliesToUser) and
``plugin/pkg/auth/authorizer/rbac/rbac.go`` (RuleAllows).
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final


from ..errors import CloneValidationError
from ..sizing import DEFAULT_OVERHEAD, Overhead, format_size, parse_quantity, usable_space

__all__ = [
    "CDI_GROUP",
    "ANN_PERMISSIVE_CLONE",
    "CloneRequest",
    "SourceInfo",
    "clone_requests",
    "validate_clone",
    "allowed",
    "can_clone",
    "subject_access_review",
    "service_account_username",
    "clone_rbac_manifests",
]

CDI_GROUP: Final = "cdi.kubevirt.io"
RBAC_GROUP: Final = "rbac.authorization.k8s.io"
ANN_PERMISSIVE_CLONE: Final = "cdi.kubevirt.io/permissiveClone"
"""Target annotation that makes CDI skip the clone size check (its presence, not its value)."""

FILESYSTEM: Final = "Filesystem"
BLOCK: Final = "Block"
KUBEVIRT: Final = "kubevirt"
ARCHIVE: Final = "archive"
_VOLUME_MODES: Final = (FILESYSTEM, BLOCK)
_CONTENT_TYPES: Final = (KUBEVIRT, ARCHIVE)
_ACCESS_MODES: Final = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")

_SA_PREFIX: Final = "system:serviceaccount:"
_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", re.ASCII)
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.ASCII)


def _is_dns1123_label(s: str) -> bool:
    return len(s) <= 63 and _DNS1123_LABEL.fullmatch(s) is not None


def _is_dns1123_subdomain(s: str) -> bool:
    return len(s) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(s) is not None


# ---------------------------------------------------------------------------------------------
# Clone requests from manifests


@dataclass(frozen=True, slots=True)
class CloneRequest:
    """One PVC-to-PVC clone asked for by a DataVolume (standalone or a VM's template).

    ``size`` is the requested target size in bytes, or None when the ``storage`` API leaves it out
    (CDI then sizes the target from the source). ``volume_mode`` is None when unspecified (CDI
    resolves it from the StorageProfile; :func:`validate_clone` assumes Filesystem, as CDI's
    ``ResolveVolumeMode`` does). ``annotations`` are the DataVolume's, as sorted ``(key, value)``
    pairs so the value stays hashable; :attr:`annotation_map` gives them as a read-only mapping.
    """

    source_namespace: str
    source_name: str
    target_namespace: str
    target_name: str
    size: int | None
    access_modes: tuple[str, ...] = ()
    volume_mode: str | None = None
    content_type: str = KUBEVIRT
    preallocation: bool = False
    annotations: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)
                                      or self.size < 0):
            raise ValueError(f"size must be None or an int >= 0, got {self.size!r}")
        if self.volume_mode is not None and self.volume_mode not in _VOLUME_MODES:
            raise ValueError(f"volume_mode must be None, 'Filesystem' or 'Block', "
                             f"got {self.volume_mode!r}")
        if self.content_type not in _CONTENT_TYPES:
            raise ValueError(f"content_type must be 'kubevirt' or 'archive', "
                             f"got {self.content_type!r}")

    @property
    def annotation_map(self) -> Mapping[str, str]:
        """The annotations as a read-only mapping."""
        return types.MappingProxyType(dict(self.annotations))

    @property
    def cross_namespace(self) -> bool:
        """True when source and target namespaces differ (CDI then checks RBAC)."""
        return self.source_namespace != self.target_namespace


class _Doc:
    """Typed access to one manifest document, raising CloneValidationError naming the path."""

    def __init__(self, context: str) -> None:
        self.context = context

    def fail(self, path: str, problem: str) -> CloneValidationError:
        return CloneValidationError(f"{path}: {problem} ({self.context})")

    def mapping(self, value: object, path: str, *, required: bool = False) -> Mapping[str, Any]:
        if value is None:
            if required:
                raise self.fail(path, "required")
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be a mapping, not {_type_name(value)}")
        return value

    def string(self, value: object, path: str, *, required: bool = False) -> str | None:
        if value is None or value == "":
            if required:
                raise self.fail(path, "required")
            return None
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, not {_type_name(value)}")
        return value

    def name(self, value: object, path: str, *, label: bool = False,
             required: bool = True) -> str | None:
        s = self.string(value, path, required=required)
        if s is None:
            return None
        ok = _is_dns1123_label(s) if label else _is_dns1123_subdomain(s)
        if not ok:
            kind = "DNS-1123 label" if label else "DNS-1123 subdomain"
            raise self.fail(path, f"{s!r} is not a valid {kind}")
        return s


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _api_group(doc: Mapping[str, Any]) -> str | None:
    api_version = doc.get("apiVersion")
    if not isinstance(api_version, str):
        return None
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def _storage_spec(d: _Doc, spec: Mapping[str, Any], path: str) -> tuple[
        int | None, tuple[str, ...], str | None]:
    """Parse ``spec.pvc`` or ``spec.storage`` under SPEC; return size, access modes, volume mode."""
    has_pvc = spec.get("pvc") is not None
    has_storage = spec.get("storage") is not None
    if has_pvc and has_storage:
        raise d.fail(path, "pvc and storage are mutually exclusive; give one")
    if not has_pvc and not has_storage:
        raise d.fail(f"{path}.pvc", "required (or storage)")
    key = "pvc" if has_pvc else "storage"
    sp = f"{path}.{key}"
    body = d.mapping(spec[key], sp)

    modes_raw = body.get("accessModes")
    access_modes: tuple[str, ...] = ()
    if modes_raw is not None:
        if not isinstance(modes_raw, list):
            raise d.fail(f"{sp}.accessModes", f"must be a list, not {_type_name(modes_raw)}")
        for i, mode in enumerate(modes_raw):
            if mode not in _ACCESS_MODES:
                raise d.fail(f"{sp}.accessModes[{i}]",
                             f"unsupported value {mode!r}; supported: {', '.join(_ACCESS_MODES)}")
        access_modes = tuple(modes_raw)

    volume_mode = d.string(body.get("volumeMode"), f"{sp}.volumeMode")
    if volume_mode is not None and volume_mode not in _VOLUME_MODES:
        raise d.fail(f"{sp}.volumeMode",
                     f"unsupported value {volume_mode!r}; supported: Filesystem, Block")

    resources = d.mapping(body.get("resources"), f"{sp}.resources")
    requests = d.mapping(resources.get("requests"), f"{sp}.resources.requests")
    qpath = f"{sp}.resources.requests.storage"
    raw = requests.get("storage")
    size: int | None = None
    if raw is None:
        if key == "pvc":  # CDI's webhook: "PVC size is missing"
            raise d.fail(qpath, "required with spec.pvc (PVC size is missing)")
    else:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise d.fail(qpath, f"must be a quantity such as '10Gi', not {_type_name(raw)}")
        text = repr(raw) if isinstance(raw, float) else raw
        try:
            size = parse_quantity(text)
        except ValueError as e:
            raise d.fail(qpath, str(e)) from None
        if size == 0:  # CDI's webhook: "PVC size can't be equal or less than zero"
            raise d.fail(qpath, "must be greater than zero")
    return size, access_modes, volume_mode


def _datavolume(d: _Doc, meta: Mapping[str, Any], spec_raw: object, target_namespace: str,
                path: str) -> CloneRequest | None:
    """Build the CloneRequest of one DataVolume (META/SPEC_RAW at PATH), or None if not a clone."""
    target_name = d.name(meta.get("name"), f"{path}metadata.name")
    assert target_name is not None
    ann_raw = d.mapping(meta.get("annotations"), f"{path}metadata.annotations")
    annotations: list[tuple[str, str]] = []
    for k, v in ann_raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise d.fail(f"{path}metadata.annotations.{k}",
                         f"must be a string, not {_type_name(v)} (quote it)")
        annotations.append((k, v))

    spec = d.mapping(spec_raw, f"{path}spec", required=True)
    source = d.mapping(spec.get("source"), f"{path}spec.source")
    if source.get("pvc") is None:
        return None  # not a PVC clone: http, registry, upload, blank, snapshot, sourceRef...
    others = sorted(k for k, v in source.items() if k != "pvc" and v is not None)
    if others:
        raise d.fail(f"{path}spec.source", f"multiple sources (pvc and {', '.join(others)})")
    src = d.mapping(source["pvc"], f"{path}spec.source.pvc")
    source_name = d.name(src.get("name"), f"{path}spec.source.pvc.name")
    assert source_name is not None
    source_namespace = d.name(src.get("namespace"), f"{path}spec.source.pvc.namespace",
                              label=True, required=False) or target_namespace

    size, access_modes, volume_mode = _storage_spec(d, spec, f"{path}spec")

    content_type = d.string(spec.get("contentType"), f"{path}spec.contentType") or KUBEVIRT
    if content_type not in _CONTENT_TYPES:
        raise d.fail(f"{path}spec.contentType",
                     f"ContentType not one of: kubevirt, archive (got {content_type!r})")
    prealloc = spec.get("preallocation")
    if prealloc is not None and not isinstance(prealloc, bool):
        raise d.fail(f"{path}spec.preallocation", f"must be a boolean, not {_type_name(prealloc)}")

    return CloneRequest(
        source_namespace=source_namespace, source_name=source_name,
        target_namespace=target_namespace, target_name=target_name,
        size=size, access_modes=access_modes, volume_mode=volume_mode,
        content_type=content_type, preallocation=bool(prealloc),
        annotations=tuple(sorted(annotations)))


def _requests_of(doc: Mapping[str, Any], context: str, default_namespace: str,
                 path: str) -> Iterator[CloneRequest]:
    kind = doc.get("kind")
    group = _api_group(doc)
    d = _Doc(context)
    if kind in ("List", "DataVolumeList", "VirtualMachineList"):
        items = doc.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            raise d.fail(f"{path}items", f"must be a list, not {_type_name(items)}")
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                yield from _requests_of(item, f"{context}, items[{i}]", default_namespace,
                                        f"{path}items[{i}].")
        return
    if kind == "DataVolume" and group == CDI_GROUP:
        meta = d.mapping(doc.get("metadata"), f"{path}metadata", required=True)
        ns = d.name(meta.get("namespace"), f"{path}metadata.namespace", label=True,
                    required=False) or default_namespace
        req = _datavolume(d, meta, doc.get("spec"), ns, path)
        if req is not None:
            yield req
    elif kind == "VirtualMachine" and group == "kubevirt.io":
        meta = d.mapping(doc.get("metadata"), f"{path}metadata", required=True)
        ns = d.name(meta.get("namespace"), f"{path}metadata.namespace", label=True,
                    required=False) or default_namespace
        spec = d.mapping(doc.get("spec"), f"{path}spec", required=True)
        templates = spec.get("dataVolumeTemplates")
        if templates is None:
            return
        if not isinstance(templates, list):
            raise d.fail(f"{path}spec.dataVolumeTemplates",
                         f"must be a list, not {_type_name(templates)}")
        for i, tpl in enumerate(templates):
            tpath = f"{path}spec.dataVolumeTemplates[{i}]."
            tpl = d.mapping(tpl, tpath[:-1], required=True)
            tmeta = d.mapping(tpl.get("metadata"), f"{tpath}metadata", required=True)
            tns = d.string(tmeta.get("namespace"), f"{tpath}metadata.namespace")
            if tns is not None and tns != ns:
                raise d.fail(f"{tpath}metadata.namespace",
                             f"{tns!r} differs from the VirtualMachine's namespace {ns!r}")
            req = _datavolume(d, tmeta, tpl.get("spec"), ns, tpath)
            if req is not None:
                yield req


def clone_requests(manifest_text: str, *, default_namespace: str = "default"
                   ) -> list[CloneRequest]:
    """Return the PVC clones that the YAML documents in MANIFEST_TEXT ask for, in order.

    Recognised documents: ``cdi.kubevirt.io`` DataVolumes (``spec.source.pvc`` with ``spec.pvc``
    or ``spec.storage``), ``kubevirt.io`` VirtualMachines (each of ``spec.dataVolumeTemplates``;
    the target namespace is the VM's), and ``List`` objects holding either. Other kinds, and
    DataVolumes whose source is not a PVC, are skipped. Namespaces default to DEFAULT_NAMESPACE
    (targets) and to the target's namespace (sources).

    Raises CloneValidationError, its message starting with the field path (for example
    ``spec.pvc.resources.requests.storage: ...``), for YAML syntax errors and for recognised
    documents with missing or malformed fields.
    """
    if not _is_dns1123_label(default_namespace):
        raise ValueError(f"default_namespace {default_namespace!r} is not a DNS-1123 label")
    import yaml     # only where manifests are parsed

    try:
        docs = list(yaml.safe_load_all(manifest_text))
    except yaml.YAMLError as e:
        raise CloneValidationError(f"invalid YAML: {e}") from None
    out: list[CloneRequest] = []
    for n, doc in enumerate(docs, 1):
        if not isinstance(doc, Mapping):
            continue
        meta = doc.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        context = f"document {n}" + (f", {doc.get('kind')} {name!r}" if name else "")
        out.extend(_requests_of(doc, context, default_namespace, ""))
    return out


# ---------------------------------------------------------------------------------------------
# Clone validation


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What is known of a clone's source volume.

    ``volume_mode`` is ``"Filesystem"`` or ``"Block"``; ``virtual_size`` the disk's size in bytes
    (the image's virtual size on a Filesystem volume, the device size on a Block one);
    ``content_type`` the source's CDI content type; ``capacity`` the source PVC's capacity, when
    known (informational).
    """

    volume_mode: str
    virtual_size: int
    content_type: str = KUBEVIRT
    capacity: int | None = None

    def __post_init__(self) -> None:
        if self.volume_mode not in _VOLUME_MODES:
            raise ValueError(f"volume_mode must be 'Filesystem' or 'Block', "
                             f"got {self.volume_mode!r}")
        if isinstance(self.virtual_size, bool) or not isinstance(self.virtual_size, int) \
                or self.virtual_size < 0:
            raise ValueError(f"virtual_size must be an int >= 0, got {self.virtual_size!r}")
        if self.content_type not in _CONTENT_TYPES:
            raise ValueError(f"content_type must be 'kubevirt' or 'archive', "
                             f"got {self.content_type!r}")
        if self.capacity is not None and (isinstance(self.capacity, bool)
                                          or not isinstance(self.capacity, int)
                                          or self.capacity < 0):
            raise ValueError(f"capacity must be None or an int >= 0, got {self.capacity!r}")


def validate_clone(request: CloneRequest, source: SourceInfo, *,
                   filesystem_overhead: Overhead = DEFAULT_OVERHEAD) -> list[str]:
    """Return CDI's objections to cloning SOURCE into REQUEST's target; an empty list means none.

    The rules, worded as CDI words them:

    - content types must be equal (``Source contentType (...) and target contentType (...) do not
      match``);
    - an archive volume cannot be Block (``ContentType Archive cannot have block volumeMode``);
    - volume modes may differ only for content type kubevirt (``source volumeMode (...) and target
      volumeMode (...) do not match, contentType (...)``); an unspecified target mode counts as
      Filesystem (CDI's ``ResolveVolumeMode``);
    - the target must hold the source's virtual size: for a Filesystem target its usable space
      (:func:`~cdimover.sizing.usable_space` with FILESYSTEM_OVERHEAD), for a Block target its raw
      size (``target resources requests storage size is smaller than the source``). The check is
      skipped when the size is unspecified (CDI sizes the target from the source) and when the
      request carries the ``cdi.kubevirt.io/permissiveClone`` annotation: CDI tests the key's
      presence only, so any value, even ``"false"``, skips it.

    Raises ValueError when FILESYSTEM_OVERHEAD is invalid.
    """
    problems: list[str] = []
    target_mode = request.volume_mode or FILESYSTEM
    if request.content_type != source.content_type:
        problems.append(f"Source contentType ({source.content_type}) and target contentType "
                        f"({request.content_type}) do not match")
    if request.content_type == ARCHIVE and BLOCK in (target_mode, source.volume_mode):
        side = "target" if target_mode == BLOCK else "source"
        problems.append(f"ContentType Archive cannot have block volumeMode ({side} is Block)")
    if source.volume_mode != target_mode and request.content_type != KUBEVIRT:
        problems.append(f"source volumeMode ({source.volume_mode}) and target volumeMode "
                        f"({target_mode}) do not match, contentType ({request.content_type})")
    if request.size is not None and ANN_PERMISSIVE_CLONE not in request.annotation_map:
        if target_mode == FILESYSTEM:
            room = usable_space(request.size, filesystem_overhead)
            what = (f"{format_size(room)} ({room} bytes) usable of the requested "
                    f"{format_size(request.size)} ({request.size} bytes) Filesystem volume "
                    f"with overhead {filesystem_overhead}")
        else:
            room = request.size
            what = f"{format_size(room)} ({room} bytes) Block volume"
        if room < source.virtual_size:
            problems.append(f"target resources requests storage size is smaller than the "
                            f"source: {what} < {format_size(source.virtual_size)} "
                            f"({source.virtual_size} bytes) source virtual size")
    return problems


# ---------------------------------------------------------------------------------------------
# RBAC


def service_account_username(namespace: str, name: str) -> str:
    """The user name of ServiceAccount NAME in NAMESPACE: ``system:serviceaccount:NS:NAME``."""
    return f"{_SA_PREFIX}{namespace}:{name}"


def _service_account_groups(user: str) -> tuple[str, ...]:
    """The groups the API server gives a ServiceAccount's token, as CDI passes them in its SAR."""
    if not user.startswith(_SA_PREFIX):
        return ()
    ns, sep, name = user[len(_SA_PREFIX):].partition(":")
    if not ns or not sep or not name:
        return ()
    return ("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated")


def _effective_groups(user: str, groups: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for g in (*groups, *_service_account_groups(user)):
        if g not in out:
            out.append(g)
    return tuple(out)


def _str_list(value: object) -> list[str]:
    """VALUE if it is a list of strings, else [] (a malformed field grants nothing)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return []


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return "", ""
    name, ns = meta.get("name"), meta.get("namespace")
    return (name if isinstance(name, str) else "", ns if isinstance(ns, str) else "")


def _flatten(objects: Iterable[object]) -> Iterator[Mapping[str, Any]]:
    for obj in objects:
        if not isinstance(obj, Mapping):
            continue
        kind = obj.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list):
            yield from _flatten(obj["items"])
        else:
            yield obj


def _is_rbac(obj: Mapping[str, Any], kind: str) -> bool:
    return obj.get("kind") == kind and _api_group(obj) in (RBAC_GROUP, None)


def _selector_matches(selector: object, labels: Mapping[str, object]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions); {} matches all."""
    if not isinstance(selector, Mapping):
        return False
    match_labels = selector.get("matchLabels") or {}
    expressions = selector.get("matchExpressions") or []
    if not isinstance(match_labels, Mapping) or not isinstance(expressions, list):
        return False
    for k, v in match_labels.items():
        if labels.get(k) != v:
            return False
    for e in expressions:
        if not isinstance(e, Mapping):
            return False
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if not isinstance(key, str) or not isinstance(values, list):
            return False
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            return False
        if not ok:
            return False
    return True


class _Policy:
    """The RBAC objects of a cluster, indexed for lookups."""

    def __init__(self, objects: Iterable[object]) -> None:
        self.roles: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.cluster_roles: dict[str, Mapping[str, Any]] = {}
        self.role_bindings: list[Mapping[str, Any]] = []
        self.cluster_role_bindings: list[Mapping[str, Any]] = []
        for obj in _flatten(objects):
            name, ns = _meta(obj)
            if _is_rbac(obj, "Role") and name and ns:
                self.roles[(ns, name)] = obj
            elif _is_rbac(obj, "ClusterRole") and name:
                self.cluster_roles[name] = obj
            elif _is_rbac(obj, "RoleBinding") and ns:
                self.role_bindings.append(obj)
            elif _is_rbac(obj, "ClusterRoleBinding"):
                self.cluster_role_bindings.append(obj)

    def cluster_role_rules(self, name: str, seen: frozenset[str] = frozenset()
                           ) -> Iterator[Mapping[str, Any]]:
        """The rules of ClusterRole NAME, including those it aggregates.

        A live cluster's aggregation controller writes the selected roles' rules into the
        aggregated role's ``rules``; for hand-written objects this does the same offline: the
        role's own rules plus the rules of every ClusterRole whose labels match one of
        ``aggregationRule.clusterRoleSelectors`` (transitively, cycles cut).
        """
        role = self.cluster_roles.get(name)
        if role is None or name in seen:
            return
        yield from _rules(role)
        agg = role.get("aggregationRule")
        if not isinstance(agg, Mapping):
            return
        selectors = agg.get("clusterRoleSelectors")
        if not isinstance(selectors, list):
            return
        seen = seen | {name}
        for other_name, other in self.cluster_roles.items():
            if other_name in seen:
                continue
            meta = other.get("metadata")
            labels = meta.get("labels") if isinstance(meta, Mapping) else None
            if not isinstance(labels, Mapping):
                labels = {}
            if any(_selector_matches(s, labels) for s in selectors):
                yield from self.cluster_role_rules(other_name, seen)

    def role_ref_rules(self, binding: Mapping[str, Any], binding_namespace: str
                       ) -> Iterator[Mapping[str, Any]]:
        """GetRoleReferenceRules: a Role in the binding's namespace, or a ClusterRole."""
        ref = binding.get("roleRef")
        if not isinstance(ref, Mapping) or ref.get("apiGroup") != RBAC_GROUP:
            return
        name = ref.get("name")
        if not isinstance(name, str):
            return
        if ref.get("kind") == "Role" and binding_namespace:
            role = self.roles.get((binding_namespace, name))
            if role is not None:
                yield from _rules(role)
        elif ref.get("kind") == "ClusterRole":
            yield from self.cluster_role_rules(name)

    def rules_for(self, user: str, groups: Sequence[str], namespace: str
                  ) -> Iterator[Mapping[str, Any]]:
        """VisitRulesFor: rules from ClusterRoleBindings, then from RoleBindings in NAMESPACE."""
        for crb in self.cluster_role_bindings:
            if _applies_to(user, groups, crb.get("subjects"), ""):
                yield from self.role_ref_rules(crb, "")
        if namespace:
            for rb in self.role_bindings:
                if _meta(rb)[1] == namespace and _applies_to(user, groups, rb.get("subjects"),
                                                             namespace):
                    yield from self.role_ref_rules(rb, namespace)


def _rules(role: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    rules = role.get("rules")
    if isinstance(rules, list):
        yield from (r for r in rules if isinstance(r, Mapping))


def _applies_to(user: str, groups: Sequence[str], subjects: object, namespace: str) -> bool:
    """appliesTo/appliesToUser: does any of SUBJECTS name USER (or one of GROUPS)?

    A ServiceAccount subject without a namespace takes the binding's NAMESPACE (empty for a
    ClusterRoleBinding, where such a subject then matches nobody).
    """
    if not isinstance(subjects, list):
        return False
    for s in subjects:
        if not isinstance(s, Mapping):
            continue
        kind, name = s.get("kind"), s.get("name")
        if not isinstance(name, str):
            continue
        if kind == "User":
            if user == name:
                return True
        elif kind == "Group":
            if name in groups:
                return True
        elif kind == "ServiceAccount":
            sa_ns = s.get("namespace") or namespace
            if isinstance(sa_ns, str) and sa_ns and user == service_account_username(sa_ns, name):
                return True
    return False


def _rule_allows(rule: Mapping[str, Any], verb: str, api_group: str, resource: str,
                 subresource: str, name: str) -> bool:
    """RuleAllows for a resource request, with the matchers of evaluation_helpers.go."""
    verbs = _str_list(rule.get("verbs"))
    if "*" not in verbs and verb not in verbs:
        return False
    groups = _str_list(rule.get("apiGroups"))
    if "*" not in groups and api_group not in groups:
        return False
    combined = f"{resource}/{subresource}" if subresource else resource
    resources = _str_list(rule.get("resources"))
    if not any(r == "*" or r == combined or (subresource and r == f"*/{subresource}")
               for r in resources):
        return False  # note: "datavolumes" and "datavolumes/*" do not match datavolumes/source
    names = _str_list(rule.get("resourceNames"))
    if rule.get("resourceNames") and not names:
        return False  # malformed resourceNames: no grant
    return not names or name in names


def allowed(user: str, groups: Iterable[str], verb: str, api_group: str, resource: str,
            subresource: str, namespace: str, *, name: str | None = None,
            objects: Iterable[Mapping[str, Any]]) -> bool:
    """Would Kubernetes RBAC let USER do VERB on RESOURCE[/SUBRESOURCE] in NAMESPACE?

    OBJECTS are RBAC objects as parsed from YAML or JSON (Role, ClusterRole, RoleBinding,
    ClusterRoleBinding, and ``*List`` objects holding them). It follows the API server's RBAC
    authorizer:

    - a ClusterRoleBinding grants its ClusterRole in every namespace; a RoleBinding grants its
      Role (looked up in the binding's own namespace) or ClusterRole only in its namespace;
    - a rule matches when its verbs hold VERB or ``*``, its apiGroups API_GROUP or ``*``, its
      resources ``*``, ``resource/subresource`` exactly, or ``*/subresource`` (``resource``
      alone does not grant its subresources, nor does ``resource/*``), and its resourceNames are
      empty or hold NAME (a request without a name matches no rule that lists names);
    - subjects: ``User`` by name, ``Group`` by GROUPS, ``ServiceAccount`` by namespace and name
      (namespace defaulting to the RoleBinding's). A ServiceAccount user name
      ``system:serviceaccount:NS:NAME`` is also in ``system:serviceaccounts``,
      ``system:serviceaccounts:NS`` and ``system:authenticated``;
    - aggregated ClusterRoles gain the rules of the ClusterRoles their selectors match.

    Objects or fields that are missing or malformed grant nothing; nothing raises. Roles and
    RoleBindings need ``metadata.namespace``; an ``apiVersion``, when present, must be in
    ``rbac.authorization.k8s.io``, and a ``roleRef`` must name that API group, as the API server
    requires. RBAC only adds permissions, so the order of OBJECTS does not matter.
    """
    return _allowed(_Policy(objects), user, groups, verb, api_group, resource, subresource,
                    namespace, name)


def _allowed(policy: _Policy, user: str, groups: Iterable[str], verb: str, api_group: str,
             resource: str, subresource: str, namespace: str, name: str | None) -> bool:
    all_groups = _effective_groups(user, groups)
    want = name or ""
    return any(_rule_allows(rule, verb, api_group, resource, subresource, want)
               for rule in policy.rules_for(user, all_groups, namespace))


def can_clone(user: str, source_namespace: str, rbac_objects: Iterable[Mapping[str, Any]], *,
              groups: Iterable[str] = (), source_name: str | None = None,
              target_namespace: str | None = None) -> bool:
    """May USER clone from SOURCE_NAMESPACE, by CDI's rules, given RBAC_OBJECTS?

    CDI (``authorize.go``) allows the clone when the target namespace equals the source namespace
    (when TARGET_NAMESPACE is given), or when either SubjectAccessReview it sends is allowed:
    ``create`` on ``datavolumes/source`` in ``cdi.kubevirt.io`` or ``create`` on core ``pods``,
    in SOURCE_NAMESPACE, for the resource name SOURCE_NAME (the source PVC; None asks without a
    name, which a rule listing resourceNames does not match). See :func:`allowed` for how each
    review is decided. For a ServiceAccount, pass ``service_account_username(ns, name)``.
    """
    if target_namespace is not None and target_namespace == source_namespace:
        return True
    policy = _Policy(rbac_objects)
    group_list = tuple(groups)
    return (_allowed(policy, user, group_list, "create", CDI_GROUP, "datavolumes", "source",
                     source_namespace, source_name)
            or _allowed(policy, user, group_list, "create", "", "pods", "", source_namespace,
                        source_name))


def subject_access_review(user: str, source_namespace: str, *, groups: Iterable[str] = (),
                          name: str | None = None) -> dict[str, Any]:
    """The ``authorization.k8s.io/v1`` SubjectAccessReview CDI creates for a cross-namespace clone.

    ``spec.resourceAttributes`` asks for ``create`` on ``datavolumes/source`` in group
    ``cdi.kubevirt.io`` in SOURCE_NAMESPACE, naming the source PVC NAME when given. For a
    ServiceAccount user name the ServiceAccount groups are added to GROUPS, as CDI does (the API
    server adds none to a review). CDI falls back to a second review for ``create`` on ``pods``
    when this one is denied; :func:`can_clone` evaluates both.
    """
    attrs: dict[str, str] = {
        "namespace": source_namespace,
        "verb": "create",
        "group": CDI_GROUP,
        "resource": "datavolumes",
        "subresource": "source",
    }
    if name:
        attrs["name"] = name
    spec: dict[str, Any] = {"user": user}
    all_groups = _effective_groups(user, groups)
    if all_groups:
        spec["groups"] = list(all_groups)
    spec["resourceAttributes"] = attrs
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


def clone_rbac_manifests(role_name: str, source_namespace: str, target_namespace: str,
                         service_account: str = "default", *,
                         verbs: Sequence[str] = ("create",)) -> str:
    """YAML for the two objects that let a target namespace's ServiceAccount clone from a source.

    Document 1 is ClusterRole ROLE_NAME granting VERBS on ``datavolumes/source`` in
    ``cdi.kubevirt.io`` (``create`` is all CDI's review asks for, as in CDI's ``doc/RBAC.md``; pass
    ``("*",)`` for the form other guides show). Document 2 is a RoleBinding in SOURCE_NAMESPACE,
    named ``<target_namespace>-<service_account>-<role_name>``, binding ServiceAccount
    SERVICE_ACCOUNT of TARGET_NAMESPACE to that ClusterRole.

    Raises ValueError unless the namespaces are DNS-1123 labels, ROLE_NAME and SERVICE_ACCOUNT
    DNS-1123 subdomains, the binding name fits in 253 characters, and VERBS is non-empty.
    """
    for value, what, label in ((role_name, "role_name", False),
                               (source_namespace, "source_namespace", True),
                               (target_namespace, "target_namespace", True),
                               (service_account, "service_account", False)):
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string, not {type(value).__name__}")
        if label and not _is_dns1123_label(value):
            raise ValueError(f"{what} {value!r} is not a valid DNS-1123 label")
        if not label and not _is_dns1123_subdomain(value):
            raise ValueError(f"{what} {value!r} is not a valid DNS-1123 subdomain")
    verb_list = [verbs] if isinstance(verbs, str) else list(verbs)
    if not verb_list or not all(isinstance(v, str) and v for v in verb_list):
        raise ValueError(f"verbs must be a non-empty sequence of strings, got {verbs!r}")
    binding_name = f"{target_namespace}-{service_account}-{role_name}"
    if not _is_dns1123_subdomain(binding_name):
        raise ValueError(f"RoleBinding name {binding_name!r} is longer than 253 characters")
    cluster_role = {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": role_name},
        "rules": [{"apiGroups": [CDI_GROUP], "resources": ["datavolumes/source"],
                   "verbs": verb_list}],
    }
    role_binding = {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": binding_name, "namespace": source_namespace},
        "subjects": [{"kind": "ServiceAccount", "name": service_account,
                      "namespace": target_namespace}],
        "roleRef": {"kind": "ClusterRole", "name": role_name, "apiGroup": RBAC_GROUP},
    }
    import yaml

    return yaml.safe_dump_all([cluster_role, role_binding], sort_keys=False,
                              default_flow_style=False)
