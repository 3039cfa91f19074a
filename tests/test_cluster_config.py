"""Cluster configs under cluster/: Ray's own validation plus the project's rules; no cluster needed.

- launcher YAMLs (`ray up`, the fake local provider): `prepare_config` + `validate_config` from
  ray.autoscaler (offline), then node-type rules (GPU types scale to zero with explicit resources,
  no GPU on the head, every node on the project image with nothing installed at boot, instance
  profiles, token auth);
- cluster/runtime_env.yaml: parsed the way `ray job submit --runtime-env` parses it, validated by
  `ray.runtime_env.RuntimeEnv`, and packaged with Ray's own working-dir zipper to show the
  excludes alone keep data, weights, environments and caches out of the upload;
- KubeRay manifests: field names of KubeRay >= 1.6 (ray.io/v1), replica bounds, GPU groups,
  every entrypoint run as `python -m pipelines.<stage>` up to the point where it would launch, and
  the RayService's serveConfigV2 validated by Ray Serve's schema and equal to serve/config.yaml;
- no credentials anywhere in cluster/.
"""

from __future__ import annotations

import ast
import copy
import re
import runpy
import shlex
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
LAUNCHER_YAMLS = sorted(
    p for p in CLUSTER.glob("*.yaml") if "available_node_types" in yaml.safe_load(p.read_text())
)
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
# rayproject/ray:<ray version>-py3XX-<cpu|gpu|cuXXX>
RAY_IMAGE = re.compile(
    r"^rayproject/ray:(?P<ray>[0-9.]+)-(?P<py>py3\d+)-(?P<platform>cpu|gpu|cu\d+)$"
)
# <registry>/svg-ray:<svg-ray version>-ray<ray version>-py3XX-<cpu|gpu> (cluster/Dockerfile)
PROJECT_IMAGE = re.compile(
    r"^[a-z0-9.-]+(:[0-9]+)?/svg-ray:(?P<version>[0-9.]+)-ray(?P<ray>[0-9.]+)-(?P<py>py3\d+)"
    r"-(?P<platform>cpu|gpu)$"
)
GPU_INSTANCE = re.compile(
    r"^(g\d+[a-z]*|p\d+[a-z]*)\."
)  # AWS accelerated families: g5, g6e, p4d, p5


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_every_config_is_covered() -> None:
    """The launcher YAMLs, the runtime_env and the KubeRay manifests this file checks exist."""
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws.yaml", "local-fake.yaml"}
    assert RUNTIME_ENV.is_file()
    kinds = {d["kind"] for p in MANIFESTS for d in yaml.safe_load_all(p.read_text())}
    assert {"RayJob", "RayService"} <= kinds


# --------------------------------------------------------------------------------------------
# Cluster launcher YAMLs
# --------------------------------------------------------------------------------------------


def _prepared(path: Path) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_yaml_passes_ray_validation(path: Path) -> None:
    """Ray's own schema: unknown keys, wrong types, head type, global max vs min workers."""
    config = _prepared(path)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_node_types(path: Path) -> None:
    """Workers scale to zero, declare their resources, fit under the global cap; head has no GPU."""
    config = _load(path)
    head = config["head_node_type"]
    assert config.get("idle_timeout_minutes", 0) > 0, "idle nodes must be removed"
    for name, node_type in config["available_node_types"].items():
        resources = node_type.get("resources", {})
        if name == head:
            assert resources.get("GPU", 0) == 0, "the head must not offer GPUs"
            assert node_type.get("max_workers", 0) == 0
            continue
        instance = node_type["node_config"].get("InstanceType", "")
        is_gpu = resources.get("GPU", 0) > 0 or bool(GPU_INSTANCE.match(instance))
        # Explicit resources: the autoscaler plans with these without asking the cloud, and a GPU
        # type without them is launched for nothing (prepare_config cannot fill them offline).
        assert resources.get("CPU", 0) > 0, f"{name}: set resources.CPU explicitly"
        if is_gpu:
            assert resources.get("GPU", 0) > 0, f"{name}: GPU instance type needs resources.GPU"
            assert node_type.get("min_workers", 0) == 0, f"{name}: idle GPU nodes must go away"
        # Ray does not check a type's min against its own max.
        assert (
            0
            <= node_type.get("min_workers", 0)
            <= node_type["max_workers"]
            <= config["max_workers"]
        )


def test_aws_head_schedules_nothing() -> None:
    """CPU 0 on the head, both in the autoscaler's view and in `ray start --head`."""
    config = _load(CLUSTER / "aws.yaml")
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-cpus=0" in start


def _project_version() -> str:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return str(version)


def _aws_images(config: dict[str, Any]) -> list[str]:
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image"), docker.get("worker_image")]
    images += [
        t.get("docker", {}).get(k)
        for t in config["available_node_types"].values()
        for k in ("image", "worker_image", "head_image")
    ]
    return [i for i in images if i]


def test_aws_nodes_run_the_project_image() -> None:
    """Every node runs the image cluster/Dockerfile builds, tagged with this svg-ray, Ray and
    Python; the head and CPU types do not swap in a bare Ray image that lacks the project."""
    config = _load(CLUSTER / "aws.yaml")
    images = _aws_images(config)
    assert images == [config["docker"]["image"]], f"one image for every node type: {images}"
    m = PROJECT_IMAGE.match(images[0])
    assert m, f"{images[0]}: expected <registry>/svg-ray:<version>-ray<ray>-py3XX-gpu"
    assert m["version"] == _project_version(), "tag the image with the svg-ray version"
    assert m["ray"] == ray.__version__, f"{images[0]}: Ray {m['ray']} != {ray.__version__}"
    assert m["py"] == PY_TAG and m["platform"] == "gpu", "GPU workers need a GPU image"
    assert not RAY_IMAGE.match(images[0]), "a bare rayproject/ray image lacks svg-ray and torch"
    # The tag documented in the Dockerfile (how to build it) is the one the cluster pulls.
    built = re.findall(r"docker build -f cluster/Dockerfile -t \S+?/(svg-ray:\S+) \.",
                       (CLUSTER / "Dockerfile").read_text())  # fmt: skip
    assert built and all(images[0].endswith("/" + t) for t in built), built
    assert config["docker"].get("pull_before_run") is True


def test_aws_nodes_install_nothing() -> None:
    """No node pip-installs anything (torch would take minutes per autoscaled GPU node), not even
    through Ray's AWS defaults; the checkout is not mounted: code comes with each job."""
    config = _load(CLUSTER / "aws.yaml")
    prepared = _prepared(CLUSTER / "aws.yaml")
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands")
    for key in (*keys, "initialization_commands"):
        for cmd in prepared.get(key, []):
            assert not re.search(r"\b(pip|pip3|uv|conda|mamba)\b.*\binstall\b", cmd), (key, cmd)
            assert "torch" not in cmd, (key, cmd)
    for key in keys:
        assert config[key] == [], f"{key}: the image has everything"
    assert "." not in config["file_mounts"].values(), "the checkout is in the image, not mounted"
    # The image is pulled with the node's instance profile (no registry password anywhere).
    login = " ".join(config.get("initialization_commands", []))
    registry = config["docker"]["image"].split("/", 1)[0]
    assert (
        "aws ecr get-login-password" in login and registry in login and "--password-stdin" in login
    )


def test_aws_instance_profiles_and_token_auth() -> None:
    """Every node reaches S3 through an instance profile; every node requires the Ray token."""
    config = _load(CLUSTER / "aws.yaml")
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name}: no IamInstanceProfile"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_local_fake_uses_the_external_fake_provider() -> None:
    """`type: fake_multinode` needs a file the wheel lacks; the head must be ray.head.default."""
    config = _load(CLUSTER / "local-fake.yaml")
    assert config["provider"]["type"] == "external"
    module = config["provider"]["module"]
    assert module.endswith("fake_multi_node.node_provider.FakeMultiNodeProvider")
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE
    # Learnt the hard way: without these the autoscaler drops the fake nodes' load reports (all
    # share 127.0.0.1) or its launcher thread dies on config["auth"]; it then never scales.
    assert config["provider"].get("use_node_id_as_ip") is True
    assert "auth" in config
    types = config["available_node_types"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values()), "a GPU-typed worker"
    assert any(
        "GPU" not in t["resources"] and n != FAKE_HEAD_NODE_TYPE for n, t in types.items()
    ), "a CPU worker type"


# --------------------------------------------------------------------------------------------
# runtime_env for `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`
# --------------------------------------------------------------------------------------------


def _runtime_env(working_dir: Path) -> dict[str, Any]:
    """The runtime_env exactly as the `ray job submit` CLI builds it from our file."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=str(working_dir))


def test_runtime_env_is_valid_for_ray() -> None:
    """Ray's RuntimeEnv accepts it; only known fields; no per-job installs; offline hub."""
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env(REPO)
    RuntimeEnv(**env)  # raises on wrong types (excludes, env_vars, ...)
    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"RuntimeEnv silently accepts unknown fields: {unknown}"
    # The image has the project and its pinned dependencies (see the file's header).
    assert not {"pip", "uv", "conda", "container", "image_uri", "py_executable"} & set(env)
    assert "working_dir" not in _load(RUNTIME_ENV), "--working-dir . sets it on the command line"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def _package(working_dir: Path, out: Path, *, use_file: bool) -> list[str]:
    """Zip ``working_dir`` with Ray's own packaging, the way `ray job submit` does; names inside."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    env = _runtime_env(working_dir) if use_file else {"working_dir": str(working_dir)}
    seen: dict[str, Any] = {}

    def capture(path: str, excludes: list[str] | None = None, is_file: bool = False) -> None:
        seen.update(path=path, excludes=list(excludes or []))

    # Merges Ray's default excludes (turned off by the caller) with the file's, as the CLI does.
    upload_working_dir_if_needed(env, include_gitignore=False, upload_fn=capture)
    create_package(seen["path"], out, include_gitignore=False, excludes=seen["excludes"])
    with zipfile.ZipFile(out) as z:
        return z.namelist()


# Planted in a copy of the repository: path -> size in bytes (random, so zip cannot shrink them).
_PLANTED = {
    ".git/objects/pack/pack-0.pack": 3 << 20,
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so": 3 << 20,
    "venv-gpu/bin/python": 1 << 10,
    "outputs/bench/serve.json": 1 << 10,
    "outputs/demo/bundle/dit_ema.safetensors": 3 << 20,
    "outputs/mlflow.db": 1 << 10,
    "data/train/3/img_0001.png": 1 << 10,
    "dinov3_vits16plus.pth": 3 << 20,
    "weights/vgg16.safetensors": 1 << 10,
    "VIRTUAL_imagenet256_labeled.npz": 1 << 10,
    "latents/part-000000.parquet": 1 << 10,
    "svg_ray/__pycache__/config.cpython-311.pyc": 1 << 10,
    "node_modules/playwright/index.js": 1 << 10,
    ".mypy_cache/3.11/svg_ray.data.json": 1 << 10,
    ".ruff_cache/0.6/cache": 1 << 10,
    ".pytest_cache/v/cache/lastfailed": 1 << 10,
    "svg_ray.egg-info/PKG-INFO": 1 << 10,
    ".env": 1 << 10,
}


def test_runtime_env_excludes_keep_the_upload_small(tmp_path: Path, monkeypatch: Any) -> None:
    """The file's excludes alone (no .gitignore, no Ray defaults) drop every planted heavy path."""
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    tree = tmp_path / "repo"
    tree.mkdir()
    for name in ("svg_ray", "pipelines", "serve", "cluster", "tests"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    rng = __import__("random").Random(0)
    for rel, size in _PLANTED.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(rng.randbytes(size))
    planted_bytes = sum(_PLANTED.values())

    # Control: without the file everything goes up, so the fixture really plants heavy content.
    control = _package(tree, tmp_path / "control.zip", use_file=False)
    assert set(_PLANTED) <= set(control)
    assert (tmp_path / "control.zip").stat().st_size > planted_bytes

    names = _package(tree, tmp_path / "job.zip", use_file=True)
    leaked = sorted(n for n in names if any(n == p or n.startswith(p) for p in _PLANTED))
    assert not leaked, f"uploaded despite cluster/runtime_env.yaml: {leaked}"
    size = (tmp_path / "job.zip").stat().st_size
    assert size < planted_bytes / 4 and size < 5 << 20, f"package is {size / 2**20:.1f} MiB"
    # What the job needs is there, including the svg_ray/data package ("data/" must be anchored).
    for needed in (
        "pipelines/precompute.py",
        "svg_ray/data/precompute.py",
        "serve/app.py",
        "serve/config.yaml",
        "constraints.txt",
    ):
        assert needed in names


def test_runtime_env_real_checkout_fits(tmp_path: Path, monkeypatch: Any) -> None:
    """This checkout, as `ray job submit` would zip it, stays far below the 100 MiB limit."""
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    names = _package(REPO, tmp_path / "job.zip", use_file=True)
    size = (tmp_path / "job.zip").stat().st_size
    assert size < 20 << 20, f"{size / 2**20:.1f} MiB: something heavy is not excluded"
    assert not [n for n in names if n.startswith((".venv", ".git/", "outputs/"))]


# --------------------------------------------------------------------------------------------
# KubeRay manifests (ray.io/v1, field names of KubeRay v1.6.0's apis/ray/v1/*_types.go)
# --------------------------------------------------------------------------------------------

_RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
    "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
_RAYSERVICE_SPEC = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "managedBy",
    "rayClusterConfig", "rayClusterDeletionDelaySeconds", "serveConfigV2", "serveService",
    "serviceUnhealthySecondThreshold", "upgradeStrategy",
}  # fmt: skip
_CLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
    "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
_HEAD_GROUP = {
    "enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType",
    "template",
}  # fmt: skip
_WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}  # fmt: skip
_AUTOSCALER = {
    "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
    "securityContext", "upscalingMode", "version", "volumeMounts",
}  # fmt: skip
_AUTH = {"enableK8sTokenAuth", "mode", "secretName"}
_SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "SidecarMode"}  # InteractiveMode ignores entrypoint
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _docs(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}:{d['metadata']['name']}", d)
        for p in MANIFESTS
        for d in yaml.safe_load_all(p.read_text())
        if d and d.get("kind") == kind
    ]


RAYJOBS = _docs("RayJob")
RAYSERVICES = _docs("RayService")


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec["rayClusterConfig"]


def _unknown(d: dict[str, Any], allowed: set[str], where: str) -> list[str]:
    return [f"{where}.{k}" for k in d if k not in allowed]


def test_manifests_are_known_kinds() -> None:
    """Every document is a ray.io/v1 RayJob/RayService or the ServiceAccount they use."""
    allowed = {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"), ("v1", "ServiceAccount")}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            assert (doc["apiVersion"], doc["kind"]) in allowed, path.name
            name = doc["metadata"]["name"]
            # RayService names are DNS-1035 labels; KubeRay appends suffixes to cluster names.
            assert _DNS1035.match(name) and len(name) <= 40, f"{path.name}: bad name {name!r}"


@pytest.mark.parametrize(
    ("where", "doc"), RAYJOBS + RAYSERVICES, ids=[w for w, _ in RAYJOBS + RAYSERVICES]
)
def test_kuberay_fields_are_known(where: str, doc: dict[str, Any]) -> None:
    """No field KubeRay would silently drop (a typo in shutdownAfterJobFinishes costs GPUs)."""
    spec = doc["spec"]
    cluster = _cluster_spec(doc)
    bad = _unknown(spec, _RAYJOB_SPEC if doc["kind"] == "RayJob" else _RAYSERVICE_SPEC, "spec")
    bad += _unknown(cluster, _CLUSTER_SPEC, "cluster")
    bad += _unknown(cluster["headGroupSpec"], _HEAD_GROUP, "headGroupSpec")
    bad += _unknown(cluster.get("autoscalerOptions", {}), _AUTOSCALER, "autoscalerOptions")
    bad += _unknown(cluster.get("authOptions", {}), _AUTH, "authOptions")
    for group in cluster.get("workerGroupSpecs", []):
        bad += _unknown(group, _WORKER_GROUP, f"workerGroupSpecs[{group.get('groupName')}]")
    assert not bad, f"{where}: unknown fields {bad}"


def _pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


def _gpus(pod: dict[str, Any]) -> int:
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def _cpus(pod: dict[str, Any]) -> float:
    cpu = str(pod["containers"][0]["resources"]["limits"]["cpu"])
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


@pytest.mark.parametrize(
    ("where", "doc"), RAYJOBS + RAYSERVICES, ids=[w for w, _ in RAYJOBS + RAYSERVICES]
)
def test_kuberay_cluster_spec(where: str, doc: dict[str, Any]) -> None:
    """Head and worker groups as KubeRay needs them; autoscaling, token auth, IRSA, pinned image."""
    cluster = _cluster_spec(doc)
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True and "autoscalerOptions" in cluster
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0", "nothing but drivers on the head"
    groups = cluster.get("workerGroupSpecs", [])
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g
    for name, pod in _pods(cluster):
        assert pod["containers"], name
        # rayStartParams are map[string]string: an unquoted number fails at apply time.
        params = head if name == "head" else next(g for g in groups if g["groupName"] == name)
        assert all(isinstance(v, str) for v in params["rayStartParams"].values()), name
        assert pod.get("serviceAccountName"), f"{name}: S3 access comes from the service account"
        container = pod["containers"][0]
        assert container["name"] and container["image"]
        assert f"ray{ray.__version__}" in container["image"], (
            f"{name}: image not at Ray {ray.__version__}"
        )
        res = container["resources"]
        if _gpus(pod):
            assert res["requests"].get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"]
        for env in container.get("env", []):
            assert "value" not in env or not re.search("TOKEN|SECRET|PASSWORD|KEY", env["name"])
    assert _gpus(_pods(cluster)[0][1]) == 0, "the head has no GPU"
    assert any(_gpus(p) for _, p in _pods(cluster)[1:]), "a GPU worker group"


@pytest.mark.parametrize(("where", "doc"), RAYJOBS, ids=[w for w, _ in RAYJOBS])
def test_rayjob_lifecycle_and_runtime_env(where: str, doc: dict[str, Any]) -> None:
    """Clusters go away after the job; GPU groups start at zero; env matches runtime_env.yaml."""
    from ray.runtime_env import RuntimeEnv

    spec = doc["spec"]
    assert spec["entrypoint"].strip()
    assert spec.get("submissionMode", "K8sJobMode") in _SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert set(env) <= RuntimeEnv.known_fields
    assert not {"pip", "uv", "conda", "working_dir"} & set(env), "the code is in the image"
    assert env["env_vars"] == _load(RUNTIME_ENV)["env_vars"]
    for g in _cluster_spec(doc)["workerGroupSpecs"]:
        if _gpus(g["template"]["spec"]):
            assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, g["groupName"]


class _LaunchedError(Exception):
    """Raised instead of starting the job: everything before it (flags, configs) was accepted."""


@pytest.mark.parametrize(("where", "doc"), RAYJOBS, ids=[w for w, _ in RAYJOBS])
def test_rayjob_entrypoint_runs_as_written(
    where: str, doc: dict[str, Any], monkeypatch: Any
) -> None:
    """`python -m pipelines.<stage> <flags>` up to the launch: module, __main__, flags, types."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("pipelines."), argv[:3]
    module_name, args = argv[2], argv[3:]
    assert (REPO / (module_name.replace(".", "/") + ".py")).is_file(), module_name
    module = __import__(module_name, fromlist=["main"])

    def launched(*a: Any, **kw: Any) -> None:
        raise _LaunchedError(a, kw)

    patched = 0
    for name in ("launch", "run_precompute"):  # where each pipeline hands over to the library
        fn = getattr(module, name, None)
        if callable(fn):
            monkeypatch.setattr(module, name, launched)
            monkeypatch.setattr(sys.modules[fn.__module__], name, launched)
            patched += 1
    assert patched == 1, f"{module_name}: cannot find its launch function"
    monkeypatch.setattr(sys, "argv", [module.__file__, *args])
    # The same path `python -m` takes: the module's `if __name__ == "__main__"` block.
    try:
        runpy.run_module(module_name, run_name="__main__", alter_sys=True)
    except _LaunchedError:
        return
    except SystemExit as e:
        pytest.fail(f"`{' '.join(argv[:3])}` exited with {e.code} before launching (see stderr)")
    pytest.fail(f"{module_name} returned without launching")


@pytest.mark.parametrize(("where", "doc"), RAYSERVICES, ids=[w for w, _ in RAYSERVICES])
def test_rayservice_serve_config(where: str, doc: dict[str, Any]) -> None:
    """serveConfigV2 passes Serve's schema, equals serve/config.yaml, and fits the worker groups."""
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config == _load(REPO / "serve" / "config.yaml"), (
        "serveConfigV2 drifted from serve/config.yaml: paste the file into the manifest again"
    )
    cluster = _cluster_spec(doc)
    workers = [(g, g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    gpu_capacity = sum(g["maxReplicas"] * _gpus(p) for g, p in workers)
    gpu_demand = 0.0
    for app in serve_config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        source = REPO / (module.replace(".", "/") + ".py")
        defined = {n.name for n in ast.parse(source.read_text()).body if hasattr(n, "name")}
        assert attr in defined, f"{app['import_path']} does not exist"
        for dep in app["deployments"]:
            opts = dep.get("ray_actor_options", {})
            gpus, cpus = opts.get("num_gpus", 0), opts.get("num_cpus", 1)
            fits = [g["groupName"] for g, p in workers if _gpus(p) >= gpus and _cpus(p) >= cpus]
            assert fits, f"no worker group fits a {dep['name']} replica ({cpus} CPU, {gpus} GPU)"
            limits = dep.get("autoscaling_config", {})
            gpu_demand += gpus * limits.get("max_replicas", dep.get("num_replicas", 1))
        assert gpu_capacity >= gpu_demand, "GPU groups cannot hold max_replicas samplers"
    gpu_groups = [g for g, p in workers if _gpus(p)]
    sampler = next(
        d
        for a in serve_config["applications"]
        for d in a["deployments"]
        if d["name"] == "SVGSampler"
    )
    assert (
        min(g["minReplicas"] for g in gpu_groups) >= sampler["autoscaling_config"]["min_replicas"]
    )


def test_dockerfile_pins_ray_and_installs_the_project() -> None:
    """The KubeRay image: FROM the installed Ray version, svg-ray installed with constraints.txt."""
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base and RAY_IMAGE.match(base[1]), text
    m = RAY_IMAGE.match(base[1])
    assert m["ray"] == ray.__version__ and m["py"] == PY_TAG  # type: ignore[index]
    assert re.search(r"pip install .*-c constraints\.txt \.", text)


# --------------------------------------------------------------------------------------------
# No credentials anywhere
# --------------------------------------------------------------------------------------------

_KEY_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"aws_access_key_id|aws_secret_access_key|aws_session_token", re.I),
    re.compile(r"secretAccessKey|accessKeyId", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE_KEY", re.I)


def _walk(node: Any, path: str = "") -> list[str]:
    """Mapping keys that look like secrets and carry an inline string value."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and _SECRET_NAME.search(node["name"]):
            if "value" in node:  # env var given inline instead of valueFrom/secretKeyRef
                found.append(f"{path}.{node['name']}")
        for k, v in node.items():
            if isinstance(k, str) and _SECRET_NAME.search(k) and isinstance(v, str):
                # References are fine: a Kubernetes Secret's name, a token file's path.
                if k != "secretName" and not v.startswith(("~/", "/")):
                    found.append(f"{path}.{k}")
            found += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _walk(v, f"{path}[{i}]")
    return found


def test_no_credentials_in_cluster_dir() -> None:
    """No keys, no inline secret values, no Kubernetes Secret objects with data."""
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert files
    for path in files:
        text = path.read_text()
        for pattern in _KEY_PATTERNS:
            assert not pattern.search(text), f"{path.relative_to(REPO)}: matches {pattern.pattern}"
        if path.suffix in {".yaml", ".yml"}:
            for doc in yaml.safe_load_all(text):
                assert not _walk(doc), f"{path.relative_to(REPO)}: inline secrets {_walk(doc)}"
                assert not (doc and doc.get("kind") == "Secret"), "create Secrets out of band"
                for embedded in ("runtimeEnvYAML", "serveConfigV2"):
                    inner = (doc or {}).get("spec", {}).get(embedded)
                    if inner:
                        assert not _walk(yaml.safe_load(inner)), f"{path.name}: {embedded}"
