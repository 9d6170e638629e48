"""The study's report: tables, figures lists and findings generated from the files under results/.

README.md is written by people. Its numbers live in generated regions between markers,

    <!--g:name-->...<!--/g-->

which `fill` rewrites from `regions(results)`; a region can be a whole block or a few words inside a sentence.
The long tables (speed, ablation, precision, search) are pages of their own, `PAGES`, under results/.
`stale` lists what no longer matches the files, for `scripts/report.py --check` and the tests.
"""
import json, re
from pathlib import Path

import pandas as pd
import torch

from normnets import ACTIVATIONS, GN_GROUPS, NORMS, MAX_EPOCHS, PARAM_LIMIT, PASS_ACCURACY, WIDTHS
from normnets import normnet, count_params, count_macs
from normnets_learner import recipe, saved_recipe

__all__ = ['markdown_table', 'pct', 'summary_markdown', 'regions', 'pages', 'fill', 'stale', 'write_report']

REGION = re.compile(r'<!--g:(?P<name>[\w-]+)-->(?P<body>.*?)<!--/g-->', re.S)


# ---------------------------------------------------------------- formatting

def markdown_table(df: pd.DataFrame) -> str:
    "A pandas table as GitHub markdown (pandas' own to_markdown needs an extra package)."
    cells = df.astype(object).fillna('').astype(str)   # missing values (NaN, None) as empty cells
    lines = ['| ' + ' | '.join(map(str, df.columns)) + ' |', '|' + '---|' * len(df.columns)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in cells.values.tolist()]
    return '\n'.join(lines) + '\n'


def pct(x, digits=2) -> str: return '' if pd.isna(x) else f'{100 * x:.{digits}f}'


def mean_std(mean, std) -> str: return pct(mean) + (f' ± {pct(std)}' if pd.notna(std) else '')


def norm_order(names) -> list:
    return sorted(names, key=lambda n: list(NORMS).index(n) if n in NORMS else len(NORMS))


# ---------------------------------------------------------------- the study

def summary_markdown(summary: pd.DataFrame, missing=(), others=()) -> str:
    "The results table (accuracies in %, mean ± standard deviation over seeds where there are several)."
    t = pd.DataFrame(
        {
            'norm': summary.norm,
            'params': summary.params.map('{:,}'.format),
            'epochs': summary.epochs,
            'seeds': summary.seeds,
        }
    )
    for col, name in (('train_acc', 'train acc %'), ('test_acc', 'test acc %')):
        t[name] = [mean_std(m, s) for m, s in zip(summary[col], summary[f'{col}_std'])]
    t['best test acc %'] = summary.best_test_acc.map(pct)
    t['test acc % with flip TTA'] = summary.tta_test_acc.map(pct)
    t['train loss'] = summary.train_loss.map('{:.3f}'.format)
    t['test loss'] = summary.test_loss.map('{:.3f}'.format)
    t[f'epochs to {PASS_ACCURACY:.0%}'] = summary.epochs_to_70.map(
        lambda e: '' if pd.isna(e) else f'{round(e, 1):g}'
    )
    t['train s'] = summary.seconds.map('{:.0f}'.format)
    text = markdown_table(t)
    if len(summary):
        text += (f"\nDevice: {summary.device_name.iloc[0]}. Data: {summary.data.iloc[0]} "
                 f"(md5 `{summary.data_md5.iloc[0]}`).\n")
    if missing: text += f"\n**Missing (not finished): {', '.join(missing)}.**\n"
    if others:
        text += f"\nRuns in this folder from other recipes, not part of this study: {', '.join(others)}.\n"
    return text


def runs_markdown(runs: pd.DataFrame) -> str:
    "One row per run: the spread behind the means."
    return markdown_table(pd.DataFrame({
        'norm': runs.norm, 'seed': runs.seed, 'train acc %': runs.train_acc.map(pct),
        'test acc %': runs.test_acc.map(pct), 'test acc % with flip TTA': runs.tta_test_acc.map(pct),
        f'epochs to {PASS_ACCURACY:.0%}': runs.epochs_to_70.map(lambda e: '' if pd.isna(e) else f'{e:g}'),
        'train s': runs.seconds.map('{:.0f}'.format), 'folder': runs.run.map(lambda r: f'`{r}`')}))


# The recipe fields that say how a run trains (not on what machine): compared between the committed runs and
# today's RECIPES.
# The training tricks of a recipe (off by default), by how the recipes table names them.
TRICKS = {'ema': 'EMA {}', 'lookahead': 'Lookahead', 'cutout': 'cutout {}', 'mixup': 'mixup {}',
          'whiten_c1': 'whitened C1'}
TRAINING_FIELDS = ['opt', 'lr', 'wd', 'bs', 'label_smoothing', 'crop_pad', 'epochs', 'net', 'exempt_gn_scale',
                   *TRICKS]


def recipe_now(norm: str) -> dict:
    "The recipe of `norm` in the code today, the same on every machine."
    return recipe(norm, device='cpu', precision='fp32').to_dict()


def layer_order(net: str) -> str:
    """Where the norm sits in each layer of a network with these options (JSON, as runs record them), beside
    the activation they name."""
    options = json.loads(net)
    act = type(ACTIVATIONS[options.get('act', 'relu')]()).__name__
    return f'conv, {act}, norm' if options.get('norm_after_relu') else f'conv, norm, {act}'


def layer_orders_markdown(nets: dict) -> str:
    """Where each norm sat in the runs behind a table ({norm: network options as JSON}), and which norms'
    recipes now put it elsewhere."""
    by_order = {}
    for norm, net in nets.items(): by_order.setdefault(layer_order(net), []).append(norm)
    text = 'Layer order: ' + '; '.join(f"{o} for {', '.join(ns)} norm" for o, ns in by_order.items()) + '.'
    now = {n: layer_order(json.dumps(recipe_now(n)['net'])) for n in nets}
    moved = [n for n, net in nets.items() if layer_order(net) != now[n]]
    if moved: text += f" The recipes of {', '.join(moved)} norm have changed it since these runs."
    return text


def recorded_recipe(run: pd.Series) -> dict:
    """The training fields of a run's recipe, as runs.csv records them (`net` as JSON); a field it did not
    record (an older run) had its default."""
    recorded = {k: v for k, v in run.items() if not (isinstance(v, float) and pd.isna(v))}
    saved = saved_recipe({**recorded, 'net': json.loads(run.net)})
    return {k: saved[k] for k in TRAINING_FIELDS}


def tricks(saved: dict) -> str:
    "The training tricks a recipe turns on, named as in the recipes table ('' for none)."
    return ', '.join(name.format(saved[k]) for k, name in TRICKS.items() if saved[k])


def recipe_changes(first: pd.DataFrame) -> list[str]:
    """Per norm whose recorded recipe (`first`: a run per norm, `net` as JSON) differs from its recipe in the
    code today: what changed, as 'field recorded -> now'."""
    changes = []
    for norm, run in first.iterrows():
        now, was = recipe_now(norm), recorded_recipe(run)
        diffs = [f"{k} `{json.dumps(was[k])}` -> `{json.dumps(now[k])}`"
                 for k in TRAINING_FIELDS if was[k] != now[k]]
        if diffs: changes.append(f"{norm} norm ({', '.join(diffs)})")
    return changes


def recipes_markdown(runs: pd.DataFrame) -> str:
    """Each norm's recipe as its runs recorded it, and where today's recipes differ from it (the study is then
    older than the code)."""
    first = runs.groupby('norm', sort=False).first()
    recorded = [recorded_recipe(run) for _, run in first.iterrows()]
    table = pd.DataFrame({
        'norm': first.index, 'layer order': first.net.map(layer_order), 'optimizer': first.opt,
        'peak lr': first.lr, 'weight decay': first.wd, 'batch size': first.bs,
        'label smoothing': first.label_smoothing,
        'crop padding': [r['crop_pad'] for r in recorded],   # older runs.csv lack it: their default
        'epochs': first.epochs, 'precision': first.precision})
    used = [tricks(r) for r in recorded]
    if any(used): table['training tricks'] = used   # a column only when some recipe has one
    text = markdown_table(table)
    changes = recipe_changes(first)
    if changes:
        text += (
            f"\n**The recipes in the code have changed since these runs:** {'; '.join(changes)}. "
            "`scripts/run_all.py` trains the new ones; every number below is from the runs above until the "
            "study is rerun.\n"
        )
    return text


def describe_layer(name, m) -> str:
    if name == 'gap': return 'global average pool'
    if name == 'C10': return f'1x1 conv {m.in_channels} -> {m.out_channels} (logits)'
    conv, k = m[0], m[0].kernel_size[0]
    pool = ', 2x2 max-pool' if any(isinstance(layer, torch.nn.MaxPool2d) for layer in m) else ''
    skip = f" (+ output of C{int(name[1]) - 2})" if name in ('C5', 'C9') else ''
    return f'{k}x{k} conv {conv.in_channels} -> {conv.out_channels}{pool}, norm, ReLU{skip}'


def architecture_markdown() -> str:
    """The layer table (output shape and parameters of each layer of the default network) and, per norm,
    what it normalizes and its network as its recipe builds it: widths changed, parameters, MACs."""
    model, rows = normnet(next(iter(NORMS))), []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: rows.append((name, m, tuple(o.shape[1:]))))
             for name, m in model.named_children()]
    model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks: h.remove()
    layers = pd.DataFrame({
        'layer': [n for n, _, _ in rows], 'what': [describe_layer(n, m) for n, m, _ in rows],
        'output (C, H, W)': [' x '.join(map(str, s)) for _, _, s in rows],
        'parameters': [f'{count_params(m):,}' for _, m, _ in rows]})
    variants = []
    for n in NORMS.values():
        r = recipe(n.name)
        net, widths = r.model(), {k: v for k, v in r.net.items() if k in WIDTHS and v != WIDTHS[k]}
        variants.append({
            'variant': f'{n.name} norm ({n.alias})', 'normalizes': n.over,
            'widths (recipe)': ', '.join(f'{k}={v}' for k, v in widths.items()) or 'as above',
            'parameters': f'{count_params(net):,}', 'MACs / image': f'{count_macs(net) / 1e6:.2f} M',
        })
    return markdown_table(layers) + '\n' + markdown_table(pd.DataFrame(variants))


def findings_markdown(summary: pd.DataFrame, histories: dict) -> str:
    "The study's findings, each sentence built from the measured numbers."
    s = summary.set_index('norm')
    order = s.test_acc.sort_values(ascending=False)
    acc = lambda n: f"{mean_std(s.test_acc[n], s.test_acc_std[n])}%"
    seeds = int(s.seeds.iloc[0])
    over = f' (mean ± standard deviation over {seeds} seeds)' if seeds > 1 else ''
    bar = f'{PASS_ACCURACY:.0%}'
    lines = [
        f"- **Accuracy.** Ranked by final test accuracy: "
        f"{', then '.join(f'{n} norm ({acc(n)})' for n in order.index)}{over}. The gap between best and "
        "worst "
        f"is {100 * (order.iloc[0] - order.iloc[-1]):.2f} points; every variant is "
        f"{'above' if (s.test_acc > PASS_ACCURACY).all() else 'NOT above'} the {bar} bar."
    ]
    conv = '; '.join(f"{n} norm after {round(s.epochs_to_70[n], 1):g}" if pd.notna(s.epochs_to_70[n])
                     else f"{n} norm never" for n in s.index)
    k = min(5, min(len(h) for h in histories.values()))
    early = '; '.join(f"{n} norm {pct(h.test_acc.iloc[k - 1], 1)}%" for n, h in histories.items())
    lines.append(
        f"- **Convergence.** Epochs to first pass {bar} test "
        f"accuracy{' (mean over seeds)' if seeds > 1 else ''}"
        f": {conv}. Test accuracy after epoch {k} (first seed): {early}."
    )
    drops = {n: h.test_acc.diff() for n, h in histories.items()}
    stab = '; '.join(f"{n} norm {100 * -d.min():.2f} points (epoch {int(histories[n].epoch[d.idxmin()])})"
                     if d.min() < 0 else f"{n} norm never dropped" for n, d in drops.items())
    lines.append(
        f"- **Stability.** Largest fall of test accuracy from one epoch to the next (first seed): {stab}."
    )
    gaps = '; '.join(f"{n} norm {100 * (s.train_acc[n] - s.test_acc[n]):.2f} points" for n in s.index)
    lines.append(
        f"- **Generalization.** Train minus test accuracy (train accuracy measured on the un-augmented "
        f"training images after training): {gaps}."
    )
    secs = '; '.join(f"{n} norm {s.seconds[n] / s.epochs[n]:.1f} s" for n in s.index)
    lines.append(
        f"- **Cost.** Seconds per epoch (training and evaluation) on {s.device_name.iloc[0]}: {secs}."
    )
    lines += gap_closed_lines(s)
    return '\n'.join(lines) + '\n'


def gap_closed_lines(s: pd.DataFrame) -> list:
    """How much of its exercise norm's gap to the best exercise norm each extra variant closes, from the mean
    test accuracies of `s` (indexed by norm); nothing where the study lacks one of the three."""
    exercise = [n for n in s.index if n in NORMS and NORMS[n].exercise]
    extras = [n for n in s.index if n in NORMS and NORMS[n].base in exercise]
    if not extras: return []
    best = s.test_acc[exercise].idxmax()
    parts = []
    for n in extras:
        base = NORMS[n].base
        gap, gain = s.test_acc[best] - s.test_acc[base], s.test_acc[n] - s.test_acc[base]
        acc = mean_std(s.test_acc[n], s.test_acc_std[n])
        part = f"{n} norm {acc}%, {100 * gain:+.2f} points on {base} norm"
        if base != best and gap > 0:
            part += f": {gain / gap:.0%} of its {100 * gap:.2f}-point gap to {best} norm"
        parts.append(part)
    return [f"- **Beyond the exercise.** {'; '.join(parts)}."]


def per_class_markdown(results: Path) -> str:
    per_class = pd.read_csv(results / 'per_class.csv').set_index('class')
    text = "Test accuracy per class (%):\n\n" + markdown_table(
        per_class.map(lambda x: pct(x, 1)).reset_index()
    )
    worst = '; '.join(f"{n} norm: {per_class[n].idxmin()} ({pct(per_class[n].min(), 1)}%)" for n in per_class)
    text += f"\nHardest class: {worst}."
    if 'batch' in per_class and len(per_class.columns) > 1:
        gaps = per_class.drop(columns='batch').sub(per_class['batch'], axis=0)
        text += ' Largest loss against batch norm: ' + '; '.join(
            f"{n} norm on {gaps[n].idxmin()} ({100 * gaps[n].min():+.1f} points)" for n in gaps.columns) + '.'
    return text + '\n'


def figures_markdown(summary: pd.DataFrame, rel: str) -> str:
    return '\n'.join(f"### {n} norm\n![{n} norm curves]({rel}/{n}/curves.png) "
                     f"![{n} norm misclassified]({rel}/{n}/misclassified.png)\n" for n in summary.norm)


def provenance(runs: pd.DataFrame) -> str:
    first = runs.iloc[0]
    seeds = sorted(runs.seed.unique())
    wall = runs[runs.seed == seeds[0]].wall_seconds.sum() / 60
    return (
        f"{len(runs)} runs ({runs.norm.nunique()} variants x {len(seeds)} seeds) of `scripts/run_all.py` on "
        f"{first.device_name}, torch {first.torch}, fastai {first.fastai}, {first.precision}, on "
        f"{first.data} "
        f"(md5 `{first.data_md5}`). The first seed's {runs.norm.nunique()} runs took {wall:.1f} minutes of "
        f"wall time, from loading the data to the last file."
    )


# ---------------------------------------------------------------- batch size and inference

def batch_size_markdown(results: Path, rel: str) -> str:
    "The batch-size grid's figure, table and findings, from results/batch_size.csv."
    f = results / 'batch_size.csv'
    if not f.exists(): return "_Not measured yet: run `python scripts/batch_sizes.py`._\n"
    df = pd.read_csv(f)
    grid = df.groupby(['norm', 'bs']).agg(test_acc=('test_acc', 'mean'), seconds=('seconds', 'mean'),
                                          lr=('lr', 'first')).reset_index()
    lines = []
    for norm in norm_order(grid.norm.unique()):
        g = grid[grid.norm == norm].sort_values('bs').set_index('bs')
        best, small, large = g.test_acc.idxmax(), g.index.min(), g.index.max()
        at = [f"at {b} {pct(g.test_acc[b])}% ({100 * (g.test_acc[b] - g.test_acc[best]):+.2f} points)"
              for b in (small, large) if b != best]
        lines.append(f"- **{norm} norm**: best at batch size {best} ({pct(g.test_acc[best])}%); "
                     f"{', '.join(at)}. A cell cost {g.seconds[small] / 60:.1f} min at batch size {small}, "
                     f"{g.seconds[large] / 60:.1f} min at {large}.")
    epochs, seeds = sorted(df.epochs.unique()), sorted(df.seed.unique())
    nets = {n: json.dumps(json.loads((results / run / 'metrics.json').read_text())['net'])
            for n, run in df.groupby('norm', sort=False).run.first().items()}
    return (
        f"![test accuracy against batch size]({rel}/batch_size.png)\n\n"
        f"Every variant with its recipe at each batch size for {'/'.join(map(str, epochs))} epochs a cell "
        f"(the study trains {MAX_EPOCHS}), seed {', '.join(map(str, seeds))}, peak learning rate scaled with "
        "the "
        f"square root of the batch size, on {df.device_name.iloc[0]} "
        f"([batch_size.md]({rel}/batch_size.md) has the table). {layer_orders_markdown(nets)}\n\n"
        + '\n'.join(lines)
        + '\n'
    )


def batch_size_page(results: Path) -> str | None:
    "results/batch_size.md: test accuracy and cost of every cell of the batch-size grid."
    f = results / 'batch_size.csv'
    if not f.exists(): return None
    df = pd.read_csv(f)
    grid = df.groupby(['norm', 'bs']).agg(test_acc=('test_acc', 'mean'), seconds=('seconds', 'mean'),
                                          lr=('lr', 'first')).reset_index()
    cells = grid.assign(cell=[f"{pct(a)} ({s / 60:.1f} min)" for a, s in zip(grid.test_acc, grid.seconds)])
    table = cells.pivot(index='bs', columns='norm', values='cell')[norm_order(grid.norm.unique())]
    table = table.rename(columns=lambda n: f'{n} norm: test acc % (cost)')
    table.insert(0, 'peak lr', grid.groupby('bs').lr.first().map('{:.2g}'.format))
    return ("# Batch size\n\nWritten by `scripts/report.py` from `batch_size.csv` (trained by "
            f"`scripts/batch_sizes.py` on {df.device_name.iloc[0]}): every cell's test accuracy and what it "
            "cost.\n\n" + markdown_table(table.reset_index().rename(columns={'bs': 'batch size'})))


def inference_markdown(results: Path, rel: str) -> str:
    "Batch statistics at test time, folding and the cost of statistics, from results/inference.csv."
    f = results / 'inference.csv'
    if not f.exists(): return "_Not measured yet: run `python benchmarks/inference.py`._\n"
    df = pd.read_csv(f)
    acc, speed = df[df.kind == 'accuracy'], df[df.kind == 'speed']
    lines = []
    bn = acc[acc['mode'] == 'batch: batch statistics']
    running = acc[acc['mode'] == 'batch: running statistics']
    if len(bn) and len(running):
        bn, ref = bn.sort_values('test_bs'), running.test_acc.iloc[0]
        lost = lambda r: (
            f"{pct(r.test_acc)}% at test batch size {int(r.test_bs)} ({100 * (r.test_acc - ref):+.2f} points)"
        )
        lines.append(
            f"- **batch norm** with batch statistics at test time (a model left in training mode) scores "
            f"{lost(bn.iloc[0])} up to {lost(bn.iloc[-1])}, against {pct(ref)}% with its running "
            f"statistics at every test batch size."
        )
    others = [n for n in norm_order(acc.norm.unique()) if n != 'batch']
    spread = lambda a: f"{pct(a.min())}%" if a.min() == a.max() else f"{pct(a.min())}% to {pct(a.max())}%"
    if others:
        scores = ', '.join(f"**{n} norm** scores {spread(acc[acc.norm == n].test_acc)}" for n in others)
        lines.append(f"- {scores} at every test batch size: each normalizes an image by its own statistics.")
    for _, row in speed.iterrows():
        ips, changed = row.images_per_s, row.changed_per_s
        if row.norm == 'batch':
            lines.append(
                f"- **batch norm folded** into the convolutions runs at {changed:.0f} images/s against "
                f"{ips:.0f} as trained ({changed / ips:.2f}x), with the same predictions (a test checks it)."
            )
        else:
            share = 1 - ips / changed   # of the time as trained, what the statistics take
            cost = f"{100 * share:.0f}% of its inference time" if share > 0 else "nothing measurable"
            lines.append(
                f"- **{row.norm} norm** runs at {ips:.0f} images/s as trained and {changed:.0f} with its "
                f"statistics taken out (scale and shift only): computing them costs {cost}."
            )
    return (f"![accuracy against test batch size]({rel}/inference.png)\n\n"
            f"Each study variant's first-seed model by test batch size "
            f"([inference.md]({rel}/inference.md) has the table); speed on {df.device_name.dropna().iloc[0]}."
            "\n\n" + '\n'.join(lines) + '\n')


def inference_page(results: Path) -> str | None:
    "results/inference.md: test accuracy of each study variant by test batch size and mode."
    f = results / 'inference.csv'
    if not f.exists(): return None
    acc = pd.read_csv(f).query("kind == 'accuracy'")
    table = acc.pivot(index='test_bs', columns='mode', values='test_acc').map(pct)
    return ("# Inference: accuracy by test batch size\n\nWritten by `scripts/report.py` from `inference.csv` "
            "(measured by `benchmarks/inference.py`): test accuracy (%) of each study variant's first-seed "
            "model.\n\n" + markdown_table(table.reset_index().rename(columns={'test_bs': 'test batch size'})))


# ---------------------------------------------------------------- pages under results/

SHARED_RECIPE = 'adam, lr 0.01, wd 0.05 (shared)'


def ablation_frame(results: Path) -> pd.DataFrame | None:
    """ablation.csv with each row's `base_acc` (the accuracy of the recipe it changed, same variant, length,
    seed and scoring) and `diff` (points gained by the change); None before any row."""
    f = results / 'ablation.csv'
    if not f.exists(): return None
    df = pd.read_csv(f)
    df['precision'] = df['precision'].fillna('fp32')   # rows from before mixed precision
    df['scored_on'] = df.get('scored_on', pd.Series(index=df.index)).fillna('the test set')   # rows before
    # rows from before the search, when every norm shared one recipe
    df['base'] = df.get('base', pd.Series(index=df.index)).fillna(SHARED_RECIPE)
    key = ['norm', 'epochs', 'seed', 'precision', 'scored_on', 'base']
    base = df[df.change == 'current recipe'].set_index(key).test_acc
    df['base_acc'] = pd.Series([base.get(k) for k in df[key].itertuples(index=False, name=None)], dtype=float)
    df['diff'] = 100 * (df.test_acc - df.base_acc)
    return df


def ablation_verdicts(df: pd.DataFrame) -> str:
    """A line per kind of outcome (helped, no clear effect, hurt), listing each change with its difference:
    the mean over the seeds it ran with, and each seed's where there are several."""
    changed = df[(df.change != 'current recipe') & df['diff'].notna()]
    key = ['change', 'norm', 'epochs', 'precision', 'scored_on', 'base']
    g = changed.groupby(key, sort=False).agg(
        mean=('diff', 'mean'), diffs=('diff', list), seeds=('seed', list)
    ).reset_index()
    # a change measured against more than one recipe of a norm names the recipe it changed
    g['recipes'] = g.groupby(['change', 'norm', 'epochs']).base.transform('size')
    def label(r):
        seeds = (f": {', '.join(f'{d:+.2f}' for d in r.diffs)} with seeds {', '.join(map(str, r.seeds))}"
                 if len(r.seeds) > 1 else f", seed {r.seeds[0]}")
        against = f", against {r.base}" if r.recipes > 1 else ''
        return f"{r.change} ({r.norm}, {r.epochs} epochs, {r.mean:+.2f}{seeds}{against})"
    kinds = [('Helped (more than +0.5 points)', g['mean'] > 0.5),
             ('Within 0.5 points, no clear effect', g['mean'].abs() <= 0.5),
             ('Hurt (more than 0.5 points lost)', g['mean'] < -0.5)]
    return '\n'.join(f"- {kind}: " + '; '.join(label(r) for r in g[m].itertuples())
                     for kind, m in kinds if m.any())


def ablation_page(results: Path) -> str | None:
    "results/ablation.md from ablation.csv: each change against the current recipe of its variant and length."
    df = ablation_frame(results)
    if df is None: return None
    table = pd.DataFrame({
        'change': df.change, 'norm': df.norm, 'recipe changed': df.base, 'epochs': df.epochs,
        'seed': df.seed, 'precision': df.precision,
        'scored on': df.scored_on, 'params': df.params.map('{:,}'.format),
        'acc % (recipe)': df.base_acc.map(pct), 'acc % (with the change)': df.test_acc.map(pct),
        'difference (points)': df['diff'].map(lambda d: '' if pd.isna(d) else f'{d:+.2f}'),
        'train s': df.seconds.map('{:.0f}'.format)})
    return (f"# Ablation\n\nWritten by `scripts/report.py` from `ablation.csv` (rows trained by "
            "`benchmarks/ablation.py`). Each row changes one thing in the recipe and trains the variant for "
            "the "
            f"given epochs with the given seed, on {df.device.iloc[0]}, data md5 "
            f"`{df.data_md5.iloc[0]}`. 'current recipe' is the norm's recipe when the row ran (its "
            "optimizer, peak lr, weight decay and network options under 'recipe changed'); the change says "
            "what it was changed from. The first rows were scored on the test set; later ones on training "
            "images held out from training, so that no choice is made on the test set. Seconds are wall "
            "time: rows that ran while other jobs shared the cores took longer.\n\n"
            + markdown_table(table) + f"\n{ablation_verdicts(df)}\n")


def ablation_matrix(df: pd.DataFrame) -> str:
    """A row a change and length, a column a norm: the points the change gained over the recipe it changed,
    the mean over its seeds (each seed's in brackets where several), bold where more than half a point. A
    change measured against several recipes of a norm shows the latest, marked *."""
    changed = df[(df.change != 'current recipe') & df['diff'].notna()].reset_index()
    cell_key = ['change', 'epochs', 'norm']
    g = changed.groupby([*cell_key, 'base'], sort=False).agg(
        mean=('diff', 'mean'), diffs=('diff', list), seeds=('seed', list), latest=('index', 'max'),
    ).reset_index()
    g['recipes'] = g.groupby(cell_key).base.transform('size')
    g = g.sort_values('latest').drop_duplicates(cell_key, keep='last')

    def cell(r) -> str:
        text = f"{r.mean:+.2f}" + (f" ({', '.join(f'{d:+.2f}' for d in r.diffs)})" if len(r.diffs) > 1
                                   else f" (seed {r.seeds[0]})" if r.seeds[0] else '')
        return (f"**{text}**" if round(r.mean, 2) > 0.5 else text) + ('*' if r.recipes > 1 else '')
    g['cell'] = [cell(r) for r in g.itertuples()]
    first_seen = changed.groupby('change')['index'].min()
    rows = sorted(set(zip(g.change, g.epochs)), key=lambda ce: (first_seen[ce[0]], ce[1]))
    table = g.pivot(index=['change', 'epochs'], columns='norm', values='cell').reindex(rows)
    table = table[norm_order(table.columns)].rename(columns=lambda n: f'{n} norm').reset_index()
    return markdown_table(table)


def ablation_markdown(results: Path, rel: str) -> str:
    """The README's summary of the ablation: the changes scored on held-out images (the ones that may choose a
    recipe) as a table of changes by norms, and rows that have no current-recipe run of their length."""
    df = ablation_frame(results)
    held_out = df[df.scored_on != 'the test set'] if df is not None else []
    if not len(held_out): return 'No change has been scored on held-out images yet.'
    alone = held_out[held_out['diff'].isna()]
    return (
        "Points each change gained on held-out training images over the recipe it changed, short screens "
        "first, then the rules' full length for the most promising: the mean over the seeds it ran with "
        "(seed 0 unless the brackets give each seed's); bold: more than half a point; *: measured "
        "against more than one recipe of the norm, the latest shown "
        f"(every row: [ablation.md]({rel}/ablation.md)).\n\n"
        + ablation_matrix(held_out)
        + ''.join(f"\n- {r.change}, {r.norm} norm, {r.epochs} epochs, seed {r.seed}: {pct(r.test_acc)}% (no "
                  "current-recipe run of that length and seed to compare with)" for r in alone.itertuples())
        + '\n'
    )


def precision_page(results: Path) -> str | None:
    """results/precision.md: one study run in float32 and in bfloat16 mixed precision (each one's runs.csv
    kept as precision/fp32-runs.csv and bf16-runs.csv), per variant: what mixed precision changed in accuracy
    and time."""
    kept = {p: results / 'precision' / f'{p}-runs.csv' for p in ('fp32', 'bf16')}
    if not all(f.exists() for f in kept.values()): return None
    fp32, bf16 = (pd.read_csv(f) for f in kept.values())
    shared = ['norm', 'seed', 'epochs', 'bs', 'lr', 'wd', 'label_smoothing']
    same_runs = lambda df: df[shared].sort_values(shared).reset_index(drop=True)
    if not same_runs(fp32).equals(same_runs(bf16)):
        raise ValueError(f"{kept['fp32']} and {kept['bf16']}: not the same runs in two precisions")
    spread = lambda r: mean_std(r.test_acc.mean(), r.test_acc.std(ddof=1) if len(r) > 1 else None)
    epoch_s = lambda r: (r.seconds / r.epochs).mean()
    rows = [
        {
            'norm': n,
            'recipe': f"{opt}lr {b.lr.iloc[0]:g}, wd {b.wd.iloc[0]:g}, batch {b.bs.iloc[0]}",
            'runs': len(b),
            'test acc % float32': spread(a),
            'test acc % bfloat16': spread(b),
            'difference (points)': f"{100 * (b.test_acc.mean() - a.test_acc.mean()):+.2f}",
            's / epoch float32': f"{epoch_s(a):.1f}",
            's / epoch bfloat16': f"{epoch_s(b):.1f}",
            'speed-up': f"{epoch_s(a) / epoch_s(b):.2f}x",
        }
        for n in norm_order(bf16.norm.unique())
        for a, b in [(fp32[fp32.norm == n], bf16[bf16.norm == n])]
        for opt in [f"{b.opt.iloc[0]}, " if 'opt' in b else '']   # runs older than the optimizer choice
    ]
    seeds = ', '.join(map(str, sorted(set(bf16.seed))))
    return (
        "# The study in float32 and in bfloat16\n\nWritten by `scripts/report.py`. The same runs (recipes "
        f"and seeds {seeds}) in both precisions on {bf16.device_name.iloc[0]}: the study's recipes then, not "
        "necessarily today's. Test accuracy: mean ± standard deviation over the runs. The seconds come from "
        "the two studies' own runs, which did not share a machine state; [speed.md](speed.md) measures speed "
        "side by side.\n\n" + markdown_table(pd.DataFrame(rows))
    )


def speed_page(f: Path) -> str | None:
    "A speed page from benchmarks/speed.py's measurements (`f`: its speed.json)."
    if not f.exists(): return None
    s = json.loads(f.read_text())
    v, usual, peaks = pd.DataFrame(s['variants']), s['usual'], s['matmul_gflops']
    ref = s.get('reference')   # measurements older than the reference row have none
    # measurements older than per-recipe batch sizes ran every variant at the benchmark's one batch size
    rows = pd.DataFrame(
        [dict({'bs': s['bs']}, **r, network=f"normnets, {r['norm']} norm") for r in s['variants']]
        + ([dict({'bs': s['bs']}, **ref, network=f"reference, {ref['norm']} norm")] if ref else [])
        + [dict(usual, network=f"usual pipeline ({usual['params']:,}-parameter solution)")]
    )
    gflops = 6 * rows.macs * rows.train_ips / 1e9
    table = pd.DataFrame({
        'network': rows.network,
        'parameters': rows.params.map('{:,}'.format),
        'MACs / image': rows.macs.map(lambda m: f'{m / 1e6:.2f} M'),
        'precision': rows.precision,
        'batch size': rows.bs,
        'train images/s': rows.train_ips.map('{:.0f}'.format),
        'inference images/s': rows.infer_ips.map(lambda x: '' if pd.isna(x) else f'{x:.0f}'),
        'x usual': (rows.train_ips / usual['train_ips']).map('{:.2f}'.format),
        **({'x reference': (rows.train_ips / ref['train_ips']).map('{:.2f}'.format)} if ref else {}),
        'train GFLOP/s': gflops.map('{:.1f}'.format),
        'of the matmul peak in its precision': [
            f"{100 * g / peaks[p]:.0f}%" for g, p in zip(gflops, rows.precision)
        ],
    })
    floor = (
        f" The reference is normnets' network and recipe before the recipe search: every variant's training "
        f"images/s must stay at or above {ref['floor']}x its own, measured in the same run. Lowest here: "
        f"**{(v.train_ips / ref['train_ips']).min():.2f}x**." if ref else ''
    )
    as_run = dict(zip(v.norm, v.train_ips))
    c = pd.DataFrame(s['changes'])
    changes = pd.DataFrame(
        {
            'variant': c.norm.map(lambda n: f'{n} norm'),
            'change': c.change,
            'train images/s': [
                f'{x:.0f}' if pd.notna(x) else f'failed: {e}' for x, e in zip(c.train_ips, c.error)
            ],
            'as run': [f'{as_run[n]:.0f}' for n in c.norm],
            'relative to as run': [
                f'{x / as_run[n]:.2f}' if pd.notna(x) else '' for x, n in zip(c.train_ips, c.norm)
            ],
        }
    )
    prof = s['profile']
    ops = pd.DataFrame(prof['top_ops'])
    ops = pd.DataFrame(
        {
            'operator': ops.op.map(lambda o: f'`{o}`'),
            'calls': ops.calls,
            'ms / step': ops.ms_per_step.map('{:.2f}'.format),
            'share': ops.share.map(lambda x: pct(x, 1)),
        }
    )
    shares = ', '.join(f'{kind} {100 * x:.0f}%' for kind, x in prof['shares'].items())
    top = max(peaks, key=lambda p: p != 'fp32')   # the training precision's peak
    study = s['study']
    return (
        f"# Speed on {s['device_name']}\n\nWritten by `scripts/report.py` from `{f.name}` (measured by "
        f"`benchmarks/speed.py`): torch {s['torch']}, {s['threads']} torch threads, batch size {s['bs']}, "
        f"{s['steps']} timed training steps after {s['warmup']} of warm-up, all in one run. normnets trains "
        "in "
        f"{s['precision']} here.\n\nMatrix-multiply peak (4096 x 4096): "
        + ' and '.join(f"{p} **{g:.0f} GFLOP/s**" for p, g in peaks.items())
        + f". Projected study ({len(v)} variants x {study['epochs']} epochs x {study['seeds']} seeds, "
        f"evaluation included): **{study['seconds'] / 60:.1f} minutes**.{floor}\n\n"
        + markdown_table(table)
        + "\nEach row below changes one thing against a variant as run, measured the same way; the last row "
        "measures a variant as run once more, and its distance from 1.00 is the run's own noise.\n\n"
        + markdown_table(changes)
        + f"\n## Where the time goes\n\ntorch.profiler over {prof['steps']} training steps of the "
          f"{prof['norm']} "
        f"norm variant (self time, forward and backward together): {shares}; the rest is the optimizer, "
        "loss, "
        f"casts and data. The convolutions alone run at {prof['conv_gflops']:.0f} GFLOP/s, "
        f"{100 * prof['conv_gflops'] / peaks[top]:.0f}% of the {top} matmul peak.\n\n" + markdown_table(ops)
    )


def search_page(results: Path) -> str | None:
    "results/search.md from search.csv: each norm's best cells and every cell, by held-out accuracy."
    f = results / 'search.csv'
    if not f.exists(): return None
    df = pd.read_csv(f).sort_values(['stage', 'holdout_acc'], ascending=[True, False])
    cells = lambda d: markdown_table(pd.DataFrame({
        'norm': d.norm, 'stage': d.stage, 'layer order': d.net.map(layer_order), 'optimizer': d.opt,
        'peak lr': d.lr.map('{:g}'.format),
        'weight decay': d.wd.map('{:g}'.format), 'epochs': d.epochs, 'held-out acc %': d.holdout_acc.map(pct),
        'train acc %': d.train_acc.map(pct), 'train s': d.seconds.map('{:.0f}'.format)}))
    counts = ', '.join(
        f"{n} norm {c}" for n, c in df[df.stage == 'screen'].norm.value_counts(sort=False).items()
    )
    best = df.groupby(['norm', 'stage'], sort=False).head(1)
    return (
        f"# Recipe search\n\nWritten by `scripts/report.py` from `search.csv` (cells trained by "
        f"`benchmarks/search.py` on {df.device_name.iloc[0]}, seed {df.seed.iloc[0]}). Each cell trains on "
        "the training images but a held-out set and is scored on that set: the test set plays no part. Every "
        "cell has its norm's recipe but for the optimizer, peak lr and weight decay it tries. Screen cells "
        f"finished: {counts}.\n\n"
        f"![held-out accuracy against peak learning rate](search.png)\n\n## Best cell of each norm and stage"
        f"\n\n{cells(best)}\n## Every cell\n\n{cells(df)}"
    )


def search_markdown(results: Path, rel: str) -> str:
    """The recipe search in the README: each norm's chosen cell, how much its held-out accuracy moves across
    the learning rates, and each norm under the settings the other norms chose (screen cells)."""
    f = results / 'search.csv'
    if not f.exists(): return "_Not run yet: `python benchmarks/search.py`._\n"
    df = pd.read_csv(f)
    screen, confirm = df[df.stage == 'screen'], df[df.stage == 'confirm']
    norms = norm_order(screen.norm.unique())
    setting = lambda r: (r.opt, r.lr, r.wd)
    chosen = {n: (confirm if n in set(confirm.norm) else screen)[lambda d: d.norm == n]
              .sort_values('holdout_acc').iloc[-1] for n in norms}
    lines = []
    for n in norms:
        c = chosen[n]
        spreads = []
        for opt, g in screen[screen.norm == n].groupby('opt'):
            by_lr = g.groupby('lr').holdout_acc.max()   # each rate at its better weight decay
            spreads.append(f"{opt} {pct(by_lr.min())}-{pct(by_lr.max())}% over peak lr "
                           f"{by_lr.index.min():g}-{by_lr.index.max():g}")
        rates = screen[screen.opt == c.opt].lr
        edge = (f" Its rate is the {'largest' if c.lr == rates.max() else 'smallest'} searched for {c.opt}: "
                "the best may lie beyond." if c.lr in (rates.min(), rates.max()) else '')
        lines.append(f"- **{n} norm** chose {c.opt}, peak lr {c.lr:g}, weight decay {c.wd:g} "
                     f"({pct(c.holdout_acc)}% held-out after {c.epochs} epochs).{edge} "
                     f"Screen: {'; '.join(spreads)}.")
    settings = {}   # each chosen setting once, with the norms that chose it
    for m, c in chosen.items(): settings.setdefault(setting(c), []).append(m)
    in_grid = screen[['opt', 'lr', 'wd']].apply(tuple, axis=1)
    cross = pd.DataFrame({
        f"{opt} {lr:g} / {wd:g} ({', '.join(ms)})": [
            pct(screen[(screen.norm == n) & (in_grid == (opt, lr, wd))].holdout_acc.max()) for n in norms]
        for (opt, lr, wd), ms in settings.items()}, index=[f'{n} norm' for n in norms])
    screen_epochs = '/'.join(map(str, sorted(screen.epochs.unique())))
    return (
        f"![held-out accuracy against peak learning rate]({rel}/search.png)\n\n"
        f"On {df.device_name.iloc[0]}, seed {df.seed.iloc[0]}, scored on held-out training images: "
        f"{len(screen)} screen cells of {screen_epochs} epochs, then each norm's best "
        f"{confirm.groupby('norm').size().max() if len(confirm) else 0} at {MAX_EPOCHS} "
        f"([search.md]({rel}/search.md) has every cell).\n\n" + '\n'.join(lines)
        + f"\n\nEach norm (rows) under the optimizer, peak lr / weight decay that each norm chose (columns), "
          f"held-out accuracy % after {screen_epochs} epochs, with its own layer order:\n\n"
        + markdown_table(cross.reset_index(names='norm'))
    )


def study_page(results: Path) -> str | None:
    "results/study.md: every run of the study, and its accuracy per class."
    if not (results / 'runs.csv').exists(): return None
    return (
        "# The study, run by run\n\nWritten by `scripts/report.py` from `runs.csv` and `per_class.csv`. "
        "Every run:"
        "\n\n"
        + runs_markdown(pd.read_csv(results / 'runs.csv'))
        + "\n## Which classes each normalization gets "
        "wrong\n\n" + per_class_markdown(results)
    )


PAGES = {'study.md': study_page, 'ablation.md': ablation_page, 'precision.md': precision_page,
         'search.md': search_page, 'batch_size.md': batch_size_page, 'inference.md': inference_page,
         'speed.md': lambda results: speed_page(results / 'speed.json'),
         'gpu/speed.md': lambda results: speed_page(results / 'gpu' / 'speed.json')}


def pages(results: Path) -> dict:
    "Every page under results/ that its data allows: {file name: text}."
    return {name: text for name, make in PAGES.items() if (text := make(results)) is not None}


# ---------------------------------------------------------------- on a GPU

# The time the whole study should take on a datacenter GPU (H100 class), evaluation included.
GPU_STUDY_GOAL_SECONDS = 60


def gpu_time_markdown(gpu: Path, rel: str) -> str:
    "How long the study took on the GPU against the goal, and what bounds a step (from speed.json)."
    text = ''
    if (gpu / 'parallel_study.json').exists():
        p = json.loads((gpu / 'parallel_study.json').read_text())
        text += (f" With {p['processes']} processes at once on the one GPU ({p['runs_per_process']} runs "
                 f"each), the study took **{p['wall_seconds']:.0f} s** from the first start to the last "
                 f"finish; the goal is {GPU_STUDY_GOAL_SECONDS} s.")
    if not (gpu / 'speed.json').exists(): return text
    s = json.loads((gpu / 'speed.json').read_text())
    one, bs = s['variants'][0], s['bs']
    peak_share = 6 * one['macs'] * one['train_ips'] / 1e9 / s['matmul_gflops'][one['precision']]
    text += (f" One run alone trains {one['train_ips']:.0f} images/s, "
             f"{1000 * bs / one['train_ips']:.1f} ms a step of {bs} images, {100 * peak_share:.2f}% of the "
             f"GPU's {one['precision']} matmul peak.")
    double = [c['train_ips'] for c in s['changes'] if c['change'] == f"batch size {2 * bs}"]
    if double:
        text += (f" At batch size {2 * bs} it trains {double[0]:.0f} images/s, "
                 f"{1000 * 2 * bs / double[0]:.1f} ms a step: a step's time hardly depends on its images. "
                 "It goes to launching the step's many small kernels from Python, not to arithmetic "
                 f"([gpu/speed.md]({rel}/gpu/speed.md) has the profile).")
    return text


def gpu_markdown(results: Path, rel: str) -> str:
    """The study on a GPU (results/gpu/): its time, table and figure, and each variant beside its CPU run
    where both ran the same recipe (the CPU study's results/summary.csv and runs.csv)."""
    gpu = results / 'gpu'
    if not (gpu / 'summary.csv').exists():
        return "_Not run yet: `python scripts/run_all.py --out results/gpu` on a GPU._\n"
    summary, runs = pd.read_csv(gpu / 'summary.csv'), pd.read_csv(gpu / 'runs.csv')
    text = (f"{len(runs)} runs ({runs.norm.nunique()} variants x {runs.seed.nunique()} seeds) on "
            f"{runs.device_name.iloc[0]}, {runs.precision.iloc[0]}, torch {runs.torch.iloc[0]}."
            + gpu_time_markdown(gpu, rel))
    cpu = pd.read_csv(results / 'summary.csv').set_index('norm')
    cpu_first, gpu_first = (pd.read_csv(d / 'runs.csv').groupby('norm').first() for d in (results, gpu))
    lines = []
    for _, g in summary.iterrows():
        line = (f"- **{g.norm} norm**: test {mean_std(g.test_acc, g.test_acc_std)}% "
                f"(train {pct(g.train_acc)}%, with flip TTA {pct(g.tta_test_acc)}%), {g.seconds:.0f} s a run")
        if g.norm not in cpu.index: line += '; no CPU run.'
        elif recorded_recipe(cpu_first.loc[g.norm]) != recorded_recipe(gpu_first.loc[g.norm]):
            line += (f"; the CPU study's {pct(cpu.loc[g.norm].test_acc)}% is from another recipe (see "
                     "Training): they do not compare.")
        else:
            c = cpu.loc[g.norm]
            gap = g.test_acc - c.test_acc
            within = 'within' if abs(gap) <= c.test_acc_std else 'outside'
            line += (f"; {mean_std(c.test_acc, c.test_acc_std)}% on the CPU ({100 * gap:+.2f} points, "
                     f"{within} the CPU seeds' spread).")
        lines.append(line)
    return (text + f" Mean ± standard deviation over seeds ([gpu/summary.md]({rel}/gpu/summary.md) has the "
            "table):\n\n" + '\n'.join(lines) + f"\n\n![comparison on the GPU]({rel}/gpu/comparison.png)\n")


# ---------------------------------------------------------------- the README's regions

def regions(results: Path, readme_dir: Path) -> dict:
    "Every generated region of the README, from the files in `results` (linked relative to `readme_dir`)."
    results = Path(results)
    rel = Path(results).resolve().relative_to(Path(readme_dir).resolve()).as_posix()
    summary, runs = pd.read_csv(results / 'summary.csv'), pd.read_csv(results / 'runs.csv')
    histories = {n: pd.read_csv(results / n / 'history.csv') for n in summary.norm}
    links = ', '.join(f"[{name}]({rel}/{name})" for name in pages(results))
    return {
        'max_epochs': str(MAX_EPOCHS),
        'param_limit': f'{PARAM_LIMIT:,}',
        'pass_accuracy': f'{PASS_ACCURACY:.0%}',
        'n_norms': str(sum(n.exercise for n in NORMS.values())),
        'norm_names': ', '.join(f'{n.name} ({n.alias})' for n in NORMS.values() if n.exercise),
        'extra_norms': '; '.join(f'{n.name} ({n.alias}), {n.over}' for n in NORMS.values() if not n.exercise),
        'provenance': provenance(runs),
        'architecture': '\n' + architecture_markdown(),
        'recipes': '\n' + recipes_markdown(runs),
        'summary': '\n' + summary_markdown(summary, missing=[n for n in NORMS if n not in set(summary.norm)]),
        'findings': '\n' + findings_markdown(summary, histories),
        'gn_groups': str(GN_GROUPS),
        'figures': '\n' + figures_markdown(summary, rel),
        'comparison': f'![comparison]({rel}/comparison.png)',
        'batch_size': '\n' + batch_size_markdown(results, rel),
        'inference': '\n' + inference_markdown(results, rel),
        'ablation': '\n' + ablation_markdown(results, rel),
        'gpu': '\n' + gpu_markdown(results, rel),
        'search': '\n' + search_markdown(results, rel),
        'pages': links,
    }


def fill(text: str, values: dict) -> str:
    "`text` with every region's body replaced by its value; a region with no value is an error."
    unknown = sorted({m['name'] for m in REGION.finditer(text)} - set(values))
    if unknown: raise KeyError(f"README regions with no generator: {', '.join(unknown)}")
    return REGION.sub(lambda m: f"<!--g:{m['name']}-->{values[m['name']]}<!--/g-->", text)


def stale(results: Path, readme: Path) -> list[str]:
    "What the files no longer match: README regions and pages under results/ (empty when all is current)."
    results, readme = Path(results), Path(readme)
    text, values = readme.read_text(), regions(results, readme.parent)
    out = [f"README region {m['name']!r}" for m in REGION.finditer(text) if m['body'] != values[m['name']]]
    out += [f"{results / name}" for name, page in pages(results).items()
            if not (results / name).exists() or (results / name).read_text() != page]
    return out


def write_report(results: Path, readme: Path) -> list[Path]:
    """Fill the README's regions and write the pages under results/; returns what was written. Everything is
    computed before anything is written, so that result files that contradict each other change nothing."""
    results, readme = Path(results), Path(readme)
    text, named = fill(readme.read_text(), regions(results, readme.parent)), pages(results)
    readme.write_text(text)
    for name, page in named.items(): (results / name).write_text(page)
    return [readme, *(results / name for name in named)]
