"""The README's generated regions: the study's results, conclusions, network, recipes and figures, and the
links to the pages under results/ (`normnets_pages`).

README.md is written by people. Its numbers live in generated regions between markers,

    <!--g:name-->...<!--/g-->

which `fill` rewrites from `regions(results)`. `stale` lists the regions and pages that no longer match the
files, for `scripts/report.py --check` and the tests. Values are tables; the few sentences are the study's
conclusions (`conclusions`), each from the findings table.
"""
import math, os, re, tempfile
from pathlib import Path

import pandas as pd
import torch

from normnets import NORMS, MAX_EPOCHS, PARAM_LIMIT, PASS_ACCURACY, WIDTHS
from normnets import normnet, count_params, count_macs
from normnets_files import FolderError, locked, read_csv, read_json, readable_mode
from normnets_recipes import recipe
from normnets_pages import (BAR, PAGES, batch_norm_behind, batch_size_grid, layer_order, md, mean_std, num,
                            pages, pct, provenance, read, recipes_markdown, spread)

__all__ = ['summary_markdown', 'conclusions', 'regions', 'fill', 'problems', 'stale', 'write_report']

REGION = re.compile(r'<!--g:(?P<name>[\w-]+)-->(?P<body>.*?)<!--/g-->', re.S)


# ---------------------------------------------------------------- the study

def results_table(summary: pd.DataFrame) -> pd.DataFrame:
    "A row a norm: parameters, test and train accuracy (mean ± std over seeds), epochs to 70%, seconds."
    return pd.DataFrame({
        'norm': summary.norm, 'parameters': summary.params.map('{:,}'.format), 'seeds': summary.seeds,
        'test acc %': spread(summary, 'test_acc'), 'train acc %': spread(summary, 'train_acc'),
        'test acc % with flip TTA': summary.tta_test_acc.map(pct),
        f'epochs to {BAR}': summary.epochs_to_70.map(lambda e: num(round(e, 1) if pd.notna(e) else e)),
        'train s a run': summary.seconds.map('{:.0f}'.format)})


def summary_markdown(summary: pd.DataFrame, missing=(), others=(), damaged=()) -> str:
    "summary.md: the results table, its device and data, and the runs that are missing, foreign or damaged."
    text = md(results_table(summary))
    if len(summary):
        text += (f"\nDevice: {summary.device_name.iloc[0]}. Data: {summary.data.iloc[0]} "
                 f"(md5 `{summary.data_md5.iloc[0]}`).\n")
    if missing: text += f"\n**Missing (not finished): {', '.join(missing)}.**\n"
    if others: text += f"\nRuns in this folder of other recipes, not in this study: {', '.join(others)}.\n"
    if damaged: text += f"\n**Runs left out, a file missing or unreadable:** {'; '.join(damaged)}.\n"
    return text


def conclusions(f: pd.DataFrame, device: str, batch_sizes: str = '') -> str:
    """The study's conclusions, each a sentence of values from the findings table `f` (indexed by norm), and
    `batch_sizes`: the batch-size grid's (`batch_norm_behind`), where there is one."""
    exercise = [n for n in f.index if NORMS[n].exercise]
    order = f.test_acc[exercise].sort_values(ascending=False).index
    best, rest = order[0], order[1:]
    acc = lambda n: f"{mean_std(f.test_acc[n], f.test_acc_std[n])}%"
    lines = [f"**{best.capitalize()} norm is the most accurate**: {acc(best)} test accuracy, "
             + ', '.join(f"{pct(f.test_acc[best] - f.test_acc[n])} points above {n} norm ({acc(n)})"
                         for n in rest) + '.']
    if len(rest) == 2:
        a, b = rest
        within = abs(f.test_acc[a] - f.test_acc[b]) <= max(f.test_acc_std[a], f.test_acc_std[b])
        lines.append(f"{a.capitalize()} and {b} norm are {pct(f.test_acc[a] - f.test_acc[b])} points apart, "
                     f"{'within' if within else 'outside'} their seeds' spread.")
    below = [f'{n} norm' for n in f.index if f.test_acc[n] <= PASS_ACCURACY]
    passed = [n for n in f.index if pd.notna(f.epochs_to_70[n])]
    lines.append(("Every variant passes" if not below else f"{', '.join(below)} stay below") + f" {BAR}"
                 + ('; epochs to first pass it (mean over seeds): ' if passed else '')
                 + ', '.join(f"{n} norm {num(round(f.epochs_to_70[n], 1))}" for n in passed) + '.')
    extras = [n for n in f.index if pd.notna(f.gain_over_base[n])]
    if extras:
        lines.append("Beyond the exercise, " + '; '.join(
            f"{n} norm scores {100 * f.gain_over_base[n]:+.2f} points on {NORMS[n].base} norm"
            + (f", {pct(f.gap_closed[n], 0)}% of its gap to {best} norm" if pd.notna(f.gap_closed[n]) else '')
            for n in extras) + '.')
    fast, slow = f.seconds_per_epoch.idxmin(), f.seconds_per_epoch.idxmax()
    lines.append(f"An epoch takes {f.seconds_per_epoch[fast]:.1f} s ({fast} norm) to "
                 f"{f.seconds_per_epoch[slow]:.1f} s ({slow} norm) on {device}.")
    if batch_sizes: lines.append(batch_sizes)
    return ''.join(f"- {line}\n" for line in lines)


def batch_sizes_line(results: Path, rel: str) -> str:
    """Where batch norm falls behind in the batch-size grid, or that it does not (the batch-size page's line,
    linked to it as `rel`/batch_size.md)."""
    df = read(results / 'batch_size.csv')
    line = '' if df is None else batch_norm_behind(batch_size_grid(df))
    return f"[By training batch size]({rel}/batch_size.md): {line[0].lower()}{line[1:]}" if line else ''


def describe_layer(name, m) -> str:
    if name == 'gap': return 'global average pool'
    if name == 'C10': return f'1x1 conv {m.in_channels} -> {m.out_channels} (logits)'
    conv, k = m[0], m[0].kernel_size[0]
    pool = ', 2x2 max-pool' if any(isinstance(layer, torch.nn.MaxPool2d) for layer in m) else ''
    skip = f" (+ output of C{int(name[1]) - 2})" if name in ('C5', 'C9') else ''
    return f'{k}x{k} conv {conv.in_channels} -> {conv.out_channels}{pool}, norm, ReLU{skip}'


def architecture_markdown() -> str:
    """The layer table of the default network (output shape and parameters of each layer) and, per norm, what
    it normalizes and its network as its recipe builds it: widths changed, parameters, MACs."""
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
            'variant': f'{n.name} norm ({n.alias})', 'normalizes': n.over, 'layer order': layer_order(r.net),
            'widths (recipe)': ', '.join(f'{k}={v}' for k, v in widths.items()) or 'as above',
            'parameters': f'{count_params(net):,}', 'MACs / image': f'{count_macs(net) / 1e6:.2f} M'})
    return md(layers) + '\n' + md(pd.DataFrame(variants))


def figures_markdown(summary: pd.DataFrame, rel: str) -> str:
    return md(pd.DataFrame({'variant': summary.norm.map(lambda n: f'{n} norm'),
                            'curves': [f'![{n} norm curves]({rel}/{n}/curves.png)' for n in summary.norm],
                            'misclassified': [f'![{n} norm misclassified]({rel}/{n}/misclassified.png)'
                                              for n in summary.norm]}))


# ---------------------------------------------------------------- the README's regions

def regions(results: Path, readme_dir: Path) -> dict:
    "Every generated region of the README, from the files in `results` (linked relative to `readme_dir`)."
    results = Path(results)
    rel = Path(os.path.relpath(results.resolve(), Path(readme_dir).resolve())).as_posix()
    summary, runs = read_csv(results / 'summary.csv'), read_csv(results / 'runs.csv')
    findings = read_csv(results / 'findings.csv').set_index('norm')
    links = pd.DataFrame([{'page': f'[{title}]({rel}/{name})', 'what': what}
                          for name, (title, what, _) in PAGES.items() if name in pages(results)])
    return {
        'param_limit': f'{PARAM_LIMIT:,}', 'max_epochs': str(MAX_EPOCHS),
        'results': '\n' + md(results_table(summary)) + f'\n{provenance(runs)}\n\n'
                   f'![test accuracy and loss of each variant by epoch]({rel}/comparison.png)\n',
        'conclusions': '\n' + conclusions(findings, summary.device_name.iloc[0],
                                           batch_sizes_line(results, rel)),
        'architecture': '\n' + architecture_markdown(),
        'recipes': '\n' + recipes_markdown(runs),
        'figures': '\n' + figures_markdown(summary, rel),
        'pages': '\n' + md(links),
    }


MARKER = re.compile(r'<!--g:(?P<name>[\w-]+)-->|<!--/g-->')


def marker_problems(text: str, names) -> list[str]:
    """What is wrong with the README's region markers: an opening marker without its close (or a close
    without its opening), a region given twice, a region of `names` missing, a region with no generator. A
    README whose markers do not pair up would have text between two regions replaced."""
    problems, seen, open_name = [], [], None
    for m in MARKER.finditer(text):
        if m['name'] and open_name:
            problems.append(f"region {open_name!r} is not closed before {m['name']!r}")
        elif not m['name'] and not open_name: problems.append("a <!--/g--> closes no region")
        if m['name']: seen.append(m['name'])
        open_name = m['name']
    if open_name: problems.append(f"region {open_name!r} is not closed")
    problems += [f"region {n!r} given twice" for n in sorted({n for n in seen if seen.count(n) > 1})]
    problems += [f"region {n!r} missing (<!--g:{n}--><!--/g--> where it belongs)" for n in names
                 if n not in seen]
    problems += [f"region {n!r} has no generator" for n in sorted(set(seen) - set(names))]
    return problems


def fill(text: str, values: dict) -> str:
    "`text` with every region's body replaced by its value; markers that do not pair up are an error."
    problems = marker_problems(text, values)
    if problems: raise FolderError(f"README markers: {'; '.join(problems)} ({BY_HAND})")
    return REGION.sub(lambda m: f"<!--g:{m['name']}-->{values[m['name']]}<!--/g-->", text)


LINK = re.compile(r'\]\((?P<target>[^)\s#]+)\)')


def broken_links(text: str, folder: Path, written=()) -> list[str]:
    """The files that the Markdown links of `text` (relative to `folder`) point to and that neither exist nor
    are about to be `written`."""
    targets = {m['target'] for m in LINK.finditer(text) if '://' not in m['target']}
    written = {Path(f).resolve() for f in written}
    return sorted(t for t in targets if not (Path(folder) / t).exists()
                  and (Path(folder) / t).resolve() not in written)


# What fixes each kind of problem that `problems` finds.
REWRITE = 'python scripts/report.py rewrites them'
BY_HAND = 'fix the markers in README.md by hand'
RESTORE = 'restore them (git checkout -- FILE) or run again what writes them'
SUMMARIZE = "summarize the study again from its runs: python scripts/run_all.py --resume"


def runs_disagreeing(results: Path) -> list[str]:
    """The study's runs in runs.csv, which its tables are made of, whose own metrics.json now says otherwise
    (a run trained again since, by train.py say) or is gone."""
    out = []
    for row in read_csv(results / 'runs.csv').to_dict('records'):
        f = results / row['run'] / 'metrics.json'
        if not f.exists(): out.append(f"{row['run']} is in runs.csv, but its metrics.json is gone"); continue
        m = read_json(f)
        differ = [k for k in ('seed', 'epochs', 'train_acc', 'test_acc')
                  if not isinstance(m.get(k), (int, float)) or not math.isclose(m[k], row[k], rel_tol=1e-6)]
        out += [f"{f} says {k} {m.get(k)}, runs.csv {row[k]}" for k in differ[:1]]
    return out


def problems(results: Path, readme: Path, written=(), values: dict | None = None,
             named: dict | None = None) -> list[tuple[str, str]]:
    """(what, what fixes it) for everything the files no longer match: runs that disagree with the tables
    made of them, broken region markers, README regions and pages under results/, and figures or pages that
    the regions or pages link to and that do not exist, nor are about to be `written` (empty when all is
    current). `values` and `named`: the regions and pages, where the caller has made them already."""
    results, readme = Path(results), Path(readme)
    out = [(what, SUMMARIZE) for what in runs_disagreeing(results)]
    text = readme.read_text()
    values = regions(results, readme.parent) if values is None else values
    out += [(f"README markers: {problem}", BY_HAND) for problem in marker_problems(text, values)]
    if not out:
        out += [(f"README region {m['name']!r}", REWRITE) for m in REGION.finditer(text)
                if m['body'] != values[m['name']]]
    named = pages(results) if named is None else named
    out += [(f"{results / name}", REWRITE) for name, page in named.items()
            if not (results / name).is_file() or (results / name).read_text() != page]
    out += [(f"README links to {t}, which does not exist", RESTORE)
            for t in broken_links(''.join(values.values()), readme.parent, written)]
    out += [(f"{results / name} links to {t}, which does not exist", RESTORE)
            for name, page in named.items() for t in broken_links(page, results, written)]
    return out


def stale(results: Path, readme: Path) -> list[str]:
    "What `problems` finds, without what fixes it."
    return [what for what, _ in problems(results, readme)]


def said(found: list[tuple[str, str]]) -> str:
    "`problems`' findings in one line, grouped by what fixes them."
    fixes = dict.fromkeys(fix for _, fix in found)
    return '; '.join(f"{', '.join(what for what, f in found if f == fix)} ({fix})" for fix in fixes)


def write_all(files: dict):
    """Write {path: text} all or nothing: every text to a temporary file beside its path first, then each
    renamed over its path. A file that cannot be written (read-only, immutable, a full disk) is named, and
    none of them is changed."""
    written = {}
    try:
        for path, text in files.items():
            try:
                if path.exists():   # the file itself can be written: not read-only or immutable
                    with open(path, 'a'): pass
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}-', suffix='.tmp')
                written[path] = tmp
                with os.fdopen(fd, 'w') as f: f.write(text)
                readable_mode(tmp, 0o666)
            except OSError as e:
                raise FolderError(f"cannot write {path} ({e.strerror or e}): nothing was written") from e
        for path, tmp in written.items(): os.replace(tmp, path)
    finally:
        for tmp in written.values():
            if os.path.exists(tmp): os.remove(tmp)


def write_report(results: Path, readme: Path) -> list[Path]:
    """Fill the README's regions and write the pages under results/, holding results/ as a study does; returns
    what was written. Everything is computed and checked before anything is written, and then written all or
    nothing (`write_all`): result files that contradict each other or their runs, broken region markers,
    or figures that the pages would link to and that are missing change nothing."""
    results, readme = Path(results), Path(readme)
    with locked(results, elsewhere=''):
        values, named = regions(results, readme.parent), pages(results)
        files = {readme: fill(readme.read_text(), values),
                 **{results / name: page for name, page in named.items()}}
        blocking = [(what, fix) for what, fix in problems(results, readme, files, values, named)
                    if fix != REWRITE]
        if blocking: raise FolderError(f"nothing written: {said(blocking)}")
        write_all(files)
    return list(files)
