"""A host-assisted clone between two pods in a real runtime: deploy/clone-source.yaml
(`cdimover pod clone-source`) sends a Block volume over mutual TLS to deploy/upload-server.yaml
(the clone target) in another pod, the two pods on an internal podman network the test makes
(link-local addresses, no route out), both played by `podman kube play` from the checked-in
manifests, adapted only by the test overlay (host paths, loop devices, the Secret's PEM text,
the target's address).  Checked: both termination messages, read back through
`podman inspect`; both exit statuses; the target device's bytes against the source's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from imagefix import (MiB, Image, Podman, attach, disk, kube_overlay, load_manifest,
                      pod_network, pod_pid, sha256, termination_file, termination_message,
                      upload_pki, wait_exited, wait_healthy)


def test_clone_source_exists(image: Image, podman: Podman) -> None:
    r = podman.run(image.ref, "pod", "clone-source", "--help", name=podman.name("help"),
                   options=["--network", "none"])
    assert r.returncode == 0, f"`cdimover pod clone-source` is missing from the image:\n" \
                              f"{r.stderr}"


def test_clone_source_to_upload_server(image: Image, loopdev: Callable[..., str],
                                       podman: Podman, tmp_path: Path) -> None:
    src = disk(tmp_path / "src.img", seed=23)
    src_dev = attach(loopdev, src)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    dst_dev = attach(loopdev, target)

    with pod_network(podman) as (network, (addr_target, addr_source, *_)):
        pki = upload_pki(tmp_path, extra_ips=[addr_target])
        server = load_manifest("upload-server.yaml")
        claim = server["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        server_term = termination_file(tmp_path / "server-term")
        server_pod = kube_overlay(
            server, image.ref, claims={claim: dst_dev}, termination_log=server_term,
            files={"cdi-upload-upload-target": str(pki["tls"])})
        podman.play(server_pod, tmp_path, "--network", network, "--ip", addr_target)
        server_name = f"{server_pod['metadata']['name']}-" \
                      f"{server_pod['spec']['containers'][0]['name']}"
        wait_healthy(pod_pid(podman, server_pod["metadata"]["name"]), pki["ca"],
                     host=addr_target)

        source = load_manifest("clone-source.yaml")
        source_claim = source["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        source_term = termination_file(tmp_path / "source-term")
        source_pod = kube_overlay(
            source, image.ref, claims={source_claim: src_dev}, termination_log=source_term,
            files={}, env={"UPLOAD_URL": f"https://{addr_target}:8443/v1beta1/upload"},
            secrets_={"clone-source-tls": {"tls.crt": pki["cert"].read_text(),
                                           "tls.key": pki["key"].read_text(),
                                           "ca.crt": pki["ca"].read_text()}})
        podman.play(source_pod, tmp_path, "--network", network, "--ip", addr_source)
        source_name = f"{source_pod['metadata']['name']}-" \
                      f"{source_pod['spec']['containers'][0]['name']}"

        assert wait_exited(podman, source_name) == 0, termination_message(podman, source_name)
        assert termination_message(podman, source_name).startswith("Clone Complete")
        assert wait_exited(podman, server_name) == 0, termination_message(podman, server_name)
        assert json.loads(termination_message(podman, server_name))["message"] == \
            "Clone Complete"
    assert sha256(Path(dst_dev), src.stat().st_size) == sha256(src)
