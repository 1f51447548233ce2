"""cluster/aws.yaml through Ray's own cluster-launcher validation, its security properties, and the KubeRay RayJob.
No cloud, no Ray cluster: these read the files."""

import copy
import ipaddress
import re

import pytest
import yaml

from .conftest import REPO

RAY_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client"}
ENTRYPOINT = "python -m raytrain_align sft_mid"


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((REPO / "cluster/aws.yaml").read_text())


def _largest_recipe_nodes() -> int:
    from raytrain_align.recipe import RECIPES, recipes_root

    return max(yaml.safe_load((recipes_root() / rel).read_text()).get("ray", {}).get("nodes", 1) for rel, _ in RECIPES.values())


def test_aws_yaml_passes_ray_cluster_launcher_validation(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))  # what `ray up` does before validating: merge AWS defaults
    validate_config(prepared)  # ray-schema.json from the ray wheel, plus Ray's own node-type checks


def test_aws_yaml_rejects_a_broken_copy(aws):
    """The validation above can fail: a worker type without resources is refused."""
    import jsonschema

    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu-p5"]["resourcez"] = broken["available_node_types"]["gpu-p5"].pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_aws_node_types_8_gpus_min_max_and_spot(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    workers = {k: v for k, v in types.items() if k != aws["head_node_type"]}
    instance = {k: v["node_config"].get("InstanceType") for k, v in workers.items()}
    assert {"p5.48xlarge", "p4d.24xlarge"} <= set(instance.values())
    spot = [k for k, v in workers.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(instance[k] == "p5.48xlarge" for k in spot)
    nodes = _largest_recipe_nodes()
    for name, t in workers.items():
        assert t["resources"]["GPU"] == 8, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= aws["max_workers"], name
        assert t["max_workers"] >= nodes, f"{name}: the largest recipe needs {nodes} nodes"
        efa = [ni for ni in t["node_config"].get("NetworkInterfaces", []) if ni["InterfaceType"].startswith("efa")]
        assert efa, f"{name}: no EFA interfaces"
        assert len({ni["SubnetId"] for ni in efa}) == 1  # EFA traffic does not cross subnets


def _open_to_world(rule) -> bool:
    ranges = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
    return any(ipaddress.ip_network(r).prefixlen == 0 for r in ranges)


def test_aws_ray_ports_not_open_to_the_world_and_auth_on(aws):
    # no extra inbound rule reaches the Ray ports from 0.0.0.0/0 or ::/0 ...
    for rule in aws["provider"].get("security_group", {}).get("IpPermissions", []):
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        covers = [name for port, name in RAY_PORTS.items() if lo == -1 or lo <= port <= hi]
        assert not (covers and _open_to_world(rule)), f"{covers} open to the world: {rule}"
    # ... and every node is in the user's security group (so Ray creates none with SSH open to 0.0.0.0/0)
    for name, t in aws["available_node_types"].items():
        cfg = t["node_config"]
        groups = cfg.get("SecurityGroupIds") or [g for ni in cfg.get("NetworkInterfaces", []) for g in ni["Groups"]]
        assert groups, f"{name} has no security group: Ray would create one with SSH open to 0.0.0.0/0"
    text = (REPO / "cluster/aws.yaml").read_text()
    assert "0.0.0.0/0" not in text and "::/0" not in text
    # token auth: on for every `ray start` (the env file sets it), never disabled, and the token is shipped
    assert "RAY_AUTH_MODE=token" in text and not re.search(r"RAY_AUTH_MODE\s*=\s*disabled", text, re.I)
    for cmd in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]:
        assert ". ~/raytrain_align_env.sh && " in cmd, cmd
    assert "~/.ray/auth_token" in aws["file_mounts"]


def test_aws_installs_this_project_pinned(aws):
    setup = "\n".join(aws["setup_commands"])
    assert aws["file_mounts"]["~/raytrain_align"] == "."
    assert 'pip install -q "$HOME/raytrain_align[gpu]"' in setup and '"ray[default,train,data]==2.60.0"' in setup
    assert re.search(r"torch==\d+\.\d+\.\d+", setup)
    assert "RAYTRAIN_ALIGN_STORAGE=/mnt/efs/runs" in setup and "FI_PROVIDER=efa" in setup and "NCCL_" in setup


def test_aws_comments_only_say_what_to_edit():
    comments = [line.split("#", 1)[1].strip() for line in (REPO / "cluster/aws.yaml").read_text().splitlines()
                if re.search(r"(^|\s)#", line)]
    assert comments and all(c.startswith("EDIT:") for c in comments), [c for c in comments if not c.startswith("EDIT:")]


def test_kuberay_rayjob_fields():
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith(ENTRYPOINT)
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"]["mode"] == "token"
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert not any(e["name"] == "RAY_AUTH_MODE" and e.get("value") == "disabled" for e in head.get("env", []))
    [group] = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] >= _largest_recipe_nodes()
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8" and worker["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert worker["image"] == head["image"]


def test_cluster_heads_set_the_projects_node_health_checks(aws):
    """aws.yaml's env file (sourced before every `ray start`) and the KubeRay head set Ray's node health checks to
    launch.NODE_HEALTH_CHECKS, which the local cluster of --tiny gets: a dead node is noticed in seconds."""
    from raytrain_align.launch import NODE_HEALTH_CHECKS

    env_file = next(c for c in aws["setup_commands"] if "raytrain_align_env.sh" in c)
    for name, value in NODE_HEALTH_CHECKS.items():
        assert re.search(rf"\bRAY_{name}={value}\b", env_file), name
    head = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())["spec"]["rayClusterSpec"]["headGroupSpec"]
    env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert {k: env.get(f"RAY_{k}") for k in NODE_HEALTH_CHECKS} == {k: str(v) for k, v in NODE_HEALTH_CHECKS.items()}
