"""The rendered kustomize overlays: schemas, probes, security, rollouts, scaling and config."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from services.common.grpc_server import LIVENESS_SERVICE

Obj = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("edge", "session", "moderation", "llm-worker")

GRPC_PORTS = {"session": 50051, "moderation": 50052, "llm-worker": 50053}
METRICS_PORTS = {"edge": 9110, "session": 9101, "moderation": 9102, "llm-worker": 9103}
ADDR_ENV = {"session": "KEFU_SESSION_ADDR", "moderation": "KEFU_MODERATION_ADDR", "llm-worker": "KEFU_WORKER_ADDR"}
PORT_ENV = {"session": "KEFU_SESSION_PORT", "moderation": "KEFU_MODERATION_PORT", "llm-worker": "KEFU_WORKER_PORT"}
METRICS_ENV = {"edge": "KEFU_EDGE_METRICS_PORT", "session": "KEFU_SESSION_METRICS_PORT",
               "moderation": "KEFU_MODERATION_METRICS_PORT", "llm-worker": "KEFU_WORKER_METRICS_PORT"}
STREAM_TIMEOUT_S = 300  # KEFU_STREAM_TIMEOUT_S default: the longest an answer stream may last


def objects(rendered: dict[str, list[Obj]], variant: str, kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in rendered[variant] if o["kind"] == kind}


def deployments(rendered: dict[str, list[Obj]], variant: str) -> dict[str, Obj]:
    return objects(rendered, variant, "Deployment")


def workloads(rendered: dict[str, list[Obj]]) -> Iterator[tuple[str, Obj]]:
    for variant, objs in rendered.items():
        for obj in objs:
            if obj["kind"] in ("Deployment", "StatefulSet"):
                yield variant, obj


def container(deployment: Obj) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container per pod expected"
    only: Obj = containers[0]
    return only


def env_of(deployment: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


def env_value(deployment: Obj, name: str) -> str:
    entry = env_of(deployment).get(name)
    assert entry is not None and "value" in entry, f"{deployment['metadata']['name']}: no literal env {name}"
    return str(entry["value"])


def port_number(deployment: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container(deployment).get("ports", [])}
    assert port in named, f"{deployment['metadata']['name']}: no container port named {port}"
    return int(named[port])


def test_render_every_variant_passes_strict_kubernetes_schemas(validate_module: ModuleType,
                                                                rendered: dict[str, list[Obj]]) -> None:
    assert set(rendered) == {"dev", "prod", "prod+components"}
    for variant, objs in rendered.items():
        assert validate_module.validate_objects(objs) == [], variant


def test_render_reports_kustomize_errors(validate_module: ModuleType, rendered: dict[str, list[Obj]],
                                         tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n", encoding="utf-8")
    with pytest.raises(validate_module.RenderError, match="missing.yaml"):
        validate_module.render_dir(tmp_path)


def test_validate_catches_unknown_fields_and_kinds(validate_module: ModuleType,
                                                    rendered: dict[str, list[Obj]]) -> None:
    edge = deployments(rendered, "dev")["edge"]
    typo = {**edge, "spec": {**edge["spec"], "maxUnavailable": 0}}
    assert "maxUnavailable" in (validate_module.validate_object(typo) or "")
    assert validate_module.validate_object({"apiVersion": "app/v1", "kind": "Deployment",
                                            "metadata": {"name": "x"}}) is not None
    custom = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}}
    assert validate_module.validate_object(custom) is None


def test_deployments_are_the_four_processes(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        assert sorted(deployments(rendered, variant)) == sorted(PROCESSES), variant


def test_every_object_is_in_the_kefu_namespace(rendered: dict[str, list[Obj]]) -> None:
    for variant, objs in rendered.items():
        for obj in objs:
            if obj["kind"] == "Namespace":
                assert obj["metadata"]["name"] == "kefu"
            else:
                assert obj["metadata"].get("namespace") == "kefu", (variant, obj["kind"], obj["metadata"]["name"])


def test_every_container_has_cpu_memory_requests_and_a_memory_limit(rendered: dict[str, list[Obj]]) -> None:
    for variant, workload in workloads(rendered):
        pod = workload["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            resources = c.get("resources", {})
            where = (variant, workload["metadata"]["name"], c["name"])
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


def test_every_container_is_non_root_read_only_without_capabilities(rendered: dict[str, list[Obj]]) -> None:
    for variant, workload in workloads(rendered):
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        for c in pod.get("initContainers", []) + pod["containers"]:
            security = c.get("securityContext", {})
            where = (variant, workload["metadata"]["name"], c["name"])
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, where


def test_grpc_services_have_grpc_probes_on_their_grpc_port(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        for name, port in GRPC_PORTS.items():
            deployment = deployments(rendered, variant)[name]
            c = container(deployment)
            assert port_number(deployment, "grpc") == port
            assert env_value(deployment, PORT_ENV[name]) == str(port)
            for probe in ("readinessProbe", "livenessProbe"):
                assert "grpc" in c.get(probe, {}), (variant, name, probe)
                assert c[probe]["grpc"]["port"] == port, (variant, name, probe)
            # Ready follows "" (the worker's lexicon); alive is only "the process answers" (LIVENESS_SERVICE).
            assert c["readinessProbe"]["grpc"].get("service", "") == "", (variant, name)
            assert c["livenessProbe"]["grpc"].get("service") == LIVENESS_SERVICE, (variant, name)
            if "startupProbe" in c:
                assert c["startupProbe"]["grpc"].get("service") == LIVENESS_SERVICE, (variant, name)


def test_slow_starting_services_have_startup_probes(rendered: dict[str, list[Obj]]) -> None:
    # The worker loads and self-tests every plugin before its port opens; session waits for NATS.
    for variant in rendered:
        for name in ("llm-worker", "session"):
            probe = container(deployments(rendered, variant)[name]).get("startupProbe", {})
            assert probe.get("grpc", {}).get("port") == GRPC_PORTS[name], (variant, name)
            budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
            assert budget >= 60, (variant, name, budget)


def test_grpc_services_are_headless(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        services = objects(rendered, variant, "Service")
        for name, port in GRPC_PORTS.items():
            service = services[name]
            assert service["spec"].get("clusterIP") == "None", (variant, name)
            assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}
            ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
            assert ports["grpc"] == port and ports["metrics"] == METRICS_PORTS[name], (variant, name)


def test_edge_has_http_probes_and_a_normal_service(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        edge = deployments(rendered, variant)["edge"]
        c = container(edge)
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("readinessProbe", "livenessProbe"):
            assert port_number(edge, c[probe]["httpGet"]["port"]) == 8080
        assert env_value(edge, "KEFU_HTTP_PORT") == "8080"
        service = objects(rendered, variant, "Service")["edge"]
        assert service["spec"].get("clusterIP") != "None"
        # /metrics has a port of its own (issue 17), for the ServiceMonitor; an ingress routes `http` only.
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8080, "metrics": 9110}


def test_edge_targets_are_dns_round_robin_over_the_headless_services(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        edge = deployments(rendered, variant)["edge"]
        services = objects(rendered, variant, "Service")
        for name, env in ADDR_ENV.items():
            target = env_value(edge, env)
            match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", target)
            assert match, (variant, env, target)
            assert (match[1], match[2], int(match[3])) == (name, "kefu", GRPC_PORTS[name]), (variant, env)
            assert services[match[1]]["spec"]["clusterIP"] == "None"


def test_every_process_binds_all_interfaces_and_finds_nats(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        services = objects(rendered, variant, "Service")
        for name, deployment in deployments(rendered, variant).items():
            assert env_value(deployment, "KEFU_BIND_HOST") == "0.0.0.0", (variant, name)
            match = re.fullmatch(r"nats://([a-z0-9-]+)\.kefu\.svc\.cluster\.local:(\d+)",
                                 env_value(deployment, "KEFU_NATS_URL"))
            assert match, (variant, name)
            nats = services[match[1]]
            assert int(match[2]) in [p["port"] for p in nats["spec"]["ports"]], (variant, name)


def test_env_names_are_unique_per_container(rendered: dict[str, list[Obj]]) -> None:
    for variant, workload in workloads(rendered):
        names = [e["name"] for e in container(workload).get("env", [])]
        assert len(names) == len(set(names)), (variant, workload["metadata"]["name"], names)


def test_metrics_ports_env_and_scrape_annotations_agree(rendered: dict[str, list[Obj]]) -> None:
    for variant in ("dev", "prod"):
        for name, deployment in deployments(rendered, variant).items():
            annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", (variant, name)
            assert annotations.get("prometheus.io/path") == "/metrics", (variant, name)
            expected = METRICS_PORTS[name]
            assert annotations.get("prometheus.io/port") == str(expected), (variant, name)
            assert env_value(deployment, METRICS_ENV[name]) == str(expected)
            assert port_number(deployment, "metrics") == expected


def test_servicemonitor_component_replaces_annotation_scraping(rendered: dict[str, list[Obj]]) -> None:
    monitors = objects(rendered, "prod+components", "ServiceMonitor")
    assert list(monitors) == ["kefu"]
    spec = monitors["kefu"]["spec"]
    assert {e["port"] for e in spec["endpoints"]} == {"metrics"}  # never the edge's public port
    assert set(spec["selector"]["matchExpressions"][0]["values"]) == set(PROCESSES)
    for name, deployment in deployments(rendered, "prod+components").items():
        assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "false", name
    for variant in ("dev", "prod"):
        assert not objects(rendered, variant, "ServiceMonitor"), variant


def test_rollouts_never_drop_capacity(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        for name, deployment in deployments(rendered, variant).items():
            strategy = deployment["spec"]["strategy"]
            assert strategy["type"] == "RollingUpdate"
            assert strategy["rollingUpdate"]["maxUnavailable"] in (0, "0%"), (variant, name)
            if name in ("edge", "llm-worker"):
                surge = strategy["rollingUpdate"]["maxSurge"]
                assert surge not in (0, "0%") and str(surge).rstrip("%").isdigit(), (variant, name)


def test_streaming_processes_outlive_the_longest_stream(rendered: dict[str, list[Obj]]) -> None:
    # The edge relays answers, the worker generates them, moderation filters them (CheckStream).
    for variant in rendered:
        for name in ("edge", "llm-worker", "moderation"):
            deployment = deployments(rendered, variant)[name]
            grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > STREAM_TIMEOUT_S, (variant, name, grace)
            # What the process itself waits on SIGTERM must fit in the grace period, after preStop.
            assert float(env_value(deployment, "KEFU_SHUTDOWN_GRACE_S")) + 5 < grace, (variant, name)
        for name in ("llm-worker", "moderation"):
            service = deployments(rendered, variant)[name]
            assert float(env_value(service, "KEFU_SHUTDOWN_GRACE_S")) >= STREAM_TIMEOUT_S, (variant, name)
        edge = deployments(rendered, variant)["edge"]
        assert float(env_value(edge, "KEFU_STREAM_TIMEOUT_S")) <= STREAM_TIMEOUT_S


def test_every_process_has_a_prestop_hook(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        for name, deployment in deployments(rendered, variant).items():
            command = container(deployment).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            assert command, (variant, name)
        edge_hook = container(deployments(rendered, variant)["edge"])["lifecycle"]["preStop"]["exec"]["command"]
        # The edge's hook waits for its open answer streams (kefu_active_streams) to end.
        assert "kefu_active_streams" in edge_hook[-1] and "127.0.0.1:9110/metrics" in edge_hook[-1]
        compile(edge_hook[-1], "edge preStop", "exec")


def test_config_volumes_are_whole_directories_where_the_env_points(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        for name, env, configmap in (("llm-worker", "KEFU_PLUGINS_DIR", "kefu-plugins"),
                                     ("moderation", "KEFU_LEXICON_DIR", "kefu-lexicon")):
            deployment = deployments(rendered, variant)[name]
            volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
            mounts = [m for m in container(deployment)["volumeMounts"]
                      if volumes[m["name"]].get("configMap", {}).get("name") == configmap]
            assert len(mounts) == 1, (variant, name)
            # subPath mounts are copied once at pod start and never see ConfigMap updates.
            assert "subPath" not in mounts[0] and "subPathExpr" not in mounts[0], (variant, name)
            assert env_value(deployment, env) == mounts[0]["mountPath"], (variant, name)
        for name, deployment in deployments(rendered, variant).items():
            for mount in container(deployment).get("volumeMounts", []):
                assert "subPath" not in mount, (variant, name, mount["name"])


def test_config_maps_keep_stable_names_for_in_place_hot_reload(rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        assert {"kefu-plugins", "kefu-lexicon"} <= set(objects(rendered, variant, "ConfigMap")), variant


def _repo_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith(("_", "."))}


def _configmap_files(configmap: Obj) -> dict[str, bytes]:
    import base64

    files = {key: value.encode("utf-8") for key, value in configmap.get("data", {}).items()}
    files.update({key: base64.b64decode(value) for key, value in configmap.get("binaryData", {}).items()})
    return files


def test_config_maps_hold_the_repo_files_byte_for_byte(rendered: dict[str, list[Obj]]) -> None:
    plugins = _repo_files(REPO_ROOT / "plugins", (".py", ".toml", ".json"))
    lexicon = _repo_files(REPO_ROOT / "services" / "moderation" / "lexicon", (".txt",))
    assert "routes.toml" in plugins and "shop_faq.json" in plugins and "whitelist.txt" in lexicon
    for variant in rendered:
        configmaps = objects(rendered, variant, "ConfigMap")
        stale = "a stale file list: run python k8s/sync_config.py"
        assert _configmap_files(configmaps["kefu-plugins"]) == plugins, stale
        assert _configmap_files(configmaps["kefu-lexicon"]) == lexicon, stale


def test_sync_config_writes_the_file_lists_and_detects_drift(sync_module: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "routes.toml").write_bytes(b"[routes.default]\nprovider = \"x\"\n")
    (tmp_path / "plugins" / "shout.py").write_bytes(b"plugin = None\n")
    (tmp_path / "plugins" / "README.md").write_bytes(b"not config\n")
    (tmp_path / "plugins" / "_private.py").write_bytes(b"")
    lexicon = tmp_path / "services" / "moderation" / "lexicon"
    lexicon.mkdir(parents=True)
    (lexicon / "abuse.txt").write_bytes("# action: mask\n傻逼\n".encode())
    demo = tmp_path / "services" / "llm_worker" / "demo_knowledge" / "demo"
    demo.mkdir(parents=True)
    (demo / "faq.md").write_bytes(b"# FAQ\n")
    old_copies = tmp_path / "k8s" / "base" / "config" / "plugins"
    old_copies.mkdir(parents=True)
    (old_copies / "shout.py").write_bytes(b"plugin = None\n")
    problems = sync_module.differences(tmp_path)
    assert "plugins/kustomization.yaml is missing" in problems
    assert "k8s/overlays/dev/nats-auth.conf is missing" in problems
    sync_module.sync(tmp_path)
    assert sync_module.differences(tmp_path) == []
    assert not (tmp_path / "k8s" / "base" / "config").exists()  # the old copies are gone
    listed = (tmp_path / "plugins" / "kustomization.yaml").read_text(encoding="utf-8")
    assert "      - routes.toml\n      - shout.py\n" in listed and "README" not in listed and "_private" not in listed
    assert "      - abuse.txt\n" in (lexicon / "kustomization.yaml").read_text(encoding="utf-8")
    # The demo tenant's kustomization sits above its folder: the worker seeds every file of a tenant's folder.
    assert not (demo / "kustomization.yaml").exists()
    assert "      - demo/faq.md\n" in (demo.parent / "kustomization.yaml").read_text(encoding="utf-8")
    (lexicon / "fraud.txt").write_bytes(b"x\n")
    (tmp_path / "plugins" / "shout.py").unlink()
    assert sync_module.differences(tmp_path) == [
        "plugins/kustomization.yaml does not list the current files",
        "services/moderation/lexicon/kustomization.yaml does not list the current files"]


def test_committed_config_file_lists_are_in_sync(sync_module: ModuleType) -> None:
    assert sync_module.differences() == [], "run: python k8s/sync_config.py"


def test_secrets_are_referenced_never_shipped(rendered: dict[str, list[Obj]]) -> None:
    for variant, objs in rendered.items():
        assert not [o for o in objs if o["kind"] == "Secret"], variant
        edge = env_of(deployments(rendered, variant)["edge"])
        assert edge["KEFU_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "kefu-secrets"
        worker = env_of(deployments(rendered, variant)["llm-worker"])
        assert worker["KEFU_OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kefu-secrets"
        for _, workload in workloads({variant: objs}):
            for entry in container(workload).get("env", []):
                if re.search(r"SECRET|API_KEY|PASSWORD|TOKEN", entry["name"]):
                    assert "value" not in entry, (variant, entry["name"])


def test_dev_runs_one_of_each_and_a_single_nats(rendered: dict[str, list[Obj]]) -> None:
    for name, deployment in deployments(rendered, "dev").items():
        assert deployment["spec"]["replicas"] == 1, name
    nats = objects(rendered, "dev", "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 1
    assert "-js" in " ".join(container(nats)["command"]) or "jetstream" in _nats_conf(rendered, "dev")
    assert not objects(rendered, "dev", "HorizontalPodAutoscaler")


def _nats_conf(rendered: dict[str, list[Obj]], variant: str) -> str:
    configmaps = [o for o in rendered[variant]
                  if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("nats-config")]
    assert len(configmaps) == 1
    return str(configmaps[0]["data"]["nats.conf"])


def test_prod_scales_with_hpas_and_never_resets_replicas(rendered: dict[str, list[Obj]]) -> None:
    hpas = objects(rendered, "prod", "HorizontalPodAutoscaler")
    for name, deployment in deployments(rendered, "prod").items():
        # A replicas field would be re-applied by every `kubectl apply`, fighting the HPA.
        assert "replicas" not in deployment["spec"], name
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"], name
        assert hpa["spec"]["metrics"], name


def test_prod_has_disruption_budgets_for_every_workload(rendered: dict[str, list[Obj]]) -> None:
    pdbs = objects(rendered, "prod", "PodDisruptionBudget")
    for name in (*PROCESSES, "nats"):
        pdb = pdbs[name]
        assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable"), name


def test_prod_spreads_pods_over_zones_and_nodes(rendered: dict[str, list[Obj]]) -> None:
    for _, workload in workloads({"prod": rendered["prod"]}):
        name = workload["metadata"]["name"]
        constraints = workload["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        keys = {c["topologyKey"] for c in constraints}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys, name
        for constraint in constraints:
            assert constraint["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}


def test_prod_resources_are_at_least_dev_resources(rendered: dict[str, list[Obj]]) -> None:
    def mebibytes(quantity: str) -> float:
        units = {"Mi": 1, "Gi": 1024}
        return float(quantity[:-2]) * units[quantity[-2:]]

    for name in PROCESSES:
        dev = container(deployments(rendered, "dev")[name])["resources"]
        prod = container(deployments(rendered, "prod")[name])["resources"]
        assert mebibytes(prod["limits"]["memory"]) >= mebibytes(dev["limits"]["memory"]), name
        assert mebibytes(prod["requests"]["memory"]) >= mebibytes(dev["requests"]["memory"]), name


def test_prod_nats_is_a_three_node_jetstream_cluster(rendered: dict[str, list[Obj]]) -> None:
    nats = objects(rendered, "prod", "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    assert nats["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    conf = _nats_conf(rendered, "prod")
    assert "jetstream" in conf
    routes = re.findall(r"nats://(nats-\d)\.(nats-headless)\.kefu\.svc\.cluster\.local:6222", conf)
    assert sorted(routes) == [("nats-0", "nats-headless"), ("nats-1", "nats-headless"), ("nats-2", "nats-headless")]
    headless = objects(rendered, "prod", "Service")[nats["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True


def test_prod_replicates_jetstream_state_on_the_three_nats_nodes(rendered: dict[str, list[Obj]]) -> None:
    for name in ("session", "moderation", "llm-worker"):
        assert env_of(deployments(rendered, "prod")[name])["KEFU_NATS_REPLICAS"]["value"] == "3"
        assert "KEFU_NATS_REPLICAS" not in env_of(deployments(rendered, "dev")[name])


def test_dev_worker_seeds_the_demo_tenant_from_its_configmap(rendered: dict[str, list[Obj]]) -> None:
    worker = deployments(rendered, "dev")["llm-worker"]
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    mounts = [m for m in container(worker)["volumeMounts"]
              if volumes[m["name"]].get("configMap", {}).get("name") == "kefu-demo-knowledge"]
    assert len(mounts) == 1 and "subPath" not in mounts[0]
    # The seed folder holds one folder per tenant: the ConfigMap is the `demo` tenant's.
    assert mounts[0]["mountPath"] == env_value(worker, "KEFU_KB_SEED_DIR") + "/demo"
    demo = _repo_files(REPO_ROOT / "services" / "llm_worker" / "demo_knowledge" / "demo", (".md", ".json"))
    assert {"shop-faq.json", "shipping.md", "returns-and-refunds.md"} <= set(demo)
    assert _configmap_files(objects(rendered, "dev", "ConfigMap")["kefu-demo-knowledge"]) == demo
    for variant in ("prod", "prod+components"):  # a production cluster gets no demo documents
        assert "KEFU_KB_SEED_DIR" not in env_of(deployments(rendered, variant)["llm-worker"]), variant
# ----------------------------------------------------------------- internal credentials and NetworkPolicies

NATS_USERS = {"edge": "edge", "session": "session", "llm-worker": "llm_worker", "moderation": "moderation"}
"""Deployment -> its NATS user (moderation publishes the lexicon to KV, issue 20)."""


def secret_ref(entry: Obj | None) -> tuple[str, str]:
    assert entry is not None and "value" not in entry
    ref = entry["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional"), ref
    return ref["name"], ref["key"]


def test_every_process_gets_the_internal_token_and_its_nats_user_from_the_secret(
        rendered: dict[str, list[Obj]]) -> None:
    for variant in rendered:
        for name, deployment in deployments(rendered, variant).items():
            env = env_of(deployment)
            assert secret_ref(env.get("KEFU_INTERNAL_TOKEN")) == ("kefu-secrets", "internal-token"), (variant, name)
            user = NATS_USERS.get(name)
            if user is None:
                assert "KEFU_NATS_USER" not in env and "KEFU_NATS_PASSWORD" not in env, (variant, name)
                continue
            assert env_value(deployment, "KEFU_NATS_USER") == user, (variant, name)
            expected = ("kefu-secrets", f"nats-{user.replace('_', '-')}-password")
            assert secret_ref(env.get("KEFU_NATS_PASSWORD")) == expected, (variant, name)


def test_nats_requires_the_users_and_permissions_make_run_uses(rendered: dict[str, list[Obj]]) -> None:
    from devtools.devstack.nats_auth import ROLES, k8s_authorization, password_variable, secret_key

    for variant in rendered:
        configmap = next(o for o in rendered[variant]
                         if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("nats-config"))
        assert "include ./nats-auth.conf" in configmap["data"]["nats.conf"], variant
        # The same table as the devstack's, users of every role, passwords from the environment only.
        assert configmap["data"]["nats-auth.conf"] == k8s_authorization(), variant
        assert "no_auth_user" not in configmap["data"]["nats.conf"]
        env = env_of(objects(rendered, variant, "StatefulSet")["nats"])
        for user in ROLES:
            assert f"${password_variable(user)}" in configmap["data"]["nats-auth.conf"]
            assert secret_ref(env.get(password_variable(user))) == ("kefu-secrets", secret_key(user)), (variant, user)


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression  # the only operator these manifests use
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def allowed_sources(rendered: dict[str, list[Obj]], variant: str, workload: Obj, port: int) -> list[Obj]:
    """The `from` peers that the variant's NetworkPolicies let reach `port` of `workload`'s pods ({} = anyone)."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    sources: list[Obj] = []
    for policy in objects(rendered, variant, "NetworkPolicy").values():
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = [port_number(workload, p["port"]) for p in rule.get("ports", [])]
            if not ports or port in ports:
                sources += rule.get("from") or [{}]
    return sources


def pods_named(*names: str) -> Obj:
    if len(names) == 1:
        return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": names[0]}}}
    return {"podSelector": {"matchExpressions": [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": list(names)}]}}


MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_prod_network_policies_let_only_the_edge_reach_the_services(rendered: dict[str, list[Obj]]) -> None:
    for variant in ("prod", "prod+components"):
        policies = objects(rendered, variant, "NetworkPolicy")
        deny = policies["default-deny-ingress"]["spec"]
        assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
        for name, deployment in deployments(rendered, variant).items():
            assert allowed_sources(rendered, variant, deployment, METRICS_PORTS[name]) == [MONITORING], name
            if name in GRPC_PORTS:
                assert allowed_sources(rendered, variant, deployment, GRPC_PORTS[name]) == [pods_named("edge")], name
            # Nothing else of the pod is reachable (the edge's public port aside).
            assert allowed_sources(rendered, variant, deployment, 12345) == [], name
        edge = deployments(rendered, variant)["edge"]
        assert allowed_sources(rendered, variant, edge, port_number(edge, "http")) == [{}]  # the ingress


def test_prod_network_policies_let_only_kefu_reach_nats(rendered: dict[str, list[Obj]]) -> None:
    for variant in ("prod", "prod+components"):
        nats = objects(rendered, variant, "StatefulSet")["nats"]
        assert allowed_sources(rendered, variant, nats, 4222) == [
            pods_named("edge", "session", "moderation", "llm-worker")]
        assert allowed_sources(rendered, variant, nats, 6222) == [pods_named("nats")]
        assert allowed_sources(rendered, variant, nats, 8222) == [MONITORING]
    assert not objects(rendered, "dev", "NetworkPolicy")  # dev clusters often enforce none; prod must
