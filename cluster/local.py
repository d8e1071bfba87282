"""cluster.yaml for Ray's local provider (your own machines over SSH), derived from cluster.yaml itself.

Only where the machines come from changes: provider (type local, head_ip, worker_ips), auth (the SSH
login) and the node types (which the local provider makes itself). File mounts, rsync filters, setup
and start commands are cluster.yaml's own, so the two cannot drift (tests/test_ray_up.py checks it and
runs `ray up` with the result against an SSH server on this machine).

The one departure: the local provider accepts no `available_node_types`, so the head's resources are
what Ray detects on the machine (its CPUs), not cluster.yaml's `head: {CPU: 0}`; with no worker_ips the
trials run on the head.

    python cluster/local.py --head-ip 10.0.0.1 --worker-ips 10.0.0.2,10.0.0.3 --ssh-user ubuntu \\
        --ssh-private-key ~/.ssh/id_ed25519 --bucket your-bucket > cluster_local.yaml
    ray up cluster_local.yaml     # from the repository's root (file_mounts: `.`)
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
BUCKET = "my-bucket"  # cluster.yaml's placeholder for the S3 bucket ("yours")
REPLACED = ("provider", "auth", "available_node_types", "head_node_type", "docker")


def _substitute(value, names: dict[str, str]):
    if isinstance(value, str):
        for old, new in names.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_substitute(item, names) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, names) for key, item in value.items()}
    return value


def local_config(*, head_ip: str, ssh_user: str, ssh_private_key: str | None = None,
                 worker_ips: list[str] | tuple[str, ...] = (), ssh_proxy_command: str | None = None,
                 bucket: str | None = None, cluster_name: str | None = None,
                 cluster_yaml: str | Path = CLUSTER_YAML) -> dict:
    """cluster.yaml with provider `local`; `bucket` replaces the placeholder my-bucket in the commands.

    Ray's SSH has no port option: a node behind another port or a jump host is reached with
    `ssh_proxy_command` (ssh's ProxyCommand, e.g. `ssh -W %h:2222 jumphost`)."""
    config = yaml.safe_load(Path(cluster_yaml).read_text())
    local = {key: copy.deepcopy(value) for key, value in config.items() if key not in REPLACED}
    if bucket:
        local = _substitute(local, {f"s3://{BUCKET}/": f"s3://{bucket}/"})
    if cluster_name:
        local["cluster_name"] = cluster_name
    local["provider"] = {"type": "local", "head_ip": head_ip, "worker_ips": list(worker_ips)}
    auth = {"ssh_user": ssh_user}
    if ssh_private_key:
        auth["ssh_private_key"] = str(ssh_private_key)
    if ssh_proxy_command:
        auth["ssh_proxy_command"] = ssh_proxy_command
    local["auth"] = auth
    return local


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-ip", required=True)
    parser.add_argument("--worker-ips", default="", help="comma-separated; none: trials run on the head")
    parser.add_argument("--ssh-user", required=True)
    parser.add_argument("--ssh-private-key")
    parser.add_argument("--ssh-proxy-command")
    parser.add_argument("--bucket", help=f"your S3 bucket, in place of {BUCKET} in the start commands")
    parser.add_argument("--cluster-name")
    args = parser.parse_args(argv)
    config = local_config(head_ip=args.head_ip, worker_ips=[ip for ip in args.worker_ips.split(",") if ip],
                          ssh_user=args.ssh_user, ssh_private_key=args.ssh_private_key,
                          ssh_proxy_command=args.ssh_proxy_command, bucket=args.bucket,
                          cluster_name=args.cluster_name)
    yaml.safe_dump(config, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
