"""The study's figures: training curves, misclassified grids, confusion matrices, comparisons across norms.
Each is written to a file and closed. Importing this module picks no matplotlib backend: scripts choose Agg in
their main, and matplotlib itself falls back to it where there is no display."""
import matplotlib.ticker
import matplotlib.pyplot as plt
import pandas as pd
import torch

from normnets import NORMS, PASS_ACCURACY


def norm_color(norm: str) -> str:
    "A norm's colour in every figure: its place in the registry, in matplotlib's default cycle."
    return f'C{list(NORMS).index(norm) % 10}' if norm in NORMS else 'grey'


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def curves(hist: pd.DataFrame, title: str, path):
    "Train and test loss and accuracy per epoch of one run."
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (('train', '--'), ('test', '-')):
        ax_loss.plot(hist.epoch, hist[f'{split}_loss'], style, marker='o', ms=3, label=split)
        ax_acc.plot(hist.epoch, hist[f'{split}_acc'], style, marker='o', ms=3, label=split)
    ax_acc.axhline(PASS_ACCURACY, color='grey', lw=0.8, ls=':', label=f'{PASS_ACCURACY:.0%}')
    ax_loss.set(xlabel='epoch', ylabel='loss (label-smoothed cross-entropy)', title=f'{title}: loss')
    ax_acc.set(xlabel='epoch', ylabel='accuracy', title=f'{title}: accuracy')
    for ax in (ax_loss, ax_acc): ax.grid(alpha=0.3); ax.legend()
    fig.text(
        0.5,
        -0.04,
        'train: augmented batches in training mode, as fastai records them; test: the 10,000 test images',
        ha='center',
        fontsize=8,
        color='grey',
    )
    _save(fig, path)


def misclassified(interp, k: int = 10) -> pd.DataFrame:
    """The `k` misclassified test images with the highest loss: their position in fastai's top losses and what
    they are."""
    losses, order = interp.top_losses()   # every test image, highest loss first
    probs, targs = interp.learn.get_preds(dl=interp.dl)
    preds = probs.argmax(1)
    rank = torch.where(preds[order] != targs[order])[0][:k]
    idx = order[rank]
    vocab = list(interp.vocab)
    return pd.DataFrame(
        {
            'rank': rank.tolist(),
            'test_index': idx.tolist(),
            'predicted': [vocab[i] for i in preds[idx]],
            'actual': [vocab[i] for i in targs[idx]],
            'loss': losses[rank].tolist(),
            'probability': probs[idx].max(1).values.tolist(),
        }
    )


def misclassified_grid(interp, title: str, path, k: int = 10) -> pd.DataFrame:
    """A 5x2 grid of the `k` worst misclassified test images (fastai's plot_top_losses); its data goes beside
    it as CSV."""
    wrong = misclassified(interp, k)
    interp.plot_top_losses(wrong['rank'].tolist(), nrows=2, ncols=5, figsize=(13, 6.5))
    fig = plt.gcf()
    for ax in fig.axes: ax.title.set_fontsize(9)   # fastai's default size overlaps at 5 columns
    fig.suptitle(f'{title}: the {k} misclassified test images with the highest loss\n'
                 'each titled prediction/actual / loss / probability', fontsize=12)
    _save(fig, path)
    wrong.to_csv(path.with_suffix('.csv'), index=False)
    return wrong


def confusion(interp, title: str, path):
    "fastai's confusion matrix plot of the test set."
    interp.plot_confusion_matrix(title=f'{title}: confusion matrix (test set)', figsize=(6, 6))
    _save(plt.gcf(), path)


def comparison(histories: dict, path):
    "The variants' test accuracy and loss per epoch, overlaid."
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for norm, hist in histories.items():
        color = norm_color(norm)
        ax_acc.plot(hist.epoch, hist.test_acc, marker='o', ms=3, color=color, label=f'{norm} norm')
        ax_loss.plot(hist.epoch, hist.test_loss, marker='o', ms=3, color=color, label=f'{norm} norm')
    ax_acc.axhline(PASS_ACCURACY, color='grey', lw=0.8, ls=':')
    ax_acc.set(xlabel='epoch', ylabel='test accuracy', title='test accuracy')
    ax_loss.set(xlabel='epoch', ylabel='test loss', title='test loss')
    for ax in (ax_acc, ax_loss): ax.grid(alpha=0.3); ax.legend()
    _save(fig, path)


def batch_size(df: pd.DataFrame, path):
    """Test accuracy against training batch size (log axis), one line per norm: the mean over seeds, and the
    seeds' spread (one standard deviation) where there are several; batch norm also with the statistics of
    each test batch (dashed)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    scores = {'test_acc': ('-', '')}
    if 'batch_stats_test_acc' in df and df.batch_stats_test_acc.notna().any():
        scores['batch_stats_test_acc'] = ('--', ', test-batch statistics')
    for norm, g in df.groupby('norm', sort=False):
        for col, (ls, what) in scores.items():
            if g[col].isna().all(): continue
            acc = g.groupby('bs')[col].agg(['mean', 'std'])
            ax.errorbar(acc.index, acc['mean'], yerr=acc['std'].fillna(0), marker='o', capsize=3, ls=ls,
                        color=norm_color(norm), label=f'{norm} norm{what}')
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted(df.bs.unique()), [str(b) for b in sorted(df.bs.unique())])
    epochs = '/'.join(map(str, sorted(df.epochs.unique())))
    ax.set(xlabel='training batch size', ylabel='test accuracy',
           title=f'test accuracy by batch size ({epochs} epochs)')
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
    _save(fig, path)


def inference(df: pd.DataFrame, path):
    """Test accuracy against test batch size (log axis): batch norm with running and with batch statistics,
    the others."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, g in df.groupby('mode', sort=False):
        ax.plot(g.test_bs, g.test_acc, marker='o', color=norm_color(g.norm.iloc[0]),
                ls='--' if 'batch statistics' in mode else '-', label=mode)
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted(df.test_bs.unique()), [str(b) for b in sorted(df.test_bs.unique())])
    ax.set(xlabel='test batch size', ylabel='test accuracy', title='test accuracy by test batch size')
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
    _save(fig, path)


def search(df: pd.DataFrame, path):
    """Held-out accuracy against peak learning rate (log axis), a panel per optimizer and a line per norm, at
    each rate the better of the weight decays searched."""
    opts = list(dict.fromkeys(df.opt))
    fig, axes = plt.subplots(1, len(opts), figsize=(5 * len(opts), 4), sharey=True, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for norm, g in df[df.opt == opt].groupby('norm', sort=False):
            best = g.groupby('lr').holdout_acc.max()
            ax.plot(best.index, best.values, marker='o', color=norm_color(norm), label=f'{norm} norm')
        lrs = sorted(set(df[df.opt == opt].lr))
        ax.set_xscale('log')
        ax.set_xticks(lrs, [f'{lr:g}' for lr in lrs], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())   # only the searched rates are labelled
        epochs = '/'.join(str(int(e)) for e in sorted(set(df.epochs)))
        ax.set(xlabel='peak learning rate', title=f"{opt} ({epochs} epochs)")
        ax.grid(alpha=0.3); ax.legend(fontsize='small')
    axes[0][0].set_ylabel('held-out accuracy')
    _save(fig, path)
