"""Ray launcher: ``dtrain launch --ray``: place M nodes x N ranks on a Ray cluster, run, restart.

Owns the driver side of a Ray job:

* placement: one placement-group bundle per node (``N x cpus_per_rank`` CPUs, ``N x
  gpus_per_rank`` GPUs), ``STRICT_SPREAD`` so the M bundles land on M different Ray nodes; one
  :class:`dtrain.launch.ray_agent.NodeAgent` actor per bundle runs that node's N ranks as plain
  subprocesses, so ``NODE_RANK``/``LOCAL_RANK`` are the real placement;
* the environment: torchrun's variables (``MASTER_ADDR`` is node 0's address) plus the dtrain
  contract, built by the same functions as the local launcher (:mod:`dtrain.launch.local`);
* output: the driver drains each node's output into per-rank log files and follows them with the
  local launcher's followers (``[rank R]`` prefix, one progress bar), and reports a failed run
  with the local launcher's failure summary;
* restarts: a rank that exits non-zero, a node whose actor dies (node loss) or stops answering
  ends the attempt; the whole group is stopped and started again (same actors when every node
  survived, a new placement otherwise) up to ``max_restarts`` times, with
  ``TORCHELASTIC_RESTART_COUNT``, ``DTRAIN_RESTART_CAUSE`` and ``DTRAIN_FAILURE_TIME`` set. A
  lost node without replacement: continue at once on the nodes left when ``min_nodes`` allows,
  otherwise wait ``node_wait_s`` for enough nodes and fail naming the lost node. A rank that
  failed on a usage error (exit status 2, dtrain.errors) ends the job at once with its one line.
  Ranks run through the rank bootstrap (dtrain/launch/bootstrap.py), whose rank events name the
  rank that failed first (rank clocks: the nodes' clocks, assumed in sync to well under a second).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

from torch.distributed.elastic.multiprocessing.api import SignalException

from dtrain.errors import USAGE_EXIT_STATUS
from dtrain.launch import bootstrap
from dtrain.launch.local import (
    LaunchSpec, RankLogFollowers, contract_env, describe_failure, exit_status, first_failure,
    format_failures, process_defaults, restart_env, signals_raise, usage_report, with_reported,
)
from dtrain.launch.ray_agent import NodeAgent, RankExit
from dtrain.launch.reaper import Reaper
from dtrain.snapshot.client import SPAWN_VAR
from dtrain.snapshot.secret import SECRET_VAR, new_secret
from dtrain.launch.ray_cluster import RayUnavailable, ray_session

RAY_STOP_GRACE_S = 4.0  # the orderly stop kills actors and shuts the job's Ray down: slower than local ranks
RAY_STOP_EXIT_S = 8.0  # within the 10 s a stop may take (docs: README "Stopping")

__all__ = ["RaySpec", "run_ray", "PASSTHROUGH_VARS"]

PASSTHROUGH_VARS: tuple[str, ...] = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")
_UNRESPONSIVE_S = 30.0  # a node agent that has not answered a poll for this long counts as lost


@dataclass
class RaySpec:
    """A Ray job: the launch itself (same fields as the local launcher) plus placement options."""

    job: LaunchSpec
    address: str | None = None
    """``None``: a private Ray cluster on this machine for this job; ``auto`` or ``HOST:PORT``."""
    min_nodes: int | None = None
    node_wait_s: float = 60.0
    runtime_env: dict[str, Any] | None = None
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    dashboard: bool = False
    isolate: bool = True
    insecure: bool = False
    """Use ``address`` even when the cluster does not enforce Ray's token authentication."""
    poll_interval_s: float = 0.1
    failure_grace_s: float = 3.0
    """After a rank fails, how long to wait for every node to answer before naming a node lost."""

    @property
    def bundle(self) -> dict[str, float]:
        res = {"CPU": self.job.nproc * self.cpus_per_rank}
        if self.gpus_per_rank:
            res["GPU"] = self.job.nproc * self.gpus_per_rank
        return res


class LaunchError(Exception):
    """The job cannot be placed or started; the message names what is missing."""


@dataclass
class _Node:
    index: int
    agent: Any
    info: dict[str, Any]

    def describe(self) -> str:
        return f"node {self.index} ({self.info['ip']}, Ray node {str(self.info['node_id'])[:8]})"


@dataclass
class _Placement:
    pg: Any
    nodes: list[_Node]


@dataclass
class _Failure:
    cause: str
    time: float
    report: str
    status: int
    lost: list[_Node] = field(default_factory=list)
    usage: bool = False
    """A usage error (exit status 2): ``report`` is its one line; restarting cannot help."""


def _fmt_res(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


class _Job:
    def __init__(self, spec: RaySpec, followers: RankLogFollowers, log_dir: str, err: TextIO) -> None:
        self.spec, self.followers, self.log_dir, self.err = spec, followers, log_dir, err
        self.lost: list[str] = []  # descriptions of nodes lost during the job
        self.extra_defaults: dict[str, str] = {}  # per-rank defaults the user's environment may override
        self.run_id = f"dtrain-{uuid.uuid4().hex[:12]}"  # stable across attempts (snapshot processes)
        self.snapshot_hosts: dict[str, Any] = {}  # Ray node id -> its SnapshotHost actor (whole job)
        self.secret = new_secret()  # the job's secret, to the ranks in their environment (SECURITY.md)

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # ------------------------------------------------------------------ placement
    def _fitting_nodes(self) -> list[dict[str, Any]]:
        import ray

        need = self.spec.bundle
        return [n for n in ray.nodes() if n.get("Alive")
                and all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items())]

    def _target(self, fitting: int) -> int:
        want, floor = self.spec.job.nodes, self.spec.min_nodes
        if fitting < want and floor is not None and fitting >= floor:
            return fitting  # continue on fewer nodes at once rather than wait for a replacement
        return want

    def _reserve(self, deadline: float) -> tuple[Any, int]:
        """A ready placement group of as many bundles as the job should use now, or LaunchError."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        pg, target = None, 0
        while True:
            fitting = self._fitting_nodes()
            if pg is None or self._target(len(fitting)) != target:
                if pg is not None:
                    remove_placement_group(pg)
                target = self._target(len(fitting))
                pg = placement_group([dict(self.spec.bundle) for _ in range(target)], strategy="STRICT_SPREAD")
            ready, _ = ray.wait([pg.ready()], timeout=0.5)
            if ready:
                return pg, target
            if time.monotonic() > deadline:
                remove_placement_group(pg)
                raise LaunchError(self._placement_message(target, fitting))

    def place(self) -> _Placement:
        """Reserve the bundles and start one node agent in each; retried until ``node_wait_s``
        (a node that died but is not yet known dead can take a bundle and fail its agent)."""
        import ray
        from ray.util.placement_group import remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle, deadline = self.spec.bundle, time.monotonic() + self.spec.node_wait_s
        agent_cls = ray.remote(NodeAgent)
        while True:
            pg, target = self._reserve(deadline)
            agents = [agent_cls.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=k),
            ).remote(k) for k in range(target)]
            try:
                infos = ray.get([a.info.remote() for a in agents],
                                timeout=max(30.0, deadline - time.monotonic()))
                break
            except Exception as exc:
                for a in agents:
                    ray.kill(a)
                remove_placement_group(pg)
                if time.monotonic() > deadline:
                    raise LaunchError(f"the node agents did not start: {' '.join(str(exc).split())[:400]}") from None
                time.sleep(1.0)
        if target < self.spec.job.nodes:
            self.say(f"dtrain: continuing on {target} of {self.spec.job.nodes} nodes (--min-nodes "
                     f"{self.spec.min_nodes}); lost: {', '.join(self.lost) or 'none'}")
        placement = _Placement(pg, [_Node(k, a, info) for k, (a, info) in enumerate(zip(agents, infos))])
        n = self.spec.job.nproc
        for node in placement.nodes:
            self.say(f"dtrain: node {node.index} on {node.info['ip']} (Ray node {str(node.info['node_id'])[:8]}): "
                     f"ranks {node.index * n}-{node.index * n + n - 1}")
        return placement

    def _placement_message(self, target: int, fitting: list[dict[str, Any]]) -> str:
        n = self.spec.job.nproc
        have = ", ".join(f"{f.get('NodeManagerAddress')} ({str(f.get('NodeID'))[:8]})" for f in fitting) or "none"
        msg = (f"cannot place {target} node(s) x {n} rank(s): each node needs {_fmt_res(self.spec.bundle)} "
               f"and the nodes must differ; the Ray cluster has {len(fitting)} alive node(s) that fit "
               f"[{have}]")
        if self.lost:
            msg += f"; lost during this job: {', '.join(self.lost)} (no replacement joined)"
        msg += f"; waited {self.spec.node_wait_s:g} s. Add Ray nodes, lower --nodes"
        if self.spec.min_nodes is None:
            msg += ", or pass --min-nodes to continue on fewer nodes"
        return msg

    @staticmethod
    def release(placement: _Placement, run_id: str | None = None) -> None:
        """Stop the ranks and the agents, free the bundles; with ``run_id`` (the job is over) also
        end the job's per-node helpers."""
        import ray
        from ray.util.placement_group import remove_placement_group

        refs = [node.agent.stop.remote() for node in placement.nodes]
        if run_id is not None:
            refs += [node.agent.remove_run.remote(run_id) for node in placement.nodes]
        try:
            ray.wait(refs, num_returns=len(refs), timeout=10)
        except Exception:
            pass
        for node in placement.nodes:
            try:
                ray.kill(node.agent)
            except Exception:
                pass
        try:
            remove_placement_group(placement.pg)
        except Exception:
            pass

    # ------------------------------------------------------------------ one attempt
    def _script_argv(self) -> list[str]:
        job, wd = self.spec.job, (self.spec.runtime_env or {}).get("working_dir")
        script = job.script
        if isinstance(wd, str) and os.path.isdir(wd):
            rel = os.path.relpath(script, os.path.abspath(wd))
            if not rel.startswith(".."):
                script = rel  # the actor's cwd is its copy of working_dir
        return [script, *job.script_args]

    def _rank_envs(self, placement: _Placement, attempt: int, restart: tuple[str, float] | None,
                   port: int) -> dict[int, dict[int, dict[str, str]]]:
        job, nodes = self.spec.job, placement.nodes
        n, m = job.nproc, len(nodes)
        base = contract_env(dataclasses.replace(job, nodes=m))
        base["DTRAIN_RUN_ID"] = self.run_id
        base[SECRET_VAR] = self.secret
        base[SPAWN_VAR] = "request"  # snapshot processes are Ray actors started here (dtrain.snapshot.ray_host)
        base.update(restart_env(attempt, job.max_restarts, *(restart or (None, None))))
        chosen = {k: os.environ[k] for k in PASSTHROUGH_VARS if k in os.environ}
        out: dict[int, dict[int, dict[str, str]]] = {}
        for node in nodes:
            defaults = {**{k: v for k, v in self.extra_defaults.items() if k not in os.environ},
                        **process_defaults(node.info.get("ifname"))}
            out[node.index] = {}
            for local in range(n):
                rank = node.index * n + local
                out[node.index][rank] = {
                    **base, **defaults, **chosen,
                    "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(m * n),
                    "LOCAL_WORLD_SIZE": str(n), "NODE_RANK": str(node.index), "GROUP_RANK": str(node.index),
                    "GROUP_WORLD_SIZE": str(m), "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(m * n),
                    "MASTER_ADDR": str(nodes[0].info["ip"]), "MASTER_PORT": str(port),
                }
        return out

    def attempt(self, placement: _Placement, attempt: int, restart: tuple[str, float] | None) -> _Failure | None:
        import ray

        nodes = placement.nodes
        port = int(ray.get(nodes[0].agent.info.remote(), timeout=30)["port"])  # fresh each attempt
        envs = self._rank_envs(placement, attempt, restart, port)
        attempt_dir = os.path.join(self.log_dir, f"attempt{attempt}")
        os.makedirs(attempt_dir)
        files: dict[int, tuple[Any, Any]] = {}
        for node in nodes:
            for rank in envs[node.index]:
                paths = (os.path.join(attempt_dir, f"rank{rank}.out"), os.path.join(attempt_dir, f"rank{rank}.err"))
                files[rank] = (open(paths[0], "wb"), open(paths[1], "wb"))
                self.followers.follow(rank, *paths)
        try:
            argv = ["-m", bootstrap.MODULE, *self._script_argv()]
            ray.get([node.agent.start.remote(argv, envs[node.index]) for node in nodes], timeout=60)
            outcome = self._watch(nodes, files)
        finally:
            self._stop_ranks(nodes, files)
            for out, err in files.values():
                out.close()
                err.close()
            self.followers.stop_following()  # every rank event read
        return None if outcome is None else self._failure(*outcome)

    @staticmethod
    def _write(files: dict[int, tuple[Any, Any]], result: Any) -> None:
        for rank, data in result.stdout.items():
            if data and rank in files:
                files[rank][0].write(data)
                files[rank][0].flush()
        for rank, data in result.stderr.items():
            if data and rank in files:
                files[rank][1].write(data)
                files[rank][1].flush()

    def _stop_ranks(self, nodes: list[_Node], files: dict[int, tuple[Any, Any]]) -> None:
        import ray

        refs = {node.index: node.agent.stop.remote() for node in nodes}
        for ref in refs.values():
            try:
                self._write(files, ray.get(ref, timeout=15))
            except Exception:  # a lost node: nothing left to collect
                pass

    def _watch(self, nodes: list[_Node], files: dict[int, tuple[Any, Any]]
               ) -> tuple[list[_Node], dict[int, RankExit], dict[int, float]] | None:
        """Poll until every rank succeeded (None) or the attempt failed: (lost nodes, failed
        ranks, node -> time lost), the arguments of :meth:`_failure`."""
        import ray

        world = len(files)
        outstanding: dict[int, tuple[Any, float]] = {}  # node -> (poll ref, monotonic issue time)
        answered_at: dict[int, float] = {node.index: 0.0 for node in nodes}  # issue time of last answer
        exits: dict[int, RankExit] = {}
        lost: dict[int, float] = {}  # node -> unix time it was seen lost
        failed_at: float | None = None
        by_index = {node.index: node for node in nodes}
        while True:
            now = time.monotonic()
            for node in nodes:
                if node.index not in outstanding and node.index not in lost:
                    outstanding[node.index] = (node.agent.poll.remote(), now)
            refs = [ref for ref, _ in outstanding.values()]
            ray.wait(refs, num_returns=len(refs), timeout=self.spec.poll_interval_s)
            for index, (ref, issued) in list(outstanding.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    limit = self.spec.failure_grace_s if failed_at is not None else _UNRESPONSIVE_S
                    if time.monotonic() - issued > limit:
                        lost[index] = time.time()
                        del outstanding[index]
                    continue
                del outstanding[index]
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    lost[index] = time.time()
                    continue
                self._write(files, result)
                if result.spawn:
                    self._start_snapshot_host(by_index[index], result.spawn)
                answered_at[index] = issued
                for e in result.exited:
                    exits[e.rank] = e
            failed = {r: e for r, e in exits.items() if e.exitcode != 0}
            if not failed and not lost and len(exits) == world:
                return None
            if (failed or lost) and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is None:
                time.sleep(max(0.0, self.spec.poll_interval_s - (time.monotonic() - now)))
                continue
            heard_from_all = all(answered_at[i] >= failed_at for i in by_index if i not in lost)
            if lost or heard_from_all or time.monotonic() - failed_at > self.spec.failure_grace_s:
                return [by_index[i] for i in sorted(lost)], failed, lost
            time.sleep(max(0.0, self.spec.poll_interval_s - (time.monotonic() - now)))

    def _start_snapshot_host(self, node: _Node, argv: list[str]) -> None:
        """Start (or find) the Ray actor that is ``node``'s snapshot process; it serves until the job ends."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from dtrain.snapshot.ray_host import SnapshotHost

        node_id = str(node.info["node_id"])
        host = self.snapshot_hosts.get(node_id)
        if host is None:
            host = self.snapshot_hosts[node_id] = ray.remote(SnapshotHost).options(
                num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
        try:
            ray.get(host.start.remote(argv), timeout=60)
        except Exception as exc:  # the rank waiting for it reports the failure; say why here
            self.snapshot_hosts.pop(node_id, None)
            self.say(f"dtrain: could not start the snapshot process of node {node.index} as a Ray actor: "
                     f"{' '.join(str(exc).split())[:300]}")

    def _end_snapshot_hosts(self) -> None:
        import ray

        for host in self.snapshot_hosts.values():
            try:
                ray.kill(host)
            except Exception:
                pass
        self.snapshot_hosts.clear()

    def _failure(self, lost_nodes: list[_Node], failed: dict[int, RankExit], lost: dict[int, float]) -> _Failure:
        n = self.spec.job.nproc
        if lost_nodes:
            first = lost_nodes[0]
            cause = f"node {first.index} ({first.info['ip']}) lost"
            when = min([lost[first.index], *(e.timestamp for e in failed.values())])
            report = "dtrain: job failed: " + "; ".join(
                f"{node.describe()} lost (ranks {node.index * n}-{node.index * n + n - 1} ran there)"
                for node in lost_nodes)
            self.lost.extend(node.describe() for node in lost_nodes)
            return _Failure(cause, when, report, exit_status(failed) if failed else 1, lost_nodes)
        events = self.followers.events
        failed = with_reported(failed, events)
        rank = first_failure(failed, events)
        cause = describe_failure(rank, failed[rank].exitcode)
        usage = usage_report(failed, events)
        if usage is not None:
            return _Failure(cause, failed[rank].timestamp, usage, USAGE_EXIT_STATUS, usage=True)
        report = format_failures(failed, self.followers.stderr_paths, events=events)
        return _Failure(cause, failed[rank].timestamp, report, exit_status(failed))

    # ------------------------------------------------------------------ the restart loop
    def run(self) -> int:
        job = self.spec.job
        placement: _Placement | None = None
        restart: tuple[str, float] | None = None
        attempt = 0
        try:
            while True:
                if placement is None:
                    placement = self.place()
                failure = self.attempt(placement, attempt, restart)
                if failure is None:
                    return 0
                if failure.usage:  # a restart would fail the same way
                    self.say(failure.report)
                    return failure.status
                if attempt >= job.max_restarts:
                    self.say(failure.report)
                    self.say(f"dtrain: {failure.cause}; no restarts left (--max-restarts {job.max_restarts})")
                    return failure.status
                attempt += 1
                restart = (failure.cause, failure.time)
                self.say(f"dtrain: {failure.cause}; restarting all ranks (restart {attempt} of {job.max_restarts})")
                if failure.lost:
                    self.release(placement)
                    placement = None
        finally:
            self._end_snapshot_hosts()
            if placement is not None:
                self.release(placement, self.run_id)


def run_ray(spec: RaySpec, stdout: TextIO | None = None, stderr: TextIO | None = None,
            exit_on_signal: bool = False) -> int:
    """Run ``spec`` on Ray; return the exit status (0, the failing rank's code, 1, or 128+signal).

    A stop signal arms the same watchdog as the local launcher's (dtrain.launch.reaper): if the
    orderly stop (killing the rank actors, shutting the job's Ray down) has not finished after
    ``RAY_STOP_GRACE_S``, every descendant (the job's own Ray processes, hence its ranks) is killed,
    and the launcher exits at ``RAY_STOP_EXIT_S`` whatever its clean-up is doing. On a cluster given
    with ``--address`` the ranks are not descendants; Ray ends them when this driver exits. With
    ``exit_on_signal`` (the CLI) a stopped launcher ends with ``os._exit`` once its clean-up is done.

    With ``spec.address`` None and ``spec.isolate`` True this moves the calling process into a
    private network namespace first (see :mod:`dtrain.launch.ray_cluster`); the CLI runs it in
    its own process for that reason.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    followers = RankLogFollowers(out, err)
    log_dir = tempfile.mkdtemp(prefix="dtrain-ray-")

    def warn(text: str) -> None:
        print(text, file=err, flush=True)

    reaper = Reaper(grace_s=RAY_STOP_GRACE_S, exit_after_s=RAY_STOP_EXIT_S)
    try:
        with signals_raise(reaper) as reinstall_handlers:
            try:
                with ray_session(spec.address, spec.job.nodes, spec.bundle, dashboard=spec.dashboard,
                                 isolate=spec.isolate, runtime_env=spec.runtime_env, warn=warn,
                                 insecure=spec.insecure) as session:
                    reinstall_handlers()  # ray.init's SIGTERM handler aborts the driver without clean-up
                    job = _Job(spec, followers, log_dir, err)
                    if spec.dashboard and session.local:
                        where = (f" inside this job's network namespace (e.g. nsenter --net=/proc/{os.getpid()}"
                                 "/ns/net curl ...)" if session.isolated else "")
                        job.say(f"dtrain: Ray dashboard at http://{session.cluster.webui_url}{where}")
                    if session.isolated:  # no name resolution in the private namespace: c10d warns
                        job.extra_defaults["TORCH_CPP_LOG_LEVEL"] = "ERROR"
                    return job.run()
            except (RayUnavailable, LaunchError) as exc:
                print(f"dtrain: error: {exc}", file=err, flush=True)
                return 1
            except KeyboardInterrupt:
                print("dtrain: interrupted, stopped all ranks", file=err, flush=True)
                return 128 + int(signal.SIGINT)
            except SignalException as exc:
                sig = signal.Signals(int(exc.sigval))
                print(f"dtrain: received {sig.name}, stopped all ranks", file=err, flush=True)
                return 128 + int(sig)
    finally:
        followers.stop_following()
        shutil.rmtree(log_dir, ignore_errors=True)
        reaper.done()
        if exit_on_signal:
            reaper.exit_if_signalled(128 + int(reaper.signal or 0))
