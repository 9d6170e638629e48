"""The whole study: every registered normalization trained with its recipe, the same data and seeds, then the
summary, and for the default results/ the README's generated regions.

    python scripts/run_all.py                                   # every variant x 20 epochs x 3 seeds
    python scripts/run_all.py --data ../shared/data/cifar10-jpeg.tgz --resume
    python scripts/run_all.py --norms bn,gn --epochs 5 --seeds 1 --out /tmp/study   # a quick check
    python scripts/run_all.py --out results/gpu --jobs 8               # on a GPU: 8 runs at once
    python scripts/run_all.py --fuse yes                # each variant's seeds trained as one fused network

Per variant (first seed): <out>/<norm>/ as scripts/train.py writes it. Further seeds:
<out>/seeds/<norm>-seed<k>/. Study: summary.csv and summary.md (mean and spread over seeds), findings.csv (a
row a norm), runs.csv (a row a run), per_class.csv, comparison.png, all written from the whole finished runs
in the folder. A Ctrl-C keeps every finished run, and exits with status 130. The committed results/ take only
today's recipes at full length: a quick check (fewer epochs, a subset) needs an --out of its own.
"""

import matplotlib
from fastcore.script import call_parse, CliError

from normnets_data import REPO_DIR
from normnets_device import keep_freed_memory
from normnets_recipes import STUDY_SEEDS
from normnets_study import COMMITTED, run_study
from normnets_cli import cli_errors, parse_fuse, path_option
import normnets_report as report


def given(**options) -> dict: return {k: v for k, v in options.items() if v is not None}


@call_parse
def main(
    norms: str = None,  # variants to train, comma-separated names or aliases (default: every registered norm)
    seeds: int = STUDY_SEEDS,  # runs per variant, with seeds seed, seed+1, ...
    seed: int = 0,  # first random seed
    epochs: int = None,  # epochs per run (default: each norm's recipe; at most 20)
    bs: int = None,  # batch size (default: each norm's recipe)
    lr: float = None,  # peak learning rate (default: each norm's recipe)
    wd: float = None,  # weight decay (default: each norm's recipe)
    opt: str = None,  # optimizer, adam or sgd (default: each norm's recipe)
    data: str = None,  # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out: str = None,  # results folder (default: results/, which also regenerates the README's numbers)
    n_train: int = None,  # train on a random subset of this many training images (quick checks only)
    n_test: int = None,  # evaluate on a random subset of this many test images (quick checks only)
    resume: bool = False,  # keep the runs in --out whose whole recipe and data match instead of retraining
    precision: str = None,  # auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16 (GPU)
    device: str = None,  # auto (the GPU if there is one), cpu, cuda or cuda:N
    autotune: bool = False,  # cuDNN picks its fastest kernels (GPU): faster, runs no longer repeat exactly
    jobs: int = None,  # runs at once, a process each (default: GPU 4, AMX CPU 2, at most 1 a core; else 1)
    fuse: str = 'auto',  # yes: each variant's seeds as one network; no; auto: where measured faster
    replace_results: bool = False,  # let runs of other settings (--epochs, --n-train...) replace results/
    cluster: str = None,  # train on a Ray cluster: auto (this machine's, or $RAY_ADDRESS) or host:port
    threads: int = 2,  # CPU threads of each run on a --cluster
):
    "Train every variant with its recipe, the same data and seeds, and write the study's tables and figures."
    matplotlib.use('Agg')
    keep_freed_memory()
    # bad values or data, a busy, unwritable or foreign folder, files that contradict each other; Ctrl-C
    with cli_errors():
        fuse, out_dir = parse_fuse(fuse), path_option('out', out, COMMITTED)
        settings = given(epochs=epochs, bs=bs, lr=lr, wd=wd, opt=opt, n_train=n_train, n_test=n_test,
                         precision=precision, device=device, reproducible=False if autotune else None)
        summary, missing = run_study(norms, seeds, seed, out_dir, data, resume, jobs, fuse, replace_results,
                                     cluster, threads, **settings)
        if summary is None:
            raise CliError(f"no finished run of this study in {out_dir}: its files are left as they were")
        if out is None and not missing:   # the README reports results/
            for path in report.write_report(out_dir, REPO_DIR / 'README.md'): print(f"wrote {path}")
    print('\n' + (out_dir / 'summary.md').read_text())
    if missing: raise CliError(f"incomplete study: missing {', '.join(missing)} (run again with --resume)")
