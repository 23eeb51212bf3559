"""`phasesplit local FILE.yaml [--model DIR] [--port N]`: a SplitInference as local processes.

The router and every pool's workers run as `phasesplit` child processes on 127.0.0.1. Pools can
grow and shrink while it runs (`LocalCluster.add_worker` / `remove_worker`), which is what the
autoscaling policy drives. Ctrl-C or SIGTERM stops everything; children also die with the
launcher if it is killed. The router's port is checked before anything loads; a process that keeps
failing is not restarted forever (`restarts`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import secrets
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

from phasesplit import auth
from phasesplit.cli_format import HelpFormatter
from phasesplit.control import worker_config
from phasesplit.local import keys
from phasesplit.local import plan as local_plan
from phasesplit.local import ports
from phasesplit.local.processes import (ManagedProcess, ProcessFailed, free_port, free_ports, phasesplit_argv,
                                        wait_grpc_serving, wait_http_ok)
from phasesplit.local.progress import Progress
from phasesplit.local.restarts import Restarts
from phasesplit.logs import add_logging_flags, announce, configure_logging, logging_argv

log = logging.getLogger("phasesplit.local")
HOST = "127.0.0.1"


class StartCancelled(ProcessFailed):
    pass


@dataclass(slots=True)
class WorkerHandle:
    pool: str
    address: str
    proc: ManagedProcess
    metrics_address: str = ""   # the worker's own Prometheus /metrics


class LocalCluster:
    def __init__(self, plan: local_plan.LocalPlan, log_dir: pathlib.Path, ready_timeout: float = 120.0,
                 api_key: str | None = None, log_flags: tuple[str, ...] = (), worker_token: str | None = None):
        self.plan = plan
        # clients must send it (by default the environment's, as the router's own); None: no key
        self.api_key = os.environ.get(keys.ENV) if api_key is None else api_key
        self.log_flags = tuple(log_flags)   # every child logs as the launcher does
        self.log_dir = log_dir
        self.ready_timeout = ready_timeout
        self.workers: dict[str, list[WorkerHandle]] = {name: [] for name in plan.pools}
        self.router: ManagedProcess | None = None
        self.router_port = plan.router_port or free_port()
        self._serial = 0
        self._lock = threading.RLock()
        self._retiring: list[threading.Thread] = []
        self._starting: dict[str, list[WorkerHandle]] = {name: [] for name in plan.pools}
        self._admin_token = secrets.token_urlsafe(32)  # only this launcher may repoint the router's pools
        # This run's workers take calls only from its router and its prompt workers (by env, never on argv).
        self._worker_env = {**os.environ, auth.TOKEN_ENV: worker_token or auth.new_token()}
        self._worker_env.pop(auth.TOKEN_FILE_ENV, None)
        self.restarts = Restarts()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.router_port}/v1"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.router_port}"

    # ---- start and stop ----

    def start(self) -> None:
        started = [self.begin_start(pool.name) for pool in self.plan.pools.values() for _ in range(pool.replicas)]
        for handle in started:
            self.finish_start(handle)
        try:  # checked before the workers loaded too; a program may have taken it since
            ports.check_free(HOST, self.router_port, "--port or spec.router.service.port")
        except ports.PortInUse as exc:
            raise ProcessFailed(f"router: {exc}") from None
        self._start_router()

    def _start_router(self) -> None:
        env = {**self._worker_env, "PHASESPLIT_ADMIN_TOKEN": self._admin_token}
        env.pop(keys.ENV, None)
        if self.api_key:
            env[keys.ENV] = self.api_key
        self.router = ManagedProcess("router", self.router_argv(self.router_port), self.log_dir, env=env).start()
        try:
            wait_http_ok(self.router, f"{self.base_url}/health", self.ready_timeout)
        except ProcessFailed:
            self.router.stop(5)
            raise

    def processes(self) -> list[ManagedProcess]:
        """The router and every worker, in the router or still starting."""
        with self._lock:
            handles = [h for pools in (self.workers, self._starting) for pool in pools.values() for h in pool]
        return [h.proc for h in handles] + ([self.router] if self.router is not None else [])

    def supervise(self, interval: float = 1.0) -> threading.Event:
        """Replaces dead processes every `interval` seconds in a background thread until the event is set."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                try:
                    self.replace_dead()
                except Exception:  # noqa: BLE001 - keep supervising; the next round tries again
                    log.exception("replacing dead processes failed")

        threading.Thread(target=run, name="supervisor", daemon=True).start()
        return stop

    def stop(self, timeout: float | None = None) -> None:
        """Router first (no new work), then every worker at once: SIGTERM, wait, SIGKILL."""
        timeout = self.plan.drain_timeout + 5 if timeout is None else timeout
        if self.router is not None:
            self.router.stop(10)
        with self._lock:
            handles = [h for pool in self.workers.values() for h in pool]
            handles += [h for pool in self._starting.values() for h in pool]
        stoppers = [threading.Thread(target=h.proc.stop, args=(timeout,)) for h in handles]
        for t in stoppers:
            t.start()
        for t in stoppers + self._retiring:
            t.join()

    # ---- run-time pool changes ----

    def add_worker(self, pool: str) -> WorkerHandle:
        """Starts a worker and adds it to the router once it is SERVING."""
        return self.finish_start(self.begin_start(pool))

    def begin_start(self, pool: str) -> WorkerHandle:
        """Spawns a worker; it counts in `replicas` from now on, and joins the router in `finish_start`."""
        handle = self._spawn_worker(pool)
        with self._lock:
            self._starting[pool].append(handle)
        return handle

    def finish_start(self, handle: WorkerHandle) -> WorkerHandle:
        """Waits for a `begin_start` worker to be SERVING, then adds it to the router."""
        pool = handle.pool
        try:
            wait_grpc_serving(handle.proc, handle.address, self.ready_timeout)
        except BaseException:
            handle.proc.stop(5)
            self._forget_start(handle)
            raise
        with self._lock:
            if handle not in self._starting[pool]:
                raise StartCancelled(f"{handle.proc.name} was cancelled while it started")
            self._starting[pool].remove(handle)
            self.workers[pool].append(handle)
            self._publish(pool)
        return handle

    def cancel_start(self, pool: str) -> WorkerHandle | None:
        """Stops the most recent worker still starting (a scale-down takes those first); None if none is."""
        with self._lock:
            if not self._starting[pool]:
                return None
            handle = self._starting[pool].pop()
        handle.proc.stop(5)
        return handle

    def _forget_start(self, handle: WorkerHandle) -> None:
        with self._lock:
            if handle in self._starting[handle.pool]:
                self._starting[handle.pool].remove(handle)

    def replicas(self, pool: str) -> int:
        """Workers in the router plus those starting (a Deployment's `spec.replicas`)."""
        with self._lock:
            return len(self.workers.get(pool, [])) + len(self._starting.get(pool, []))

    def remove_worker(self, pool: str, handle: WorkerHandle | None = None) -> WorkerHandle:
        """Takes a worker out of the router first, then lets it drain and exit (in the background)."""
        with self._lock:
            handle = handle or self._least_loaded(pool)
            self.workers[pool].remove(handle)
            self._publish(pool)
        retire = threading.Thread(target=self._retire, args=(handle,), name=f"retire-{handle.proc.name}")
        retire.start()
        self._retiring = [t for t in self._retiring if t.is_alive()] + [retire]
        return handle

    def _retire(self, handle: WorkerHandle) -> None:
        """SIGTERM once the router holds no request on the worker: a token worker refuses KV once it
        drains, so a prefill the router sent before the removal must reach it first."""
        deadline = time.monotonic() + self.plan.drain_timeout
        while time.monotonic() < deadline and self._router_still_uses(handle):
            time.sleep(0.2)
        handle.proc.stop(self.plan.drain_timeout + 5)
        log.info("%s stopped (exit code %s)", handle.proc.name, handle.proc.popen.returncode)

    def _router_still_uses(self, handle: WorkerHandle) -> bool:
        if self.router is None or not self.router.alive():
            return False
        try:
            pools = self._admin("GET", "/admin/pools")
        except OSError:
            return False
        retiring = (pools.get(handle.pool) or {}).get("retiring", [])
        return any(w["address"] == handle.address for w in retiring)

    def replace_dead(self) -> list[str]:
        """Restarts the router and workers that exited on their own (as a Deployment would). Returns their names.
        A new router listens on the same port and is given the current members of every pool."""
        names = []
        if self.router is not None and not self.router.alive():
            self._restart_router()
            names.append("router")
        with self._lock:
            dead = [h for pool in self.workers.values() for h in pool if not h.proc.alive()]
        for handle in dead:
            with self._lock:
                self.workers[handle.pool].remove(handle)
                self._publish(handle.pool)
            self._replace_worker(handle)
        return names + [h.proc.name for h in dead]

    def _restart_router(self) -> None:
        """ProcessFailed once the router crash-loops (`Restarts`)."""
        while True:
            self.restarts.died("router", self.router)
            log.warning("router exited with code %s; starting a new one", self.router.popen.returncode)
            try:
                return self._start_router()
            except ProcessFailed as exc:
                log.warning("%s", str(exc).splitlines()[0].rstrip(":"))

    def _replace_worker(self, dead: WorkerHandle) -> None:
        """ProcessFailed once the pool's workers crash-loop (`Restarts`)."""
        while True:
            self.restarts.died(dead.pool, dead.proc)
            log.warning("%s exited with code %s; starting a new one", dead.proc.name, dead.proc.popen.returncode)
            dead = self.begin_start(dead.pool)
            try:
                self.finish_start(dead)
                return
            except StartCancelled:  # the pool shrank meanwhile
                return
            except ProcessFailed as exc:
                log.warning("%s", str(exc).splitlines()[0].rstrip(":"))

    def addresses(self, pool: str) -> list[str]:
        with self._lock:
            return [h.address for h in self.workers.get(pool, [])]

    def metrics_addresses(self) -> list[str]:
        """Where every worker serves its own /metrics."""
        with self._lock:
            return [h.metrics_address for pool in self.workers.values() for h in pool]

    # ---- helpers ----

    def _spawn_worker(self, pool: str) -> WorkerHandle:
        with self._lock:
            self._serial += 1
            name = f"{pool}-{self._serial}"
        port, metrics_port = free_ports(self.plan.pools[pool].tensor_parallel_size), free_port()
        argv = phasesplit_argv("worker", *self.plan.pools[pool].worker_args, "--host", HOST, "--port", str(port),
                               "--metrics-port", str(metrics_port), *self.log_flags)
        proc = ManagedProcess(name, argv, self.log_dir, env=self._worker_env).start()
        return WorkerHandle(pool, f"{HOST}:{port}", proc, f"{HOST}:{metrics_port}")

    def router_argv(self, port: int) -> list[str]:
        """A router on `port` over the current members of every pool (another replica: another port)."""
        argv = phasesplit_argv("router", "--model", self.plan.model_dir, "--served-model-name",
                               self.plan.served_model_name, "--host", HOST, "--port", str(port),
                               *self.plan.router_args, "--pools", ",".join(self.plan.pools),
                               *self.log_flags)
        for pool in self.plan.pools:
            argv += [f"--{pool}-workers", ",".join(self.addresses(pool))]
        return argv

    def _publish(self, pool: str) -> None:
        if self.router is None:
            return
        self._admin("PUT", f"/admin/pools/{pool}", {"workers": self.addresses(pool)})

    def _admin(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        token = self._admin_token if method != "GET" else self.api_key
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read() or b"{}")

    def _least_loaded(self, pool: str) -> WorkerHandle:
        handles = self.workers[pool]
        if not handles:
            raise ValueError(f"pool {pool!r} has no worker to remove")
        return min(reversed(handles), key=lambda h: _load(h.address, self._worker_env[auth.TOKEN_ENV]))


def _load(address: str, token: str) -> int:
    """Requests and KV a worker holds; a worker that does not answer counts as idle."""
    import grpc  # here, not above: a refused command line or port answers before gRPC loads
    from phasesplit.v1 import worker_pb2, worker_pb2_grpc
    try:
        with grpc.insecure_channel(address) as channel:
            load = worker_pb2_grpc.WorkerStub(channel).Load(worker_pb2.LoadRequest(), timeout=2,
                                                            metadata=auth.call_metadata(auth.ROUTER, token))
        return load.waiting_requests + load.running_requests + load.pending_transfers
    except grpc.RpcError:
        return 0


class _Stop(Exception):
    pass


class _StopSignal:
    """The SIGTERM/SIGINT handler: raises `_Stop` to cut short whatever the main thread waits on, and
    records the signal. The exception lands wherever the main thread is, and code there may swallow it
    (a logging handler does), so the watch loop also reads the record. (A plain attribute: a lock taken
    in a signal handler can deadlock against the main thread it interrupted.)"""

    def __init__(self):
        self.name = ""   # the signal's, once one came

    def __call__(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name
        raise _Stop(self.name)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit local", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("file", help="SplitInference YAML (the same manifest you would kubectl apply)")
    p.add_argument("--model", help="model directory; overrides spec.model.source")
    p.add_argument("--port", type=int, help="router port (default: spec.router.service.port; 0 picks a free one)")
    p.add_argument("--device", help="torch device for every worker (default: the worker's own choice)")
    p.add_argument("--kv-backend", choices=local_plan.KV_BACKENDS,
                   help="KV transfer backend; overrides spec.kvTransfer.backend (nccl on CPU caches runs over gloo)")
    p.add_argument("--drain-timeout", type=float, default=worker_config.default("drain_timeout"),
                   help="seconds a stopped worker may finish its work")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for each process to be ready")
    p.add_argument("--autoscale-interval", type=_positive_seconds,
                   help="seconds between autoscaling evaluations (default: spec.autoscaling.intervalSeconds)")
    p.add_argument("--log-dir", help="where each process writes its log (default: a new temporary directory)")
    keys.add_flags(p)
    add_logging_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args, "local")
    try:
        the_plan = local_plan.build_plan(local_plan.read_manifest(args.file), args.model, args.port,
                                         args.drain_timeout, args.device, args.kv_backend)
        key = keys.read(args)
        if the_plan.router_port:
            setting = "--port" if args.port is not None else "spec.router.service.port"
            ports.check_free(HOST, the_plan.router_port, setting)
    except (OSError, ValueError) as exc:
        print(f"phasesplit local: {exc}", file=sys.stderr)
        return 2
    if notice := keys.notice(the_plan.spec, key):
        print(f"phasesplit local: {notice}", file=sys.stderr if notice.startswith("warning") else sys.stdout,
              flush=True)
    log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix="phasesplit-local-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(the_plan, log_dir, args.ready_timeout, key, logging_argv(args))
    stop_signal = _StopSignal()
    signal.signal(signal.SIGTERM, stop_signal)
    signal.signal(signal.SIGINT, stop_signal)
    code = 0
    progress = Progress(cluster.processes, lambda line: announce(f"phasesplit local: {line}")).start()
    try:
        announce(f"phasesplit local: logs in {log_dir}")
        cluster.start()
        progress.show()
        pools = ", ".join(f"{name}={len(cluster.addresses(name))}" for name in the_plan.pools)
        announce(f"phasesplit local: ready ({pools}); OpenAI endpoint {cluster.endpoint}")
        autoscaler = _start_autoscaler(cluster, args.autoscale_interval)
        try:
            _watch(cluster, stop_signal)
        finally:
            if autoscaler is not None:
                autoscaler.stop()
        announce(f"phasesplit local: {stop_signal.name}, stopping")
    except _Stop as stop:
        announce(f"phasesplit local: {stop}, stopping")
    except ProcessFailed as exc:
        print(f"phasesplit local: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        progress.stop()
        cluster.stop()
        announce("phasesplit local: stopped")
    return code


def _start_autoscaler(cluster: LocalCluster, interval: float | None):
    from phasesplit.local import autoscaler as local_autoscaler
    if not local_autoscaler.enabled(cluster.plan):
        log.info("autoscaling.mode is %s: pools keep their replicas", cluster.plan.spec.autoscaling.mode)
        return None
    interval = interval or float(cluster.plan.spec.autoscaling.interval_seconds)
    log.info("autoscaling every %g s", interval)
    return local_autoscaler.LocalAutoscaler(cluster, interval).start()


def _watch(cluster: LocalCluster, stop: _StopSignal) -> None:
    """Replaces dead processes every second until a stop signal came (its `_Stop` may have been swallowed)."""
    while not stop.name:
        time.sleep(1.0)
        try:
            cluster.replace_dead()
        except OSError as exc:  # the router's admin API did not answer in time; the next round tries again
            log.warning("replacing dead processes: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
