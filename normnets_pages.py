"""The pages under results/, each a few tables of one result file, and the formatting that every table of
the report shares. `PAGES` names them; `pages(results)` makes every page its data allows, and
`scripts/report.py` writes and checks them beside the README's regions (`normnets_report`).
"""
import json, statistics
from pathlib import Path

import pandas as pd

from normnets import ACTIVATIONS, NORMS, PASS_ACCURACY
from normnets_files import read_csv, read_json
from normnets_recipes import BATCH_SIZE_GRID, Recipe, TRAINING_FIELDS, at_batch_size, recipe, recipe_label

__all__ = ['md', 'pct', 'mean_std', 'spread', 'num', 'norm_order', 'provenance', 'layer_order', 'recipe_gaps',
           'today_cell', 'recipes_markdown', 'beside_page', 'PAGES', 'pages']

BAR = f'{PASS_ACCURACY:.0%}'


# ---------------------------------------------------------------- formatting

def md(df: pd.DataFrame) -> str: return df.to_markdown(index=False, disable_numparse=True) + '\n'


def pct(x, digits=2) -> str: return '' if pd.isna(x) else f'{100 * x:.{digits}f}'


def mean_std(mean, std) -> str: return pct(mean) + (f' ± {pct(std)}' if pd.notna(std) else '')


def spread(df: pd.DataFrame, col: str) -> list[str]:
    "Column `col` of `df` beside its `<col>_std` as 'mean ± std' in %, a cell a row."
    return [mean_std(m, s) for m, s in zip(df[col], df[f'{col}_std'])]


def num(x, fmt='{:g}') -> str: return '' if pd.isna(x) else fmt.format(x)


def rounds_cells(ratios: pd.Series) -> tuple[list, list]:
    "The median of each row's ratios (speed.py's rounds, each measured beside its baseline), and all of them."
    return ([f'{statistics.median(r):.2f}' if r else '' for r in ratios],
            [', '.join(f'{x:.2f}' for x in r) for r in ratios])


def norm_order(names) -> list:
    return sorted(names, key=lambda n: list(NORMS).index(n) if n in NORMS else len(NORMS))


def read(f: Path) -> pd.DataFrame | None: return read_csv(f) if f.exists() else None


def provenance(runs: pd.DataFrame) -> str:
    first, seeds = runs.iloc[0], sorted(runs.seed.unique())
    wall = runs[runs.seed == seeds[0]].wall_seconds.sum() / 60
    return (f"{len(runs)} runs ({runs.norm.nunique()} variants x {len(seeds)} seeds, {first.epochs} epochs) "
            f"of `scripts/run_all.py` on {first.device_name}, {first.precision}, torch {first.torch}, fastai "
            f"{first.fastai}, on {first.data} (md5 `{first.data_md5}`); the first seed's runs took "
            f"{wall:.0f} minutes, data to last file.")


def layer_order(net) -> str:
    "Where the norm sits in each layer of a network with these options (a dict, or JSON as runs record it)."
    options = json.loads(net) if isinstance(net, str) else net
    act = type(ACTIVATIONS[options.get('act', 'relu')]()).__name__
    return f'conv, {act}, norm' if options.get('norm_after_relu') else f'conv, norm, {act}'


# ---------------------------------------------------------------- today's recipes or not

def recipe_gaps(run, varied=(), today: Recipe | None = None) -> list[str]:
    """Where the recipe a run recorded (a row of a result table, or a dict) differs from `today` (default: its
    norm's recipe in the code today) in TRAINING_FIELDS, leaving out `varied` (what its section changes on
    purpose): e.g. ['lr 0.01 (today 0.4)']. Empty: a run of today's recipe."""
    now = (today or recipe(run['norm'], device='cpu', precision='fp32')).to_dict()
    gaps = []
    for k in TRAINING_FIELDS:
        if k in varied: continue
        value = json.loads(run[k]) if k == 'net' and isinstance(run[k], str) else run[k]
        if value != now[k]:
            show = lambda v: json.dumps(v) if k == 'net' else f'{v:g}' if isinstance(v, float) else str(v)
            gaps.append(f"{k} {show(value)} (today {show(now[k])})")
    return gaps


def today_cell(run, varied=(), today: Recipe | None = None) -> str:
    "'yes' for a run of today's recipe (see `recipe_gaps`), else '**no**: ' and how it differs."
    gaps = recipe_gaps(run, varied, today)
    return '**no**: ' + ', '.join(gaps) if gaps else 'yes'


def recipes_markdown(runs: pd.DataFrame) -> str:
    "Each norm's recipe as its first run recorded it (`runs`: rows of runs.csv), and whether it is today's."
    first = runs.groupby('norm', sort=False).first().reset_index()
    return md(pd.DataFrame({
        'norm': first.norm, 'layer order': first.net.map(layer_order), 'optimizer': first.opt,
        'peak lr': first.lr.map(num), 'weight decay': first.wd.map(num), 'batch size': first.bs,
        'label smoothing': first.label_smoothing.map(num), 'crop padding': first.crop_pad,
        'epochs': first.epochs, 'precision': first.precision,
        "today's recipe": [today_cell(r) for _, r in first.iterrows()]}))


def findings_table(f: pd.DataFrame) -> str:
    return md(pd.DataFrame({
        'norm': f.index, 'test acc %': spread(f, 'test_acc'),
        f'epochs to {BAR}': f.epochs_to_70.map(lambda e: num(round(e, 1))),
        'test acc % after epoch 5': f.test_acc_epoch_5.map(pct),
        'largest fall between epochs (points)': f.largest_drop.map(pct),
        'at epoch': f.largest_drop_epoch.map(lambda e: num(e, '{:.0f}')),
        'train minus test (points)': f.train_minus_test.map(pct),
        's an epoch': f.seconds_per_epoch.map('{:.1f}'.format),
        'gain over its exercise norm (points)': f.gain_over_base.map(lambda g: num(100 * g, '{:+.2f}')),
        'share of the gap to the best closed %': f.gap_closed.map(lambda g: pct(g, 0))}))


# ---------------------------------------------------------------- pages under results/

def study_page(results: Path) -> str | None:
    "study.md: the findings per norm, every run, and the accuracy per class."
    runs, findings = read(results / 'runs.csv'), read(results / 'findings.csv')
    if runs is None or findings is None: return None
    per_class = read_csv(results / 'per_class.csv')
    table = pd.DataFrame({
        'norm': runs.norm, 'seed': runs.seed, 'train acc %': runs.train_acc.map(pct),
        'test acc %': runs.test_acc.map(pct), 'test acc % with flip TTA': runs.tta_test_acc.map(pct),
        f'epochs to {BAR}': runs.epochs_to_70.map(num), 'train s': runs.seconds.map('{:.0f}'.format),
        'folder': runs.run.map(lambda r: f'`{r}`')})
    return (f"# The study\n\n{provenance(runs)}\n\n## Findings\n\nMeans over seeds; the epoch-by-epoch "
            "values (after epoch 5, largest fall) are the first seed's.\n\n"
            f"{findings_table(findings.set_index('norm'))}\n## Every run\n\n{md(table)}\n"
            f"## Recipes\n\n{recipes_markdown(runs)}\n## Test accuracy per class (%)\n\n"
            + md(per_class.set_index('class').map(lambda x: pct(x, 1)).reset_index()))


def ablation_frame(results: Path) -> pd.DataFrame | None:
    """ablation.csv with each row's `base_acc` (the accuracy of the recipe it changed, same variant, length,
    seed and scoring) and `diff` (points gained by the change); None before any row."""
    df = read(results / 'ablation.csv')
    if df is None: return None
    key = ['norm', 'epochs', 'seed', 'precision', 'scored_on', 'base']
    base = df[df.change == 'current recipe'].set_index(key).test_acc
    df['base_acc'] = pd.Series([base.get(k) for k in df[key].itertuples(index=False, name=None)], dtype=float)
    df['diff'] = 100 * (df.test_acc - df.base_acc)
    return df


def ablation_matrix(df: pd.DataFrame) -> str:
    """A row a change and length, a column a norm: the points the change gained over the recipe it changed,
    the mean over its seeds (each seed's in brackets where several), bold where more than half a point. A
    change measured against several recipes of a norm shows the latest, marked *."""
    changed = df[(df.change != 'current recipe') & df['diff'].notna()].reset_index()
    cell_key = ['change', 'epochs', 'norm']
    g = changed.groupby([*cell_key, 'base'], sort=False).agg(
        mean=('diff', 'mean'), diffs=('diff', list), latest=('index', 'max')).reset_index()
    g['recipes'] = g.groupby(cell_key).base.transform('size')
    g = g.sort_values('latest').drop_duplicates(cell_key, keep='last')
    def cell(r) -> str:
        seeds = f" ({', '.join(f'{d:+.2f}' for d in r.diffs)})" if len(r.diffs) > 1 else ''
        text = f"{r.mean:+.2f}{seeds}"
        return (f"**{text}**" if round(r.mean, 2) > 0.5 else text) + ('*' if r.recipes > 1 else '')
    g['cell'] = [cell(r) for r in g.itertuples()]
    first_seen = changed.groupby('change')['index'].min()
    rows = sorted(set(zip(g.change, g.epochs)), key=lambda ce: (first_seen[ce[0]], ce[1]))
    table = g.pivot(index=['change', 'epochs'], columns='norm', values='cell').reindex(rows)
    return md(table[norm_order(table.columns)].rename(columns=lambda n: f'{n} norm').reset_index())


def ablation_page(results: Path) -> str | None:
    "ablation.md: the changes scored on held-out images as changes by norms, then every row."
    df = ablation_frame(results)
    if df is None: return None
    held_out = df[df.scored_on != 'the test set']
    table = pd.DataFrame({
        'change': df.change, 'norm': df.norm, 'recipe changed': df.base, 'epochs': df.epochs, 'seed': df.seed,
        'precision': df.precision, 'scored on': df.scored_on, 'params': df.params.map('{:,.0f}'.format),
        'acc % (recipe)': df.base_acc.map(pct), 'acc % (with the change)': df.test_acc.map(pct),
        'difference (points)': df['diff'].map(lambda d: num(d, '{:+.2f}')),
        'train s': df.seconds.map('{:.0f}'.format)})
    return ("# Ablation\n\nOne change of a norm's recipe at a time (`benchmarks/ablation.py`), on "
            f"{df.device.iloc[-1]}, data md5 `{df.data_md5.iloc[-1]}`. A recipe keeps a change that gains "
            "more than half a point at the rules' full length, on the mean of two seeds.\n\n"
            "## Held-out images\n\n"
            "Points gained over the recipe changed, mean over the seeds run (each seed's in brackets); bold: "
            "more than half a point; *: the latest of several recipes of the norm.\n\n"
            + (ablation_matrix(held_out) if len(held_out) else '') + f"\n## Recipes\n\n{ablation_recipes(df)}"
            f"\n## Every row\n\n{md(table)}")


def ablation_recipes(df: pd.DataFrame) -> str:
    "Each norm's recipe today, and how many of its rows changed that recipe rather than an older one."
    names = norm_order(df.norm.unique())
    today = {n: recipe_label(recipe(n)) for n in names}
    of_today = df.base == df.norm.map(today)
    return md(pd.DataFrame({
        'norm': names, "today's recipe": [f'`{today[n]}`' for n in names],
        "rows that changed today's recipe": [int(of_today[df.norm == n].sum()) for n in names],
        'rows that changed an older one': [int((~of_today)[df.norm == n].sum()) for n in names]}))


def search_page(results: Path) -> str | None:
    "search.md: each norm's chosen cell, the best cells of each stage, and every cell."
    df = read(results / 'search.csv')
    if df is None: return None
    df = df.sort_values(['stage', 'holdout_acc'], ascending=[True, False])   # 'confirm' sorts first
    cells = lambda d: md(pd.DataFrame({
        'norm': d.norm, 'stage': d.stage, 'layer order': d.net.map(layer_order), 'optimizer': d.opt,
        'peak lr': d.lr.map(num), 'weight decay': d.wd.map(num), 'epochs': d.epochs, 'seed': d.seed,
        'held-out acc %': d.holdout_acc.map(pct), 'train acc %': d.train_acc.map(pct),
        'train s': d.seconds.map('{:.0f}'.format)}))
    screen = df[df.stage == 'screen']
    edges = screen.groupby('opt').lr.agg(['min', 'max'])
    # each norm's choice: the cell of the best mean over its seeds, of the last stage it reached
    last = df[df.stage == df.groupby('norm').stage.transform('min')]
    cell = ['norm', 'opt', 'lr', 'wd', 'epochs']
    means = last.groupby(cell, sort=False).agg(
        holdout_acc=('holdout_acc', 'mean'), holdout_acc_std=('holdout_acc', 'std'), seeds=('seed', 'size'),
        best_row=('holdout_acc', 'idxmax')).reset_index()
    chosen = means.sort_values('holdout_acc', ascending=False).groupby('norm', sort=False).head(1)
    edge = [r.lr in (edges['min'][r.opt], edges['max'][r.opt]) for r in chosen.itertuples()]
    return (f"# Recipe search\n\n`benchmarks/search.py` on {df.device_name.iloc[0]}, seed {df.seed.min()} "
            "(confirmed cells also at the seeds after it): each cell trains on the training images but a "
            "held-out set and is scored on it; the test set plays no part.\n\n"
            "![held-out accuracy against peak learning rate](search.png)\n\n## Chosen\n\n"
            + md(pd.DataFrame({'norm': chosen.norm, 'optimizer': chosen.opt, 'peak lr': chosen.lr.map(num),
                               'weight decay': chosen.wd.map(num), 'epochs': chosen.epochs,
                               'seeds': chosen.seeds, 'held-out acc %': spread(chosen, 'holdout_acc'),
                               'rate at the edge of the grid': ['yes' if e else 'no' for e in edge],
                               "today's recipe": [today_cell(df.loc[i]) for i in chosen.best_row]}))
            + f"\n## Best cell of each norm and stage\n\n{cells(df.groupby(['norm', 'stage']).head(1))}"
            f"\n## Every cell\n\n{cells(df)}")


def batch_size_grid(df: pd.DataFrame) -> pd.DataFrame:
    """The batch-size grid as planned (each exercise norm at `BATCH_SIZE_GRID` and at its recipe's own batch
    size, the study's cell) and as trained so far (`df`, batch_size.csv): a row a norm and batch size, with
    the test accuracy's mean and std over seeds, batch norm's with test-batch statistics, seeds and seconds;
    no seeds where a planned cell is still pending."""
    if 'batch_stats_test_acc' not in df: df = df.assign(batch_stats_test_acc=float('nan'))   # grids before it
    grid = df.groupby(['norm', 'bs']).agg(
        test_acc=('test_acc', 'mean'), test_acc_std=('test_acc', 'std'), seconds=('seconds', 'mean'),
        batch_stats=('batch_stats_test_acc', 'mean'), seeds=('seed', 'count')).reset_index()
    planned = pd.DataFrame([{'norm': n, 'bs': b} for n in NORMS if NORMS[n].exercise
                            for b in (*BATCH_SIZE_GRID, recipe(n).bs)])
    return planned.merge(grid, how='outer', on=['norm', 'bs']).fillna({'seeds': 0})


def batch_size_page(results: Path) -> str | None:
    "batch_size.md: test accuracy (mean ± std over seeds) and cost of every cell of the batch-size grid."
    df = read(results / 'batch_size.csv')
    if df is None: return None
    grid = batch_size_grid(df)
    seeds = lambda k: f", {k:.0f} seeds" if k > 1 else ''
    grid['cell'] = [f"{c} ({s / 60:.1f} min{seeds(k)})" if k else 'pending'
                    for c, s, k in zip(spread(grid, 'test_acc'), grid.seconds, grid.seeds)]
    table = grid.pivot(index='bs', columns='norm', values='cell')[norm_order(grid.norm.unique())].fillna('')
    table = table.rename(columns=lambda n: f'{n} norm: test acc % (cost)')
    bn = grid[grid.norm == 'batch'].set_index('bs')
    if len(bn):
        table['batch norm, test-batch statistics: test acc %'] = [
            pct(bn.batch_stats.get(b)) if bn.seeds.get(b) else 'pending' if b in bn.index else ''
            for b in table.index]
    pending = int((grid.seeds == 0).sum())
    cells = f"{pending} cells of the grid are" if pending != 1 else "1 cell of the grid is"
    left = f"{cells} not trained yet (pending)." if pending else "Every cell of the grid is trained."
    own = ', '.join(f"{b} for {spoken(list(g.norm))} norm" for b, g in grid.groupby('bs')
                    if b not in BATCH_SIZE_GRID and len(g))
    return (f"# Batch size\n\n`scripts/batch_sizes.py` on {', '.join(df.device_name.unique())}: each norm's "
            f"recipe at each batch size for {'/'.join(map(str, sorted(df.epochs.unique())))} epochs a cell, "
            f"seed {', '.join(map(str, sorted(df[df.bs.isin(BATCH_SIZE_GRID)].seed.unique())))}, the peak lr "
            "scaled by sqrt(batch size / "
            f"the recipe's) (`at_batch_size`). The recipe's own batch size ({own}) is the study's cell: its "
            "runs, every seed (mean ± std), not trained again. Batch norm's test-batch statistics: each test "
            "batch, of the training batch size, normalized with its own statistics instead of the running "
            f"averages. {left}\n\n"
            "![test accuracy against batch size](batch_size.png)\n\n"
            + md(table.reset_index().rename(columns={'bs': 'batch size'}))
            + ''.join(f"\n{line}\n" for line in [batch_norm_behind(grid)] if line)
            + f"\n## Recipes\n\n{batch_size_recipes(df)}")


def spoken(words: list[str]) -> str:
    "['batch', 'group', 'layer'] as 'batch, group and layer'."
    return f"{', '.join(words[:-1])} and {words[-1]}" if len(words) > 1 else words[0]


def batch_norm_behind(grid: pd.DataFrame) -> str:
    """Where batch norm's mean falls behind the better of group and layer norm in the grid
    (`batch_size_grid`), in points, or that it does not down to the smallest batch size measured."""
    acc = grid[grid.seeds > 0].pivot(index='bs', columns='norm', values='test_acc')
    if not {'batch', 'group', 'layer'} <= set(acc.columns): return ''
    # a batch size counts once all three are trained there: not against group norm alone while layer trains
    gap = (acc[['group', 'layer']].max(axis=1, skipna=False) - acc['batch']).dropna()
    if not len(gap): return ''
    behind = gap[gap > 0]
    pending = grid[grid.seeds == 0]   # only planned cells (exercise norms) lack seeds
    later = '; '.join(f"{spoken(list(g.norm))} norm at batch size {b}" for b, g in pending.groupby('bs'))
    later = f" ({later} not trained yet)" if later else ''
    if not len(behind):
        return (f"Batch norm stays ahead of group and layer norm down to batch size {gap.index.min()}{later}"
                ": "
                f"by {pct(-gap.max())} points at the least (batch size {gap.idxmax()}), "
                f"{pct(-gap.min())} at the most (batch size {gap.idxmin()}).")
    return ("Batch norm falls behind the better of group and layer norm at batch size "
            + ', '.join(f"{b} (by {pct(g)} points)" for b, g in behind.items()) + f"{later}.")


def batch_size_recipes(df: pd.DataFrame) -> str:
    "Whether each norm's cells are today's recipe at their batch size (`at_batch_size`), and how many are."
    rows = []
    for n in norm_order(df.norm.unique()):
        cells = df[df.norm == n]
        today = pd.Series([today_cell(r, today=at_batch_size(recipe(n), r.bs)) for _, r in cells.iterrows()])
        behind = today[today != 'yes']
        rows.append({'norm': n, 'cells': len(cells), "cells of today's recipe": len(cells) - len(behind),
                     'the others differ in (first of them)': behind.iloc[0] if len(behind) else ''})
    return md(pd.DataFrame(rows))


def inference_page(results: Path) -> str | None:
    "inference.md: test accuracy of each study variant by test batch size and mode, and inference speed."
    df = read(results / 'inference.csv')
    if df is None: return None
    acc, speed = df[df.kind == 'accuracy'], df[df.kind == 'speed']
    models = df.groupby('norm', sort=False).first().reset_index()   # each model's recipe, as its run recorded
    table = acc.pivot(index='test_bs', columns='mode', values='test_acc').map(pct)
    return (f"# Inference\n\n`benchmarks/inference.py` on {df.device_name.dropna().iloc[0]}, each study "
            "variant's first-seed model. Batch norm also with each test batch's statistics, as a model left "
            "in training mode.\n\n![accuracy against test batch size](inference.png)\n\n## Test accuracy (%) "
            "by test batch size\n\n" + md(table.reset_index().rename(columns={'test_bs': 'test batch size'}))
            + "\n## Speed: as trained, and changed\n\n" + md(pd.DataFrame({
                'norm': speed.norm, 'change': speed['mode'],
                'images/s as trained': speed.images_per_s.map('{:.0f}'.format),
                'images/s changed': speed.changed_per_s.map('{:.0f}'.format),
                'speed-up': (speed.changed_per_s / speed.images_per_s).map('{:.2f}x'.format)}))
            + "\n## Models\n\n" + md(pd.DataFrame({
                'norm': models.norm, "today's recipe": [today_cell(r) for _, r in models.iterrows()]})))


def precision_page(results: Path) -> str | None:
    "precision.md: the same runs in float32 and in bfloat16 mixed precision, per variant."
    kept = {p: results / 'precision' / f'{p}-runs.csv' for p in ('fp32', 'bf16')}
    if not all(f.exists() for f in kept.values()): return None
    fp32, bf16 = (read_csv(f) for f in kept.values())
    shared = ['norm', 'seed', 'epochs', 'opt', 'bs', 'lr', 'wd', 'label_smoothing']
    same_runs = lambda df: df[shared].sort_values(shared).reset_index(drop=True)
    if not same_runs(fp32).equals(same_runs(bf16)):
        raise ValueError(f"{kept['fp32']} and {kept['bf16']}: not the same runs in two precisions")
    over_runs = lambda r: mean_std(r.test_acc.mean(), r.test_acc.std(ddof=1) if len(r) > 1 else None)
    epoch_s = lambda r: (r.seconds / r.epochs).mean()
    rows = [{'norm': n, 'recipe':
             f"{b.opt.iloc[0]}, lr {b.lr.iloc[0]:g}, wd {b.wd.iloc[0]:g}, bs {b.bs.iloc[0]}",
             'runs': len(b), 'test acc % float32': over_runs(a), 'test acc % bfloat16': over_runs(b),
             'difference (points)': f"{100 * (b.test_acc.mean() - a.test_acc.mean()):+.2f}",
             's / epoch float32': f"{epoch_s(a):.1f}", 's / epoch bfloat16': f"{epoch_s(b):.1f}",
             'speed-up': f"{epoch_s(a) / epoch_s(b):.2f}x", "today's recipe": today_cell(b.iloc[0])}
            for n in norm_order(bf16.norm.unique())
            for a, b in [(fp32[fp32.norm == n], bf16[bf16.norm == n])]]
    return ("# The study in float32 and in bfloat16\n\nThe same runs in both precisions on "
            f"{bf16.device_name.iloc[0]}, with the recipes of then (the recipe column). Seconds come from "
            "two separate studies; [speed.md](speed.md) measures speed side by side.\n\n"
            + md(pd.DataFrame(rows)))


def speed_page(f: Path) -> str | None:
    "A speed page from benchmarks/speed.py's measurements (`f`: its speed.json)."
    if not f.exists(): return None
    s = read_json(f)
    peaks, usual, ref = s['matmul_gflops'], s['usual'], s['reference']
    rows = pd.DataFrame(
        [dict({'bs': s['bs']}, **r, network=f"normnets, {r['norm']} norm") for r in s['variants']]
        + [dict({'bs': s['bs']}, **ref, network=f"reference, {ref['norm']} norm")]
        + [dict(usual, network=f"usual pipeline ({usual['params']:,}-parameter solution)")])
    gflops = 6 * rows.macs * rows.train_ips / 1e9
    table = pd.DataFrame({
        'network': rows.network, 'parameters': rows.params.map('{:,}'.format),
        'MACs / image': rows.macs.map(lambda m: f'{m / 1e6:.2f} M'), 'precision': rows.precision,
        'batch size': rows.bs, 'train images/s': rows.train_ips.map('{:.0f}'.format),
        'inference images/s': rows.infer_ips.map(lambda x: num(x, '{:.0f}')),
        'x usual': (rows.train_ips / usual['train_ips']).map('{:.2f}'.format),
        'x reference': (rows.train_ips / ref['train_ips']).map('{:.2f}'.format),
        'train GFLOP/s': gflops.map('{:.1f}'.format),
        'of the matmul peak': [f"{100 * g / peaks[p]:.0f}%" for g, p in zip(gflops, rows.precision)],
        "today's recipe": [today_cell(v) for v in s['variants']] + [''] * (len(rows) - len(s['variants']))})
    c = pd.DataFrame(s['changes'])
    median, each = rounds_cells(c.ratios)
    changes = pd.DataFrame({
        'variant': c.norm.map(lambda n: f'{n} norm'), 'change': c.change,
        'train images/s': [num(x, '{:.0f}') or f'failed: {e}' for x, e in zip(c.train_ips, c.error)],
        'as run': c.as_run_ips.map(lambda x: num(x, '{:.0f}')), 'relative to as run': median,
        'each round': each})
    prof, study = s['profile'], s['study']
    return (f"# Speed on {s['device_name']}\n\n`benchmarks/speed.py`: torch {s['torch']}, "
            f"{s['threads']} threads, {s['steps']} timed training steps after {s['warmup']} of warm-up, each "
            "table in one run; "
            f"normnets trains in {s['precision']} here. The reference is normnets' network and recipe before "
            "the recipe search."
            "\n\n" + md(pd.DataFrame({
                'matmul peak (4096 x 4096)': [f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()]}))
            + f"\nProjected study ({len(s['variants'])} variants x {study['epochs']} epochs x "
            f"{study['seeds']} seeds, evaluation included): **{study['seconds'] / 60:.1f} minutes** one run "
            f"at a time, **{study['fused_seconds'] / 60:.1f} minutes** with each variant's seeds fused.\n\n"
            + md(table) + at_once_table(s)
            + "\n## One change at a time\n\n" + rounds_text(s, 'its variant as run', c.ratios)
            + " The last row is the variant as run, measured again: its distance from 1.00 is the "
            "benchmark's own noise.\n\n"
            + md(changes) + (profile_text(prof, peaks) if prof else '') + compiled_text(s))


def compiled_text(s: dict) -> str:
    "The training step compiled against the same step eager, as speed.json measured it (a CPU's, if any)."
    if not s.get('compiled'): return ''
    c = pd.DataFrame(s['compiled'])
    median, _ = rounds_cells(c.ratios)
    when = s.get('dates', {}).get('compiled')
    table = pd.DataFrame({
        'variant': c.norm.map(lambda n: f'{n} norm'), 'precision': c.precision, 'batch size': c.bs,
        'compiled images/s': c.compiled_ips.map('{:.0f}'.format),
        'eager images/s': c.eager_ips.map('{:.0f}'.format),
        'x eager': [m if pd.isna(e) else f'failed: {e}' for m, e in zip(median, c.error)],
        'rounds': [f'{min(r):.2f} to {max(r):.2f}' for r in c.ratios],
        'compile s': c.compile_s.map('{:.0f}'.format)})
    return ("\n## The training step compiled\n\n`CapturedStep`'s one function for a training step (forward, "
            "loss, backward, the optimizer's step) through `torch.compile` (inductor), against the same "
            "function eager, at small batch sizes and at each recipe's own"
            + (f", measured on {when}" if when else '') + ". One learner runs the two in turn, "
            f"{len(c.ratios.iloc[0])} rounds of a chunk of each, as many images a chunk as {s['steps']} "
            "steps of 32: images/s are the medians, x eager the median of the rounds' ratios. Compile s: the "
            "first compiled chunk's time beyond the others' (inductor's on-disk cache makes a compile that "
            "it has seen before quicker). A run on this kind of machine trains compiled where it measured "
            "faster and it has the steps to pay for the compile (`COMPILED_FASTER`, `COMPILE_PAYS_AFTER` in "
            "normnets_learner.py).\n\n" + md(table))


def profile_text(prof: dict, peaks: dict) -> str:
    "Where a training step's time goes, from speed.py's profile (measured on a CPU only)."
    ops = pd.DataFrame(prof['top_ops'])
    top = max(peaks, key=lambda p: p != 'fp32')   # the training precision's peak
    return (f"\n## Where the time goes\n\ntorch.profiler over {prof['steps']} training steps of "
            f"{prof['norm']} norm (self time, forward and backward): "
            + ', '.join(f'{kind} {100 * x:.0f}%' for kind, x in prof['shares'].items())
            + f". The convolutions run at {prof['conv_gflops']:.0f} GFLOP/s, "
            f"{100 * prof['conv_gflops'] / peaks[top]:.0f}% of the {top} matmul peak.\n\n" + md(pd.DataFrame({
                'operator': ops.op.map(lambda o: f'`{o}`'), 'calls': ops.calls,
                'ms / step': ops.ms_per_step.map('{:.2f}'.format),
                'share': ops.share.map(lambda x: pct(x, 1))})))


def rounds_text(s: dict, baseline: str, ratios: pd.Series) -> str:
    "How speed.py measured a table of comparisons (`ratios`: each row's)."
    if s['rounds'] == 1: return f"Each row was measured once, right after {baseline}."
    once = " (a row with one ratio was measured once)" if any(len(r) == 1 for r in ratios) else ''
    return (f"Each row was measured {s['rounds']} times, each time right after {baseline}{once}: images/s "
            "are the medians, the ratio the median of the rounds' ratios.")


# How speed.py trains several runs at once (its `at_once` rows' `how`), as the speed pages say it.
AT_ONCE_WAYS = {'fused': 'one fused network', 'processes': 'a process each',
                'streams': 'a thread and CUDA stream each'}


def at_once_table(s: dict) -> str:
    "Several runs at once against one run alone, as speed.json measured them."
    a = pd.DataFrame(s['at_once'] + (s.get('at_once_small') or []))   # the latter: the grid's small batches
    median, each = rounds_cells(a.ratios)
    precision = a.precision.fillna(s['precision']) if 'precision' in a else s['precision']
    table = pd.DataFrame({'variant': a.norm.map(lambda n: f'{n} norm'), 'precision': precision,
                          'runs': a.runs,
                          'trained as': a.how.map(AT_ONCE_WAYS), 'batch size a run': a.bs,
                          'train images/s, all runs': a.train_ips.map('{:.0f}'.format),
                          'one run alone': a.alone_ips.map('{:.0f}'.format), 'x alone': median,
                          'each round': each})
    return ("\n## Several runs at once\n\nA variant's recipe, several of its runs (seeds 0, 1, ...) trained "
            "at once, images/s summed over the runs, against one run alone: as one fused network "
            "(`--fuse yes`), each in a process of its own (`--jobs`), or each in a thread on a CUDA stream "
            "of its own in one process (a GPU). "
            + rounds_text(s, 'one run alone', a.ratios)
            + (" The rows at the batch-size grid's small batch sizes ask whether it should train them as "
               "processes of one thread each." if s.get('at_once_small') else '') + "\n\n" + md(table))


def cluster_page(results: Path) -> str | None:
    "cluster.md: the same tiny grid here and on Ray clusters of 1 and 2 nodes (benchmarks/cluster.py)."
    f = results / 'cluster.json'
    if not f.exists(): return None
    c = read_json(f)
    w = pd.DataFrame(c['ways'])
    here = w.iloc[0]
    per_hour = w.runs / w.wall_seconds * 3600
    table = pd.DataFrame({
        'how': w.way, 'nodes x CPUs': [f"{n} x 1" if n else '' for n in w.nodes],
        'cluster start s': w.startup_seconds.map(lambda x: f'{x:.1f}' if x else ''),
        'command s': w.wall_seconds.map('{:.0f}'.format), 'runs': w.runs,
        'runs an hour': per_hour.map('{:.0f}'.format),
        'x here': (per_hour / per_hour.iloc[0]).map('{:.2f}'.format),
        'train s a run': w.train_seconds.map('{:.1f}'.format),
        'command s a run beyond here\'s': [f"{(x - here.wall_seconds) / r:+.1f}" if n == 1 else ''
                                           for x, r, n in zip(w.wall_seconds, w.runs, w.nodes)]})
    return (f"# A grid on a Ray cluster\n\n`benchmarks/cluster.py` on {c['device_name']}, {c['date']}: "
            f"torch {c['torch']}, Ray {c['ray']}. The same grid (`run_all.py {c['grid']}`) trained here one "
            "run at a time and on Ray clusters started on this machine (`ray.cluster_utils.Cluster`, inside "
            "a network namespace of loopback only), every run on 1 thread. Command s: the whole command as a "
            "user times it, its start, the data, joining the cluster and every run; cluster start s: the "
            "nodes started and joined, before it. Train s a run: the runs' own training time. The 1-node "
            "cluster's command time a run beyond here's is Ray's cost a run: the task, its worker process, "
            "the code and images it receives, the files it sends back.\n\n" + md(table))


def beside_page(results: Path, folder: str, title: str, label: str, main: str) -> str | None:
    """A study in the subfolder `folder` (another device or precision, `label`) beside the main study
    (`main`), per norm, and whether their recipes are the same: the GPU study, the bfloat16 study."""
    other = results / folder
    summary, runs = read(other / 'summary.csv'), read(other / 'runs.csv')
    if summary is None: return None
    base, base_runs = read_csv(results / 'summary.csv').set_index('norm'), read_csv(results / 'runs.csv')
    summary = summary[summary.norm.isin(base.index) & summary.norm.isin(base_runs.norm)]   # norms of both
    if not len(summary): return None
    first = lambda r, n: r[r.norm == n].iloc[0]
    same = {n: all(first(runs, n)[k] == first(base_runs, n)[k] for k in TRAINING_FIELDS)
            for n in summary.norm}
    acc = summary.set_index('norm')
    gap = acc.test_acc - base.test_acc[acc.index]   # this study minus the main one, a norm each
    spread_of = pd.concat([acc.test_acc_std, base.test_acc_std[acc.index]], axis=1).max(axis=1)
    study = read_json(other / 'study.json') if (other / 'study.json').exists() else None
    wall = ''
    if study:
        kept = study['runs'] - study['trained']
        before = f" ({kept} of its {study['runs']} runs kept from before)" if kept else ''
        wall = (f" The whole study, {study['how']}, took **{study['wall_seconds']:.0f} s** of wall time, "
                f"data to last file{before}.")
    speed = f"{folder}/speed.md"
    return (f"# {title}\n\n{provenance(runs)}{wall}"
            + (f" [{speed}]({speed}) profiles a step." if (other / 'speed.json').exists() else '')
            + f"\n\n![{title}]({folder}/comparison.png)\n\n"
            + md(pd.DataFrame({
                'norm': summary.norm,
                f'{label} test acc %': spread(summary, 'test_acc'),
                f'{label} train s a run': summary.seconds.map('{:.0f}'.format),
                f'{main} test acc %': [mean_std(base.test_acc[n], base.test_acc_std[n])
                                       for n in summary.norm],
                f'same recipe as the {main} study': [('yes' if same[n] else '**no**') for n in summary.norm],
                "today's recipe": [today_cell(first(runs, n)) for n in summary.norm],
                f'{label} minus {main} (points)': [f"{100 * d:+.2f}" if same[n] else ''
                                                   for n, d in gap.items()],
                "within the seeds' spread": [('yes' if abs(d) <= spread_of[n] else 'no') if same[n] else ''
                                             for n, d in gap.items()]})))


# (title, what it holds, how it is made) of each page: the README links them as a table
PAGES = {'study.md': ('Every run', 'findings per norm, each run, accuracy per class', study_page),
         'ablation.md': ('Ablation', 'one change of a recipe at a time, held-out', ablation_page),
         'search.md': ('Recipe search', 'optimizer, peak lr and weight decay, held-out', search_page),
         'batch_size.md': ('Batch size', 'every variant at several training batch sizes', batch_size_page),
         'inference.md': ('Inference', 'batch statistics at test time, folding, speed', inference_page),
         'precision.md': ('Precision', 'the study in float32 and in bfloat16', precision_page),
         'speed.md': ('Speed', 'images/s, share of the peak, profile, on a CPU in float32',
                      lambda r: speed_page(r / 'speed.json')),
         'speed-bf16.md': ('Speed in bfloat16', 'the same on a CPU with AVX512-BF16, in bfloat16',
                           lambda r: speed_page(r / 'speed-bf16.json')),
         'speed-amx.md': ('Speed with AMX', 'the same on an Intel Xeon with AMX, in bfloat16',
                          lambda r: speed_page(r / 'speed-amx.json')),
         'cluster.md': ('Cluster', 'a small grid here and on Ray clusters of 1 and 2 nodes', cluster_page),
         'gpu.md': ('GPU', 'the study on a GPU beside the CPU study',
                    lambda r: beside_page(r, 'gpu', 'The study on a GPU', 'GPU', 'CPU')),
         'bf16.md': ('bfloat16', 'the study in bfloat16 on a CPU beside the float32 study',
                     lambda r: beside_page(r, 'bf16', 'The study in bfloat16 on a CPU', 'bf16', 'fp32')),
         'gpu/speed.md': ('GPU speed', 'the speed benchmark on a GPU',
                          lambda r: speed_page(r / 'gpu' / 'speed.json'))}


def pages(results: Path) -> dict:
    "Every page under results/ that its data allows: {file name: text}."
    return {name: text for name, (*_, make) in PAGES.items() if (text := make(results)) is not None}


