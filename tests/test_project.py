"""The project as a whole: the README is current with the committed results, its set-up commands are what CI
runs, the code is within the style limits, and no file reaches into sys.path."""
import re, subprocess, sys

import pytest

from normnets_data import REPO_DIR

CODE = [p for d in ('.', 'scripts', 'benchmarks', 'tests') for p in (REPO_DIR / d).glob('*.py')]


def test_report_check_passes_on_the_committed_results():
    r = subprocess.run(
        [sys.executable, str(REPO_DIR / 'scripts' / 'report.py'), '--check'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def readme_commands() -> list[str]:
    "The shell commands of the README's set-up block."
    block = re.search(r'```(?:bash|sh)\n(.*?)```', (REPO_DIR / 'README.md').read_text(), re.S)[1]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith('#')]


def test_ci_runs_the_readme_install_and_test_commands():
    commands = readme_commands()
    install = next(c for c in commands if c.startswith('pip install'))
    test = next(c for c in commands if 'pytest' in c)
    ci = (REPO_DIR / '.ci' / 'run').read_text()
    assert re.search(rf'^(python -m )?{re.escape(install)}$', ci, re.M) and re.search(
        rf'^{re.escape(test)}$', ci, re.M
    )
    assert 'python scripts/run_all.py' in commands


def test_no_file_touches_sys_path():
    offenders = [p.name for p in CODE if p.name != 'test_project.py' and 'sys.path' in p.read_text()]
    assert offenders == []


def test_code_passes_ruff_with_the_projects_line_length():
    ruff = pytest.importorskip('ruff')  # installed by the test extra
    r = subprocess.run(
        [sys.executable, '-m', 'ruff', 'check', '--no-cache', str(REPO_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert ruff
