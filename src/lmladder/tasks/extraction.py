"""Structured extraction: the answer is JSON matching a schema.

The schema comes from ``task.schema``: a JSON Schema file, an inline mapping, or a list of
field names (an object with those fields). Without one, for entity data (a BIO tag list
aligned with a token list, or lists of ``{"text", "type"}`` objects) the default is an
array of ``{"text": string, "type": one of the types seen in train}`` objects.

Golds: BIO tags (aligned with a token-list input) become entity lists (``B-movie I-movie`` over ``Knight and Day`` ->
``{"text": "Knight and Day", "type": "movie"}``); a list / object label or a JSON string
is used as is. Scoring is micro precision / recall / F1 over items (an entity, or a
field's value; strings compared case-insensitively with whitespace collapsed) plus the
shares of outputs that are valid JSON and that match the schema.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lmladder import metrics
from lmladder.errors import LadderError, where
from lmladder.tasks.base import Grammar, Task

_TAG_RE = re.compile(r"^(?:O|[BI]-.+)$")
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def check_schema(schema: Any, origin: str) -> dict:
    """The schema if it is valid JSON Schema, else a LadderError naming ``origin``."""
    from jsonschema import exceptions, validators

    if not isinstance(schema, dict):
        raise LadderError(f"{origin}: a JSON Schema must be a mapping, got {type(schema).__name__}")
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        at = "/".join(str(p) for p in e.path) or "top level"
        raise LadderError(f"{origin}: not a valid JSON Schema: {e.message} (at {at})") from None
    return schema


def load_schema(spec) -> dict | None:
    """task.schema -> a checked JSON Schema dict (None when not given)."""
    if spec is None:
        return None
    if isinstance(spec, list):
        if not spec or any(not isinstance(f, str) or not f.strip() for f in spec):
            raise LadderError("task.schema: a list of field names must hold non-empty names")
        value = {"type": ["string", "number", "boolean", "null"]}
        return {"type": "object", "properties": {f: value for f in spec}, "required": list(spec)}
    if isinstance(spec, dict):
        return check_schema(spec, "task.schema")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LadderError(f"{path}: schema file not found (task.schema)")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LadderError(f"{path}: the schema file is not valid JSON ({e}) (task.schema)") from None
    return check_schema(schema, f"{path} (task.schema)")


def entity_schema(types: list[str] | None) -> dict:
    typ: dict = {"type": "string"}
    if types:
        typ["enum"] = list(types)
    return {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "type": typ},
            "required": ["text", "type"],
            "additionalProperties": False,
        },
    }


def bounded_schema(schema: Any, golds: list) -> Any:
    """A copy of ``schema`` for the grammar with its open ends bounded by the train golds:
    an array without ``maxItems`` gets the longest such array in the golds, a free string
    without ``maxLength`` the longest such string (enums, patterns, formats are bounded
    already). Outputs valid under it are valid under ``schema``; a small model can then not
    run a list or a string past its token budget."""
    import copy

    def walk(node, values):
        if not isinstance(node, dict):
            return node
        out = dict(node)
        types = node.get("type")
        types = types if isinstance(types, list) else [types]
        if "array" in types:
            arrays = [v for v in values if isinstance(v, list)]
            if arrays and "maxItems" not in node:
                out["maxItems"] = max(1, max(len(v) for v in arrays))
            if isinstance(node.get("items"), dict):
                out["items"] = walk(node["items"], [x for v in arrays for x in v])
        if "object" in types or "properties" in node:
            objs = [v for v in values if isinstance(v, dict)]
            out["properties"] = {k: walk(s, [o[k] for o in objs if k in o])
                                 for k, s in (node.get("properties") or {}).items()}
        if "string" in types and not ({"maxLength", "enum", "const", "pattern", "format"} & node.keys()):
            strs = [v for v in values if isinstance(v, str)]
            if strs:
                out["maxLength"] = max(1, max(len(v) for v in strs))
        return out

    return walk(copy.deepcopy(schema), list(golds))


def bio_to_entities(tokens: list[str], tags: list[str]) -> list[dict]:
    """BIO tags over tokens -> [{"text", "type"}] in order (spans read as conlleval does:
    an I- tag that does not continue an entity of its type starts one)."""
    from lmladder.tasks.tagging import spans

    return [{"text": " ".join(tokens[a : b + 1]), "type": typ} for typ, a, b in spans(tags)]


def _is_tags(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, str) and _TAG_RE.match(t) for t in v)


def gold_value(example) -> Any:
    """The gold as JSON: BIO tags -> entity list; a list / object as is; JSON text parsed.
    Raises ValueError with the reason."""
    t = example.target
    if _is_tags(t):
        toks = next((v for v in example.fields.values()
                     if isinstance(v, list) and len(v) == len(t) and " ".join(map(str, v)) == example.input), None)
        if toks is None:
            raise ValueError("BIO tags, but no token list of the same length in the row's input")
        return bio_to_entities([str(x) for x in toks], t)
    if isinstance(t, (list, dict)):
        return t
    try:
        return json.loads(t)
    except ValueError:
        raise ValueError("the label is neither JSON, a list of objects nor BIO tags") from None


def parse_json(text: str) -> tuple[Any, str | None]:
    """The first JSON value in a text (inside a ``` fence when there is one)."""
    t = text.strip()
    m = _FENCE_RE.search(t)
    if m:
        t = m.group(1).strip()
    if not t:
        return None, "invalid JSON: empty output"
    try:
        return json.loads(t), None
    except ValueError as e:
        err = e
    starts = [i for i in (t.find("["), t.find("{")) if i >= 0]
    if starts:
        try:
            return json.JSONDecoder().raw_decode(t[min(starts):])[0], None
        except ValueError as e:
            err = e
    return None, f"invalid JSON: {err}"


def _norm(v) -> Any:
    if isinstance(v, str):
        return " ".join(v.split()).lower()
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def items(value) -> Counter:
    """What precision / recall count: a list's elements, an object's (field, value) pairs
    (a list-valued field counts each element), a scalar itself; normalised."""
    key = lambda x: json.dumps(_norm(x), sort_keys=True, ensure_ascii=False)  # noqa: E731
    if value is None:
        return Counter()
    if isinstance(value, list):
        return Counter(key(x) for x in value)
    if isinstance(value, dict):
        out: Counter = Counter()
        for k, v in value.items():
            for x in (v if isinstance(v, list) else [v]):
                out[key([k, x])] += 1
        return out
    return Counter([key(value)])


class ExtractionTask(Task):
    kind = "extraction"
    summary = 'JSON against a schema (valid JSON, schema-valid, entity P/R/F1)'
    metric_names = ("f1", "precision", "recall", "valid_json", "schema_valid")

    def __init__(self, cfg, labels, eval_cfg, seed):
        super().__init__(cfg, labels, eval_cfg, seed)
        self.user_schema = load_schema(cfg.schema_)
        self.entities = self.user_schema is None  # default: entity lists
        self.types: list[str] = []
        self.schema = self.user_schema or entity_schema(None)
        self.grammar_schema = self.schema  # the schema bounded by the train golds (setup)
        self._validator()

    def _validator(self):
        from jsonschema import validators

        self.validator = validators.validator_for(self.schema)(self.schema)

    def setup(self, dataset) -> None:
        vals = []  # the train golds
        for e in dataset.train + dataset.test:
            try:
                g = gold_value(e)
            except ValueError as err:
                path, line = e.source.rsplit(":", 1)
                raise LadderError(f"{where(path, line)}: the gold label: {err}") from None
            if self.user_schema is not None and not self.validator.is_valid(g):
                path, line = e.source.rsplit(":", 1)
                msg = next(iter(self.validator.iter_errors(g))).message
                raise LadderError(f"{where(path, line)}: the gold label does not match task.schema ({msg})")
            vals.append(g)
        vals = vals[: len(dataset.train)]
        if self.user_schema is None:
            self.entities = all(isinstance(v, list) and all(isinstance(x, dict) and set(x) <= {"text", "type"}
                                                            for x in v) for v in vals)
            if self.entities:
                self.types = sorted({x["type"] for v in vals for x in v if "type" in x})
                self.schema = entity_schema(self.types)
            elif all(isinstance(v, dict) for v in vals):
                keys = sorted({k for v in vals for k in v})
                self.schema = {"type": "object", "properties": {k: {} for k in keys}}
            else:
                self.schema = {}
            self._validator()
        self.grammar_schema = bounded_schema(self.schema, vals)

    # ------------------------------------------------------------------ prompts / targets
    def default_instruction(self) -> str:
        if self.entities:
            return "List the named entities in the text."
        return "Extract the requested information from the text."

    def hints(self) -> list[str]:
        if self.entities:
            types = f" with type one of: {', '.join(self.types)}" if self.types else ""
            return [f'Answer with a JSON list of the entities, each {{"text": ..., "type": ...}}{types}; '
                    "answer [] when there are none."]
        return ["Answer with JSON only, matching this JSON Schema: "
                + json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))]

    def gold(self, example):
        return gold_value(example)

    def answer(self, example) -> str:
        return json.dumps(self.gold(example), ensure_ascii=False)

    # ------------------------------------------------------------------ outputs
    def parse(self, text, example=None):
        return parse_json(text)

    def extract(self, text, example=None):
        v, err = super().extract(text, example)  # after 'Answer:'
        return (v, err) if err is None else parse_json(text)

    def vote_key(self, pred):
        return json.dumps(sorted(items(pred).elements()), ensure_ascii=False)

    def grammar(self, example=None):
        return Grammar("json_schema", self.grammar_schema)

    def verify(self, candidate, example):
        """1 when the candidate is valid JSON matching the schema, else 0."""
        p = candidate.get("pred")
        return float(p is not None and self.validator.is_valid(p))

    # ------------------------------------------------------------------ scoring
    def correct(self, pred, gold) -> bool:
        return pred is not None and items(pred) == items(gold)

    @staticmethod
    def _counts(golds, preds):
        tp, n_pred, n_gold = [], [], []
        for p, g in zip(preds, golds):
            ip, ig = items(p), items(g)
            tp.append(sum((ip & ig).values()))
            n_pred.append(sum(ip.values()))
            n_gold.append(sum(ig.values()))
        return tp, n_pred, n_gold

    def example_values(self, golds, preds):
        return {
            "valid_json": [float(p is not None) for p in preds],
            "schema_valid": [float(p is not None and self.validator.is_valid(p)) for p in preds],
        }

    def paired_data(self, golds, preds, metric):
        if metric in ("f1", "precision", "recall"):  # micro scores: resample the per-example counts
            return {"kind": "micro", "which": metric, "counts": [list(c) for c in zip(*self._counts(golds, preds))]}
        return super().paired_data(golds, preds, metric)

    def score(self, golds, preds):
        tp, n_pred, n_gold = self._counts(golds, preds)
        out = metrics.micro_prf(tp, n_pred, n_gold, n_boot=self.eval_cfg.bootstrap, seed=self.seed)
        out.update(self.mean_metrics(self.example_values(golds, preds)))
        return {k: out[k] for k in self.metric_names}
