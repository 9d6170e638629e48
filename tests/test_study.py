"""The study end to end on a small subset of the real data for 1 epoch: every file written and well-formed, a
README generated from it, and no run lost or mixed (interruptions, other recipes, a second writer, bad --out).
"""
import importlib, json, os, re, shutil, signal, stat, subprocess, sys, time
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image
import torch
from torch import nn

import normnets_report as report
import normnets_device, normnets_files, normnets_study
from conftest import MEASURED_JOBS_AT_ONCE, MEASURED_SMALL_BATCHES
from normnets import NORMS, Norm
from normnets_data import REPO_DIR, load_cifar
from fastcore.script import CliError
from normnets_files import RUN_FILES, FolderError, check_run_dir, damaged, locked
from normnets_recipes import RECIPES, Recipe, TRAINING_FIELDS, recipe
from normnets_cli import StudyError, parse_norms
from normnets_study import SUMMARY_COLUMNS, how_to_train, run_plan, run_study
import run_all, train
report_script = importlib.import_module('report')   # scripts/report.py, beside normnets_report as `report`

RUN_ALL = [sys.executable, str(REPO_DIR / 'scripts' / 'run_all.py')]
TINY = dict(epochs=1, n_train=1000, n_test=300, bs=100)   # the overrides of every study here
TINY_ARGS = ['--seeds', '1', '--epochs', '1', '--n-train', '1000', '--n-test', '300', '--bs', '100']


def recipe_fields(metrics: dict) -> dict: return {k: metrics[k] for k in Recipe().to_dict()}


def run(args, **kw): return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    "run_all.py as a user runs it: every registered norm, 1 seed, 1 epoch, on a subset, one run at a time."
    out = tmp_path_factory.mktemp('study') / 'results'
    r = run(RUN_ALL + TINY_ARGS + ['--jobs', '1', '--out', str(out)])   # on every CPU (AMX: 2 unless given)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


@pytest.fixture
def study_copy(study, tmp_path):
    "A copy of the finished study to change."
    shutil.copytree(study[0], tmp_path / 'results')
    return tmp_path / 'results'


def test_progress_names_each_run(study):
    _, stdout = study
    for i, norm in enumerate(NORMS, 1):
        assert f'=== run {i}/{len(NORMS)}: {norm} norm, seed 0, 1 epoch' in stdout
    assert 'min left' in stdout


def test_the_plan_is_said_before_any_run(study, capsys):
    _, stdout = study
    assert stdout.index(f'Plan: {len(NORMS)} runs of 1 epoch on ') < stdout.index('=== run 1/')
    assert f'; 0 kept, {len(NORMS)} to train, one at a time' in stdout
    assert run_plan([], cifar=None) == 0 and capsys.readouterr().out == ''   # nothing to do, nothing said


def test_summary_tables(study):
    out, _ = study
    summary = pd.read_csv(out / 'summary.csv')
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary.norm.tolist() == list(NORMS) and (summary.epochs == 1).all() and (summary.seeds == 1).all()
    assert summary.test_acc.between(0, 1).all() and summary.train_acc.between(0, 1).all()
    assert summary.data_md5.nunique() == 1 and summary.params.lt(50_000).all()
    md = (out / 'summary.md').read_text()
    for _, row in summary.iterrows(): assert f"{100 * row.test_acc:.2f}" in md
    per_class = pd.read_csv(out / 'per_class.csv')
    assert list(per_class.columns) == ['class'] + list(NORMS) and len(per_class) == 10
    runs = pd.read_csv(out / 'runs.csv')
    assert len(runs) == len(NORMS) and runs.n_test.eq(300).all() and runs.n_test_images.eq(300).all()


def test_every_run_records_its_whole_recipe(study):
    out, _ = study
    for n in NORMS:
        m = json.loads((out / n / 'metrics.json').read_text())
        assert (
            m['bs'] == 100 and m['epochs'] == 1 and m['n_train'] == 1000 and m['seed'] == 0 and m['norm'] == n
        )
        assert {
            'lr',
            'wd',
            'opt',
            'label_smoothing',
            'precision',
            'device',
            'device_name',
            'data_md5',
        } <= set(m)


def test_every_figure_is_a_png(study):
    out, _ = study
    pngs = [out / 'comparison.png'] + [out / n / f for n in NORMS for f in ('curves.png', 'misclassified.png',
                                                                              'confusion.png')]
    for p in pngs:
        with Image.open(p) as im: assert im.format == 'PNG' and im.size[0] > 300, p


def test_misclassified_grids_hold_ten_wrong_predictions(study):
    out, _ = study
    for n in NORMS:
        cells = pd.read_csv(out / n / 'misclassified.csv')
        assert len(cells) == 10 and (cells.predicted != cells.actual).all()
        assert cells.loss.is_monotonic_decreasing and cells['rank'].is_monotonic_increasing
        assert cells.probability.between(0, 1).all()


def test_readme_is_generated_from_the_results(study, tmp_path):
    out, _ = study
    shutil.copytree(out, tmp_path / 'results')
    readme = tmp_path / 'README.md'
    readme.write_text((REPO_DIR / 'README.md').read_text())
    report.write_report(tmp_path / 'results', readme)
    text, summary = readme.read_text(), pd.read_csv(out / 'summary.csv')
    for _, row in summary.iterrows():
        assert f"{100 * row.test_acc:.2f}" in text and f"{100 * row.train_acc:.2f}" in text
    for n in NORMS:
        for f in ('curves.png', 'misclassified.png'): assert f'results/{n}/{f}' in text
    assert 'results/comparison.png' in text and summary.data_md5[0] in text
    assert report.stale(tmp_path / 'results', readme) == []
    (tmp_path / 'results' / 'summary.csv').write_text(
        (out / 'summary.csv').read_text().replace(f"{summary.test_acc[0]}", f"{summary.test_acc[0] / 2}"))
    assert "README region 'results'" in report.stale(tmp_path / 'results', readme)


def md_rows(markdown: str) -> list[list[str]]:
    "The rows of every markdown table in `markdown`, as lists of their cells' text."
    return [[c.strip() for c in line.strip().strip('|').split('|')] for line in markdown.splitlines()
            if line.startswith('|') and not set(line) <= set('|:- ')]


def test_the_readme_says_which_recipes_changed_since_the_study(study, monkeypatch):
    runs = pd.read_csv(study[0] / 'runs.csv')
    for i, run in runs.iterrows():   # runs of today's recipes
        now = recipe(run.norm, device='cpu').to_dict()
        for k in TRAINING_FIELDS: runs.at[i, k] = json.dumps(now[k]) if k == 'net' else now[k]
    table = {r[0]: r for r in md_rows(report.recipes_markdown(runs))}
    assert table['group'][1] == 'conv, ReLU, norm'
    assert {r[-1] for n, r in table.items() if n in NORMS} == {'yes'}
    monkeypatch.setitem(RECIPES, 'batch', {**RECIPES['batch'], 'lr': 2 * recipe('batch').lr})
    table = {r[0]: r for r in md_rows(report.recipes_markdown(runs))}
    assert table['batch'][-1].startswith('**no**') and table['group'][-1] == 'yes'


def test_the_findings_are_the_summarys_values_and_the_conclusions_quote_only_them(study):
    f = pd.read_csv(study[0] / 'findings.csv').set_index('norm')
    assert list(f.index) == list(NORMS)
    summary = pd.read_csv(study[0] / 'summary.csv').set_index('norm')
    assert f.test_acc.tolist() == pytest.approx(summary.test_acc.tolist())   # the table is the summary's
    assert f.seconds_per_epoch.tolist() == pytest.approx((summary.seconds / summary.epochs).tolist())
    for n in ('ws-group', 'ws-layer'):
        assert f.gain_over_base[n] == pytest.approx(summary.test_acc[n] - summary.test_acc[NORMS[n].base])
    assert f.train_minus_test.tolist() == pytest.approx((summary.train_acc - summary.test_acc).tolist())
    # every number the conclusions state is a value of the findings table (or of its differences)
    quoted = set(re.findall(r'[-+]?\d+\.\d+', report.conclusions(f, 'a CPU')))
    acc = {n: 100 * f.test_acc[n] for n in f.index}
    values = {*acc.values(), *(100 * f.test_acc_std.dropna()), *f.seconds_per_epoch,
              *(100 * f.gain_over_base.dropna()), *(100 * f.gap_closed.dropna()), *f.epochs_to_70.dropna(),
              *(a - b for a in acc.values() for b in acc.values())}
    for number in quoted:
        assert any(abs(abs(float(number)) - abs(v)) < 0.051 for v in values), number


def test_the_studys_runs_are_the_batch_size_grids_cells_scored_with_batch_statistics_once(study_copy):
    """The batch-size grid takes the study's runs as its cells at the recipe's batch size; batch norm's, from
    before the test-batch score, are scored so from their model.pkl, and a score batch_size.csv already holds
    for the same run and data is kept, not computed again."""
    plan = [(f"{n} norm", recipe(n, **TINY), normnets_study.run_dir(study_copy, n, 0))
            for n in ('batch', 'group')]
    f = study_copy / 'batch' / 'metrics.json'
    m = json.loads(f.read_text())
    recorded = m.pop('batch_stats_test_acc')   # as the committed study's runs, from before the score
    f.write_text(json.dumps(m))
    cifar = load_cifar(None)
    cells = normnets_study.study_batch_statistics(plan, study_copy, cifar).set_index('norm')
    assert list(cells.index) == ['batch', 'group'] and cells.bs.tolist() == [100, 100]
    assert cells.batch_stats_test_acc['batch'] == recorded   # what the run scored when it trained
    assert pd.isna(cells.batch_stats_test_acc['group'])
    cells.reset_index().assign(batch_stats_test_acc=[0.125, None]).to_csv(study_copy / 'batch_size.csv',
                                                                           index=False)
    again = normnets_study.study_batch_statistics(plan, study_copy, cifar).set_index('norm')
    assert again.batch_stats_test_acc['batch'] == 0.125


def test_interrupted_rerun_keeps_the_summary_of_every_finished_run(study_copy, monkeypatch):
    before = {f: (study_copy / f).read_bytes() for f in ('summary.csv', 'runs.csv', 'per_class.csv')}
    def interrupted(*args, **kw): raise KeyboardInterrupt
    monkeypatch.setattr(normnets_study, 'train_run', interrupted)   # Ctrl-C in the first run
    with pytest.raises(KeyboardInterrupt): run_study(None, 1, 0, study_copy, **TINY)   # raised again...
    assert {f: (study_copy / f).read_bytes() for f in before} == before   # ...after the summary
    # and the command exits as an interrupted command does, though every run of the study is there
    with pytest.raises(SystemExit) as stopped:
        run_all.main(out=str(study_copy), seeds=1, **TINY)
    assert stopped.value.code == 130


def test_runs_of_another_recipe_are_named_not_mixed(study_copy, monkeypatch):
    before = {f: (study_copy / f).read_bytes() for f in ('summary.csv', 'summary.md', 'runs.csv')}
    def interrupted(*args, **kw): raise KeyboardInterrupt
    monkeypatch.setattr(normnets_study, 'train_run', interrupted)
    # another study, stopped at once
    with pytest.raises(KeyboardInterrupt): run_study(None, 1, 0, study_copy, **{**TINY, 'wd': 0.001})
    # its folder's files left as they were
    assert {f: (study_copy / f).read_bytes() for f in before} == before
    # A run of another recipe beside the study's: the summary names it and keeps it out of the numbers.
    shutil.copytree(study_copy / 'batch', study_copy / 'seeds' / 'batch-seed7')
    m = json.loads((study_copy / 'batch' / 'metrics.json').read_text())
    (study_copy / 'seeds' / 'batch-seed7' / 'metrics.json').write_text(json.dumps({**m, 'seed': 7,
                                                                                  'lr': 0.5}))
    summary, _ = normnets_study.summarize(study_copy, TINY)
    assert summary.seeds.eq(1).all() and 'seeds/batch-seed7' in (study_copy / 'summary.md').read_text()


def test_runs_trained_at_once_are_the_runs_trained_one_by_one(tmp_path):
    """--jobs trains runs in processes of their own, at once, each with its share of the CPU threads: they are
    the runs one process trains one by one with as many threads, and the progress counts them."""
    args = RUN_ALL + TINY_ARGS + ['--norms', 'bn,gn']
    r = run(args + ['--jobs', '2', '--out', str(tmp_path / 'at_once')])
    assert r.returncode == 0, r.stderr[-3000:]
    assert '2 runs to train, 2 at a time' in r.stdout and '(2/2 trained)' in r.stdout
    threads = str(max(1, torch.get_num_threads() // 2))   # each job's share, as run_parallel gives it
    r = run(args + ['--jobs', '1', '--out', str(tmp_path / 'one_by_one')],
            env={**os.environ, 'OMP_NUM_THREADS': threads})
    assert r.returncode == 0, r.stderr[-3000:]
    for norm in ('batch', 'group'):
        one_by_one, at_once = (json.loads((tmp_path / d / norm / 'metrics.json').read_text())
                               for d in ('one_by_one', 'at_once'))
        assert recipe_fields(at_once) == recipe_fields(one_by_one)
        assert (at_once['test_acc'], at_once['train_loss']) == pytest.approx(
            (one_by_one['test_acc'], one_by_one['train_loss']), abs=1e-6)
    assert set(pd.read_csv(tmp_path / 'at_once' / 'summary.csv').norm) == {'batch', 'group'}


def test_runs_train_as_measured_fastest_unless_the_command_says_how(monkeypatch):
    """Left to normnets, a GPU trains JOBS_AT_ONCE runs at once, and so does a CPU with AMX; other CPUs one at
    a time, fusing the variants measured faster fused (None: `run_plan` asks `fuse_by_default`); --jobs and
    --fuse as given win, and together are refused."""
    monkeypatch.setattr(normnets_study, 'JOBS_AT_ONCE', MEASURED_JOBS_AT_ONCE)   # not conftest's
    flags = 'fpu avx2 avx512f'   # a CPU without bfloat16 arithmetic
    monkeypatch.setattr(normnets_device, 'cpuinfo', lambda field: flags if field == 'flags' else '')
    gpu = SimpleNamespace(device='cuda', precision='bf16', bs=128)
    cpu = SimpleNamespace(device='cpu', precision='fp32', bs=256)
    monkeypatch.setattr(os, 'cpu_count', lambda: 16)   # a GPU server's cores
    assert how_to_train(gpu) == (MEASURED_JOBS_AT_ONCE['cuda'], False)
    assert how_to_train(cpu) == (1, None) and how_to_train(cpu, jobs=2) == (2, False)
    assert how_to_train(cpu, fuse=False) == (1, False) and how_to_train(gpu, fuse=True) == (1, True)
    assert how_to_train(gpu, jobs=1) == (1, None)
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)   # a free notebook's GPU: a process a core
    assert how_to_train(gpu) == (2, False)
    for jobs, fuse in ((0, None), (2, True)):
        with pytest.raises(StudyError): how_to_train(cpu, jobs, fuse)
    flags = 'fpu avx512_bf16 amx_bf16 amx_tile'   # an Intel Xeon with AMX: 2 runs at once, a core each
    assert how_to_train(cpu) == (2, False) and how_to_train(cpu, jobs=1) == (1, None)
    assert how_to_train(cpu, fuse=True) == (1, True)


def test_small_batches_train_at_once_where_that_measured_faster(monkeypatch):
    """On the AMD EPYC with AVX512-BF16, runs of small batches (the batch-size grid's smallest) train 2 at
    once, a process and a thread each; larger batches there, and small ones elsewhere, one at a time."""
    monkeypatch.setattr(normnets_study, 'JOBS_AT_ONCE_SMALL_BATCHES', MEASURED_SMALL_BATCHES)
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    flags = 'fpu avx2 avx512f avx512_bf16'
    monkeypatch.setattr(normnets_device, 'cpuinfo', lambda field: flags if field == 'flags' else '')
    small, large = (SimpleNamespace(device='cpu', precision='fp32', bs=b)
                    for b in (normnets_study.SMALL_BATCH, 64))
    assert how_to_train(small) == (2, False) and how_to_train(large) == (1, None)
    assert how_to_train(small, jobs=1) == (1, None) and how_to_train(small, fuse=True) == (1, True)
    flags = 'fpu avx2 avx512f'   # a float32 AMD: unmeasured, one at a time
    assert how_to_train(small) == (1, None)


def children(pid: int) -> list[int]:
    with open(f'/proc/{pid}/task/{pid}/children') as f: return [int(p) for p in f.read().split()]


def running(pid: int) -> bool:
    "Whether `pid` runs (a zombie left for its new parent to reap does not)."
    try:
        with open(f'/proc/{pid}/status') as f: return 'State:\tZ' not in f.read()
    except FileNotFoundError: return False


@pytest.mark.parametrize('stop', ['SIGTERM', 'Ctrl-C', 'SIGKILL'])
def test_a_kill_stops_every_run_in_flight(tmp_path, stop):
    """A kill of a study training runs at once stops its workers too, as a Ctrl-C stops one run: nothing
    half-written, no worker left running, no run finishing after the study has ended, no traceback, the
    folder free again. A Ctrl-C reaches every process of the terminal's group; a SIGKILL only the study,
    whose workers then stop by themselves."""
    args = ['--seeds', '1', '--epochs', '5', '--n-train', '4000', '--n-test', '300', '--bs', '100']
    study = subprocess.Popen(RUN_ALL + args + ['--norms', 'bn,gn,ln', '--jobs', '2', '--out', str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    for line in study.stdout:
        if 'runs to train' in line: break
    time.sleep(8)   # the workers are training
    workers = children(study.pid)
    assert len(workers) >= 2
    if stop == 'SIGTERM': study.terminate()
    elif stop == 'Ctrl-C': os.killpg(study.pid, signal.SIGINT)
    else: study.kill()
    out, err = study.communicate(timeout=60)
    if stop != 'SIGKILL': assert 'Interrupted: the finished runs are kept.' in out
    for _ in range(60):
        if not any(map(running, workers)): break
        time.sleep(0.5)
    assert not any(map(running, workers))
    assert 'Traceback' not in err, err[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if p.is_dir()]   # no run, finished or half-written
    with locked(tmp_path): pass


def test_a_second_writer_is_refused(tmp_path):
    with locked(tmp_path):
        r = run(RUN_ALL + TINY_ARGS + ['--out', str(tmp_path)])
        assert (
            r.returncode != 0
            and 'in use by another normnets command' in r.stderr
            and 'Traceback' not in r.stderr
        )
        with pytest.raises(FolderError, match='in use'):
            with locked(tmp_path): pass
    with locked(tmp_path): pass   # free again once the first writer is done


@pytest.mark.parametrize('args, message', [
    (dict(norms='bn,batch'), 'names batch more than once'),
    (dict(epochs=25), 'the rules allow 1 to 20 epochs'),
    (dict(bs=0), 'batch size 0: must be at least 1'),
    (dict(jobs=0), '--jobs 0: need at least one'),
])
def test_run_all_refuses_bad_input_before_any_work(tmp_path, args, message):
    with pytest.raises(CliError, match=message): run_all.main(out=str(tmp_path / 's'), **args)
    assert not (tmp_path / 's').exists()


def test_run_all_says_so_in_one_line_without_a_traceback(tmp_path):
    r = run(RUN_ALL + ['--out', str(tmp_path / 's'), '--norms', 'bn,batch'])
    assert r.returncode == 1 and 'names batch more than once' in r.stderr and 'Traceback' not in r.stderr


def test_run_all_refuses_an_output_folder_it_cannot_write(tmp_path):
    (tmp_path / 'file').write_text('not a folder')
    r = run(RUN_ALL + TINY_ARGS + ['--out', str(tmp_path / 'file')])
    assert r.returncode != 0 and 'cannot be written to' in r.stderr and 'Traceback' not in r.stderr


def test_repeated_norms_are_an_error():
    with pytest.raises(StudyError, match='more than once'): parse_norms('gn,group')
    assert parse_norms(None) == list(NORMS) and parse_norms('ln, bn') == ['layer', 'batch']


def test_a_registered_norm_joins_the_study_with_nothing_else_changed(tmp_path, monkeypatch):
    """Instance norm, registered for this test only, is trained, summarized, plotted and reported like the
    others."""
    monkeypatch.setitem(
        NORMS,
        'instance',
        Norm(
            'instance',
            'in',
            lambda c, groups, copies: nn.InstanceNorm2d(c * copies, affine=True),
            'each sample and channel over the image (H, W)',
        ),
    )
    monkeypatch.setitem(RECIPES, 'instance', {})
    out = tmp_path / 'results'
    assert parse_norms(None) == list(NORMS) and list(NORMS)[-1] == 'instance'   # the default study has it
    summary, missing = run_study('bn,in', 1, 0, out, **{**TINY, 'n_train': 500, 'n_test': 200})
    assert summary.norm.tolist() == ['batch', 'instance'] and missing == []
    assert (out / 'instance' / 'misclassified.png').exists()
    readme = tmp_path / 'README.md'
    readme.write_text((REPO_DIR / 'README.md').read_text())
    report.write_report(out, readme)
    assert 'instance norm (in)' in readme.read_text() and 'results/instance/curves.png' in readme.read_text()


# ---------------------------------------------------------------- nothing lost: a run deletes only a run

TRAIN_TINY = dict(norm='bn', n_train=500, n_test=200, bs=100, epochs=1)


def test_train_refuses_a_folder_of_other_files_and_leaves_them(tmp_path):
    folder = tmp_path / 'that' / 'folder'
    (folder / 'notes').mkdir(parents=True)
    (folder / 'notes' / 'thesis.txt').write_text('three years of work')
    (folder / 'mydata.csv').write_text('a,b\n1,2\n')
    with pytest.raises(CliError, match=r"holds files that are not a run's \(mydata.csv, notes/\)"):
        train.main(**TRAIN_TINY, out=str(folder))
    assert (folder / 'notes' / 'thesis.txt').read_text() == 'three years of work'
    assert sorted(p.name for p in folder.iterdir()) == ['mydata.csv', 'notes']
    # an existing file: refused before any work, no lock left beside it
    with pytest.raises(CliError, match='is a file'): train.main(**TRAIN_TINY, out=str(folder / 'mydata.csv'))
    assert sorted(p.name for p in folder.iterdir()) == ['mydata.csv', 'notes']


def test_a_run_replaces_a_run_and_is_readable_as_the_umask_says(study_copy):
    train.main(**TRAIN_TINY, out=str(study_copy / 'batch'))
    m = json.loads((study_copy / 'batch' / 'metrics.json').read_text())
    assert m['n_train'] == 500 and sorted(m['files']) == sorted(RUN_FILES)
    assert damaged(study_copy / 'batch') is None
    umask = os.umask(0); os.umask(umask)
    assert stat.S_IMODE((study_copy / 'batch').stat().st_mode) == 0o777 & ~umask   # not 700


@pytest.mark.parametrize('file, damage', [
    ('model.pkl', 'delete'), ('history.csv', 'delete'), ('metrics.json', 'truncate'),
    ('curves.png', 'truncate')])
def test_resume_trains_a_damaged_run_again_and_names_the_file(study_copy, capsys, file, damage):
    f = study_copy / 'batch' / file
    if damage == 'delete': f.unlink()
    else: f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    summary, missing = run_study('bn', 1, 0, study_copy, resume=True, **TINY)
    out = capsys.readouterr().out
    assert f"the run in {study_copy / 'batch'} is damaged ({file} " in out
    assert 'kept the finished run' not in out
    assert damaged(study_copy / 'batch') is None and missing == [] and 'batch' in set(summary.norm)


def test_the_summary_names_damaged_runs_and_describes_the_folder_as_it_is(study_copy):
    metrics = study_copy / 'group' / 'metrics.json'
    metrics.write_text(metrics.read_text()[:500])   # truncated
    (study_copy / 'layer' / 'history.csv').unlink()
    summary, missing = normnets_study.summarize(study_copy, TINY, [(0, n) for n in NORMS])
    assert not {'group', 'layer'} & set(summary.norm) and missing == ['group (seed 0)', 'layer (seed 0)']
    assert not {'group', 'layer'} & set(pd.read_csv(study_copy / 'runs.csv').norm)
    md = (study_copy / 'summary.md').read_text()
    assert 'group (metrics.json unreadable' in md and 'layer (history.csv missing)' in md


def test_a_run_is_whole_only_with_every_file_it_wrote(study_copy):
    run = study_copy / 'group'
    assert damaged(run) is None
    (run / 'misclassified.csv').write_text('')
    assert damaged(run).startswith('misclassified.csv unreadable')
    (run / 'model.pkl').write_bytes(b'not a model')
    assert damaged(run).startswith(('misclassified.csv', 'model.pkl'))
    assert damaged(study_copy / 'nowhere') == 'metrics.json missing'
    assert check_run_dir(run) == run   # a run's files: a run may replace it
    (run / 'keep.txt').write_text('mine')
    with pytest.raises(FolderError, match=r'keep\.txt'): check_run_dir(run)


def test_run_all_refuses_a_run_folder_of_other_files_before_any_work(study_copy, capsys):
    (study_copy / 'layer' / 'thesis.txt').write_text('mine')
    before = (study_copy / 'summary.csv').read_bytes()
    with pytest.raises(CliError, match='thesis.txt'): run_all.main(out=str(study_copy), seeds=1, **TINY)
    assert '=== run' not in capsys.readouterr().out
    assert (study_copy / 'layer' / 'thesis.txt').read_text() == 'mine'
    assert (study_copy / 'summary.csv').read_bytes() == before


def test_report_links_results_outside_the_readme_folder_and_names_a_missing_readme(study, tmp_path):
    shutil.copytree(study[0], tmp_path / 'a' / 'results')
    (tmp_path / 'b').mkdir()
    readme = tmp_path / 'b' / 'README.md'
    readme.write_text((REPO_DIR / 'README.md').read_text())
    report.write_report(tmp_path / 'a' / 'results', readme)
    assert '](../a/results/comparison.png)' in readme.read_text()
    with pytest.raises(CliError, match='no such file'):
        report_script.main(results=str(tmp_path / 'a' / 'results'), readme=str(tmp_path / 'none.md'))
    with pytest.raises(CliError, match='no such folder'):
        report_script.main(results=str(tmp_path / 'nowhere'), readme=str(readme))


def test_report_check_only_reads(study, tmp_path, monkeypatch, capsys):
    "--check works on results it cannot write (a read-only checkout); writing them is refused, clearly."
    shutil.copytree(study[0], tmp_path / 'results')
    readme = tmp_path / 'README.md'
    readme.write_text((REPO_DIR / 'README.md').read_text())
    report.write_report(tmp_path / 'results', readme)
    def read_only(*args, **kwargs): raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(normnets_files.tempfile, 'TemporaryFile', read_only)   # as an unwritable folder
    report_script.main(results=str(tmp_path / 'results'), readme=str(readme), check=True)
    assert 'current' in capsys.readouterr().out
    with pytest.raises(CliError, match='cannot be written to'):
        report_script.main(results=str(tmp_path / 'results'), readme=str(readme))


def test_ctrl_c_in_train_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kw): raise KeyboardInterrupt
    monkeypatch.setattr(train, 'train_run', interrupted)
    with pytest.raises(SystemExit) as stopped:
        train.main(norm='bn', n_train=500, n_test=200, bs=100, epochs=1, out=str(tmp_path / 'run'))
    assert stopped.value.code == 130 and 'Interrupted' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()
