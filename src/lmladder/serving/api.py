"""The OpenAI-compatible HTTP API over an :class:`~lmladder.serving.engine.Engine`.

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions``.
Every error is JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Hostile input stops here, before it reaches a batch: POST bodies must be UTF-8 JSON
(``Content-Type: application/json``, or none; else 415) with no NaN / Infinity, at most
``MAX_DEPTH`` levels deep and no lone surrogates in any string (400); every number a
request sets is checked for type, finiteness and range (400, naming the param).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from lmladder.serving.engine import Busy, Call, Engine, Job, Params, Row

log = logging.getLogger("lmladder.serving.cli")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/predict", "/v1/models", "/health", "/metrics")
CONSTRAINED_MSG = (
    "response_format {kind} is not supported yet: this server has no constrained "
    "(JSON-schema) decoding; it lands with a later lmladder issue. Send response_format "
    '{{"type": "text"}} or leave it out, and validate the JSON yourself.'
)
MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOPS = 16
MAX_DEPTH = 64  # nesting levels of a request body
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate (valid pairs decode to one character)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how one can get into a UTF-8 body


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and ".." not in name


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_response(content, status_code: int = 200, headers=None):
    """A JSON response that cannot fail on a lone surrogate (it is escaped instead)."""
    from starlette.responses import Response

    try:
        body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        body = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def _show(v, n: int = 40) -> str:
    """A short, ASCII rendering of a client's value for an error message."""
    try:
        s = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else json.dumps(v)
    except (TypeError, ValueError):
        s = type(v).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


# ---- body parsing: content type, UTF-8 JSON, no NaN / Infinity, depth, surrogates --------
class _NonFinite:
    """What the parser makes of NaN / Infinity / -Infinity: found (and refused) by check_tree."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def check_content_type(ct: str | None) -> None:
    """POST bodies are JSON: ``application/json`` (a ``charset`` must be UTF-8). A request
    without a Content-Type header is read as JSON too (minimal clients omit it)."""
    if ct is None:
        return
    mt, _, params = ct.partition(";")
    if mt.strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {_show(ct)}", code="unsupported_media_type")
    for prm in params.split(";"):
        k, _, v = prm.partition("=")
        if k.strip().lower() == "charset" and v.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ApiError(415, f"request bodies must be UTF-8 JSON, got charset {_show(v.strip())}",
                           code="unsupported_media_type")


def _sub(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    key = key[:40].encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{path}.{key}" if path else key


def check_tree(body, max_depth: int = MAX_DEPTH) -> None:
    """One iterative walk over a parsed body: nesting depth, lone surrogates in strings
    (keys too), NaN / Infinity. Errors name the path (``messages[0].content``)."""
    stack = [(body, "", 1)]
    while stack:
        obj, path, depth = stack.pop()
        if depth > max_depth:
            raise ApiError(400, f"request JSON is nested more than {max_depth} levels deep", param=path[:200] or None,
                           code="invalid_json")
        for k, v in obj.items() if type(obj) is dict else enumerate(obj):
            if type(k) is str and _SURROGATE.search(k):
                raise ApiError(400, f"a key in '{path or 'the body'}' holds a lone UTF-16 surrogate (e.g. \\ud800): "
                               "strings must be valid Unicode", param=path or None, code="invalid_json")
            t = type(v)
            if t is str:
                if _SURROGATE.search(v):
                    p = _sub(path, k)
                    raise ApiError(400, f"'{p}' holds a lone UTF-16 surrogate (e.g. \\ud800): strings must be valid "
                                   "Unicode", param=p, code="invalid_json")
            elif t is dict or t is list:
                stack.append((v, _sub(path, k), depth + 1))
            elif t is _NonFinite:
                p = _sub(path, k)
                raise ApiError(400, f"'{p}' must be a finite number, got {v.text} (JSON has no NaN or Infinity)",
                               param=p)


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    if text[:1] == "\ufeff":
        text = text[1:]
    try:
        body = json.loads(text, parse_constant=_NonFinite)
    except RecursionError:
        raise ApiError(400, f"request JSON is nested more than {MAX_DEPTH} levels deep", code="invalid_json") from None
    except ValueError as e:  # bad syntax; an integer of more than 4300 digits
        raise ApiError(400, f"request body is not valid JSON ({str(e)[:200]})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    # the walk is needed only when the text could hold what it looks for (C-speed scans)
    if (text.count("[") + text.count("{") > MAX_DEPTH or "NaN" in text or "Infinity" in text
            or _SURROGATE_ESCAPE.search(text)):
        check_tree(body)
    return body


# ---- metrics ----------------------------------------------------------------------
class Metrics:
    """Prometheus text-format counters, a batch-size histogram and a latency summary."""

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status)
        self.counters: collections.Counter = collections.Counter()
        self.batch_counts = [0] * (len(self.BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=2048))
        self.latency_sum: collections.Counter = collections.Counter()
        self.latency_count: collections.Counter = collections.Counter()

    def inc(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def observe_batch(self, n: int) -> None:
        with self._lock:
            i = next((k for k, b in enumerate(self.BATCH_BUCKETS) if n <= b), len(self.BATCH_BUCKETS))
            self.batch_counts[i] += 1
            self.batch_sum += n

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency[endpoint].append(seconds)
            self.latency_sum[endpoint] += seconds
            self.latency_count[endpoint] += 1

    def render(self, extra: dict[str, float] | None = None) -> str:
        out = []
        with self._lock:
            out += ["# HELP lmladder_requests_total HTTP requests by endpoint and status.",
                    "# TYPE lmladder_requests_total counter"]
            for (ep, st), v in sorted(self.requests.items()):
                out.append(f'lmladder_requests_total{{endpoint="{ep}",status="{st}"}} {v}')
            for name, help_ in (
                ("lmladder_generated_tokens_total", "Tokens generated (all rows, all adapters)."),
                ("lmladder_prompt_tokens_total", "Prompt tokens received."),
                ("lmladder_adapter_loads_total", "Adapters loaded into memory."),
                ("lmladder_adapter_evictions_total", "Adapters evicted from the LRU."),
                ("lmladder_mixed_adapter_batches_total",
                 "Prefills and decode runs mixing adapters (PEFT adapter_names)."),
                ("lmladder_decode_steps_total", "Decode steps of the running batch."),
                ("lmladder_decode_rows_total", "Rows in the running batch, summed over decode steps (/ steps: the "
                 "mean running batch)."),
            ):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {self.counters.get(name, 0):g}"]
            out += ["# HELP lmladder_batch_size Rows per batched prefill (rows joining the running batch together).",
                    "# TYPE lmladder_batch_size histogram"]
            cum = 0
            for b, c in zip(self.BATCH_BUCKETS, self.batch_counts):
                cum += c
                out.append(f'lmladder_batch_size_bucket{{le="{b}"}} {cum}')
            cum += self.batch_counts[-1]
            out += [f'lmladder_batch_size_bucket{{le="+Inf"}} {cum}', f"lmladder_batch_size_sum {self.batch_sum}",
                    f"lmladder_batch_size_count {cum}"]
            out += ["# HELP lmladder_request_latency_seconds Request latency (until the last byte; "
                    "quantiles over the last 2048 requests per endpoint).",
                    "# TYPE lmladder_request_latency_seconds summary"]
            for ep in sorted(self.latency):
                xs = sorted(self.latency[ep])
                for q in (0.5, 0.95, 0.99):
                    v = xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
                    out.append(f'lmladder_request_latency_seconds{{endpoint="{ep}",quantile="{q}"}} {v:.6f}')
                out.append(f'lmladder_request_latency_seconds_sum{{endpoint="{ep}"}} {self.latency_sum[ep]:.6f}')
                out.append(f'lmladder_request_latency_seconds_count{{endpoint="{ep}"}} {self.latency_count[ep]}')
        for k, v in (extra or {}).items():
            out += [f"# TYPE {k} gauge", f"{k} {v:g}"]
        return "\n".join(out) + "\n"


# ---- settings / model table ------------------------------------------------------------
@dataclass
class Settings:
    base_name: str  # the base model's public name (its spec, or the folder name)
    adapters: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 1024
    default_chat_max_tokens: int | None = None  # None: max_tokens_limit
    default_completion_max_tokens: int = 16
    created: int = field(default_factory=lambda: int(time.time()))


# ---- ASGI middleware: auth, size limit, metrics, last-resort 500 ---------------------
class Guard:
    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.s, self.m = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import ClientDisconnect

        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        t0 = time.perf_counter()
        state = {"status": 500, "started": False, "done": False}

        def record():
            if not state["done"]:
                state["done"] = True
                self.m.observe_request(endpoint, state["status"], time.perf_counter() - t0)

        async def _send(msg):
            if msg["type"] == "http.response.start":
                state["status"], state["started"] = msg["status"], True
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                record()

        async def reply(status, message, type_="invalid_request_error", code=None, headers=None):
            await json_response(error_body(status, message, type_, None, code), status, headers)(scope, receive, _send)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if self.s.api_key and path != "/health":  # every route, known or not, but /health
                auth = headers.get("authorization", "")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not given or not hmac.compare_digest(given.encode(), self.s.api_key.encode()):
                    return await reply(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            cl = headers.get("content-length")
            if cl is not None:
                try:
                    too_big = int(cl) > self.s.max_body_bytes
                except ValueError:
                    return await reply(400, "invalid Content-Length header")
                if too_big:
                    return await reply(413, f"request body is {cl} bytes; the limit is {self.s.max_body_bytes} "
                                       "(--max-body-bytes)", code="request_too_large")
            await self.app(scope, receive, _send)
        except ClientDisconnect:
            state["status"] = 499
            log.info("client disconnected from %s", path)
        except Exception:
            log.exception("unhandled error on %s", path)
            if not state["started"]:
                await reply(500, "internal server error (see the server log)", "server_error")
        finally:
            record()


# ---- request parsing -------------------------------------------------------------------
def _num(body: dict, key: str, kind, default, lo, hi=None, lo_open=False):
    """A number field: type, finite, integral for ``int``, within [lo, hi] (compared before
    any conversion, so 10**400 is a 400, not an OverflowError). ``hi=None`` only for ints."""
    param = key
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{param}' must be {'an integer' if kind is int else 'a number'}, got {_show(v)}",
                       param=param)
    if isinstance(v, float) and not (math.isfinite(v) and (kind is float or v.is_integer())):
        raise ApiError(400, f"'{param}' must be {'an integer' if kind is int else 'a finite number'}, got {v}",
                       param=param)
    if v < lo or (lo_open and v == lo):
        raise ApiError(400, f"'{param}' must be {'>' if lo_open else '>='} {lo}, got {_show(v)}", param=param)
    if hi is not None and v > hi:
        raise ApiError(400, f"'{param}' must be <= {hi}, got {_show(v)}", param=param)
    return kind(v)


def _bool(body: dict, key: str, default=False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be a boolean", param=key)
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(v) > MAX_STOPS:
        raise ApiError(400, f"'stop' has {len(v)} strings; at most {MAX_STOPS}", param="stop")
    if any(not s or len(s) > 256 for s in v):
        raise ApiError(400, "'stop' strings must be 1..256 characters", param="stop")
    return tuple(v)


MAX_PREDICT_INPUTS = 64


class Api:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics):
        self.e, self.s, self.m = engine, settings, metrics
        self.predictor = None  # serving/predict.Predictor: the run's rung as a task (/v1/predict)
        self.predict_model = None  # that rung's own whole model, when it has one
        self.predict_unavailable: str | None = None  # why /v1/predict is off

    # model names
    def model_ids(self) -> list[str]:
        names = [self.s.base_name] + (["base"] if self.s.base_name != "base" else [])
        return names + [a for a in self.s.adapters if a not in names]

    def resolve_model(self, body: dict) -> str | None:
        name = body.get("model")
        if name is None or name == "":
            raise ApiError(400, "'model' is required (GET /v1/models lists them)", param="model")
        if not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if not valid_name(name):
            raise ApiError(400, f"invalid model name {json.dumps(name[:80])}: names are letters, digits, '.', '_', "
                           "'-' (optionally owner/name); no paths", param="model", code="invalid_model_name")
        if name in (self.s.base_name, "base"):
            return None
        if name in self.s.adapters:
            return name
        raise ApiError(404, f"model '{name}' not found; served models: {', '.join(self.model_ids())}",
                       param="model", code="model_not_found")

    async def read_json(self, request) -> dict:
        check_content_type(request.headers.get("content-type"))
        chunks, size = [], 0
        async for c in request.stream():
            size += len(c)
            if size > self.s.max_body_bytes:
                raise ApiError(413, f"request body over the limit of {self.s.max_body_bytes} bytes (--max-body-bytes)",
                               code="request_too_large")
            chunks.append(c)
        return parse_body(b"".join(chunks))

    def common(self, body: dict, chat: bool) -> tuple[Params, int, bool, dict]:
        rf = body.get("response_format")
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind in ("json_schema", "json_object"):
                raise ApiError(400, CONSTRAINED_MSG.format(kind=kind), param="response_format",
                               code="unsupported_response_format")
            if kind != "text":
                raise ApiError(400, "response_format.type must be 'text' (json_schema / json_object are not "
                               "supported yet)", param="response_format")
        for key in ("tools", "functions", "tool_choice", "function_call", "logit_bias", "suffix"):
            if body.get(key) not in (None, [], {}, "none", ""):
                raise ApiError(400, f"'{key}' is not supported by this server", param=key)
        for key in ("presence_penalty", "frequency_penalty"):
            if _num(body, key, float, 0.0, lo=-2.0, hi=2.0) != 0.0:
                raise ApiError(400, f"'{key}' is not supported by this server (send 0 or leave it out)", param=key)
        if body.get("best_of") not in (None, 1):
            raise ApiError(400, "'best_of' is not supported (use n)", param="best_of")
        limit = self.s.max_tokens_limit
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        default = (self.s.default_chat_max_tokens or limit) if chat else self.s.default_completion_max_tokens
        mt = _num(body, key, int, min(default, limit), lo=1 if chat else 0)
        if mt > limit:
            raise ApiError(400, f"'{key}' is {_show(mt)}; this server allows at most {limit} (--max-tokens-limit)",
                           param=key)
        temperature = _num(body, "temperature", float, 1.0, lo=0.0, hi=2.0)
        top_p = _num(body, "top_p", float, 1.0, lo=0.0, hi=1.0, lo_open=True)
        n = _num(body, "n", int, 1, lo=1, hi=MAX_N)
        seed = body.get("seed")
        if seed is not None:
            seed = _num(body, "seed", int, None, lo=0, hi=2**63 - 1)
        stream = _bool(body, "stream")
        so = body.get("stream_options") or {}
        if not isinstance(so, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        if not isinstance(so.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options.include_usage' must be a boolean",
                           param="stream_options.include_usage")
        p = Params(max_tokens=mt, temperature=temperature, top_p=top_p, stop=_stops(body), seed=seed)
        return p, n, stream, so

    def check_length(self, ids: list[int], max_tokens: int, what: str = "prompt") -> None:
        if not ids:
            raise ApiError(400, f"{what} is empty after tokenization", param="prompt")
        ctx = self.e.context_length
        if ctx and len(ids) + max_tokens > ctx:
            raise ApiError(400, f"{what} has {len(ids)} tokens + max_tokens {max_tokens} > the model's context "
                           f"length {ctx}", param="max_tokens", code="context_length_exceeded")

    # ---- chat -----------------------------------------------------------------------------
    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", param="messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
            role = m.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role {_show(role)} is not supported "
                               "(system, developer, user, assistant)", param=f"messages[{i}].role")
            c = m.get("content")
            if c is None and role == "assistant":
                c = ""
            if isinstance(c, list):
                parts = []
                for part in c:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                       param=f"messages[{i}].content")
                    parts.append(part["text"])
                c = "".join(parts)
            if not isinstance(c, str):
                raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                               param=f"messages[{i}].content")
            out.append({"role": role, "content": c})
        tok = self.e.tok
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                           param="messages")
        try:
            text = tok.apply_chat_template(out, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors: role order etc.
            raise ApiError(400, f"the chat template rejected the messages: {str(e)[:300]}", param="messages") from None
        return tok(text, add_special_tokens=False).input_ids

    async def chat(self, request):
        body = await self.read_json(request)
        adapter = self.resolve_model(body)
        params, n, stream, so = self.common(body, chat=True)
        if _bool(body, "logprobs"):
            params.logprobs = _num(body, "top_logprobs", int, 0, lo=0, hi=MAX_LOGPROBS)
        ids = self.chat_prompt(body)
        self.check_length(ids, params.max_tokens)
        rows = [Row(list(ids), _copy(params)) for _ in range(n)]
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body["model"]
        self.m.inc("lmladder_prompt_tokens_total", len(ids))

        def usage(done_rows):
            ct = sum(len(r.ids) for r in done_rows)
            return {"prompt_tokens": len(ids), "completion_tokens": ct, "total_tokens": len(ids) + ct}

        def lp_content(r: Row):
            if r.params.logprobs is None:
                return None
            ts = self.e.token_str
            return {"content": [
                {"token": ts(t), "logprob": lp, "bytes": list(ts(t).encode()),
                 "top_logprobs": [{"token": ts(a), "logprob": b, "bytes": list(ts(a).encode())} for a, b in top.items()]}
                for t, lp, top in r.gen_logprobs]}

        if not stream:
            done = await self.run(adapter, rows, request)
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                             "logprobs": lp_content(r), "finish_reason": r.finish_reason} for r in done],
                "usage": usage(done),
            }

        def chunk(choices, usage_=None):
            d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
            if so.get("include_usage"):
                d["usage"] = usage_
            return d

        async def events():
            for r in rows:
                yield chunk([{"index": r.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for kind, r, text in self.run_stream(adapter, rows):
                if kind == "delta":
                    yield chunk([{"index": r.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
                else:
                    if text:
                        yield chunk([{"index": r.index, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": None}])
                    yield chunk([{"index": r.index, "delta": {}, "logprobs": lp_content(r),
                                  "finish_reason": r.finish_reason}])
            if so.get("include_usage"):
                yield chunk([], usage(rows))

        return self.sse(events(), request.url.path)

    # ---- completions -------------------------------------------------------------------------
    def completion_prompts(self, body: dict) -> list[tuple[list[int], str]]:
        p = body.get("prompt")
        if p is None:
            raise ApiError(400, "'prompt' is required", param="prompt")
        tok = self.e.tok
        if isinstance(p, str):
            items: list = [p]
        elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            items = list(p)
        elif isinstance(p, list) and p and all(
            isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p
        ):
            items = list(p)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                           "lists of token ids (non-empty)", param="prompt")
        if len(items) > MAX_N * 4:
            raise ApiError(400, f"at most {MAX_N * 4} prompts per request", param="prompt")
        out = []
        for it in items:
            if isinstance(it, str):
                out.append((tok(it).input_ids, it))
            else:
                if any(t < 0 or t >= self.e.vocab_size for t in it):
                    raise ApiError(400, f"token ids must be in [0, {self.e.vocab_size})", param="prompt")
                out.append((list(it), self.e.decode(it)))
        return out

    async def completions(self, request):
        body = await self.read_json(request)
        adapter = self.resolve_model(body)
        params, n, stream, so = self.common(body, chat=False)
        echo = _bool(body, "echo")
        lp = body.get("logprobs")
        if lp is not None:
            lp = _num(body, "logprobs", int, None, lo=0, hi=MAX_LOGPROBS)
            params.logprobs = lp
            if echo:
                params.prompt_logprobs = lp
        if stream and echo:
            raise ApiError(400, "'echo' with 'stream' is not supported", param="echo")
        prompts = self.completion_prompts(body)
        if len(prompts) * n > MAX_N * 4:
            raise ApiError(400, f"too many choices ({len(prompts)} prompts x n={n}); at most {MAX_N * 4}", param="n")
        rows, texts = [], []
        for ids, text in prompts:
            self.check_length(ids, params.max_tokens)
            for _ in range(n):
                rows.append(Row(list(ids), _copy(params)))
                texts.append(text)
        ptoks = sum(len(ids) for ids, _ in prompts)
        self.m.inc("lmladder_prompt_tokens_total", ptoks)
        rid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body["model"]

        def usage(done_rows):
            ct = sum(len(r.ids) for r in done_rows)
            return {"prompt_tokens": ptoks, "completion_tokens": ct, "total_tokens": ptoks + ct}

        if not stream:
            done = await self.run(adapter, rows, request)
            choices = []
            for r in done:
                prefix = texts[r.index] if echo else ""
                choices.append({"index": r.index, "text": prefix + r.text, "finish_reason": r.finish_reason,
                                "logprobs": self.legacy_logprobs(r, echo, prefix) if lp is not None else None})
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, "usage": usage(done)}

        def chunk(choices, usage_=None):
            d = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
            if so.get("include_usage"):
                d["usage"] = usage_
            return d

        async def events():
            async for kind, r, text in self.run_stream(adapter, rows):
                if kind == "delta":
                    yield chunk([{"index": r.index, "text": text, "logprobs": None, "finish_reason": None}])
                else:
                    yield chunk([{"index": r.index, "text": text,
                                  "logprobs": self.legacy_logprobs(r, False, "") if lp is not None else None,
                                  "finish_reason": r.finish_reason}])
            if so.get("include_usage"):
                yield chunk([], usage(rows))

        return self.sse(events(), request.url.path)

    def legacy_logprobs(self, r: Row, echo: bool, prefix: str) -> dict:
        """OpenAI legacy / vLLM ``logprobs``: tokens, token_logprobs (None for the first
        prompt token), top_logprobs, text_offset (character offsets into the returned text)."""
        ts = self.e.token_str
        tokens, tlp, top, offs = [], [], [], []
        if echo and r.prompt_logprobs is not None:
            ids = [t for t, _, _ in r.prompt_logprobs]
            prev = ""
            for i, (t, lp, tp) in enumerate(r.prompt_logprobs):
                tokens.append(ts(t))
                tlp.append(lp)
                top.append(None if tp is None else {ts(a): b for a, b in tp.items()})
                offs.append(len(prev))
                prev = self.e.tok.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        base = len(prefix)
        gen_ids = [t for t, _, _ in r.gen_logprobs]
        prev = ""
        for i, (t, lp, tp) in enumerate(r.gen_logprobs):
            tokens.append(ts(t))
            tlp.append(lp)
            top.append({ts(a): b for a, b in tp.items()})
            offs.append(base + len(prev))
            prev = self.e.decode(gen_ids[: i + 1])
        return {"tokens": tokens, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offs}

    # ---- running jobs --------------------------------------------------------------------------
    def _submit(self, make):
        """Queue the engine work ``make(notify)`` builds; (work, its event queue)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        work = make(lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        try:
            self.e.submit(work)
        except Busy as ex:
            raise ApiError(503, str(ex), "server_error", code="overloaded") from None
        return work, q

    def _job(self, adapter, rows, stream):
        return self._submit(lambda notify: Job(adapter, rows, notify, stream=stream))

    @staticmethod
    async def _next(q, request):
        """The next engine event; 499 when the client went away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(q.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ApiError(499, "client disconnected") from None  # the caller cancels the work

    async def run(self, adapter, rows, request=None) -> list[Row]:
        job, q = self._job(adapter, rows, stream=False)
        left = len(rows)
        try:
            while left:
                ev = await self._next(q, request)
                if ev[0] == "error":
                    raise ApiError(500, f"generation failed: {type(ev[1]).__name__}: {ev[1]}", "server_error")
                if ev[0] == "done":
                    left -= 1
        finally:
            if left:
                job.cancelled = True
        return rows

    # ---- the task API (serving/predict.py) ----------------------------------------------------
    async def predict(self, request):
        """POST /v1/predict: ``{"inputs": [row, ...]}`` (or ``{"input": row}``), rows of the
        task's input fields; the served rung's predictions in order."""
        p = self.predictor
        if p is None:
            raise ApiError(404, self.predict_unavailable or "no rung is served as a task here (serve a run folder)",
                           code="no_task")
        body = await self.read_json(request)
        if "inputs" in body:
            rows = body["inputs"]
            if not isinstance(rows, list) or not rows:
                raise ApiError(400, "'inputs' must be a non-empty list of objects of the task's fields "
                               f"({', '.join(p.describe()['input_fields'])})", param="inputs")
        elif "input" in body:
            rows = [body["input"]]
        else:
            raise ApiError(400, "give 'inputs': a list of objects with the task's fields "
                           f"({', '.join(p.describe()['input_fields'])}), or 'input': one such object", param="inputs")
        if len(rows) > MAX_PREDICT_INPUTS:
            raise ApiError(400, f"at most {MAX_PREDICT_INPUTS} inputs per request, got {len(rows)}", param="inputs")
        extra = sorted(set(body) - {"inputs", "input", "model"})
        if extra:
            raise ApiError(400, f"unknown key '{extra[0]}' (give 'inputs')", param=extra[0])
        from lmladder.errors import LadderError

        try:
            examples = p.examples(rows, self.e.tok)
        except LadderError as ex:
            raise ApiError(400, str(ex), param="inputs") from None
        t0 = time.perf_counter()
        out = await self.call(p.adapter, lambda model: p.predict(model, self.e.tok, examples), request,
                              model=self.predict_model)
        return {"object": "prediction", "rung": p.rung, "task": p.cfg.task.kind, "created": int(time.time()),
                "predictions": out, "seconds": round(time.perf_counter() - t0, 4)}

    async def predict_info(self, request):
        if self.predictor is None:
            raise ApiError(404, self.predict_unavailable or "no rung is served as a task here (serve a run folder)",
                           code="no_task")
        return self.predictor.describe()

    async def call(self, adapter, fn, request=None, model=None):
        """Run ``fn(model)`` on the model worker (engine.Call); its result, or an ApiError."""
        job, q = self._submit(lambda notify: Call(adapter, fn, notify, model=model))
        try:
            ev = await self._next(q, request)
        finally:
            job.cancelled = True
        if ev[0] == "error":
            from lmladder.errors import LadderError

            if isinstance(ev[1], LadderError):
                raise ApiError(400, str(ev[1]), param="inputs")
            raise ApiError(500, f"prediction failed: {type(ev[1]).__name__}: {ev[1]}", "server_error")
        return ev[1]

    async def run_stream(self, adapter, rows):
        job, q = self._job(adapter, rows, stream=True)
        left = len(rows)
        try:
            while left:
                ev = await q.get()
                if ev[0] == "error":
                    raise ApiError(500, f"generation failed: {type(ev[1]).__name__}: {ev[1]}", "server_error")
                r = rows[ev[1]]
                if ev[0] == "delta":
                    yield "delta", r, ev[2]
                else:
                    left -= 1
                    rest = r.text[r.sent:] if len(r.text) > r.sent else ""
                    yield "done", r, rest
        finally:
            if left:
                job.cancelled = True

    def sse(self, gen, path: str = ""):
        from starlette.responses import StreamingResponse

        async def body():
            finished = False
            try:
                try:
                    async for d in gen:
                        yield f"data: {json.dumps(d)}\n\n"
                except ApiError as e:
                    yield f"data: {json.dumps(error_body(e.status, e.message, e.type, e.param, e.code))}\n\n"
                except Exception as e:  # headers are sent: report in-band
                    log.exception("error while streaming")
                    err = error_body(500, f"internal error: {type(e).__name__}", "server_error")
                    yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:  # cancelled: the client went away (or the server is stopping)
                    log.info("client disconnected from a stream on %s; its generation was cancelled", path)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _copy(p: Params) -> Params:
    return Params(**vars(p))


def create_app(engine: Engine, settings: Settings, metrics: Metrics | None = None, predictor=None,
               predict_model=None, predict_unavailable: str | None = None):
    """The FastAPI app; the engine's worker must be started by the caller (or lifespan).
    ``predictor`` (serving/predict.Predictor) serves a run's rung as the task on /v1/predict."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    from starlette.requests import ClientDisconnect
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = metrics or engine.metrics or Metrics()
    engine.metrics = metrics
    api = Api(engine, settings, metrics)
    api.predictor, api.predict_model, api.predict_unavailable = predictor, predict_model, predict_unavailable
    app = FastAPI(title="lmladder serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api

    def err(e: ApiError):
        return json_response(error_body(e.status, e.message, e.type, e.param, e.code), e.status)

    def guarded(fn):
        async def handler(request):
            try:
                out = await fn(request)
            except ApiError as e:
                if e.status == 499:
                    log.info("client disconnected from %s before its answer; its generation was cancelled",
                             request.url.path)
                return err(e)
            except ClientDisconnect:
                log.info("client disconnected from %s while sending the request body", request.url.path)
                return err(ApiError(499, "client disconnected"))
            except Exception as e:
                log.exception("unhandled error on %s", request.url.path)
                return err(ApiError(500, f"internal server error: {type(e).__name__}", "server_error"))
            return out if not isinstance(out, dict) else json_response(out)

        handler.__name__ = fn.__name__
        return handler

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request, exc):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return json_response(error_body(exc.status_code, msg.get(exc.status_code, str(exc.detail))), exc.status_code)

    async def health(request):
        return {"status": "ok" if engine.alive else "worker stopped", "model": settings.base_name,
                "adapters": settings.adapters, "adapters_loaded": list(engine.loaded), "queued": engine.queued()}

    async def metrics_ep(request):
        return PlainTextResponse(metrics.render({"lmladder_queue_depth": engine.queued(),
                                                 "lmladder_adapters_loaded": len(engine.loaded)}),
                                 media_type="text/plain; version=0.0.4")

    def model_obj(mid):
        parent = None if mid in (settings.base_name, "base") else settings.base_name
        return {"id": mid, "object": "model", "created": settings.created, "owned_by": "lmladder",
                "root": settings.base_name, "parent": parent}

    async def models(request):
        return {"object": "list", "data": [model_obj(m) for m in api.model_ids()]}

    async def model_one(request):
        mid = request.path_params["model_id"]
        if mid not in api.model_ids():
            raise ApiError(404, f"model '{mid[:80]}' not found", param="model", code="model_not_found")
        return model_obj(mid)

    app.add_route("/health", guarded(health), methods=["GET"])
    app.add_route("/metrics", guarded(metrics_ep), methods=["GET"])
    app.add_route("/v1/models", guarded(models), methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", guarded(model_one), methods=["GET"])
    app.add_route("/v1/chat/completions", guarded(api.chat), methods=["POST"])
    app.add_route("/v1/completions", guarded(api.completions), methods=["POST"])
    app.add_route("/v1/predict", guarded(api.predict), methods=["POST"])
    app.add_route("/v1/predict", guarded(api.predict_info), methods=["GET"])
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    return app
