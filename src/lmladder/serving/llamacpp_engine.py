"""``lmladder serve --engine llamacpp``: llama.cpp (through llama-cpp-python's C bindings)
as the model worker behind the same OpenAI-compatible API (serving/api.py).

The API hands every engine the same work: :class:`~lmladder.serving.engine.Job` s of
:class:`~lmladder.serving.engine.Row` s (prompt token ids from the transformers tokenizer,
sampling :class:`~lmladder.serving.engine.Params`) and reads back the rows' ids, text,
finish reasons and log-probs (the interface: serving/engines.py). This engine feeds the
same token ids to llama.cpp, so prompts, chat templates and token counts are exactly the
built-in engine's; only the forward passes differ.

How it decodes: one worker thread owns the llama.cpp model(s) and context(s). A context
holds ``slots`` sequences over one unified KV cache of ``ctx_size`` tokens; a row is
admitted when a sequence is free and its prompt + max_tokens fit in the KV cells not yet
reserved (so a decode never runs out of cache), and leaves as soon as it finishes:
continuous batching. Each step makes one ``llama_decode`` per (context, adapter) group:
one new token for every decoding row plus prompt tokens of newly admitted rows (prefill
in chunks of ``n_batch`` tokens). Sampling is done here on the step's logits (greedy =
argmax; temperature, top_p, a seed per row), as are stop strings, EOS, max_tokens,
log-probs (log-softmax of the logits) and streaming, with the built-in engine's rules.

Adapters: a PEFT LoRA that llama.cpp can apply is converted once to a GGUF LoRA
(export/gguf_lora.py) and applied at run time over the one base (``llama_set_adapters_lora``
per decode group); other adapters (DoRA, modules_to_save, ...) are merged into a full GGUF
of their own, loaded in a context of their own (serving/llamacpp_files.py prepares both).

Supported: chat and completions, streaming, n, stop strings, max_tokens, temperature,
top_p, seed, logprobs / top_logprobs, ``echo`` + ``logprobs`` prompt scoring (logits of
every prompt position), mixed adapters in one server. Not here: ``/v1/predict`` (it runs a
rung's steps on the transformers model: serve with the built-in engine for it).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lmladder.errors import LadderError
from lmladder.serving.engine import (LOGPROB_FLOOR, SAMPLING_EPS, Busy, Call, Job, Row, RowFailed, _find_stop,
                                     _safe_prefix)

log = logging.getLogger("lmladder.serving.cli")

INSTALL_HINT = "pip install 'lmladder[llamacpp]'"


def import_llama_cpp():
    """The llama_cpp module, or a one-line LadderError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LadderError(f"--engine llamacpp needs llama-cpp-python ({INSTALL_HINT}); import failed: {e}") from None
    logging.getLogger("llama-cpp-python").setLevel(
        logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)  # llama.cpp's load chatter
    return llama_cpp


@dataclass
class AdapterSpec:
    """How one served adapter reaches llama.cpp: a GGUF LoRA over the base, or a merged model."""

    kind: str  # "lora" | "merged"
    path: str  # the .gguf file
    why: str | None = None  # merged: why it could not be a GGUF LoRA


class Lane:
    """One llama.cpp model with one context (``slots`` sequences, unified KV cache of
    ``ctx_size`` cells) and a batch of ``n_batch`` tokens; used by the worker thread only."""

    def __init__(self, L, path: str, *, slots: int, ctx_size: int | None, n_batch: int, threads: int,
                 kv_type: str = "f16"):
        self.L, self.path = L, path
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise LadderError(f"{path}: llama.cpp could not load this GGUF (see the log with --log-level debug)")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.model))
        n_ctx = int(ctx_size or min(self.n_ctx_train, 8192))
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = slots
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if kv_type == "f32":  # llama.cpp keeps K and V in f16 by default (half the memory, logits differ ~1e-3)
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise LadderError(f"{path}: llama.cpp could not create a context (--ctx-size {n_ctx}, {slots} slots)")
        self.n_ctx = int(L.llama_n_ctx(self.ctx))
        self.mem = L.llama_get_memory(self.ctx)
        # llama.cpp clamps n_batch to n_ctx (a batch of more tokens aborts the process)
        self.n_batch = min(n_batch, int(L.llama_n_batch(self.ctx)))
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.free_ids = list(range(slots))
        self.reserved = 0  # KV cells promised to admitted rows
        self.loras: dict[str, Any] = {}  # adapter name -> llama_adapter_lora handle
        self.current: str | None = None  # the adapter set on the context
        self.active: list[_Seq] = []

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = self.L.llama_model_meta_val_str(self.model, key.encode(), buf, 512)
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def load_lora(self, name: str, path: str) -> None:
        h = self.L.llama_adapter_lora_init(self.model, path.encode())
        if not h:
            raise LadderError(f"adapter '{name}': llama.cpp refused the GGUF LoRA {path} "
                              "(see the log with --log-level debug)")
        self.loras[name] = h

    def set_adapter(self, name: str | None) -> None:
        if name == self.current:
            return
        L = self.L
        if name is None:
            L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            arr = (L.llama_adapter_lora_p_ctypes * 1)(self.loras[name])
            scales = (ctypes.c_float * 1)(1.0)
            if L.llama_set_adapters_lora(self.ctx, arr, 1, scales):
                raise RuntimeError(f"llama.cpp could not set adapter '{name}'")
        self.current = name

    def token_text(self, tid: int, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, tid, buf, 256, 0, special)
        return buf.raw[: max(n, 0)]

    def is_eog(self, tid: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, tid))

    def drop(self, seq: "_Seq") -> None:
        self.L.llama_memory_seq_rm(self.mem, seq.sid, -1, -1)
        self.free_ids.append(seq.sid)
        self.reserved -= seq.need
        if seq in self.active:
            self.active.remove(seq)

    def close(self) -> None:
        L = self.L
        for h in self.loras.values():
            L.llama_adapter_lora_free(h)
        self.loras = {}
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None


@dataclass
class _Seq:
    row: Row
    lane: Lane
    adapter: str | None  # the GGUF LoRA to set (None: none)
    sid: int
    need: int  # KV cells reserved: prompt + max_tokens
    fed: int = 0  # prompt tokens decoded so far
    pending: int | None = None  # the last sampled token, not yet decoded
    rng: Any = None
    plp: list = field(default_factory=list)  # prompt log-probs so far

    @property
    def prefill(self) -> bool:
        return self.fed < len(self.row.prompt_ids)


class LlamaCppEngine:
    """The model worker for llama.cpp; the same interface as serving/engine.Engine (see
    serving/engines.py): submit, start, stop, alive, queued, loaded, decode, token_str, tok,
    eos_ids, vocab_size, context_length, metrics."""

    kind = "llamacpp"

    def __init__(self, base_gguf: str, tokenizer, adapters: dict[str, AdapterSpec] | None = None, *,
                 slots: int = 16, ctx_size: int | None = None, n_batch: int = 512, threads: int | None = None,
                 kv_type: str = "f16", batch_wait_ms: float = 5.0, max_queue: int = 256, metrics=None, eos_ids=None):
        from lmladder.prompts import eos_token_ids

        L = import_llama_cpp()
        L.llama_backend_init()
        self.L = L
        self.tok = tokenizer
        self.slots = max(1, int(slots))
        n_batch = max(int(n_batch), self.slots)
        self.threads = int(threads or default_threads())
        kw = dict(slots=self.slots, ctx_size=ctx_size, n_batch=n_batch, threads=self.threads, kv_type=kv_type)
        self.base = Lane(L, base_gguf, **kw)
        self.lanes = [self.base]
        self.route: dict[str | None, tuple[Lane, str | None]] = {None: (self.base, None)}
        self.adapter_specs = dict(adapters or {})
        try:
            for name, a in self.adapter_specs.items():
                if a.kind == "lora":
                    self.base.load_lora(name, a.path)
                    self.route[name] = (self.base, name)
                else:
                    lane = Lane(L, a.path, **kw)
                    self.lanes.append(lane)
                    self.route[name] = (lane, None)
        except BaseException:
            self.close()
            raise
        self.loaded = list(self.adapter_specs)  # all adapters are loaded at startup
        self.vocab_size = self.base.n_vocab
        self.context_length = min(self.base.n_ctx, self.base.n_ctx_train or self.base.n_ctx)
        self.eos_ids = set(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer)
        eos = int(L.llama_vocab_eos(self.base.vocab))
        if eos >= 0:
            self.eos_ids.add(eos)
        self.check_vocab()
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue()
        self._waiting: collections.deque[Row] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._turn = 0

    # ---- checks -------------------------------------------------------------------
    def check_vocab(self) -> None:
        """The GGUF's vocabulary must be the transformers tokenizer's: the API tokenizes with
        the latter and llama.cpp reads the ids. Checked on a chat-template probe."""
        if len(self.tok) > self.vocab_size:
            raise LadderError(f"{self.base.path}: {self.vocab_size} tokens in the GGUF, {len(self.tok)} in the "
                              "tokenizer: not the same model")
        text = "Hello, world! 123 éà 日本"
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        ids = self.tok(text, add_special_tokens=False).input_ids
        got = b"".join(self.base.token_text(t) for t in ids).decode("utf-8", "replace")
        want = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if got != want:
            raise LadderError(f"{self.base.path}: the GGUF's tokens differ from the tokenizer's "
                              f"({got[:60]!r} vs {want[:60]!r}); serve the GGUF exported from this model")

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> "LlamaCppEngine":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lmladder-llamacpp-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        self.stop()
        for lane in getattr(self, "lanes", []):
            lane.close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def submit(self, job) -> None:
        if self.queued() >= self.max_queue:
            raise Busy(f"server busy: {self.queued()} requests waiting (--max-queue {self.max_queue})")
        self._queue.put(job)

    # ---- text helpers (the API renders tokens with these) --------------------------------
    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_str(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---- worker ----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                idle = not any(lane.active for lane in self.lanes)
                self._take(block=idle and not self._waiting)
                self._admit()
                if any(lane.active for lane in self.lanes):
                    self._step()
            except BaseException as e:  # never let the worker die
                log.exception("llama.cpp worker: unexpected error")
                for lane in self.lanes:
                    for s in list(lane.active):
                        self._fail(s.row.job, e)
                        lane.drop(s)
        for lane in self.lanes:  # stopping: free what is left
            for s in list(lane.active):
                lane.drop(s)

    def _take(self, block: bool) -> None:
        """Move queued jobs to the waiting rows; when idle, wait for the first one and then
        up to batch_wait for more (so a burst starts together)."""
        try:
            first = self._queue.get(timeout=0.1) if block else self._queue.get_nowait()
        except queue.Empty:
            return
        self._enqueue(first)
        deadline = time.perf_counter() + (self.batch_wait if block else 0.0)
        while True:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return
            self._enqueue(job)

    def _enqueue(self, job) -> None:
        if isinstance(job, Call):
            job.emit(("error", LadderError("this server runs llama.cpp: /v1/predict needs --engine builtin")))
            return
        if not job.cancelled:
            self._waiting.extend(job.rows)

    def _admit(self) -> None:
        """Waiting rows into free sequences, in order, while their KV cells fit."""
        while self._waiting:
            row = self._waiting[0]
            job = row.job
            if job.cancelled or job.failed:
                self._waiting.popleft()
                continue
            lane, adapter = self.route[job.adapter]
            need = len(row.prompt_ids) + row.params.max_tokens
            if not lane.free_ids or lane.reserved + need > lane.n_ctx:
                if not lane.active and need > lane.n_ctx:  # can never fit (the API checks lengths)
                    self._waiting.popleft()
                    self._fail(job, RowFailed(f"prompt + max_tokens = {need} tokens > the KV cache ({lane.n_ctx})"))
                    continue
                return
            self._waiting.popleft()
            if row.params.max_tokens == 0 and row.params.prompt_logprobs is None:
                self._finish(row, "length")
                continue
            seq = _Seq(row, lane, adapter, lane.free_ids.pop(), need)
            lane.reserved += need
            p = row.params
            if p.temperature >= SAMPLING_EPS:
                import numpy as np

                seq.rng = np.random.default_rng(None if p.seed is None else int(p.seed) + row.index)
            if p.prompt_logprobs is not None:
                seq.plp = [(row.prompt_ids[0], None, None)]
            lane.active.append(seq)

    def _step(self) -> None:
        """One llama_decode per (lane, adapter) group with active rows: each decoding row's
        last token, then prompt chunks of rows in prefill, within n_batch tokens."""
        groups: dict[tuple[int, str | None], list[_Seq]] = collections.defaultdict(list)
        for i, lane in enumerate(self.lanes):
            for s in list(lane.active):
                if s.row.job.cancelled or s.row.job.failed:
                    lane.drop(s)
            for s in lane.active:
                groups[(i, s.adapter)].append(s)
        keys = list(groups)
        if not keys:
            return
        self._turn = (self._turn + 1) % len(keys)
        for k in keys[self._turn:] + keys[: self._turn]:
            self._decode(self.lanes[k[0]], k[1], groups[k])

    def _decode(self, lane: Lane, adapter: str | None, seqs: list[_Seq]) -> None:
        import numpy as np

        L, b = self.L, lane.batch
        budget = lane.n_batch
        plan: list[tuple[_Seq, int, int, bool]] = []  # (seq, first batch index, n tokens, ends prompt or decodes)
        n = 0
        for s in sorted(seqs, key=lambda s: s.prefill):  # decoding rows first: one token each
            if budget - n <= 0:
                break
            row = s.row
            if s.prefill:
                toks = row.prompt_ids[s.fed : s.fed + (budget - n)]
                pos0, last = s.fed, s.fed + len(toks) == len(row.prompt_ids)
                all_logits = row.params.prompt_logprobs is not None
            else:
                toks = [s.pending]
                pos0, last, all_logits = len(row.prompt_ids) + len(row.ids) - 1, True, False
            for j, t in enumerate(toks):
                b.token[n + j] = t
                b.pos[n + j] = pos0 + j
                b.n_seq_id[n + j] = 1
                b.seq_id[n + j][0] = s.sid
                b.logits[n + j] = all_logits or (last and j == len(toks) - 1)
            plan.append((s, n, len(toks), last))
            n += len(toks)
        b.n_tokens = n
        lane.set_adapter(adapter)
        rc = L.llama_decode(lane.ctx, b)
        if rc != 0:
            err = RuntimeError(f"llama_decode returned {rc}")
            log.error("llama.cpp worker: %s for %d rows", err, len(plan))
            for s, *_ in plan:
                self._fail(s.row.job, err)
                lane.drop(s)
            return
        if self.metrics:
            self.metrics.observe_batch(len(plan))
        n_new = 0
        for s, i0, cnt, last in plan:
            row = s.row
            if s.prefill:
                if row.params.prompt_logprobs is not None:
                    k = row.params.prompt_logprobs
                    upto = cnt if not last else cnt - 1  # the last prompt position predicts the first new token
                    ok = True
                    for j in range(upto):
                        lp = self._logprobs(lane, i0 + j)
                        if lp is None:
                            ok = False
                            break
                        t = row.prompt_ids[s.fed + j + 1]
                        s.plp.append((t, max(float(lp[t]), LOGPROB_FLOOR), self._top(lp, k) if k else {}))
                    if not ok:
                        self._fail(row.job, RowFailed("the model produced non-finite logits for this prompt"))
                        lane.drop(s)
                        continue
                s.fed += cnt
                if not last:
                    continue
                if row.params.prompt_logprobs is not None:
                    row.prompt_logprobs = s.plp
                if row.params.max_tokens == 0:
                    self._finish(row, "length")
                    lane.drop(s)
                    continue
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(lane.ctx, i0 + cnt - 1), shape=(lane.n_vocab,))
            if not np.isfinite(logits.max()):
                self._fail(row.job, RowFailed("the model produced non-finite logits for this request"))
                lane.drop(s)
                continue
            try:
                t = self._choose(logits, s)
            except RowFailed as e:
                self._fail(row.job, e)
                lane.drop(s)
                continue
            lps = None
            if row.params.logprobs is not None:
                lps = _log_softmax(logits)
            n_new += 1
            if self._advance(row, t, lps):
                s.pending = t
            else:
                lane.drop(s)
        if self.metrics and n_new:
            self.metrics.inc("lmladder_generated_tokens_total", n_new)

    def _logprobs(self, lane: Lane, i: int):
        import numpy as np

        lg = np.ctypeslib.as_array(self.L.llama_get_logits_ith(lane.ctx, i), shape=(lane.n_vocab,))
        if np.isnan(lg).any():
            return None
        return _log_softmax(lg)

    @staticmethod
    def _top(lp, k: int) -> dict[int, float]:
        import numpy as np

        ix = np.argpartition(-lp, k - 1)[:k] if k < lp.shape[0] else np.arange(lp.shape[0])
        ix = ix[np.argsort(-lp[ix], kind="stable")]
        return {int(i): max(float(lp[i]), LOGPROB_FLOOR) for i in ix}

    def _choose(self, logits, s: _Seq) -> int:
        import numpy as np

        p = s.row.params
        if p.temperature < SAMPLING_EPS:
            return int(np.argmax(logits))
        if not (math.isfinite(p.temperature) and math.isfinite(p.top_p) and 0 < p.top_p <= 1):
            raise RowFailed(f"unusable sampling parameters (temperature {p.temperature}, top_p {p.top_p})")
        lg = logits.astype(np.float64) / p.temperature
        lg -= lg.max()
        probs = np.exp(lg)
        probs /= probs.sum()
        if p.top_p < 1.0:  # keep the smallest set with mass >= top_p
            order = np.argsort(-probs, kind="stable")
            sp = probs[order]
            drop = np.cumsum(sp) - sp > p.top_p
            probs = np.zeros_like(probs)
            probs[order[~drop]] = sp[~drop]
            probs /= probs.sum()
        return int(s.rng.choice(probs.shape[0], p=probs))

    def _advance(self, r: Row, t: int, lps) -> bool:
        """As serving/engine.Engine._advance: EOS, stop strings, max_tokens, streaming."""
        r.ids.append(t)
        if lps is not None:
            k = r.params.logprobs
            r.gen_logprobs.append((t, max(float(lps[t]), LOGPROB_FLOOR), self._top(lps, k) if k else {}))
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

    def _finish(self, r: Row, reason: str) -> None:
        r.finish_reason = reason
        if not r.text and r.ids and reason != "stop":
            r.text = self.decode([x for x in r.ids if x not in self.eos_ids])
        r.job.emit(("done", r.index, r))

    @staticmethod
    def _fail(job: Job, e: BaseException) -> None:
        if not job.failed:
            job.failed = True
            job.emit(("error", e))


def default_threads() -> int:
    """CPU threads for llama.cpp: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _log_softmax(logits):
    import numpy as np

    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))
