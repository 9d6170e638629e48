"""The project as a whole: the README is current with the committed results, its set-up commands are what CI
runs, the library's modules import only the ones below them, the code is within the style limits, and no file
reaches into sys.path."""
import ast, re, shutil, subprocess, sys

from normnets_data import REPO_DIR
from normnets_recipes import RECIPES
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


# The library from the bottom up: a module may import only the modules of the floors below its own.
FLOORS = [{'normnets', 'normnets_device', 'normnets_files'},
          {'normnets_data', 'normnets_plots', 'normnets_cli'},
          {'normnets_recipes'},
          {'normnets_learner', 'normnets_pages'},
          {'normnets_runs', 'normnets_report'},
          {'normnets_fused'},
          {'normnets_cluster'},
          {'normnets_study'}]


def test_every_module_imports_only_the_floors_below_it():
    floor = {m: i for i, ms in enumerate(FLOORS) for m in ms}
    modules = {p.stem for p in REPO_DIR.glob('normnets*.py')}
    assert modules == set(floor)   # a new module takes a floor here
    for m in modules:
        tree = ast.parse((REPO_DIR / f'{m}.py').read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        above = sorted(i for i in imported & modules if floor[i] >= floor[m])
        assert above == [], f"{m} imports {above}"


def test_no_file_touches_sys_path():
    offenders = [p.name for p in CODE if p.name != 'test_project.py' and 'sys.path' in p.read_text()]
    assert offenders == []


def test_code_passes_ruff_with_the_projects_line_length():
    "ruff comes with the test extra: without it the command fails, and so does this test."
    r = subprocess.run(
        [sys.executable, '-m', 'ruff', 'check', '--no-cache', str(REPO_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


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
