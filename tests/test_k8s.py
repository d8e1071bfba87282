"""k8s/ and cluster/Dockerfile, checked offline (no cluster, no network, no Docker).

They say the same as cluster.yaml in another form, so most checks compare them with it: the node
image and install, the shape of the nodes (through Ray's own KubeRay config derivation), the Ray
version; and the pieces must fit each other: Secrets, the MLflow Service, the sweep command. Each
`*_problems` check returns what is wrong; a `test_..._bites` breaks a loaded manifest and makes sure
the check notices.
"""
from __future__ import annotations

import copy
import fnmatch
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
IMAGE_REPO = "/home/ray/has-sweep"  # where the image (and cluster.yaml's file_mounts) put the repository
START_MLFLOW = ROOT / "cluster" / "start_mlflow.sh"
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # KubeRay 1.7
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


# ---------------------------------------------------------------------------------------- loading

def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def load(name: str, kind: str) -> dict:
    (doc,) = [doc for doc in load_all(name) if doc["kind"] == kind]
    return doc


def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def ray_pin() -> str:
    (version,) = re.findall(r"^ray==(\S+)", (ROOT / "cluster" / "constraints.txt").read_text(), re.M)
    return version


def secrets() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: {**doc.get("stringData", {}), **doc.get("data", {})}
            for doc in load_all("secrets.example.yaml") if doc["kind"] == "Secret"}


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec of a manifest: a RayCluster's groups, a RayJob's cluster, a Deployment's template."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    if doc["kind"] in ("RayCluster", "RayJob"):
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [group["template"]["spec"] for group in groups]
    if doc["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for pod in pod_specs(doc) for c in pod.get("containers", []) + pod.get("initContainers", [])]


def all_manifests() -> list[dict]:
    return [doc for name in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml") for doc in load_all(name)]


def env_of(container: dict, namespace: str = "default") -> dict[str, str]:
    """The container's environment as Kubernetes makes it: Secret values from the example Secrets,
    the pod's namespace from the downward API, $(VAR) replaced by the variables defined above it."""
    values: dict[str, str] = {}
    known = secrets()
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), str(item["value"]))
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            value = known[ref["name"]][ref["key"]]
        elif item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            value = namespace
        else:
            raise AssertionError(f"env {item['name']}: a source this test does not know")
        values[item["name"]] = value
    return values


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def head(doc: dict) -> dict:
    return doc["spec"]["headGroupSpec"]


def gpu_group(doc: dict) -> dict:
    (group,) = doc["spec"]["workerGroupSpecs"]
    return group


def derived(doc: dict) -> dict:
    """The autoscaling config Ray's KubeRay autoscaler derives from this RayCluster (its own code)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(doc)
    cr["metadata"].setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)


# ------------------------------------------------------------------------------------------ checks

def kuberay_problems(spec: dict) -> list[str]:
    """What the KubeRay operator needs in a RayCluster spec (its CRD's required fields and types)."""
    problems = []
    if not isinstance(spec.get("rayVersion"), str):
        problems.append("rayVersion: a string")
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    if not spec.get("workerGroupSpecs"):
        problems.append("workerGroupSpecs: none")
    for where, group in groups:
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{where}.rayStartParams: a map of strings")
        pod = (group.get("template") or {}).get("spec") or {}
        if not pod.get("containers"):
            problems.append(f"{where}.template.spec.containers: none")
        for container in pod.get("containers", []):
            if not container.get("name") or not container.get("image"):
                problems.append(f"{where}: a container without name or image")
        names = [v["name"] for v in pod.get("volumes", [])]
        for container in pod.get("containers", []):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in names:
                    problems.append(f"{where}: volumeMount {mount['name']} has no volume")
        if where == "headGroupSpec":
            continue
        name = group.get("groupName")
        if not isinstance(name, str) or not DNS_LABEL.fullmatch(name):
            problems.append(f"{where}.groupName: {name!r} is not a DNS label (pod names contain it)")
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        count = group.get("replicas", low)
        if not all(isinstance(n, int) for n in (low, high, count)) or not 0 <= low <= count <= high:
            problems.append(f"{where}: need integers 0 <= minReplicas <= replicas <= maxReplicas, have "
                            f"{low}, {count}, {high}")
    return problems


def shape_problems(doc: dict) -> list[str]:
    """Where the RayCluster's nodes, as Ray's autoscaler sees them, differ from cluster.yaml's."""
    config, reference = derived(doc), cluster_yaml()
    worker = reference["available_node_types"]["gpu_worker"]
    problems = []
    head_type = config["available_node_types"][config["head_node_type"]]
    if head_type["resources"].get("CPU") != 0:
        problems.append(f"head: Ray CPU {head_type['resources'].get('CPU')}, cluster.yaml has 0")
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    if len(workers) != 1:
        return problems + [f"{len(workers)} worker groups, cluster.yaml has one"]
    (node_type,) = workers.values()
    for key in ("CPU", "GPU"):
        if node_type["resources"].get(key) != worker["resources"][key]:
            problems.append(f"worker {key}: {node_type['resources'].get(key)}, cluster.yaml {worker['resources'][key]}")
    for key in ("min_workers", "max_workers"):
        if node_type[key] != worker[key]:
            problems.append(f"worker {key}: {node_type[key]}, cluster.yaml {worker[key]}")
    container = ray_container(gpu_group(doc))
    limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
    if limits.get("nvidia.com/gpu") != worker["resources"]["GPU"]:
        problems.append(f"worker limits nvidia.com/gpu {limits.get('nvidia.com/gpu')}")
    if requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu")) != limits.get("nvidia.com/gpu"):
        problems.append("worker requests nvidia.com/gpu differ from its limits (Kubernetes refuses that)")
    if int(limits.get("cpu", 0)) != worker["resources"]["CPU"]:
        problems.append(f"worker limits cpu {limits.get('cpu')}, cluster.yaml {worker['resources']['CPU']}")
    if int(requests.get("cpu", limits.get("cpu", 0))) > int(limits.get("cpu", 0)):
        problems.append("worker requests more cpu than its limit")
    return problems


def secret_problems(docs: list[dict], known: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    for doc in docs:
        for container in containers(doc):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in known.get(ref["name"], {}):
                    problems.append(f"{doc['metadata']['name']}: {item['name']} reads {ref['name']}/{ref['key']}")
            for source in container.get("envFrom", []):
                name = source.get("secretRef", {}).get("name")
                if name and name not in known:
                    problems.append(f"{doc['metadata']['name']}: envFrom Secret {name}")
    return problems


def service_problems(deployment: dict, service: dict) -> list[str]:
    """The Service selects the Deployment's pods and sends to a port the container declares."""
    problems = []
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    if deployment["spec"]["selector"]["matchLabels"].items() - labels.items():
        problems.append("the Deployment's selector does not match its own pods")
    if not service["spec"]["selector"] or service["spec"]["selector"].items() - labels.items():
        problems.append(f"the Service selects {service['spec']['selector']}, the pods have {labels}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["containerPort"]: p for p in container.get("ports", [])}
    by_name = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        if by_name.get(target, target) not in ports:
            problems.append(f"Service port {port['port']} targets {target}, not a container port")
    return problems


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerignore() -> list[str]:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions: not understood by ignored() below"
    return patterns


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for the two forms used: `**/NAME` (a file or folder NAME at any depth) and a path."""
    parts = path.split("/")
    for pattern in patterns:
        if pattern.startswith("**/") and "/" not in pattern[3:]:
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif path == pattern or path.startswith(pattern.rstrip("/") + "/"):
            return True
    return False


def entrypoint_args(doc: dict) -> list[str]:
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "orchestrator.sweep"], words
    return words[3:]


# ------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "secrets.example.yaml"])
def test_every_document_parses_and_is_named(name):
    docs = load_all(name)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and DNS_LABEL.fullmatch(doc["metadata"]["name"])


def test_the_ray_manifests_are_kuberay_v1():
    assert load("raycluster.yaml", "RayCluster")["apiVersion"] == "ray.io/v1"
    assert load("rayjob.yaml", "RayJob")["apiVersion"] == "ray.io/v1"
    assert load("raycluster.yaml", "RayCluster")["metadata"]["name"] == "has-sweep"


def test_the_raycluster_has_what_kuberay_requires():
    assert kuberay_problems(load("raycluster.yaml", "RayCluster")["spec"]) == []


@pytest.mark.parametrize("breakage", [
    lambda s: s["headGroupSpec"].pop("rayStartParams"),
    lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
    lambda s: s["workerGroupSpecs"][0].update(replicas=5),
    lambda s: s["workerGroupSpecs"][0].update(groupName="gpu_worker"),
    lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": 48}),
    lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["volumes"].pop(),
])
def test_the_kuberay_check_bites(breakage):
    spec = copy.deepcopy(load("raycluster.yaml", "RayCluster")["spec"])
    breakage(spec)
    assert kuberay_problems(spec)


def test_no_trial_runs_on_the_head():
    doc = load("raycluster.yaml", "RayCluster")
    assert head(doc)["rayStartParams"]["num-cpus"] == "0"
    assert cluster_yaml()["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_the_nodes_have_cluster_yaml_shape_as_ray_derives_it():
    assert shape_problems(load("raycluster.yaml", "RayCluster")) == []


@pytest.mark.parametrize("breakage", [
    lambda d: ray_container(gpu_group(d))["resources"]["limits"].update({"nvidia.com/gpu": 2}),
    lambda d: ray_container(gpu_group(d))["resources"]["requests"].update({"nvidia.com/gpu": 2}),
    lambda d: gpu_group(d)["rayStartParams"].update({"num-cpus": "32"}),
    lambda d: gpu_group(d).update(maxReplicas=8),
    lambda d: head(d)["rayStartParams"].pop("num-cpus"),
])
def test_the_shape_check_bites(breakage):
    doc = copy.deepcopy(load("raycluster.yaml", "RayCluster"))
    breakage(doc)
    assert shape_problems(doc)


def test_the_autoscaler_behaves_as_cluster_yaml():
    doc, reference = load("raycluster.yaml", "RayCluster"), cluster_yaml()
    config = derived(doc)
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    assert config["idle_timeout_minutes"] == reference["idle_timeout_minutes"]
    assert config["upscaling_speed"] == reference["upscaling_speed"]


def test_the_sweeps_resource_check_sees_the_node_types_the_autoscaler_may_start(monkeypatch):
    """With no GPU worker up yet, the driver checks the trials against the autoscaler's node types;
    the head points it at the cluster.yaml in the image, which must list this RayCluster's workers."""
    import orchestrator.launch as launch

    doc = load("raycluster.yaml", "RayCluster")
    path = env_of(ray_container(head(doc)))["HAS_SWEEP_AUTOSCALER_CONFIG"]
    assert path.startswith(IMAGE_REPO + "/")
    monkeypatch.setattr(launch, "BOOTSTRAP_CONFIG", ROOT / path[len(IMAGE_REPO) + 1:])
    types, _ = launch.autoscaler_node_types()
    config = derived(doc)
    expected = [({k: v for k, v in t["resources"].items() if k in ("CPU", "GPU")}, t["max_workers"])
                for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert types == expected


def test_the_driver_reads_the_autoscaler_config_from_that_variable():
    code = "from orchestrator.launch import BOOTSTRAP_CONFIG; print(BOOTSTRAP_CONFIG)"
    env = {**os.environ, "HAS_SWEEP_AUTOSCALER_CONFIG": "/somewhere/cluster.yaml"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "/somewhere/cluster.yaml", done.stderr[-2000:]


def test_worker_pods_have_shared_memory_and_the_data():
    group = gpu_group(load("raycluster.yaml", "RayCluster"))
    pod, container = group["template"]["spec"], ray_container(group)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    data = volumes[mounts["/data"]["name"]]
    assert mounts["/data"].get("readOnly") and ("persistentVolumeClaim" in data or "hostPath" in data)
    assert env_of(container)["TORCH_HOME"].startswith("/data/")  # the ImageNet weights: never downloaded


def test_the_rayjob_runs_on_the_raycluster_spec():
    job, cluster = load("rayjob.yaml", "RayJob"), load("raycluster.yaml", "RayCluster")
    assert "clusterSelector" not in job["spec"]
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_the_rayjobs_cluster_passes_the_same_checks():
    job = load("rayjob.yaml", "RayJob")
    as_cluster = {"kind": "RayCluster", "metadata": dict(job["metadata"]), "spec": job["spec"]["rayClusterSpec"]}
    assert kuberay_problems(as_cluster["spec"]) == [] and shape_problems(as_cluster) == []


def test_the_rayjob_comparison_bites():
    job = copy.deepcopy(load("rayjob.yaml", "RayJob"))
    ray_container(job["spec"]["rayClusterSpec"]["headGroupSpec"])["env"].pop(0)
    assert job["spec"]["rayClusterSpec"] != load("raycluster.yaml", "RayCluster")["spec"]


def test_the_rayjob_cleans_up_and_submits_in_a_known_mode():
    spec = load("rayjob.yaml", "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES


def test_the_rayjob_entrypoint_parses_with_the_sweeps_own_parser():
    from orchestrator.sweep import parse_args

    args = parse_args(entrypoint_args(load("rayjob.yaml", "RayJob")))
    head_dir = ray_container(head(load("raycluster.yaml", "RayCluster")))["workingDir"]
    assert head_dir == IMAGE_REPO  # where the relative --space is resolved
    space = Path(args.space)
    assert not space.is_absolute() and space.parent == Path("search_spaces") and (ROOT / space).is_file()
    assert args.storage_path.startswith("s3://") and not args.overrides


def test_the_rayjob_entrypoint_is_one_command():
    words = shlex.split(load("rayjob.yaml", "RayJob")["spec"]["entrypoint"], posix=True)
    assert not {"&&", "||", ";", "|", "&"} & set(words) and not any(w.endswith(";") for w in words)


def test_the_rayjob_data_is_where_the_workers_mount_it():
    from orchestrator.sweep import parse_args

    args = parse_args(entrypoint_args(load("rayjob.yaml", "RayJob")))
    mounts = [m["mountPath"] for m in ray_container(gpu_group(load("raycluster.yaml", "RayCluster")))["volumeMounts"]]
    assert any(Path(args.data).is_relative_to(m) for m in mounts if m != "/dev/shm")


def test_the_rayjob_sweep_loads_and_the_docs_resume_it_by_name():
    from orchestrator.sweep import load_sweep, parse_args

    args = parse_args(entrypoint_args(load("rayjob.yaml", "RayJob")))
    spec, _, _ = load_sweep(args)  # every trial of the sweep file is validated
    resumes = re.findall(r"--resume (\S+) --storage-path ([^\s|'\"]+)", (ROOT / "docs" / "kubernetes.md").read_text())
    assert resumes and set(resumes) == {(spec.name, args.storage_path)}


def test_the_dockerfile_starts_from_cluster_yaml_image():
    froms = [args for op, args in dockerfile() if op == "FROM"]
    assert froms == [cluster_yaml()["docker"]["image"]]


def test_the_dockerfile_installs_with_cluster_yaml_setup_commands():
    runs = [args for op, args in dockerfile() if op == "RUN"]
    assert runs == cluster_yaml()["setup_commands"]


def test_the_dockerfile_puts_the_repository_where_cluster_yaml_does():
    steps = dockerfile()
    (copy_args,) = [args for op, args in steps if op == "COPY"]
    *flags, source, destination = copy_args.split()
    assert source == "." and destination == IMAGE_REPO and "--chown=ray:users" in flags
    assert cluster_yaml()["file_mounts"][IMAGE_REPO] == "."
    assert [args for op, args in steps if op == "WORKDIR"][-1] == IMAGE_REPO
    assert "USER" not in [op for op, _ in steps]  # the image's own user, ray, owns the copy
    assert [op for op, _ in steps].index("COPY") < [op for op, _ in steps].index("RUN")


def test_the_dockerignore_leaves_out_what_ray_up_leaves_out():
    patterns = dockerignore()
    for entry in cluster_yaml()["rsync_exclude"]:
        assert f"**/{entry.removeprefix('**/')}" in patterns, entry


def test_the_dockerignore_keeps_every_file_of_the_repository():
    done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    files = done.stdout.split()
    assert "orchestrator/sweep.py" in files
    assert [f for f in files if ignored(f, dockerignore())] == []
    assert ignored(".venv/bin/python", dockerignore()) and ignored("orchestrator/__pycache__/x.pyc", dockerignore())


def test_the_ray_versions_agree():
    version = ray_pin()
    assert cluster_yaml()["docker"]["image"].split(":")[1].split("-")[0] == version
    assert load("raycluster.yaml", "RayCluster")["spec"]["rayVersion"] == version
    assert load("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == version
    images = {c["image"] for doc in all_manifests() for c in containers(doc)}
    assert len(images) == 1  # one image everywhere: the Ray pods and the MLflow server
    (image,) = images
    assert image.rsplit(":", 1)[1].split("-")[0] == version


def test_every_secret_reference_exists_in_the_example():
    assert secret_problems(all_manifests(), secrets()) == []


def test_the_secret_check_bites():
    known = copy.deepcopy(secrets())
    del known["has-sweep-mlflow"]["MLFLOW_TRACKING_PASSWORD"]
    assert secret_problems(all_manifests(), known)
    broken = copy.deepcopy(all_manifests())
    containers(broken[0])[0].setdefault("envFrom", []).append({"secretRef": {"name": "has-sweep-missing"}})
    assert secret_problems(broken, secrets())


def test_the_example_secrets_hold_placeholders_only():
    for name, values in secrets().items():
        for key, value in values.items():
            if re.search(r"PASSWORD|SECRET|KEY_ID|URI", key):
                assert "CHANGE-ME" in value, f"{name}/{key}"


def test_the_example_login_is_the_admins():
    mlflow = secrets()["has-sweep-mlflow"]
    assert mlflow["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert mlflow["MLFLOW_TRACKING_PASSWORD"] == mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_the_service_selects_the_mlflow_pods_and_their_port():
    deployment, service = load("mlflow.yaml", "Deployment"), load("mlflow.yaml", "Service")
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "has-sweep-mlflow"
    assert service_problems(deployment, service) == []


@pytest.mark.parametrize("breakage", [
    lambda d, s: s["spec"]["selector"].update({"app.kubernetes.io/name": "mlflow"}),
    lambda d, s: s["spec"]["ports"][0].update(targetPort=8080),
    lambda d, s: s["spec"]["ports"][0].update(targetPort="web"),
    lambda d, s: d["spec"]["selector"]["matchLabels"].update(tier="x"),
])
def test_the_service_check_bites(breakage):
    deployment, service = copy.deepcopy(load("mlflow.yaml", "Deployment")), copy.deepcopy(load("mlflow.yaml", "Service"))
    breakage(deployment, service)
    assert service_problems(deployment, service)


def test_the_mlflow_server_is_probed_on_health_at_its_port():
    (container,) = load("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    probe = container["readinessProbe"]["httpGet"]
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/health" and names.get(probe["port"], probe["port"]) == container["ports"][0]["containerPort"]
    assert container["command"] == ["bash", f"{IMAGE_REPO}/cluster/start_mlflow.sh"]


def test_the_head_logs_to_the_mlflow_service():
    service = load("mlflow.yaml", "Service")
    env = env_of(ray_container(head(load("raycluster.yaml", "RayCluster"))))
    uri = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert (uri.scheme, uri.hostname) == ("http", service["metadata"]["name"])
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"]


def test_the_driver_uses_the_heads_tracking_uri(monkeypatch):
    from orchestrator.tracking import default_tracking_uri

    env = env_of(ray_container(head(load("raycluster.yaml", "RayCluster"))))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    assert default_tracking_uri() == env["MLFLOW_TRACKING_URI"]


def test_mlflow_variables_of_the_deployment_are_read_by_start_mlflow_sh():
    script = START_MLFLOW.read_text()
    (container,) = load("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    names = [item["name"] for item in container["env"] if item["name"].startswith("MLFLOW_")]
    assert names
    unread = [n for n in names if not re.search(rf"\$\{{?{n}\b", script)]
    assert unread == []


def test_mlflow_home_is_a_folder_below_its_volume():
    """start_mlflow.sh chmods $MLFLOW_HOME: a mount point (root's) cannot be, a folder made in it can."""
    pod = load("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    home = Path(env_of(container)["MLFLOW_HOME"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if home.is_relative_to(m["mountPath"])]
    assert home != Path(mount["mountPath"]) and "emptyDir" in volumes[mount["name"]]


def test_start_mlflow_sh_with_the_deployments_env_serves_the_head(tmp_path):
    """The real script, with the Deployment's environment and a stand-in `mlflow` that records its
    arguments: it must listen on all interfaces at the container's port, use the Secret's stores,
    and accept the Host header the head sends (MLflow answers others with 403)."""
    pod = load("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container, namespace="sweeps")
    bin_dir, record = tmp_path / "bin", tmp_path / "mlflow-args"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "mlflow").chmod(0o755)
    env["MLFLOW_HOME"] = str(tmp_path / "state" / Path(env["MLFLOW_HOME"]).name)
    run_env = {**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    done = subprocess.run(container["command"][:1] + [str(START_MLFLOW)], env=run_env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    words = record.read_text().splitlines()
    option = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    assert words[0] == "server" and option["--app-name"] == "basic-auth"
    assert option["--host"] == "0.0.0.0" and int(option["--port"]) == container["ports"][0]["containerPort"]
    assert option["--backend-store-uri"] == secrets()["has-sweep-mlflow"]["MLFLOW_BACKEND_STORE_URI"]
    assert option["--artifacts-destination"].startswith("s3://")
    allowed = option["--allowed-hosts"].split(",")
    head_uri = urlsplit(env_of(ray_container(head(load("raycluster.yaml", "RayCluster"))))["MLFLOW_TRACKING_URI"])
    assert head_uri.netloc in allowed and "localhost:*" in allowed  # the head; kubectl port-forward to any port
    assert "has-sweep-mlflow.sweeps.svc.cluster.local:5000" in allowed  # from other namespaces
    auth = (Path(env["MLFLOW_HOME"]) / "basic_auth.ini").read_text()
    assert secrets()["has-sweep-mlflow"]["MLFLOW_AUTH_DATABASE_URI"] in auth
