"""Evaluate a model behind any OpenAI-compatible endpoint (vLLM, llama.cpp server, ...).

``--model openai:<model-name>`` makes the inference rungs (zero-shot, few-shot) score
through ``POST {OPENAI_BASE_URL}/completions`` instead of a local model:

* **Where**: ``OPENAI_BASE_URL`` (e.g. ``http://localhost:8000/v1``), key from
  ``OPENAI_API_KEY`` (optional for a local vLLM).
* **Prompts** are rendered client-side exactly as for a local model: with the chat
  template of a local tokenizer when ``LMLADDER_OPENAI_TOKENIZER`` names one (an HF
  folder or hub id, normally the served model's), else as plain text (no template).
* **Classification** is scored as lm-eval-harness does over such APIs: for each
  (prompt, label) one completion request row with ``prompt = prompt + label``,
  ``echo=true, logprobs=1, max_tokens=0`` (vLLM semantics: the prompt's own token
  log-probabilities come back, nothing is generated). The label's score is the sum of
  the log-probabilities of the tokens whose ``text_offset`` is at or after the end of
  the prompt text (and before the end of the label: a server that refuses
  ``max_tokens=0`` with HTTP 400 is asked again with ``max_tokens=1`` and the generated
  token is ignored). Rows are sent ``eval.batch_size`` prompts per request.
* Training rungs need local weights: ``lora`` with an ``openai:`` model is an error
  ("the openai backend serves inference rungs only").

The server tokenises the text itself; if it adds a BOS token, or its tokenizer splits
the prompt/label boundary differently, scores can differ slightly from a local run
of the same weights. A token that straddles the boundary is counted with the label
and reported in ``details.boundary_straddles``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from lmladder.errors import LadderError

log = logging.getLogger(__name__)

PREFIX = "openai:"
TRAINING_ERROR = (
    "the openai backend serves inference rungs only (zero-shot, few-shot); rung '{rung}' "
    "trains weights and needs a local model (--model folder, hub id or .gguf)"
)


def is_openai(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(PREFIX)


def fingerprint_part(spec: str | None) -> dict | None:
    """What results from an ``openai:`` model depend on besides its name: the server and the
    tokenizer used for token counts and continuations (run/fingerprint.py); None otherwise."""
    if not is_openai(spec):
        return None
    return {"endpoint": os.environ.get("OPENAI_BASE_URL", "").rstrip("/"),
            "tokenizer": os.environ.get("LMLADDER_OPENAI_TOKENIZER") or None}


def model_name(spec: str) -> str:
    name = spec[len(PREFIX):].strip()
    if not name:
        raise LadderError(f"model '{spec}': give the served model's name, e.g. openai:Qwen/Qwen2.5-0.5B-Instruct")
    return name


def base_url() -> str:
    url = os.environ.get("OPENAI_BASE_URL", "").strip()
    if not url:
        raise LadderError(
            "the openai backend needs OPENAI_BASE_URL (e.g. http://localhost:8000/v1 for vLLM)"
        )
    if not url.startswith(("http://", "https://")):
        raise LadderError(f"OPENAI_BASE_URL={url}: expected an http(s):// URL")
    return url.rstrip("/")


class PlainTokenizer:
    """Stands in for a tokenizer when none is configured: no chat template, no special
    tokens; counts UTF-8 bytes (only used for rough cost numbers)."""

    chat_template = None
    eos_token = ""
    eos_token_id = None
    pad_token_id = None

    class _Enc:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text: str, add_special_tokens: bool = True):
        return self._Enc(list(text.encode("utf-8")))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer():
    """The local tokenizer named by LMLADDER_OPENAI_TOKENIZER, else PlainTokenizer."""
    name = os.environ.get("LMLADDER_OPENAI_TOKENIZER", "").strip()
    if not name:
        return PlainTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LadderError(f"LMLADDER_OPENAI_TOKENIZER={name}: could not load ({first})") from None


@dataclass
class OpenAIModel:
    """What the ladder holds as 'the model' for an ``openai:`` spec."""

    name: str
    url: str
    api_key: str | None = None
    timeout: float = 600.0
    retries: int = 3
    requests: int = 0
    server_tokens: int = 0
    max_tokens: int = 0  # 1 once a server refuses 0 (generated tokens are cut off by offset)

    @classmethod
    def from_env(cls, spec: str) -> "OpenAIModel":
        return cls(model_name(spec), base_url(), os.environ.get("OPENAI_API_KEY") or None)

    # ------------------------------------------------------------------ http

    def _post(self, client, payload: dict) -> dict:
        url = f"{self.url}/completions"
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                r = client.post(url, json=payload)
            except Exception as e:  # connection refused, timeouts
                err = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    self.requests += 1
                    return r.json()
                err = f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code == 400 and payload["max_tokens"] == 0 and "max_tokens" in r.text:
                    # servers without vLLM's echo-only mode: generate one token, ignore it
                    log.info("openai backend: server refuses max_tokens=0; using 1")
                    self.max_tokens = payload["max_tokens"] = 1
                    continue
                if r.status_code < 500 and r.status_code != 429:
                    break  # a client error will not fix itself
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise LadderError(f"openai backend: {url} failed ({err})")

    def echo_logprobs(self, texts: list[str], batch_size: int = 16) -> list[dict]:
        """For each text: the server's echoed prompt logprobs ({tokens, token_logprobs,
        text_offset}), in order."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        out: list[dict] = []
        with httpx.Client(timeout=self.timeout, headers=headers) as client:
            for start in range(0, len(texts), batch_size):
                chunk = texts[start : start + batch_size]
                payload = {
                    "model": self.name,
                    "prompt": chunk,
                    "max_tokens": self.max_tokens,
                    "echo": True,
                    "logprobs": 1,
                    "temperature": 0.0,
                }
                resp = self._post(client, payload)
                choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
                if len(choices) != len(chunk):
                    raise LadderError(
                        f"openai backend: asked for {len(chunk)} echoes, got {len(choices)} "
                        "(the server must support echo=true with max_tokens=0, as vLLM does)"
                    )
                usage = resp.get("usage") or {}
                self.server_tokens += int(usage.get("prompt_tokens") or 0)
                for c in choices:
                    lp = c.get("logprobs") or {}
                    if not lp.get("token_logprobs") or lp.get("text_offset") is None:
                        raise LadderError(
                            "openai backend: the server returned no prompt logprobs / text_offset "
                            "for echo=true, logprobs=1 (needed to score labels)"
                        )
                    out.append(lp)
        return out

    # ------------------------------------------------------------------ scoring

    def label_loglikelihoods(
        self, prompts: list[str], continuations: list[str], batch_size: int = 16
    ) -> tuple[list[list[float]], dict[str, Any]]:
        """``ll[i][j]`` = log p(continuations[j] | prompts[i]) from echoed logprobs."""
        texts = [p + c for p in prompts for c in continuations]
        echoes = self.echo_logprobs(texts, batch_size)
        ll: list[list[float]] = []
        straddles = 0
        prompt_tokens = []
        k = 0
        for p in prompts:
            row = []
            for j, _ in enumerate(continuations):
                lp = echoes[k]
                k += 1
                cut, end = len(p), len(p) + len(continuations[j])
                offs, lps = lp["text_offset"], lp["token_logprobs"]
                toks = lp.get("tokens") or [""] * len(offs)
                # tokens starting at or after `end` were generated (max_tokens=1), not echoed
                stop = next((t for t, o in enumerate(offs) if o >= end), len(offs))
                offs, lps, toks = offs[:stop], lps[:stop], toks[:stop]
                first = next((t for t, o in enumerate(offs) if o >= cut), len(offs))
                # a token starting before the boundary but reaching past it belongs to both
                if first > 0 and offs[first - 1] + len(toks[first - 1]) > cut:
                    first -= 1
                    straddles += 1
                if first >= len(offs):
                    raise LadderError("openai backend: the echoed tokens do not cover the label")
                if first == 0 or any(v is None for v in lps[first:]):
                    raise LadderError("openai backend: the label has no log-probability (empty prompt?)")
                row.append(float(sum(lps[first:])))
                if j == 0:
                    prompt_tokens.append(first)
            ll.append(row)
        stats = {
            "backend": "openai",
            "endpoint": self.url,
            "served_model": self.name,
            "prompt_tokens_per_example": sum(prompt_tokens) / max(len(prompt_tokens), 1),
            "shared_prefix_tokens": 0,
            "computed_tokens": sum(len(e["text_offset"]) for e in echoes),
            "max_tokens": self.max_tokens,
            "boundary_straddles": straddles,
        }
        return ll, stats


def load(spec: str):
    """(backend model, tokenizer) for an ``openai:`` spec."""
    return OpenAIModel.from_env(spec), load_tokenizer()
