#!/usr/bin/env python
"""fidmed's Hydra entry point: train (or reuse) a StyleGAN2 generator, then evaluate it.

    python run.py                                  # embedded default: phantom modality, small GAN, FD
    python run.py experiment=demo                  # what `make demo` runs (labelled random-init fallback)
    python run.py --cfg job                        # print the composed config
    python run.py -m seed=0,1 schedule.kimg=1,2     # multirun over the cartesian product
    python run.py stage=evaluate generator=PATH    # evaluate an existing generator
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

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from fidmed.errors import FidmedError
    from fidmed.job import report_error, run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # Lightning's DDP launcher re-runs this script for ranks > 0; they must run *this* job, not the whole sweep.
    os.environ[DDP_JOB_ENV] = json.dumps({"overrides": list(hc.overrides.task), "run_dir": hc.runtime.output_dir})
    name = hc.job.override_dirname or "default"
    try:
        return run_job(cfg, hc.runtime.output_dir, job_name=name)
    except FidmedError as exc:
        report_error(exc)
        if multirun:  # one failed job must not stop the others of a sweep
            with open(os.path.join(hc.runtime.output_dir, "error.txt"), "w") as f:
                f.write(f"{exc}\n")
            return None
        sys.exit(2)


def ddp_child_argv(argv: list[str]) -> list[str]:
    """A DDP child (LOCAL_RANK > 0, started by Lightning from a job of this script) runs its parent's job: the
    job's own overrides and output folder, in RUN mode, instead of the command line (which may be a sweep)."""
    job = os.environ.get(DDP_JOB_ENV)
    if not job or os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        return argv
    job = json.loads(job)
    return [argv[0], *job["overrides"], f"hydra.run.dir={json.dumps(job['run_dir'])}", "hydra.output_subdir=null",
            "hydra.mode=RUN"]


def check_launcher(argv: list[str]) -> None:
    """A launcher plugin that is not installed: one clear message naming the fix, before any job starts."""
    from fidmed.sweeps import check_launcher_available

    for arg in argv:
        if arg.startswith("hydra/launcher="):
            check_launcher_available(arg.split("=", 1)[1])


if __name__ == "__main__":
    from fidmed.errors import FidmedError

    sys.argv = ddp_child_argv(sys.argv)
    try:
        check_launcher(sys.argv[1:])
    except FidmedError as exc:
        print(f"fidmed: error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
