"""The folders normnets writes: checked before any work, locked while written, a run's folder replaced only
when it holds nothing but a run, and a run read back only when every file it wrote is there and readable.

Every script and benchmark checks its output folders here, so that none of them can delete what it did not
write, or keep a run that lost a file.
"""
import contextlib, json, os, platform, shutil, tempfile, zipfile
from pathlib import Path

import pandas as pd
from PIL import Image

try: import fcntl
except ImportError: fcntl = None   # Windows: no folder lock

__all__ = ['FolderError', 'RUN_FILES', 'check_out', 'check_run_dir', 'locked', 'read_json',
           'damaged', 'private_tmp_dir', 'replace_run_dir', 'readable_mode']

# Every file a run writes (`write_run`; a cell of a grid writes only the first two): a run's folder holds
# nothing else.
RUN_FILES = ('history.csv', 'metrics.json', 'model.pkl', 'curves.png', 'misclassified.png',
             'misclassified.csv', 'confusion.png', 'per_class.csv')


class FolderError(ValueError):
    "An output folder that cannot be written, holds someone else's files, or is in use."


def check_out(out, create: bool = True) -> Path:
    """A folder of results, checked before any work: it exists (or, with `create`, can be made) and can be
    written to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FolderError(f"output folder {out} cannot be written to: it is a file")
    if not create and not out.is_dir(): raise FolderError(f"folder {out} does not exist")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out): pass
    except OSError as e:
        raise FolderError(f"output folder {out} cannot be written to ({e.strerror or e})") from e
    return out


def check_run_dir(out) -> Path:
    """A run's folder, checked before any work: absent, empty, or holding only files that a run writes (a
    run may replace a run). Anything else in it is refused, by name."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FolderError(f"run folder {out} is a file: choose a folder for the run's files")
    if out.is_dir():
        foreign = sorted(p.name + ('/' if p.is_dir() else '') for p in out.iterdir()
                         if p.name not in RUN_FILES or not p.is_file())
        if foreign:
            shown = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
            raise FolderError(f"run folder {out} holds files that no run writes ({shown}): a run replaces "
                              "only a run; choose an empty or new folder")
    return out


@contextlib.contextmanager
def locked(out):
    "Hold `out` for one writer; a second one on the same folder is refused with a clear message."
    if fcntl is None: yield; return
    f = open(Path(out) / '.normnets.lock', 'a+')
    try:
        try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FolderError(f"{out} is in use by another normnets command ({f.read().strip() or 'unknown'}"
                              "): wait for it to finish, or choose another --out") from None
        f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on {platform.node()}\n"); f.flush()
        yield
    finally: f.close()   # closing releases the lock


def read_json(f) -> dict:
    "A JSON file, or an error that names it."
    try: return json.loads(Path(f).read_text())
    except (OSError, ValueError) as e: raise FolderError(f"{f}: cannot read it ({e})") from e


def _check_file(f: Path):
    "Raise if `f` cannot be read as what its name says."
    if f.suffix == '.json': json.loads(f.read_text())
    elif f.suffix == '.csv':
        if pd.read_csv(f).empty: raise ValueError('no rows')
    elif f.suffix == '.png':
        with Image.open(f) as im: im.verify()
    elif f.suffix == '.pkl':   # torch.save's zip format: every member's checksum
        with zipfile.ZipFile(f) as z:
            if z.testzip() is not None: raise ValueError('a damaged member')
    elif not f.stat().st_size: raise ValueError('empty')


def damaged(d) -> str | None:
    """What keeps the run in `d` from being whole: a file it wrote (listed in its metrics.json) that is
    missing or cannot be read; None when it is whole."""
    d = Path(d)
    try:
        files = json.loads((d / 'metrics.json').read_text())['files']
    except FileNotFoundError: return 'metrics.json missing'
    except (OSError, ValueError, KeyError, TypeError) as e: return f'metrics.json unreadable ({e})'
    for name in files:
        if not (d / name).is_file(): return f'{name} missing'
        try: _check_file(d / name)
        except Exception as e: return f'{name} unreadable ({e})'
    return None


def readable_mode(f, mode: int):
    "Give `f`, made private by `tempfile`, the permissions that the umask gives new files (`mode` & ~umask)."
    umask = os.umask(0); os.umask(umask)
    os.chmod(f, mode & ~umask)


def private_tmp_dir(out: Path) -> Path:
    "A temporary folder beside `out`, to write a run into before it replaces `out` at once."
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}-', dir=out.parent))
    readable_mode(tmp, 0o777)
    return tmp


def replace_run_dir(tmp: Path, out: Path):
    "Move the finished run in `tmp` to `out`, replacing a run there (checked again: never anything else)."
    check_run_dir(out)
    if out.exists(): shutil.rmtree(out)
    tmp.rename(out)
