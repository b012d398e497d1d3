"""``scripts/slurm_train.sh`` under a real SLURM: a one-node cluster of Debian's ``slurm-wlm`` and ``munge`` on
loopback (its own state folder, its own ports, every daemon it starts stopped by PID), running the script unedited with
command-line overrides. A time-limit notice checkpoints at the step reached, the job is requeued and resumes; an
administrator's requeue works; a user's ``scancel`` stays cancelled; two jobs on one node never share a rendezvous;
an allocation that lacks what the job was told to use stops at once, naming it.

Slow (a requeued job waits for the scheduler): ``python -m pytest -q -m slurm`` (skipped without SLURM)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not all(shutil.which(x) for x in ('slurmctld', 'slurmd', 'munged', 'sbatch')),
                                 reason="SLURM is not installed (Debian: apt-get install slurm-wlm munge)")]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'slurm_train.sh'
TINY = json.dumps(dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6))


class Cluster:
    """munged, slurmctld and slurmd on 127.0.0.1 with a state folder of their own; ``run`` calls its commands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs = []
        state = root / 'state'
        for d in ('ctld', 'd'):
            (state / d).mkdir(parents=True)
        key = state / 'munge.key'
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf = state / 'slurm.conf'
        self.conf.write_text('\n'.join([
            'ClusterName=ldaetest', 'SlurmctldHost=localhost(127.0.0.1)', f'SlurmctldPort={free_port()}',
            f'SlurmdPort={free_port()}', 'AuthType=auth/munge', 'CredType=cred/munge',
            f'AuthInfo=socket={state}/munge.sock', 'SlurmUser=root', 'SlurmdUser=root',
            f'StateSaveLocation={state}/ctld', f'SlurmdSpoolDir={state}/d', f'SlurmctldPidFile={state}/ctld.pid',
            f'SlurmdPidFile={state}/d.pid', f'SlurmctldLogFile={state}/slurmctld.log',
            f'SlurmdLogFile={state}/slurmd.log', 'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none',
            'SchedulerType=sched/builtin', 'SchedulerParameters=sched_interval=1', 'SelectType=select/cons_tres',
            'SelectTypeParameters=CR_Core', 'ReturnToService=2', 'MpiDefault=none', 'JobCompType=jobcomp/none',
            'AccountingStorageType=accounting_storage/none', 'JobAcctGatherType=jobacct_gather/none', 'KillWait=30',
            'MinJobAge=3600', 'SlurmdParameters=config_overrides',
            'NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=8000 State=UNKNOWN',
            'PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP', '']))
        self.env = {**os.environ, 'SLURM_CONF': str(self.conf), 'PYTHON': sys.executable,
                    'PATH': f'{Path(sys.executable).parent}:{os.environ["PATH"]}', 'OMP_NUM_THREADS': '1'}
        self._start(['munged', '-F', '-f', f'--socket={state}/munge.sock', f'--key-file={key}',
                     f'--log-file={state}/munged.log', f'--pid-file={state}/munged.pid',
                     f'--seed-file={state}/munged.seed'], 'munged')
        self._wait(lambda: (state / 'munge.sock').exists(), 'munged')
        self._start(['slurmctld', '-D', '-f', str(self.conf)], 'slurmctld')
        time.sleep(1)
        self._start(['slurmd', '-D', '-N', 'localhost', '-f', str(self.conf)], 'slurmd')
        self._wait(lambda: 'idle' in self.run('sinfo', '-h', '-o', '%t', check=False).stdout, 'the node')
        self.version = self.run('sinfo', '-V').stdout.strip()

    def _start(self, cmd, name):
        log = open(self.root / 'state' / f'{name}.out', 'w')
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)))

    def _wait(self, ok, what, timeout=60):
        t0 = time.time()
        while not ok():
            if time.time() - t0 > timeout:
                raise RuntimeError(f'{what} did not start: ' + (self.root / 'state' / 'slurmctld.log').read_text()[-2000:]
                                   if (self.root / 'state' / 'slurmctld.log').exists() else what)
            time.sleep(0.5)

    def run(self, *cmd, check=True, **kw):
        r = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **kw.pop('env', {})}, **kw)
        if check and r.returncode:
            raise RuntimeError(f'{cmd}: {r.stdout}{r.stderr}')
        return r

    def job(self, job_id):
        """The fields of ``scontrol show job``."""
        text = self.run('scontrol', 'show', 'job', str(job_id)).stdout
        return dict(re.findall(r'(\w+)=(\S*)', text))

    def submit(self, *sbatch_args, out, extra=(), env=None):
        r = self.run('sbatch', '--parsable', f'--chdir={self.root}', *sbatch_args, str(SCRIPT), 'ldae_vit_tiny_cifar10',
                     str(self.data), str(out), *extra, env=env or {})
        return int(r.stdout.strip().split(';')[0])

    def stop(self):
        self.run('scancel', '--user', 'root', check=False)
        for name, p in reversed(self.procs):  # slurmd, slurmctld, munged: by the PIDs this fixture started
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope='module')
def cluster(tmp_path_factory, folder):
    c = Cluster(tmp_path_factory.mktemp('slurm'))
    c.data = folder
    try:
        yield c
    finally:
        c.stop()


def train_flags(*extra):
    return ['--dataset', 'folder', '--model-args', TINY, '--batch-size', '8', '--warmup-epochs', '1', '--workers',
            '0', '--pca-images', '40', '--ckpt-every', '100000', '--log-every', '100000', '--quiet', '--amp', 'off',
            *extra]


def events(out):
    path = Path(out) / 'log.jsonl'
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def wait_for(ok, timeout, what):
    t0 = time.time()
    while True:
        value = ok()
        if value:
            return value
        if time.time() - t0 > timeout:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(1)


def test_a_time_limit_notice_and_an_administrators_requeue_lose_no_step(cluster, tmp_path):
    """--time 1 with the notice 40 s before the limit: each notice checkpoints at the step reached (every resume
    starts at the step of the stop before it), the job is requeued and resumes, and the weights at the end equal
    an uninterrupted run's, bit for bit. Between two notices an administrator's ``scontrol requeue`` does the same.
    (The scheduler delays a requeued job by about two minutes; the test makes it eligible at once.)"""
    t0 = time.time()
    flags = train_flags('--epochs', '1400')  # 7,000 steps: more than one job's minute
    reference = subprocess.Popen([sys.executable, '-m', 'ldae_models', 'train', '--recipe', 'ldae_vit_tiny_cifar10',
                                  '--data-root', str(cluster.data), '--out', str(tmp_path / 'ref'), *flags],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cluster.env)
    out = tmp_path / 'run'
    job = cluster.submit('--time', '1', '--signal', 'B:USR1@40', '--ntasks-per-node', '1', out=out, extra=flags)
    admin_requeued, held_since = False, None
    while True:
        info = cluster.job(job)
        state = info['JobState']
        if state == 'COMPLETED':
            break
        assert state in ('PENDING', 'RUNNING', 'REQUEUED', 'COMPLETING', 'CONFIGURING'), info
        if state == 'PENDING' and info.get('Reason') == 'BeginTime':  # the scheduler's delay of a requeued job:
            held_since = held_since or time.time()               # cut short once the node has cleaned up after it
            idle = 'idle' in cluster.run('sinfo', '-h', '-o', '%t').stdout
            if idle and time.time() - held_since > 5:
                cluster.run('scontrol', 'update', f'JobId={job}', 'StartTime=now')
                held_since = None
        resumed = [e for e in events(out) if e.get('event') == 'resumed']
        if state == 'RUNNING' and not admin_requeued and len(resumed) == 1:
            cluster.run('scontrol', 'requeue', str(job))
            admin_requeued = True
        assert time.time() - t0 < 600, 'the job did not complete in 10 minutes'
        time.sleep(1)
    log = (cluster.root / f'ldae-{job}.log').read_text()
    stops = [e['step'] for e in events(out) if e.get('event') == 'preempted']
    starts = [e['step'] for e in events(out) if e.get('event') == 'resumed']
    assert int(cluster.job(job)['Restarts']) >= 2 and admin_requeued
    assert 'time-limit notice' in log and 'requeueing job' in log
    assert len(stops) >= 2 and starts == stops, (stops, starts)  # no step lost: each resume is where it stopped
    assert 0 < stops[0] and stops == sorted(stops)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    a, b = load_file(str(tmp_path / 'ref/model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    print(f'\nSLURM {cluster.version}: {len(stops)} stops at steps {stops}, resumed at {starts} (0 steps lost); '
          f'{time.time() - t0:.0f} s')


def test_a_users_scancel_stays_cancelled_and_keeps_its_progress(cluster, tmp_path):
    out = tmp_path / 'run'
    job = cluster.submit('--time', '10', '--ntasks-per-node', '1', out=out, extra=train_flags('--epochs', '100000'))
    wait_for(lambda: any(e.get('stage') == 'train' for e in events(out)), 120, 'training to start')
    time.sleep(3)
    cluster.run('scancel', str(job))
    info = wait_for(lambda: (lambda i: i if i['JobState'] == 'CANCELLED' else None)(cluster.job(job)), 90, 'cancel')
    time.sleep(5)
    info = cluster.job(job)
    assert info['JobState'] == 'CANCELLED' and info['Restarts'] == '0', info  # not turned into a requeue
    assert info['ExitCode'] == '75:0'  # the processes' status reaches SLURM: stopped with a checkpoint
    stops = [e['step'] for e in events(out) if e.get('event') == 'preempted']
    assert len(stops) == 1 and torch.load(out / 'ckpt_last.pth', weights_only=True)['step'] == stops[0] > 0


def test_two_jobs_on_one_node_never_share_a_rendezvous(cluster, tmp_path):
    """Two jobs of two processes each, at once on one node: each picks its own free port, both complete."""
    jobs = [cluster.submit('--time', '10', '--ntasks-per-node', '2', '--cpus-per-task', '1', out=tmp_path / f'r{i}',
                           extra=train_flags('--max-steps', '40', '--batch-size', '8')) for i in range(2)]
    wait_for(lambda: all(cluster.job(j)['JobState'] in ('COMPLETED', 'FAILED', 'CANCELLED') for j in jobs), 300,
             'both jobs')
    ports = set()
    for j in jobs:
        log = (cluster.root / f'ldae-{j}.log').read_text()
        assert cluster.job(j)['JobState'] == 'COMPLETED', log[-3000:]
        assert '2 process(es)' in log
        ports |= set(re.findall(r'rendezvous localhost:(\d+)', log))
    assert len(ports) == 2
    assert all(any(e.get('world') == 2 for e in events(tmp_path / f'r{i}')) for i in range(2))


def test_an_allocation_without_what_the_job_needs_stops_at_once(cluster, tmp_path):
    job = cluster.submit('--time', '5', '--ntasks-per-node', '1', out=tmp_path / 'a', extra=train_flags(),
                         env={'NPROC_PER_NODE': '2'})
    wait_for(lambda: cluster.job(job)['JobState'] == 'FAILED', 60, 'the refusal')
    log = (cluster.root / f'ldae-{job}.log').read_text()
    assert '2 process(es) per node on 1 node(s) need 2 tasks, but the allocation has 1' in log
    assert '--ntasks-per-node 2' in log and not (tmp_path / 'a').exists()
    job = cluster.submit('--time', '5', '--ntasks-per-node', '1', out=tmp_path / 'b',
                         extra=train_flags('--device', 'cuda'))
    wait_for(lambda: cluster.job(job)['JobState'] == 'FAILED', 60, 'the refusal')
    assert '--device cuda, but this job has no GPU' in (cluster.root / f'ldae-{job}.log').read_text()


def test_a_request_is_checked_before_it_is_submitted(cluster):
    """``sbatch --test-only`` (the README's advice): a request the cluster can give is accepted, one it cannot (more
    CPUs than the node has) refused, without submitting anything."""
    ok = cluster.run('sbatch', '--test-only', '--ntasks-per-node', '2', str(SCRIPT), 'r', 'd', 'o', check=False)
    assert ok.returncode == 0 and 'to start at' in ok.stderr
    bad = cluster.run('sbatch', '--test-only', '--ntasks-per-node', '64', str(SCRIPT), 'r', 'd', 'o', check=False)
    assert bad.returncode != 0 and 'not available' in bad.stderr.lower()
