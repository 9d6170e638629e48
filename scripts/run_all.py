"""The whole study: train the batch-, group- and layer-norm variants with the same data, seed and schedule,
then write a self-describing summary under results/ (and, for the default results/, the README).

    python scripts/run_all.py                                   # 3 variants x 20 epochs
    python scripts/run_all.py --data ../shared/data/cifar10-jpeg.tgz --seeds 3
    python scripts/run_all.py --norms bn,gn --epochs 5 --out /tmp/study

Per variant (first seed): results/<norm>/ as scripts/train.py writes it. Further seeds: results/seeds/<norm>-seed<k>/.
Study: summary.csv and summary.md (mean and spread over seeds), runs.csv (one row a run), per_class.csv, comparison.png.
A Ctrl-C keeps every finished run and writes a summary that names what is missing.
"""
import json, signal, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pandas as pd
from fastcore.script import call_parse, CliError
from fastai.torch_core import default_device

from train import BS, LR, WD, LABEL_SMOOTHING, MAX_EPOCHS, PRECISION, train_variant, check_rules, resolve_precision
from normnets import normnet, norm_name, architecture_id
from normnets_data import REPO_DIR, load_cifar
import plots, report

SUMMARY_COLUMNS = ['norm', 'params', 'epochs', 'seeds', 'train_acc', 'train_acc_std', 'best_test_acc', 'test_acc',
                   'test_acc_std', 'tta_test_acc', 'train_loss', 'test_loss', 'epochs_to_70', 'seconds', 'device',
                   'data', 'data_md5']


def run_dir(out: Path, norm: str, seed: int, first_seed: int) -> Path:
    return out / norm if seed == first_seed else out / 'seeds' / f'{norm}-seed{seed}'


def finished(d: Path, **config) -> dict | None:
    "The metrics of a run already in `d` with exactly this configuration, if there is one (for --resume)."
    f = d / 'metrics.json'
    if not f.exists(): return None
    m = json.loads(f.read_text())
    return m if all(m.get(k) == v for k, v in config.items()) else None


def recipe(norm: str, epochs: int, bs: int, lr: float, wd: float, seed: int, cifar, n_train=None, n_test=None, *,
           precision: str) -> dict:
    "What a run's metrics.json must hold to count as this run: network, recipe, precision, seed and data (see `finished`)."
    return dict(norm=norm, arch=architecture_id(normnet(norm)), epochs=epochs, bs=bs, lr=lr, wd=wd,
                label_smoothing=LABEL_SMOOTHING, precision=precision, seed=seed, data_md5=cifar.fingerprint,
                n_train=n_train or len(cifar.x_train), n_test=n_test or len(cifar.x_test))


def summarize(runs: list, norms: list, n_seeds: int, out: Path):
    "Write runs.csv, summary.csv/.md, per_class.csv and comparison.png from the finished runs; name what is missing."
    df = pd.DataFrame([{k: v for k, v in r.items() if k != 'per_class_test_acc'} for r in runs])
    df.to_csv(out / 'runs.csv', index=False)
    rows, per_class, histories = [], {}, {}
    for norm in norms:
        done = df[df.norm == norm] if len(df) else df
        if not len(done): continue
        first = done.iloc[0]
        rows.append(dict(
            norm=norm, params=first.params, epochs=first.epochs, seeds=len(done),
            train_acc=done.train_acc.mean(), train_acc_std=done.train_acc.std(ddof=1) if len(done) > 1 else None,
            best_test_acc=done.best_test_acc.mean(), test_acc=done.test_acc.mean(),
            test_acc_std=done.test_acc.std(ddof=1) if len(done) > 1 else None, tta_test_acc=done.tta_test_acc.mean(),
            train_loss=done.train_loss.mean(), test_loss=done.test_loss.mean(),
            epochs_to_70=done.epochs_to_70.mean(), seconds=done.seconds.mean(),
            device=first.device, data=first.data, data_md5=first.data_md5))
        per_class[norm] = pd.DataFrame([r['per_class_test_acc'] for r in runs if r['norm'] == norm]).mean()
        histories[norm] = pd.read_csv(out / first.run / 'history.csv')
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    summary.to_csv(out / 'summary.csv', index=False)
    if per_class: pd.DataFrame(per_class).rename_axis('class').to_csv(out / 'per_class.csv')
    if histories: plots.comparison(histories, out / 'comparison.png')
    missing = [f'{n} ({n_seeds - (df.norm == n).sum() if len(df) else n_seeds} of {n_seeds} seeds)'
               for n in norms if not len(df) or (df.norm == n).sum() < n_seeds]
    (out / 'summary.md').write_text(report.summary_markdown(summary, missing))
    return summary, missing


@call_parse
def main(
    norms:str='bn,gn,ln',   # variants to train, comma-separated: batch/bn, group/gn, layer/ln
    epochs:int=MAX_EPOCHS,  # epochs per run (at most 20)
    bs:int=BS,              # batch size
    lr:float=LR,            # peak learning rate of the one-cycle schedule
    wd:float=WD,            # weight decay
    seed:int=0,             # first random seed
    seeds:int=1,            # runs per variant, with seeds seed, seed+1, ...
    data:str=None,          # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out:str=None,           # results folder (default: results/, which also regenerates README.md)
    n_train:int=None,       # train on a random subset of this many training images (quick checks only)
    n_test:int=None,        # evaluate on a random subset of this many test images (quick checks only)
    resume:bool=False,      # keep runs already in --out with the same configuration and data instead of retraining
    precision:str=PRECISION, # auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16 (GPU)
):
    "Train every variant with the same data, seeds and schedule, and write the study's tables and figures."
    try:
        norm_list = [norm_name(n) for n in norms.split(',')]
        for n in norm_list: check_rules(normnet(n), epochs)
        if seeds < 1: raise ValueError(f"--seeds {seeds}: need at least one")
        precision = resolve_precision(precision, default_device())
        cifar = load_cifar(data)   # fail on bad data before any training, and decode it only once
    except ValueError as e: raise CliError(f"error: {e}")
    out_dir = Path(out) if out else REPO_DIR / 'results'
    out_dir.mkdir(parents=True, exist_ok=True)

    plan = [(s, n) for s in range(seed, seed + seeds) for n in norm_list]   # every variant's first seed first
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # a kill stops like Ctrl-C: finished runs are summarized
    runs, trained, train_seconds = [], 0, 0.0   # the time estimate counts runs trained here, not kept ones
    try:
        for i, (s, norm) in enumerate(plan):
            eta = f", about {train_seconds / trained * (len(plan) - i) / 60:.0f} min left" if trained else ''
            print(f"\n=== run {i + 1}/{len(plan)}: {norm} norm, seed {s}, {epochs} epochs{eta} ===", flush=True)
            d = run_dir(out_dir, norm, s, seed)
            m = resume and finished(d, **recipe(norm, epochs, bs, lr, wd, s, cifar, n_train, n_test, precision=precision))
            if m: print(f"kept the finished run in {d}")
            else:
                start = time.perf_counter()
                m = train_variant(norm, epochs, bs, lr, wd, s, cifar.source, d, n_train=n_train, n_test=n_test,
                                  precision=precision)
                trained, train_seconds = trained + 1, train_seconds + time.perf_counter() - start
            runs.append({**m, 'run': d.relative_to(out_dir).as_posix()})
            print(f"{norm} norm, seed {s}: test accuracy {m['test_acc']:.4f} in {m['seconds']:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("\nInterrupted: the summary below covers the finished runs only.")
    summary, missing = summarize(runs, norm_list, seeds, out_dir)
    if out is None and not missing: report.write_readme(out_dir)
    print('\n' + (out_dir / 'summary.md').read_text())
    if missing: raise CliError(f"incomplete study: missing {', '.join(missing)}")
