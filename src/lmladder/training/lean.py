"""Leaner training passes: the same gradients with less saved for the backward pass.

Plain functions / context managers the training engines (training/sft.py, training/trl_train.py)
apply around a run and undo afterwards, so the model (often the shared base) is handed back
exactly as it was.

* :func:`fused_lora_dropout` -- PEFT computes ``lora_B(lora_A(dropout(x)))``: ``dropout``
  writes a new float tensor (kept for ``lora_A``'s weight gradient) and, on CPU, its float
  noise (kept for its own backward): 8 bytes per input element per adapted module, for
  every token of every layer (on SmolLM2-135M, all-linear, half of all saved activations).
  Fused, ``lora_A`` keeps its input ``x`` itself (one tensor shared by the modules that
  read the same input: q / k / v, gate / up) and a 1-byte keep mask, and rebuilds
  ``dropout(x)`` in the backward pass. Same distribution of masks, same gradients for a
  given mask (tests/training/test_lean.py); the masks are drawn in another order than
  ``nn.Dropout`` would, so runs with dropout are statistically, not bitwise, equal to PEFT's.
* :func:`checkpoint_layers` -- activation checkpointing on the first ``k`` decoder layers
  only (selective): each costs one more forward of that layer in the backward pass and
  keeps only the layer's input.
* :func:`causal_padding_ok` -- right-padded rows need no attention mask in a causal model:
  a real token only attends to the tokens before it, all real; without a mask SDPA runs its
  causal kernel (grouped-query heads not repeated, no ``T x T`` mask kept per layer).
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)


def _autograd():
    import torch

    class DropoutLinear(torch.autograd.Function):
        """``F.linear(dropout(x), weight)``, keeping ``x`` and a bool mask instead of the
        dropped-out copy."""

        @staticmethod
        def forward(ctx, x, weight, p: float):
            keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
            scale = 1.0 / (1.0 - p)
            out = torch.nn.functional.linear(x * keep * scale, weight)
            ctx.save_for_backward(x, keep, weight)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, grad):
            x, keep, weight = ctx.saved_tensors
            gx = gw = None
            if ctx.needs_input_grad[1]:
                xd = x * keep * ctx.scale
                gw = grad.reshape(-1, grad.shape[-1]).t().matmul(xd.reshape(-1, xd.shape[-1]))
                del xd
            if ctx.needs_input_grad[0]:
                gx = grad.matmul(weight) * keep * ctx.scale
            return gx, gw, None

    return DropoutLinear


_FN = None


def dropout_linear(x, weight, p: float):
    """``F.linear(F.dropout(x, p), weight)`` in training, keeping ``x`` and a 1-byte mask."""
    global _FN
    if _FN is None:
        _FN = _autograd()
    return _FN.apply(x, weight, p)


def _lean_linear_class():
    import torch

    class LeanDropoutLinear(torch.nn.Linear):
        """A LoRA ``lora_A`` with its dropout fused in (``lean_p``); the same parameters and
        state dict as the ``nn.Linear`` it was."""

        lean_p = 0.0

        def forward(self, x):
            if self.training and self.lean_p > 0 and torch.is_grad_enabled():
                return dropout_linear(x, self.weight, self.lean_p)
            return super().forward(x)

    return LeanDropoutLinear


_LEAN_CLS = None


@contextlib.contextmanager
def fused_lora_dropout(model):
    """While inside: every PEFT LoRA ``lora_A`` (a plain ``nn.Linear`` without bias, vanilla
    LoRA) whose dropout is an ``nn.Dropout`` with p > 0 computes ``dropout`` fused
    (:func:`dropout_linear`), and a dropout with p = 0 is an ``nn.Identity`` (no copy of the
    input); afterwards the modules are as they were. Yields the number of modules changed."""
    global _LEAN_CLS
    import torch

    if _LEAN_CLS is None:
        _LEAN_CLS = _lean_linear_class()
    changed = []
    for m in model.modules():
        drops, lora_a = getattr(m, "lora_dropout", None), getattr(m, "lora_A", None)
        if not isinstance(drops, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        variants = getattr(m, "lora_variant", None) or {}
        for name, drop in list(drops.items()):
            a = lora_a[name] if name in lora_a else None
            if type(drop) is torch.nn.Dropout and drop.p <= 0:  # (TRL's disable_dropout) a copy for nothing
                drops[name] = torch.nn.Identity()
                changed.append((drops, name, drop, None))
                continue
            if (type(drop) is not torch.nn.Dropout or a is None or type(a) is not torch.nn.Linear
                    or a.bias is not None or name in variants):
                continue
            a.__class__ = _LEAN_CLS
            a.lean_p = float(drop.p)
            drops[name] = torch.nn.Identity()
            changed.append((drops, name, drop, a))
    try:
        yield len(changed)
    finally:
        for drops, name, drop, a in changed:
            if a is not None:
                a.__class__ = torch.nn.Linear
                a.__dict__.pop("lean_p", None)
            drops[name] = drop


def decoder_layers(model) -> list:
    """The model's transformer blocks that transformers can checkpoint one by one
    (``GradientCheckpointingLayer``), in order; [] when it has none."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextlib.contextmanager
def checkpoint_layers(model, k):
    """Activation checkpointing (non-reentrant) on the first ``k`` decoder layers while
    inside; the layers' switches as they were afterwards.

    ``k`` an int: the same layers on every forward; yields the number checkpointed. ``k`` a
    callable ``tokens -> int``: decided at each training forward from the micro-batch's
    tokens (batch x length at the first layer), so only the long micro-batches pay for the
    recomputation; yields the list of the ``k`` chosen at each training forward."""
    import functools

    import torch
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    dynamic = callable(k)
    chosen = layers if dynamic else layers[: max(0, k)]
    saved = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in layers]
    fn = functools.partial(checkpoint, use_reentrant=False)
    handle, seen = None, []
    if any(m.gradient_checkpointing for m in layers):  # whole-model checkpointing already on: leave it
        chosen, dynamic = [], False
    for m in chosen:
        m._gradient_checkpointing_func = fn
        m.gradient_checkpointing = not dynamic
    if dynamic and chosen:
        def pre(mod, args, kwargs):
            hs = args[0] if args else kwargs.get("hidden_states")
            if not (mod.training and torch.is_grad_enabled()) or hs is None or hs.dim() < 2:
                n_ck = 0
            else:
                n_ck = max(0, min(len(layers), int(k(int(hs.shape[0] * hs.shape[1])))))
                seen.append(n_ck)
            for i, m in enumerate(layers):
                m.gradient_checkpointing = i < n_ck

        handle = layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield seen if dynamic else len(chosen)
    finally:
        if handle is not None:
            handle.remove()
        for m, on, f in saved:
            m.gradient_checkpointing = on
            if f is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = f


def causal_padding_ok(model, batch: dict) -> bool:
    """True when ``batch``'s attention mask can be dropped without changing any supervised
    position's output: a causal decoder-only model, every row right-padded (ones, then
    zeros), no position past a row's end supervised (labels -100 there). A real token then
    attends only to the real tokens before it, with or without the mask; padding positions
    attend to anything, but nothing reads them."""
    import torch

    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if mask is None or "position_ids" in batch or "inputs_embeds" in batch:
        return mask is None
    if not torch.is_tensor(mask) or mask.dim() != 2:
        return False
    m = mask.bool()
    right_padded = bool((m[:, :-1] | ~m[:, 1:]).all())  # never a 0 followed by a 1
    if not right_padded:
        return False
    if labels is not None and bool(((labels != -100) & ~m).any()):
        return False
    return True


MMAP_THRESHOLD_MB = 4
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover
        return None


@contextlib.contextmanager
def large_blocks_returned(threshold_mb: int = MMAP_THRESHOLD_MB):
    """While inside (glibc only; elsewhere nothing changes): every host allocation of at least
    ``threshold_mb`` MB is its own ``mmap``, given back to the system when the tensor is freed.

    glibc's default raises its mmap threshold each time a large block is freed (up to 32 MB),
    so a training step's activations (tens of MB each for long sequences) end up in the heap,
    where freed blocks of one size stay resident while the next step asks for another size:
    measured on SmolLM2-135M with 29 of 30 layers checkpointed, one 2048-token forward +
    backward peaked at 4441 MB RSS by default and at 2653 MB with a fixed 4 MB threshold
    (speed within noise; a 128 KB threshold costs ~25% speed on short sequences). The heap is
    trimmed on entry (what evaluation before training freed goes back to the system) and on
    exit; afterwards the threshold is 32 MB (the most glibc's dynamic threshold reaches)."""
    libc = _libc()
    if libc is None:
        yield False
        return
    libc.malloc_trim(0)  # what scoring / the forgetting check freed goes back before training starts
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_mb) * 2**20))
    try:
        yield ok
    finally:
        if ok:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            libc.malloc_trim(0)


CPU_LOGPROB_TOKENS = 256  # tokens per tile of TRL's chunked log-prob LM head on CPU


@contextlib.contextmanager
def small_logprob_tiles(model, tokens: int = CPU_LOGPROB_TOKENS):
    """While inside, on CPU: TRL's fused LM head (``add_fused_lm_head``: DPO, GRPO) projects
    ``tokens`` positions at a time instead of 4096. Its tile is ``tokens x 32768`` fp32 and
    its torch (non-Triton) fold makes several temporaries of that size: at 4096 tokens (all of
    a 2 x 1024-token DPO micro-batch in one tile) that is ~270 MB a copy, >1 GB transient.
    The same numbers come out (the tiles only split the positions). Elsewhere nothing changes."""
    try:
        from trl.kernels import chunked_logprob
    except ImportError:
        yield None
        return
    try:
        cuda = next(model.parameters()).device.type == "cuda"
    except (StopIteration, AttributeError):
        cuda = False
    if cuda or not hasattr(chunked_logprob, "TOKEN_CHUNK_SIZE"):
        yield None
        return
    before = chunked_logprob.TOKEN_CHUNK_SIZE
    chunked_logprob.TOKEN_CHUNK_SIZE = min(before, int(tokens))
    try:
        yield chunked_logprob.TOKEN_CHUNK_SIZE
    finally:
        chunked_logprob.TOKEN_CHUNK_SIZE = before
