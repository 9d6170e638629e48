"""Nothing lost, whatever a careless command asks: no run replaced that the command was not asked to replace,
no user's file overwritten, every bad option or folder refused before any work, and logs that read well in a
file. Tiny runs of the real data (NORMNETS_DATA)."""
import dataclasses, json, os, shutil, signal, subprocess, sys

import pandas as pd
import pytest
import torch
from fastcore.script import CliError

import inference
import normnets_files
import normnets_fused
import normnets_report as report
import report as report_script   # scripts/report.py
import run_all, search, speed, train
from normnets_cli import cli_errors
from normnets_data import REPO_DIR, get_dls, load_cifar
from normnets_files import FolderError, check_run_dir, damaged, locked
from normnets_fused import train_fused
from normnets_device import RuleError, device_name, resolve_device
from normnets_recipes import recipe
from normnets_learner import normnet_learner
from normnets_study import run_dir, run_study

TINY = dict(epochs=1, n_train=200, n_test=100, bs=100)


@pytest.fixture(scope='module')
def cifar(): return load_cifar()


@pytest.fixture(scope='module')
def two_seeds(tmp_path_factory):
    "A study of batch norm at seeds 0 and 1, in fp32, and how this machine resolves precision 'auto'."
    out = tmp_path_factory.mktemp('two') / 'study'
    run_study('bn', 2, 0, out, precision='fp32', **TINY)
    return out


@pytest.fixture
def study(two_seeds, tmp_path):
    shutil.copytree(two_seeds, tmp_path / 'study')
    return tmp_path / 'study'


def seeds_of(out) -> list:
    return sorted(pd.read_csv(out / 'runs.csv').seed)


def test_a_study_from_another_seed_keeps_every_seeds_folder(study, capsys):
    "Seed 1 alone into a study of seeds 0 and 1: it is kept in its own folder; seed 0's is left as it was."
    before = (study / 'batch' / 'metrics.json').read_text()
    run_study('bn', 1, 1, study, resume=True, precision='fp32', **TINY)
    assert '; 1 kept, 0 to train' in capsys.readouterr().out
    assert (study / 'batch' / 'metrics.json').read_text() == before
    assert seeds_of(study) == [0, 1]
    assert run_dir(study, 'batch', 0) == study / 'batch'
    assert run_dir(study, 'batch', 1) == run_dir(study, 'batch', 1) == study / 'seeds' / 'batch-seed1'


def test_resume_names_runs_of_other_hardware_instead_of_training_them_again(study, capsys):
    """Runs that differ only in precision (a study of another CPU kind, where 'auto' resolves otherwise) are
    refused before any work, naming the field and what to pass; passing it keeps them."""
    here = recipe('bn').precision   # what 'auto' is on this machine
    other = 'bf16' if here == 'fp32' else 'fp32'
    for d in (study / 'batch', study / 'seeds' / 'batch-seed1'):
        m = json.loads((d / 'metrics.json').read_text())
        (d / 'metrics.json').write_text(json.dumps({**m, 'precision': other}))
    with pytest.raises(CliError, match=rf'2 finished run\(s\).*precision {other} \(this command: {here}\).*'
                                       rf'Pass --precision {other} to keep them'):
        run_all.main(norms='bn', seeds=2, out=str(study), resume=True, **TINY)
    assert '=== run' not in capsys.readouterr().out
    assert json.loads((study / 'batch' / 'metrics.json').read_text())['precision'] == other
    run_all.main(norms='bn', seeds=2, out=str(study), resume=True, precision=other, **TINY)
    assert '; 2 kept, 0 to train' in capsys.readouterr().out


def test_an_empty_path_is_refused_not_taken_for_the_default(tmp_path):
    for main, option in ((train.main, 'out'), (run_all.main, 'out'), (search.main, 'out'),
                         (inference.main, 'results'), (speed.main, 'out'), (report_script.main, 'results')):
        with pytest.raises(CliError, match=f'--{option} is empty'): main(**{option: ''})


@pytest.mark.parametrize('bad, message', [(dict(confirm=-1), '--confirm -1'),
                                          (dict(confirm=2, seeds=-1), '--seeds -1')])
def test_search_refuses_negative_counts(tmp_path, bad, message):
    with pytest.raises(CliError, match=message): search.main(out=str(tmp_path / 'out'), **bad)
    assert not (tmp_path / 'out').exists()


def test_off_a_terminal_a_fit_logs_a_line_an_epoch_and_no_bar(capsys):
    learn = normnet_learner(get_dls(n_train=200, n_test=100, bs=100, device='cpu'), 'bn', precision='fp32')
    learn.fit_one_cycle(2)
    out = capsys.readouterr().out
    assert '\r' not in out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ['epoch', 'train_loss']
    assert [line.split()[0] for line in lines[1:]] == ['0', '1']
    with learn.no_logging(): learn.fit_one_cycle(1)
    assert capsys.readouterr().out == ''


def test_a_study_logged_to_a_file_has_a_line_an_epoch(tmp_path):
    log = tmp_path / 'log'
    with open(log, 'w') as f:
        args = ['--norms', 'bn', '--seeds', '1', '--epochs', '2', '--n-train', '200', '--n-test', '100',
                '--bs', '100', '--out', str(tmp_path / 's')]
        r = subprocess.run([sys.executable, str(REPO_DIR / 'scripts' / 'run_all.py'), *args], stdout=f,
                           stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text[-2000:]
    assert '\r' not in text and len(text) < 5000
    assert sum(line.split()[:1] in (['0'], ['1']) for line in text.splitlines()) == 2


@pytest.mark.parametrize('device', ['banana', 'mps', 'cuda:7', 'meta'])
def test_a_bad_device_is_one_clear_error(device):
    if device == 'mps' and torch.backends.mps.is_available(): pytest.skip('this machine has mps')
    with pytest.raises(RuleError, match='device'): resolve_device(device)
    with pytest.raises(CliError, match='device'): train.main(device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_inference_and_speed_refuse_a_missing_gpu_before_any_work(tmp_path):
    with pytest.raises(CliError, match="device 'cuda'"): inference.main(device='cuda')
    with pytest.raises(CliError, match="device 'cuda'"):
        speed.main(device='cuda', out=str(tmp_path / 's.json'))


def test_inference_reads_every_runs_metrics_before_measuring(tmp_path, monkeypatch):
    (tmp_path / 'batch').mkdir()
    shutil.copy(REPO_DIR / 'results' / 'batch' / 'model.pkl', tmp_path / 'batch')
    (tmp_path / 'batch' / 'metrics.json').write_text('{"norm": "ba')
    def measured(*args): raise AssertionError('measured before the runs were read')
    monkeypatch.setattr(inference, 'measure', measured)
    monkeypatch.setattr(inference, 'load_learner', measured)
    with pytest.raises(CliError, match='metrics.json unreadable'): inference.main(results=str(tmp_path))


def test_a_kill_ends_a_command_as_ctrl_c_does_after_its_clean_up(capsys):
    cleaned = []
    with pytest.raises(SystemExit) as stopped:
        with cli_errors():
            try: os.kill(os.getpid(), signal.SIGTERM)
            finally: cleaned.append(True)
    assert stopped.value.code == 130 and cleaned == [True] and 'Interrupted' in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not signal.default_int_handler   # put back afterwards


def test_a_run_into_a_link_to_a_folder_lands_in_that_folder_and_leaves_no_lock(tmp_path):
    (tmp_path / 'real').mkdir()
    (tmp_path / 'link').symlink_to(tmp_path / 'real')
    assert check_run_dir(tmp_path / 'link') == tmp_path / 'real'
    train.main(norm='bn', out=str(tmp_path / 'link'), **TINY)
    assert (tmp_path / 'link').is_symlink() and damaged(tmp_path / 'real') is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ['link', 'real']   # no lock, no temporary folder


def test_a_read_only_folder_of_the_plan_is_found_before_any_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'study'
    (out / 'seeds').mkdir(parents=True)
    real = normnets_files.tempfile.TemporaryFile
    def refused_in_seeds(*args, dir=None, **kw):
        if dir is not None and os.path.basename(dir) == 'seeds':
            raise PermissionError(13, 'Permission denied')
        return real(*args, dir=dir, **kw)
    monkeypatch.setattr(normnets_files.tempfile, 'TemporaryFile', refused_in_seeds)
    with pytest.raises(CliError, match=r'seeds cannot be written to \(Permission denied\)'):
        run_all.main(norms='bn', seeds=2, out=str(out), **TINY)
    assert '=== run' not in capsys.readouterr().out and not (out / 'batch').exists()


def test_files_under_a_runs_or_a_studys_names_are_not_taken_for_ours(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'history.csv').write_text('my,own\n1,2\n')
    with pytest.raises(FolderError, match=r"not a run's \(history.csv\)"): check_run_dir(run)
    notes = tmp_path / 'notes'
    notes.mkdir()
    (notes / 'summary.md').write_text('my notes')
    with pytest.raises(CliError, match=r'holds files of its own \(summary.md\) but no study'):
        run_all.main(norms='bn', seeds=1, out=str(notes), **TINY)
    assert (notes / 'summary.md').read_text() == 'my notes' and (run / 'history.csv').exists()


def test_report_names_a_missing_cut_or_empty_table(study, tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text((REPO_DIR / 'README.md').read_text())
    summary = study / 'summary.csv'
    text = summary.read_text()
    for damage, message in ((None, 'summary.csv: cannot read it'), (text[:-20], 'cut short'),
                            ('', r'summary.csv: cannot read it \(empty\)')):
        if damage is None: summary.unlink()
        else: summary.write_text(damage)
        with pytest.raises(CliError, match=message):
            report_script.main(results=str(study), readme=str(readme), check=True)


def test_a_history_cut_mid_row_is_a_damaged_run(study):
    history = study / 'batch' / 'history.csv'
    assert damaged(study / 'batch') is None
    history.write_text(history.read_text()[:-5])
    assert damaged(study / 'batch').startswith('history.csv unreadable (cut short')
    history.write_text(history.read_text().splitlines()[0] + '\n')   # the header alone: no epoch
    assert damaged(study / 'batch').startswith('history.csv unreadable')


def test_report_waits_for_no_one_it_refuses_while_a_study_holds_the_folder(study, tmp_path):
    readme = tmp_path / 'README.md'
    readme.write_text((REPO_DIR / 'README.md').read_text())
    with locked(study):
        with pytest.raises(FolderError, match='in use'): report.write_report(study, readme)
    assert readme.read_text() == (REPO_DIR / 'README.md').read_text()
    assert not (study / '.normnets.lock').exists()   # removed on release


def test_the_same_folder_twice_is_refused_before_any_work(tmp_path, cifar):
    r = recipe('bn', precision='fp32', **TINY)
    with pytest.raises(FolderError, match='same folder'):
        train_fused([r, dataclasses.replace(r, seed=1)], [tmp_path / 'a', tmp_path / 'a'], cifar=cifar)
    assert not any(tmp_path.iterdir())


def test_fuse_with_jobs_is_refused_before_any_folder_is_made(tmp_path):
    with pytest.raises(CliError, match='--fuse and --jobs'):
        run_all.main(norms='bn', seeds=2, fuse='yes', jobs=2, out=str(tmp_path / 'new'), **TINY)
    assert not (tmp_path / 'new').exists()


def test_fusion_by_default_follows_a_rule_in_the_code_not_files(monkeypatch):
    r = recipe('bn', precision='fp32')
    monkeypatch.setattr(normnets_fused, 'FUSED_FASTER', set())
    assert not normnets_fused.fuse_by_default(r)
    monkeypatch.setattr(normnets_fused, 'FUSED_FASTER', {('cpu', 'fp32', 'batch')})
    assert normnets_fused.fuse_by_default(r) == (r.device == 'cpu')
    assert not normnets_fused.fuse_by_default(recipe('gn', precision='fp32'))   # a rule per variant
    assert 'speed.json' not in (REPO_DIR / 'normnets_fused.py').read_text().split('def fuse_by_default')[1]


def test_a_session_in_the_clones_parent_folder_imports_normnets(tmp_path):
    "A folder normnets/ beside a session (the clone itself, seen from its parent) is not the module."
    (tmp_path / 'normnets').mkdir()
    code = 'import normnets_learner, normnets; print(normnets.PARAM_LIMIT)'
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == '50000', r.stderr[-2000:]


# ---------------------------------------------------------------- the committed results

QUICK = dict(epochs=1, n_train=512, n_test=256)


def never(*args, **kw): raise AssertionError('work began')


def test_a_quick_check_without_out_is_refused_before_it_touches_the_committed_results(monkeypatch):
    "The README's study, and every grid beside it, is replaced only by today's recipes at full length."
    import ablation, batch_sizes, normnets_study
    for module in (normnets_study, batch_sizes, search, ablation):
        monkeypatch.setattr(module, 'run_plan', never)
    monkeypatch.setattr(train, 'train_run', never)
    before = {f: f.read_bytes() for f in (REPO_DIR / 'results').glob('*.csv')}
    for main, args in ((run_all.main, dict(norms='bn', seeds=1, **QUICK)), (train.main, QUICK),
                       (batch_sizes.main, dict(norms='bn', sizes='64', **QUICK)),
                       (search.main, dict(norms='bn', n_train=512)),
                       (ablation.main, dict(only='0', n_test=256))):
        with pytest.raises(CliError, match=r'holds the committed results.*--out.*--replace-results'):
            main(**args)
    # today's recipe at full length may replace them, and so may any check the command says may
    normnets_study.check_committed(REPO_DIR / 'results', normnets_study.quick_options(['bn'], {}))
    normnets_study.check_committed(REPO_DIR / 'results' / 'batch', {'epochs': 1}, replace=True)
    assert normnets_study.quick_options(['bn', 'gn'], dict(epochs=20, precision='fp32', seed=3)) == {}
    assert {f: f.read_bytes() for f in (REPO_DIR / 'results').glob('*.csv')} == before


def test_train_without_out_writes_its_seeds_folder_of_the_study():
    assert train.run_dir(train.COMMITTED, 'batch', 1) == REPO_DIR / 'results' / 'seeds' / 'batch-seed1'


@pytest.fixture
def reported(study, tmp_path):
    "The tiny study with a README of its own, current."
    readme = tmp_path / 'README.md'
    readme.write_text((REPO_DIR / 'README.md').read_text())
    report.write_report(study, readme)
    return study, readme


def test_check_fails_when_a_committed_run_disagrees_with_the_tables(reported):
    study, readme = reported
    m = json.loads((study / 'batch' / 'metrics.json').read_text())
    (study / 'batch' / 'metrics.json').write_text(json.dumps({**m, 'test_acc': 0.09}))
    with pytest.raises(CliError, match=r'batch/metrics.json says test_acc 0.09.*run_all.py --resume'):
        report_script.main(results=str(study), readme=str(readme), check=True)
    with pytest.raises(FolderError, match='nothing written'): report.write_report(study, readme)


def test_report_writes_all_or_nothing_and_names_what_it_cannot_write(reported):
    study, readme = reported
    text = readme.read_text()
    (study / 'study.md').unlink()
    (study / 'study.md').mkdir()   # a page that cannot be written
    with pytest.raises(FolderError, match=r'cannot write .*study.md .*nothing was written'):
        report.write_report(study, readme)
    assert readme.read_text() == text and not list(study.glob('.*.tmp'))


def test_report_refuses_to_write_links_to_missing_figures_and_says_what_fixes_each_problem(reported):
    study, readme = reported
    (study / 'batch' / 'curves.png').unlink()
    text = readme.read_text()
    with pytest.raises(FolderError, match=r'nothing written: .*curves.png, which does not exist \(restore'):
        report.write_report(study, readme)
    assert readme.read_text() == text
    with pytest.raises(CliError) as e: report_script.main(results=str(study), readme=str(readme), check=True)
    assert 'restore them' in str(e.value) and 'report.py rewrites' not in str(e.value)
    readme.write_text(text.replace('<!--/g-->', '', 1))
    with pytest.raises(CliError, match='by hand') as e:
        report_script.main(results=str(study), readme=str(readme), check=True)
    assert 'report.py rewrites' not in str(e.value)


def test_the_report_of_a_study_without_a_norm_of_a_page_beside_it_is_written(tmp_path):
    "The bfloat16 page beside a main study that lacks its group and layer norm: the norms of both only."
    shutil.copytree(REPO_DIR / 'results' / 'bf16', tmp_path / 'bf16', ignore=shutil.ignore_patterns('*.pkl'))
    for name in ('summary.csv', 'runs.csv'):
        df = pd.read_csv(REPO_DIR / 'results' / name)
        df[df.norm == 'batch'].to_csv(tmp_path / name, index=False)
    from normnets_pages import beside_page
    page = beside_page(tmp_path, 'bf16', 'bfloat16', 'bf16', 'float32')
    assert '| batch ' in page and '| group ' not in page


def test_a_resume_that_trains_nothing_keeps_the_studys_record(study, capsys):
    before = (study / 'study.json').read_text()
    run_study('bn', 2, 0, study, resume=True, precision='fp32', **TINY)
    assert '; 2 kept, 0 to train' in capsys.readouterr().out
    assert (study / 'study.json').read_text() == before


# ---------------------------------------------------------------- damaged files, one line each

def test_inference_names_a_missing_or_damaged_model(study):
    model = study / 'batch' / 'model.pkl'
    good = model.read_bytes()
    model.unlink()
    with pytest.raises(CliError, match=r'batch: model.pkl missing'): inference.main(results=str(study))
    for junk, message in ((good[:len(good) // 2], 'model.pkl unreadable'), (b'', 'model.pkl unreadable'),
                          (b'junk' * 100, 'model.pkl unreadable')):
        model.write_bytes(junk)
        with pytest.raises(CliError, match=message): inference.main(results=str(study))
    import zipfile
    with zipfile.ZipFile(model, 'w') as z: z.writestr('archive/data.pkl', b'not a pickle')
    with pytest.raises(CliError, match=r'batch/model.pkl: cannot load it'): inference.main(results=str(study))


def test_a_damaged_data_archive_is_one_error_naming_it(tmp_path):
    "Bytes flipped in the middle of a .tgz: zlib's or gzip's own errors become one line."
    import io, tarfile
    from normnets_data import CifarDataError
    archive = tmp_path / 'cifar.tgz'
    with tarfile.open(archive, 'w:gz') as tar:
        for i in range(40):
            data = (f'image {i} ' * 400).encode()
            info = tarfile.TarInfo(f'cifar10/train/cat/{i}.png')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    good = archive.read_bytes()
    for where in (len(good) // 3, len(good) // 2, 2 * len(good) // 3):
        flipped = bytes(b ^ 0xFF for b in good[where:where + 50])
        archive.write_bytes(good[:where] + flipped + good[where + 50:])
        with pytest.raises(CifarDataError, match=f'{archive}'): load_cifar(archive, cache_dir=tmp_path)


def test_a_full_disk_is_said_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    real = torch.save
    monkeypatch.setattr(torch, 'save', lambda obj, f, **kw: real(obj, '/dev/full', **kw))
    with pytest.raises(CliError, match=r'cannot write .*model.pkl: \d+ MB free on its disk'):
        train.main(norm='bn', out=str(tmp_path / 'run'), precision='fp32', **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('data, message', [('', '--data is empty'), ('/nonexistent', 'not found at')])
def test_bad_data_is_refused_before_any_folder_is_made(tmp_path, data, message):
    for main in (run_all.main, train.main):
        with pytest.raises(CliError, match=message): main(data=data, out=str(tmp_path / 'new'), **TINY)
        assert not (tmp_path / 'new').exists()


def test_the_learner_records_the_crops_and_batch_size_it_trains_with(cifar):
    learn = normnet_learner(get_dls(cifar=cifar, n_train=300, n_test=100, device='cpu'), 'gn')
    assert (learn.recipe.crop_pad, learn.recipe.bs) == (4, 256)   # get_dls' defaults, not the recipe's
    dls = get_dls(cifar=cifar, n_train=200, n_test=100, device='cpu', crop_pad=2, bs=100, cutout=8)
    learn = normnet_learner(dls, 'gn')
    assert (learn.recipe.crop_pad, learn.recipe.bs, learn.recipe.cutout) == (2, 100, 8)
    assert normnet_learner(dls, recipe('gn', crop_pad=4, device='cpu')).recipe.crop_pad == 2
    with pytest.raises(RuleError, match="crop_pad=4 but the DataLoaders' crop_pad is 2"):
        normnet_learner(dls, 'gn', crop_pad=4)


# ---------------------------------------------------------------- folders and small things

def test_a_folder_inside_one_being_written_is_refused(tmp_path):
    with locked(tmp_path):
        with pytest.raises(CliError, match=r'inside .*which another normnets command is writing'):
            run_all.main(norms='bn', seeds=1, out=str(tmp_path / 'sub'), **TINY)
        with pytest.raises(FolderError) as e:
            with locked(tmp_path, elsewhere=''): pass
    assert '--out' not in str(e.value)   # report.py's lock: no option it does not have


def test_a_folder_of_someone_elses_files_is_refused(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(CliError, match=r'holds files of its own \(notes.txt\)'):
        run_all.main(norms='bn', seeds=1, out=str(tmp_path), **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']


def test_a_row_given_twice_is_refused_before_any_folder(tmp_path):
    import ablation
    with pytest.raises(CliError, match=r"--only '1,1': row 1 given twice"):
        ablation.main(only='1,1', out=str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_writer(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    left = tmp_path / f'.batch-run-{dead}-{normnets_files.HOST}-abc_12'
    other_machine = tmp_path / f'.batch-run-{dead}-00000000-abc_12'
    live = normnets_files.private_tmp_dir(tmp_path / 'group')   # this process's: in use
    for d in (left, other_machine): d.mkdir()
    normnets_files.private_tmp_dir(tmp_path / 'batch')
    assert not left.exists() and other_machine.exists() and live.exists()


def test_a_plan_of_many_runs_tries_each_folder_for_writing_once(tmp_path, monkeypatch):
    tried = []
    monkeypatch.setattr(normnets_files, 'check_writable', lambda folder, what: tried.append(folder))
    normnets_files.check_run_dirs([tmp_path / 'seeds' / f'batch-seed{s}' for s in range(1000)])
    assert tried == [tmp_path]


def test_the_plan_says_the_threads_each_run_will_record(capsys):
    from normnets_study import plan_line, plural
    r = recipe('bn', device='cpu')
    line = plan_line([('a', r, None), ('b', r, None)], 2, 2, None)
    assert 'thread' in line and device_name('cpu', max(1, torch.get_num_threads() // 2)) in line
    assert plural(1, 'seed') == '1 seed' and plural(2, 'variant') == '2 variants'
    assert device_name('cpu', 1).endswith('(CPU, 1 thread)')


def test_logs_show_no_progress_bar_redraws_or_fastais_import_warning(capsys):
    from normnets_data import decoding_progress
    assert list(decoding_progress(list(range(100)))) == list(range(100))
    out = capsys.readouterr().out
    assert '\r' not in out and out.splitlines()[-1] == 'decoded 100 of 100 images'
    r = subprocess.run([sys.executable, str(REPO_DIR / 'scripts' / 'train.py'), '--help'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'Warning' not in r.stderr, r.stderr
