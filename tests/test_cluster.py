"""A plan of runs on a real Ray cluster (`--cluster`): a head and a worker node of 1 CPU each, started by the
test inside a network namespace of its own (`unshare -rn`, loopback only), so that Ray binds 127.0.0.1 and
sends nothing off the machine, and stopped whatever happens. The worker node is lost while it trains a run;
the grid still ends whole and equal, seed for seed, to the same grid trained here one run at a time.
"""
import json, os, shutil, signal, subprocess, sys, textwrap

import pytest

from normnets_data import REPO_DIR
from normnets_files import damaged

RUN_ALL = [sys.executable, str(REPO_DIR / 'scripts' / 'run_all.py')]
# 4 runs (2 norms x 2 seeds) of 1 epoch on a subset: a few seconds each on one thread
GRID = ['--norms', 'bn,gn', '--seeds', '2', '--epochs', '1', '--n-train', '1000', '--n-test', '300',
        '--bs', '100']


def namespaces_work() -> bool:
    if not shutil.which('unshare') or not shutil.which('ip'): return False
    r = subprocess.run(['unshare', '-rn', 'sh', '-c', 'ip link set lo up'], capture_output=True)
    return r.returncode == 0


ray = pytest.importorskip('ray', reason="Ray is not installed (pip install -e '.[cluster]')")
in_a_namespace = pytest.mark.skipif(
    not namespaces_work(), reason="no network namespace here (unshare -rn) to keep the cluster on loopback")

# Runs inside the namespace: the cluster, the grid on it with its worker node removed once the first run is
# back, the grid again with --resume, a batch-size grid, a bad address, and a GPU plan on this CPU-only
# cluster.
IN_NAMESPACE = textwrap.dedent('''
    import json, subprocess, sys
    from ray.cluster_utils import Cluster
    from normnets_cli import StudyError
    from normnets_cluster import connect
    run_all, grid, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    found = {}
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        on_cluster = run_all + grid + ['--cluster', cluster.address, '--threads', '1', '--out', out]
        p = subprocess.Popen(on_cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in p.stdout:
            lines.append(line)
            if 'test accuracy' in line and worker is not None:   # the worker trains the next run now
                cluster.remove_node(worker)
                worker, found['removed_after'] = None, line
        found['grid'] = dict(rc=p.wait(), out=''.join(lines), err=p.stderr.read()[-3000:])
        r = subprocess.run(on_cluster + ['--resume'], capture_output=True, text=True)
        found['resume'] = dict(rc=r.returncode, out=r.stdout, err=r.stderr[-3000:])
        sizes = [run_all[0], run_all[1].replace('run_all.py', 'batch_sizes.py'), '--norms', 'bn,gn',
                 '--sizes', '50', '--epochs', '1', '--n-train', '400', '--n-test', '200',
                 '--cluster', cluster.address, '--threads', '1', '--out', out + '-sizes']
        r = subprocess.run(sizes, capture_output=True, text=True)
        found['sizes'] = dict(rc=r.returncode, out=r.stdout, err=r.stderr[-3000:])
        r = subprocess.run(run_all + grid + ['--cluster', '127.0.0.1:1', '--out', out + '-bad'],
                           capture_output=True, text=True, timeout=300)
        found['bad'] = dict(rc=r.returncode, out=r.stdout, err=r.stderr)
        try: connect(cluster.address, 1, gpu_share=0.25)
        except StudyError as e: found['gpu'] = str(e)
    finally:
        cluster.shutdown()
    print(json.dumps(found))
''')


@pytest.fixture(scope='module')
def on_cluster(tmp_path_factory):
    "The grid trained here one run at a time, and everything `IN_NAMESPACE` found, with the cluster gone."
    tmp = tmp_path_factory.mktemp('cluster')
    local = subprocess.run(RUN_ALL + GRID + ['--jobs', '1', '--out', str(tmp / 'local')], capture_output=True,
                           text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})   # 1 thread, as a task
    assert local.returncode == 0, local.stderr[-3000:]
    script = tmp / 'in_namespace.py'
    script.write_text(IN_NAMESPACE)
    command = (f"ip link set lo up && exec {sys.executable} {script} '{json.dumps(RUN_ALL)}' "
               f"'{json.dumps(GRID)}' {tmp / 'cluster'}")
    p = subprocess.Popen(['unshare', '-rn', 'sh', '-c', command], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp)
    try: stdout, stderr = p.communicate(timeout=540)
    finally:   # the cluster's processes, whatever happened (the script stops them itself when it can)
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
    assert p.returncode == 0, stderr[-3000:]
    return tmp, json.loads(stdout.strip().splitlines()[-1])


def metrics(folder) -> dict:
    return {f.parent.relative_to(folder).as_posix(): json.loads(f.read_text())
            for f in sorted([*folder.glob('*/metrics.json'), *folder.glob('seeds/*/metrics.json')])}


@in_a_namespace
def test_a_grid_loses_no_run_to_a_lost_node_and_equals_a_local_one(on_cluster):
    tmp, found = on_cluster
    grid = found['grid']
    assert grid['rc'] == 0, grid['err']
    assert 'removed_after' in found   # the worker node went while the grid trained
    assert 'on a Ray cluster at 127.0.0.1:' in grid['out'] and '(2 nodes, 2 CPUs, 0 GPUs)' in grid['out']
    assert grid['out'].count('test accuracy') >= 4 and '4/4 trained' in grid['out']
    ran, local = metrics(tmp / 'cluster'), metrics(tmp / 'local')
    assert sorted(ran) == sorted(local) == ['batch', 'group', 'seeds/batch-seed1', 'seeds/group-seed1']
    for run, m in ran.items():
        assert damaged(tmp / 'cluster' / run) is None, run   # whole: every file it lists, readable
        for k in ('train_loss', 'train_acc', 'test_loss', 'test_acc', 'seed', 'norm'):
            assert m[k] == local[run][k], (run, k)


@in_a_namespace
def test_resume_on_the_cluster_keeps_every_finished_run(on_cluster):
    resume = on_cluster[1]['resume']
    assert resume['rc'] == 0, resume['err']
    assert '4 kept, 0 to train' in resume['out']


@in_a_namespace
def test_the_batch_size_grid_trains_on_the_cluster_too(on_cluster):
    tmp, found = on_cluster
    sizes = found['sizes']
    assert sizes['rc'] == 0, sizes['err']
    assert 'on a Ray cluster at 127.0.0.1:' in sizes['out'] and '2/2 trained' in sizes['out']
    cells = sorted(p.name for p in (tmp / 'cluster-sizes' / 'batch_size').iterdir())
    assert cells == ['batch-bs50-seed0', 'group-bs50-seed0']
    assert all(damaged(tmp / 'cluster-sizes' / 'batch_size' / c) is None for c in cells)


@in_a_namespace
def test_a_bad_address_and_a_gpu_plan_on_a_cpu_cluster_are_one_line_before_any_work(on_cluster):
    tmp, found = on_cluster
    bad = found['bad']
    assert bad['rc'] != 0 and not (tmp / 'cluster-bad').exists()
    assert bad['err'].strip().count('\n') == 0 and 'no Ray cluster reached there' in bad['err']
    assert 'Traceback' not in bad['err'] and 'Plan:' not in bad['out']
    assert found['gpu'].endswith('which asks for a GPU: the runs train on one')


def test_without_ray_the_option_is_one_line(tmp_path):
    (tmp_path / 'ray.py').write_text("raise ImportError('no ray here')\n")   # Ray uninstalled, as it looks
    r = subprocess.run(RUN_ALL + GRID + ['--cluster', 'auto', '--out', str(tmp_path / 'out')], text=True,
                       capture_output=True, env={**os.environ, 'PYTHONPATH': str(tmp_path)})
    assert r.returncode != 0 and not (tmp_path / 'out').exists()
    assert r.stderr.strip().count('\n') == 0, r.stderr
    assert r.stderr.strip().endswith("--cluster needs Ray: pip install -e '.[cluster]'")
