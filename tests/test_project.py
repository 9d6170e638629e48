"""The project as a whole: the README is current with the committed results, its set-up commands are what CI
runs, the code is within the style limits, and no file reaches into sys.path."""
import re, shutil, subprocess, sys

import pytest

from normnets_data import REPO_DIR
from normnets_learner import RECIPES
from normnets_report import stale, write_report

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


def test_report_check_fails_on_a_section_whose_runs_are_not_of_todays_recipe(tmp_path, monkeypatch):
    """Once a recipe changes in the code, every section whose runs trained with the old one is stale (what
    `report.py --check` reports) until the report is written again, which names the difference in each; a
    section edited to hide it is stale again."""
    results, readme = tmp_path / 'results', tmp_path / 'README.md'
    shutil.copytree(REPO_DIR / 'results', results, ignore=shutil.ignore_patterns('*.pkl'))
    readme.write_text((REPO_DIR / 'README.md').read_text())
    assert stale(results, readme) == []
    old, new = RECIPES['batch']['lr'], RECIPES['batch']['lr'] / 2
    monkeypatch.setitem(RECIPES, 'batch', {**RECIPES['batch'], 'lr': new})
    sections = ['study.md', 'search.md', 'ablation.md', 'inference.md', 'speed.md', 'gpu.md']
    behind = stale(results, readme)
    assert "README region 'recipes'" in behind and {str(results / s) for s in sections} <= set(behind)
    write_report(results, readme)
    assert stale(results, readme) == []
    said = f'lr {old:g} (today {new:g})'
    assert said in readme.read_text()
    for s in sections[:2] + sections[3:]: assert said in (results / s).read_text(), s
    page = results / 'study.md'
    page.write_text(page.read_text().replace(f'**no**: {said}', 'yes'))
    assert stale(results, readme) == [str(page)]
