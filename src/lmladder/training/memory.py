"""Training within a memory budget (``memory_budget_mb``, issue 16).

The global batch (``batch_size x grad_accum``) is the config's and never changes; what this
module chooses is how it is run: the micro-batch (sequences per forward / backward) with the
gradient accumulation that gives the same global batch, and, when even one sequence per
micro-batch would not fit, how many decoder layers are checkpointed (training/lean.py's
selective :func:`~lmladder.training.lean.checkpoint_layers`).

The estimate (:func:`activation_mb_per_token`) was calibrated on SmolLM2-135M, LoRA r=16
all-linear, fp32, CPU with the fused LoRA dropout (training/lean.py): ~3.5 MB of saved
activations and backward temporaries per token of a micro-batch, i.e. ``(20 x hidden + 12 x
intermediate) x layers x 4 bytes``; the same formula scales with the model's shape and dtype.

The micro-batch is also capped at :data:`CPU_MICRO_TOKENS` / :data:`GPU_MICRO_TOKENS` tokens:
past that size a larger micro-batch buys no throughput (measured on CPU: 128 tokens per
micro-batch ran at ~95% of 256's and 512's tokens/s), only memory, so the default gives the
memory back. A budget below what one sequence needs checkpoints layers (each costs about one
more forward of that layer).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

CPU_MICRO_TOKENS = 256  # tokens per micro-batch past which CPU training throughput stops rising
GPU_MICRO_TOKENS = 16384
DEFAULT_FRACTION = 0.5  # memory_budget_mb unset: at most half of the memory available when training starts
DEFAULT_ACT_SHARE = 0.5  # ... and activations of at most half a CPU_MICRO_TOKENS micro-batch (the rest checkpointed)
SLACK_MB = 300  # allocator slack, the dataloader's batch, the loss


@dataclass
class MemoryPlan:
    budget_mb: int
    micro: int  # sequences per micro-batch, per process
    accum: int  # micro-batches per optimizer step, per process
    checkpoint_layers: int  # decoder layers recomputed for the longest micro-batch (selective)
    fit_tokens: int  # micro-batch tokens that fit without checkpointing; longer ones checkpoint layers
    n_layers: int
    estimate_mb: int  # the planned peak
    auto_budget: bool  # budget from the machine (memory_budget_mb unset)
    per_token_mb: float = 0.0  # activations per token, all layers
    input_mb: float = 0.0  # a checkpointed layer's kept input, per token

    def as_dict(self) -> dict:
        return asdict(self)

    def activations_mb(self, tokens: int, k: int) -> float:
        """A micro-batch's activations with its first ``k`` layers checkpointed: the other
        layers', the checkpointed layers' inputs, and one layer recomputed in backward."""
        if not self.n_layers:
            return self.per_token_mb * tokens
        layer = self.per_token_mb * tokens / self.n_layers
        return layer * (self.n_layers - k) + (layer + self.input_mb * tokens * k if k else 0.0)

    def layers_for(self, tokens: int) -> int:
        """Layers to checkpoint for a micro-batch of ``tokens`` tokens (0 when it fits)."""
        if tokens <= self.fit_tokens or not self.n_layers:
            return 0
        room = self.per_token_mb * self.fit_tokens
        return next((k for k in range(1, self.n_layers) if self.activations_mb(tokens, k) <= room), self.n_layers)


def _cuda(model) -> bool:
    try:
        return next(model.parameters()).device.type == "cuda"
    except (StopIteration, AttributeError):
        return False


def available_mb(cuda: bool = False) -> float:
    """Memory available now: free device memory on CUDA, else the machine's available RAM."""
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 2**20
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:  # pragma: no cover - psutil is a transformers / accelerate dependency
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def used_mb(cuda: bool = False) -> float:
    """What the process holds now (the weights, the optimizer is not there yet)."""
    if cuda:
        import torch

        return torch.cuda.memory_allocated() / 2**20
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return 0.0


def default_budget_mb(cuda: bool = False, fixed_mb: float | None = None, per_token_mb: float = 0.0,
                      cap_tokens: int = 0) -> int:
    """``memory_budget_mb`` unset: what this process holds plus half of what is available, but
    no more than the fixed part (``fixed_mb``: weights, optimizer, slack) plus the activations
    of half a full-speed micro-batch (``DEFAULT_ACT_SHARE x cap_tokens`` tokens): more memory
    buys little speed, so it is left to the rest of the machine; a longer micro-batch
    checkpoints the share of its layers that keeps it there (selective, decided per
    micro-batch: about 1% of speed per layer of 30 on CPU)."""
    machine = used_mb(cuda) + DEFAULT_FRACTION * available_mb(cuda)
    if fixed_mb is None or not per_token_mb or not cap_tokens:
        return int(machine)
    return int(min(machine, fixed_mb + DEFAULT_ACT_SHARE * cap_tokens * per_token_mb))


def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return cfg


def activation_mb_per_token(model) -> float:
    """Saved activations + backward temporaries per token of a micro-batch, all layers."""
    import torch

    c = _text_config(model)
    h = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or 768
    i = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    L = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or 12
    try:
        dtype = next(p for p in model.parameters() if p.is_floating_point() and p.requires_grad).dtype
    except StopIteration:
        dtype = torch.float32
    nbytes = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    return (20 * h + 12 * i) * L * nbytes / 2**20


def n_layers(model) -> int:
    from lmladder.training import lean

    return len(lean.decoder_layers(model)) or (getattr(_text_config(model), "num_hidden_layers", None) or 0)


def optimizer_mb(model) -> float:
    """Gradients + AdamW's two moments of the trainable parameters (fp32)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n * 12 / 2**20


def plan(model, lengths: list[int], micro: int, accum: int, budget_mb: int | None, *,
         full_checkpointing: bool = False, cap_tokens: int | None = None, layers: bool = True) -> MemoryPlan:
    """The micro-batch (a divisor of ``micro``, the per-process micro-batch the global batch
    allows) and the checkpointing for ``budget_mb`` (None: :func:`default_budget_mb`).

    Sequences are grouped by length, so the largest micro-batch of ``m`` sequences is taken
    as ``m x`` the longest one. A micro-batch longer than ``fit_tokens`` checkpoints its first
    ``layers_for(tokens)`` layers (decided per micro-batch: lean.checkpoint_layers).
    ``full_checkpointing`` (``gradient_checkpointing: true``): every layer is already
    recomputed; only the micro-batch is chosen. ``layers=False``: no layer may be checkpointed
    (prefix tuning); only the micro-batch is chosen."""
    cuda = _cuda(model)
    cap = cap_tokens or (GPU_MICRO_TOKENS if cuda else CPU_MICRO_TOKENS)
    longest = max(lengths) if lengths else 1
    per_token = activation_mb_per_token(model)
    L = n_layers(model) if layers or full_checkpointing else 0
    if full_checkpointing and L:
        per_token = per_token / L * 2  # one layer's activations live at a time, plus the layer inputs
    fixed = used_mb(cuda) + optimizer_mb(model) + SLACK_MB
    auto = budget_mb is None
    if auto:  # in tokens, not from the RSS: the same plan on every run (seeded runs stay bitwise equal)
        fit = cap if full_checkpointing else int(DEFAULT_ACT_SHARE * cap)
        machine_room = DEFAULT_FRACTION * available_mb(cuda) - optimizer_mb(model) - SLACK_MB
        if per_token and machine_room < fit * per_token:  # a small machine: what it has
            fit = max(int(machine_room / per_token), 0)
        budget = int(fixed + fit * per_token)
    else:
        budget = int(budget_mb)
        fit = int(max(budget - fixed, 0.0) / per_token) if per_token else 10**9

    G = micro * accum
    divisors = [d for d in range(micro, 0, -1) if micro % d == 0]
    m = next((d for d in divisors if d * longest <= cap and d * longest <= fit), 1)
    if full_checkpointing or not L:
        fit = max(fit, m * longest)  # nothing more to checkpoint
    p = MemoryPlan(budget_mb=budget, micro=m, accum=G // m, checkpoint_layers=0, fit_tokens=fit, n_layers=L,
                   estimate_mb=0, auto_budget=auto, per_token_mb=per_token, input_mb=_hidden_mb(model))
    p.checkpoint_layers = p.layers_for(m * longest)
    p.estimate_mb = int(fixed + p.activations_mb(m * longest, p.checkpoint_layers))
    if p.estimate_mb > budget:
        log.warning("memory budget %d MB: a micro-batch of %d tokens needs ~%d MB even with %d of %d layers "
                    "checkpointed; training anyway", budget, m * longest, p.estimate_mb, p.checkpoint_layers, L)
    return p


def _hidden_mb(model) -> float:
    """One token's hidden state (what a checkpointed layer keeps), in MB."""
    c = _text_config(model)
    h = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or 768
    return h * 4 / 2**20


def report(p: MemoryPlan, checkpointed, fused: int) -> dict:
    """The plan as a rung's result shows it (``details.memory_plan``): ``checkpointed`` is what
    lean.checkpoint_layers yielded (a count, or the layers chosen at each training forward)."""
    out = {**p.as_dict(), "fused_lora_dropout_modules": fused}
    if isinstance(checkpointed, list):
        out["micro_batches_checkpointed"] = sum(1 for k in checkpointed if k)
        out["micro_batches"] = len(checkpointed)
        out["max_layers_checkpointed"] = max(checkpointed, default=0)
    return out
