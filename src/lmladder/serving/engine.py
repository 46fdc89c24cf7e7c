"""The model worker: one thread owns the model; requests queue; batches per adapter.

A request becomes a :class:`Job` of one or more :class:`Row` s (one per prompt x n).
The worker takes the first waiting job, then keeps taking jobs for up to
``batch_wait_ms`` or until ``batch_size`` rows are waiting; it sorts the rows by
adapter (apart: rows that need prompt log-probs) and runs one left-padded batched
decode per chunk of at most ``batch_size`` rows and ``max_adapters`` adapters. A chunk
with one adapter (or only the base) runs through ``set_adapter`` /
``disable_adapter()``; a chunk mixing adapters runs as one PEFT mixed-adapter batch
(``adapter_names=[...]`` per row, ``"__base__"`` for the base).

Decoding is a plain KV-cache loop (the same forward passes ``model.generate`` makes for
greedy search: left padding, attention mask, position ids from the mask), so each row
can have its own temperature / top_p / stop strings / max_tokens and stream its text
as it is produced. Finished rows stay in the batch (their tokens are ignored) until
the whole group is done.

Adapters are PEFT LoRA adapters over the one base model, loaded on demand into a
``PeftModel`` (``load_adapter``, safetensors only), evicted least-recently-used beyond
``max_adapters`` (``delete_adapter``).

Isolation: one request can never fail another. A row whose logits are not finite, or
whose sampling parameters are unusable, fails its own job and leaves the batch. If a
batched decode raises, its jobs are run again one job at a time (the tokens a row already
produced are replayed, so text already streamed stays valid); only a job that fails on
its own gets the error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("lmladder.serving.cli")


class Busy(Exception):
    """The queue is full."""


class RowFailed(Exception):
    """One row could not be decoded (non-finite logits, unusable sampling parameters):
    its job fails, the rest of the batch goes on."""


SAMPLING_EPS = 1e-5  # a temperature below this is greedy (as in vLLM): logits / 1e-300 overflow
LOGPROB_FLOOR = -9999.0  # -inf log-probs are reported as this (as vLLM does): JSON has no -Infinity


@dataclass
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top-N for generated tokens (0: chosen token only); None: off
    prompt_logprobs: int | None = None  # top-N for prompt tokens (echo + logprobs); None: off


@dataclass
class Row:
    prompt_ids: list[int]
    params: Params
    index: int = 0
    job: "Job | None" = None
    # results
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None
    # per generated token: (id, logprob, {id: logprob} top)
    gen_logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    # per prompt token: (id, logprob | None, top | None)
    prompt_logprobs: list[tuple[int, float | None, dict[int, float] | None]] | None = None
    generator: Any = None
    forced: list[int] = field(default_factory=list)  # tokens to replay first (a retried row)

    def restart(self) -> None:
        """Reset the results for a retry; the tokens produced so far are replayed first, so
        the retried row continues the text a client may already have been streamed."""
        self.forced = list(self.ids)
        self.ids, self.text, self.gen_logprobs, self.prompt_logprobs, self.generator = [], "", [], None, None


class Job:
    """One request: rows, the adapter (None = base), and a thread-safe ``notify``.

    Events passed to ``notify``: ("delta", row_index, text) for streaming jobs,
    ("done", row_index, row), ("error", exception).
    """

    def __init__(self, adapter: str | None, rows: list[Row], notify: Callable[[tuple], None], stream: bool = False):
        self.adapter, self.rows, self.notify, self.stream = adapter, rows, notify, stream
        for i, r in enumerate(rows):
            r.index, r.job = i, self
        self.cancelled = False
        self.failed = False
        self.created = time.perf_counter()

    def emit(self, event: tuple) -> None:
        if self.cancelled or (self.failed and event[0] != "error"):
            return
        try:
            self.notify(event)
        except RuntimeError:  # the request's event loop is gone (client left, server stopping)
            self.cancelled = True


class Call:
    """Work that needs the model itself, not a token loop (``/v1/predict``: a rung's task
    prediction): the worker runs ``fn(model)`` between decode batches, with ``adapter``
    active (None: the base) or on ``model`` when one is given, and emits ("done", result)
    or ("error", exception). It never shares a batch, so it cannot fail anyone else's."""

    rows: tuple = ()

    def __init__(self, adapter: str | None, fn: Callable[[Any], Any], notify: Callable[[tuple], None], model=None):
        self.adapter, self.fn, self.notify, self.model = adapter, fn, notify, model
        self.cancelled = False

    def emit(self, event: tuple) -> None:
        if self.cancelled:
            return
        try:
            self.notify(event)
        except RuntimeError:
            self.cancelled = True


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        adapters: dict[str, str] | None = None,
        max_adapters: int = 4,
        batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_queue: int = 256,
        metrics=None,
    ):
        from lmladder.prompts import eos_token_ids

        self.base_model = model
        self.peft = None
        self.tok = tokenizer
        self.adapter_paths = dict(adapters or {})
        self.loaded: collections.OrderedDict[str, str] = collections.OrderedDict()
        # PEFT-internal adapter names: public names like "lora" collide with PEFT's
        # "lora_" parameter prefix (PEFT warns it may re-initialise the weights).
        self._internal = {name: f"ad{i}" for i, name in enumerate(self.adapter_paths)}
        self.max_adapters = max(1, int(max_adapters))
        self.batch_size = max(1, int(batch_size))
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.metrics = metrics
        self.eos_ids = eos_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids) if self.eos_ids else 0
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        self.logits_budget = 512 << 20  # bytes of prefill logits per chunk when prompt log-probs are asked
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmladder-serve-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"server busy: {self._queue.qsize()} requests waiting (--max-queue {self.max_queue})")
        self._queue.put(job)

    # ---- text helpers ------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_str(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---- worker ----------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(first, Call):
                self._run_call(first)
                continue
            jobs, calls = [first], []
            n_rows = len(first.rows)
            deadline = time.perf_counter() + self.batch_wait
            while n_rows < self.batch_size:
                left = deadline - time.perf_counter()
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(job, Call):  # after this batch, on its own
                    calls.append(job)
                    continue
                jobs.append(job)
                n_rows += len(job.rows)
            try:
                self.run_jobs(jobs)
            except BaseException as e:  # never let the worker die
                log.exception("serve worker: unexpected error")
                for j in jobs:
                    j.emit(("error", e))
            for c in calls:
                self._run_call(c)

    def _run_call(self, call: Call) -> None:
        import torch

        if call.cancelled:
            return
        try:
            if call.model is not None:
                model, ctx = call.model, contextlib.nullcontext()
            elif call.adapter is None:
                model, ctx = ((self.base_model, contextlib.nullcontext()) if self.peft is None
                              else (self.peft, self.peft.disable_adapter()))
            else:
                self._ensure_adapter(call.adapter)
                self.peft.set_adapter(self._internal[call.adapter])
                model, ctx = self.peft, contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                out = call.fn(model)
        except Exception as e:  # noqa: BLE001 - the request's own failure
            log.warning("serve worker: a /v1/predict call failed (%s: %s)", type(e).__name__, str(e)[:200],
                        exc_info=log.isEnabledFor(logging.DEBUG))
            call.emit(("error", e))
            return
        call.emit(("done", out))

    def run_jobs(self, jobs: list[Job]) -> None:
        """Rows that need prompt log-probs run apart (their prefill keeps every position's
        logits). Rows are sorted by adapter and cut into chunks of at most ``batch_size``
        rows and ``max_adapters`` distinct adapters; a chunk with several adapters runs as
        one PEFT mixed-adapter batch (``adapter_names=``), one with a single adapter (or
        only the base) through ``set_adapter`` / ``disable_adapter``."""
        groups: dict[bool, list[Row]] = collections.defaultdict(list)
        for j in jobs:
            if not j.cancelled:
                for r in j.rows:
                    groups[r.params.prompt_logprobs is not None].append(r)
        for rows in groups.values():
            rows.sort(key=lambda r: r.job.adapter or "")
            chunk: list[Row] = []
            names: set[str] = set()
            for r in rows + [None]:
                a = r.job.adapter if r is not None else None
                if chunk and (r is None or len(chunk) >= self.batch_size
                              or (a is not None and a not in names and len(names) >= self.max_adapters)):
                    self._run_chunk(chunk)
                    chunk, names = [], set()
                if r is not None:
                    chunk.append(r)
                    if a is not None:
                        names.add(a)

    def _run_chunk(self, rows: list[Row]) -> None:
        rows = [r for r in rows if not r.job.failed and not r.job.cancelled]
        if not rows:
            return
        if any(r.params.prompt_logprobs is not None for r in rows):
            # the prefill keeps B x L x vocab fp32 logits: cap that at ~512 MiB per chunk
            L = max(len(r.prompt_ids) for r in rows)
            per = max(1, self.logits_budget // max(1, L * self.vocab_size * 4))
            if per < len(rows):
                for k in range(0, len(rows), per):
                    self._run_chunk_now(rows[k : k + per])
                return
        self._run_chunk_now(rows)

    def _run_chunk_now(self, rows: list[Row]) -> None:
        try:
            self.generate_group(rows)
            return
        except Exception as e:
            jobs = [j for j in {id(r.job): r.job for r in rows}.values() if not j.failed and not j.cancelled]
            if len(jobs) <= 1:
                log.exception("serve worker: generation failed")
                for j in jobs:
                    self._fail(j, e)
                return
            log.warning("serve worker: a batched decode of %d requests failed (%s: %s); running them again one "
                        "request at a time", len(jobs), type(e).__name__, str(e)[:200])
        for j in jobs:  # isolate: only a job that fails on its own gets the error
            left = [r for r in rows if r.job is j and r.finish_reason is None]
            if not left or j.failed or j.cancelled:
                continue
            for r in left:
                r.restart()
            try:
                self.generate_group(left)
            except Exception as e:
                log.exception("serve worker: generation failed")
                self._fail(j, e)

    @staticmethod
    def _fail(job: Job, e: BaseException) -> None:
        if not job.failed:
            job.failed = True
            job.emit(("error", e))

    # ---- adapters ----------------------------------------------------------------
    def _ensure_adapter(self, name: str) -> None:
        iname = self._internal[name]
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self.peft.set_adapter(iname)
            return
        from peft import PeftModel

        path = self.adapter_paths[name]
        if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):  # never fall back to pickle
            log.error("adapter %s: %s/adapter_model.safetensors is missing", name, path)
            raise RuntimeError(f"adapter '{name}': its adapter_model.safetensors is missing (see the server log)")
        t0 = time.perf_counter()
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base_model, path, adapter_name=iname, is_trainable=False)
        else:
            self.peft.load_adapter(path, adapter_name=iname, is_trainable=False)
        self.peft.set_adapter(iname)
        self.peft.eval()
        self.loaded[name] = path
        while len(self.loaded) > self.max_adapters:
            old, _ = self.loaded.popitem(last=False)
            self.peft.delete_adapter(self._internal[old])
            log.info("adapter %s evicted (--max-adapters %d)", old, self.max_adapters)
            if self.metrics:
                self.metrics.inc("lmladder_adapter_evictions_total")
        self.peft.set_adapter(iname)
        log.info("adapter %s loaded in %.2fs", name, time.perf_counter() - t0)
        if self.metrics:
            self.metrics.inc("lmladder_adapter_loads_total")

    def _model_for(self, rows: list[Row]):
        """(model, context manager, extra forward kwargs) for a chunk of rows."""
        names = list(dict.fromkeys(r.job.adapter for r in rows))
        if names == [None]:
            if self.peft is None:
                return self.base_model, contextlib.nullcontext(), {}
            return self.peft, self.peft.disable_adapter(), {}
        for a in names:
            if a is not None:
                self._ensure_adapter(a)
        if len(names) == 1:
            self.peft.set_adapter(self._internal[names[0]])
            return self.peft, contextlib.nullcontext(), {}
        per_row = [self._internal[r.job.adapter] if r.job.adapter else "__base__" for r in rows]
        if self.metrics:
            self.metrics.inc("lmladder_mixed_adapter_batches_total")
        return self.peft, contextlib.nullcontext(), {"adapter_names": per_row}

    # ---- decoding ----------------------------------------------------------------
    def generate_group(self, rows: list[Row]) -> None:
        import torch

        model, ctx, extra = self._model_for(rows)
        if self.metrics:
            self.metrics.observe_batch(len(rows))
        with torch.inference_mode(), ctx:
            self._decode(model, rows, extra)

    def _decode(self, model, rows: list[Row], extra: dict) -> None:
        import torch

        dev = self.device
        B = len(rows)
        L = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.prompt_ids)
            ids[i, L - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attn[i, L - n :] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        full = any(r.params.prompt_logprobs is not None for r in rows)
        max_new = max(r.params.max_tokens for r in rows)
        for r in rows:
            if r.params.seed is not None and r.params.temperature > 0:
                r.generator = torch.Generator(device=dev).manual_seed(int(r.params.seed) + r.index)

        out = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=max_new > 0,
            logits_to_keep=0 if full else 1, **extra,
        )
        if full:
            self._prompt_logprobs(out.logits, rows, L)
        active = [True] * B
        for i, r in enumerate(rows):
            if r.params.max_tokens == 0:
                self._finish(r, "length")
                active[i] = False
            elif r.job.failed:
                active[i] = False
        if not any(active):
            return
        logits = out.logits[:, -1, :]
        past = out.past_key_values
        del out
        replay = any(r.forced for r in rows)
        for _step in range(max_new):
            bad = ~torch.isfinite(logits.amax(dim=-1))  # a NaN or +inf anywhere, or all -inf
            if bool(bad.any()):
                for i in bad.nonzero()[:, 0].tolist():
                    if active[i]:
                        self._fail(rows[i].job, RowFailed("the model produced non-finite logits for this request"))
                        active[i] = False
            nxt = self._choose(logits, rows, active)
            if replay:
                for i, r in enumerate(rows):
                    if active[i] and len(r.ids) < len(r.forced):
                        nxt[i] = r.forced[len(r.ids)]
            want_lp = [active[i] and rows[i].params.logprobs is not None for i in range(B)]
            lps = torch.log_softmax(logits.float(), dim=-1) if any(want_lp) else None
            nxt_list = nxt.tolist()
            n_new = 0
            for i, r in enumerate(rows):
                if not active[i]:
                    continue
                if r.job.cancelled or r.job.failed:
                    active[i] = False
                    continue
                n_new += 1
                active[i] = self._advance(r, nxt_list[i], lps[i] if want_lp[i] else None)
            if self.metrics and n_new:
                self.metrics.inc("lmladder_generated_tokens_total", n_new)
            if not any(active):
                break
            feed = nxt.clone()
            feed[~torch.tensor(active, device=dev)] = self.pad_id
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(
                input_ids=feed[:, None], attention_mask=attn, position_ids=pos,
                past_key_values=past, use_cache=True, **extra,
            )
            logits = out.logits[:, -1, :]
            past = out.past_key_values
        for i, r in enumerate(rows):  # safety net: a row not finished by the loop
            if active[i]:
                self._finish(r, "length")

    def _advance(self, r: Row, t: int, lps) -> bool:
        """Row ``r`` takes token ``t`` (``lps``: this step's log-probs when the row asked for
        them): stop at an end token, a stop string or max_tokens (the row is finished), else
        stream what is safe to stream. False when the row is done."""
        r.ids.append(t)
        if lps is not None:
            k = r.params.logprobs
            top = {}
            if k:
                v, ix = lps.topk(k)
                top = dict(zip(ix.tolist(), v.clamp(min=LOGPROB_FLOOR).tolist()))
            r.gen_logprobs.append((t, max(float(lps[t]), LOGPROB_FLOOR), top))
        if t in self.eos_ids:
            self._finish(r, "stop")
            return False
        text = self.decode([x for x in r.ids if x not in self.eos_ids])
        cut = _find_stop(text, r.params.stop)
        if cut is not None:
            r.text = text[:cut]
            self._finish(r, "stop")
            return False
        r.text = text
        if len(r.ids) >= r.params.max_tokens:
            self._finish(r, "length")
            return False
        if r.job.stream:
            safe = _safe_prefix(text, r.params.stop)
            if len(safe) > r.sent:
                r.job.emit(("delta", r.index, safe[r.sent :]))
                r.sent = len(safe)
        return True

    def _choose(self, logits, rows: list[Row], active: list[bool]):
        import torch

        nxt = logits.argmax(dim=-1)
        for i, r in enumerate(rows):
            p = r.params
            if not active[i] or p.temperature < SAMPLING_EPS:  # NaN is not < eps: refused below
                continue
            if not (math.isfinite(p.temperature) and math.isfinite(p.top_p) and 0 < p.top_p <= 1):
                self._fail(r.job, RowFailed(f"unusable sampling parameters (temperature {p.temperature}, "
                                            f"top_p {p.top_p})"))
                active[i] = False
                continue
            lg = logits[i].float() / p.temperature
            if p.top_p < 1.0:
                srt, idx = torch.sort(lg, descending=True)
                probs = torch.softmax(srt, dim=-1)
                drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set with mass >= top_p
                srt[drop] = float("-inf")
                lg = torch.full_like(lg, float("-inf")).scatter(0, idx, srt)
            probs = torch.softmax(lg, dim=-1)
            try:
                nxt[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
            except RuntimeError as e:  # invalid probabilities: this row only
                self._fail(r.job, RowFailed(f"sampling failed: {e}"))
                active[i] = False
        return nxt

    def _prompt_logprobs(self, logits, rows: list[Row], L: int) -> None:
        import torch

        for i, r in enumerate(rows):
            k = r.params.prompt_logprobs
            if k is None:
                continue
            n = len(r.prompt_ids)
            res: list = [(r.prompt_ids[0], None, None)]
            if n > 1:
                lp = torch.log_softmax(logits[i, L - n : L - 1].float(), dim=-1)
                if bool(lp.isnan().any()):
                    self._fail(r.job, RowFailed("the model produced non-finite logits for this prompt"))
                    continue
                lp = lp.clamp(min=LOGPROB_FLOOR)
                tgt = torch.tensor(r.prompt_ids[1:], device=lp.device)
                chosen = lp.gather(1, tgt[:, None])[:, 0].tolist()
                tops = [{}] * (n - 1)
                if k:
                    v, ix = lp.topk(k, dim=-1)
                    tops = [dict(zip(a, b)) for a, b in zip(ix.tolist(), v.tolist())]
                res += [(t, c, tp) for t, c, tp in zip(r.prompt_ids[1:], chosen, tops)]
            r.prompt_logprobs = res

    def _finish(self, r: Row, reason: str) -> None:
        r.finish_reason = reason
        if not r.text and r.ids and reason != "stop":
            r.text = self.decode([x for x in r.ids if x not in self.eos_ids])
        r.job.emit(("done", r.index, r))


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    best = None
    for s in stops:
        j = text.find(s)
        if j >= 0 and (best is None or j < best):
            best = j
    return best


def _safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of ``text`` that can be streamed now: not an incomplete UTF-8 character
    (decoded as U+FFFD at the end) and not the start of a stop string."""
    safe = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(safe)), hold, -1):
            if safe.endswith(s[:k]):
                hold = k
                break
    return safe[: len(safe) - hold] if hold else safe
