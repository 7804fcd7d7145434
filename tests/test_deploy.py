"""deploy/: the checked-in manifests are what `cdimover manifests` writes, and every pod has
CDI's contract (security context, limits, volumes where CDI puts them, metrics port,
termination message)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cdimover import __version__
from cdimover.cdi.deploy import deploy_manifests
from cdimover.cdi.k8s import allowed, can_clone
from cdimover.cli import main

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
FILES = deploy_manifests(f"localhost/cdimover:{__version__}")


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, text in FILES.items():
        for doc in yaml.safe_load_all(text):
            if doc["kind"] == "Pod":
                out.append((name, doc["spec"]))
            elif doc["kind"] == "Job":
                out.append((name, doc["spec"]["template"]["spec"]))
    return out


def test_checked_in_files_are_generated() -> None:
    for name, text in FILES.items():
        assert (DEPLOY / name).read_text() == text, \
            f"deploy/{name} is stale: run `cdimover manifests -o deploy`"
    assert main(["manifests", "--check", str(DEPLOY)]) == 0


def test_check_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifests", "-q", "-o", str(tmp_path)]) == 0
    assert main(["manifests", "--check", str(tmp_path)]) == 0
    (tmp_path / "upload-server.yaml").write_text("# edited by hand\n")
    (tmp_path / "clone-job.yaml").unlink()
    assert main(["manifests", "--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "upload-server.yaml" in err and "clone-job.yaml" in err


def test_stdout_and_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifests", "--image", "registry.example/cdimover:1.2"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {d["kind"] for d in docs} == {"Pod", "Job", "ClusterRole", "RoleBinding"}
    images = {c["image"] for _, spec in pod_specs() for c in spec["containers"]}
    assert images == {f"localhost/cdimover:{__version__}"}
    assert all(c["image"] == "registry.example/cdimover:1.2"
               for d in docs if d["kind"] in ("Pod", "Job")
               for c in (d["spec"].get("template", d)["spec"]["containers"]))


def test_kustomization_lists_every_file() -> None:
    k = yaml.safe_load(FILES["kustomization.yaml"])
    assert sorted(k["resources"]) == sorted(n for n in FILES if n != "kustomization.yaml")
    assert k["images"][0]["name"] == "localhost/cdimover"


@pytest.mark.parametrize("name", sorted(n for n, _ in pod_specs()))
def test_pods_follow_cdis_contract(name: str) -> None:
    spec = dict(pod_specs())[name]
    assert spec["securityContext"]["fsGroup"] == 107
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsUser"] == 107 and sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["readOnlyRootFilesystem"] is True
        assert c["resources"]["limits"] == {"cpu": "750m", "memory": "600M"}
        assert c["terminationMessagePath"] == "/dev/termination-log"
        if name != "clone-job.yaml":
            assert {"name": "metrics", "containerPort": 8443, "protocol": "TCP"} in c["ports"]
        for d in c.get("volumeDevices", []):
            assert d["devicePath"] == "/dev/cdi-block-volume"
            assert "persistentVolumeClaim" in volumes[d["name"]]
        pvc_mounts = [m["mountPath"] for m in c["volumeMounts"]
                      if "persistentVolumeClaim" in volumes[m["name"]]]
        assert set(pvc_mounts) <= {"/data"}
        assert c["args"][0] in ("pod", "clone")


def test_rbac_grants_the_cross_namespace_clone() -> None:
    docs = list(yaml.safe_load_all(FILES["clone-rbac.yaml"]))
    assert [d["kind"] for d in docs] == ["ClusterRole", "RoleBinding"]
    sa = "system:serviceaccount:vms:default"
    assert allowed(sa, (), "create", "cdi.kubevirt.io", "datavolumes", "source",
                   "golden-images", objects=docs)
    assert can_clone(sa, "golden-images", docs, target_namespace="vms")
    assert not can_clone("system:serviceaccount:other:default", "golden-images", docs,
                         target_namespace="other")
