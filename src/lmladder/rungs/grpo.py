"""grpo: reinforcement learning from verifiable rewards (GRPO), on the train prompts.

For each train prompt the policy samples a group of ``num_generations`` completions;
every completion gets the sum of the configured rewards (``grpo.rewards``: the task's
built-in check, a reward model, or Python callables, see ``lmladder/rewards.py``);
a completion's advantage is its reward minus its group's mean, divided by the group's
std; the policy gradient raises the log-probability of the completions that beat their
group (optionally with a KL penalty ``beta`` to the starting model). The gold answers
are never trained on directly: only the reward sees them.

What TRL does: ``trl.GRPOTrainer`` samples the groups, calls the rewards, computes the
advantages and the clipped policy loss; with LoRA the reference (``beta > 0``) is the
model with the adapter disabled, so no second copy is held.

What we add (besides the shared engine guarantees of ``training/trl_train.py``: atomic
checkpoints scoped by fingerprint, resume, the same optimizer arguments, every logged
value as a curve for the report):

* **the exact prompt**: each prompt is the task's user message rendered through the chat
  template (``ChatFormat.prompt``, the text every inference rung sends) and tokenised by
  us (``ChatFormat.encode``: no second BOS on top of the template's); TRL's own text
  path would tokenise with ``add_special_tokens=True``. A prompt longer than
  ``max_length - max_completion_length`` is cut from the left (``truncation: truncate``,
  counted) or stops the run (``truncation: error``).
* **completions end at the template's end of turn**: the stop ids are the tokenizer's
  EOS, the model's generation EOS ids and the template's end-of-turn token (e.g.
  ``<|im_end|>`` for a base model whose EOS is ``<|endoftext|>``); TRL stops and masks
  at the ids the model declares, so we declare these for the run and restore them after.
* **the rewards' inputs**: the dataset carries ``example_index``, ``gold``, ``answer``,
  ``message`` and ``input`` columns; TRL hands them to every reward as keyword arguments.
* ``method: full`` with ``beta > 0``: the reference is a frozen copy of the start model
  (TRL would reload the base from its hub name, which is not the ``from:`` model).
* the shared base is handed back clean: TRL patches its ``forward`` (fused LM head) and
  its pad / EOS ids; ``train_weights`` and ``close`` undo both.

Predictions afterwards are the task's usual ones with the trained policy (greedy
generation, or label scoring for classification), so the metric is comparable with every
other rung's. ``from: <rung>`` starts from (and, with ``beta > 0``, anchors to) that
rung's model. The reward curve (mean reward per step) is in the report.
"""

from __future__ import annotations

import copy
import gc
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from lmladder.errors import LadderError
from lmladder.options import AlignConfig
from lmladder.run import distributed
from lmladder.rungs.base import Rung
from lmladder.rungs.lora import peft_config
from lmladder.training import forgetting, steps, weights


class GrpoConfig(AlignConfig):
    """grpo: RL from verifiable rewards (TRL GRPOTrainer)."""

    rewards: list[str] = Field(
        default_factory=lambda: ["builtin"],
        description="Reward functions: 'builtin' (the task's: numeric answer for math, schema validity "
        "for extraction, label match for classification), 'reward-model' (the reward-model rung's, or "
        "reward-model:<folder>), or 'module:function' callables.",
    )
    reward_weights: list[float] | None = Field(
        None, description="Weight of each reward in the sum (default: 1 each); one per entry of rewards."
    )
    num_generations: int = Field(4, ge=2, description="Completions per prompt (the group).")
    max_completion_length: int = Field(128, ge=1, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling top-p of the completions.")
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference (0: no reference pass).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(
        4, ge=1, description="Completions per micro-batch; batch_size x grad_accum must be a multiple of num_generations."
    )
    max_length: int = Field(
        512, ge=8, description="Longest prompt + completion in tokens (prompts cut from the left, see truncation)."
    )
    max_steps: int | None = Field(20, ge=1, description="Optimizer steps.")


log = logging.getLogger(__name__)


def trainer_class():
    """``trl.GRPOTrainer`` with lmladder's prompt tokenisation and reference model."""
    from trl import GRPOTrainer

    class LadderGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, prompt_ids: dict[str, list[int]] | None = None, ref_model=None, **kwargs):
            self._lm_prompt_ids = prompt_ids or {}
            targs = kwargs["args"]
            beta = targs.beta
            own_ref = ref_model is not None and beta != 0.0
            if own_ref:
                targs.beta = 0.0  # TRL would load a reference from the model's hub name
            super().__init__(*args, **kwargs)
            if own_ref:
                from trl.trainer.utils import add_fused_lm_head

                targs.beta = self.beta = beta
                add_fused_lm_head(ref_model, temperature=self.temperature,
                                  cast_lm_head_to_fp32=targs.cast_lm_head_to_fp32)
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

        def _tokenize_prompts(self, prompts: list):
            if prompts and isinstance(prompts[0], str) and all(p in self._lm_prompt_ids for p in prompts):
                return [list(self._lm_prompt_ids[p]) for p in prompts], None, {}
            return super()._tokenize_prompts(prompts)

    return LadderGRPOTrainer


def stop_ids(fmt, model) -> list[int]:
    """Token ids that end a completion: EOS, the model's generation EOS ids, the usual
    end-of-turn tokens, and the special token the chat template closes an answer with."""
    from lmladder.inference.generate import stop_ids as gen_stop_ids

    tok = fmt.tokenizer
    ids = set(gen_stop_ids(tok, model))
    if fmt.has_template:
        suffix = tok(fmt.answer_suffix("x", "y"), add_special_tokens=False).input_ids
        special = set(tok.all_special_ids)
        eot = next((t for t in suffix if t in special), None)
        if eot is not None:
            ids.add(int(eot))
    return sorted(ids)


class Grpo(Rung):
    name = "grpo"
    cost_rank = 28
    trains = True
    summary = "GRPO: RL from verifiable rewards on the train prompts (LoRA or full)"
    # every generative kind, and preference (the RLHF loop: rewards: [reward-model])
    kinds = Rung.kinds + ("preference",)

    @property
    def artifact(self) -> str:
        """rungs/grpo/adapter (method: lora) or rungs/grpo/model (full: the whole model)."""
        return "adapter" if self.cfg.method == "lora" else "model"

    # ------------------------------------------------------------------ config checks

    @classmethod
    def validate(cls, cfg, dataset) -> None:
        from lmladder import rewards

        g = cfg.rung_config(cls.name)
        rewards.check(g.rewards, cfg.task.kind, cfg.rungs)
        if g.reward_weights is not None and len(g.reward_weights) != len(g.rewards):
            raise LadderError(f"grpo.reward_weights: {len(g.reward_weights)} weights for {len(g.rewards)} rewards "
                              f"({', '.join(g.rewards)}); give one per reward")
        world = distributed.dist_env()[1]
        per_step = g.batch_size * g.grad_accum * world
        if per_step % g.num_generations:
            raise LadderError(
                f"grpo: batch_size x grad_accum{' x processes' if world > 1 else ''} = {per_step} completions per "
                f"step must be a multiple of num_generations={g.num_generations} (whole groups); e.g. batch_size: "
                f"{g.num_generations}")
        if g.max_length <= g.max_completion_length:
            raise LadderError(f"grpo.max_length={g.max_length} must exceed max_completion_length="
                              f"{g.max_completion_length} (it bounds prompt + completion)")
        if not dataset.train:
            raise LadderError("grpo: the train split is empty (grpo samples completions for the train prompts)")

    @classmethod
    def after(cls, cfg, name: str) -> list[str]:
        """rewards: [reward-model] reads this run's reward-model rung: it runs first and its
        fingerprint is part of grpo's (ladder.run_order / Context.fingerprint)."""
        return ["reward-model"] if "reward-model" in cfg.rung_config(name).rewards else []

    @classmethod
    def fingerprint_extra(cls, cfg) -> dict:
        """A user reward's source file and a saved reward-model folder's identity: a change
        reruns grpo."""
        from lmladder import plugins
        from lmladder.rungs import reward_model

        out: dict[str, Any] = {}
        for n in cfg.rung_config(cls.name).rewards:
            if n.startswith("reward-model:"):
                out[n] = reward_model.folder_digest(Path(n.partition(":")[2]).expanduser())
            elif n not in ("builtin", "reward-model"):
                out[n] = plugins.source_digest(n)
        return out

    # ------------------------------------------------------------------ data

    def prepare(self) -> None:
        task, fmt = self.ctx.task, self.ctx.fmt()
        model, tok = self.ctx.base()
        self.messages = [task.user_message(ex) for ex in self.ctx.data.test]
        self.trainable = 0
        budget = self.cfg.max_length - self.cfg.max_completion_length
        self.rows, self.prompt_ids, self.truncated = [], {}, 0
        for i, ex in enumerate(self.ctx.data.train):
            msg = task.train_message(ex)
            text = fmt.prompt(msg)
            ids = fmt.encode(text)
            if len(ids) > budget:
                if self.cfg.truncation != "truncate":
                    raise LadderError(
                        f"{ex.source}: the prompt has {len(ids)} tokens, more than grpo.max_length - "
                        f"max_completion_length = {budget} (raise max_length, or set truncation: truncate)")
                self.truncated += 1
                ids = ids[len(ids) - budget:]
            self.prompt_ids[text] = ids
            self.rows.append({"prompt": text, "example_index": i, "gold": _gold_text(task, ex),
                              "answer": task.answer(ex), "message": msg, "input": ex.input})
        if self.truncated:
            log.warning("%s: %d prompt(s) longer than max_length - max_completion_length = %d: cut from the left",
                        self.name, self.truncated, budget)
        self.stop = stop_ids(fmt, model)

    # ------------------------------------------------------------------ training

    def fit(self) -> dict[str, Any]:
        start, tok = self.ctx.base()  # the shared base, or the `from:` rung's model (the reference)
        check = forgetting.before(start, tok, self.cfg)
        fp = self.ctx.fingerprint(self.name, training=True)

        def train() -> dict[str, Any]:
            self.model = self.wrap(start)
            self.trainable = weights.count_trainable(self.model)
            with steps.trainer_dirs(self.out_dir) as (work, checkpoints):
                return self.train_weights(self.model, tok, work, checkpoints, fp)

        def load(folder) -> dict[str, Any]:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            if self.cfg.method == "lora":
                self.model = PeftModel.from_pretrained(start, folder)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=start.dtype, use_safetensors=True).to(start.device)
            self.model.eval()
            self.trainable = weights.count_trainable(self.model, loaded=True)
            return {"truncated": self.truncated}

        stats = weights.reuse_or_train(
            self.out_dir / self.artifact, fp, train=train, load=load, name=self.name,
            save=lambda tmp: self.model.save_pretrained(tmp, safe_serialization=True),
            checkpoints=self.out_dir / "checkpoints",
        )
        stats["trainable_params"] = self.trainable
        stats["trainable_share"] = weights.share_of_base(self.ctx, self.trainable, self.model)
        return forgetting.after(check, self.model, stats)

    def wrap(self, start):
        """What trains: ``method: lora`` -- a fresh LoRA adapter (lora's, seeded) on the start
        model, removed again in ``close()``; ``full`` -- every weight of a private copy."""
        if self.cfg.method == "full":
            model = copy.deepcopy(start)
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        from peft import get_peft_model
        from transformers import set_seed

        set_seed(self.ctx.cfg.seed)  # the adapter's initialisation
        return get_peft_model(start, peft_config(self.cfg))

    def method_args(self) -> dict[str, Any]:
        c = self.cfg
        return dict(
            num_generations=c.num_generations,
            max_completion_length=c.max_completion_length,
            temperature=c.temperature,
            top_p=c.top_p,
            beta=c.beta,
            reward_weights=c.reward_weights,
            remove_unused_columns=False,  # the reward columns (gold, example_index, ...)
            log_completions=False,
        )

    def train_weights(self, model, tok, work: Path, checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any]:
        """TRL's GRPOTrainer with our prompts, stop ids and rewards (training/trl_train.run);
        the model's stop / pad ids (and, full, its forward) are as before afterwards."""
        from trl import GRPOConfig
        import datasets

        from lmladder import rewards
        from lmladder.training import trl_train

        c = self.cfg
        funcs = rewards.resolve(c.rewards, self.ctx.task, self.ctx.data.train, self.ctx.fmt(), self.ctx.run_dir)
        ref = None
        if c.method == "full" and c.beta:
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        saved = _declare_stops(inner, self.stop)
        try:
            stats = trl_train.run(
                trainer_class(), GRPOConfig, model=model, cfg=c,
                train_dataset=datasets.Dataset.from_list(self.rows), processing_class=tok,
                seed=self.ctx.cfg.seed, name=self.name, checkpoint_dir=checkpoint_dir,
                fingerprint=fingerprint, work_dir=work, method_args=self.method_args(),
                trainer_kwargs={"reward_funcs": funcs, "prompt_ids": self.prompt_ids, "ref_model": ref},
                rows_per_step=max(1, c.batch_size * c.grad_accum // c.num_generations),
                # memory_budget_mb: checkpointed layers only (GRPO's batch is its generation groups)
                row_tokens=[len(ids) + c.max_completion_length for ids in self.prompt_ids.values()],
                micro_batching=False,
            )
        finally:
            _restore_stops(inner, saved)
            if c.method == "full":
                _unpatch(inner)
        stats.update(reward_summary(stats.get("curves", {})))
        stats.update({
            "method": c.method, "from": c.from_, "rewards": list(c.rewards), "beta": c.beta,
            "num_generations": c.num_generations, "max_completion_length": c.max_completion_length,
            "train_prompts": len(self.rows), "truncated": self.truncated, "stop_ids": self.stop,
            "completions_per_step": c.batch_size * c.grad_accum,
        })
        return stats

    # ------------------------------------------------------------------ evaluation

    def predict(self):
        return self.ctx.task.predict(self.model, self.ctx.fmt(), self.messages, self.ctx.data.test, desc=self.name)

    def trainable_params(self) -> int:
        return self.trainable

    def artifacts(self) -> dict[str, str]:
        return {self.artifact: self.artifact}

    def close(self) -> None:
        if self.model is not None:
            model, self.model = self.model, None
            if self.cfg.method == "lora":  # TRL's forward patch and the adapter's modules out of the base
                _unpatch(model.get_base_model())
                weights.restore_base(self.ctx, model.unload())
            # full: a private copy; dropping it leaves the start model as it was
            del model
            gc.collect()


def _gold_text(task, ex) -> str:
    from lmladder.rewards import gold_text

    return gold_text(task.gold(ex))


def reward_summary(curves: dict, k: int = 3) -> dict[str, Any]:
    """Mean reward over the first and the last ``k`` logged steps."""
    pts = [v for _, v in curves.get("reward", [])]
    if not pts:
        return {}
    k = max(1, min(k, len(pts) // 2 or 1))
    return {"reward_first": sum(pts[:k]) / k, "reward_last": sum(pts[-k:]) / k}


def _declare_stops(model, ids: list[int]) -> dict:
    """Make the model declare ``ids`` as its generation EOS ids (TRL stops and masks at
    them); return what to restore."""
    gen = model.generation_config
    text_cfg = model.config.get_text_config()
    saved = {"eos": gen.eos_token_id, "gen_pad": gen.pad_token_id, "cfg_pad": text_cfg.pad_token_id}
    gen.eos_token_id = list(ids)
    return saved


def _restore_stops(model, saved: dict) -> None:
    model.generation_config.eos_token_id = saved["eos"]
    model.generation_config.pad_token_id = saved["gen_pad"]
    model.config.get_text_config().pad_token_id = saved["cfg_pad"]


def _unpatch(model) -> None:
    """Drop the instance ``forward`` TRL's fused LM head installs (the class's is the same
    computation without it)."""
    model.__dict__.pop("forward", None)
