"""Where a sweep's runs execute, through submitit (no scheduler of our own):

- serial: one after another in this process's terminal;
- local: up to --max_parallel at once on this machine (submitit's LocalExecutor), one GPU each
  through CUDA_VISIBLE_DEVICES, or processes on the CPU when there is no GPU;
- slurm: one job array (submitit's SlurmExecutor); the ID stage is a job the array waits for and
  the report a job that waits for the array, so the command returns once they are queued.

Every run is a `TrainJob`: train.py's command, resumed from the run's latest checkpoint when it has
one and skipped when it is complete or another process holds its folder's lock, decided when the
job starts (a requeued job resumes); a folder holding the run with other arguments is refused, or
trained again from the start when the sweep was asked to (reproduce.py --restart_changed_runs). On
the scheduler's warning signal (submitit's USR2, --signal_delay_s before the end, on SLURM and under
the local launcher alike) the job sends SIGTERM to train.py (the run script execs it, or forwards
the signal with several seeds), which finishes its step, saves and exits 75
(run_folder.PREEMPTED_EXIT_CODE); the job waits for that (up to the delay less REQUEUE_MARGIN_S)
and submitit requeues it. train.py itself ignores USR2 (a cluster signals every process of a job's
step), and handles the SIGTERM of a preemption on its own. The ID and report jobs (CommandJob),
warned, stop their command the same way and are requeued to run it again. launch_flag_problem
refuses a delay too short to save in, and sbatch_refusal turns sbatch's refusals into one line
naming the flag.
"""
import contextlib
import io
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import submitit

import run_folder

LAUNCHERS = ("serial", "local", "slurm")
LAUNCHES = "launches.jsonl"  # one line per run started and ended: where, when, how it ended
STOP_GRACE_S = 80  # the least time train.py is given to finish its step and save after SIGTERM
REQUEUE_MARGIN_S = 10  # after train.py has saved: submitit pickles the job and asks for the requeue
MIN_SIGNAL_DELAY_S = STOP_GRACE_S + REQUEUE_MARGIN_S
SLURM_RECORDED = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT")  # in launches.jsonl: which job, which requeue


class RunFailed(RuntimeError):
    """A run's command ended with `code` (75: preempted, resumable)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def run_state(folder, identity=None):
    """"running" (another process holds its lock: run_folder.py), "complete" (an `end` event and
    final/README.md), "interrupted" (a checkpoint to resume from) or "new". Given the `identity`
    ({flag: value}) the run would have now, a complete or interrupted run whose recorded identity
    differs is "changed" (run_changes says how)."""
    folder = Path(folder)
    if run_folder.holder(folder) is not None:
        return "running"
    state = "new"
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and (folder / "final" / "README.md").is_file():
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if events and events[-1]["event"] == "end":
            state = "complete"
    if state == "new" and run_folder.list_checkpoints(folder):
        state = "interrupted"
    if state != "new" and identity is not None and run_changes(folder, identity):
        return "changed"
    return state


def run_changes(folder, identity):
    """["--flag THEN → NOW", ...]: how `identity` differs from the one recorded in `folder`."""
    recorded = run_folder.read_identity(folder, identity)
    if recorded is None:
        return [f"no recorded identity ({run_folder.IDENTITY_FILE} or config.json)"]
    return run_folder.identity_changes(recorded, identity)


def _ignore_warning_signal():
    """preexec of train.py: the scheduler's USR2 is for the job (TrainJob.checkpoint), not for it."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class Run:
    """One run of a sweep: its folder name says arm, weight and seed."""
    name: str
    arm: str
    weight: float | None  # None: an LM-loss-only arm (the baseline)
    seed: int
    folder: Path
    command: list = field(default_factory=list)  # train.py's command (through a run script), no resume flags
    identity: dict | None = None  # the arguments that define it (train_args.run_identity), None: unchecked
    restart_changed: bool = False  # a folder holding this run with another identity is trained again from the start


class ChildProcessJob(submitit.helpers.Checkpointable):
    """A job whose work is one child process. The child is waited for by a thread of the job's own,
    never by the main thread: submitit calls `checkpoint` from a signal handler on the main thread,
    and had that thread been inside Popen.wait(), the handler could neither poll nor wait (Popen's
    lock is held by the frame it interrupted) and would sit out its whole grace. The main thread
    waits on an Event instead, which a signal interrupts; the handler waits on the same Event, after
    sending the child SIGTERM, so that no child outlives its job when the job is requeued."""

    grace_s = STOP_GRACE_S  # how long the warning handler waits for the child to exit

    def __getstate__(self):  # what submitit pickles: never the live process or its waiter
        return {k: v for k, v in self.__dict__.items() if k not in ("_process", "_ended")}

    def __setstate__(self, state):
        self.__dict__.update(state, _process=None, _ended=None)

    def _start(self, command, cwd, on_end=None, **popen):
        """Start `command` and a thread that reaps it, calls on_end(exit status) and then sets the
        Event the job waits on (no zombie stays; on_end runs even when submitit exits from its
        handler)."""
        self._ended = threading.Event()
        # Same process group as this one: a terminal's Ctrl-C (serial launcher) still reaches the child.
        self._process = subprocess.Popen(command, cwd=cwd, **popen)
        process, ended = self._process, self._ended

        def reap():
            code = process.wait()
            if on_end is not None:
                on_end(code)
            ended.set()

        threading.Thread(target=reap, name=f"wait for {command[0]}", daemon=True).start()

    def _wait(self):
        """The child's exit status, once it has exited."""
        self._ended.wait()
        return self._process.returncode

    def _stop_child(self, what, otherwise=""):
        """SIGTERM to the child, then wait for it to exit (at most grace_s); if it does not, one line
        says so: "{what} did not stop ...{otherwise}"."""
        if self._process is None or self._ended.is_set():
            return
        with contextlib.suppress(ProcessLookupError):  # it ended since: nothing to stop
            os.kill(self._process.pid, signal.SIGTERM)
        if not self._ended.wait(timeout=self.grace_s):
            print(f"[reproduce] {what} did not stop within {self.grace_s} s of SIGTERM{otherwise}", flush=True)


class CommandJob(ChildProcessJob):
    """A command run in `cwd` (the sweep's ID and report jobs); raises RunFailed with its exit
    status when it fails. Warned by the scheduler, it stops the command and is requeued, which
    runs the command again from the start (neither stage keeps half its work)."""

    def __init__(self, name, command, cwd, grace_s=STOP_GRACE_S):
        self.name, self.command, self.cwd, self.grace_s = name, list(command), str(cwd), grace_s
        self._process, self._ended = None, None

    def __call__(self):
        self._start(self.command, self.cwd)
        code = self._wait()
        if code != 0:
            raise RunFailed(f"{self.name}: `{' '.join(self.command)}` exited with {code}", code)
        return "done"

    def checkpoint(self, *args, **kwargs):
        self._stop_child(f"the {self.name} job's command")
        return super().checkpoint(*args, **kwargs)


class TrainJob(ChildProcessJob):
    """One run as a job (see the module docstring); returns "skipped" or "done". Its train.py is
    waited for as ChildProcessJob says."""

    def __init__(self, run, cwd, log_dir, grace_s=STOP_GRACE_S):
        self.run, self.cwd, self.log_dir = run, str(cwd), str(log_dir)
        self.grace_s = grace_s  # how long the warning handler waits for train.py to save and exit
        self._process, self._ended = None, None

    def _record(self, **event):
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        line = {"run": self.run.name, "time": time.time(), "pid": os.getpid(),
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                **{k: os.environ[k] for k in SLURM_RECORDED if k in os.environ}, **event}
        with open(Path(self.log_dir) / LAUNCHES, "a") as f:
            f.write(json.dumps(line) + "\n")

    def __call__(self):
        state = run_state(self.run.folder, self.run.identity)
        if state in ("complete", "running"):  # running: another job has it (a sweep queued twice)
            return "skipped"
        if state == "changed" and not self.run.restart_changed:
            raise RunFailed(f"{self.run.name}: {self.run.folder} holds this run with other arguments (then → now): "
                            f"{run_folder.describe_changes(run_changes(self.run.folder, self.run.identity))}; "
                            "reproduce.py --restart_changed_runs trains it again from the start", 2)
        # A folder with no checkpoint holds nothing to keep (nor, asked to, one of a changed run);
        # one with a checkpoint continues.
        resume = ["--resume_from_checkpoint", "latest"] if state == "interrupted" else ["--overwrite_output_dir"]
        self._record(event="start", state=state)
        print("[reproduce] $ " + shlex.join([*self.run.command, *resume]), flush=True)
        self._start([*self.run.command, *resume], self.cwd, on_end=lambda code: self._record(event="end", exit_code=code),
                    preexec_fn=_ignore_warning_signal)
        code = self._wait()
        if code == run_folder.PREEMPTED_EXIT_CODE:
            raise RunFailed(f"{self.run.name}: preempted after saving a checkpoint (exit {code}); it resumes when "
                            "requeued or when the same command is run again", code)
        if code != 0:
            raise RunFailed(f"{self.run.name}: train.py exited with {code}", code)
        return "done"

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on the warning signal, from its handler: stop train.py at a saved
        step (SIGTERM; the run scripts hand it over or forward it), wait for it to exit (at most
        grace_s), then be requeued as the same job, which resumes from that checkpoint."""
        self._stop_child(f"{self.run.name}: train.py", "; its previous checkpoint stays")
        return super().checkpoint(*args, **kwargs)


def launch_serial(jobs, log):
    """Run the jobs one after another here; the first failure ends the sweep with its status."""
    for job in jobs:
        resuming = run_state(job.run.folder, job.run.identity) == "interrupted"
        log(f"run {job.run.name}: " + (f"resuming {job.run.folder} from its latest checkpoint" if resuming
                                       else f"training into {job.run.folder}"))
        try:
            job()
        except RunFailed as err:
            log(f"stopped: {err}; rerun the same command to continue")
            sys.exit(err.code)
        log(f"run {job.run.name}: done")


def visible_gpus(device_count):
    """The GPU indices a local job may be given: CUDA_VISIBLE_DEVICES's when it is set (a job's own
    CUDA_VISIBLE_DEVICES replaces it, so it must name the same devices), else 0..device_count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(device_count))
    return [int(x) for x in listed.split(",") if x.strip().isdigit()][:device_count]


def launch_local(jobs, log, log_dir, max_parallel, gpus, timeout_min, signal_delay_s=MIN_SIGNAL_DELAY_S):
    """Up to `max_parallel` jobs at once through submitit's LocalExecutor, each given one of `gpus`
    (CUDA device indices) or, with none, the CPU, and warned (USR2) `signal_delay_s` before its
    `timeout_min` (submitit's own default, 30 s, is less than a save needs). Returns the failures
    [(run name, RunFailed or other error)] after every job has ended."""
    slots = queue.Queue()
    for gpu in (list(gpus)[:max_parallel] if gpus else [None] * max_parallel):
        slots.put(gpu)

    def one(job):
        gpu = slots.get()
        try:
            executor = submitit.LocalExecutor(folder=log_dir)
            executor.update_parameters(timeout_min=timeout_min, signal_delay_s=signal_delay_s,
                                       gpus_per_node=0 if gpu is None else 1,
                                       visible_gpus=() if gpu is None else (gpu,))
            submitted = executor.submit(job)
            where = "the CPU" if gpu is None else f"GPU {gpu}"
            log(f"run {job.run.name}: started on {where} (local job {submitted.job_id}, log {submitted.paths.stdout})")
            outcome = submitted.result()
            log(f"run {job.run.name}: {outcome}")
        finally:
            slots.put(gpu)

    failures = []
    with ThreadPoolExecutor(max_workers=max_parallel) as pool:
        futures = [(job, pool.submit(one, job)) for job in jobs]
        for job, future in futures:
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - a failed run is reported, the others go on
                failures.append((job.run.name, err))
                log(f"run {job.run.name}: FAILED ({str(err).strip().splitlines()[-1]})")
    return failures


def launch_flag_problem(args):
    """One line on what is wrong with reproduce.py's launcher flags, or None."""
    if args.gpus_per_run > 1:
        return (f"argument --gpus_per_run: {args.gpus_per_run} GPUs per run, but train.py runs as one process under "
                "these launchers and would use one of them; pass 0 or 1 (several GPUs for one run: torchrun, "
                "docs/training.md)")
    if args.launcher == "serial":
        return None  # no time limit, no warning
    if args.signal_delay_s < MIN_SIGNAL_DELAY_S:
        return (f"argument --signal_delay_s: a warning {args.signal_delay_s} s ahead cannot cover a save: train.py is "
                f"given {STOP_GRACE_S} s to finish its step and save, and the requeue needs {REQUEUE_MARGIN_S} s more; "
                f"pass >= {MIN_SIGNAL_DELAY_S}")
    if args.signal_delay_s >= args.timeout_min * 60:
        return (f"argument --signal_delay_s: a warning {args.signal_delay_s} s ahead of a {args.timeout_min}-minute "
                "time limit (--timeout_min) would come before the run starts; pass a longer --timeout_min")
    return None


# What sbatch's refusals mean in reproduce.py's flags: (words in its message, the flag and what to do).
SBATCH_REFUSALS = (
    ("generic resource", "--gpus_per_run {gpus_per_run} asks for GPUs the partition does not have: pass "
                         "--gpus_per_run 0 or a GPU partition (--slurm_partition)"),
    # before "partition": sbatch says "Invalid account or account/partition combination specified"
    ("account", "--slurm_account {slurm_account} (with --slurm_partition {slurm_partition}): not an account you "
                "may use there (sacctmgr show assoc user=$USER)"),
    ("partition", "--slurm_partition {slurm_partition}: not a partition of this cluster (sinfo lists them)"),
    ("qos", "--slurm_extra qos=...: not a QOS you may use"),
    ("time limit", "--timeout_min {timeout_min}: beyond the partition's time limit (sinfo -o '%P %l')"),
    ("node configuration", "--gpus_per_run {gpus_per_run} / --cpus_per_run {cpus_per_run}: no node has that many"),
)


def sbatch_refusal(message, args):
    """One line for sbatch's error `message`: the reproduce.py flag it is about, when we know it."""
    said = " ".join(line.strip() for line in message.strip().splitlines() if "error" in line.lower()) or message.strip()
    for words, advice in SBATCH_REFUSALS:
        if words in said.lower():
            return f"sbatch refused the job ({said}): {advice.format(**vars(args))}"
    return f"sbatch refused the job ({said}); check the --slurm_* flags, --gpus_per_run and --cpus_per_run"


def slurm_parameters(args, array_size=None):
    """SlurmExecutor parameters from reproduce.py's --slurm_* flags: one task per job with
    --gpus_per_run GPUs, --timeout_min, the warning signal --signal_delay_s before the end, requeue
    allowed, and --slurm_extra KEY=VALUE (or KEY alone) as sbatch options."""
    extra = {"requeue": True}
    for item in args.slurm_extra or []:
        key, sep, value = item.partition("=")
        extra[key.lstrip("-")] = value if sep else True
    params = {"time": args.timeout_min, "gpus_per_node": args.gpus_per_run, "ntasks_per_node": 1,
              "signal_delay_s": args.signal_delay_s, "job_name": f"reproduce_{Path(args.runs_dir).name}",
              "additional_parameters": extra, "stderr_to_stdout": True}
    if args.cpus_per_run:
        params["cpus_per_task"] = args.cpus_per_run
    if args.slurm_partition:
        params["partition"] = args.slurm_partition
    if args.slurm_account:
        params["account"] = args.slurm_account
    if array_size and args.max_parallel:
        params["array_parallelism"] = args.max_parallel
    return params


def launch_slurm(args, jobs, ids_job, report_job, log_dir, log):
    """Queue [the ID job], the array of training jobs (after the ID job succeeds) and the report job
    (after every run has ended, whichever way). Returns {"ids", "array", "report"}: job ids."""
    queued = {}

    def submit(params, dependency, functions):
        if dependency:
            params["additional_parameters"] = {**params["additional_parameters"], "dependency": dependency}
        executor = submitit.SlurmExecutor(folder=log_dir)  # one per submission: parameters only accumulate
        executor.update_parameters(**params)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error, then raises it
                return executor.submit_array(functions)
        except submitit.core.utils.FailedJobError as err:
            if queued:  # nothing half-queued stays behind: the same command, fixed, queues it all
                subprocess.run(["scancel", *queued.values()], check=False)
            sys.exit(f"error: {sbatch_refusal(str(err), args)}" + (
                f" (cancelled the jobs queued before it: {', '.join(queued.values())})" if queued else ""))

    after = None
    if ids_job is not None:
        (job,) = submit(slurm_parameters(args), None, [ids_job])
        queued["ids"], after = job.job_id, f"afterok:{job.job_id}"
        log(f"ids: queued as SLURM job {job.job_id}")
    if jobs:
        array = submit(slurm_parameters(args, len(jobs)), after, jobs)
        array_id = array[0].job_id.split("_")[0]
        queued["array"], after = array_id, f"afterany:{array_id}"
        log(f"runs: queued {len(jobs)} as SLURM job array {array_id} ({', '.join(j.run.name for j in jobs)})")
    report_params = slurm_parameters(args)
    if not args.diagnose_checkpoints:
        del report_params["gpus_per_node"]  # the report reads run folders: no GPU (diagnostics load models)
    (job,) = submit(report_params, after, [report_job])
    queued["report"] = job.job_id
    log(f"report: queued as SLURM job {job.job_id}, after the runs; logs in {log_dir}")
    return queued
