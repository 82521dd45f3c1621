"""Typed configuration: one structured-config schema (a dataclass) per config group, in Hydra's ConfigStore.

Every value has its type and its default here, in one place; the YAML files under ``conf/`` (shipped inside the
package as ``fidmed/conf``) only select and override. So ``schedule.kimg=abc``, ``eval.num_gen=abc`` or a
misspelt key fail when the configuration is composed, with Hydra's/OmegaConf's own message, before anything
runs. Where a group's options are registered members of an extension point, their nodes come from the registry:

    group         nodes                                            schema
    modality      phantom, folder (+ conf/modality/*.yaml)         PhantomModality / FolderModality
    model         stylegan2 (+ conf/model/stylegan2_small.yaml)    StyleGAN2
    augmentation  one per registered augmentation                  the augmentation's config dataclass
    extractor     one per registered extractor                     fidmed.features.registry.ExtractorConfig
    trainer       cpu (+ conf/trainer/gpu.yaml, ddp.yaml)          Trainer (lightning.pytorch.Trainer's arguments)
    schedule      default (+ conf/schedule/study.yaml)             Schedule
    logger        wandb, csv, none                                 WandbLogger / CSVLogger / NoLogger
    eval          default                                          Eval, with one ``eval.<metric>`` node per
                                                                   registered metric that has options

``register_configs()`` fills the ConfigStore (idempotent); ``run.py``, the ``fidmed`` command and the tests call it
before composing. Hydra lets ``+group.new_key=...`` add a key even to a typed node; :func:`check_config` (called
by every entry point right after composition) refuses any key a schema does not declare, with OmegaConf's message.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

from fidmed.errors import ConfigError

#: The packaged config tree (``conf/`` in a checkout is a link to it).
CONF_DIR = Path(__file__).resolve().parent / "conf"


class Stage(str, enum.Enum):
    """all = train (or reuse the generator of the same fingerprint) then evaluate; train; evaluate ``generator``."""

    all = "all"
    train = "train"
    evaluate = "evaluate"


class WeightsMode(str, enum.Enum):
    """Extractor weights: ``pretrained`` never substitutes anything (missing weights offline stop the job with the
    fix); ``random`` builds seeded random-init extractors on purpose (plumbing tests; every number labelled
    RANDOM-INIT); ``random_if_missing`` (the demo) uses real weights where present and a labelled random-init
    network where not."""

    pretrained = "pretrained"
    random = "random"
    random_if_missing = "random_if_missing"


class Precision(str, enum.Enum):
    """Extractor forward passes; moments and FD are float64 always."""

    fp32 = "fp32"
    bf16 = "bf16"
    tf32 = "tf32"


class NoiseMode(str, enum.Enum):
    const = "const"
    random = "random"
    none = "none"


# ------------------------------------------------------------------------------------------------ top level
@dataclass
class Paths:
    root: str = "${hydra:runtime.cwd}"
    run_dir: str = "${hydra:runtime.output_dir}"
    #: Trained generators live outside the run directory, under their training fingerprint, so that jobs that
    #: differ only in evaluation settings share one generator.
    train_root: str = "${paths.root}/outputs/train"
    #: Cached real-image statistics (keyed by a hash of everything that changes them).
    cache_dir: str = "${paths.root}/outputs/cache"
    #: Extractor weights; the FIDMED_WEIGHTS environment variable sets it, default ~/.cache/fidmed/weights.
    weights_dir: str | None = "${oc.env:FIDMED_WEIGHTS,null}"


@dataclass
class FidmedConfig:
    """The composed configuration of one job (``python run.py --cfg job`` prints it)."""

    stage: Stage = Stage.all
    seed: int = 0
    #: stage=evaluate: a fidmed final.pt / network-snapshot-*.pt / last.ckpt, or a stylegan2-ada-pytorch .pkl
    generator: str | None = None
    #: a stylegan2-ada-pytorch pickle whose embedded network source differs from the reference is refused unless
    #: this is true (its weights are still read without running anything from it)
    generator_allow_modified_source: bool = False
    paths: Paths = field(default_factory=Paths)
    modality: Any = MISSING
    model: Any = MISSING
    augmentation: Any = MISSING
    extractor: Any = MISSING
    trainer: Any = MISSING
    schedule: Any = MISSING
    logger: Any = MISSING
    eval: Any = MISSING


# ------------------------------------------------------------------------------------------------ modality
@dataclass
class Modality:
    name: str = MISSING
    kind: str = MISSING
    resolution: int = MISSING  # training and evaluation size (a power of two)
    channels: int = 1
    xflip: bool = False  # the study ran stylegan2-ada-pytorch without --mirror
    #: the study's training length for this modality: the snapshot it evaluated (docs/study.md#training);
    #: schedule=study trains this long
    study_kimg: float | None = None
    #: per-augmentation option overrides the study used for this modality, e.g. {ada: {pipeline: bgcfn}}
    augmentation_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: data-loader worker processes for training (loading only, never changes the weights; e.g. 4 on a GPU)
    num_workers: int = 0


@dataclass
class PhantomModality(Modality):
    """Built-in procedural grayscale phantoms (CT-like slices): no files needed, deterministic by seed."""

    name: str = "phantom"
    kind: str = "phantom"
    resolution: int = 32  # any power of two from 8 to 1024
    num_images: int = 2000  # size of the "real" set (evaluation uses all of it unless eval.num_real is set)
    data_seed: int = 0  # phantom i of the set is rendered from (data_seed, i)


@dataclass
class FolderModality(Modality):
    """A folder of 8-bit images (PNG/JPEG/BMP/TIFF), ideally written by ``fidmed prepare`` (with manifest.json).

    ``python run.py modality=folder modality.path=DIR modality.resolution=256`` trains on your own folder."""

    name: str = "folder"
    kind: str = "folder"
    path: str = MISSING
    path_hint: str | None = None  # the command that prepares the folder (named when it is missing)
    #: auto: decoded into memory when it fits in 2 GiB, else on the fly; memory; disk (decoded once into
    #: <path>/.fidmed_cache or cache_dir and memory-mapped); none
    cache: str = "auto"
    cache_dir: str | None = None


# ------------------------------------------------------------------------------------------------ model
@dataclass
class StyleGAN2:
    """StyleGAN2 exactly as stylegan2-ada-pytorch ``--cfg stylegan2`` (docs/study.md#training), the study's setting."""

    name: str = "stylegan2"
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 4  # mixed precision in the 4 highest resolutions (CUDA only; fp32 on the CPU)
    conv_clamp: int | None = 256
    mbstd_group: int = 4
    batch_size: int = 32  # images per optimiser step (all devices together)
    batch_chunk: int = 4  # images per forward/backward chunk; gradients are averaged over chunks
    lr_g: float = 0.002
    lr_d: float = 0.002
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    eps: float = 1.0e-8
    ema_kimg: float = 10.0  # half-life of the generator EMA, in thousands of images
    ema_rampup: float | None = None
    style_mixing_prob: float = 0.9
    r1_gamma: float = 8.2  # the study used 8.2 for every run
    pl_weight: float = 2.0
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    g_reg_interval: int = 4
    d_reg_interval: int = 16
    #: torch.compile G and D for the passes differentiated once (G main, D main); the R1 and path-length passes stay
    #: eager. Close to eager, not bitwise (benchmarks/results/train.md): true enters the training fingerprint
    compile: bool = False


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class Trainer:
    """Lightning's own ``Trainer`` arguments (instantiated from ``_target_``): hardware only. How long to train is
    the ``schedule`` group; fidmed sets the arguments its training loop depends on itself (max_steps,
    checkpointing, its progress bar and sampler)."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "cpu"
    devices: Any = 1  # a number, a list of device ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Any = 32  # StyleGAN2 manages its own fp16 layers (model.num_fp16_res); keep 32
    benchmark: bool = False  # cuDNN autotuning (faster on a GPU, not bitwise reproducible)
    deterministic: bool | None = None
    log_every_n_steps: int = 10


# ------------------------------------------------------------------------------------------------ schedule
@dataclass
class Schedule:
    """How long to train and when to checkpoint and evaluate, in thousands of real images shown to D (kimg)."""

    #: training length (an int stays an int: the number enters the training fingerprint as written)
    kimg: int | float | None = 40
    checkpoint_kimg: float = 10  # checkpoint (resume point + EMA generator snapshot) every N kimg
    eval_kimg: float = 10  # FD of G_ema during training every N kimg (0 = off)


# ------------------------------------------------------------------------------------------------ logger
@dataclass
class Logger:
    name: str = MISSING
    log_images: bool = False


@dataclass
class WandbLogger(Logger):
    """Weights & Biases through Lightning's WandbLogger. Offline by default: runs land in <run dir>/wandb and
    ``wandb sync <run dir>/wandb/offline-run-*`` uploads them later. ``mode=online`` after ``wandb login``."""

    name: str = "wandb"
    mode: str = "offline"
    project: str = "fidmed"
    entity: str | None = None
    group: str | None = "${modality.name}"
    tags: list[str] = field(default_factory=list)
    log_images: bool = True
    #: online mode: seconds to wait for the W&B server before falling back to offline (results reach disk anyway)
    init_timeout: float = 30.0


@dataclass
class CSVLogger(Logger):
    """Lightning's CSVLogger: metrics.csv in the run directory; no W&B needed."""

    name: str = "csv"


@dataclass
class NoLogger(Logger):
    name: str = "none"


# ------------------------------------------------------------------------------------------------ eval
@dataclass
class Uncertainty:
    """``eval.uncertainty``: bootstrap standard errors and confidence intervals of every number, from the features
    the pass already holds (docs/metrics.md#uncertainty). Validated by :func:`fidmed.metrics.uncertainty.plan_from`.
    """

    #: replicates per number (0 = off; 200 gives P(order) in steps of 0.005 and the 2.5% tails 5 replicates each)
    replicates: int = 0
    level: float = 0.95  # confidence level of the intervals
    seed: int = 0  # seeds every replicate's draw (the same real resample for every generator of a modality)
    #: images per resampling unit: contiguous runs of the sets' index order resampled together (e.g. the slices of
    #: one volume in a prepared folder); 1 = images are independent
    block_size: int = 1
    #: both: resample generated and real images; generated: the real set stays fixed (its spread is not covered)
    resample: str = "both"
    #: write every replicate value to results.json (fidmed analyze needs them for rank confidence)
    keep_replicates: bool = True


@dataclass
class Audit:
    """``eval.audit``: the memorisation audit (docs/metrics.md#memorisation-audit): each generated image's nearest
    training image per extractor and in pixel space, authenticity, copies, C_T with a held-out split."""

    enabled: bool = False
    #: folder of held-out real images of the modality (never trained on), for the data-copying test C_T
    heldout: str | None = None
    #: a generated image is flagged as a copy when its nearest-training distance is below this share of that
    #: training image's own nearest-neighbour distance
    threshold: float = 0.5
    pixel_size: int = 32  # pixel-space audit on images area-averaged to this size (0 = no pixel-space audit)
    cells: int = 3  # k-means cells of the training set for C_T (dgm-eval's choice)
    min_cell: int = 20  # C_T uses the cells holding more than this many generated images (Meehan et al.: 20)
    pairs: int = 16  # closest pairs shown in the image grid


@dataclass
class EvalBase:
    """Evaluation of the final generator (and of snapshots during training, schedule.eval_kimg)."""

    num_gen: int = 2000  # generated images, seeds seed_start..seed_start+num_gen-1 (the study: 50,000)
    seed_start: int = 0
    num_real: int | None = None  # None = the whole real set, as the study did
    num_gen_training: int = 500  # generated images for the FDs logged during training
    truncation_psi: float = 1.0
    noise_mode: NoiseMode = NoiseMode.const  # as the study's generate.py
    batch_size: int = 50
    #: registered metrics (fidmed.metrics.base): fd, rfd, prdc, kid, fd_inf; each one's options under eval.<name>
    metrics: list[str] = field(default_factory=lambda: ["fd", "rfd"])
    precision: Precision = Precision.fp32
    metric_seed: int = 0  # seeds of randomised metrics (KID subsets, FD-infinity subsets)
    real_split_seed: int = 0  # seeded split of the real set for relative FD (the study's was unseeded)
    device: str = "auto"  # auto | cpu | cuda[:i]
    #: threads reading/preprocessing the next batches during the forward passes ("auto": CPUs, max 16; 0: none)
    num_workers: Any = "auto"
    #: opt-in speed setting: channels_last memory format for the extractors that declare it (fp32 features within
    #: float32 rounding of contiguous, fidmed.features.base.CHANNELS_LAST_RTOL, but not bit-identical for the CNNs);
    #: false (default): every tensor contiguous, the layout of the reference implementations, bit for bit
    channels_last: bool = False
    #: torch.compile each extractor's forward (features within fidmed.features.base.COMPILE_RTOL of eager)
    compile: bool = False
    weights: WeightsMode = WeightsMode.pretrained
    allow_download: bool = True  # fetch missing extractor weights when online
    uncertainty: Uncertainty = field(default_factory=Uncertainty)
    audit: Audit = field(default_factory=Audit)


def eval_schema() -> type:
    """``EvalBase`` plus one field per registered metric with options (``eval.prdc``, ``eval.kid``, ...)."""
    from fidmed.metrics.base import METRICS

    extra = [(e.name, e.config, field(default_factory=e.config)) for e in METRICS.entries() if e.config is not None]
    return dataclasses.make_dataclass("Eval", extra, bases=(EvalBase,))


# ------------------------------------------------------------------------------------------------ ConfigStore
def register_configs() -> None:
    """Store every schema and registry-built node in Hydra's ConfigStore (idempotent: call it again after
    registering a member, e.g. a test's toy extractor, and its node appears)."""
    from hydra.core.config_store import ConfigStore

    from fidmed.augment.base import AUGMENTATIONS
    from fidmed.features.registry import EXTRACTORS, default_config

    cs = ConfigStore.instance()
    cs.store(name="fidmed_schema", node=FidmedConfig)
    cs.store(group="modality", name="phantom", node=PhantomModality)
    cs.store(group="modality", name="folder", node=FolderModality)
    cs.store(group="model", name="stylegan2", node=StyleGAN2)
    cs.store(group="trainer", name="cpu", node=Trainer)
    cs.store(group="schedule", name="default", node=Schedule)
    for node in (WandbLogger, CSVLogger, NoLogger):
        cs.store(group="logger", name=node.name, node=node)
    cs.store(group="eval", name="default", node=eval_schema())
    for entry in AUGMENTATIONS.entries():
        cs.store(group="augmentation", name=entry.name, node=entry.config)
    for entry in EXTRACTORS.entries():
        cs.store(group="extractor", name=entry.name, node=default_config(entry.name), package=f"extractor.{entry.name}")


# ------------------------------------------------------------------------------------------------ checks
def check_config(cfg: Any, path: str = "") -> None:
    """Refuse keys that no schema declares (``+trainer.kimgg=1`` gets past Hydra's composition, not past this).

    The message is OmegaConf's own for an unknown key, with the fix."""
    if isinstance(cfg, DictConfig):
        schema = OmegaConf.get_type(cfg)
        if schema is not None and dataclasses.is_dataclass(schema):
            known = {f.name for f in dataclasses.fields(schema)}
            if schema is FidmedConfig:
                known.add("hydra")  # Hydra's own node (present when composed with return_hydra_config)
            for key in cfg.keys():
                if key not in known:
                    full = f"{path}.{key}" if path else str(key)
                    moved = f" ({full} is now {MOVED_KEYS[full]})" if full in MOVED_KEYS else ""
                    raise ConfigError(
                        f"Key '{key}' not in '{schema.__name__}' (full_key: {full}, object_type="
                        f"{schema.__name__}){moved}; valid keys: {', '.join(sorted(known))}. Check the "
                        f"spelling (`python run.py --cfg job` prints the whole config)."
                    )
        for key in cfg.keys():
            if key == "hydra" and not path:
                continue
            node = cfg._get_node(key)
            if isinstance(node, (DictConfig, ListConfig)):
                check_config(node, f"{path}.{key}" if path else str(key))
    elif isinstance(cfg, ListConfig):
        for i, node in enumerate(cfg._iter_ex(resolve=False)):
            if isinstance(node, (DictConfig, ListConfig)):
                check_config(node, f"{path}[{i}]")


#: keys that moved (old -> new), named when someone uses the old one
MOVED_KEYS = {
    "trainer.kimg": "schedule.kimg",
    "trainer.snapshot_kimg": "schedule.checkpoint_kimg",
    "trainer.eval_kimg": "schedule.eval_kimg",
    "trainer.num_workers": "modality.num_workers",
    "trainer.log_every_steps": "trainer.log_every_n_steps",
    "modality.snapshot_kimg": "modality.study_kimg",
    "eval.knn_k": "eval.prdc.k",
    "eval.kid_subsets": "eval.kid.subsets",
    "eval.kid_subset_size": "eval.kid.subset_size",
}


def explain_composition_error(exc: BaseException, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Hydra's/OmegaConf's composition error as one line, with its cause and the fix."""
    import re

    parts = []
    e: BaseException | None = exc
    while e is not None and len(parts) < 4:
        text = " ".join(str(e).split())
        if text and text not in parts and "$VALUE" not in text:
            parts.append(text)
        e = e.__cause__ or e.__context__
    message = ": ".join(parts) or type(exc).__name__
    moved = [
        f"{old} is now {new}"
        for old, new in MOVED_KEYS.items()
        if any(o.lstrip("+~").split("=", 1)[0] == old for o in overrides)
    ]
    if moved:
        return f"{message}. ({'; '.join(moved)})"
    missing = re.search(r"Could not (?:load|find) '([^/']+)/([^']+)'", message)
    if missing:
        group, name = missing.groups()
        try:
            from hydra.core.global_hydra import GlobalHydra

            options = GlobalHydra.instance().config_loader().get_group_options(group)
        except Exception:  # noqa: BLE001 - the listing is a courtesy
            options = []
        listing = f"; available: {', '.join(sorted(options))}" if options else ""
        return f"unknown {group} {name!r}{listing}"
    return (
        f"{message} (check the override; `python run.py --cfg job` prints the composed config, "
        f"`python run.py --help` the groups and their options)"
    )


def compose_config(
    overrides: list[str] | tuple[str, ...] = (), config_dir: str | Path | None = None, return_hydra: bool = False
) -> DictConfig:
    """The composed and checked job configuration outside ``run.py`` (the ``fidmed`` command, tests, notebooks):
    Hydra's compose API on the packaged config tree, with ``${hydra:...}`` interpolations set as ``run.py`` would
    set them for a run started in the current folder. ``return_hydra``: keep Hydra's own ``hydra`` node (run.py's
    job config has none)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
        try:
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        except Exception as exc:  # Hydra's and OmegaConf's composition errors: one line naming the fix
            raise ConfigError(explain_composition_error(exc, overrides)) from None
        from omegaconf import read_write

        with read_write(cfg.hydra), open_dict(cfg.hydra):  # what run.py's Hydra run would set (nothing is created)
            cfg.hydra.runtime.cwd = os.getcwd()
            if OmegaConf.is_missing(cfg.hydra.runtime, "output_dir") or cfg.hydra.runtime.output_dir is None:
                cfg.hydra.runtime.output_dir = str(Path(str(cfg.hydra.run.dir)).resolve())
        HydraConfig.instance().set_config(cfg)
    check_config(cfg)
    if not return_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg
