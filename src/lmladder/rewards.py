"""Reward functions for the ``grpo`` rung, in TRL's reward signature.

TRL's ``GRPOTrainer`` calls every reward function as
``f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float]`` with one
value per completion, where ``columns`` are the train dataset's extra columns, repeated
for each completion of a prompt. The grpo rung's dataset has these columns (so a reward
function of your own can use them as keyword arguments):

* ``example_index`` (int): the row of the train split the prompt came from;
* ``gold`` (str): the task's gold answer (a JSON text when it is not a string);
* ``answer`` (str): the gold answer as the model should write it (what SFT trains on);
* ``message`` (str): the user message (the prompt before the chat template);
* ``input`` (str): the example's input field.

``grpo.rewards`` names them:

* ``builtin``: the task's own check, the same parse and comparison as its metric, so
  the reward is the per-example metric on the train prompt:
  math -> 1.0 when the answer's number equals the gold (``tasks/math.py``),
  classification / multiple-choice / qa -> 1.0 when the parsed answer is right
  (label match, choice match, normalised exact match),
  extraction -> 1.0 when the output is JSON that matches the task's schema;
* ``reward-model`` (the ``reward-model`` rung of the same run) or
  ``reward-model:<folder>``: the trained reward model's score of (message, completion);
* ``module:function`` or ``path/to/file.py:function``: your own callable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from lmladder.errors import LadderError

# task kind -> the name the built-in reward logs under (rewards/<name>/mean in the curves)
BUILTIN_NAMES = {
    "math": "exact_numeric",
    "classification": "label_match",
    "multiple-choice": "choice_match",
    "qa": "exact_match",
    "extraction": "schema_valid",
}
FIELD = "grpo.rewards"


def gold_text(value: Any) -> str:
    """The ``gold`` column: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # TRL logs each reward as rewards/<__name__>/mean
    return fn


def builtin(task, examples) -> Callable:
    """The task kind's reward over the completions of prompts from ``examples`` (the train
    split, indexed by the ``example_index`` column)."""
    kind = task.kind
    if kind not in BUILTIN_NAMES:
        raise LadderError(f"{FIELD}: no built-in reward for task kind {kind} "
                          f"(built-ins: {', '.join(BUILTIN_NAMES)}); name a module:function or reward-model")
    if kind == "extraction":
        def schema_valid(completions, example_index, **_):
            out = []
            for c, i in zip(completions, example_index):
                pred, _err = task.parse(c, examples[i])
                out.append(float(task.verify({"pred": pred, "raw": c}, examples[i]) or 0.0))
            return out

        return schema_valid

    def correct(completions, example_index, **_):
        out = []
        for c, i in zip(completions, example_index):
            ex = examples[i]
            pred, _err = task.parse(c, ex)  # the direct-answer parse the metric uses
            out.append(float(task.correct(pred, task.gold(ex))))
        return out

    return _named(correct, BUILTIN_NAMES[kind])


def load_callable(spec: str) -> Callable:
    """Import a ``module:function`` / ``file.py:function`` reward (one-line LadderError)."""
    from lmladder.plugins import load_callable as load

    mod_name, sep, fn_name = spec.rpartition(":")
    if not (sep and mod_name and fn_name):
        raise LadderError(f"{FIELD}: '{spec}' is not builtin, reward-model[:folder] or module:function")
    return load(spec, f"{FIELD}: '{spec}'")


def check(names: list[str], kind: str, rungs: list[str]) -> None:
    """Config checks (no model): every name is known, imports, and what it needs is there."""
    if not names:
        raise LadderError(f"{FIELD}: give at least one reward (builtin, reward-model or module:function)")
    if len(set(names)) != len(names):
        raise LadderError(f"{FIELD}: a reward is listed twice ({', '.join(names)})")
    for n in names:
        if n == "builtin":
            if kind not in BUILTIN_NAMES:
                raise LadderError(f"{FIELD}: no built-in reward for task kind {kind} "
                                  f"(built-ins: {', '.join(BUILTIN_NAMES)}); name a module:function or reward-model")
        elif n == "reward-model":
            if "reward-model" not in rungs:
                raise LadderError(f"{FIELD}: 'reward-model' scores with the reward-model rung of this run; "
                                  "add reward-model to rungs, or give reward-model:<folder>")
        elif n.startswith("reward-model:"):
            folder = Path(n.partition(":")[2]).expanduser()
            if not folder.is_dir():
                raise LadderError(f"{FIELD}: '{n}': {folder}: no such folder (a saved reward model)")
        else:
            load_callable(n)


def reward_model(folder: Path, fmt) -> Callable:
    """The reward-model rung's scorer as a TRL reward: score(message, completion)."""
    from lmladder.rungs.reward_model import RewardScorer

    if not Path(folder).is_dir():
        raise LadderError(f"{FIELD}: reward-model: no saved reward model in {folder} (did the reward-model rung fail?)")
    scorer = RewardScorer.from_folder(folder, fmt)

    def reward_model(completions, message, **_):
        return [float(s) for s in scorer(list(message), list(completions))]

    return reward_model


def default_reward_model_folder(run_dir: Path) -> Path:
    from lmladder.rungs import reward_model as rm

    fn = getattr(rm, "default_folder", None) or getattr(rm.RewardScorer, "default_folder")
    return Path(fn(run_dir))


def resolve(names: list[str], task, examples, fmt, run_dir: Path) -> list[Callable]:
    """The reward callables for ``grpo.rewards``, in order."""
    out = []
    for n in names:
        if n == "builtin":
            out.append(builtin(task, examples))
        elif n == "reward-model":
            out.append(reward_model(default_reward_model_folder(run_dir), fmt))
        elif n.startswith("reward-model:"):
            out.append(reward_model(Path(n.partition(":")[2]).expanduser(), fmt))
        else:
            out.append(load_callable(n))
    return out
