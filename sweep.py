#!/usr/bin/env python
"""W&B sweeps over run.py's Hydra overrides.

    python sweep.py conf/sweep/augmentation.yaml --count 20              # register with W&B, run an agent
    python sweep.py conf/sweep/augmentation.yaml --sweep-id ID --count 5  # one more agent on an existing sweep
    python sweep.py conf/sweep/study_grid.yaml --local                   # no W&B server: run the grid here
    python sweep.py conf/sweep/augmentation.yaml --local --count 8 -- schedule.kimg=100   # extra fixed overrides

Every parameter value is checked against the Hydra config (composed once per value) before any job starts.
Online, each agent trial composes run.py's config with the trial's overrides and runs fidmed.job.run_job in
this process, logging into the trial's W&B run. With --local (or WANDB_MODE=offline), grid and random specs are
expanded here and each trial runs as its own `run.py` process with offline W&B runs (`wandb sync` uploads
them later); bayes needs the server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
CONF = REPO / "conf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec YAML (conf/sweep/*.yaml)")
    p.add_argument("--count", type=int, default=None, help="trials to run (random: required locally)")
    p.add_argument("--project", default=None, help="W&B project (default: the spec's, else fidmed-sweeps)")
    p.add_argument("--entity", default=None, help="W&B entity (team or user)")
    p.add_argument("--local", action="store_true", help="no W&B server: expand grid/random here, offline runs")
    p.add_argument("--sweep-id", default=None, help="join an existing W&B sweep instead of registering one")
    p.add_argument("--seed", type=int, default=0, help="seed of a local random sweep's draws")
    p.add_argument("--sweep-dir", default=None, help="local sweep output folder (default outputs/sweeps/<time>)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the local trials, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.overrides = extra  # fixed run.py overrides for every trial, after --
    return args


def main(argv: list[str] | None = None) -> int:
    from fidmed.errors import FidmedError
    from fidmed.job import report_error

    args = parse_args(argv)
    try:
        return run(args)
    except FidmedError as exc:
        report_error(exc)
        return 2


def run(args: argparse.Namespace) -> int:
    from fidmed.sweeps import expand_local, load_spec, to_overrides, validate_against_config

    spec = load_spec(args.spec)
    offline = args.local or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    if offline and spec.method == "bayes":
        expand_local(spec)  # raises the "needs the server" error
    validate_against_config(spec, CONF, args.overrides)
    project = args.project or spec.extra.pop("project", None) or "fidmed-sweeps"
    entity = args.entity or spec.extra.pop("entity", None)
    if not offline:
        return run_online(spec, args, project, entity)

    trials = expand_local(spec, args.count, seed=args.seed)
    sweep_dir = Path(args.sweep_dir or REPO / "outputs" / "sweeps" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    print(f"local {spec.method} sweep {spec.name or args.spec}: {len(trials)} trial(s) -> {sweep_dir}")
    failed = []
    for i, params in enumerate(trials):
        overrides = [*args.overrides, *to_overrides(params)]
        print(f"[{i + 1}/{len(trials)}] run.py {' '.join(overrides)}")
        if args.dry_run:
            continue
        cmd = [sys.executable, str(REPO / "run.py"), *overrides, "hydra.mode=RUN", f"hydra.run.dir={sweep_dir / str(i)}",
               f"++logger.project={project}", "++logger.mode=offline"]  # ++: harmless for logger=none/csv
        if entity:
            cmd.append(f"++logger.entity={entity}")
        env = {**os.environ, "WANDB_MODE": "offline"}
        if subprocess.run(cmd, env=env).returncode != 0:  # one failed trial does not stop the others
            failed.append(i)
    if failed:
        print(f"{len(failed)} of {len(trials)} trial(s) failed: {failed} (see {sweep_dir}/<n>)", file=sys.stderr)
    if not args.dry_run:
        print(f"offline W&B runs: wandb sync {sweep_dir}/*/wandb/offline-run-*")
    return 1 if failed else 0


def run_online(spec, args: argparse.Namespace, project: str, entity: str | None) -> int:
    import wandb

    sweep_id = args.sweep_id or wandb.sweep(spec.wandb_config(), project=project, entity=entity)
    print(f"W&B sweep {sweep_id} (project {project}); more agents: python sweep.py {args.spec} --sweep-id {sweep_id}")
    wandb.agent(sweep_id, function=lambda: agent_trial(args.overrides, project, entity), project=project,
                entity=entity, count=args.count)
    return 0


def agent_trial(base_overrides: list[str], project: str, entity: str | None) -> None:
    """One trial of a W&B agent: the trial's parameters as overrides, run_job in this process, logging into the
    trial's W&B run (Lightning's WandbLogger attaches to the active run; the job's tracker finishes it)."""
    import wandb
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from fidmed.errors import FidmedError
    from fidmed.job import report_error, run_job
    from fidmed.sweeps import to_overrides

    run = wandb.init(project=project, entity=entity)
    overrides = [*base_overrides, *to_overrides(dict(run.config)), "logger=wandb", "logger.mode=online",
                 "hydra.mode=RUN"]
    run_dir = REPO / "outputs" / "sweeps" / str(run.sweep_id) / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(REPO)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in paths resolve as under run.py
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (run_dir / "overrides.txt").write_text("\n".join(overrides) + "\n")
    try:
        run_job(job_cfg, run_dir, job_name=run.name or run.id)
    except FidmedError as exc:  # the tracker already finished the run as failed; the agent goes on
        report_error(exc)
        if wandb.run is not None:
            wandb.run.finish(exit_code=1)


if __name__ == "__main__":
    sys.exit(main())
