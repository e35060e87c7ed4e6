"""The model-adapter contract: every model-specific fact the runtime needs, in one place.

An adapter is stateless; it describes one diffusers transformer class:

* which module lists are the transformer blocks (in execution order) and which block is the probe;
* how one denoising step calls the model (input layout, timestep convention, conditioning kwargs);
* how the scheduler's timesteps are set up the way the model's diffusers pipeline does it;
* how latents are laid out (shape for a given height/width/frames) and tokenised (token counts).

Conditioning tensors travel in a :class:`Conditioning`; classifier-free guidance is applied by
:meth:`ModelAdapter.predict`, which runs the conditional and unconditional halves as one batch
(conditional first, as diffusers' DiT pipeline does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedError


@dataclass(frozen=True)
class StreamSpec:
    """How a block passes its hidden-state streams.

    ``inputs``: (keyword name, positional index) of each stream in the block's call;
    ``outputs``: position of each stream in the returned tuple, or ``None`` when the block
    returns the single stream as a tensor.
    """

    inputs: tuple[tuple[str, int], ...] = (("hidden_states", 0),)
    outputs: tuple[int, ...] | None = None

    def read(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The stream tensors of one block call."""
        return tuple(kwargs[n] if n in kwargs else args[i] for n, i in self.inputs)

    def replace(self, args: tuple, kwargs: dict, streams: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the streams replaced by ``streams``."""
        args, kwargs = list(args), dict(kwargs)
        for (name, pos), value in zip(self.inputs, streams):
            if name in kwargs or pos >= len(args):
                kwargs[name] = value
            else:
                args[pos] = value
        return tuple(args), kwargs

    def pack(self, streams: tuple[torch.Tensor, ...]) -> Any:
        """A block return value holding ``streams``."""
        if self.outputs is None:
            return streams[0]
        out: list[Any] = [None] * len(self.outputs)
        for stream, pos in zip(streams, self.outputs):
            out[pos] = stream
        return tuple(out)

    def unpack(self, output: Any) -> tuple[torch.Tensor, ...]:
        """The streams of a block return value, in input order."""
        if self.outputs is None:
            return (output,)
        return tuple(output[pos] for pos in self.outputs)


@dataclass(frozen=True)
class BranchSpec:
    """The residual branches of one block, for block-level caching (``cache.granularity: block``).

    ``cached``: submodules (names relative to the block) whose outputs are the block's residual
    branches *before* their gate — the block's own forward multiplies them by the current step's
    modulation, so a forecast branch is re-gated for free. ``skipped``: submodules whose outputs
    only feed a cached one (e.g. a single-stream block's attention and MLP input, which meet in
    the cached ``proj_out``); on a forecast step they return zero-width tensors instead of computing.
    """

    cached: tuple[str, ...]
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenBranch:
    """How one branch submodule runs on a subset of tokens (``cache.granularity: token``).

    ``kind``:

    * ``rows``: the module is row-wise (an MLP, a cross-attention whose queries are the tokens):
      the selected rows of its first input (a ``stream``) go through it;
    * ``pass``: the module's input already holds only the selected rows (an activation between
      two ``rows`` modules): it runs unchanged;
    * ``gathered``: like ``pass``, and its output is scattered back into the forecast (a
      single-stream block's ``proj_out``, fed by ``rows`` / attention subsets);
    * ``attention``: self- or joint attention with queries from the selected tokens only and keys
      and values from every token; the adapter's :meth:`ModelAdapter.token_attention` runs it.

    ``streams``: the token streams of the module's input (``rows``) or outputs (``attention``,
    ``gathered``), each ``video`` (image or video tokens), ``text``, or one sequence of both:
    ``joint`` (video then text, HunyuanVideo's single-stream blocks) or ``joint_text_first`` (text
    then image, FLUX's single-stream blocks)."""

    kind: str
    streams: tuple[str, ...] = ("video",)


@dataclass(frozen=True)
class TokenSpec:
    """Token-level facts of one block: the names of its input streams (in :class:`StreamSpec`
    order), how each branch submodule of its :class:`BranchSpec` runs on selected tokens, and
    ``context``: the keyword argument of a conditioning sequence that is attended to but never
    refreshed (PixArt's text), whose length the FLOP count needs."""

    streams: tuple[str, ...]
    branches: dict[str, TokenBranch]
    context: tuple[str, int] | None = None  # (keyword, positional index) in the block's call
    kv: dict[str, str] = field(default_factory=dict)
    """Key and value projections of the block's self-/joint attention (submodule path → the
    stream of their input rows): with ``cache.token_kv: forecast`` they are cached like branches
    and run on the selected tokens only."""


EncodedPrompts = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""A prompt encoder's ``(states [B, L, D], mask [B, L] bool, pooled [B, P] or None)``."""


@dataclass
class Conditioning:
    """Per-sample model inputs that do not change over the denoising steps.

    Every tensor in ``kwargs``/``uncond_kwargs`` is batch-first (``[B, ...]``) and is passed to the
    transformer's forward under its key. ``uncond_kwargs`` is ``None`` when guidance is off.
    """

    kwargs: dict[str, torch.Tensor]
    uncond_kwargs: dict[str, torch.Tensor] | None = None
    guidance_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # non-batched kwargs (e.g. Flux ids)

    @property
    def batch_size(self) -> int:
        """Number of samples described."""
        return next(iter(self.kwargs.values())).shape[0]

    def select(self, index: torch.Tensor) -> "Conditioning":
        """The conditioning of a sub-batch (``index``: 1-D long tensor of sample positions)."""
        pick = lambda d: None if d is None else {k: v[index.to(v.device)] for k, v in d.items()}
        return Conditioning(pick(self.kwargs), pick(self.uncond_kwargs), self.guidance_scale, self.extra)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move tensors to ``device``; floating tensors are cast to ``dtype`` when given."""
        def move(d):
            if d is None:
                return None
            return {k: v.to(device=device, dtype=dtype if (dtype and v.is_floating_point()) else v.dtype)
                    for k, v in d.items()}
        return Conditioning(move(self.kwargs), move(self.uncond_kwargs), self.guidance_scale, self.extra)


class ModelAdapter(ABC):
    """Model facts for one diffusers transformer class (see the module docstring)."""

    family: ClassVar[str]
    model_class: ClassVar[str]  # diffusers class name
    is_video: ClassVar[bool] = False
    attention_mask: ClassVar[bool] = False
    """Whether the model passes an attention mask to every attention call (then backends that take
    no mask, or expand it densely, cannot run it; see :mod:`specdist.attention`)."""
    call_timestep_scale: ClassVar[float] = 1.0
    """``scheduler.timesteps`` value = the transformer call's ``timestep`` × this (FLUX pipelines
    pass ``t / 1000``; most others pass ``t``)."""

    # ----- structure -------------------------------------------------------------------------
    @abstractmethod
    def block_lists(self, model: nn.Module) -> list[str]:
        """Names of the ``nn.ModuleList`` attributes holding blocks, in execution order."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Every transformer block in execution order."""
        return [b for name in self.block_lists(model) for b in getattr(model, name)]

    def block_names(self, model: nn.Module) -> list[str]:
        """Qualified module names of :meth:`blocks` (e.g. ``transformer_blocks.3``)."""
        return [f"{name}.{i}" for name in self.block_lists(model) for i in range(len(getattr(model, name)))]

    def probe_block_index(self, model: nn.Module) -> int:
        """Default block used to verify forecasts cheaply: the last one."""
        return len(self.blocks(model)) - 1

    def stream_spec(self, model: nn.Module, index: int) -> StreamSpec:
        """Stream layout of block ``index`` (default: one ``hidden_states`` tensor in and out)."""
        return StreamSpec()

    def branch_spec(self, model: nn.Module, index: int) -> BranchSpec:
        """Residual branches of block ``index`` (block-level caching)."""
        raise UnsupportedError(f"{self.model_class}: block-level caching (cache.granularity: block) is not "
                                  f"supported; use 'probe' or 'output'")

    def token_spec(self, model: nn.Module, index: int) -> TokenSpec:
        """Token-level facts of block ``index`` (``cache.granularity: token``)."""
        raise UnsupportedError(f"{self.model_class}: token-level caching (cache.granularity: token) is not "
                                  f"supported; use 'block'")

    def token_attention(self, module: nn.Module, run: Any, args: tuple, kwargs: dict,
                        index: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run attention submodule ``module`` (original forward ``run``, called with ``args`` /
        ``kwargs`` by its block) with queries from the selected tokens only: ``index[stream]`` is
        ``[rows, k]`` sorted token positions per stream. Returns the outputs of the selected tokens,
        one ``[rows, k, D]`` tensor per stream of the branch's :class:`TokenBranch`."""
        raise UnsupportedError(f"{self.model_class}: no token-level attention")

    @abstractmethod
    def head_modules(self, model: nn.Module) -> list[str]:
        """Names of the modules that turn the last block's hidden states into the output."""

    # ----- shapes ----------------------------------------------------------------------------
    @abstractmethod
    def latent_shape(self, model: nn.Module, height: int, width: int, frames: int) -> tuple[int, ...]:
        """Per-sample latent shape (no batch dim) for an output of the given pixel size.

        ``height``/``width``/``frames`` are in the model's own latent units when the model works
        in pixel space (the zoo) and must be divided by the VAE factors by the caller otherwise.
        """

    @abstractmethod
    def token_counts(self, model: nn.Module, latent_shape: tuple[int, ...], cond: Conditioning | None) -> tuple[int, int]:
        """(image/video tokens, text tokens) of one sample: what attention and FLOPs scale with."""

    # ----- calling ---------------------------------------------------------------------------
    def set_timesteps(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...], device: torch.device) -> None:
        """Set up ``scheduler`` for ``steps`` steps as the model's diffusers pipeline does."""
        scheduler.set_timesteps(steps, device=device)

    @abstractmethod
    def forward(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                kwargs: dict[str, torch.Tensor], extra: dict[str, Any]) -> torch.Tensor:
        """One transformer call. ``latents``: ``[B, *latent_shape]``; ``timestep``: scalar tensor
        from ``scheduler.timesteps`` (or ``[B]`` of them, one per sample; see :func:`timestep_batch`). Returns the model output in the scheduler's prediction space
        with the latents' shape (learned-variance channels already dropped)."""

    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Model output for one step, with classifier-free guidance when ``cond`` asks for it."""
        if cond.uncond_kwargs is None or cond.guidance_scale <= 1.0:
            return self.forward(model, latents, timestep, cond.kwargs, cond.extra)
        both = {k: torch.cat([cond.kwargs[k], cond.uncond_kwargs[k]]) for k in cond.kwargs}
        if torch.as_tensor(timestep).ndim == 1 and torch.as_tensor(timestep).numel() > 1:  # one per sample
            timestep = torch.cat([timestep, timestep])
        out = self.forward(model, torch.cat([latents, latents]), timestep, both, cond.extra)
        out_cond, out_uncond = out.chunk(2)
        return out_uncond + cond.guidance_scale * (out_cond - out_uncond)

    # ----- context parallelism (a worker that is a gang of ranks) --------------------------------
    def context_parallel_unsupported(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot run context-parallel (one line), or ``None`` when it can."""
        if getattr(type(model), "_cp_plan", None) is None:
            return f"{self.model_class} has no context-parallel plan"
        return None

    def context_parallel_plan(self, model: nn.Module) -> dict[str, Any]:
        """The diffusers ``ContextParallelModelPlan`` passed to ``enable_parallelism`` (default: the
        class's own ``_cp_plan``)."""
        reason = self.context_parallel_unsupported(model)
        if reason:
            raise ValueError(reason)
        return type(model)._cp_plan

    def context_parallel_lengths(self, model: nn.Module, latent_shape: tuple[int, ...],
                                 cond: Conditioning | None) -> dict[str, int]:
        """The sequence lengths the plan splits over a gang, by name (each must divide by the gang
        size; diffusers' equal-part sharder asserts it)."""
        return {}

    def attention_heads(self, model: nn.Module) -> int:
        """Attention heads (Ulysses splits them over the gang)."""
        return int(model.config.num_attention_heads)

    def apply_context_parallel_hooks(self, model: nn.Module, cp_config: Any) -> None:
        """Model-specific hooks that go with the plan, registered after ``enable_parallelism``
        (default: none)."""

    # ----- diffusers pipelines (users' local checkpoints) ---------------------------------------
    def pipeline_latent_size(self, pipe: Any, height: int, width: int, frames: int) -> tuple[int, int, int]:
        """(height, width, frames) in latent units for a pipeline's VAE."""
        raise UnsupportedError(f"{self.model_class}: loading from a diffusers pipeline is not supported")

    def pipeline_conditioning(self, pipe: Any, prompts: list[str], class_labels: list[int],
                              guidance_scale: float, device: torch.device) -> Conditioning:
        """Encode prompts (or class labels) with the pipeline's own encoders."""
        raise UnsupportedError(f"{self.model_class}: loading from a diffusers pipeline is not supported")

    def pipeline_decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Decode final latents with the pipeline's VAE to pixels in [-1, 1]."""
        raise UnsupportedError(f"{self.model_class}: loading from a diffusers pipeline is not supported")

    # ----- specdist zoo prompt encoder ------------------------------------------------------------
    def prompt_conditioning(self, encoded: EncodedPrompts, uncond: EncodedPrompts | None = None,
                            guidance_scale: float = 1.0) -> Conditioning:
        """Conditioning from a zoo :class:`~specdist.zoo.text_encoder.PromptEncoder`'s output
        (``states [B, L, D]``, ``mask [B, L]`` bool, ``pooled [B, P]`` or ``None``) and that of the
        empty prompt ``uncond``, in the form this model's pipeline feeds its transformer.
        Differentiable (training builds its conditioning the same way)."""
        raise UnsupportedError(f"{self.model_class}: no conditioning from the zoo's prompt encoder")

    @abstractmethod
    def random_conditioning(self, model: nn.Module, batch: int, generator: torch.Generator,
                            guidance_scale: float = 1.0) -> Conditioning:
        """Conditioning of the right shapes with random content (tests, random-weight timing)."""


def timestep_batch(timestep: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``timestep`` expanded to ``[batch]`` on ``device``: a scalar for every sample, or one timestep
    per sample (a 1-D tensor of ``batch`` entries, e.g. exact mode's verification of states at
    different steps in one call)."""
    t = torch.as_tensor(timestep, device=device)
    if dtype is not None:
        t = t.to(dtype)
    if t.ndim == 1 and t.numel() == batch and batch > 1:
        return t
    return t.reshape(-1)[:1].expand(batch)


class DualStreamAdapter(ModelAdapter):
    """MM-DiT layout shared by FLUX and HunyuanVideo: dual-stream ``transformer_blocks``, then
    single-stream ``single_transformer_blocks``, then the ``norm_out`` / ``proj_out`` head."""

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks", "single_transformer_blocks"]

    def head_modules(self, model: nn.Module) -> list[str]:
        return ["norm_out", "proj_out"]

    def branch_spec(self, model: nn.Module, index: int) -> BranchSpec:
        # Dual-stream: joint attention (gate_msa / c_gate_msa), ff (gate_mlp), ff_context (c_gate_mlp).
        # Single-stream: proj_out of [attention, MLP] is the one gated branch; attention and the
        # MLP input feed only it.
        if index < len(model.transformer_blocks):
            return BranchSpec(cached=("attn", "ff", "ff_context"))
        return BranchSpec(cached=("proj_out",), skipped=("attn", "proj_mlp", "act_mlp"))


def basic_block_branches(block: nn.Module) -> BranchSpec:
    """Branches of a diffusers ``BasicTransformerBlock`` (DiT, PixArt): self-attention (gated by
    ``gate_msa`` under adaLN), cross-attention when present (ungated), feed-forward (``gate_mlp``)."""
    names = ("attn1",) + (("attn2",) if getattr(block, "attn2", None) is not None else ()) + ("ff",)
    return BranchSpec(cached=names)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index [B, k]`` (token positions) of ``x [B, N, ...]`` → ``[B, k, ...]``."""
    idx = index.to(x.device).reshape(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def basic_block_tokens(block: nn.Module) -> TokenSpec:
    """Token-level facts of a ``BasicTransformerBlock`` (DiT, PixArt): one token stream; the
    self-attention takes its queries from the selected tokens (:func:`basic_self_attention`), the
    cross-attention and the feed-forward are row-wise."""
    branches = {"attn1": TokenBranch("attention"), "ff": TokenBranch("rows")}
    cross = getattr(block, "attn2", None) is not None
    if cross:
        branches["attn2"] = TokenBranch("rows")
    return TokenSpec(streams=("video",), branches=branches, context=("encoder_hidden_states", 2) if cross else None,
                     kv={"attn1.to_k": "video", "attn1.to_v": "video"})


def basic_self_attention(run: Any, args: tuple, kwargs: dict, index: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
    """Self-attention of a ``BasicTransformerBlock`` (``attn1``, diffusers' ``AttnProcessor2_0``)
    with queries from the selected tokens: the selected rows go in as ``hidden_states`` and every
    token as ``encoder_hidden_states`` — the processor then takes the queries (and the output
    projection) from the first and the keys and values from the second, so nothing else runs on
    the unselected tokens. Bit-identical to the full call when every token is selected."""
    x = args[0] if args else kwargs["hidden_states"]
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "encoder_hidden_states")}
    if len(args) > 1:
        raise ValueError("basic_self_attention: attn1 called with positional arguments after hidden_states")
    return (run(gather_rows(x, index["video"]), encoder_hidden_states=x, **rest),)


class BasicBlocksAdapter(ModelAdapter):
    """Shared facts of the families built from diffusers' ``BasicTransformerBlock`` in
    ``transformer_blocks`` (DiT, PixArt): their branches, token streams and query-subset
    self-attention, and why they cannot run context-parallel."""

    def block_lists(self, model: nn.Module) -> list[str]:
        return ["transformer_blocks"]

    def branch_spec(self, model: nn.Module, index: int) -> BranchSpec:
        return basic_block_branches(model.transformer_blocks[index])

    def token_spec(self, model: nn.Module, index: int) -> TokenSpec:
        return basic_block_tokens(model.transformer_blocks[index])

    def token_attention(self, module: nn.Module, run: Any, args: tuple, kwargs: dict,
                        index: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return basic_self_attention(run, args, kwargs, index)

    def context_parallel_unsupported(self, model: nn.Module) -> str | None:
        return (f"{self.model_class} cannot run context-parallel in diffusers 0.42.1 (its attention processor, "
                "AttnProcessor2_0, calls SDPA itself, not diffusers' dispatcher); gang_size > 1 is for FLUX, "
                "HunyuanVideo and Wan")
