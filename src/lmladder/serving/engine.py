"""The model worker: one thread owns the model; requests join a running batch between decode steps.

A request becomes a :class:`Job` of one or more :class:`Row` s (one per prompt x n). The
worker runs one batch continuously (continuous batching):

* **Joining.** Between decode steps, waiting rows join the running batch, first come first
  served, up to ``batch_size`` rows and ``max_adapters`` distinct adapters (base rows do not
  count); a row that does not fit waits, and so do the rows behind it. The rows that join
  together are prefilled as one left-padded batch (:meth:`Engine.generate_group`), take
  their first token from the prefill's logits, and their KV cache is concatenated to the
  running one (the narrower of the two left-padded with masked columns; every row keeps its
  own attention mask and position ids, and rotary positions live in the cached keys, so
  the column a token sits in does not matter). Rows that need prompt log-probs are
  prefilled apart (their prefill keeps every position's logits, ``logits_budget`` per
  prefill) and then decode with the others. An idle worker waits ``batch_wait_ms`` after
  the first request for others to prefill with it.
* **Decoding.** One forward pass per step for all the rows of the batch
  (:meth:`Engine._decode` runs the steps while the batch's rows stay the same): the same
  forward passes ``model.generate`` makes (attention mask, position ids from it), so each
  row can have its own temperature / top_p / stop strings / max_tokens / seed / logprobs
  and stream its text as it is produced. The adapter of each row: ``set_adapter`` /
  ``disable_adapter()`` when the batch holds one (or only the base), else one PEFT
  mixed-adapter batch (``adapter_names=[...]`` per row, ``"__base__"`` for the base).
* **Leaving.** A finished row (end-of-turn, a stop string, ``max_tokens``; a failed or
  cancelled request) is fed pads until it is dropped from the batch and from the cache:
  when new rows join (one copy of the cache for both) or when an eighth of the batch has
  finished (inference/generate.py ``compact_threshold``).
* **Calls** (``/v1/predict``) run between decode steps, with the batch paused.

A model whose cache is not a plain ``DynamicCache`` (sliding-window layers) cannot merge
caches: new rows join only when the batch is empty (rows still leave).

Adapters are PEFT LoRA adapters over the one base model, loaded on demand into a
``PeftModel`` (``load_adapter``, safetensors only), evicted least-recently-used beyond
``max_adapters`` (``delete_adapter``); an adapter the running batch uses is never evicted.

Isolation: one request can never fail another. A row whose logits are not finite, or
whose sampling parameters are unusable, fails its own job and leaves the batch. If a
prefill raises, its jobs join again one job at a time; if a decode step raises, the
batch's jobs are run again one job at a time, alone (the tokens a row already produced
are replayed, so text already streamed stays valid); only a job that fails on its own
gets the error.
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
        # the worker's state: the running batch, rows waiting to join, calls waiting to run
        self._batch = _Batch()
        self._pending: collections.deque[Row] = collections.deque()
        self._calls: collections.deque[Call] = collections.deque()
        self._waiting = 0  # requests with rows waiting to join (taken off the queue)

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
        """Requests waiting: in the queue, or taken off it and waiting to join the batch."""
        return self._queue.qsize() + self._waiting

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
                self._cycle()
            except BaseException as e:  # never let the worker die
                log.exception("serve worker: unexpected error")
                self._fail_all(e)

    def _cycle(self) -> None:
        """Take work, run the calls, let waiting rows join, then decode until the batch's
        rows change (a step or more)."""
        b = self._batch
        if not b.rows and not self._pending and not self._calls:  # idle: wait, then gather
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                return
            self._take(first)
            deadline = time.perf_counter() + self.batch_wait
            while len(self._pending) < self.batch_size:
                left = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                self._take(item)
        else:
            while self._live_rows() + len(self._pending) < self.batch_size:  # room: what is queued now
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._take(item)
        while self._calls:
            self._run_call(self._calls.popleft())
        self._admit()
        self._run_batch()

    def _take(self, item) -> None:
        if isinstance(item, Call):
            self._calls.append(item)
        elif not item.cancelled:
            self._pending.extend(item.rows)
            self._count_waiting()

    def _count_waiting(self) -> None:
        self._waiting = len({id(r.job) for r in self._pending})

    def _fail_all(self, e: BaseException) -> None:
        jobs = {id(r.job): r.job for r in list(self._batch.rows) + list(self._pending)}
        self._batch, self._pending = _Batch(), collections.deque()
        self._count_waiting()
        for j in jobs.values():
            if not j.cancelled:
                self._fail(j, e)

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
        """Run ``jobs`` to the end on the calling thread (the worker's loop without the
        queue: rows join as others leave, ``batch_size`` and ``max_adapters`` hold). For
        tests and tools; never while the worker thread runs."""
        for j in jobs:
            self._take(j)
        while self._pending or self._batch.rows:
            before = (len(self._pending), len(self._batch.rows))
            self._admit()
            self._run_batch()
            if not self._batch.rows and (len(self._pending), len(self._batch.rows)) == before and self._pending:
                raise RuntimeError("serve worker: waiting rows could not join an empty batch")

    # ---- joining ------------------------------------------------------------------
    def _live_rows(self) -> int:
        return sum(not _done(r) for r in self._batch.rows)

    def _admissible(self, r: "Row", live: int, adapters: set) -> bool:
        b = self._batch
        if live >= self.batch_size or (b.rows and not b.mergeable):
            return False
        a = r.job.adapter
        return a is None or a in adapters or len(adapters) < self.max_adapters

    def _batch_adapters(self) -> set:
        return {r.job.adapter for r in self._batch.rows if not _done(r) and r.job.adapter is not None}

    def _can_join(self) -> bool:
        """Whether the next cycle would let rows join: the first waiting row fits, or there
        is room for what waits in the queue (a call counts: it runs between steps)."""
        b = self._batch
        if b.private:
            return False
        if self._calls:
            return True
        live = self._live_rows()
        head = next((r for r in self._pending if not (r.job.failed or r.job.cancelled)), None)
        if head is not None:
            return self._admissible(head, live, self._batch_adapters())
        return live < self.batch_size and self._queue.qsize() > 0

    def _admit(self) -> None:
        """The waiting rows that fit join the batch, first come first served: one prefill
        for them (rows that need prompt log-probs: apart, in chunks within
        ``logits_budget``)."""
        live, adapters, rows = self._live_rows(), self._batch_adapters(), []
        while self._pending:
            r = self._pending[0]
            if r.job.failed or r.job.cancelled:
                self._pending.popleft()
                continue
            if not self._admissible(r, live + len(rows), adapters):
                break
            rows.append(self._pending.popleft())
            if r.job.adapter is not None:
                adapters.add(r.job.adapter)
        self._count_waiting()
        if not rows:
            return
        plain = [r for r in rows if r.params.prompt_logprobs is None]
        if plain:
            self._join(plain)
        full = [r for r in rows if r.params.prompt_logprobs is not None]
        if full:
            # a prefill that keeps every position's logits holds B x L x vocab fp32: cap it
            L = max(len(r.prompt_ids) for r in full)
            per = max(1, self.logits_budget // max(1, L * self.vocab_size * 4))
            for k in range(0, len(full), per):
                self._join(full[k : k + per])

    def _join(self, rows: list[Row]) -> None:
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
            log.warning("serve worker: a batched prefill of %d requests failed (%s: %s); joining them again one "
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

    # ---- the running batch ----------------------------------------------------------
    def _run_batch(self) -> None:
        """Decode the running batch until its rows change, then drop its finished rows
        when enough have finished. A decode step that raises: the batch's jobs run again
        one job at a time, alone."""
        import torch

        from lmladder.inference.generate import compact_threshold

        b = self._batch
        if not b.rows:
            return
        try:
            model, ctx, extra = self._model_for(b.rows)
            with torch.inference_mode(), ctx:
                self._decode(model, b.rows, extra)
        except Exception as e:
            self._batch = _Batch(private=b.private)
            self._isolate(b.rows, e)
            return
        dead = len(b.rows) - self._live_rows()
        if dead and (dead == len(b.rows) or dead >= compact_threshold(len(b.rows))):
            self._compact()

    def _compact(self) -> None:
        """Drop the finished rows from the batch and its cache (and the leading columns no
        row left needs)."""
        import torch

        from lmladder.inference.generate import select_rows

        b = self._batch
        keep = [i for i, r in enumerate(b.rows) if not _done(r)]
        if len(keep) == len(b.rows):
            return
        if not keep:
            self._batch = _Batch(private=b.private)
            return
        k = torch.tensor(keep, device=self.device)
        b.cache, b.attn = select_rows(b.cache, b.attn, k)
        b.pos, b.feed = b.pos.index_select(0, k), b.feed.index_select(0, k)
        b.rows = [b.rows[i] for i in keep]

    def _isolate(self, rows: list[Row], e: BaseException) -> None:
        jobs = [j for j in {id(r.job): r.job for r in rows}.values() if not j.failed and not j.cancelled]
        if len(jobs) <= 1:
            log.exception("serve worker: generation failed")
            for j in jobs:
                self._fail(j, e)
            return
        log.warning("serve worker: a batched decode of %d requests failed (%s: %s); running them again one "
                    "request at a time", len(jobs), type(e).__name__, str(e)[:200])
        for j in jobs:  # only a job that fails on its own gets the error
            left = [r for r in rows if r.job is j and r.finish_reason is None]
            if left and not j.failed and not j.cancelled:
                self._run_alone(j, left)

    def _run_alone(self, job: Job, rows: list[Row]) -> None:
        """Run ``rows`` (one job's) in a batch of their own to the end, replaying the
        tokens they had produced; the running batch, if any, waits."""
        saved, self._batch = self._batch, _Batch(private=True)
        try:
            for r in rows:
                r.restart()
            self.generate_group(rows)
            while self._batch.rows and not job.failed:
                b = self._batch
                model, ctx, extra = self._model_for(b.rows)
                import torch

                with torch.inference_mode(), ctx:
                    self._decode(model, b.rows, extra)
                self._compact()
        except Exception as e:
            log.exception("serve worker: generation failed")
            self._fail(job, e)
        finally:
            self._batch = saved

    # ---- adapters ----------------------------------------------------------------
    def _ensure_adapter(self, name: str, protect=()) -> None:
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
        busy = self._batch_adapters() | set(protect) | {name}  # never evict what the batch decodes with
        while len(self.loaded) > self.max_adapters:
            old = next((a for a in self.loaded if a not in busy), None)
            if old is None:  # all in use (a call beside a full batch): one more until one is free
                break
            del self.loaded[old]
            self.peft.delete_adapter(self._internal[old])
            log.info("adapter %s evicted (--max-adapters %d)", old, self.max_adapters)
            if self.metrics:
                self.metrics.inc("lmladder_adapter_evictions_total")
        self.peft.set_adapter(iname)
        log.info("adapter %s loaded in %.2fs", name, time.perf_counter() - t0)
        if self.metrics:
            self.metrics.inc("lmladder_adapter_loads_total")

    def _model_for(self, rows: list[Row]):
        """(model, context manager, extra forward kwargs) for a batch of rows: the adapters
        of its live rows (a finished row still in the batch runs on whatever is cheapest)."""
        live = [r for r in rows if not _done(r)] or rows
        names = list(dict.fromkeys(r.job.adapter for r in live))
        if names == [None]:
            if self.peft is None:
                return self.base_model, contextlib.nullcontext(), {}
            return self.peft, self.peft.disable_adapter(), {}
        for a in names:
            if a is not None:
                self._ensure_adapter(a, protect=[x for x in names if x is not None])
        if len(names) == 1:
            self.peft.set_adapter(self._internal[names[0]])
            return self.peft, contextlib.nullcontext(), {}
        per_row = [self._internal[r.job.adapter] if r.job.adapter and not _done(r) else "__base__" for r in rows]
        if self.metrics:
            self.metrics.inc("lmladder_mixed_adapter_batches_total")
        return self.peft, contextlib.nullcontext(), {"adapter_names": per_row}

    # ---- decoding ----------------------------------------------------------------
    def generate_group(self, rows: list[Row]) -> None:
        """Rows join the running batch: one batched prefill, their first token, their KV
        cache concatenated to the batch's (:meth:`_merge`)."""
        import torch

        rows = [r for r in rows if not r.job.failed and not r.job.cancelled]
        if not rows:
            return
        model, ctx, extra = self._model_for(rows)
        if self.metrics:
            self.metrics.observe_batch(len(rows))
        with torch.inference_mode(), ctx:
            self._prefill(model, rows, extra)

    def _prefill(self, model, rows: list[Row], extra: dict) -> None:
        import torch

        from lmladder.inference.generate import positions

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
        pos = positions(attn)
        full = any(r.params.prompt_logprobs is not None for r in rows)
        for r in rows:
            if r.params.seed is not None and r.params.temperature > 0:
                r.generator = torch.Generator(device=dev).manual_seed(int(r.params.seed) + r.index)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                    use_cache=any(r.params.max_tokens > 0 for r in rows), logits_to_keep=0 if full else 1, **extra)
        if full:
            self._prompt_logprobs(out.logits, rows, L)
        for r in rows:
            if r.params.max_tokens == 0 and not r.job.failed:
                self._finish(r, "length")
        logits = out.logits[:, -1, :]
        cache = out.past_key_values
        del out
        feed = self._pick(logits, rows)
        keep = [i for i, r in enumerate(rows) if not _done(r)]
        if keep:
            self._merge([rows[i] for i in keep], keep, cache, attn, pos[:, -1] + 1, feed)

    def _merge(self, rows: list[Row], keep: list[int], cache, attn, pos, feed) -> None:
        """Put prefilled ``rows`` (``keep``: their indices in the prefill) into the running
        batch; its finished rows leave at the same time (one copy of the cache for both)."""
        import torch

        from lmladder.inference.generate import cache_plain, concat, select_rows

        k = torch.tensor(keep, device=self.device)
        if len(keep) < attn.shape[0]:
            cache, attn = select_rows(cache, attn, k)
            pos, feed = pos.index_select(0, k), feed.index_select(0, k)
        self._compact()
        b = self._batch
        if not b.rows:
            b.rows, b.cache, b.attn, b.pos, b.feed = list(rows), cache, attn, pos, feed
            b.mergeable = cache_plain(cache)
            return
        if not (b.mergeable and cache_plain(cache)):  # cannot merge: wait for the batch to end
            for r in reversed(rows):
                r.restart()
                self._pending.appendleft(r)
            self._count_waiting()
            return
        b.cache, b.attn = concat(b.cache, b.attn, cache, attn)
        b.pos, b.feed = torch.cat([b.pos, pos]), torch.cat([b.feed, feed])
        b.rows = b.rows + list(rows)

    def _decode(self, model, rows: list[Row], extra: dict) -> None:
        """Decode steps of the running batch (``rows``: its rows; row ``i`` of every forward
        pass here is ``rows[i]``) until its rows change: every row finished, an eighth of
        them finished (they are dropped), or waiting work can join / a call waits."""
        import torch

        from lmladder.inference.generate import compact_threshold

        b = self._batch
        B = len(rows)
        dev = self.device
        while True:
            attn = torch.cat([b.attn, torch.ones((B, 1), dtype=b.attn.dtype, device=dev)], dim=1)
            out = model(input_ids=b.feed[:, None], attention_mask=attn, position_ids=b.pos[:, None],
                        past_key_values=b.cache, use_cache=True, **extra)
            b.attn, b.pos = attn, b.pos + 1
            logits = out.logits[:, -1, :]
            del out
            b.feed = self._pick(logits, rows)
            if self.metrics:
                self.metrics.inc("lmladder_decode_steps_total")
                self.metrics.inc("lmladder_decode_rows_total", B)
            dead = B - self._live_rows()
            if dead == B or dead >= compact_threshold(B) or self._can_join():
                return

    def _pick(self, logits, rows: list[Row]):
        """Each live row takes its next token from ``logits`` (checks, sampling, replay,
        log-probs, stop conditions, streaming); returns the tokens to feed (pads for the
        finished rows)."""
        import torch

        B = len(rows)
        active = [not _done(r) for r in rows]
        bad = ~torch.isfinite(logits.amax(dim=-1))  # a NaN or +inf anywhere, or all -inf
        if bool(bad.any()):
            for i in bad.nonzero()[:, 0].tolist():
                if active[i]:
                    self._fail(rows[i].job, RowFailed("the model produced non-finite logits for this request"))
                    active[i] = False
        nxt = self._choose(logits, rows, active)
        for i, r in enumerate(rows):
            if active[i] and len(r.ids) < len(r.forced):  # a retried row replays its tokens
                nxt[i] = r.forced[len(r.ids)]
        want_lp = [active[i] and rows[i].params.logprobs is not None for i in range(B)]
        lps = torch.log_softmax(logits.float(), dim=-1) if any(want_lp) else None
        n_new = 0
        for i, (r, t) in enumerate(zip(rows, nxt.tolist())):
            if not active[i] or r.job.cancelled or r.job.failed:
                active[i] = False
                continue
            n_new += 1
            active[i] = self._advance(r, t, lps[i] if want_lp[i] else None)
        if self.metrics and n_new:
            self.metrics.inc("lmladder_generated_tokens_total", n_new)
        feed = nxt.clone()
        if not all(active):
            feed[~torch.tensor(active, device=feed.device)] = self.pad_id
        return feed

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


class _Batch:
    """The running batch: its rows, their KV cache, attention mask (rows x columns), and
    per row the next position id and the next token to feed. ``private``: a retry that
    runs one request alone (nothing joins it)."""

    def __init__(self, private: bool = False):
        self.rows: list[Row] = []
        self.cache = None
        self.attn = self.pos = self.feed = None
        self.mergeable = True  # a plain DynamicCache: new rows can join while others run
        self.private = private


def _done(r: Row) -> bool:
    """The row is finished (or its request failed or was cancelled): it is fed pads until
    it leaves the batch."""
    return r.finish_reason is not None or r.job.failed or r.job.cancelled


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
