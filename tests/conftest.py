"""What every test shares: on a CPU, the scripts they call in their own process train one run at a time, and
every run trains eagerly."""
import os

# torch's own switch, read as torch loads and inherited by the scripts the tests start: a machine kind where
# the compiled step measured faster would otherwise compile each test's run (about 20 s a run). The tests of
# compilation turn it back on (`torch._dynamo.config.disable`).
os.environ['TORCH_COMPILE_DISABLE'] = '1'

import pytest  # noqa: E402

import normnets_study

# The rule as the library has it, for the test of the rule itself (test_study).
MEASURED_JOBS_AT_ONCE = normnets_study.JOBS_AT_ONCE
MEASURED_SMALL_BATCHES = normnets_study.JOBS_AT_ONCE_SMALL_BATCHES


@pytest.fixture(autouse=True)
def one_run_at_a_time_on_a_cpu(monkeypatch):
    """A study called in the tests' process trains its runs in that process, on every kind of CPU (one with
    AMX would train 2 at once, each in a process of its own: `JOBS_AT_ONCE`), so that a test reads what the
    runs print and patches what they call. A test of runs at once asks for them with --jobs."""
    gpus_only = {kind: jobs for kind, jobs in MEASURED_JOBS_AT_ONCE.items() if not kind.startswith('cpu')}
    monkeypatch.setattr(normnets_study, 'JOBS_AT_ONCE', gpus_only)
    monkeypatch.setattr(normnets_study, 'JOBS_AT_ONCE_SMALL_BATCHES', {})
