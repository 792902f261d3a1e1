"""A local multi-node Ray cluster on one machine: a head and N worker nodes, each its own `ray start`.

    python cluster/local.py up [--workers 2] [--cpus-per-worker 1] [--head-cpus 0] [--dir runs/local-cluster]
    eval "$(python cluster/local.py env)"     # RAY_ADDRESS, RAY_API_SERVER_ADDRESS and the token, for clients
    ray job submit --runtime-env cluster/runtime_env.yaml -- python pipeline/run.py
    python cluster/local.py status
    python cluster/local.py down              # stops only the processes `up` started

Why not `ray start` by hand: the harness never touches other Ray sessions on the machine. It
uses a private `--temp-dir` (so no `/tmp/ray/ray_current_cluster` is read or left behind), free
ports for everything with a fixed default (GCS, dashboard, client server, dashboard agent),
its own auth token, and it never runs `ray stop`. A node's processes are the `ray start` process,
everything under it and in its process group, and everything started with the node's
DITHAROS_LOCAL_NODE=<cluster id>/<node name> in its environment; every PID seen is recorded with
its start time in the state file. Stopping or killing a node signals those processes only, so
nothing else on the machine can be hit, even after a PID is recycled.

Nodes, their resources and labels (the same names as the cloud node types in cluster/*.yaml):
- `head`: `--num-cpus head_cpus`, resource `head_node: 1`, dashboard on 127.0.0.1 only.
- `worker-<i>`: `--num-cpus cpus_per_worker`, resources `cpu_node: <cpus>`, `writer_slot: 2` and
  `worker-<i>: 1`.
- labels `ditharos.io/node-kind` (head / cpu) and `ditharos.io/node-name` on every node.
Workers are numbered from 1 and never reuse a number: a replacement for worker-1 is worker-3.
`ray start --num-cpus` takes whole CPUs; on a 2-core box keep tasks fractional instead
(e.g. `--set compute.model_actor_cpus=0.25`).

Python API (what tests use):

    from cluster.local import LocalCluster

    with LocalCluster(tmp_path / "cluster", workers=2, cpus_per_worker=1) as cluster:
        # entering calls up(): head + worker-1 + worker-2, all ALIVE in the GCS on return
        env = cluster.env()                # for subprocesses: drivers (`python training/train.py`) and `ray job ...`
        job = subprocess.Popen([sys.executable, "training/train.py", ...], env=env)
        cluster.kill_worker("worker-1")    # SIGKILL every process of that node: a machine lost
        cluster.wait_for_nodes(2)          # the GCS notices the loss by health checks (~15-30 s)
        cluster.add_worker()               # a replacement, "worker-3"; returns once it is ALIVE
        cluster.alive_nodes()              # [{"name", "node_id", "resources", "labels"}, ...]
        cluster.pids()                     # every live PID of every node (pids("worker-2"): one node)
        ours = [psutil.Process(p) for p in cluster.pids()]
    # leaving calls down(): SIGTERM, then SIGKILL, to this cluster's processes only; temp dir removed
    assert not running(ours)               # cluster.local.running: exited, zombie or recycled PIDs don't count

`LocalCluster(root=None, *, workers=2, cpus_per_worker=1, head_cpus=0, object_store_mb=256,
node_env=None, timeout_s=180)`: `root` holds the state file, the token and each node's
`ray start` log (a fresh temp dir if None); `head_cpus=1` lets the head run tasks too (e.g. a
Ray Train controller); `node_env` adds environment to every node, e.g.
`{"RAY_health_check_period_ms": "1000"}` to notice a lost node sooner. `up()` / `down()` are the
explicit forms of the `with` block; `add_worker(cpus=, resources=, labels=)` adds to the defaults;
`LocalCluster.attach(root)` picks up a cluster another process started (what `status` / `down` use).

`env()` sets RAY_ADDRESS (the GCS, for `ray.init()` in drivers), RAY_API_SERVER_ADDRESS (the
dashboard, for `ray job submit` / `ray list`), RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH.
Give it to subprocesses; the calling process's own Ray state is never changed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

NODE_KIND_LABEL = "ditharos.io/node-kind"
NODE_NAME_LABEL = "ditharos.io/node-name"
MARKER_ENV = "DITHAROS_LOCAL_NODE"
STATE_FILE = "state.json"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "runs" / "local-cluster"
# Client-side variables that would make a node (or a client) join or authenticate elsewhere.
_FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


@dataclass
class Node:
    """One `ray start --block` and everything under it."""

    name: str
    pid: int  # the `ray start --block` process (leader of the node's process group)
    create_time: float  # its start time: a recycled PID has another
    resources: dict[str, float]
    labels: dict[str, str]
    log: str
    killed: bool = False
    seen: dict[str, float] = field(default_factory=dict)  # PID -> start time of every process seen on the node


@dataclass
class _State:
    cluster_id: str
    temp_dir: str
    token_path: str
    address: str = ""  # GCS host:port
    dashboard_url: str = ""
    next_worker: int = 1
    nodes: list[Node] = field(default_factory=list)


class LocalCluster:
    """A head and worker nodes on this machine, started and stopped as a unit (see the module docstring)."""

    def __init__(self, root: Path | str | None = None, *, workers: int = 2, cpus_per_worker: int = 1,
                 head_cpus: int = 0, object_store_mb: int = 256, node_env: dict[str, str] | None = None,
                 timeout_s: float = 180.0) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ditharos-cluster-"))
        self.num_workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.head_cpus = head_cpus
        self.object_store_mb = object_store_mb
        self.node_env = dict(node_env or {})  # extra env for the nodes, e.g. {"RAY_health_check_period_ms": "1000"}
        self.timeout_s = timeout_s
        self.state: _State | None = None
        self._popen: dict[str, subprocess.Popen] = {}
        self._ports: set[int] = set()
        self._bin = Path(sys.executable).parent

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def attach(cls, root: Path | str) -> LocalCluster:
        """The cluster whose state file is in `root` (for `status` / `down` from another process)."""
        self = cls(root)
        path = self.root / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no local cluster state in {path}")
        raw = json.loads(path.read_text())
        raw["nodes"] = [Node(**n) for n in raw["nodes"]]
        self.state = _State(**raw)
        return self

    def __enter__(self) -> LocalCluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Start the head, then the workers one by one (concurrent joins race for socket names)."""
        if (self.root / STATE_FILE).is_file() and LocalCluster.attach(self.root).pids():
            raise RuntimeError(f"a local cluster from {self.root} is still running; run `down` first")
        self.root.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes: keep Ray's temp dir short, not under root.
        temp_dir = tempfile.mkdtemp(prefix="ditharos-ray-")
        token_path = self.root / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        self.state = _State(cluster_id=secrets.token_hex(6), temp_dir=temp_dir, token_path=str(token_path))
        try:
            self._start_head()
            for _ in range(self.num_workers):
                self.add_worker()
        except BaseException:
            self.down()
            raise

    def down(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process of every node, SIGKILL what is left after `grace_s`; remove the temp dir."""
        if self.state is None:
            return
        for node in self.state.nodes:
            self._node_processes(node)  # record the tree before it starts coming apart
            leader = self._leader(node)
            if leader is not None:
                _signal([leader], signal.SIGTERM)  # `ray start --block` stops its own children on SIGTERM
        deadline = time.monotonic() + grace_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.25)
        for node in self.state.nodes:
            self._kill_node_processes(node)
        for proc in self._popen.values():
            proc.wait()  # reap our children so they do not linger as zombies
        shutil.rmtree(self.state.temp_dir, ignore_errors=True)
        (self.root / STATE_FILE).unlink(missing_ok=True)
        self.state = None
        self._popen.clear()

    # ---------------------------------------------------------------- nodes

    def add_worker(self, cpus: int | None = None, resources: dict[str, float] | None = None,
                   labels: dict[str, str] | None = None) -> Node:
        """Start one more worker node (`worker-<next number>`) and wait until the GCS lists it ALIVE."""
        st = self._require_up()
        name = f"worker-{st.next_worker}"
        st.next_worker += 1
        cpus = self.cpus_per_worker if cpus is None else cpus
        res = {"cpu_node": float(cpus), "writer_slot": 2.0, name: 1.0, **(resources or {})}
        lab = {NODE_KIND_LABEL: "cpu", NODE_NAME_LABEL: name, **(labels or {})}
        node = self._start_node(name, ["start", f"--address={st.address}", f"--num-cpus={cpus}"], res, lab)
        self._wait_until(lambda: name in {n["name"] for n in self.alive_nodes()}, f"{name} to join", node)
        return node

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL every process of worker `name` at once, like losing the machine; returns the PIDs killed.

        Returns at once: call wait_for_nodes() to wait until the GCS has marked the node dead.
        """
        node = self.node(name)
        if node.labels.get(NODE_KIND_LABEL) == "head":
            raise ValueError("kill_worker kills worker nodes; the head is stopped by down()")
        killed = self._kill_node_processes(node)
        node.killed = True
        self._save()
        return killed

    def node(self, name: str) -> Node:
        for node in self._require_up().nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r}; nodes: {[n.name for n in self._require_up().nodes]}")

    def alive_nodes(self) -> list[dict]:
        """Nodes the GCS lists as ALIVE: name, node_id, resources (totals) and labels."""
        data = self._dashboard_get("/api/v0/nodes?limit=1000&detail=true")
        rows = data["data"]["result"]["result"]
        return [{"name": r["labels"].get(NODE_NAME_LABEL, "?"), "node_id": r["node_id"],
                 "resources": r["resources_total"], "labels": r["labels"]}
                for r in rows if r["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float | None = None) -> list[dict]:
        """Wait until exactly `count` nodes are ALIVE; returns them."""
        result: list[dict] = []

        def ready() -> bool:
            nonlocal result
            result = self.alive_nodes()
            return len(result) == count

        self._wait_until(ready, f"{count} alive node(s)", None, timeout_s)
        return result

    def pids(self, node: str | None = None) -> list[int]:
        """Every live process of this cluster's nodes (or of the one node named)."""
        if self.state is None:
            return []
        nodes = self.state.nodes if node is None else [self.node(node)]
        return sorted({p.pid for n in nodes for p in self._node_processes(n)})

    # ---------------------------------------------------------------- clients

    @property
    def address(self) -> str:
        return self._require_up().address

    @property
    def dashboard_url(self) -> str:
        return self._require_up().dashboard_url

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a client subprocess (a driver or the `ray` CLI) of this cluster."""
        st = self._require_up()
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _FOREIGN_ENV}
        env.pop(MARKER_ENV, None)
        env.update(RAY_ADDRESS=st.address, RAY_API_SERVER_ADDRESS=st.dashboard_url,
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=st.token_path,
                   PATH=f"{self._bin}{os.pathsep}{env.get('PATH', '')}")
        return env

    # ---------------------------------------------------------------- internals

    def _start_head(self) -> None:
        st = self._require_up()
        dashboard_port = self._free_port()
        args = ["start", "--head", "--port=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={self._free_port()}",
                f"--temp-dir={st.temp_dir}", f"--num-cpus={self.head_cpus}"]
        node = self._start_node("head", args, {"head_node": 1.0},
                                {NODE_KIND_LABEL: "head", NODE_NAME_LABEL: "head"})
        current = Path(st.temp_dir) / "ray_current_cluster"  # written by the head once its GCS is up
        self._wait_until(lambda: current.is_file() and current.read_text().strip() != "", "the head's GCS", node)
        st.address = current.read_text().strip()
        st.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self._save()

        def head_alive() -> bool:
            try:
                return any(n["name"] == "head" for n in self.alive_nodes())
            except (OSError, KeyError, ValueError):  # dashboard not serving yet
                return False

        self._wait_until(head_alive, "the dashboard", node)

    def _start_node(self, name: str, args: list[str], resources: dict[str, float], labels: dict[str, str]) -> Node:
        st = self._require_up()
        common = ["--block", "--disable-usage-stats", f"--object-store-memory={self.object_store_mb * 2**20}",
                  # Defaults that are fixed ports (or a shared port range) would collide between nodes.
                  f"--dashboard-agent-listen-port={self._free_port()}", "--min-worker-port=0", "--max-worker-port=0",
                  f"--resources={json.dumps(resources)}",
                  "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items())]
        env = self.env()
        env.update(self.node_env)
        env.pop("RAY_API_SERVER_ADDRESS", None)
        env.pop("RAY_ADDRESS", None)
        env[MARKER_ENV] = f"{st.cluster_id}/{name}"
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(self._bin / "ray"), *args, *common], env=env, cwd=self.root,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: the node
        self._popen[name] = proc
        node = Node(name=name, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(),
                    resources=resources, labels=labels, log=str(log))
        st.nodes.append(node)
        self._save()
        return node

    def _kill_node_processes(self, node: Node) -> list[int]:
        """SIGKILL the node's processes until none is left (a process may spawn while we kill)."""
        killed: set[int] = set()
        for _ in range(5):
            procs = self._node_processes(node)
            if not procs:
                break
            _signal(procs, signal.SIGKILL)
            killed |= {p.pid for p in procs}
            psutil.wait_procs(procs, timeout=10)
        if node.name in self._popen:
            self._popen[node.name].wait()
        return sorted(killed)

    def _leader(self, node: Node) -> psutil.Process | None:
        """The node's `ray start` process, if it is still alive (and not a recycled PID)."""
        return _same_process(node.pid, node.create_time)

    def _node_processes(self, node: Node) -> list[psutil.Process]:
        """Live processes of `node`, recorded in node.seen.

        Ray renames its agents and workers (setproctitle), which hides their environment, and
        starts each worker in a process group of its own; so a node's processes are the union of:
        the `ray start` process and its descendants; members of its process group (no new group can
        take that id while one member lives); processes carrying the node's marker; PIDs seen before.
        """
        marker = f"{self._require_up().cluster_id}/{node.name}"
        found: dict[int, psutil.Process] = {}
        leader = self._leader(node)
        if leader is not None:
            found[leader.pid] = leader
            for child in _children(leader):
                found[child.pid] = child
        for proc in psutil.process_iter():
            try:
                if proc.pid in found:
                    continue
                if os.getpgid(proc.pid) == node.pid and proc.create_time() >= node.create_time:
                    found[proc.pid] = proc
                elif proc.environ().get(MARKER_ENV) == marker:
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        for pid, started in node.seen.items():
            proc = _same_process(int(pid), started)
            if proc is not None:
                found.setdefault(proc.pid, proc)
        live = []
        for proc in found.values():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    live.append(proc)
                    node.seen[str(proc.pid)] = proc.create_time()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return live

    def _dashboard_get(self, path: str) -> dict:
        st = self._require_up()
        token = Path(st.token_path).read_text().strip()
        req = urllib.request.Request(st.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def _wait_until(self, ready, what: str, node: Node | None, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                if ready():
                    return
            except (OSError, urllib.error.URLError, KeyError, ValueError):
                pass  # the dashboard may be restarting or still loading
            proc = self._popen.get(node.name) if node is not None else None
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"`ray start` for {node.name} exited with {proc.returncode} while waiting for "
                                   f"{what}:\n{_tail(node.log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}" + (f":\n{_tail(node.log)}" if node else ""))
            time.sleep(0.5)

    def _free_port(self) -> int:
        """A port free on every interface, never handed out twice by this cluster."""
        while True:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            if port not in self._ports:
                self._ports.add(port)
                return port

    def _require_up(self) -> _State:
        if self.state is None:
            raise RuntimeError("the local cluster is not up")
        return self.state

    def _save(self) -> None:
        """Write the state file, with every PID of every node seen so far (for `down` from another process)."""
        st = self._require_up()
        for node in st.nodes:
            self._node_processes(node)
        tmp = self.root / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(st), indent=2) + "\n")
        tmp.replace(self.root / STATE_FILE)


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running: not exited, not a zombie, not a recycled PID (for "nothing left" checks)."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    """The process `pid` if it is the one that started at `create_time` and is not a zombie."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        pass
    return None


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _tail(path: str, num_chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-num_chars:]
    except OSError:
        return ""


# -------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="state, token and logs (default: runs/local-cluster)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--head-cpus", type=int, default=0)
    p.add_argument("--object-store-mb", type=int, default=256)
    args = p.parse_args(argv)

    if args.command == "up":
        cluster = LocalCluster(args.dir, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                               head_cpus=args.head_cpus, object_store_mb=args.object_store_mb)
        cluster.up()
        print(f"local cluster up: {len(cluster.state.nodes)} node(s), GCS {cluster.address}, "
              f"dashboard {cluster.dashboard_url}\nstate: {cluster.root / STATE_FILE}\n"
              f'clients: eval "$(python cluster/local.py env --dir {cluster.root})"')
        return 0
    try:
        cluster = LocalCluster.attach(args.dir)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 0 if args.command == "down" else 1
    if args.command == "down":
        cluster.down()
        print("local cluster down")
    elif args.command == "env":
        env = cluster.env(base={})
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            print(f"export {key}={env[key]}")
    else:
        st = cluster.state
        print(f"GCS {st.address}  dashboard {st.dashboard_url}  temp dir {st.temp_dir}")
        try:
            alive = {n["name"] for n in cluster.alive_nodes()}
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            alive = set()
            print("(dashboard not reachable)")
        for node in st.nodes:
            procs = cluster._node_processes(node)
            print(f"{node.name:<10} pid {node.pid:<8} {len(procs):>3} process(es)  "
                  f"{'ALIVE' if node.name in alive else 'dead'}{'  (killed)' if node.killed else ''}  {node.resources}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
