"""The study's figures: training curves, misclassified grids, confusion matrices, the comparison."""
import matplotlib
matplotlib.use('Agg')   # files only: scripts run on servers and in CI without a display
import matplotlib.pyplot as plt
import pandas as pd
import torch

PASS_LINE = 0.70
NORM_COLORS = {'batch': 'tab:blue', 'group': 'tab:orange', 'layer': 'tab:green'}


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def curves(hist: pd.DataFrame, title: str, path):
    "Train and test loss and accuracy per epoch of one run."
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (('train', '--'), ('test', '-')):
        ax_loss.plot(hist.epoch, hist[f'{split}_loss'], style, marker='o', ms=3, label=split)
        ax_acc.plot(hist.epoch, hist[f'{split}_acc'], style, marker='o', ms=3, label=split)
    ax_acc.axhline(PASS_LINE, color='grey', lw=0.8, ls=':', label='70%')
    ax_loss.set(xlabel='epoch', ylabel='loss (label-smoothed cross-entropy)', title=f'{title}: loss')
    ax_acc.set(xlabel='epoch', ylabel='accuracy', title=f'{title}: accuracy')
    for ax in (ax_loss, ax_acc): ax.grid(alpha=0.3); ax.legend()
    fig.text(0.5, -0.04, 'train: augmented batches in training mode, as fastai records them; test: the 10,000 test images',
             ha='center', fontsize=8, color='grey')
    _save(fig, path)


def misclassified(interp, k: int = 10) -> pd.DataFrame:
    "The `k` misclassified test images with the highest loss: their position in fastai's top losses and what they are."
    losses, order = interp.top_losses()   # every test image, highest loss first
    probs, targs = interp.learn.get_preds(dl=interp.dl)
    preds = probs.argmax(1)
    rank = torch.where(preds[order] != targs[order])[0][:k]
    idx = order[rank]
    vocab = list(interp.vocab)
    return pd.DataFrame({'rank': rank.tolist(), 'test_index': idx.tolist(),
                         'predicted': [vocab[i] for i in preds[idx]], 'actual': [vocab[i] for i in targs[idx]],
                         'loss': losses[rank].tolist(), 'probability': probs[idx].max(1).values.tolist()})


def misclassified_grid(interp, title: str, path, k: int = 10) -> pd.DataFrame:
    "A 5x2 grid of the `k` worst misclassified test images (fastai's plot_top_losses); its data goes beside it as CSV."
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
        color = NORM_COLORS.get(norm)
        ax_acc.plot(hist.epoch, hist.test_acc, marker='o', ms=3, color=color, label=f'{norm} norm')
        ax_loss.plot(hist.epoch, hist.test_loss, marker='o', ms=3, color=color, label=f'{norm} norm')
    ax_acc.axhline(PASS_LINE, color='grey', lw=0.8, ls=':')
    ax_acc.set(xlabel='epoch', ylabel='test accuracy', title='test accuracy')
    ax_loss.set(xlabel='epoch', ylabel='test loss', title='test loss')
    for ax in (ax_acc, ax_loss): ax.grid(alpha=0.3); ax.legend()
    _save(fig, path)
