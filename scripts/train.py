"""Train one normnets variant on CIFAR-10 with its recipe, a fastai `Learner` and a one-cycle schedule.

    python scripts/train.py --norm gn            # the group-norm recipe, replaces results/group/
    python scripts/train.py --norm bn --epochs 5 --out /tmp/bn5   # a quick check: a folder of its own

Writes under --out: history.csv (one row an epoch), metrics.json (the whole recipe, final accuracies,
parameters, versions, device, data and its md5), model.pkl (`learn.export`, for `load_learner`; float32),
curves.png, misclassified.png, confusion.png and per_class.csv. Every option left out takes the norm's recipe
(normnets_recipes.RECIPES). Bad options, and an --out that holds anything but an earlier run, are refused
before any work; an interrupted run leaves nothing behind. The committed results/ take only today's recipe at
full length (a run of another seed into the study's folder for it): a quick check needs an --out of its own.
"""

import matplotlib
from fastcore.script import call_parse

from normnets_data import find_data, load_cifar
from normnets_files import check_out, check_run_dir, locked
from normnets_device import keep_freed_memory
from normnets_recipes import recipe
from normnets_runs import train_run
from normnets_study import COMMITTED, check_committed, quick_options, run_dir
from normnets_cli import cli_errors, path_option


def given(**options) -> dict: return {k: v for k, v in options.items() if v is not None}


@call_parse
def main(
    norm: str = 'bn',  # normalization: a name or alias of the registry (batch/bn, group/gn, layer/ln)
    epochs: int = None,  # epochs of one-cycle training (at most 20)
    bs: int = None,  # batch size
    lr: float = None,  # peak learning rate of the one-cycle schedule
    wd: float = None,  # weight decay (not on norm parameters and biases)
    opt: str = None,  # optimizer: adam or sgd
    seed: int = 0,  # random seed: data order, augmentation, initialization
    data: str = None,  # CIFAR-10 folder or .tgz (default: $NORMNETS_DATA, data/cifar10, else download)
    out: str = None,  # output folder (default: the study's folder of this norm and seed, results/<norm>/)
    precision: str = None,  # auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16 (GPU)
    device: str = None,  # auto (the GPU if there is one), cpu, cuda or cuda:N
    n_train: int = None,  # train on a random subset of this many images (quick checks only)
    n_test: int = None,  # evaluate on a random subset of this many images (quick checks only)
    autotune: bool = False,  # cuDNN picks its fastest kernels (GPU): faster, runs no longer repeat exactly
    replace_results: bool = False,  # let a run of other settings (--epochs, --n-train...) replace results/
):
    "Train one normnets variant on CIFAR-10 and write its history, metrics, exported learner and figures."
    matplotlib.use('Agg')
    keep_freed_memory()
    # bad values, broken rules, a folder holding other files, bad data, a busy folder; Ctrl-C
    with cli_errors():
        settings = given(epochs=epochs, bs=bs, lr=lr, wd=wd, opt=opt, precision=precision, device=device,
                         n_train=n_train, n_test=n_test, reproducible=False if autotune else None)
        r = recipe(norm, seed=seed, **settings)
        out = path_option('out', out, run_dir(COMMITTED, r.norm, seed))
        check_committed(out, quick_options([r.norm], settings), replace_results)
        find_data(data)   # data that is not there, before any folder is made
        out = check_run_dir(out)
        cifar = load_cifar(data)
        with locked(check_out(out.parent)):
            m = train_run(r, out, cifar=cifar)
    print(f"{m['norm']} norm: train accuracy {m['train_acc']:.4f}, test accuracy {m['test_acc']:.4f} "
          f"({m['params']:,} parameters, {m['epochs']} epochs, {m['precision']}, {m['seconds']:.0f} s on "
          f"{m['device_name']})")
