"""Structural checks of the deploy files: docker-compose.yml, deploy/Dockerfile, deploy/k8s,
deploy/prometheus.yml and the Grafana dashboard.

Docker is not available where the tests run, so the files are parsed and their properties
asserted: references resolve, images are pinned, exposed services require auth and bind to
loopback, and every ``COMPACTOR_*`` name is a field of ``compactor.storage.settings.Settings`` (so the
files cannot drift from the code).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from compactor.storage.settings import Settings
from compactor.worker.runtime import metrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_FILE = DEPLOY / "prometheus.yml"
DASHBOARD_FILE = DEPLOY / "grafana-dashboard.json"

# Settings the deploy files already set but ``Settings`` does not have yet. The lead adds them;
# once a name is a field it is checked like every other one (this set only ever shrinks).
PENDING_SETTINGS: dict[str, str] = {
    "COMPACTOR_METRICS_PORT": "metrics_port: int | None = None (metrics.serve(settings.metrics_port))",
    "COMPACTOR_LOG_LEVEL": "log_level: str = 'WARNING' (read today by coordinator/cli/logs.py from os.environ)",
}

APP_SERVICES = ("coordinator", "worker-1", "worker-2", "flower")
EXPOSED_WITH_AUTH = ("redis", "minio", "flower")


# ------------------------------------------------------------------------------------ helpers

_VAR = re.compile(
    r"\$\$"
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-style interpolation; a variable without a default that is unset is an error."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?") and not value:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        if value is None:
            raise AssertionError(f"${{{name}}} has no default: `docker compose up` would need it set")
        return value

    return _VAR.sub(sub, text)


def _resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file after YAML anchors/merges and variable interpolation (empty env by default)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(raw, dict)
    return {key: (value if key.startswith("x-") else _resolve(value, env or {})) for key, value in raw.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def is_one_shot(service: Mapping[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference; a registry port is not a tag."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = image.rsplit(":", 1)
        return repo, tag, digest
    return image, None, digest


def assert_pinned(image: str, where: str, *, local: bool = False) -> None:
    """A pulled image names a version (or a digest); a locally built one at least a non-latest tag."""
    repo, tag, digest = split_image(image)
    assert repo, f"{where}: empty image reference"
    if digest:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{where}: bad digest in {image}"
        return
    assert tag, f"{where}: image {image} is not tagged (means :latest)"
    assert tag != "latest" and not tag.startswith("latest-"), f"{where}: image {image} uses a floating tag"
    if not local:
        # a full version (x.y.z) or a dated release, not a moving minor line like 3.11-slim
        assert re.search(r"\d+\.\d+\.\d+|RELEASE\.\d{4}-\d{2}-\d{2}", tag), f"{where}: {image} is not pinned"


def published_ports(service: Mapping[str, Any]) -> Iterator[tuple[str | None, str]]:
    """(host ip, container port) of every published port, short or long syntax."""
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            yield entry.get("host_ip"), str(entry.get("target"))
            continue
        parts = str(entry).split(":")
        if len(parts) == 3:
            yield parts[0], parts[2]
        else:
            yield None, parts[-1]


def settings_env_names() -> set[str]:
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        names.add((alias or f"COMPACTOR_{name}").upper())
    return names


def settings_from_env(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as a process with ``env`` would build them (no other COMPACTOR_ vars)."""
    import os

    for key in list(os.environ):
        if key.startswith("COMPACTOR_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def load_k8s() -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """Every k8s document by kind (multi-document files supported)."""
    by_kind: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict) and "kind" in doc, f"{path.name}: not a k8s object"
            by_kind.setdefault(doc["kind"], []).append((path, doc))
    return by_kind


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    return load_k8s()


def k8s_object(k8s: dict[str, list[tuple[Path, dict[str, Any]]]], kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _path, doc in k8s.get(kind, []) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


def deployment_for(k8s: dict[str, list[tuple[Path, dict[str, Any]]]], component: str) -> dict[str, Any]:
    matches = [
        doc
        for _path, doc in k8s.get("Deployment", [])
        if doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(matches) == 1, f"expected one Deployment of component {component}"
    return matches[0]


def pod_spec(deployment: Mapping[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def only_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    container = containers[0]
    assert isinstance(container, dict)
    return container


def container_env_names(container: Mapping[str, Any], k8s: dict[str, list[tuple[Path, dict[str, Any]]]]) -> set[str]:
    names = {item["name"] for item in container.get("env") or []}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            names |= set(k8s_object(k8s, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            names |= set(k8s_object(k8s, "Secret", source["secretRef"]["name"])["stringData"])
    return names


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


# ------------------------------------------------------------------------------------ compose


def test_compose_uses_the_compose_spec_and_defines_the_stack(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no `version:` key"
    assert set(compose["services"]) >= {"redis", "minio", "minio-init", *APP_SERVICES}
    for key in compose:
        assert key in {"name", "services", "volumes", "networks", "configs", "secrets"} or key.startswith("x-"), key


# The subset of the compose spec's service keys this file may use (the spec rejects unknown keys,
# so a typo such as `healtcheck` would only show up at `docker compose up`).
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "depends_on", "healthcheck",
    "ports", "volumes", "restart", "init", "read_only", "tmpfs", "cap_drop", "security_opt", "profiles",
    "stop_grace_period", "stop_signal", "cpus", "mem_limit", "user", "working_dir", "labels", "networks",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DEPENDS_ON_KEYS = {"condition", "restart", "required"}


def test_compose_services_use_only_known_keys(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert re.fullmatch(r"[a-zA-Z0-9._-]+", name)
        assert set(service) <= SERVICE_KEYS, f"{name}: unknown keys {set(service) - SERVICE_KEYS}"
        assert set(service.get("healthcheck", {})) <= HEALTHCHECK_KEYS, name
        for spec in (service.get("depends_on") or {}).values():
            assert set(spec) <= DEPENDS_ON_KEYS, name
        environment = service.get("environment") or {}
        assert isinstance(environment, dict), f"{name}: use a mapping for environment"
        assert all(isinstance(v, str | int | float | bool) for v in environment.values()), name


def test_every_variable_has_a_default_and_overrides_apply() -> None:
    load_compose({})  # raises on a variable without a default
    overridden = load_compose({"REDIS_PASSWORD": "override-redis", "MINIO_ROOT_PASSWORD": "override-minio"})
    services = overridden["services"]
    assert "override-redis" in command_of(services["redis"])
    for name in ("coordinator", "worker-1", "worker-2", "flower"):
        assert urlsplit(env_of(services[name])["COMPACTOR_REDIS_URL"]).password == "override-redis", name
    assert env_of(services["minio"])["MINIO_ROOT_PASSWORD"] == "override-minio"
    assert env_of(services["worker-1"])["COMPACTOR_S3_SECRET_ACCESS_KEY"] == "override-minio"


def test_depends_on_targets_exist_with_a_fitting_condition(services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            checked += 1
            assert target in services, f"{name} depends on undefined service {target}"
            assert target != name
            assert condition in {"service_healthy", "service_completed_successfully"}, (
                f"{name} -> {target}: use a condition, not just start order ({condition})"
            )
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"
            else:
                assert is_one_shot(services[target]), f"{name} waits for {target} to exit; it is not one-shot"
    assert checked >= 2 * len(APP_SERVICES)


def test_app_services_wait_for_redis_and_the_bucket(services: dict[str, dict[str, Any]]) -> None:
    for name in ("coordinator", "worker-1", "worker-2"):
        deps = depends_on(services[name])
        assert deps.get("redis") == "service_healthy", name
        assert deps.get("minio-init") == "service_completed_successfully", name
    assert depends_on(services["minio-init"]) == {"minio": "service_healthy"}
    assert depends_on(services["flower"]).get("redis") == "service_healthy"


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    one_shot = {name for name, service in services.items() if is_one_shot(service)}
    assert one_shot == {"minio-init"}
    for name, service in services.items():
        if name in one_shot:
            assert "healthcheck" not in service and not service.get("ports"), name
            continue
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), name
        test = check.get("test")
        assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, f"{name}: {test}"


def test_app_healthchecks_probe_the_metrics_port_or_flower(services: dict[str, dict[str, Any]]) -> None:
    for name in ("coordinator", "worker-1", "worker-2"):
        service = services[name]
        assert service["healthcheck"]["test"] == ["CMD", "compactor-healthcheck"], name
        assert env_of(service).get("COMPACTOR_METRICS_PORT"), f"{name}: the healthcheck needs the metrics port"
    flower_test = services["flower"]["healthcheck"]["test"]
    port = flower_port(services["flower"])
    assert flower_test == ["CMD", "compactor-healthcheck", f"http://127.0.0.1:{port}/healthcheck"]


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service, f"{name}: name the image (built ones get a local tag)"
        assert_pinned(service["image"], f"compose service {name}", local="build" in service)


def test_app_services_share_one_image_built_from_deploy_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
        images.add(services[name]["image"])
    assert len(images) == 1


def test_published_ports_are_bound_to_loopback(services: dict[str, dict[str, Any]]) -> None:
    for name in EXPOSED_WITH_AUTH:
        assert list(published_ports(services[name])), f"{name} is expected to be published for local use"
    for name, service in services.items():
        for host_ip, target in published_ports(service):
            assert host_ip == "127.0.0.1", f"{name} publishes {target} on {host_ip or 'all interfaces'}"
    unauthenticated = {name for name, service in services.items() if list(published_ports(service))} - set(
        EXPOSED_WITH_AUTH
    )
    assert unauthenticated <= {"prometheus", "grafana"}  # monitoring profile, loopback only


def redis_password(services: dict[str, dict[str, Any]]) -> str:
    command = command_of(services["redis"])
    assert command[0] == "redis-server"
    assert "--requirepass" in command, "redis must require a password"
    password = command[command.index("--requirepass") + 1]
    assert len(password) >= 8, "redis password is empty or trivially short"
    return password


def test_redis_requires_its_password_everywhere(services: dict[str, dict[str, Any]]) -> None:
    password = redis_password(services)
    command = command_of(services["redis"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])
    check = " ".join(services["redis"]["healthcheck"]["test"][1:])
    assert "redis-cli" in check and "ping" in check.lower() and "-a" in check.split()
    assert env_of(services["redis"]).get("REDIS_PASSWORD") == password, "the healthcheck's password"
    for name in APP_SERVICES:
        url = urlsplit(env_of(services[name])["COMPACTOR_REDIS_URL"])
        assert url.scheme == "redis" and url.hostname == "redis" and url.port == 6379, name
        assert url.password == password, f"{name} connects to redis with another password"


def test_minio_requires_credentials_that_clients_share(services: dict[str, dict[str, Any]]) -> None:
    minio_env = env_of(services["minio"])
    user, password = minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]
    assert len(user) >= 3 and len(password) >= 8, "MinIO refuses shorter root credentials"
    assert command_of(services["minio"])[:2] == ["server", "/data"]
    assert any(volume.endswith(":/data") for volume in services["minio"]["volumes"])
    init_env = env_of(services["minio-init"])
    mc_host = urlsplit(init_env["MC_HOST_local"])
    assert (mc_host.username, mc_host.password, mc_host.hostname) == (user, password, "minio")
    for name in ("coordinator", "worker-1", "worker-2"):
        env = env_of(services[name])
        assert env["COMPACTOR_S3_ACCESS_KEY_ID"] == user and env["COMPACTOR_S3_SECRET_ACCESS_KEY"] == password, name
        assert urlsplit(env["COMPACTOR_S3_ENDPOINT_URL"]).hostname == "minio", name
        command = command_of(services["minio-init"])
        assert command[0] == "mb" and command[-1] == f"local/{env['COMPACTOR_S3_BUCKET']}", "bucket drift"


def flower_port(service: Mapping[str, Any]) -> int:
    for part in command_of(service):
        if part.startswith("--port="):
            return int(part.split("=", 1)[1])
    return 5555


def test_flower_requires_basic_auth(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    entry = flower.get("entrypoint")
    assert [*(entry if isinstance(entry, list) else shlex.split(entry)), *command_of(flower)][:4] == [
        "celery",
        "-A",
        "compactor.worker.runtime.app",
        "flower",
    ]
    credentials = [p.split("=", 1)[1] for p in command_of(flower) if p.startswith("--basic_auth=")]
    if "FLOWER_BASIC_AUTH" in env_of(flower):
        credentials.append(env_of(flower)["FLOWER_BASIC_AUTH"])
    assert credentials, "Flower must run with basic auth"
    for pair in credentials:
        for credential in pair.split(","):
            user, _, password = credential.partition(":")
            assert user and len(password) >= 8, f"weak or malformed Flower credential {credential!r}"
    assert {target for _ip, target in published_ports(flower)} == {str(flower_port(flower))}
    assert "COMPACTOR_S3_SECRET_ACCESS_KEY" not in env_of(flower), "Flower needs the broker, not S3 keys"


def test_worker_node_ids_are_distinct(services: dict[str, dict[str, Any]]) -> None:
    workers = sorted(name for name in services if name.startswith("worker-"))
    assert len(workers) >= 2
    ids = [env_of(services[name]).get("COMPACTOR_NODE_ID", "") for name in workers]
    assert all(ids), "every worker needs COMPACTOR_NODE_ID"
    assert len(set(ids)) == len(ids), f"duplicate node ids {ids}"
    assert env_of(services["coordinator"]).get("COMPACTOR_NODE_ID") not in ids
    caches = [volume for name in workers for volume in services[name].get("volumes", [])]
    assert len(set(caches)) == len(caches), "each worker gets its own cache volume"


def test_node_ids_are_accepted_by_the_worker_command(
    services: dict[str, dict[str, Any]], k8s: dict[str, list[tuple[Path, dict[str, Any]]]]
) -> None:
    cli_jobs = pytest.importorskip("compactor.coordinator.cli.jobs")
    pattern = getattr(cli_jobs, "_NODE_ID_RE", None)
    if pattern is None:
        pytest.skip("compactor.coordinator.cli.jobs no longer exposes _NODE_ID_RE")
    for name in ("coordinator", "worker-1", "worker-2"):
        assert pattern.match(env_of(services[name])["COMPACTOR_NODE_ID"]), name
    # a Deployment's pods are named <deployment>-<10-char ReplicaSet hash>-<5-char suffix>
    for component in ("worker", "coordinator"):
        name = deployment_for(k8s, component)["metadata"]["name"]
        assert pattern.match(f"{name}-7d9f8c6b5d-x2k4q"), f"pod names of {name} are not valid node ids"


def test_compose_app_settings_are_valid_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("coordinator", "worker-1", "worker-2"):
        env = env_of(services[name])
        settings = settings_from_env(env, monkeypatch)
        assert settings.node_id == env["COMPACTOR_NODE_ID"]
        assert settings.s3_path_style is True and settings.s3_endpoint_url == "http://minio:9000"
        assert str(settings.cache_dir) == "/var/cache/compactor"
        assert settings.redis_url == env["COMPACTOR_REDIS_URL"]


# -------------------------------------------------------------- COMPACTOR_* names vs the code


def deploy_texts() -> dict[str, str]:
    files = [COMPOSE_FILE, DOCKERFILE, PROMETHEUS_FILE, *sorted(DEPLOY.rglob("*.yaml")), *sorted(DEPLOY.rglob("*.yml"))]
    files += sorted(DEPLOY.rglob("*.py"))
    return {str(path.relative_to(ROOT)): path.read_text() for path in dict.fromkeys(files)}


def test_every_compactor_variable_is_a_settings_field() -> None:
    known = settings_env_names()
    used: dict[str, set[str]] = {}
    for name, text in deploy_texts().items():
        for match in re.findall(r"\bCOMPACTOR_[A-Z0-9_]*[A-Z0-9]\b", text):
            used.setdefault(match, set()).add(name)
    assert len(used) >= 10, f"suspiciously few COMPACTOR_ names found: {sorted(used)}"
    unknown = {name: sorted(files) for name, files in used.items() if name not in known | set(PENDING_SETTINGS)}
    assert not unknown, f"COMPACTOR_* names that compactor.storage.settings.Settings does not read: {unknown}"
    # the allowance is for names the files use; drop entries nobody uses any more
    assert set(PENDING_SETTINGS) <= set(used)


def test_settings_env_names_follow_the_prefix() -> None:
    assert Settings.model_config.get("env_prefix") == "COMPACTOR_"
    assert {"COMPACTOR_REDIS_URL", "COMPACTOR_S3_BUCKET", "COMPACTOR_NODE_ID"} <= settings_env_names()


# --------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(resolved base image, instructions) per stage; ARGs before the first FROM are resolved."""
    args: dict[str, str] = {}
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for instruction, rest in dockerfile_instructions():
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction == "FROM":
            tokens = [t for t in rest.split() if not t.startswith("--")]
            stages.append((interpolate(tokens[0], args), []))
        else:
            assert stages or instruction == "ARG", f"{instruction} before the first FROM"
            if stages:
                stages[-1][1].append((instruction, rest))
    return stages


def test_dockerfile_is_multi_stage_with_pinned_bases() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for base, _ in stages:
        assert_pinned(base, "Dockerfile FROM")
        assert split_image(base)[0] in {"python", "docker.io/library/python"}
    assert stages[0][0] == stages[-1][0], "builder and runtime must share the interpreter the venv was built for"


def test_dockerfile_runtime_is_non_root_without_build_tools() -> None:
    instructions = dockerfile_instructions()
    assert not [rest for ins, rest in instructions if ins == "ADD"], "use COPY; never ADD (least of all ADD http)"
    assert not any(re.search(r"\b(curl|wget)\b.*\|\s*(ba)?sh", rest) for _ins, rest in instructions)
    runtime = dockerfile_stages()[-1][1]
    users = [rest for ins, rest in runtime if ins == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert [i for i, (ins, _rest) in enumerate(runtime) if ins == "USER"][-1] > max(
        i for i, (ins, _rest) in enumerate(runtime) if ins == "RUN"
    ), "USER must come after the last RUN"
    runtime_text = " ".join(rest for _ins, rest in runtime)
    for tool in ("build-essential", "gcc", "apt-get install", "pip install"):
        assert tool not in runtime_text, f"the runtime stage must not contain {tool}"
    copies_from_builder = [rest for ins, rest in runtime if ins == "COPY" and "--from=" in rest]
    assert copies_from_builder, "the runtime stage gets its packages from the builder"


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    import tomllib

    entrypoints = [rest for ins, rest in dockerfile_stages()[-1][1] if ins == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["compactor"], 'exec-form ENTRYPOINT ["compactor"]'
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "compactor" in scripts


def dockerignore_excludes(path: str) -> bool:
    """Whether the build context leaves ``path`` out (patterns, ``!`` re-includes, last match wins)."""
    excluded = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_files_in_the_build_context() -> None:
    sources: list[str] = []
    for stage_base, instructions in dockerfile_stages():
        del stage_base
        for ins, rest in instructions:
            if ins != "COPY" or "--from=" in rest:
                continue
            tokens = [t for t in rest.split() if not t.startswith("--")]
            sources += tokens[:-1]
    assert sources
    for source in sources:
        if source == ".":
            continue
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_ships_the_packages_and_nothing_else() -> None:
    import tomllib

    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in folders:
        assert not dockerignore_excludes(f"{folder}/__init__.py"), folder
    assert not dockerignore_excludes("pyproject.toml")
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_engine.py", "storage/__pycache__/keys.cpython-311.pyc"):
        assert dockerignore_excludes(path), path


# ---------------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_parse_and_are_namespace_agnostic(k8s: dict[str, list[tuple[Path, dict[str, Any]]]]) -> None:
    kinds = {kind: len(docs) for kind, docs in k8s.items()}
    assert kinds.get("Deployment") == 3 and kinds.get("ConfigMap") == 1 and kinds.get("Secret") == 1
    assert kinds.get("Service", 0) >= 1 and kinds.get("PodDisruptionBudget") == 1
    for docs in k8s.values():
        for path, doc in docs:
            assert "namespace" not in doc.get("metadata", {}), f"{path.name} pins a namespace"


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    expected = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kustomization["resources"]) == expected
    for image in kustomization.get("images", []):
        assert_pinned(f"{image['newName']}:{image['newTag']}", "kustomization image")


def test_configmap_holds_no_secrets_and_secret_is_only_an_example(
    k8s: dict[str, list[tuple[Path, dict[str, Any]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = k8s_object(k8s, "ConfigMap", "compactor-config")["data"]
    for key, value in config.items():
        assert not re.search(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN|REDIS_URL", key), f"{key} belongs in the Secret"
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings (quote numbers and booleans)"
        assert "@" not in value, f"{key} looks like it embeds credentials"
    [(path, secret)] = k8s["Secret"]
    assert "example" in path.name
    values = secret["stringData"]
    assert all("CHANGE-ME" in value for value in values.values()), "every Secret value must be a placeholder"
    settings = settings_from_env(
        {**config, **{k: v for k, v in values.items() if k.startswith("COMPACTOR_")}}, monkeypatch
    )
    assert str(settings.cache_dir) == config["COMPACTOR_CACHE_DIR"]
    assert settings.redis_url.startswith("redis://")


def test_deployments_have_resources_probes_and_run_as_non_root(
    k8s: dict[str, list[tuple[Path, dict[str, Any]]]],
) -> None:
    config_names = {doc["metadata"]["name"] for _p, doc in k8s["ConfigMap"]}
    secrets = {doc["metadata"]["name"]: doc["stringData"] for _p, doc in k8s["Secret"]}
    configs = {doc["metadata"]["name"]: doc["data"] for _p, doc in k8s["ConfigMap"]}
    for _path, deployment in k8s["Deployment"]:
        name = deployment["metadata"]["name"]
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector_matches(deployment["spec"]["selector"]["matchLabels"], template_labels), name
        spec = pod_spec(deployment)
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, name
        assert spec["securityContext"].get("runAsUser", 0) != 0, name
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            assert_pinned(container["image"], where)
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), f"{where}: {kind}"
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for probe_kind in ("livenessProbe", "readinessProbe"):
                probe = container.get(probe_kind)
                assert probe, f"{where}: no {probe_kind}"
                if "httpGet" in probe:
                    port = probe["httpGet"]["port"]
                    assert port in ports or port in ports.values(), f"{where}: {probe_kind} port {port} not declared"
                else:
                    assert "exec" in probe or "tcpSocket" in probe or "grpc" in probe, where
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("readOnlyRootFilesystem") is True, where
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_names, where
            for item in container.get("env", []):
                ref = item.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]], f"{where}: {item}"
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in configs[ref["configMapKeyRef"]["name"]], f"{where}: {item}"
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])}, where
            assert any(m["mountPath"] == "/tmp" for m in container.get("volumeMounts", [])), f"{where}: /tmp"


def metrics_annotations_ok(deployment: Mapping[str, Any], port: str) -> None:
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == port
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    container_ports = {str(p["containerPort"]) for p in only_container(deployment).get("ports", [])}
    assert port in container_ports


def test_worker_deployment(k8s: dict[str, list[tuple[Path, dict[str, Any]]]]) -> None:
    worker = deployment_for(k8s, "worker")
    config = k8s_object(k8s, "ConfigMap", "compactor-config")["data"]
    container = only_container(worker)
    spec = pod_spec(worker)
    assert worker["spec"]["replicas"] == 2
    assert container["args"][0] == "worker"
    node_id = [item for item in container["env"] if item["name"] == "COMPACTOR_NODE_ID"]
    assert node_id == [{"name": "COMPACTOR_NODE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}], (
        "node id must come from the pod name (downward API)"
    )
    assert container["resources"]["requests"]["cpu"] in ("1", 1, "1000m"), "a 1-vCPU worker"
    assert spec["terminationGracePeriodSeconds"] >= 120, "time for a sub-job to finish or hand back"
    cache_dir = config["COMPACTOR_CACHE_DIR"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == cache_dir]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"].get("sizeLimit"), "the cache emptyDir needs a sizeLimit"
    metrics_annotations_ok(worker, config["COMPACTOR_METRICS_PORT"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"


def worker_options(args: list[str]) -> dict[str, Any]:
    """The options ``compactor worker`` takes from ``args``, parsed by the command itself."""
    cli_jobs = pytest.importorskip("compactor.coordinator.cli.jobs")
    assert args[0] == "worker", args
    params = cli_jobs.worker_command.make_context("worker", list(args[1:])).params
    assert isinstance(params, dict)
    return params


def test_every_node_runs_every_queue_the_same_way(
    services: dict[str, dict[str, Any]], k8s: dict[str, list[tuple[Path, dict[str, Any]]]]
) -> None:
    """Issues 11 and 12: one `compactor worker` per node consumes every queue, so that it runs
    the gc queue with one slot (no sub-job taken only to be bounced off the node lock) and starts
    the l0 and light queues' workers beside it; compose, k8s and the embedded stack all run it
    that way."""
    from compactor.coordinator.local.embedded import EmbeddedStack
    from compactor.worker.runtime.dispatch import QUEUES

    commands = {name: service["command"] for name, service in services.items() if name.startswith("worker-")}
    commands["k8s"] = only_container(deployment_for(k8s, "worker"))["args"]
    commands["embedded"] = EmbeddedStack(Path("unused"), concurrency=1).worker_args("node-1")
    options = {where: worker_options(args) for where, args in commands.items()}
    for where, params in options.items():
        assert set(params["queues"].split(",")) == set(QUEUES), where
        assert params["pool"] == "prefork", f"{where}: only prefork enforces the task time limits"
        assert not params["no_metrics"], f"{where}: the probes and Prometheus read the worker's metrics port"
    assert len({params["concurrency"] for params in options.values()}) == 1, "light-queue slots differ"


def test_coordinator_and_flower_deployments(k8s: dict[str, list[tuple[Path, dict[str, Any]]]]) -> None:
    config = k8s_object(k8s, "ConfigMap", "compactor-config")["data"]
    coordinator = deployment_for(k8s, "coordinator")
    assert coordinator["spec"]["replicas"] == 1
    assert coordinator["spec"]["strategy"]["type"] == "Recreate", "never two scheduling loops during a rollout"
    assert only_container(coordinator)["args"][0] == "coordinator"
    metrics_annotations_ok(coordinator, config["COMPACTOR_METRICS_PORT"])

    flower = deployment_for(k8s, "flower")
    container = only_container(flower)
    assert [*container["command"], *container["args"]][:4] == ["celery", "-A", "compactor.worker.runtime.app", "flower"]
    auth = [item for item in container["env"] if item["name"] == "FLOWER_BASIC_AUTH"]
    assert auth and "secretKeyRef" in auth[0]["valueFrom"], "Flower basic auth from the Secret"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthcheck"
    service = k8s_object(k8s, "Service", "compactor-flower")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selector_matches(service["spec"]["selector"], flower["spec"]["template"]["metadata"]["labels"])
    named = {p["name"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in named or port["targetPort"] in {p["containerPort"] for p in container["ports"]}


def test_worker_pdb_selects_the_workers_and_allows_drains(k8s: dict[str, list[tuple[Path, dict[str, Any]]]]) -> None:
    [(_path, pdb)] = k8s["PodDisruptionBudget"]
    worker = deployment_for(k8s, "worker")
    assert pdb["apiVersion"] == "policy/v1"
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], worker["spec"]["template"]["metadata"]["labels"])
    for _p, other in k8s["Deployment"]:
        if other is not worker:
            assert not selector_matches(
                pdb["spec"]["selector"]["matchLabels"], other["spec"]["template"]["metadata"]["labels"]
            )
    replicas = worker["spec"]["replicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert 0 < int(pdb["spec"]["maxUnavailable"]) < replicas
    else:
        assert 0 < int(pdb["spec"]["minAvailable"]) < replicas


def test_k8s_and_compose_configure_the_same_settings(
    k8s: dict[str, list[tuple[Path, dict[str, Any]]]], services: dict[str, dict[str, Any]]
) -> None:
    for component, service in (("worker", "worker-1"), ("coordinator", "coordinator")):
        k8s_names = {n for n in container_env_names(only_container(deployment_for(k8s, component)), k8s)}
        compose_names = {n for n in env_of(services[service]) if n.startswith("COMPACTOR_")}
        assert {n for n in k8s_names if n.startswith("COMPACTOR_")} == compose_names, component


# ------------------------------------------------------------------------ Prometheus and Grafana


def test_prometheus_targets_match_compose_services(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets: dict[str, tuple[str, str]] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                if host == "localhost":
                    continue
                assert host in services, f"scrape target {target} is not a compose service"
                targets[host] = (port, job.get("metrics_path", "/metrics"))
    exporters = {name: env_of(s)["COMPACTOR_METRICS_PORT"] for name, s in services.items()
                 if "COMPACTOR_METRICS_PORT" in env_of(s)}  # fmt: skip
    assert {"coordinator", "worker-1", "worker-2"} <= set(exporters)
    for name, port in exporters.items():
        assert targets.get(name) == (port, "/metrics"), (
            f"{name} exports on {port} but is scraped as {targets.get(name)}"
        )
    assert targets.get("flower") == (str(flower_port(services["flower"])), "/metrics")
    assert set(targets) == set(exporters) | {"flower"}
    assert {str(metrics.DEFAULT_PORT)} == set(exporters.values())
    mounts = services["prometheus"]["volumes"]
    assert any(m.startswith("./deploy/prometheus.yml:") for m in mounts)


def exposed_sample_names() -> dict[str, set[str]]:
    """Family name -> sample names, for every metric compactor.worker.runtime.metrics defines."""
    from prometheus_client.metrics import MetricWrapperBase

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    result: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                result[family.name] = {family.name + suffix for suffix in suffixes[family.type]}
    return result


def test_dashboard_queries_only_defined_metrics_and_covers_them() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    families = exposed_sample_names()
    assert len(families) >= 12
    samples = set().union(*families.values())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in dashboard["templating"]["list"])
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\bcompactor_[a-z0-9_]+", target["expr"]):
                assert name in samples, f"panel {panel['title']!r} queries undefined {name}"
                used.add(name)
    uncovered = [family for family, names in families.items() if not names & used]
    assert not uncovered, f"metrics missing from the dashboard: {uncovered}"


def test_grafana_provisioning_points_at_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/compactor.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = services["grafana"]["volumes"]
    assert f"./deploy/grafana-dashboard.json:{path}/compactor.json:ro" in mounts
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    url = urlsplit(datasource["datasources"][0]["url"])
    assert url.hostname in services and str(url.port) in {t for _ip, t in published_ports(services["prometheus"])}
