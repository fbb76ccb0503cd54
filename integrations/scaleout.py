"""Scale-out of text-to-2D runs over processes with accelerate (`accelerate launch` or `torchrun`).

The job list is built identically on every process, in a fixed order: prompt x method x seed distillation
runs, then (for FID) prompt x seed DDIM reference samples. `PartialState().split_between_processes` hands
each process a contiguous share; every job writes its own folder (atomically, and resumable) plus a
`record.json` describing it (with the index of the process that ran it), and every process writes
`shards/process_<i>_of_<n>.json` listing the jobs it ran. After `wait_for_everyone()` the main process
checks that those lists partition the job list (each job ran exactly once), reads the records back in job
order and hands them to the caller to merge into one results file. Jobs share nothing but the file system:
runs are seeded per job, so any split of the same jobs gives the same files. Processes must see one file
system (one machine, or a shared mount).
"""
import dataclasses
import datetime
import json
import re
from pathlib import Path

import torch

from diffsolve._io import write_json

REFERENCE = "ddim"  # the method name of the DDIM reference samples FID is measured against
# A process that finishes its share waits at the barrier for the slowest one, which can take hours; torch's
# default process-group timeout (10-30 minutes) would abort it. A crashed process still ends the launch at
# once: torchrun / accelerate launch stop the other processes.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: a distillation run (`method` a distiller) or a DDIM reference (`method="ddim"`)."""
    prompt_index: int
    method: str
    seed: int

    @property
    def kind(self):
        return "reference" if self.method == REFERENCE else "distill"

    @property
    def id(self):
        return f"{self.method}/{self.prompt_index:02d}/seed{self.seed}"


def build_jobs(n_prompts, methods, seeds, reference=False):
    """The full ordered job list: for each prompt, each method, each seed; then, with `reference`, a DDIM
    sample for each prompt and seed. Duplicate methods or seeds are an error (a job would run twice)."""
    methods, seeds = list(methods), list(seeds)
    if int(n_prompts) != n_prompts or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive integer, got {n_prompts!r}")
    for name, values in (("methods", methods), ("seeds", seeds)):
        if not values:
            raise ValueError(f"{name} is empty: give at least one")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} has duplicates, which would run the same job twice: {values}")
    if REFERENCE in methods:
        raise ValueError(f"{REFERENCE!r} is the reference sampler's name, not a distiller")
    jobs = [Job(i, m, s) for i in range(n_prompts) for m in methods for s in seeds]
    if reference:
        jobs += [Job(i, REFERENCE, s) for i in range(n_prompts) for s in seeds]
    return jobs


def process_state(device=None):
    """(accelerate's `PartialState`, this process's device). One process when not launched by accelerate /
    torchrun. `device=None` takes accelerate's device for the process (cuda:<local rank> on GPUs, else the
    CPU); "cpu", or no CUDA, forces CPU and the gloo backend. An explicit non-CPU device with several
    processes is refused: they would all share it."""
    from accelerate import PartialState
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    if device is None:
        return state, state.device
    if state.num_processes > 1 and torch.device(device).type != "cpu":
        raise ValueError(f"--device {device} with {state.num_processes} processes puts them all on one device; "
                         "leave --device out so that each process takes its own GPU")
    return state, torch.device(device)


def _slug(text, n=48):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n]


def job_folders(prompts):
    """job -> its folder relative to the output folder: <method>/<prompt index>_<slug>/seed<seed>."""
    def rel(job):
        return Path(job.method) / f"{job.prompt_index:02d}_{_slug(prompts[job.prompt_index])}" / f"seed{job.seed}"
    return rel


def shard_path(out_dir, process_index, num_processes):
    return Path(out_dir) / "shards" / f"process_{process_index}_of_{num_processes}.json"


def run_sharded(jobs, job_dir, run_job, out_dir, state):
    """Run this process's share of `jobs`. `job_dir(job)` is the job's folder relative to `out_dir`;
    `run_job(job, out_dir / job_dir(job))` runs it and returns a JSON-able record, written to
    `record.json` in that folder with the job id, its kind, the folder and the process index added.
    Returns, on the main process after every process is done, the records of all jobs in job order
    (None on the others)."""
    out_dir = Path(out_dir)
    ran = []
    with state.split_between_processes(list(jobs)) as mine:
        for job in mine:
            rel = Path(job_dir(job))
            record = dict(run_job(job, out_dir / rel))
            record.update(job=job.id, kind=job.kind, dir=rel.as_posix(), process_index=state.process_index)
            write_json(out_dir / rel / "record.json", record)
            ran.append(job.id)
    write_json(shard_path(out_dir, state.process_index, state.num_processes),
               {"process_index": state.process_index, "num_processes": state.num_processes, "jobs": ran})
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return collect_records(jobs, job_dir, out_dir, state.num_processes)


def read_assignment(job_ids, out_dir, num_processes):
    """{job id: process index} from the shard lists of `num_processes` processes, after checking that
    they partition `job_ids`: every job ran, and exactly once."""
    assignment = {}
    for i in range(num_processes):
        path = shard_path(out_dir, i, num_processes)
        if not path.is_file():
            raise FileNotFoundError(f"process {i} of {num_processes} left no shard list at {path}")
        for job_id in json.loads(path.read_text())["jobs"]:
            if job_id in assignment:
                raise RuntimeError(f"job {job_id} ran twice: on process {assignment[job_id]} and process {i}")
            assignment[job_id] = i
    missing, extra = sorted(set(job_ids) - set(assignment)), sorted(set(assignment) - set(job_ids))
    if missing or extra:
        raise RuntimeError(f"the shard lists do not match the job list: missing {missing}, unexpected {extra}")
    return assignment


def collect_records(jobs, job_dir, out_dir, num_processes):
    """The records of `jobs` in job order, each checked against the shard lists (`read_assignment`)."""
    out_dir = Path(out_dir)
    assignment = read_assignment([job.id for job in jobs], out_dir, num_processes)
    records = []
    for job in jobs:
        path = out_dir / job_dir(job) / "record.json"
        if not path.is_file():
            raise FileNotFoundError(f"job {job.id} left no record at {path}")
        record = json.loads(path.read_text())
        if record.get("job") != job.id or record.get("process_index") != assignment[job.id]:
            raise RuntimeError(f"{path} is not this run's record of job {job.id} on process "
                               f"{assignment[job.id]}: {record.get('job')!r} on {record.get('process_index')!r}")
        records.append(record)
    return records


def finish(state):
    """Tear the process group down (a no-op for a single process)."""
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        state.destroy_process_group()
