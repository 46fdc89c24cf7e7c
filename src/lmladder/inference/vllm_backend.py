"""Evaluate generative rungs through vLLM's offline batching: ``--model vllm:PATH``.

``PATH`` is any model spec lmladder takes (a transformers folder, a hub id, a ``.gguf``
file, ``smollm2-135m``); vLLM loads its transformers weights (for GGUF and the embedded
model: lmladder's safetensors conversion). Prompts are built and tokenized by lmladder
exactly as for a local model (chat template, shots, reasoning prompts) and handed to
``vllm.LLM.generate`` as token ids with ``SamplingParams`` (greedy: temperature 0; n
samples; top_p; a seed; the end-of-turn ids as stop tokens): the whole split in one call,
which vLLM batches continuously on the GPU. Texts come back in order, special tokens
removed, as from inference/generate.generate (whose first lines hand off to
:meth:`VLLMModel.generate_texts`).

What it does not do: rungs that train (they need local weights: an error before the run
starts), label scoring by log-likelihood (classification / multiple-choice through
zero-shot, few-shot...: the rung fails with a one-line reason; use generative rungs such
as cot, or ``--model openai:NAME`` against ``lmladder serve --engine vllm``, whose echoed
prompt log-probs score labels), and grammar-constrained decoding (``constrained: true``).

vLLM is imported only when such a model is loaded; without it the run stops at validation
with one line saying how to install it.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from lmladder.errors import LadderError

log = logging.getLogger(__name__)

PREFIX = "vllm:"
TRAINING_ERROR = (
    "the vllm: backend evaluates generative inference rungs only; rung '{rung}' trains weights and "
    "needs a local model (--model folder, hub id or .gguf)"
)
LABEL_SCORING_ERROR = (
    "the vllm: backend generates text; label scoring by log-likelihood (this rung on a {kind} task) is not "
    "offered through it. Use a generative rung (cot, self-consistency, constrained: false generation), a local "
    "model, or --model openai:NAME against `lmladder serve --engine vllm` (echo + logprobs)"
)


def is_vllm(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(PREFIX)


def model_path(spec: str) -> str:
    p = spec[len(PREFIX):].strip()
    if not p:
        raise LadderError(f"model '{spec}': give the model, e.g. vllm:Qwen/Qwen2.5-0.5B-Instruct or vllm:./my-model")
    if is_vllm(p):
        raise LadderError(f"model '{spec}': one vllm: prefix")
    return p


INSTALL_HINT = "pip install vllm (on a machine with a CUDA GPU)"


def vllm_version() -> str | None:
    """The installed vLLM's version, None when it is not installed (nothing is imported)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def require_vllm(what: str = "--model vllm:PATH") -> str:
    """vLLM's version, or a one-line LadderError saying how to install it."""
    v = vllm_version()
    if v is None:
        raise LadderError(f"{what} needs vLLM, which is not installed ({INSTALL_HINT})")
    return v


class VLLMModel:
    """What the ladder holds as 'the model' for a ``vllm:`` spec: a vllm.LLM and the few
    attributes lmladder reads from a model."""

    def __init__(self, path: str, llm=None, config=None, **llm_kwargs):
        self.path = path
        self.llm = llm
        self.llm_kwargs = llm_kwargs
        self.config = config or SimpleNamespace(max_position_embeddings=None)
        self.generation_config = None
        self.training = False

    def _engine(self):
        if self.llm is None:
            try:
                from vllm import LLM
            except ImportError as e:
                raise LadderError(f"--model vllm:PATH needs vLLM ({e}); pip install vllm on a CUDA machine") from None
            self.llm = LLM(model=self.path, trust_remote_code=False, **self.llm_kwargs)
        return self.llm

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def parameters(self):  # local label scoring starts here: say why it cannot
        raise LadderError(LABEL_SCORING_ERROR.format(kind="label-scored"))

    def __call__(self, *a, **k):
        raise LadderError(LABEL_SCORING_ERROR.format(kind="label-scored"))

    def generate_texts(self, tokenizer, prompt_ids, *, max_new_tokens: int, n: int = 1, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, stop_ids=(), processors=None):
        """texts[prompt][sample] and generate.GenStats, as inference/generate.generate returns them."""
        from lmladder.inference.generate import GenStats

        if processors is not None:
            raise LadderError("constrained decoding is not offered through the vllm: backend yet (set constrained: "
                              "false, or use a local model)")
        from vllm import SamplingParams

        sp = SamplingParams(n=max(1, n), max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_p=top_p if do_sample else 1.0, seed=seed if do_sample else None,
                            stop_token_ids=sorted(stop_ids), skip_special_tokens=True)
        t0 = time.perf_counter()
        outs = self._engine().generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sp, use_tqdm=False)
        texts, gen = [], 0
        for o in outs:
            texts.append([c.text for c in o.outputs])
            gen += sum(len(c.token_ids) for c in o.outputs)
        stats = GenStats(prompts=len(prompt_ids), sequences=len(prompt_ids) * max(1, n),
                         prompt_tokens=sum(map(len, prompt_ids)), prefill_tokens=sum(map(len, prompt_ids)),
                         generated_tokens=gen, seconds=time.perf_counter() - t0, extra={"backend": "vllm"})
        return texts, stats
