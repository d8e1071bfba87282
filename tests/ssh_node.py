"""A cluster node on this machine for Ray's local provider: Debian's sshd, in namespaces of its own.

What `ray up` reaches over SSH is this machine seen through private pid, mount and network namespaces
(`unshare`, root only), so that what cluster.yaml's commands do there touches nothing outside:
- pid: the `ray stop` of the start commands (and of `ray down`) sees only the node's own processes;
  killing the namespace's first process ends everything started in it.
- network: its own loopback, so Ray's fixed ports (6379, 8076, 8265, 10001, 52365...), MLflow's 5000 and
  the S3 emulation (moto) cannot collide with anything else on the machine. The node's address is
  127.0.0.1 (there, and in the cluster config's head_ip).
- mount: a temporary folder is /home/ray there, root's home (a private /etc/passwd; a node of
  rayproject/ray has user ray in /home/ray): the file mount /home/ray/has-sweep, /home/ray/mlflow,
  ~/.mlflow/credentials and Ray's bootstrap files land in it; /tmp/ray (Ray's sessions and the
  address file that `ray.init()` would find), /etc/hosts (the host name is 127.0.0.1) and /run
  (sshd's privilege separation folder) are private too.
There is no sshd listening anywhere: each SSH connection runs `sshd -i` (inetd mode) inside the
namespaces through the ProxyCommand `nsenter ...` (Ray's auth.ssh_proxy_command), which is also how
the client reaches a node inside another network namespace.

The node's Python is a venv of its own whose site-packages see this environment's through a .pth file
(so cluster/install.sh finds every dependency installed and pip only installs has-sweep, editable from
/home/ray/has-sweep, offline: PIP_NO_INDEX; with offline=False pip may fetch what this environment
lacks, into the node's venv only) and whose scripts (ray, mlflow, ...) run that venv's
Python: the Ray workers then import the synced copy, and this environment's install is untouched.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

MOTO_PORT = 4566  # the S3 emulation, inside the node's network namespace
BUCKET = "has-sweep-rayup"
TOOLS = ("/usr/sbin/sshd", "ssh", "ssh-keygen", "rsync", "unshare", "nsenter", "ip", "mount", "ps")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if not shutil.which(tool)]


def cannot_unshare() -> str | None:
    """Why private namespaces cannot be made here (not root, a sandbox that forbids it), or None."""
    try:
        probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--net", "--mount-proc", "true"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if probe.returncode == 0 else (probe.stderr.strip() or f"exit {probe.returncode}")


def aws_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}"}


class SshNode:
    """start(), then `ray up` with auth {ssh_user: root, ssh_private_key: .key, ssh_proxy_command: .proxy_command}."""

    def __init__(self, root: Path, offline: bool = True) -> None:
        self.root, self.offline = Path(root), offline
        self.home = self.root / "home"  # /home/ray on the node
        self.venv = self.root / "venv"
        self.key = self.root / "id_ed25519"
        self.unshare: subprocess.Popen | None = None
        self.pid: int | None = None  # the namespace's first process, as this machine numbers it

    @property
    def env(self) -> dict[str, str]:
        """The node's environment (its ~/.bashrc, which Ray's commands source): the node's Python first."""
        env = {"PATH": f"{self.venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               **aws_env(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               # the build backend (setuptools) is there already; "0" means: no build isolation
               "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               # MLflow's job runner (8 more processes, for its GenAI jobs) is no use here and slows
               # the server's start on a small machine
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.offline:  # the node has everything but has-sweep already: pip installs it without an index
            env["PIP_NO_INDEX"] = "1"
        return env

    @property
    def proxy_command(self) -> str:
        assert self.pid is not None, "start() first"
        return (f"nsenter --target {self.pid} --net --mount --pid /usr/sbin/sshd -i "
                f"-f {self.root / 'sshd_config'} -E {self.root / 'sshd.log'}")

    def start(self, timeout: float = 60) -> SshNode:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("home", "tmp_ray"):
            (self.root / sub).mkdir(exist_ok=True)
        for name in (self.key, self.root / "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "has-sweep-rayup", "-f", str(name)],
                           check=True)
        (self.root / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (self.root / "sshd_config").write_text(f"""\
HostKey {self.root / 'host_key'}
AuthorizedKeysFile {self.root / 'authorized_keys'}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
LogLevel ERROR
""")
        passwd = Path("/etc/passwd").read_text().splitlines()
        passwd = [":".join(f[:5] + ["/home/ray"] + f[6:]) if (f := line.split(":"))[0] == "root" else line
                  for line in passwd]
        (self.root / "passwd").write_text("\n".join(passwd) + "\n")
        (self.root / "hosts").write_text(f"127.0.0.1 localhost {socket.gethostname()}\n::1 localhost\n")
        (self.home / ".bashrc").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items()))
        self._make_venv()
        Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point of the node's private /tmp/ray
        ready = self.root / "ready"
        ready.unlink(missing_ok=True)
        with open(self.root / "init.log", "ab") as log:
            self.unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc", "--mount", "--net",
                 "--propagation", "private", sys.executable, __file__, "init", str(self.root)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.unshare.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the node did not start: {(self.root / 'init.log').read_text()[-3000:]}")
            time.sleep(0.2)
        if ready.read_text().strip() != "ok":
            self.stop()
            raise RuntimeError(f"the node did not start: {ready.read_text()}")
        self.pid = int(Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children").read_text().split()[0])
        return self

    def _make_venv(self) -> None:
        base = Path(sys.executable).resolve()
        subprocess.run([str(base), "-m", "venv", "--without-pip", str(self.venv)], check=True)
        ours = Path(sysconfig.get_paths()["purelib"])
        theirs = Path(subprocess.check_output(
            [str(self.venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True).strip())
        (theirs / "_has_sweep_rayup_base.pth").write_text(f"{ours}\n")  # dependencies; pip comes from here too
        here = Path(sys.executable).parent
        for script in here.iterdir():
            target = self.venv / "bin" / script.name
            if target.exists() or not script.is_file():
                continue
            try:
                text = script.read_text()
            except UnicodeDecodeError:
                continue
            first, _, rest = text.partition("\n")
            if first.startswith("#!") and Path(first[2:].strip()).parent == here:
                target.write_text(f"#!{self.venv / 'bin' / 'python'}\n{rest}")
                target.chmod(0o755)

    def run(self, command: list[str], *, net_only: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """A command of this machine's inside the node's network namespace (and mounts, pids: net_only=False)."""
        assert self.pid is not None, "start() first"
        spaces = ["--net"] if net_only else ["--net", "--mount", "--pid"]
        return subprocess.run(["nsenter", "--target", str(self.pid), *spaces, *command], **kwargs)

    def python(self, code: str, env: dict[str, str] | None = None, timeout: float = 120):
        """Runs `code` (which prints one JSON value last) in the node's network; returns that value."""
        done = self.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **aws_env(), **(env or {})})
        if done.returncode:
            raise RuntimeError(f"in the node's network: {done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def processes(self) -> list[str]:
        """The command lines of the processes in the node's pid namespace."""
        done = self.run(["ps", "-eo", "args="], net_only=False, capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()

    def stop(self) -> None:
        """Ends the namespaces and everything in them (SIGKILL to the first process: the kernel does the rest)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.unshare is not None:
            if self.unshare.poll() is None:
                os.killpg(self.unshare.pid, signal.SIGKILL)
            self.unshare.wait(timeout=30)
        self.unshare, self.pid = None, None


def _write(path: Path, text: str) -> None:
    """Whole or not at all: the test waits for the file to exist, then reads it."""
    part = path.with_suffix(".part")
    part.write_text(text)
    part.rename(path)


def _init(root: Path) -> None:
    """The node's first process (pid 1 in its namespace): mounts, the S3 emulation, then reaps orphans."""
    ready = root / "ready"
    try:
        def run(*command):
            subprocess.run(command, check=True, capture_output=True, text=True)

        run("ip", "link", "set", "lo", "up")
        run("mount", "-t", "tmpfs", "tmpfs", "/home")
        Path("/home/ray").mkdir()
        run("mount", "--bind", str(root / "home"), "/home/ray")
        run("mount", "--bind", str(root / "tmp_ray"), "/tmp/ray")
        run("mount", "--bind", str(root / "passwd"), "/etc/passwd")
        run("mount", "--bind", str(root / "hosts"), "/etc/hosts")
        run("mount", "-t", "tmpfs", "tmpfs", "/run")
        Path("/run/sshd").mkdir(mode=0o755)
        with open(root / "moto.log", "ab") as log:
            subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **aws_env()})
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", MOTO_PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer: {(root / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.3)
    except Exception as error:  # noqa: BLE001 - reported to the test through the ready file
        detail = getattr(error, "stderr", "") or ""
        _write(ready, f"{error} {detail}")
        raise
    _write(ready, "ok")
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)


if __name__ == "__main__" and sys.argv[1:2] == ["init"]:
    _init(Path(sys.argv[2]))
