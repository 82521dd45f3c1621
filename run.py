#!/usr/bin/env python
"""fidmed's Hydra entry point: train (or reuse) a StyleGAN2 generator, then evaluate it.

    python run.py                                  # embedded default: phantom modality, small GAN, FD
    python run.py experiment=demo                  # what `make demo` runs (labelled random-init fallback)
    python run.py --cfg job                        # print the composed config
    python run.py -m seed=0,1 schedule.kimg=1,2    # multirun over the cartesian product
    python run.py stage=evaluate generator=PATH    # evaluate an existing generator

Exit status: 0 when every job succeeded; 2 for a mistake a user can fix (one line naming the fix, also in the
run folder's error.txt and run.log); 1 when a job of a multirun failed (the failed jobs are listed at the end).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

os.environ.setdefault("HYDRA_FULL_ERROR", "0")
# conf/hydra/launcher/submitit_*.yaml share their names with the plugin's schemas on purpose (Hydra validates
# our values against them); Hydra 1.3 warns about that matching on every run.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*' is validated against ConfigStore schema")
DDP_JOB_ENV = "FIDMED_DDP_JOB"

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fidmed.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from fidmed.config import check_config
    from fidmed.errors import FidmedError
    from fidmed.job import record_failure, run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # Lightning's DDP launcher re-runs this script for ranks > 0; they must run *this* job, not the whole sweep.
    os.environ[DDP_JOB_ENV] = json.dumps({"overrides": list(hc.overrides.task), "run_dir": hc.runtime.output_dir})
    name = hc.job.override_dirname or "default"
    try:
        check_config(cfg)
        return run_job(cfg, hc.runtime.output_dir, job_name=name)
    except FidmedError as exc:
        record_failure(hc.runtime.output_dir, exc)
        if multirun:  # one failed job must not stop the others of a sweep; the summary at the end lists it
            return None
        sys.exit(2)
    except BaseException as exc:  # a bug or an interrupt: keep the traceback, but leave the reason on disk too
        record_failure(hc.runtime.output_dir, exc)
        raise


def ddp_child_argv(argv: list[str]) -> list[str]:
    """A DDP child (LOCAL_RANK > 0, started by Lightning from a job of this script) runs its parent's job: the
    job's own overrides and output folder, in RUN mode, instead of the command line (which may be a sweep)."""
    job = os.environ.get(DDP_JOB_ENV)
    if not job or os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        return argv
    job = json.loads(job)
    return [
        argv[0],
        *job["overrides"],
        f"hydra.run.dir={json.dumps(job['run_dir'])}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]


def preflight(argv: list[str]) -> None:
    """Checks before Hydra starts: a launcher plugin that is not installed, and, for a single run, a config that
    does not compose (a wrong type, an unknown key), reported as one line naming the fix instead of Hydra's
    multi-line message. Raises FidmedError."""
    from fidmed.config import compose_config
    from fidmed.sweep import check_launcher_available

    for arg in argv:
        if arg.startswith("hydra/launcher="):
            check_launcher_available(arg.split("=", 1)[1])
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in (
            "-m",
            "--multirun",
            "-h",
            "--help",
            "--hydra-help",
            "-i",
            "--info",
            "-sc",
            "--shell-completion",
            "-cp",
            "--config-path",
            "-cn",
            "--config-name",
            "-cd",
            "--config-dir",
        ) or arg.startswith("--info"):
            return  # a sweep composes each job itself; help, info and other config trees are Hydra's business
        if arg in ("-c", "--cfg", "-p", "--package", "--resolve"):
            if arg != "--resolve":
                next(args, None)  # the flag's value
            continue
        if not arg.startswith("-") and not arg.startswith(("hydra.", "hydra/", "+hydra.", "~hydra")):
            overrides.append(arg)
    compose_config(overrides)  # raises ConfigError: one line naming the fix


if __name__ == "__main__":
    from fidmed.errors import FidmedError

    sys.argv = ddp_child_argv(sys.argv)
    try:
        if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
            preflight(sys.argv[1:])
    except FidmedError as exc:
        print(f"fidmed: error: {exc}", file=sys.stderr)
        sys.exit(2)
    from fidmed.job import multirun_exit_code

    main()
    sys.exit(multirun_exit_code())
