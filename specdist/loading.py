"""Loading models: a zoo name, a specdist zoo directory, a diffusers pipeline or a bare transformer.

:func:`load_model` returns a :class:`ModelBundle`, which knows how to encode the job's prompts or
class labels into a :class:`~specdist.models.Conditioning` and how to decode final latents into
pixels. A missing or malformed path raises :class:`~specdist.errors.CheckpointError` naming the
path and what was expected.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from .attention import apply_attention_backend
from .errors import CheckpointError, ConfigError, SpecdistError
from .memory import apply_offload, check_offload, on_device, resolve_dtype
from .models import ModelAdapter, adapter_for
from .models.base import Conditioning
from .models.dit import DiTAdapter
from .models.hunyuan_video import HunyuanVideoAdapter
from .sampling import model_device
from .zoo import ZOO_SPECS, checkpoint_path
from .zoo.text_encoder import PromptEncoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOW_MEM = diffusers.utils.is_accelerate_available()
"""diffusers loads weights without first initialising them randomly only with accelerate (the gpu
extra): minutes saved on a 12.8B checkpoint; without it every load initialises, then overwrites."""
DEFAULT_VIDEO_PROMPTS = [
    "red square moving right",
    "blue circle moving down",
    "green square moving up",
    "yellow circle moving left",
]
EXPECTED = (
    "a zoo model name ({zoo}), or a directory holding model_index.json (diffusers pipeline), "
    "config.json + weights (bare transformer) or specdist_model.json (specdist zoo format)"
)


@dataclass
class ModelBundle:
    """A loaded model with everything a generation needs."""

    name: str
    source: str  # "zoo" | "pipeline" | "transformer"
    path: Path
    transformer: nn.Module
    adapter: ModelAdapter
    scheduler: Any
    text_encoder: PromptEncoder | None = None
    pipeline: Any = None
    class_names: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()  # the model's own example prompts (zoo text models)
    label_ids: dict[str, int] = field(default_factory=dict)  # class name -> id, where names are not indices
    default_guidance: float = 1.0
    default_size: tuple[int, int, int] = (32, 32, 1)  # height, width, frames (latent units)
    meta: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)  # what load_model chose (dtype, attention, offload, ...)

    @property
    def device(self) -> torch.device:
        """Where the transformer computes (under group offloading: its onload device)."""
        return model_device(self.transformer)

    @property
    def offload_model(self) -> bool:
        """``offload: model``: text encoders and VAE go to the device only while they run."""
        return self.setup.get("offload", {}).get("offload") == "model"

    def _side(self, *names: str) -> list[nn.Module]:
        return [m for n in names for m in [getattr(self.pipeline, n, None)] if isinstance(m, nn.Module)]

    @property
    def conditions_on(self) -> str:
        """``"text"``, ``"class"`` or ``"none"``."""
        if self.adapter.family == "dit":
            return "class"
        return "text" if (self.text_encoder is not None or self.pipeline is not None) else "none"

    @property
    def default_prompts(self) -> list[str]:
        """Prompts of a job that names none: the model's own, else generic video or image ones."""
        if self.prompts:
            return list(self.prompts)
        return list(DEFAULT_VIDEO_PROMPTS) if self.adapter.is_video else ["a photo"]

    @property
    def conditioning(self) -> str:
        """Where a sample's conditioning comes from: ``class`` labels, the zoo model's ``text_encoder``,
        the ``pipeline``'s own encoders, or ``random`` (a text model without a text encoder: prompts
        are not used, the conditioning is drawn from the seed)."""
        if self.adapter.family == "dit":
            return "class"
        if self.text_encoder is not None:
            return "text_encoder"
        return "pipeline" if self.pipeline is not None else "random"

    def latent_shape(self, height: int | None, width: int | None, frames: int | None) -> tuple[int, ...]:
        """Per-sample latent shape for the requested size (defaults where ``None``)."""
        h, w, f = height or self.default_size[0], width or self.default_size[1], frames or self.default_size[2]
        if self.pipeline is not None and (height or width or frames):
            h, w, f = self.adapter.pipeline_latent_size(self.pipeline, h, w, f)
        return self.adapter.latent_shape(self.transformer, h, w, f)

    def class_ids(self, labels: list[str]) -> list[int]:
        """Class ids from names or integer strings; errors name the bad label."""
        ids = []
        limit = self.transformer.config.num_embeds_ada_norm
        for label in labels:
            if label in self.label_ids:  # a pipeline's own label table (several names may share an id)
                ids.append(self.label_ids[label])
            elif label in self.class_names:
                ids.append(self.class_names.index(label))
            elif str(label).isdigit() and int(label) < limit:
                ids.append(int(label))
            else:
                allowed = ", ".join(self.class_names) if self.class_names else f"integers 0..{limit - 1}"
                raise ConfigError(f"invalid value for 'class_labels': {label!r} (allowed: {allowed})")
        return ids

    def encode(self, prompts: list[str], labels: list[str], guidance_scale: float, seed: int) -> Conditioning:
        """Conditioning for a batch (``prompts``/``labels`` already cycled to the batch size)."""
        device = self.device
        if self.adapter.family == "dit":
            ids = torch.tensor(self.class_ids(labels), dtype=torch.long)
            if self.pipeline is not None:
                return self.adapter.pipeline_conditioning(self.pipeline, [], ids.tolist(), guidance_scale, device)
            return DiTAdapter().conditioning(self.transformer, ids, guidance_scale)
        if self.text_encoder is not None:
            with torch.inference_mode():
                cond = self.text_encoder(prompts)
                uncond = self.text_encoder([""] * len(prompts)) if guidance_scale > 1.0 else None
            return self.adapter.prompt_conditioning(cond, uncond, guidance_scale)
        if self.pipeline is not None:
            encoders = self._side(*[n for n in (self.pipeline.components or {}) if n.startswith("text_encoder")])
            with on_device(encoders, device, self.offload_model):
                return self.adapter.pipeline_conditioning(self.pipeline, prompts, [], guidance_scale, device)
        gen = torch.Generator().manual_seed(seed)
        return self.adapter.random_conditioning(self.transformer, len(prompts), gen, guidance_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Pixels in [-1, 1] (``[B, 3, H, W]`` or ``[B, 3, F, H, W]``), or ``None`` when the
        bundle has no decoder (bare latent-space transformer)."""
        if self.source == "zoo":
            return latents.clamp(-1, 1)
        if self.pipeline is not None:
            with torch.inference_mode(), on_device(self._side("vae"), self.device, self.offload_model):
                return self.adapter.pipeline_decode(self.pipeline, latents.to(self.device)).float().cpu().clamp(-1, 1)
        return None


def saved_scheduler_config(path: Path) -> Path | None:
    """The scheduler config saved with a checkpoint directory: ``scheduler/scheduler_config.json``
    (diffusers' layout) or ``scheduler_config.json`` beside the weights; ``None`` when absent."""
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    return None


def _scheduler_class(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler") or not hasattr(cls, "from_config"):
        raise ConfigError(f"invalid value for 'scheduler': {name!r} (allowed: a diffusers scheduler class name such "
                          f"as DDIMScheduler, DDPMScheduler or FlowMatchEulerDiscreteScheduler)")
    return cls


def configure_scheduler(scheduler: Any, name: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """``scheduler`` as the job asks: another diffusers class built from its config (``name``), with
    config keys replaced by ``overrides`` (the job's ``scheduler_config``); ``scheduler`` itself
    when neither is given. Unknown keys fail naming ``scheduler_config.<key>`` and the allowed keys."""
    overrides = dict(overrides or {})
    if (name is None or name == type(scheduler).__name__) and not overrides:
        return scheduler
    cls = _scheduler_class(name) if name else type(scheduler)
    allowed = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"})
    for key in overrides:
        if key not in allowed:
            raise ConfigError(f"unknown config key 'scheduler_config.{key}' for {cls.__name__} "
                              f"(allowed: {', '.join(allowed)})")
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return cls.from_config({**config, **overrides})


def scheduler_record(scheduler: Any) -> dict[str, Any]:
    """What ``report.json`` says about the sampler: its class and its full config."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, default=str))}


def _load_transformer(cls: type, path: Path, dtype: torch.dtype) -> nn.Module:
    """``cls.from_pretrained(path)`` in ``dtype``, also where diffusers cannot do it without accelerate.

    Classes that keep modules in fp32 (Wan: ``rope``, ``time_embedder``, ``norm1``…) load only with
    accelerate's low-memory path in diffusers 0.42; without accelerate (not a specdist dependency)
    they are built from their config, given the single safetensors file's weights and cast as
    diffusers casts them: the kept modules' tensors fp32, every other floating tensor ``dtype``.
    """
    from diffusers.utils import is_accelerate_available

    keep = cls._keep_in_fp32_modules
    if not keep:
        return cls.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=_LOW_MEM)
    if is_accelerate_available():
        return cls.from_pretrained(path, torch_dtype=dtype)
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(path))
    model.load_state_dict(load_file(str(path / "diffusion_pytorch_model.safetensors")))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if set(keep) & set(name.split(".")) else dtype)
    return model


def _zoo_bundle(name: str, path: Path, device: torch.device, dtype: torch.dtype, text: bool = True) -> ModelBundle:
    meta = json.loads((path / "specdist_model.json").read_text())
    spec = ZOO_SPECS.get(meta.get("name", name))
    if spec is None:
        raise CheckpointError(f"{path}: specdist_model.json names unknown zoo model {meta.get('name')!r}")
    cls = getattr(diffusers, spec.transformer_class)
    transformer = _load_transformer(cls, path / "transformer", dtype).eval()
    scheduler = getattr(diffusers, spec.scheduler_class).from_pretrained(path / "scheduler")
    text_encoder = None
    if text and (path / "text_encoder").is_dir():
        text_encoder = PromptEncoder.from_pretrained(path / "text_encoder", torch_dtype=torch.float32, low_cpu_mem_usage=_LOW_MEM).to(device).eval()
    c, *rest = spec.sample_shape
    frames = rest[0] if len(rest) == 3 else 1
    return ModelBundle(
        name=spec.name, source="zoo", path=path, transformer=transformer, adapter=adapter_for(transformer),
        scheduler=scheduler, text_encoder=text_encoder, class_names=spec.class_names, prompts=spec.default_prompts,
        default_guidance=spec.default_guidance, default_size=(rest[-2], rest[-1], frames), meta=meta,
    )


def _pipeline_transformer_bundle(path: Path, dtype: torch.dtype) -> ModelBundle:
    """Only the transformer and the scheduler of a pipeline directory (what a worker computes with)."""
    index = json.loads((path / "model_index.json").read_text())
    entry, sched = index.get("transformer"), index.get("scheduler")
    if not entry or not sched or not (path / "transformer").is_dir():
        raise CheckpointError(f"{path}: the pipeline has no 'transformer' component (specdist accelerates "
                              f"diffusion transformers)")
    try:
        adapter = adapter_for(entry[1])
    except ValueError as exc:
        raise CheckpointError(f"{path}/model_index.json: {exc}") from None
    transformer = getattr(diffusers, entry[1]).from_pretrained(path / "transformer", torch_dtype=dtype,
                                                               low_cpu_mem_usage=_LOW_MEM).eval()
    scheduler = _scheduler_class(sched[1]).from_pretrained(path / "scheduler")
    size = getattr(transformer.config, "sample_size", 32) or 32
    return ModelBundle(name=str(path), source="pipeline", path=path, transformer=transformer, adapter=adapter,
                       scheduler=scheduler, default_size=(size, size, 1))


def _pipeline_bundle(path: Path, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, low_cpu_mem_usage=_LOW_MEM)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise CheckpointError(f"{path}: the pipeline has no 'transformer' component (specdist accelerates diffusion transformers)")
    adapter = adapter_for(transformer)
    label_ids = {str(k): int(v) for k, v in (getattr(pipe, "labels", None) or {}).items()}
    labels = tuple(label_ids)
    size = getattr(transformer.config, "sample_size", 32) or 32
    return ModelBundle(
        name=str(path), source="pipeline", path=path, transformer=transformer.eval(), adapter=adapter,
        scheduler=pipe.scheduler, pipeline=pipe, class_names=labels, label_ids=label_ids,
        default_guidance=4.0 if adapter.family == "dit" else 1.0, default_size=(size, size, 1),
    )


def _transformer_bundle(path: Path, scheduler_name: str | None, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """A bare transformer directory. Its sampler is the scheduler config saved beside it (see
    :func:`saved_scheduler_config`), as its pipeline would sample it; without one, the class
    named by the job's ``scheduler`` with that class's defaults."""
    config = json.loads((path / "config.json").read_text())
    cls_name = config.get("_class_name")
    try:
        adapter = adapter_for(cls_name or "<missing _class_name>")
    except ValueError as exc:
        raise CheckpointError(f"{path}/config.json: {exc}") from None
    saved = saved_scheduler_config(path)
    if saved is not None:
        saved_config = json.loads(saved.read_text())
        saved_name = saved_config.get("_class_name")
        if not saved_name:
            raise CheckpointError(f"{saved}: no '_class_name' (expected a diffusers scheduler config)")
        scheduler = _scheduler_class(saved_name).from_config(saved_config)
    elif not scheduler_name:
        raise ConfigError(
            f"invalid value for 'scheduler': None (allowed: a diffusers scheduler class name such as "
            f"DDIMScheduler or FlowMatchEulerDiscreteScheduler; the bare transformer directory {path} has no "
            f"scheduler/scheduler_config.json)"
        )
    else:
        scheduler = _scheduler_class(scheduler_name)()
    transformer = _load_transformer(getattr(diffusers, cls_name), path, dtype).eval()
    size = getattr(transformer.config, "sample_size", 32) or 32
    return ModelBundle(
        name=str(path), source="transformer", path=path, transformer=transformer, adapter=adapter,
        scheduler=scheduler, default_size=(size, size, 1),
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid value for 'device': 'cuda' (no CUDA GPU is available here; allowed: auto, cpu)")
    return torch.device(device)


def load_model(model: str, *, device: str = "auto", dtype: str = "auto", scheduler: str | None = None,
               scheduler_config: dict[str, Any] | None = None, attention_backend: str = "auto",
               offload: str = "none", components: str = "all") -> ModelBundle:
    """Load ``model`` (zoo name or local path) onto ``device`` in ``dtype`` (``auto``: see
    :func:`specdist.memory.resolve_dtype`).

    ``scheduler`` (a diffusers class name) and ``scheduler_config`` (config keys) change the
    checkpoint's sampler, see :func:`configure_scheduler`; a bare transformer directory without a
    saved scheduler config needs ``scheduler``. ``attention_backend`` is set on the transformer
    (:func:`specdist.attention.apply_attention_backend`), ``offload`` places the weights
    (:mod:`specdist.memory`). ``components="transformer"`` loads only the transformer and the
    scheduler (a worker: prompts are encoded once per job by the driver, and nothing is decoded).
    What was chosen is in ``bundle.setup`` (``dtype``, ``attention``, ``offload``, ``components``)."""
    if components not in ("all", "transformer"):
        raise ValueError(f"components must be 'all' or 'transformer', got {components!r}")
    dev = resolve_device(device)
    expected = EXPECTED.format(zoo=", ".join(ZOO_SPECS))
    if model in ZOO_SPECS:
        path = checkpoint_path(model)
        if not (path / "specdist_model.json").is_file():
            raise CheckpointError(f"zoo checkpoint missing: {path} (train it: python -m specdist.zoo.train --model {model} ...)")
        kind = "zoo"
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise CheckpointError(f"model path not found: {path} (expected {expected})")
        if not path.is_dir():
            raise CheckpointError(f"model path is not a directory: {path} (expected {expected})")
        if (path / "specdist_model.json").is_file():
            kind = "zoo"
        elif (path / "model_index.json").is_file():
            kind = "pipeline"
        elif (path / "config.json").is_file():
            kind = "transformer"
        else:
            raise CheckpointError(f"not a model directory: {path} (expected {expected})")
    dtype = resolve_dtype(dtype, kind, dev)
    check_offload(offload, dev, kind)
    dt = DTYPES[dtype]
    try:
        if kind == "zoo":
            bundle = _zoo_bundle(model, path, dev, dt, text=components == "all")
        elif kind == "pipeline" and components == "transformer":
            bundle = _pipeline_transformer_bundle(path, dt)
        elif kind == "pipeline":
            bundle = _pipeline_bundle(path, dev, dt)
        else:
            bundle = _transformer_bundle(path, scheduler, dev, dt)
    except SpecdistError:
        raise
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not load {kind} checkpoint at {path}: {first}") from None
    bundle.setup = {"dtype": dtype, "components": components,
                    "offload": apply_offload(offload, bundle.transformer, bundle.pipeline, dev)}
    bundle.setup["attention"] = apply_attention_backend(bundle.transformer, bundle.adapter, attention_backend)
    bundle.scheduler = configure_scheduler(bundle.scheduler, scheduler, scheduler_config)
    if bundle.pipeline is not None:
        bundle.pipeline.scheduler = bundle.scheduler
    return bundle
