"""The study end to end: run_all on a small subset of the real data for 1 epoch, every file written and
well-formed, and a README generated from it."""
import json, subprocess, sys

import pandas as pd
import pytest
from PIL import Image

from normnets_data import REPO_DIR, load_cifar

sys.path.insert(0, str(REPO_DIR / 'scripts'))
import report, run_all

NORMS = ['batch', 'group', 'layer']


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp('study')
    r = subprocess.run([sys.executable, str(REPO_DIR / 'scripts' / 'run_all.py'), '--epochs', '1', '--n-train', '2000',
                        '--n-test', '500', '--bs', '128', '--out', str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_progress_names_each_run(study):
    _, stdout = study
    for i, norm in enumerate(NORMS, 1):
        assert f'=== run {i}/3: {norm} norm, seed 0, 1 epochs' in stdout
    assert 'min left' in stdout


def test_summary_tables(study):
    out, _ = study
    summary = pd.read_csv(out / 'summary.csv')
    assert list(summary.columns) == run_all.SUMMARY_COLUMNS
    assert summary.norm.tolist() == NORMS and (summary.epochs == 1).all() and (summary.seeds == 1).all()
    assert summary.test_acc.between(0, 1).all() and summary.train_acc.between(0, 1).all()
    assert summary.data_md5.nunique() == 1 and summary.params.lt(50_000).all()
    md = (out / 'summary.md').read_text()
    for _, row in summary.iterrows(): assert f"{100 * row.test_acc:.2f}" in md
    per_class = pd.read_csv(out / 'per_class.csv')
    assert list(per_class.columns) == ['class'] + NORMS and len(per_class) == 10
    runs = pd.read_csv(out / 'runs.csv')
    assert len(runs) == 3 and runs.n_test.eq(500).all()


def test_every_figure_is_a_png(study):
    out, _ = study
    pngs = [out / 'comparison.png'] + [out / n / f for n in NORMS for f in ('curves.png', 'misclassified.png', 'confusion.png')]
    for p in pngs:
        with Image.open(p) as im: assert im.format == 'PNG' and im.size[0] > 300, p


def test_misclassified_grids_hold_ten_wrong_predictions(study):
    out, _ = study
    for n in NORMS:
        cells = pd.read_csv(out / n / 'misclassified.csv')
        assert len(cells) == 10 and (cells.predicted != cells.actual).all()
        assert cells.loss.is_monotonic_decreasing and cells['rank'].is_monotonic_increasing
        assert cells.probability.between(0, 1).all()


def test_variant_files(study):
    out, _ = study
    for n in NORMS:
        hist = pd.read_csv(out / n / 'history.csv')
        assert len(hist) == 1 and {'train_acc', 'test_acc', 'train_loss', 'test_loss'} <= set(hist.columns)
        assert (out / n / 'model.pkl').stat().st_size < 1_000_000
        assert len(pd.read_csv(out / n / 'per_class.csv')) == 10


def test_readme_is_generated_from_the_results(study, tmp_path):
    out, _ = study
    readme = report.write_readme(out, tmp_path / 'README.md').read_text()
    summary = pd.read_csv(out / 'summary.csv')
    for _, row in summary.iterrows():
        assert f"{100 * row.test_acc:.2f}" in readme and f"{100 * row.train_acc:.2f}" in readme
    for n in NORMS:
        for f in ('curves.png', 'misclassified.png', 'confusion.png'): assert f'{n}/{f}' in readme
    assert 'comparison.png' in readme and summary.data_md5[0] in readme and '### Findings' in readme


def test_interrupted_study_names_what_is_missing(study, tmp_path):
    out, _ = study
    runs = pd.read_csv(out / 'runs.csv').to_dict('records')[:1]
    for r in runs: r['per_class_test_acc'] = {'cat': 0.5}
    (tmp_path / 'batch').mkdir(); (tmp_path / 'batch' / 'history.csv').write_text((out / 'batch' / 'history.csv').read_text())
    summary, missing = run_all.summarize(runs, NORMS, 1, tmp_path)
    assert summary.norm.tolist() == ['batch'] and missing == ['group (1 of 1 seeds)', 'layer (1 of 1 seeds)']
    assert 'Missing (not finished): group (1 of 1 seeds), layer (1 of 1 seeds)' in (tmp_path / 'summary.md').read_text()


def test_resume_keeps_only_runs_of_the_same_recipe_and_precision(study):
    out, _ = study
    m = json.loads((out / 'batch' / 'metrics.json').read_text())
    cifar = load_cifar()
    same = run_all.recipe('batch', 1, 128, m['lr'], m['wd'], 0, cifar, 2000, 500, precision=m['precision'])
    assert run_all.finished(out / 'batch', **same) == m
    other = 'bf16' if m['precision'] == 'fp32' else 'fp32'
    assert run_all.finished(out / 'batch', **{**same, 'precision': other}) is None
    assert run_all.finished(out / 'batch', **{**same, 'epochs': 2}) is None


def test_run_all_refuses_more_than_20_epochs(tmp_path):
    r = subprocess.run([sys.executable, str(REPO_DIR / 'scripts' / 'run_all.py'), '--epochs', '25', '--out', str(tmp_path / 's')],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'the rules allow 1 to 20 epochs' in r.stderr and not (tmp_path / 's').exists()


def test_markdown_table_leaves_missing_values_empty():
    df = pd.DataFrame({'a': [1.5, None], 'b': ['x', None]})
    assert report.markdown_table(df) == '| a | b |\n|---|---|\n| 1.5 | x |\n|  |  |\n'
