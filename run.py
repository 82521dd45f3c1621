#!/usr/bin/env python
"""fidmed's Hydra entry point: train (or reuse) a StyleGAN2 generator, then evaluate it.

    python run.py                                  # embedded default: phantom modality, small GAN, FD
    python run.py experiment=demo                  # what `make demo` runs (labelled random-init fallback)
    python run.py --cfg job                        # print the composed config
    python run.py -m seed=0,1 trainer.kimg=1,2     # multirun over the cartesian product
    python run.py stage=evaluate generator=PATH    # evaluate an existing generator
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HYDRA_FULL_ERROR", "0")

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


if __name__ == "__main__":
    main()
