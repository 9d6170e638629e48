"""What Ray costs: the same tiny grid trained here one run at a time, on a Ray cluster of 1 node of 1 CPU and
on one of 2 nodes of 1 CPU each, all on this machine, every run on 1 thread.

    unshare -rn sh -c 'ip link set lo up && exec python benchmarks/cluster.py --data data.tgz'

The network namespace keeps the clusters on loopback (without one, Ray binds the machine's own address). Each
way trains the grid afresh with scripts/run_all.py into a folder of its own, timed as a user would time the
command: its start, the data, joining the cluster and every run. Ray's startup, timed apart: its nodes
started and joined (`ray.cluster_utils.Cluster`, real node processes). Writes results/cluster.json;
scripts/report.py renders results/cluster.md.
"""
import json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch
from fastcore.script import call_parse

from normnets_cli import cli_errors, path_option
from normnets_data import REPO_DIR, find_data
from normnets_device import device_name
from normnets_files import check_out

# 6 runs (3 norms x 2 seeds) of 1 epoch on 5,000 images: long enough that a run is mostly training
GRID = ['--norms', 'bn,gn,ln', '--seeds', '2', '--epochs', '1', '--n-train', '5000', '--n-test', '1000']
RUN_ALL = [sys.executable, str(REPO_DIR / 'scripts' / 'run_all.py')]


def train_grid(out: Path, data: str | None, *options, env=None) -> dict:
    "The grid by run_all.py into `out`: its wall time and the runs' own training seconds."
    start = time.perf_counter()
    r = subprocess.run(RUN_ALL + GRID + ['--out', str(out), *(['--data', data] if data else []), *options],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if r.returncode: raise RuntimeError(f"run_all.py {' '.join(options)}: {r.stderr.strip()[-500:]}")
    runs = [json.loads(f.read_text()) for pattern in ('*/metrics.json', 'seeds/*/metrics.json')
            for f in out.glob(pattern)]
    print(f"{' '.join(options) or 'here'}: {len(runs)} runs in {wall:.0f} s", flush=True)
    return dict(wall_seconds=wall, runs=len(runs), train_seconds=statistics.mean(m['seconds'] for m in runs))


def on_cluster(nodes: int, out: Path, data) -> dict:
    "The grid on a cluster of `nodes` nodes of 1 CPU started here, and how long the cluster took to start."
    from ray.cluster_utils import Cluster
    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    try:
        for _ in range(nodes - 1): cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        startup = time.perf_counter() - start
        return dict(train_grid(out, data, '--cluster', cluster.address, '--threads', '1'), nodes=nodes,
                    cpus=nodes, startup_seconds=startup)
    finally: cluster.shutdown()


@call_parse
def main(
    data: str = None,  # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out: str = None,   # JSON to write (default: results/cluster.json)
):
    "Time the same tiny grid here, on a 1-node and on a 2-node Ray cluster of 1 CPU a node."
    with cli_errors():
        import ray   # noqa: F401  the clusters need it: a clear error before any run
        out = path_option('out', out, REPO_DIR / 'results' / 'cluster.json')
        check_out(out.parent)
        find_data(data)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            one_thread = {**os.environ, 'OMP_NUM_THREADS': '1'}   # as each task of the clusters
            ways = [dict(way='here, one run at a time', nodes=0, cpus=1, startup_seconds=0.,
                         **train_grid(tmp / 'here', data, '--jobs', '1', env=one_thread)),
                    dict(way='Ray, 1 node', **on_cluster(1, tmp / 'one', data)),
                    dict(way='Ray, 2 nodes', **on_cluster(2, tmp / 'two', data))]
        result = dict(grid=' '.join(GRID), device_name=device_name('cpu', 1), torch=torch.__version__,
                      ray=ray.__version__, python=platform.python_version(), date=time.strftime('%Y-%m-%d'),
                      ways=ways)
        out.write_text(json.dumps(result, indent=2) + '\n')
    print(f"wrote {out}; run python scripts/report.py to render it")
