"""torchrun for runs a cluster may stop: torch's own launcher, run in this process, with a stop
signal that reaches every worker and the exit status 75 when they all saved.

    python preemptible_torchrun.py --nproc_per_node 4 train.py --model_name qwen2-2b ...
    # in place of: torchrun --nproc_per_node 4 train.py ...  (every torchrun flag works the same)

Two things differ from plain torchrun (torch.distributed.run), both about preemption:
- SIGTERM and SIGUSR1 sent to this process (the agent) go on to its workers, and nothing else
  happens: each train.py finishes its optimizer step or evaluation batch, saves and exits 75
  (run_folder.PREEMPTED_EXIT_CODE). Plain torchrun ignores SIGUSR1 unless --signals_to_handle
  names it (the signal then kills it), and on SIGTERM it kills its workers after
  --shutdown_timeout (30 s by default), whatever they are doing, and exits 1.
- When the first worker to end exited 75, this process exits 75 too, where torchrun reports a
  failure (ChildFailedError, exit 1). A worker exits 75 only after every worker has saved (train.py
  waits for all of them first), so 75 here means: resume me with --resume_from_checkpoint latest.

The other signals (SIGINT, SIGHUP, SIGQUIT) keep torchrun's handling: they end the workers.
"""
import os
import signal
import sys
from pathlib import Path

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from run_folder import PREEMPTED_EXIT_CODE, STOP_SIGNALS  # torch-free: the agent needs no model code


def _children():
    """The process ids whose parent is this process (the agent's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command name)"
        except (OSError, IndexError):  # ended meanwhile
            continue
        if int(fields[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def _forward(signum, frame):
    """A stop signal: pass it to every worker; before any worker exists there is nothing to save,
    and the signal ends this process as it would have without the handler."""
    workers = _children()
    if not workers:
        raise SystemExit(128 + signum)
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


@record  # as torchrun's own main: a failure's traceback goes to the error file torch names
def main(argv=None):
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    ours = {sig.name for sig in STOP_SIGNALS}
    args.signals_to_handle = ",".join(name for name in args.signals_to_handle.split(",") if name.strip() not in ours)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _forward)
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        if first.exitcode != PREEMPTED_EXIT_CODE:
            raise
        print(f"preemptible_torchrun: the workers saved and exited {PREEMPTED_EXIT_CODE} (local rank {rank} first); "
              "rerun with --resume_from_checkpoint latest to continue", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
