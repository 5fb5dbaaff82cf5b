"""The training job: one frozen, typed description of one training, for every backend.

The graph builds a :class:`TrainJob` once per LoRA variant (:func:`job_specs` turns the
project's model and trainer settings into :class:`ModelSpec` and :class:`TrainerSpec`), the
runner writes it to ``job.json`` with :meth:`TrainJob.to_json`, and every backend reads it
back with :meth:`TrainJob.from_json`. Each default lives here or in
:class:`~charbuild.train.variants.TrainParams` and nowhere else: a backend reads
``job.params.seed``, never ``params.get("seed", <its own default>)``.

The JSON form is a plain dict with the keys documented in docs/architecture.md ("The
training job"); :meth:`TrainJob.from_dict` accepts exactly those keys and raises
:class:`~charbuild.errors.TrainingError` naming an unknown one.

Pure: no torch, no I/O except :meth:`TrainJob.from_json` reading its file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ..base_arch import tiny_base_arch
from ..errors import TrainingError
from ..fsutil import under_root
from ..layout import deliverable_stem
from .settings import declared, default_of
from .variants import LATER_KEYS, OBSERVING_KEYS, TrainParams

#: The backend a project trains with when ``[trainer] backend`` is not set.
DEFAULT_BACKEND = "builtin"
#: Where trainings run when ``[trainer] executor`` is not set: this machine.
DEFAULT_EXECUTOR = "local"
#: The base model's CLIP skip when ``[model] clip_skip`` is not set (and a variant sets none).
DEFAULT_CLIP_SKIP = 2
#: Seconds a stopped trainer gets between SIGTERM and SIGKILL.
DEFAULT_KILL_GRACE = 5.0
#: Seconds between tries of a busy GPU lock.
DEFAULT_LOCK_POLL = 1.0
#: What one training asks a cluster executor for when ``[trainer] resources`` does not say.
DEFAULT_RESOURCES = {"GPU": 1}


@dataclass(frozen=True)
class ModelSpec:
    """The base model: ``base`` is a built-in demo model name (``"tiny"``, ``"tiny-sdxl:3"``) or an absolute path; ``vae`` an absolute path or None."""

    base: str = "tiny"
    vae: str | None = None
    arch: str = "sd15"
    clip_skip: int = DEFAULT_CLIP_SKIP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        d = _known(d, cls, "model")
        if d.get("clip_skip") is None:
            d.pop("clip_skip", None)
        return cls(**d)


@dataclass(frozen=True)
class TrainerSpec:
    """How and where a job is trained (paths absolute).

    ``backend`` a registered backend name (:mod:`charbuild.train.backends`); ``gpus`` the GPU
    indices a training may take; ``cpu_trainings`` how many trainings run at once on a machine
    without a GPU (:func:`charbuild.train.hardware.training_slots`); ``sd_scripts`` the kohya-ss
    checkout; ``python`` and
    ``accelerate`` the sd-scripts launcher (``accelerate`` None: plain ``python script``);
    ``extra_args`` appended to the sd-scripts command; ``run_cache`` reuse earlier identical
    trainings; ``lock_dir`` the GPU lock folder; ``kill_grace``/``lock_poll`` seconds;
    ``extra`` an opaque table for a backend's own knobs (the fake backend's test knobs);
    ``executor`` the launcher that runs the training (:func:`charbuild.train.runner.register_launcher`).

    The cluster executor's settings (``executor = "ray"``, :mod:`charbuild.train.executors`):
    ``ray_address`` where the cluster is (None: start or join a local instance; ``"auto"``;
    ``"host:6379"``; ``"ray://host:10001"``); ``resources`` what one training asks for
    (``GPU``, ``CPU``, ``memory`` in bytes, custom resources); ``retries`` restarts of a
    training whose worker was lost; ``shared_model`` the workers read ``model.base``/``vae``
    at their paths (nothing travels); ``worker_cache`` the folder where a worker keeps the
    models it received (None: ``<temp>/charbuild-models``). None of them is in a training's
    signature: where a LoRA is trained does not change it.
    """

    backend: str = DEFAULT_BACKEND
    gpus: tuple[int, ...] = (0,)
    cpu_trainings: int = 1
    sd_scripts: str | None = None
    python: str | None = None
    accelerate: str | None = "accelerate"
    xformers: bool = False
    extra_args: tuple[str, ...] = ()
    run_cache: bool = True
    lock_dir: str | None = None
    kill_grace: float = DEFAULT_KILL_GRACE
    lock_poll: float = DEFAULT_LOCK_POLL
    extra: Mapping[str, Any] = field(default_factory=dict)
    executor: str = DEFAULT_EXECUTOR
    ray_address: str | None = None
    resources: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    retries: int = 0
    shared_model: bool = False
    worker_cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = list(self.gpus)
        d["extra_args"] = list(self.extra_args)
        d["extra"] = dict(self.extra)
        d["resources"] = dict(self.resources)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainerSpec":
        d = _known(d, cls, "trainer")
        for key in ("gpus", "extra_args"):
            if key in d:
                d[key] = tuple(d[key] or ())
        if "gpus" in d and not d["gpus"]:
            d.pop("gpus")
        d["extra"] = dict(d.get("extra") or {})
        if "resources" in d:
            d["resources"] = dict(d["resources"] or DEFAULT_RESOURCES)
        return cls(**d)


@dataclass(frozen=True)
class TrainJob:
    """One training of one LoRA variant (all paths absolute).

    ``params.clip_skip`` is always concrete: a variant without one takes the model's.
    """

    lora: str
    kind: str
    variant: str
    project_root: str
    dataset_toml: str
    output: str  # where the raw LoRA goes (the runner points it into its temp folder)
    variant_dir: str
    params: TrainParams
    model: ModelSpec = field(default_factory=ModelSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    keywords: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    signature_extra: Mapping[str, Any] = field(default_factory=dict)
    continue_from: str | None = None
    #: the samples to render, ``(name, prompt)`` in seed order (the graph's, with the project's
    #: caption rules; empty: the trainer derives them with the default rules); never in a signature
    sample_set: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.params.clip_skip is None:
            object.__setattr__(self, "params", self.params.with_values(clip_skip=self.model.clip_skip))

    # -- derived values every backend uses the same way
    @property
    def label(self) -> str:
        """``<lora>/<variant>``, as messages and task names show it."""
        return f"{self.lora}/{self.variant}"

    @property
    def title(self) -> str:
        """The name written into the LoRA file: the deliverable's stem ``<lora>-<variant>``."""
        return deliverable_stem(self.lora, self.variant)

    @property
    def backend(self) -> str:
        return self.trainer.backend

    def with_output(self, output: str | Path) -> "TrainJob":
        """A copy whose raw file goes to ``output``."""
        return replace(self, output=str(output))

    def with_trainer(self, **changes: Any) -> "TrainJob":
        """A copy with some trainer fields replaced."""
        return replace(self, trainer=replace(self.trainer, **changes))

    def with_params(self, **changes: Any) -> "TrainJob":
        """A copy with some training params replaced (no re-derivation)."""
        return replace(self, params=self.params.with_values(**changes))

    def with_model(self, **changes: Any) -> "TrainJob":
        """A copy with some model fields replaced."""
        return replace(self, model=replace(self.model, **changes))

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (the job file's content)."""
        return {
            "lora": self.lora,
            "kind": self.kind,
            "variant": self.variant,
            "project_root": self.project_root,
            "dataset_toml": self.dataset_toml,
            "output": self.output,
            "variant_dir": self.variant_dir,
            "params": self.params.to_dict(),
            "model": self.model.to_dict(),
            "trainer": self.trainer.to_dict(),
            "keywords": list(self.keywords),
            "inputs": list(self.inputs),
            "signature_extra": json.loads(json.dumps(self.signature_extra)),
            "continue_from": self.continue_from,
            "sample_set": [list(p) for p in self.sample_set],
        }

    def to_json(self) -> str:
        """The job file's text (UTF-8, one key per line, ends with a newline)."""
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainJob":
        """The inverse of :meth:`to_dict`; raises TrainingError for a missing or unknown key."""
        d = _known(d, cls, "job")
        try:
            d["params"] = TrainParams.from_dict(d["params"])
        except KeyError as e:
            raise TrainingError(f"the training job has no {e.args[0]!r}") from None
        except TypeError as e:
            raise TrainingError(f"the training job's params do not fit: {e}") from None
        d["model"] = ModelSpec.from_dict(d.get("model") or {})
        d["trainer"] = TrainerSpec.from_dict(d.get("trainer") or {})
        d["keywords"] = tuple(d.get("keywords") or ())
        d["inputs"] = tuple(d.get("inputs") or ())
        d["signature_extra"] = dict(d.get("signature_extra") or {})
        d["sample_set"] = tuple((str(n), str(p)) for n, p in d.get("sample_set") or ())
        try:
            return cls(**d)
        except TypeError as e:
            raise TrainingError(f"the training job is incomplete: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainJob":
        """Read a job file written by :meth:`to_json`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TrainingError(f"cannot read the training job: {e}", path=path) from None
        return cls.from_dict(data)


def _known(d: Mapping[str, Any], cls, what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise TrainingError(f"unknown {what} field(s) in the training job: {', '.join(unknown)}")
    return dict(d)


def signature_params(params: TrainParams) -> dict[str, Any]:
    """The params as a training's signature holds them.

    A key added after the first release (``variants.LATER_KEYS``: ``data_loader_workers``, the
    loss options) appears only when it differs from its default: it can change the result (for
    ``data_loader_workers``, sd-scripts' workers draw the flip augmentation), but a setting that
    did not exist when a LoRA was trained must not make that LoRA stale. The keys that only
    observe a training (``variants.OBSERVING_KEYS``: samples, validation loss) never appear:
    they change what a user sees, not what is trained.
    """
    d = params.to_dict()
    defaults = {f.name: default_of(f) for f in declared() if f.name in LATER_KEYS}
    for key in LATER_KEYS:
        if d.get(key) == defaults[key] or (isinstance(defaults[key], tuple) and not d.get(key)):
            d.pop(key, None)
    for key in OBSERVING_KEYS:
        d.pop(key, None)
    return d


# ---------------------------------------------------------------- from the project


def _absolute(value: str | None, root: Path) -> str | None:
    return str(under_root(root, value)) if value else value


def job_specs(project, layout) -> tuple[ModelSpec, TrainerSpec]:
    """The model and trainer specs of ``project`` (paths made absolute against ``layout.root``).

    The one place that reads ``project.model`` / ``project.trainer``: when those become typed
    objects, only this function changes.
    """
    root = layout.root
    m = project.model
    model = ModelSpec(
        base=m["base"] if tiny_base_arch(m["base"]) else _absolute(m["base"], root),
        vae=_absolute(m.get("vae"), root),
        arch=m.get("arch") or ModelSpec.arch,
        clip_skip=m.get("clip_skip") or DEFAULT_CLIP_SKIP,
    )
    t = project.trainer
    defaults = TrainerSpec()
    trainer = TrainerSpec(
        backend=t.get("backend") or DEFAULT_BACKEND,
        gpus=tuple(t.get("gpus") or defaults.gpus),
        cpu_trainings=int(t.get("cpu_trainings", defaults.cpu_trainings)),
        sd_scripts=_absolute(t.get("sd_scripts"), root),
        python=t.get("python"),
        accelerate=t.get("accelerate", defaults.accelerate),
        xformers=bool(t.get("xformers", defaults.xformers)),
        extra_args=tuple(t.get("extra_args") or ()),
        run_cache=bool(t.get("run_cache", defaults.run_cache)),
        lock_dir=str(layout.locks_dir),
        extra=dict(t.get("extra") or {}),
        executor=t.get("executor") or DEFAULT_EXECUTOR,
        ray_address=t.get("ray_address"),
        resources=dict(t.get("resources") or defaults.resources),
        retries=int(t.get("retries", defaults.retries)),
        shared_model=bool(t.get("shared_model", defaults.shared_model)),
        worker_cache=t.get("worker_cache"),
    )
    return model, trainer


# ---------------------------------------------------------------- what every backend trains with


def optimizer_kwargs(args) -> dict[str, Any]:
    """``["relative_step=True", "betas=(0.9,0.99)"]`` -> kwargs (values as Python literals where
    they are one, else the string); TrainingError for an item that is not ``key=value``."""
    import ast

    out: dict[str, Any] = {}
    for item in args or ():
        key, sep, value = str(item).partition("=")
        if not sep:
            raise TrainingError(f"optimizer argument {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def adafactor_relative_step(optimizer_args) -> bool:
    """Whether an Adafactor optimizer with ``optimizer_args`` computes its own learning rate.

    transformers' and sd-scripts' rule: ``relative_step`` is on by default, and forced on by
    ``warmup_init``.
    """
    kwargs = optimizer_kwargs(optimizer_args)
    return bool(kwargs.get("relative_step", True)) or bool(kwargs.get("warmup_init", False))


def scheduler_in_effect(optimizer: str, optimizer_args, scheduler: str) -> str:
    """The learning-rate schedule a training really follows: ``"adafactor"`` when Adafactor's
    relative step drives it (sd-scripts switches to its adafactor schedule whatever
    ``--lr_scheduler`` says), else ``scheduler``."""
    if str(optimizer).lower() == "adafactor" and adafactor_relative_step(optimizer_args):
        return "adafactor"
    return scheduler
