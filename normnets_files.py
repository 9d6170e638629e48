"""The folders normnets writes: checked before any work, locked while written, a run's folder replaced only
when it holds nothing but a run, and a run read back only when every file it wrote is there and readable.

Every script and benchmark checks its output folders here, so that none of them can delete what it did not
write, or keep a run that lost a file.
"""
import collections, contextlib, hashlib, json, os, platform, re, shutil, subprocess, tempfile, time, zipfile
from pathlib import Path

import pandas as pd
from PIL import Image

try: import fcntl
except ImportError: fcntl = None   # Windows: no folder lock

__all__ = ['FolderError', 'RUN_FILES', 'check_out', 'check_run_dir', 'check_run_dirs', 'locked', 'read_json',
           'read_csv', 'damaged', 'remove_abandoned_tmp_dirs', 'private_tmp_dir', 'replace_run_dir',
           'readable_mode']

# Every file a run writes (`write_run`; a cell of a grid writes only the first two): a run's folder holds
# nothing else.
RUN_FILES = ('history.csv', 'metrics.json', 'model.pkl', 'curves.png', 'misclassified.png',
             'misclassified.csv', 'confusion.png', 'per_class.csv')


class FolderError(ValueError):
    "An output folder that cannot be written, holds someone else's files, or is in use."


def check_writable(folder: Path, what: str):
    """Refuse `folder` unless a file can be made in it: a read-only folder, mount or disk is found before any
    work, not after the first runs trained. (Creating one is the only test that holds for every user, root
    included, and every file system.)"""
    try:
        with tempfile.TemporaryFile(dir=folder): pass
    except OSError as e:
        raise FolderError(f"{what} {folder} cannot be written to ({e.strerror or e})") from e


def check_out(out, create: bool = True) -> Path:
    """A folder of results, checked before any work: it exists (or, with `create`, can be made) and can be
    written to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FolderError(f"output folder {out} cannot be written to: it is a file")
    if not create and not out.is_dir(): raise FolderError(f"folder {out} does not exist")
    try: out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(f"output folder {out} cannot be written to ({e.strerror or e})") from e
    check_writable(out, 'output folder')
    return out


def check_run_dir(out, try_writing: bool = True) -> Path:
    """A run's folder, checked before any work: absent, empty, or holding a run (only files that a run writes,
    metrics.json among them), which a run may replace; anything else in it is refused, by name. Its nearest
    existing folder must be writable. A link to a folder stands for the folder it points to (returned)."""
    out = Path(out)
    if out.is_symlink(): out = out.resolve()
    if out.exists() and not out.is_dir():
        raise FolderError(f"run folder {out} is a file: choose a folder for the run's files")
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        foreign = sorted(p.name + ('/' if p.is_dir() else '') for p in out.iterdir()
                         if p.name not in RUN_FILES or not p.is_file())
        if not foreign and names and 'metrics.json' not in names:   # a run's file names, but no run
            foreign = sorted(names)
        if foreign:
            shown = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
            raise FolderError(f"run folder {out} holds files that are not a run's ({shown}): a run replaces "
                              "only a run; choose an empty or new folder")
    if try_writing:
        parent = out.parent   # where the run is written beside it, then moved in
        while not parent.exists() and parent != parent.parent: parent = parent.parent
        check_writable(parent, 'the folder of run')
    return out


def check_run_dirs(folders) -> list[Path]:
    """`check_run_dir` for each folder of several runs, and none named twice (one run would be lost). Each
    parent folder is tried for writing once, however many runs it holds (a grid of 100,000 seeds)."""
    tried = set()
    def check(d):
        parent = Path(d).parent
        if parent in tried: return check_run_dir(d, try_writing=False)
        tried.add(parent)
        return check_run_dir(d)
    folders = [check(d) for d in folders]
    seen = collections.Counter(d.resolve() for d in folders)
    twice = sorted(str(d) for d, n in seen.items() if n > 1)
    if twice: raise FolderError(f"runs written to the same folder: {', '.join(twice)}; one would be lost")
    return folders


LOCK = '.normnets.lock'


def holder(path: Path) -> str | None:
    "Who holds the lock file `path` ('pid N on HOST'), or None when no one does (or it is not there)."
    try: f = open(path, 'r')
    except OSError: return None
    with f:
        try: fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError: return f.read().strip() or 'unknown'
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def locked(out, elsewhere: str = ', or choose another --out'):
    """Hold `out` for one writer; a second one on the same folder, or inside a folder being written (a study's
    --out D/sub while D trains), is refused with a clear message that ends with `elsewhere` (what else the
    command could do). The lock file is removed on release, so that none is left behind (in a run's parent
    folder, say); a writer that locked a file since removed tries again on the new one."""
    if fcntl is None: yield; return
    out = Path(out)
    for parent in out.resolve().parents:
        held = holder(parent / LOCK)
        if held:
            raise FolderError(f"{out} is inside {parent}, which another normnets command is writing "
                              f"({held}): wait for it to finish{elsewhere}")
    path = out / LOCK
    while True:
        f = open(path, 'a+')
        try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            held = f.read().strip() or 'unknown'
            f.close()
            raise FolderError(f"{out} is in use by another normnets command ({held}): wait for it to "
                              f"finish{elsewhere}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino: break   # the lock file still in place
        f.close()
    try:
        f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on {platform.node()}\n"); f.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError): path.unlink()   # while held: no one else removes it
        f.close()   # closing releases the lock


def read_json(f) -> dict:
    "A JSON file, or an error that names it."
    try: return json.loads(Path(f).read_text())
    except (OSError, ValueError) as e: raise FolderError(f"{f}: cannot read it ({e})") from e


def read_csv(f) -> pd.DataFrame:
    "A table that normnets wrote, whole, or an error that names the file and what is wrong with it."
    try:
        text = Path(f).read_bytes()
        if not text: raise ValueError('empty')
        if not text.endswith(b'\n'): raise ValueError('cut short: its last row is not whole')
        df = pd.read_csv(f)
    except (OSError, ValueError) as e: raise FolderError(f"{f}: cannot read it ({e})") from e
    if df.empty: raise FolderError(f"{f}: cannot read it (no rows)")
    return df


def _check_file(f: Path, epochs=None):
    "Raise if `f` cannot be read as what its name says (history.csv: a row for each of the run's `epochs`)."
    if f.suffix == '.json': json.loads(f.read_text())
    elif f.suffix == '.csv':
        if not f.read_bytes().endswith(b'\n'): raise ValueError('cut short: its last row is not whole')
        rows = len(pd.read_csv(f))
        if not rows: raise ValueError('no rows')
        if f.name == 'history.csv' and rows != epochs: raise ValueError(f'{rows} epochs, the run {epochs}')
    elif f.suffix == '.png':
        with Image.open(f) as im: im.verify()
    elif f.suffix == '.pkl':   # torch.save's zip format: every member's checksum
        with zipfile.ZipFile(f) as z:
            if z.testzip() is not None: raise ValueError('a damaged member')
    elif not f.stat().st_size: raise ValueError('empty')


def not_kept_by_git(f: Path) -> bool:
    """Whether the git repository that holds `f` ignores it (.gitignore: the models of the GPU study and of
    the grids stay out of the repository): a clone has the run without that file."""
    try: r = subprocess.run(['git', 'check-ignore', '-q', f.name], cwd=f.parent, capture_output=True,
                            timeout=30)
    except (OSError, subprocess.SubprocessError): return False   # no git, or not a folder
    return r.returncode == 0


def damaged(d) -> str | None:
    """What keeps the run in `d` from being whole: a file it wrote (listed in its metrics.json) that is
    missing or cannot be read; None when it is whole. A file that the run's git repository does not keep
    (`not_kept_by_git`) may be missing: the run came whole to its folder, and the clone keeps the rest."""
    d = Path(d)
    try:
        metrics = json.loads((d / 'metrics.json').read_text())
        files = metrics['files']
    except FileNotFoundError: return 'metrics.json missing'
    except (OSError, ValueError, KeyError, TypeError) as e: return f'metrics.json unreadable ({e})'
    for name in files:
        if not (d / name).is_file():
            if not_kept_by_git(d / name): continue
            return f'{name} missing'
        try: _check_file(d / name, metrics.get('epochs'))
        except Exception as e: return f'{name} unreadable ({e})'
    return None


def readable_mode(f, mode: int):
    "Give `f`, made private by `tempfile`, the permissions that the umask gives new files (`mode` & ~umask)."
    umask = os.umask(0); os.umask(umask)
    os.chmod(f, mode & ~umask)


# A temporary run folder's name ends in its writer's process id, machine and tempfile's random part.
HOST = hashlib.md5(platform.node().encode()).hexdigest()[:8]
TMP_NAME = re.compile(r'-run-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]+$')


def alive(pid: int) -> bool:
    try: os.kill(pid, 0)
    except ProcessLookupError: return False
    except PermissionError: return True   # another user's process
    return True


def remove_abandoned_tmp_dirs(parent: Path) -> list[Path]:
    """Remove the temporary run folders in `parent` (`private_tmp_dir`) of writers that no longer run on
    this machine (a SIGKILL or a power cut leaves one behind), and those older than a day (a writer on another
    machine of a shared disk); returns them."""
    removed = []
    for d in Path(parent).glob('.*-run-*'):
        m = TMP_NAME.search(d.name)
        if not m or not d.is_dir(): continue
        old = time.time() - d.stat().st_mtime > 86400
        if old or m['host'] == HOST and not alive(int(m['pid'])):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def private_tmp_dir(out: Path) -> Path:
    """A temporary folder beside `out`, to write a run into before it replaces `out` at once. Its name holds
    the writer's process and machine, so that the next writer in that folder can remove it if its writer was
    killed before it could (`remove_abandoned_tmp_dirs`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_tmp_dirs(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}-run-{os.getpid()}-{HOST}-', dir=out.parent))
    readable_mode(tmp, 0o777)
    return tmp


def replace_run_dir(tmp: Path, out: Path):
    "Move the finished run in `tmp` to `out`, replacing a run there (checked again: never anything else)."
    check_run_dir(out)
    if out.exists(): shutil.rmtree(out)
    tmp.rename(out)
