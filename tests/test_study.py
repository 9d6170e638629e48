"""The study end to end on a small subset of the real data for 1 epoch: every file written and well-formed, a
README generated from it, and no run lost or mixed (interruptions, other recipes, a second writer, bad --out).
"""
import json, os, shutil, subprocess, sys, time

import pandas as pd
import pytest
from PIL import Image
import torch
from torch import nn

import normnets_report as report
import normnets_study
from normnets import NORMS, Norm
from normnets_data import REPO_DIR
from normnets_learner import RECIPES, Recipe, recipe, saved_recipe
from normnets_study import SUMMARY_COLUMNS, StudyError, locked, parse_norms, run_study

RUN_ALL = [sys.executable, str(REPO_DIR / 'scripts' / 'run_all.py')]
TINY = dict(epochs=1, n_train=1000, n_test=300, bs=100)   # the overrides of every study here
TINY_ARGS = ['--seeds', '1', '--epochs', '1', '--n-train', '1000', '--n-test', '300', '--bs', '100']


def run(args, **kw): return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    "run_all.py as a user runs it: every registered norm, 1 seed, 1 epoch, on a subset."
    out = tmp_path_factory.mktemp('study') / 'results'
    r = run(RUN_ALL + TINY_ARGS + ['--out', str(out)])
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
        assert f'=== run {i}/{len(NORMS)}: {norm} norm, seed 0, 1 epochs' in stdout
    assert 'min left' in stdout


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
    assert "README region 'summary'" in report.stale(tmp_path / 'results', readme)


def test_the_readme_says_which_recipes_changed_since_the_study(study, monkeypatch):
    runs = pd.read_csv(study[0] / 'runs.csv')
    for i, run in runs.iterrows():   # runs of today's recipes
        now = recipe(run.norm, device='cpu').to_dict()
        for k in report.TRAINING_FIELDS: runs.at[i, k] = json.dumps(now[k]) if k == 'net' else now[k]
    text = report.recipes_markdown(runs)
    assert 'have changed' not in text and '| group | conv, ReLU, norm |' in text
    was = recipe('batch').lr
    monkeypatch.setitem(RECIPES, 'batch', {**RECIPES['batch'], 'lr': 2 * was})
    changed = report.recipes_markdown(runs).split('have changed since these runs:')[1]
    assert f'batch norm (lr `{was}` -> `{2 * was}`)' in changed and 'group' not in changed
    monkeypatch.setitem(RECIPES, 'group', {**RECIPES['group'], 'crop_pad': 0})   # a field runs.csv may lack
    changed = report.recipes_markdown(runs.drop(columns='crop_pad')).split('since these runs:')[1]
    assert f'group norm (crop_pad `{Recipe.crop_pad}` -> `0`)' in changed   # missing: the default


def test_interrupted_rerun_keeps_the_summary_of_every_finished_run(study_copy, monkeypatch):
    before = {f: (study_copy / f).read_bytes() for f in ('summary.csv', 'runs.csv', 'per_class.csv')}
    def interrupted(*args, **kw): raise KeyboardInterrupt
    monkeypatch.setattr(normnets_study, 'train_run', interrupted)   # Ctrl-C in the first run
    summary, missing = run_study(None, 1, 0, study_copy, **TINY)
    assert summary.norm.tolist() == list(NORMS) and missing == []
    assert {f: (study_copy / f).read_bytes() for f in before} == before


def test_runs_of_another_recipe_are_named_not_mixed(study_copy, monkeypatch):
    before = {f: (study_copy / f).read_bytes() for f in ('summary.csv', 'summary.md', 'runs.csv')}
    def interrupted(*args, **kw): raise KeyboardInterrupt
    monkeypatch.setattr(normnets_study, 'train_run', interrupted)
    # another study, stopped at once
    summary, missing = run_study(None, 1, 0, study_copy, **{**TINY, 'wd': 0.001})
    assert summary is None and len(missing) == len(NORMS)
    # its folder's files left as they were
    assert {f: (study_copy / f).read_bytes() for f in before} == before
    # A run of another recipe beside the study's: the summary names it and keeps it out of the numbers.
    m = json.loads((study_copy / 'batch' / 'metrics.json').read_text())
    (study_copy / 'seeds' / 'batch-seed7').mkdir(parents=True)
    (study_copy / 'seeds' / 'batch-seed7' / 'metrics.json').write_text(
        json.dumps({**m, 'seed': 7, 'lr': 0.5})
    )
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
    r = run(args + ['--out', str(tmp_path / 'one_by_one')], env={**os.environ, 'OMP_NUM_THREADS': threads})
    assert r.returncode == 0, r.stderr[-3000:]
    for norm in ('batch', 'group'):
        one_by_one, at_once = (json.loads((tmp_path / d / norm / 'metrics.json').read_text())
                               for d in ('one_by_one', 'at_once'))
        assert saved_recipe(at_once) == saved_recipe(one_by_one)
        assert (at_once['test_acc'], at_once['train_loss']) == pytest.approx(
            (one_by_one['test_acc'], one_by_one['train_loss']), abs=1e-6)
    assert set(pd.read_csv(tmp_path / 'at_once' / 'summary.csv').norm) == {'batch', 'group'}


def test_a_kill_stops_every_run_in_flight(tmp_path):
    """A kill of a study training runs at once stops its workers too, as a Ctrl-C stops one run: nothing
    half-written, no run finishing after the study has ended, the folder free again."""
    args = ['--seeds', '1', '--epochs', '5', '--n-train', '4000', '--n-test', '300', '--bs', '100']
    study = subprocess.Popen(RUN_ALL + args + ['--norms', 'bn,gn,ln', '--jobs', '2', '--out', str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in study.stdout:
        if 'runs to train' in line: break
    time.sleep(8)   # the workers are training
    study.terminate()
    assert 'Interrupted: the finished runs are kept.' in study.communicate(timeout=60)[0]
    time.sleep(3)
    assert not [p.name for p in tmp_path.iterdir() if p.is_dir()]   # no run, finished or half-written
    with locked(tmp_path): pass


def test_a_second_writer_is_refused(tmp_path):
    with locked(tmp_path):
        r = run(RUN_ALL + TINY_ARGS + ['--out', str(tmp_path)])
        assert (
            r.returncode != 0
            and 'in use by another normnets study' in r.stderr
            and 'Traceback' not in r.stderr
        )
        with pytest.raises(StudyError, match='in use'):
            with locked(tmp_path): pass
    with locked(tmp_path): pass   # free again once the first writer is done


@pytest.mark.parametrize('args, message', [
    (['--norms', 'bn,batch'], 'names batch more than once'),
    (['--epochs', '25'], 'the rules allow 1 to 20 epochs'),
    (['--bs', '0'], 'batch size 0: must be at least 1'),
    (['--jobs', '0'], '--jobs 0: need at least one'),
])
def test_run_all_refuses_bad_input_before_any_work(tmp_path, args, message):
    r = run(RUN_ALL + ['--out', str(tmp_path / 's')] + args)
    assert r.returncode != 0 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 's').exists()


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
            lambda c, groups: nn.InstanceNorm2d(c, affine=True),
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
