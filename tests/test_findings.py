"""The measured findings' tools: the batch-size grid end to end on a few hundred images, and the inference
benchmark's modes (batch statistics at test time, statistics taken out) on a small model."""
import json, shutil, subprocess, sys

import pandas as pd
import pytest
import torch
from fastcore.script import CliError
from PIL import Image
from torch import nn

import ablation
import batch_sizes
import inference
import search
import speed
from normnets import NORMS, PARAM_LIMIT, count_macs, count_params, normnet
from normnets_data import REPO_DIR
from normnets_files import read_json
from normnets_recipes import (BATCH_SIZE_GRID, OPTIMIZER_SETTINGS, RECIPES, TRAINING_FIELDS, recipe,
                              recipe_label)
from normnets_runs import with_batch_statistics
import normnets_report
import normnets_study
from normnets_study import findings_frame
from normnets_pages import (PAGES, ablation_page, batch_norm_behind, batch_size_grid, batch_size_page,
                            inference_page, layer_order, precision_page, search_page)
from normnets_report import architecture_markdown, write_report


def md_rows(markdown: str) -> list[list[str]]:
    "The rows of every markdown table in `markdown`, as lists of their cells' text."
    return [[c.strip() for c in line.strip().strip('|').split('|')] for line in markdown.splitlines()
            if line.startswith('|') and not set(line) <= set('|:- ')]


def test_a_tiny_batch_size_grid_writes_well_formed_files(tmp_path):
    r = subprocess.run([sys.executable, str(REPO_DIR / 'scripts' / 'batch_sizes.py'), '--sizes', '50,100',
                        '--epochs', '1', '--norms', 'all', '--n-train', '400', '--n-test', '200',
                        '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(tmp_path / 'batch_size.csv')
    assert len(df) == 2 * len(NORMS) and set(df.bs) == {50, 100} and set(df.norm) == set(NORMS)
    # float32 by default, whatever this machine's 'auto' is, so that one grid can span machines
    assert {read_json(tmp_path / f'{run}/metrics.json')['precision'] for run in df.run} == {'fp32'}
    assert df.test_acc.between(0, 1).all() and df.seconds.gt(0).all() and (df.epochs == 1).all()
    for n, g in df.groupby('norm'):   # the square-root rule, the same for every norm
        lr = g.set_index('bs').lr
        assert lr[100] == pytest.approx(recipe(n).lr * (100 / recipe(n).bs) ** 0.5)
        assert lr[50] == pytest.approx(lr[100] / 2 ** 0.5)
    # batch norm alone is scored with each test batch's statistics too
    bn = df.norm == 'batch'
    assert df[bn].batch_stats_test_acc.between(0, 1).all() and df[~bn].batch_stats_test_acc.isna().all()
    with Image.open(tmp_path / 'batch_size.png') as im: assert im.format == 'PNG'
    page = batch_size_page(tmp_path)
    table = md_rows(page)
    assert table[0][1:len(NORMS) + 1] == [f'{n} norm: test acc % (cost)' for n in NORMS]
    assert table[0][len(NORMS) + 1] == 'batch norm, test-batch statistics: test acc %'
    # the committed grid's plan beside the cells trained: its cells not trained here are pending
    rows = {r[0]: r[1:] for r in table[1:] if r[0].isdigit()}
    assert list(rows) == sorted(rows, key=int) and {'8', '50', '100', '256'} <= set(rows)
    assert 'pending' not in rows['50'] + rows['100'] and rows['8'][:3] == ['pending'] * 3
    assert rows['256'][0] == 'pending' and rows['256'][1] == ''   # batch norm's own size, not group norm's
    planned = sum(NORMS[n].exercise for n in NORMS) * (len(BATCH_SIZE_GRID) + 1)   # and the recipe's own
    assert f'{planned} cells of the grid are not trained yet (pending)' in page
    # each norm's cells are named against today's recipe at their batch size: only the length differs
    recipes = {r[0]: r for r in table if r[0] in NORMS}
    assert all(recipes[n][3] == f'**no**: epochs 1 (today {recipe(n).epochs})' for n in NORMS)
    # the activation a network names is the one the order shows
    assert layer_order('{"act": "gelu"}') == 'conv, norm, GELU'
    assert layer_order({"act": "gelu", "norm_after_relu": True}) == 'conv, GELU, norm'


def test_the_finished_grid_resumes_to_its_table_training_nothing(monkeypatch, tmp_path):
    "A copy of the committed grid and study, resumed: every cell kept, none missing, the same table."
    def never(*args, **kw): raise AssertionError('trained again')
    monkeypatch.setattr(normnets_study, 'train_run', never)
    results = REPO_DIR / 'results'
    for folder in ('batch_size', 'seeds', *(n for n in NORMS if NORMS[n].exercise)):
        shutil.copytree(results / folder, tmp_path / folder)
    shutil.copy(results / 'batch_size.csv', tmp_path)
    batch_sizes.main(out=str(tmp_path), resume=True)   # said 'incomplete grid', counting the study's cells
    assert (tmp_path / 'batch_size.csv').read_text() == (results / 'batch_size.csv').read_text()
    assert 'Every cell of the grid is trained.' in batch_size_page(tmp_path)


def test_the_batch_size_conclusion_compares_only_batch_sizes_where_all_three_norms_are_trained():
    cells = [('batch', 8, .80), ('group', 8, .81), ('batch', 16, .81), ('group', 16, .79), ('layer', 16, .78)]
    df = pd.DataFrame([dict(norm=n, bs=b, test_acc=a, seed=0, seconds=1.0) for n, b, a in cells])
    # group norm ahead at 8 while layer norm trains there: no conclusion about 8 yet
    line = batch_norm_behind(batch_size_grid(df))
    assert line.startswith('Batch norm stays ahead of group and layer norm down to batch size 16 (layer norm '
                           'at batch size 8; batch, group and layer norm at batch size 32; ')
    assert 'by 2.00 points at the least (batch size 16)' in line
    df.loc[len(df)] = dict(norm='layer', bs=8, test_acc=.79, seed=0, seconds=1.0)
    assert batch_norm_behind(batch_size_grid(df)).startswith(
        'Batch norm falls behind the better of group and layer norm at batch size 8 (by 1.00 points) (batch,')


def trained_like(norm: str) -> nn.Module:
    "A model whose batch norms hold running statistics of some batches, as after training."
    torch.manual_seed(0)
    model = normnet(norm).train()
    with torch.no_grad():
        for _ in range(3): model(torch.randn(32, 3, 32, 32))
    return model.eval()


def test_batch_statistics_mode_normalizes_each_batch_and_keeps_the_running_averages():
    model = trained_like('batch')
    running = [b.running_mean.clone() for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
    left_in_train = with_batch_statistics(model)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        alone, batched = left_in_train(x[:1]), left_in_train(x)[:1]
        assert not torch.allclose(alone, batched, atol=1e-3)   # the prediction depends on the batch
        assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-5)   # the model itself is untouched
    after = [b.running_mean for b in left_in_train.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))


def test_statistics_taken_out_leave_the_scale_and_shift():
    model = trained_like('group')
    bare = inference.without_statistics(model)
    assert not any(isinstance(m, nn.GroupNorm) for m in bare.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): assert bare(x).shape == (2, 10)


def test_measure_gives_every_mode_at_every_test_batch_size(tmp_path):
    models = {n: trained_like(n) for n in NORMS}
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    df = pd.DataFrame(inference.measure(models, x, y))
    acc = df[df.kind == 'accuracy']
    assert len(acc) == (len(NORMS) + 1) * len(inference.TEST_BATCH_SIZES)
    for mode, cells in acc.groupby('mode'):   # without batch statistics, the test batch size changes nothing
        if mode != 'batch: batch statistics': assert cells.test_acc.nunique() == 1, mode
    assert set(df[df.kind == 'speed'].norm) == set(NORMS) and df.images_per_s.dropna().gt(0).all()
    df['device_name'] = 'a CPU'
    fields = lambda r: {k: json.dumps(v) if k == 'net' else v for k, v in r.to_dict().items()
                        if k in TRAINING_FIELDS}
    recorded = pd.DataFrame([{'norm': n, **fields(recipe(n))} for n in NORMS])
    df.merge(recorded, on='norm', how='left').to_csv(tmp_path / 'inference.csv', index=False)   # as main
    table = md_rows(inference_page(tmp_path))
    assert 'batch: batch statistics' in table[0]
    sizes = list(inference.TEST_BATCH_SIZES)
    assert [int(r[0]) for r in table[1:len(sizes) + 1]] == sizes


def test_a_tiny_search_gives_every_norm_the_same_cells_scored_on_held_out_images(tmp_path, monkeypatch):
    grid = {'adam': dict(lr=(1e-2,), wd=(0.05,)), 'sgd': dict(lr=(0.1,), wd=(5e-4,))}
    monkeypatch.setattr(search, 'GRID', grid)
    monkeypatch.setattr(search, 'HOLDOUT', 500)
    monkeypatch.setattr(search, 'MAX_EPOCHS', 2)   # the rules' full length, shortened for a test
    search.main(epochs=1, confirm=1, seeds=1, n_train=400, n_test=200, bs=100, precision='fp32',
                out=str(tmp_path))
    df = pd.read_csv(tmp_path / 'search.csv')
    screen, confirm = df[df.stage == 'screen'], df[df.stage == 'confirm']
    assert len(screen) == 2 * len(NORMS) and screen.groupby('norm').size().eq(2).all()
    assert len(confirm) == 2 * len(NORMS) and confirm.epochs.eq(2).all()
    assert df.holdout_acc.between(0, 1).all()
    assert all(sorted(g.seed) == [0, 1] for _, g in confirm.groupby('norm'))   # the best cell, 2 seeds
    # every cell keeps the rest of its norm's recipe, its network options included
    assert all(json.loads(net) == recipe(n).net for n, net in zip(df.norm, df.net))
    m = pd.read_json(tmp_path / 'search' / confirm.run.iloc[0].split('/')[1] / 'metrics.json', typ='series')
    assert m['holdout'] == 500 and m['evaluated_on'] == '200 held-out training images'
    assert m['precision'] == 'fp32'   # pinned, so that a search can span machines
    table = md_rows(search_page(tmp_path))
    assert ['group', 'screen', 'conv, ReLU, norm'] in [r[:3] for r in table]
    chosen = [r for r in table if len(r) == 9 and r[0] in NORMS]   # each norm's choice at full length
    assert sorted(r[0] for r in chosen) == sorted(NORMS) and all(r[4:6] == ['2', '2'] for r in chosen)
    assert all(r[7] == 'yes' for r in chosen)   # one rate per optimizer: every choice at the grid's edge
    assert all('±' in r[6] for r in chosen)   # the mean over the seeds, and their spread
    with Image.open(tmp_path / 'search.png') as im: assert im.format == 'PNG'


def test_a_fused_search_trains_the_cells_of_an_optimizer_as_one_network(tmp_path, monkeypatch, capsys):
    grid = {'adam': dict(lr=(5e-3, 1e-2), wd=(0.05, 0.01)), 'sgd': dict(lr=(0.1,), wd=(5e-4,))}
    monkeypatch.setattr(search, 'GRID', grid)
    monkeypatch.setattr(search, 'HOLDOUT', 500)
    monkeypatch.setattr(search, 'MAX_EPOCHS', 1)   # a screen of full length, shortened for a test
    search.main(norms='ln', epochs=1, confirm=1, seeds=1, n_train=400, n_test=200, bs=100, precision='fp32',
                fuse='yes', out=str(tmp_path))
    df = pd.read_csv(tmp_path / 'search.csv')
    screen, confirm = df[df.stage == 'screen'], df[df.stage == 'confirm']
    assert len(screen) == 5 and df.holdout_acc.between(0, 1).all()
    # the best cell again at one more seed; its first seed is the screen's cell, not trained twice
    assert confirm.seed.tolist() == [0, 1] and confirm.run.iloc[0] in set(screen.run)
    first = json.loads((tmp_path / confirm.run.iloc[0] / 'metrics.json').read_text())
    assert len(first['fused_with']) == 4   # written by the screen's network of 4 cells, not trained again
    metrics = {r.run: json.loads((tmp_path / r.run / 'metrics.json').read_text())
               for r in screen.itertuples()}
    assert [len(m.get('fused_with', [])) for m in metrics.values() if m['opt'] == 'adam'] == [4] * 4
    assert [m.get('fused_with') for m in metrics.values() if m['opt'] == 'sgd'] == [None]   # a cell alone


def test_ablation_rows_are_scored_on_held_out_images_against_the_current_recipe(tmp_path, capsys,
                                                                                monkeypatch):
    row = {c: i for i, (c, _) in enumerate(ablation.CHANGES)}
    norm_after_relu = next(i for c, i in row.items() if 'norm after the ReLU' in c)
    zero_init = next(i for c, i in row.items() if 'start at zero' in c)
    settings = dict(norms='gn', epochs=1, only=f'0,{zero_init},{norm_after_relu}', holdout=500, n_train=400,
                    n_test=200, out=str(tmp_path))
    ablation.main(**settings)
    df = pd.read_csv(tmp_path / 'ablation.csv')
    # group norm's recipe already puts the norm after the ReLU: that change is no change, and is not run
    assert recipe('gn').net['norm_after_relu']
    assert df.change.tolist() == ['current recipe', ablation.CHANGES[zero_init][0]]
    assert df.scored_on.eq('200 held-out training images').all() and df.test_acc.between(0, 1).all()
    assert df.base.eq(recipe_label(recipe('gn'))).all()   # the recipe each row changed
    page = ablation_page(tmp_path)
    assert '200 held-out training images' in page and [r[1] for r in md_rows(page)].count('group') == 2
    # the changes-by-norms table gives the change's difference in points
    diff = 100 * (df.test_acc[1] - df.test_acc[0])
    unbold = [[c.strip('*') for c in r] for r in md_rows(page)]
    assert [ablation.CHANGES[zero_init][0], '1', f"{diff:+.2f}"] in unbold
    # a rerun with --resume keeps both runs (not written again) and their rows
    written = {f: f.read_bytes() for f in (tmp_path / 'ablation').glob('*/metrics.json')}
    ablation.main(**settings, resume=True)
    assert {f: f.read_bytes() for f in (tmp_path / 'ablation').glob('*/metrics.json')} == written
    assert pd.read_csv(tmp_path / 'ablation.csv').equals(df)
    # another seed adds its rows beside the first seed's, and the summary gives the mean over both
    ablation.main(**settings, seed=1)
    both = pd.read_csv(tmp_path / 'ablation.csv')
    assert both.seed.tolist() == [0, 0, 1, 1] and both.iloc[:2].equals(df)
    diffs = [100 * (both.test_acc[i + 1] - both.test_acc[i]) for i in (0, 2)]
    assert (f"{sum(diffs) / 2:+.2f} ({diffs[0]:+.2f}, {diffs[1]:+.2f})") in ablation_page(tmp_path)
    # once the recipe adopts the change, its 'current recipe' is the change's finished run, not trained again
    adopted_net = dict(recipe('gn').net, zero_init_residual=True)
    monkeypatch.setitem(RECIPES, 'group', dict(RECIPES['group'], net=adopted_net))
    ablation.main(**dict(settings, only='0'), resume=True)
    adopted = pd.read_csv(tmp_path / 'ablation.csv').iloc[-1]
    assert adopted.test_acc == df.test_acc[1] and 'zero_init_residual true' in adopted.base
    # a change of the network is merged into the recipe's own network settings
    wide = recipe('gn', net=dict(c4=32, c7=24), device='cpu')
    assert ablation.changed(wide, dict(net=dict(norm_after_relu=True))).net == dict(
        c4=32, c7=24, norm_after_relu=True)


def test_every_ablation_row_keeps_every_norm_within_the_rules(tmp_path, capsys, monkeypatch):
    "A row that breaks a norm's network or the rules is left out of its plan, saying why."
    def plan_all(): return ablation.ablation_plan(list(NORMS), range(len(ablation.CHANGES)), tmp_path,
                                                  epochs=1, device='cpu')
    plan = plan_all()
    assert all(count_params(r.model()) < PARAM_LIMIT for _, r, *_ in plan)
    assert len({folder for _, _, folder, *_ in plan}) == len(plan)
    # group norm's 4 groups do not divide 26 channels: no such group norm row
    assert not [r for _, r, *_ in plan if r.norm == 'group' and r.net.get('c7') == 26]
    assert [r for _, r, *_ in plan if r.norm == 'batch' and r.net.get('c7') == 26]
    wide = [r for _, r, _, change, _ in plan if change.startswith('wider 32x32 stage')]
    lacking = [n for n in NORMS if recipe(n).net.get('c1') != 16]   # a change a recipe has is not run again
    assert [r.norm for r in wide] == lacking and all(count_params(r.model()) == 48_650 for r in wide)
    # an extra norm takes its exercise norm's changes, not its optimizer settings; the exercise norms skip it,
    # and so does an extra norm whose recipe already has them (all of them today)
    def taking_base(plan): return {r.norm: r for _, r, _, change, _ in plan
                                   if change.startswith("the exercise norm's batch size")}
    extras = [n for n, e in NORMS.items() if not e.exercise]
    assert extras and taking_base(plan) == {}
    for n in extras: monkeypatch.setitem(RECIPES, n, {k: RECIPES[n][k] for k in OPTIMIZER_SETTINGS})
    taken = taking_base(plan_all())
    assert list(taken) == extras
    for n, r in taken.items():
        own, base = recipe(n), recipe(NORMS[n].base)
        assert (r.opt, r.lr, r.wd) == (own.opt, own.lr, own.wd)
        assert (r.bs, r.crop_pad, r.net) == (base.bs, base.crop_pad, base.net)


@pytest.mark.parametrize('bench, bad, message', [
    (ablation, dict(jobs=0), '--jobs 0: need at least one'),
    (ablation, dict(n_train=0), 'n_train 0: a training subset must hold at least one batch'),
    (ablation, dict(only='99'), "--only '99': expected row numbers 0 to"),
    (ablation, dict(only='abc'), "--only 'abc': expected row numbers"),
    (ablation, dict(norms='zz'), "unknown norm 'zz'"),
    (search, dict(jobs=0), '--jobs 0: need at least one'),
    (search, dict(norms='zz'), "unknown norm 'zz'"),
    (search, dict(fuse='maybe'), "--fuse 'maybe': expected one of auto, yes, no"),
    (batch_sizes, dict(sizes='0'), "--sizes '0': expected batch sizes of 1 or more"),
    (batch_sizes, dict(sizes='-4,16'), "--sizes '-4,16': expected batch sizes"),
    (batch_sizes, dict(sizes='abc'), "--sizes 'abc': expected batch sizes"),
    (batch_sizes, dict(jobs=0), '--jobs 0: need at least one'),
    (batch_sizes, dict(jobs=2, fuse='yes'), '--fuse and --jobs'),
    (batch_sizes, dict(precision='fp8'), "unknown precision 'fp8'"),
    (speed, dict(rounds=0), '--rounds 0: must be at least 1'),
    (speed, dict(steps=0), '--steps 0: must be at least 1'),
])
def test_benchmarks_refuse_bad_input_before_any_work(tmp_path, bench, bad, message):
    with pytest.raises(CliError, match=message): bench.main(out=str(tmp_path / 'out'), **bad)
    assert not (tmp_path / 'out').exists()   # not even an empty folder


def test_inference_names_a_missing_or_empty_results_folder_before_any_work(tmp_path):
    with pytest.raises(CliError, match='does not exist'): inference.main(results=str(tmp_path / 'none'))
    with pytest.raises(CliError, match=r'holds no study model \(<norm>/model.pkl\)'):
        inference.main(results=str(tmp_path))
    assert not any(tmp_path.iterdir())   # no header-only inference.csv


def test_the_gpu_study_is_set_beside_the_cpu_study_only_where_their_recipes_match(tmp_path):
    """Each GPU variant is compared with its CPU run only where both ran the same recipe (here the committed
    GPU study stands in for both)."""
    for d in (tmp_path, tmp_path / 'gpu'):
        d.mkdir(exist_ok=True)
        for f in ('summary.csv', 'runs.csv'): shutil.copy(REPO_DIR / 'results' / 'gpu' / f, d / f)
    table = [r for r in md_rows(PAGES['gpu.md'][2](tmp_path)) if r[0] in NORMS]
    assert [(r[4], r[6], r[7]) for r in table] == [('yes', '+0.00', 'yes')] * len(NORMS)
    runs = pd.read_csv(tmp_path / 'runs.csv')
    runs.loc[runs.norm == 'batch', 'lr'] *= 2   # a CPU study of another batch norm recipe
    runs.to_csv(tmp_path / 'runs.csv', index=False)
    table = {r[0]: r for r in md_rows(PAGES['gpu.md'][2](tmp_path)) if r[0] in NORMS}
    assert table['batch'][4].startswith('**no**') and table['batch'][6:] == ['', '']
    assert table['group'][4] == 'yes'
    runs.loc[runs.norm == 'batch', 'lr'] /= 2   # the same recipe again, and a CPU study 1 point lower
    runs.to_csv(tmp_path / 'runs.csv', index=False)
    cpu = pd.read_csv(tmp_path / 'summary.csv')
    cpu.loc[cpu.norm == 'batch', 'test_acc'] -= 0.01
    cpu.to_csv(tmp_path / 'summary.csv', index=False)
    table = {r[0]: r for r in md_rows(PAGES['gpu.md'][2](tmp_path)) if r[0] in NORMS}
    assert table['batch'][6:] == ['+1.00', 'no'] and table['group'][6:] == ['+0.00', 'yes']


def test_a_change_measured_against_two_recipes_shows_the_latest_and_names_each_on_its_page(tmp_path):
    row = dict(norm='layer', epochs=20, params=1, seconds=1.0, device='cpu', data_md5='x', precision='fp32',
               scored_on='500 held-out training images')
    accs = {('current recipe', 'A'): 0.70, ('whiten', 'A'): 0.71, ('current recipe', 'B'): 0.72,
            ('whiten', 'B'): 0.75}
    pd.DataFrame([dict(row, change=c, base=b, seed=0, test_acc=a) for (c, b), a in accs.items()]).to_csv(
        tmp_path / 'ablation.csv', index=False)
    table = md_rows(ablation_page(tmp_path))
    assert ['whiten', '20', '**+3.00***'] in table and ['whiten', '20', '+1.00'] not in table   # the latest
    changes = {(r[2], r[-2]) for r in table if r[0] == 'whiten' and len(r) > 3}   # every row, each recipe
    assert changes == {('A', '+1.00'), ('B', '+3.00')}


def test_the_variants_table_shows_each_network_as_its_recipe_builds_it(monkeypatch):
    monkeypatch.setitem(RECIPES, 'layer', dict(RECIPES.get('layer', {}), net=dict(c1=16, c3=16)))
    wide = recipe('layer').model()
    assert count_params(wide) != count_params(normnet('layer'))
    layer = lambda: next(r for r in md_rows(architecture_markdown()) if r[0] == 'layer norm (ln)')
    # c3=16 is the default width: only c1 shows
    assert layer()[3:] == ['c1=16', f'{count_params(wide):,}', f'{count_macs(wide) / 1e6:.2f} M']
    monkeypatch.setitem(RECIPES, 'layer', {})
    assert layer()[3:5] == ['as above', f'{count_params(normnet("layer")):,}']


def test_the_precision_page_sets_the_same_runs_side_by_side_and_refuses_others(tmp_path, monkeypatch):
    shutil.copytree(REPO_DIR / 'results' / 'precision', tmp_path / 'precision')
    fp32, bf16 = (pd.read_csv(tmp_path / 'precision' / f'{p}-runs.csv') for p in ('fp32', 'bf16'))
    page = precision_page(tmp_path)
    for n in bf16.norm.unique():
        diff = 100 * (bf16[bf16.norm == n].test_acc.mean() - fp32[fp32.norm == n].test_acc.mean())
        [row] = [r for r in md_rows(page) if r[0] == n]
        assert f'{diff:+.2f}' in row
    bf16.loc[0, 'lr'] *= 2   # one run of another recipe: the two precisions no longer compare
    bf16.to_csv(tmp_path / 'precision' / 'bf16-runs.csv', index=False)
    with pytest.raises(ValueError, match='not the same runs in two precisions'): precision_page(tmp_path)
    # the report writes nothing, README included, when its files contradict each other
    monkeypatch.setattr(normnets_report, 'regions', lambda *a: {'max_epochs': '20'})   # no study in tmp_path
    readme = tmp_path / 'README.md'
    readme.write_text('<!--g:max_epochs-->?<!--/g-->')
    with pytest.raises(ValueError, match='not the same runs'): write_report(tmp_path, readme)
    assert readme.read_text() == '<!--g:max_epochs-->?<!--/g-->' and not (tmp_path / 'precision.md').exists()


def test_the_findings_say_how_much_of_its_gap_to_batch_norm_each_extra_variant_closes():
    summary = pd.DataFrame(dict(norm=['batch', 'group', 'layer', 'ws-group', 'ws-layer'],
                                test_acc=[.82, .78, .79, .80, .785], test_acc_std=[.001] * 5,
                                train_acc=[.85] * 5, epochs_to_70=[6.] * 5, seconds=[100.] * 5,
                                epochs=[20] * 5))
    history = pd.DataFrame(dict(epoch=[1, 2, 3], test_acc=[.5, .7, .65]))
    f = findings_frame(summary, {n: history for n in summary.norm}).set_index('norm')
    assert f.gain_over_base['ws-group'] == pytest.approx(.02)
    assert f.gap_closed['ws-group'] == pytest.approx(.5)
    assert f.gap_closed['ws-layer'] == pytest.approx(-.005 / .03)
    assert f[['gain_over_base', 'gap_closed']].loc[['batch', 'group', 'layer']].isna().all().all()
    assert f.largest_drop.tolist() == pytest.approx([.05] * 5) and f.largest_drop_epoch.eq(3).all()
    assert f.test_acc_epoch_5.eq(.65).all() and f.seconds_per_epoch.eq(5).all()
    # no plain norm: nothing to measure an extra against
    alone = findings_frame(summary.iloc[[0, 3]], {n: history for n in ('batch', 'ws-group')})
    assert alone.gain_over_base.isna().all()
