"""A plan's runs on a Ray cluster: the `--cluster ADDRESS` of run_all.py, batch_sizes.py, search.py and
ablation.py.

    ray start --head                          # on one machine
    ray start --address HEAD:6379             # on each other one
    python scripts/run_all.py --cluster auto  # on the head: every run to train is a task of the cluster

Each run to train (or fused group of runs) is a Ray task that asks for its CPU threads, or, for a run on a
GPU, for a share of one (`normnets_study.join_cluster`: as many runs a GPU as `JOBS_AT_ONCE['cuda']`). The
decoded images travel once, through Ray's object store; the code travels as the driver's (a runtime
environment of the repository, without results, data or virtual environments), so that every run trains the
driver's code. A task trains into a temporary folder of its node and returns the run's files; the driver
writes them as a local run is written (`replace_run_dir`, into the checked and locked output folder): a run
is whole on the driver's disk or not there. Ray retries the task of a lost node elsewhere; a run that fails
by itself stops the plan, named with its node and error. Ray is imported here alone: a user without it never
needs it.
"""
import os, shutil, socket, tempfile, time
from dataclasses import dataclass
from pathlib import Path

from normnets_cli import StudyError
from normnets_data import REPO_DIR
from normnets_files import private_tmp_dir, replace_run_dir

__all__ = ['Cluster', 'connect', 'run_on_cluster', 'RETRIES', 'ROOMLESS_SECONDS']

# A task whose node is lost is trained again elsewhere this many times (Ray's task retries); a run that raises
# an error of its own is not retried (Ray's default).
RETRIES = 3
# How long a plan waits while no alive node has room for its tasks (nodes lost) before it says so and stops:
# Ray itself would wait forever.
ROOMLESS_SECONDS = 60
# Left out of the code each task receives: the results, the data, virtual environments and the GPU bundle.
NOT_CODE = ['results/', 'data/', '.venv/', 'venv/', '.gpu/', '.git/', '*.egg-info/', '__pycache__/']


@dataclass
class Cluster:
    """A Ray cluster `connect` reached: its address, its alive nodes' resources, what a task asks for
    (`options`: each CPU run's threads as CPUs, or a GPU run's share of a GPU) and how many fit at once."""
    address: str
    nodes: int
    cpus: int
    gpus: int
    options: dict
    at_once: int

    def __str__(self) -> str:
        return (f"a Ray cluster at {self.address} ({self.nodes} node{'s' * (self.nodes != 1)}, {self.cpus} "
                f"CPUs, {self.gpus} GPUs)")


def connect(address: str, threads: int, gpu_share: float | None = None) -> Cluster:
    """Join the Ray cluster at `address` ('auto': the one `ray start` made on this machine, or $RAY_ADDRESS;
    else host:port) with the repository's code as every task's, and check that it has room for a run
    (`threads` CPUs on one node or, for runs on a GPU, `gpu_share` of a GPU): one clear line otherwise,
    before any work."""
    try: import ray
    except ImportError:
        raise StudyError("--cluster needs Ray: pip install -e '.[cluster]'") from None
    if threads < 1: raise StudyError(f"--threads {threads}: must be at least 1")
    if address != 'auto': reachable(address)
    try:
        ray.init(address=address, runtime_env={'working_dir': str(REPO_DIR), 'excludes': NOT_CODE},
                 logging_level='error', log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(f"--cluster {address}: no Ray cluster reached there ({first})") from None
    nodes = [n['Resources'] for n in ray.nodes() if n['Alive']]
    gpu = gpu_share is not None
    options = dict(num_cpus=1, num_gpus=gpu_share) if gpu else dict(num_cpus=threads)
    at_once = sum(int(n.get('GPU', 0) / gpu_share) if gpu else int(n.get('CPU', 0)) // threads
                  for n in nodes)
    c = Cluster(address, len(nodes), int(sum(n.get('CPU', 0) for n in nodes)),
                int(sum(n.get('GPU', 0) for n in nodes)), options, at_once)
    if not at_once:
        ray.shutdown()
        need = "a GPU: the runs train on one" if gpu else f"{threads} CPUs on one node (--threads)"
        raise StudyError(f"--cluster {address}: no node of {c} has room for a run, which asks for {need}")
    return c


def reachable(address: str, seconds: float = 10):
    """Refuse at once a host:port where nothing listens: Ray itself retries an unreachable cluster for
    minutes, printing warnings."""
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit():
        raise StudyError(f"--cluster {address}: expected auto or host:port (the head's, 6379 by default)")
    try: socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as e:
        raise StudyError(f"--cluster {address}: no Ray cluster reached there ({e.strerror or e})") from None


def has_room(nodes: list, options: dict) -> bool:
    "Whether an alive node of `nodes` (`ray.nodes()`) has the resources a task asks for (`options`)."
    ask = {'CPU': options.get('num_cpus', 0), 'GPU': options.get('num_gpus') or 0}
    return any(n['Alive'] and all(n['Resources'].get(k, 0) >= v for k, v in ask.items() if v) for n in nodes)


def train_group(group: list, cell: bool, cifar, threads: int) -> tuple[list, str]:
    """A task: the (title, recipe, folder) runs of `group` (one, or several to train as one fused network)
    trained into a temporary folder of this node; each run's files as {name: bytes}, its metrics, and the
    node."""
    import torch
    from normnets_fused import train_fused
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix='normnets-task-') as tmp:
        folders = [Path(tmp) / f'run{i}' for i in range(len(group))]
        metrics = train_fused([r for _, r, _ in group], folders, cifar=cifar, cell=cell)   # one: train_run
        files = [{f.name: f.read_bytes() for f in d.iterdir()} for d in folders]
    return list(zip(files, metrics)), os.uname().nodename


def write_returned(files: dict, out: Path):
    "A run's files as a task returned them, written into `out` as a local run is: whole, or not at all."
    tmp = private_tmp_dir(out)
    try:
        for name, data in files.items(): (tmp / name).write_bytes(data)
        replace_run_dir(tmp, out)
    finally:
        if tmp.exists(): shutil.rmtree(tmp, ignore_errors=True)


def run_on_cluster(groups: list, cluster: Cluster, cifar, cell: bool):
    """Train `groups` (lists of (title, recipe, folder), each one task) on `cluster`, as many at once as it
    has room for; write each run as its task returns it and print its line with its node and the time left.
    A failed run stops the plan there (every other task cancelled, the finished runs kept), as does a Ctrl-C
    or a kill."""
    import ray
    from ray.exceptions import RayTaskError
    task = ray.remote(max_retries=RETRIES)(train_group).options(**cluster.options)
    images = ray.put(cifar)   # once into the object store, read there by every task
    tasks = {task.remote(g, cell, images, cluster.options['num_cpus']): g for g in groups}   # 1 on a GPU
    total, trained, start = sum(map(len, groups)), 0, time.perf_counter()
    pending, roomless = list(tasks), None   # roomless: since when no alive node has room for a task
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1)
            # Ray would wait forever for a node with room for a task (all such nodes lost): a minute is an
            # error
            if ready or has_room(ray.nodes(), cluster.options): roomless = None
            else:
                roomless = roomless or time.monotonic()
                if time.monotonic() - roomless > ROOMLESS_SECONDS:
                    raise StudyError(f"for {ROOMLESS_SECONDS} s no node of {cluster} has had room for a run; "
                                     f"{len(pending)} tasks wait")
            for ref in ready:
                group = tasks[ref]
                try: runs, node = ray.get(ref)
                except RayTaskError as e:
                    titles = '; '.join(t for t, _, _ in group)
                    cause = str(e.cause).strip().splitlines()[0] if e.cause else ''
                    raise StudyError(f"{titles} failed on node {e.ip}: {type(e.cause).__name__}: {cause}") \
                        from None
                for (title, _, d), (files, m) in zip(group, runs):
                    write_returned(files, d)
                    trained += 1
                    left = total - trained
                    eta = f", about {(time.perf_counter() - start) / trained * left / 60:.0f} min left" \
                        if left else ''
                    print(f"{title}: test accuracy {m['test_acc']:.4f} in {m['seconds']:.0f} s on {node} "
                          f"({trained}/{total} trained{eta})", flush=True)
    except BaseException:   # a failed run, a Ctrl-C or a kill: the tasks in flight stop, the finished stay
        for ref in pending: ray.cancel(ref, force=True)
        raise
