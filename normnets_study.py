"""The study: every registered normalization trained with its recipe on the same data and seeds, and its
summary.

The summary is written from the finished runs in the study's folder, never from memory: a study interrupted at
any point (Ctrl-C, a kill) leaves a summary of every finished run that belongs to it, and runs of other
recipes in the same folder are named, not mixed in. One writer at a time: the folder is locked while a study
writes to it.
"""
import contextlib, dataclasses, json, multiprocessing, os, signal, threading, time, warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import pandas as pd
import torch
from fastai.learner import load_learner

from normnets import NORMS, architecture_id
from normnets_cli import StudyError, check_jobs, parse_norms
from normnets_data import REPO_DIR, find_data, load_cifar
from normnets_device import device_name, machine_kind
from normnets_files import FolderError, check_out, check_run_dirs, damaged, locked, read_csv, read_json
from normnets_recipes import HARDWARE_FIELDS, STUDY_SEEDS, TRAINING_FIELDS, Recipe, recipe, recorded_recipe
from normnets_learner import FirstStepsEstimate, normnet_learner
from normnets_runs import batch_statistics_accuracy, recipe_dls, train_run
from normnets_fused import fusable_groups, fuse_by_default, train_fused
from normnets_cluster import Cluster, connect, run_on_cluster
import normnets_plots as plots
import normnets_report as report

__all__ = ['STUDY_FILES', 'JOBS_AT_ONCE', 'JOBS_AT_ONCE_SMALL_BATCHES', 'SMALL_BATCH', 'COMMITTED',
           'quick_options', 'check_committed', 'how_to_train', 'run_dir', 'kept_run', 'plan_frame',
           'study_batch_statistics', 'find_runs', 'join_cluster', 'findings_frame', 'summarize', 'run_plan',
           'run_parallel', 'run_fused', 'run_study']

# What a study writes into its folder beside the runs' folders (`summarize`, `run_study`).
STUDY_FILES = ('runs.csv', 'summary.csv', 'findings.csv', 'summary.md', 'per_class.csv', 'comparison.png',
               'study.json')
SUMMARY_COLUMNS = ['norm', 'params', 'epochs', 'seeds', 'train_acc', 'train_acc_std', 'best_test_acc',
                   'test_acc', 'test_acc_std', 'tta_test_acc', 'train_loss', 'test_loss', 'epochs_to_70',
                   'seconds', 'device_name', 'data', 'data_md5']


# Runs trained at once, a process each, where the command leaves it to normnets (no --jobs), by kind of
# machine (`machine_kind`). One small run leaves a GPU idle for most of each step: on an NVIDIA H200
# (../shared/gpu-results, each process replaying its captured step, group norm, batch 128) 1 process trained
# 78,500 images/s, 4 processes 114,000 in all, 8: 109,000, 15: 91,000. Each process drives the GPU from a CPU
# core of its own: at most one a core (a free notebook's GPU has 2). Neither does one run keep the 2 threads
# of an Intel Xeon with AMX busy: 2 runs at once, a process and a thread each, trained 2.03x the images/s of
# one run alone in batch norm, 0.95x in group norm (results/speed-amx.md); at full length (bf16, 20 epochs,
# seed 0) batch and group norm took 808 and 1092 s side by side against 743 and 704 s one after the other,
# and the three exercise norms 1810 s of wall time against 2053 s. Other CPUs, unmeasured, train one run at a
# time (or fused, `fuse_by_default`). speed.py's "runs at once" rows measure it.
JOBS_AT_ONCE = {'cuda': 4, 'cpu-amx': 2}


# At small batch sizes a run leaves a CPU's 2 threads idle between its small kernels: on the AMD EPYC with
# AVX512-BF16, 2 runs at once, a process and a thread each, trained 1.86x (batch norm) and 1.62x (group norm)
# the images/s of one run of 2 threads at batch size 8 in float32, the batch-size grid's precision, and 1.17x
# and 1.19x at 32 (results/speed-bf16.md, the medians of 3 rounds). There, runs of at most `SMALL_BATCH`
# images a batch train 2 at once.
JOBS_AT_ONCE_SMALL_BATCHES = {'cpu-bf16': 2}
SMALL_BATCH = 32


def how_to_train(r: Recipe, jobs: int | None = None, fuse: bool | None = None) -> tuple[int, bool | None]:
    """How a plan of runs like recipe `r` trains: (runs at once, fused), `jobs` and `fuse` as the command
    gave them, or where it left them to normnets (None), as measured fastest on this kind of machine:
    `JOBS_AT_ONCE` processes (`JOBS_AT_ONCE_SMALL_BATCHES` for small batches); else fused None, for
    `run_plan`: the runs whose variant measured faster fused (`fuse_by_default`) as one network, the others
    one at a time. Refused: a bad `jobs`, fused with jobs."""
    check_jobs(jobs, fuse)
    if jobs is None:
        kind = machine_kind(r.device)
        small = r.bs <= SMALL_BATCH and kind in JOBS_AT_ONCE_SMALL_BATCHES
        jobs = 1 if fuse else min((JOBS_AT_ONCE_SMALL_BATCHES if small else JOBS_AT_ONCE).get(kind, 1),
                                  os.cpu_count())
    return jobs, False if jobs > 1 else fuse


# The results this clone commits: the study the README reports, and every page and grid beside it.
COMMITTED = REPO_DIR / 'results'


def quick_options(norms, given: dict) -> dict:
    """The options of `given` ({recipe field: value}) that make a run of a norm of `norms` other than today's
    recipe at full length: a quick check's fewer epochs or subsets, another batch size or lr. How it runs
    (HARDWARE_FIELDS, reproducibility) and its seed leave it today's recipe."""
    return {k: v for k, v in given.items() if k not in (*HARDWARE_FIELDS, 'reproducible', 'seed')
            and any(getattr(recipe(n), k) != v for n in norms)}


def check_committed(out: Path, quick: dict, replace: bool = False):
    """Refuse, before any work, runs of other than today's recipes at full length (`quick`, {option: value},
    from `quick_options`) into the committed results (`COMMITTED` or a folder inside it), unless the command
    says so (--replace-results): a user's first quick check would replace the study the README reports."""
    out, committed = Path(out).resolve(), COMMITTED.resolve()
    if not quick or replace or not (out == committed or committed in out.parents): return
    given = ' '.join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    raise StudyError(f"{out} holds the committed results, which only today's recipes at full length replace: "
                     f"give this check ({given}) a folder of its own with --out (--out /tmp/quick), or pass "
                     "--replace-results to replace them")


def run_dir(out: Path, norm: str, seed: int) -> Path:
    """Where a run of the study lives: <out>/<norm>/ for seed 0, <out>/seeds/<norm>-seed<k>/ for every other
    seed, whichever seed a command starts from (so that no seed's run takes another's folder)."""
    return out / norm if seed == 0 else out / 'seeds' / f'{norm}-seed{seed}'


def _matches(metrics: dict, r: Recipe) -> bool:
    return recorded_recipe(metrics) == r.to_dict() and metrics.get('arch') == architecture_id(r.model())


def kept_run(d: Path, r: Recipe) -> dict | None:
    """The metrics of the finished run in `d`, if it is of exactly this recipe and network and whole (every
    file it wrote there and readable): what --resume keeps."""
    if not (Path(d) / 'metrics.json').exists() or damaged(d): return None
    m = read_json(Path(d) / 'metrics.json')
    return m if _matches(m, r) else None


def hardware_only(d: Path, r: Recipe) -> dict:
    """{field: (recorded, asked)} where the whole run in `d` differs from recipe `r` in HARDWARE_FIELDS alone
    (a run of another machine); {} where it is of `r`, differs in more, or is not whole."""
    if not (Path(d) / 'metrics.json').exists() or damaged(d): return {}
    m = read_json(Path(d) / 'metrics.json')
    recorded, asked = recorded_recipe(m), r.to_dict()
    differ = {k: (recorded[k], v) for k, v in asked.items() if recorded[k] != v}
    same_net = m.get('arch') == architecture_id(r.model())
    return differ if differ and set(differ) <= set(HARDWARE_FIELDS) and same_net else {}


def refuse_replacing_other_hardware(plan: list, kept: list, chosen=()):
    """With --resume, refuse to train again, unasked, whole runs that differ from their recipe only in the
    hardware fields not `chosen` on the command line (a committed fp32 study on a CPU where 'auto' is bf16):
    say which field differs and what to pass to keep them."""
    found = [(d, differ) for (_, r, d), m in zip(plan, kept) if m is None
             for differ in [{k: v for k, v in hardware_only(d, r).items() if k not in chosen}] if differ]
    if not found: return
    fields = {k: v for _, differ in found for k, v in differ.items()}
    said = ', '.join(f"{k} {old} (this command: {new})" for k, (old, new) in fields.items())
    keep = ' '.join(f"--{k} {old}" for k, (old, _) in fields.items())
    raise StudyError(f"{len(found)} finished run(s) would be trained again that differ only in how they "
                     f"ran: {said}, e.g. {found[0][0]}. Pass {keep} to keep them, or pass that option with "
                     "the new value to train them again")


def plan_frame(plan: list, out: Path, scores: tuple = ()) -> pd.DataFrame:
    """One row per finished run of `plan` ((title, recipe, folder) triples): its norm, the recipe's
    TRAINING_FIELDS ('net' as JSON) and seed, its accuracies and the metrics named in `scores`, seconds,
    device and data, and its folder in the results folder `out`."""
    rows = []
    for _, r, d in plan:
        m = kept_run(d, r)
        if m:
            recipe_fields = {k: json.dumps(r.net) if k == 'net' else getattr(r, k) for k in TRAINING_FIELDS}
            rows.append({'norm': r.norm, **recipe_fields, 'seed': r.seed,
                         'train_acc': m['train_acc'], 'test_acc': m['test_acc'],
                         **{k: m.get(k) for k in scores}, 'seconds': m['seconds'],
                         'device_name': m['device_name'], 'data_md5': m['data_md5'],
                         'run': d.relative_to(out).as_posix()})
    return pd.DataFrame(rows)


def study_batch_statistics(plan: list, out: Path, cifar) -> pd.DataFrame:
    """`plan_frame` of `plan`, the study's runs as cells of the batch-size grid, with batch norm's test
    accuracy with each test batch's statistics (`batch_statistics_accuracy`) where a run did not record it
    (the study's runs are from before that score): from the run's model.pkl, once, since a value of
    <out>/batch_size.csv for the same run and data is kept."""
    cells = plan_frame(plan, out, scores=('batch_stats_test_acc',))
    if not len(cells): return cells
    cells = cells.astype({'batch_stats_test_acc': float})
    runs = {d.relative_to(out).as_posix(): (r, d) for _, r, d in plan}
    f = out / 'batch_size.csv'
    earlier = read_csv(f).set_index(['run', 'data_md5']).batch_stats_test_acc if f.exists() else pd.Series()
    for i, c in cells[cells.batch_stats_test_acc.isna()].iterrows():
        cells.loc[i, 'batch_stats_test_acc'] = earlier.get((c.run, c.data_md5), float('nan'))
        r, d = runs[c.run]
        if pd.notna(cells.loc[i, 'batch_stats_test_acc']) or not (d / 'model.pkl').exists(): continue
        with warnings.catch_warnings():   # fastai's about pickle, once a file: these are the study's own
            warnings.filterwarnings('ignore', message='load_learner` uses Python')
            trained = load_learner(d / 'model.pkl').model.state_dict()
        learn = normnet_learner(recipe_dls(r, cifar=cifar), r)   # the run's test images, as it scored them
        learn.model.load_state_dict(trained)
        cells.loc[i, 'batch_stats_test_acc'] = batch_statistics_accuracy(learn, r.bs)
    return cells


def find_runs(out: Path, overrides: dict) -> tuple[list, list, list]:
    """Every run in `out` (its <norm>/ and seeds/*/ folders): the whole ones of this study, whose recipe is
    their norm's recipe with these `overrides` at their seed; the whole ones of other recipes; and the damaged
    ones, as 'folder (what is wrong)'."""
    ours, others, broken = [], [], []
    for f in sorted([*Path(out).glob('*/metrics.json'), *Path(out).glob('seeds/*/metrics.json')]):
        run = f.parent.relative_to(out).as_posix()
        problem = damaged(f.parent)
        if problem: broken.append(f"{run} ({problem})"); continue
        m = read_json(f)
        m['run'] = run
        try: expected = recipe(m.get('norm'), **{**overrides, 'seed': m.get('seed')})
        except (ValueError, TypeError): expected = None   # a norm not registered here, or a foreign file
        (ours if expected is not None and _matches(m, expected) else others).append(m)
    order = list(NORMS)
    ours.sort(key=lambda m: (order.index(m['norm']), m['seed']))
    return ours, others, broken


def findings_frame(summary: pd.DataFrame, histories: dict) -> pd.DataFrame:
    """The study's findings, a row a norm: accuracy, convergence (epochs to 70%, accuracy after epoch 5),
    stability (the largest fall between epochs), generalization (train minus test), cost (seconds an epoch)
    and, for a variant beyond the exercise, its gain over the exercise norm it changes and the share of that
    norm's gap to the best exercise norm it closes. Epoch-by-epoch values are the first seed's
    (`histories`)."""
    s = summary.set_index('norm')
    exercise = [n for n in s.index if n in NORMS and NORMS[n].exercise]
    best = s.test_acc[exercise].idxmax() if exercise else None
    rows = []
    for n, h in histories.items():
        fall, base = -h.test_acc.diff(), NORMS[n].base if n in NORMS else None
        gain = s.test_acc[n] - s.test_acc[base] if base in s.index else None
        gap = s.test_acc[best] - s.test_acc[base] if gain is not None else 0
        rows.append(dict(
            norm=n, test_acc=s.test_acc[n], test_acc_std=s.test_acc_std[n], train_acc=s.train_acc[n],
            train_minus_test=s.train_acc[n] - s.test_acc[n], epochs_to_70=s.epochs_to_70[n],
            test_acc_epoch_5=h.test_acc.iloc[min(5, len(h)) - 1],
            largest_drop=max(fall.max(), 0) if len(h) > 1 else 0.,
            largest_drop_epoch=int(h.epoch[fall.idxmax()]) if len(h) > 1 and fall.max() > 0 else None,
            seconds_per_epoch=s.seconds[n] / s.epochs[n], gain_over_base=gain,
            gap_closed=gain / gap if gain is not None and base != best and gap > 0 else None))
    return pd.DataFrame(rows)


def summarize(out: Path, overrides: dict, plan: list = ()) -> tuple[pd.DataFrame | None, list]:
    """Write runs.csv, summary.csv, findings.csv, summary.md, per_class.csv and comparison.png from the
    study's whole runs in `out`; name the runs of `plan` ((seed, norm) pairs) that are missing, and the
    damaged runs (a file missing or unreadable), which are left out. Everything is read before anything is
    written. With no whole run of the study, the folder's files are left as they are."""
    runs, others, broken = find_runs(out, overrides)
    done = {(m['seed'], m['norm']) for m in runs}
    missing = [f"{n} (seed {s})" for s, n in plan if (s, n) not in done]
    if not runs: return None, missing
    df = pd.DataFrame([{k: v for k, v in m.items() if k not in ('per_class_test_acc', 'files')}
                       for m in runs])
    df['net'] = df['net'].map(json.dumps)   # a dict per run: one readable cell
    rows, per_class, histories = [], {}, {}
    for norm, group in df.groupby('norm', sort=False):
        first = group.iloc[0]
        std = lambda col: group[col].std(ddof=1) if len(group) > 1 else None
        rows.append(dict(norm=norm, params=first.params, epochs=first.epochs, seeds=len(group),
                         train_acc=group.train_acc.mean(), train_acc_std=std('train_acc'),
                         best_test_acc=group.best_test_acc.mean(), test_acc=group.test_acc.mean(),
                         test_acc_std=std('test_acc'), tta_test_acc=group.tta_test_acc.mean(),
                         train_loss=group.train_loss.mean(), test_loss=group.test_loss.mean(),
                         epochs_to_70=group.epochs_to_70.mean(), seconds=group.seconds.mean(),
                         device_name=first.device_name, data=first.data, data_md5=first.data_md5))
        classes = [m['per_class_test_acc'] for m in runs if m['norm'] == norm and m['per_class_test_acc']]
        if classes: per_class[norm] = pd.DataFrame(classes).mean()
        histories[norm] = pd.read_csv(out / first.run / 'history.csv')
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    findings = findings_frame(summary, histories)
    text = report.summary_markdown(summary, missing, [f"`{m['run']}`" for m in others], broken)
    df.to_csv(out / 'runs.csv', index=False)
    summary.to_csv(out / 'summary.csv', index=False)
    findings.to_csv(out / 'findings.csv', index=False)
    if per_class: pd.DataFrame(per_class).rename_axis('class').to_csv(out / 'per_class.csv')
    plots.comparison(histories, out / 'comparison.png')
    (out / 'summary.md').write_text(text)
    return summary, missing


def run_plan(plan: list, cifar, resume: bool = False, cell: bool = False, jobs: int = 1,
             fuse: bool | None = False, chosen=(), cluster: Cluster | None = None) -> int:
    """Train each (title, recipe, folder) of `plan` in order, or keep its whole finished run with `resume`,
    printing progress with the time left; `cell`: grid cells (`train_run`); `jobs` > 1 trains that many at
    once (`run_parallel`); `fuse` trains the runs that can train as one network as one (`run_fused`), None
    those whose variant measured faster fused on this machine (`fuse_by_default`), the others alone. Every
    folder is checked before the first run; with `resume`, runs that differ only in the hardware fields not
    `chosen` by the command are refused (`refuse_replacing_other_hardware`). On a `cluster` (`join_cluster`)
    the runs to train are its tasks, as many at once as it has room for. Returns how many runs it
    trained. Ctrl-C or a kill stops after the finished runs, which stay on disk, and is raised again as
    KeyboardInterrupt for the caller to summarize and exit on."""
    check_jobs(jobs, fuse)
    if not plan: return 0   # e.g. a search without --confirm: no runs to confirm
    check_run_dirs([d for _, _, d in plan])
    kept = [kept_run(d, r) if resume else None for _, r, d in plan]
    if resume:
        refuse_replacing_other_hardware(plan, kept, chosen)
        for (title, _, d), m in zip(plan, kept):
            problem = m is None and (d / 'metrics.json').exists() and damaged(d)
            if problem: print(f"{title}: the run in {d} is damaged ({problem}): training it again")
    todo = [run for run, m in zip(plan, kept) if m is None]
    jobs = jobs if len(todo) > 1 else 1
    groups = None if fuse is False else fusable_groups(todo, only=None if fuse else fuse_by_default)
    if groups and max(map(len, groups)) == 1: groups = None   # nothing to fuse: one at a time
    print(plan_line(plan, len(todo), jobs, groups, cluster), flush=True)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)   # a kill stops like Ctrl-C
    try:
        if cluster:
            print_kept(plan, kept)
            run_on_cluster(groups or [[run] for run in todo], cluster, cifar, cell)
        elif jobs > 1: run_parallel(plan, kept, todo, cifar, cell, jobs)
        elif groups: run_fused(plan, kept, groups, cifar, cell)
        else:   # one after another, each kept one named; progress with the time left before each run
            left, trained, train_seconds = len(todo), 0, 0.0
            for i, ((title, r, d), m) in enumerate(zip(plan, kept)):
                eta = f", about {train_seconds / trained * left / 60:.0f} min left" if trained else ''
                print(f"\n=== run {i + 1}/{len(plan)}: {title}, {plural(r.epochs, 'epoch')}{eta} ===",
                      flush=True)
                if m: print(f"kept the finished run in {d}")
                else:
                    start, first = time.perf_counter(), [FirstStepsEstimate(left)] if not trained else []
                    m = train_run(r, d, cifar=cifar, cell=cell, cbs=first)
                    trained, left = trained + 1, left - 1
                    train_seconds += time.perf_counter() - start
                print(f"{title}: test accuracy {m['test_acc']:.4f} in {m['seconds']:.0f} s", flush=True)
        return len(todo)
    except KeyboardInterrupt:
        print("\nInterrupted: the finished runs are kept.", flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def span(values) -> str:
    "'20' for one value, '5-20' for several: a plan's epochs, or the sizes of its fused networks."
    values = list(values)
    return f'{min(values)}' if min(values) == max(values) else f'{min(values)}-{max(values)}'


def plan_line(plan: list, to_train: int, jobs: int, groups: list | None,
              cluster: Cluster | None = None) -> str:
    """What `run_plan` is about to do, said before it starts: its runs, on what device (or `cluster`) and
    precision, how many are kept from before and how the others train (`jobs` at a time; `groups`: the fused
    networks; None: not fused)."""
    if not to_train: how = ''
    elif groups:
        fused, alone = [g for g in groups if len(g) > 1], sum(len(g) == 1 for g in groups)
        how = f" as {len(fused)} fused network(s) of {span(map(len, fused))} runs" + (
            f" and {alone} alone" if alone else '')
    elif cluster: how = f", {cluster.at_once} at a time"
    elif jobs > 1: how = f", {jobs} at a time"
    else: how = ", one at a time"
    first, epochs = plan[0][1], span(r.epochs for _, r, _ in plan)
    threads = worker_threads(jobs) if jobs > 1 and to_train else None   # what each run will record
    where = str(cluster) if cluster else device_name(first.device, threads)
    return (f"Plan: {plural(len(plan), 'run')} of {epochs} epoch{'s' * (epochs != '1')} on {where}, "
            f"{first.precision}; {len(plan) - to_train} kept, {to_train} to train{how}")


def plural(n: int, what: str) -> str: return f"{n} {what}{'s' * (n != 1)}"


def worker_threads(jobs: int) -> int:
    "The CPU threads of each of `jobs` runs at once: the process's threads shared out."
    return max(1, torch.get_num_threads() // jobs)


def print_kept(plan: list, kept: list):
    "A line for each run of `plan` that `run_plan` keeps from before (`kept`: its metrics, or None)."
    for (title, _, d), m in zip(plan, kept):
        if m: print(f"kept the finished run in {d}: {title}, test accuracy {m['test_acc']:.4f}")


def join_cluster(address: str | None, threads: int, r: Recipe) -> Cluster | None:
    """The Ray cluster at `address` (`--cluster`; None: none) for a plan of runs like recipe `r`: each run
    asks for `threads` CPUs, or on a GPU for the share of one that `JOBS_AT_ONCE` measured."""
    if address is None: return None
    on_gpu = torch.device(r.device).type == 'cuda'
    return connect(address, threads, 1 / JOBS_AT_ONCE['cuda'] if on_gpu else None)


def run_fused(plan: list, kept: list, groups: list, cifar, cell: bool):
    """`run_plan`'s runs to train, in `groups` of those that can train as one network (`fusable_groups`),
    each group as one (`train_fused`); progress with the time left after each group."""
    print_kept(plan, kept)
    start, done = time.perf_counter(), 0
    for i, group in enumerate(groups):
        left = sum(map(len, groups[i:]))
        eta = f", about {(time.perf_counter() - start) / done * left / 60:.0f} min left" if done else ''
        titles, recipes, folders = ([run[j] for run in group] for j in range(3))
        what = f"{len(group)} runs as one network" if len(group) > 1 else "1 run alone"
        print(f"\n=== {what} ({i + 1}/{len(groups)}): {'; '.join(titles)}, "
              f"{recipes[0].epochs} epochs{eta} ===", flush=True)
        first = [FirstStepsEstimate(len(groups), 'groups of runs')] if not i else []
        metrics = train_fused(recipes, folders, cifar=cifar, cell=cell, cbs=first)
        for title, m in zip(titles, metrics):
            print(f"{title}: test accuracy {m['test_acc']:.4f} in {m['seconds']:.0f} s", flush=True)
        done += len(group)


TRAINING = threading.Event()   # set while a worker of `run_parallel` trains a run


def start_worker(threads: int, parent: int | None = None):
    """A process of `run_parallel`: its share of the CPU threads; a Ctrl-C or a kill that stops its run as in
    one process, or ends it quietly between runs; and no life of its own once its `parent` (the process that
    started it) is gone."""
    torch.set_num_threads(threads)
    parent = parent or os.getppid()
    for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, stop_worker)
    threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()


def stop_worker(signum, frame):
    """A worker's Ctrl-C or kill: during a run, a KeyboardInterrupt, so that the run removes what it half
    wrote (`train_in_worker` then ends the process); between runs, the end of the process, without the
    traceback that a KeyboardInterrupt in multiprocessing's loop prints."""
    if TRAINING.is_set(): raise KeyboardInterrupt
    os._exit(130)


def exit_when_orphaned(parent: int):
    """End this worker once `parent` has died (a SIGKILL gives it no time to stop its workers): otherwise it
    would wait forever on the queue of runs its parent no longer feeds, holding its memory."""
    while os.getppid() == parent: time.sleep(1)
    if TRAINING.is_set():   # stop the run, which removes its half-written folder
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(60)
    os._exit(130)


def train_in_worker(r: Recipe, d: Path, cell: bool, cifar) -> dict:
    "`train_run` in a worker of `run_parallel`; a run stopped by a Ctrl-C or kill ends the worker quietly."
    TRAINING.set()
    try: return train_run(r, d, cifar=cifar, cell=cell)
    except KeyboardInterrupt: os._exit(130)   # its folder is cleaned up; the parent is stopping the plan
    finally: TRAINING.clear()


def run_parallel(plan: list, kept: list, todo: list, cifar, cell: bool, jobs: int):
    """`run_plan`'s runs to train (`todo`), `jobs` at a time, each in a process of its own with its share of
    the CPU threads. One small run keeps a GPU busy for a fraction of each step (it waits for Python to launch
    the step's kernels), so on a GPU several at once take little longer than one; on a CPU they only share its
    cores. A Ctrl-C, a kill or a failed run stops every run in flight as a Ctrl-C stops one."""
    print_kept(plan, kept)
    print(f"\n=== {len(todo)} runs to train, {jobs} at a time ===", flush=True)
    threads, start = worker_threads(jobs), time.perf_counter()
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn'),   # CUDA cannot fork
                               initializer=start_worker, initargs=(threads, os.getpid()))
    try:
        # The workers start ignoring Ctrl-C until `start_worker` sets theirs: one pressed while they import
        # would print a traceback from each.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try: runs = {pool.submit(train_in_worker, r, d, cell, cifar): title for title, r, d in todo}
        finally: signal.signal(signal.SIGINT, previous)
        pending, trained = set(runs), 0
        while pending:
            # a second at most: the wait must end for a kill's KeyboardInterrupt to be raised
            done, pending = wait(pending, timeout=1, return_when=FIRST_COMPLETED)
            for run in done:
                m, trained = run.result(), trained + 1
                eta = f", about {(time.perf_counter() - start) / trained * len(pending) / 60:.0f} min left" \
                    if pending else ''
                print(f"{runs[run]}: test accuracy {m['test_acc']:.4f} in {m['seconds']:.0f} s "
                      f"({trained}/{len(todo)} trained{eta})", flush=True)
    except BaseException:   # a Ctrl-C, a kill or a failed run: as in one process, the study stops there
        workers = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for _ in range(60):   # each worker stops its run as after a Ctrl-C, also a run it took from the queue
            if not any(w.is_alive() for w in workers): break
            for w in workers:
                with contextlib.suppress(ProcessLookupError): os.kill(w.pid, signal.SIGINT)
            time.sleep(0.5)
        for w in workers: w.terminate()   # one that outlived 30 s of Ctrl-C
        raise
    pool.shutdown()


def check_study_dir(out: Path) -> Path:
    """Refuse, before any work, a folder of someone else's files, which a study's files would be scattered
    among or overwrite (STUDY_FILES): a folder is a study's once it holds a run or a study.json of a study;
    otherwise it may hold only the folders of a study's runs."""
    ours = any(out.glob('*/metrics.json')) or any(out.glob('seeds/*/metrics.json'))
    with contextlib.suppress(FolderError, TypeError):
        ours = ours or 'how' in read_json(out / 'study.json')
    theirs = sorted(p.name for p in out.iterdir() if not p.name.startswith('.')
                    and not (p.is_dir() and p.name in (*NORMS, 'seeds'))) if out.is_dir() else []
    if theirs and not ours:
        shown = ', '.join(theirs[:5]) + (f' and {len(theirs) - 5} more' if len(theirs) > 5 else '')
        raise FolderError(f"{out} holds files of its own ({shown}) but no study: a study would write among "
                          "them; choose an empty or new --out")
    return out


def run_study(norms=None, seeds: int = STUDY_SEEDS, first_seed: int = 0, out='results', data=None,
              resume: bool = False, jobs: int | None = None, fuse: bool | None = None,
              replace_results: bool = False, cluster: str | None = None, threads: int = 2,
              **overrides) -> tuple[pd.DataFrame | None, list]:
    """Train every norm of `norms` (default: all registered) with its recipe and `overrides`, for `seeds`
    seeds from `first_seed`, into `out`; then summarize the folder. Every input is checked before any work.
    `resume` keeps whole runs already in `out` whose whole recipe matches; `jobs` trains that many at once,
    `fuse` each norm's seeds as one network (None: as measured fastest on this kind of machine,
    `how_to_train`); on a Ray `cluster` (its address), each run a task of `threads` CPUs (`join_cluster`).
    Runs of other than today's recipes at full length go into the committed results only with
    `replace_results` (`check_committed`).
    Ctrl-C or a kill stops after the finished runs, which are kept and summarized, and the KeyboardInterrupt
    is raised again. Returns the summary and the missing runs."""
    norms = parse_norms(norms if norms is None or isinstance(norms, str) else ','.join(norms))
    if seeds < 1: raise StudyError(f"--seeds {seeds}: need at least one")
    if first_seed < 0: raise StudyError(f"--seed {first_seed}: must be 0 or more")
    # bad values fail here, before any work
    recipes = {n: recipe(n, **overrides, seed=first_seed) for n in norms}
    first = recipes[norms[0]]
    jobs, fuse = how_to_train(first, jobs, fuse)
    check_committed(out, quick_options(norms, overrides), replace_results)
    find_data(data)   # data that is not there, before the folder is made
    on = join_cluster(cluster, threads, first)   # an unreachable or unfit cluster too
    out = check_study_dir(check_out(out))
    # every norm's first seed first
    seed_norms = [(s, n) for s in range(first_seed, first_seed + seeds) for n in norms]
    fused = [n for n in norms if seeds > 1 and (fuse or fuse is None and fuse_by_default(recipes[n]))]
    how = (f"on {cluster}" if cluster else f"{seeds} seeds as one network for {', '.join(fused)}"
           + (", the other variants one run at a time" if len(fused) < len(norms) else '') if fused else
           f"{jobs} runs at a time" if jobs > 1 else "one run at a time")
    print(f"Study: {plural(len(norms), 'variant')} x {plural(seeds, 'seed')} into {out}, {how}", flush=True)
    plan = [(f"{n} norm, seed {s}", dataclasses.replace(recipes[n], seed=s), run_dir(out, n, s))
            for s, n in seed_norms]
    check_run_dirs([d for _, _, d in plan])
    start = time.perf_counter()
    cifar = load_cifar(data)   # bad data fails here too, and it is decoded only once
    with locked(out):
        try: trained = run_plan(plan, cifar, resume, jobs=jobs, fuse=fuse, chosen=set(overrides), cluster=on)
        finally: summarized = summarize(out, overrides, seed_norms)   # also after a Ctrl-C, raised again
        # the study's own wall time, data to last file, and how it ran (the GPU page shows it): a study that
        # trained nothing keeps the record of the one that did
        if trained: (out / 'study.json').write_text(json.dumps(dict(
            runs=len(plan), trained=trained, how=how, fused=fused, jobs=jobs,
            device_name=device_name(first.device), precision=first.precision,
            wall_seconds=time.perf_counter() - start), indent=2) + '\n')
    return summarized
