"""What every script and benchmark shares on its command line: the options' parsing and checks, and one-line
errors instead of tracebacks.

Each check runs before any work (no folder made, no data decoded), so that a bad option costs nothing.
"""
import contextlib, signal, sys
from pathlib import Path

from fastcore.script import CliError

from normnets import NORMS, norm_name

__all__ = ['StudyError', 'cli_errors', 'path_option', 'parse_norms', 'FUSE', 'parse_fuse', 'check_jobs']


class StudyError(ValueError):
    "A command that cannot start: repeated norms, too few seeds or jobs, an empty path."


@contextlib.contextmanager
def cli_errors():
    """For the scripts' mains: bad input (a ValueError: values, data, folders) or a file the system refuses
    (an OSError: permissions, a full disk) ends the command with a one-line error and exit status 1; a Ctrl-C
    or a kill (SIGTERM) ends it with exit status 130, as an interrupted command does, without a traceback,
    after the `finally` blocks that remove half-written files have run."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)   # a kill stops like Ctrl-C
    try: yield
    except (ValueError, OSError) as e: raise CliError(f"error: {e}") from None
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        raise SystemExit(130) from None
    finally: signal.signal(signal.SIGTERM, previous)


def path_option(name: str, text: str | None, default: Path) -> Path:
    """The folder or file an option names; `default` where it is not given. An empty value (an unset shell
    variable, say) is refused: it would otherwise mean the default, and overwrite the committed results."""
    if text is None: return Path(default)
    if not str(text).strip(): raise StudyError(f"--{name} is empty: give a path, or leave the option out")
    return Path(text)


def parse_norms(text: str | None) -> list[str]:
    "Canonical names of a comma-separated list of norms (names or aliases); None: every registered norm."
    if text is None: return list(NORMS)
    names = [norm_name(n) for n in str(text).split(',') if n.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated: raise StudyError(f"--norms {text!r} names {', '.join(repeated)} more than once")
    if not names: raise StudyError("--norms is empty")
    return names


FUSE = {'auto': None, 'yes': True, 'no': False}   # the --fuse options; None: as `fuse_by_default` decides


def parse_fuse(text: str) -> bool | None:
    "--fuse as `run_study` and `run_plan` take it; a clear error for anything else."
    if text not in FUSE: raise StudyError(f"--fuse {text!r}: expected one of {', '.join(FUSE)}")
    return FUSE[text]


def check_jobs(jobs: int | None, fuse: bool | None = None):
    """Refuse, before any work, a `jobs` (the runs a plan trains at once; None: as `how_to_train` decides)
    below one, or several jobs with `fuse` asked for (fused runs train in one process)."""
    if jobs is not None and jobs < 1: raise StudyError(f"--jobs {jobs}: need at least one")
    if fuse and (jobs or 1) > 1:
        raise StudyError("--fuse and --jobs: choose one way of training runs together")
