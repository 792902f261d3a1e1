"""Offline checks of `ray up` cluster YAMLs: Ray's JSON schema, and what may be reachable from the internet.

    python cluster/check.py cluster/aws.yaml cluster/gcp.yaml     # exit 1 and one line per problem

Schema: the YAML must validate against `ray/autoscaler/ray-schema.json` from the installed Ray
wheel, and pass Ray's own `prepare_config` + `validate_config` (what `ray up` runs first).

Security rules (checked on the config as `ray up` fills it with Ray's defaults):
- no ingress from the whole internet (0.0.0.0/0, ::/0, any /0), SSH included: anywhere in the
  config, AWS IpRanges / Ipv6Ranges (e.g. provider.security_group) and GCP-style sourceRanges;
- AWS: every node type names its SecurityGroupIds (a group Ray creates itself opens port 22 to
  0.0.0.0/0), and none publishes a public IP through NetworkInterfaces;
- GCP: every node type sets networkInterfaces (Ray's default gives each node a public IP), and only
  the head has an accessConfig (external IP); provider.use_internal_ips is on;
- the head's `ray start --head` binds the dashboard to loopback (--dashboard-host=127.0.0.1,
  localhost or ::1) and no command binds anything to 0.0.0.0 / ::;
- Docker publishes no ports (-p / --publish / -P): nodes run with host networking, and the
  firewall decides what is reachable.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]"}
WORLD_KEYS = ("CidrIp", "CidrIpv6", "sourceRanges")  # AWS IpRanges / Ipv6Ranges, GCP firewall rules
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def load(path: str | Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def ray_schema() -> dict:
    """The autoscaler schema shipped inside the installed ray wheel (found without importing ray)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ray is not installed")
    path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def schema_errors(config: dict) -> list[str]:
    """Violations of ray-schema.json, one line each with the path to the offending value."""
    import jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"schema: {'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
            for e in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))]


def prepared(config: dict) -> dict:
    """The config as `ray up` sees it: Ray's prepare_config (provider defaults filled) + validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


# ---------------------------------------------------------------- security rules


def security_errors(config: dict) -> list[str]:
    """Every way the config would let the internet reach the cluster beyond the rules above."""
    errors = list(_world_ingress(config))
    provider = config.get("provider", {}).get("type")
    node_types = config.get("available_node_types", {})
    head_type = config.get("head_node_type")
    if provider == "aws":
        for name, node in node_types.items():
            node_config = node.get("node_config", {})
            interfaces = node_config.get("NetworkInterfaces", [])
            if not node_config.get("SecurityGroupIds") and not all(i.get("Groups") for i in interfaces or [{}]):
                errors.append(f"aws: node type {name!r} has no SecurityGroupIds: Ray would create a group "
                              "with port 22 open to 0.0.0.0/0")
            if any(i.get("AssociatePublicIpAddress") for i in interfaces):
                errors.append(f"aws: node type {name!r} asks for a public IP in NetworkInterfaces")
    if provider == "gcp":
        if not config["provider"].get("use_internal_ips"):
            errors.append("gcp: provider.use_internal_ips is off: nodes would talk over public IPs")
        for name, node in node_types.items():
            interfaces = node.get("node_config", {}).get("networkInterfaces")
            if not interfaces:
                errors.append(f"gcp: node type {name!r} sets no networkInterfaces: Ray's default gives it a "
                              "public IP")
            elif name != head_type and any(i.get("accessConfigs") for i in interfaces):
                errors.append(f"gcp: worker node type {name!r} has an accessConfig (public IP)")
    errors += _command_errors(config)
    for option in config.get("docker", {}).get("run_options", []) + config.get("docker", {}).get(
            "head_run_options", []) + config.get("docker", {}).get("worker_run_options", []):
        if re.match(r"^(-p|--publish|-P|--publish-all)(\b|=|\s|$)", str(option).strip()):
            errors.append(f"docker: run option {option!r} publishes ports")
    return errors


def _world_ingress(node: Any, path: str = "", rule: dict | None = None) -> Iterator[str]:
    """Entries anywhere in the config that admit traffic from a /0 network."""
    if isinstance(node, dict):
        if any(k in node for k in ("FromPort", "ToPort", "IpProtocol", "allowed")):
            rule = node  # an AWS IpPermission or a GCP firewall rule: name its ports in the message
        for key, value in node.items():
            here = f"{path}/{key}"
            values = value if isinstance(value, list) else [value]
            if key in WORLD_KEYS and any(_is_world(v) for v in values):
                yield f"ingress from {value} at {here}{_describe(rule)}: allow only your own CIDR"
            else:
                yield from _world_ingress(value, here, rule)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _world_ingress(value, f"{path}/{i}", rule)


def _describe(rule: dict | None) -> str:
    if rule is None:
        return ""
    if "allowed" in rule:
        return f" (allowed {rule['allowed']})"
    return f" (ports {rule.get('FromPort')}-{rule.get('ToPort')}, protocol {rule.get('IpProtocol')})"


def _is_world(value: Any) -> bool:
    try:
        return ipaddress.ip_network(str(value), strict=False).prefixlen == 0
    except ValueError:
        return False


def _command_errors(config: dict) -> list[str]:
    errors = []
    commands = [(key, str(cmd)) for key in COMMAND_KEYS for cmd in config.get(key, []) or []]
    for node_name, node in config.get("available_node_types", {}).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            commands += [(f"available_node_types/{node_name}/{key}", str(c)) for c in node.get(key, []) or []]
    for key, cmd in commands:
        for host in re.findall(r"--[a-z-]*host[= ]+['\"]?([^\s'\";]+)", cmd):
            if host in WILDCARD_HOSTS:
                errors.append(f"{key}: binds to {host} ({cmd.strip()[:120]!r}); bind to 127.0.0.1")
    head_starts = [cmd for key, cmd in commands if key == "head_start_ray_commands" and "--head" in cmd]
    if not head_starts:
        errors.append("head_start_ray_commands: no `ray start --head` command")
    for cmd in head_starts:
        hosts = re.findall(r"--dashboard-host[= ]+['\"]?([^\s'\";]+)", cmd)
        if not hosts or hosts[-1] not in LOOPBACK_HOSTS:
            errors.append("head_start_ray_commands: `ray start --head` must bind the dashboard to loopback "
                          "(--dashboard-host=127.0.0.1) and be reached through `ray dashboard` (SSH)")
    return errors


def check(path: str | Path) -> list[str]:
    """All schema and security problems of one cluster YAML (empty: good to `ray up`)."""
    try:
        config = load(path)
    except FileNotFoundError:
        return ["file not found"]
    except (OSError, yaml.YAMLError) as e:
        return [f"cannot read as YAML: {str(e).splitlines()[0]}"]
    if not isinstance(config, dict):
        what = "empty" if config is None else f"a {type(config).__name__}, not a mapping"
        return [f"the file is {what}: a cluster config is a YAML mapping (cluster_name, provider, ...)"]
    errors = schema_errors(config)
    if errors:
        return errors + security_errors(config)
    try:
        full = prepared(config)
    except Exception as e:  # noqa: BLE001 - Ray raises ValueError, RuntimeError, jsonschema errors, ...
        return [f"ray validate_config: {type(e).__name__}: {e}"] + security_errors(config)
    return security_errors(full)


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or [str(p) for p in sorted(Path(__file__).parent.glob("*.yaml"))
                                                            if p.name != "runtime_env.yaml"]
    bad = 0
    for path in paths:
        errors = check(path)
        bad += bool(errors)
        print(f"{path}: {'ok' if not errors else f'{len(errors)} problem(s)'}")
        for error in errors:
            print(f"  - {error}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
