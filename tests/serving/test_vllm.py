"""vLLM without a GPU: ``lmladder serve --engine vllm``'s command line (serving/vllm_engine.py),
the import guards (one line saying how to install vLLM), and ``--model vllm:PATH``
(inference/vllm_backend.py) driven end to end by a stand-in ``vllm`` module whose ``LLM``
generates with transformers: a cot run through it predicts exactly what the local run does.
When a GPU is lent, bench/gpu_check.sh runs the real thing."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl


def _adapter(tmp_path, name, **cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **cfg}))
    (d / "adapter_model.safetensors").write_bytes(b"x")
    return d


def _spec(adapters, base_name="smollm2-135m"):
    from lmladder.serving.cli import ServeSpec

    return ServeSpec("smollm2-135m", base_name, {k: str(v) for k, v in adapters.items()})


def test_command_line_base_adapters_ranks_backend(tmp_path):
    from lmladder.serving.vllm_engine import vllm_command

    spec = _spec({"lora": _adapter(tmp_path, "a", r=16), "v2": _adapter(tmp_path, "b", r=8, rank_pattern={"q": 24})})
    cmd = vllm_command(spec, model_path="/m/smol", host="0.0.0.0", port=9001, max_adapters=4, batch_size=32,
                       extra=["--gpu-memory-utilization=0.5"], version="0.11.2", python="py")
    assert cmd[:4] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model"] and cmd[4] == "/m/smol"

    def after(flag, n=1):
        i = cmd.index(flag)
        return cmd[i + 1 : i + 1 + n]

    assert after("--host") == ["0.0.0.0"] and after("--port") == ["9001"]
    assert after("--served-model-name", 2) == ["smollm2-135m", "base"]
    assert "--enable-lora" in cmd and after("--max-lora-rank") == ["32"]  # 24 rounded up to a vLLM rank
    assert after("--max-loras") == ["2"] and after("--max-num-seqs") == ["32"]
    assert after("--lora-modules", 2) == [f"lora={tmp_path / 'a'}", f"v2={tmp_path / 'b'}"]
    assert after("--structured-outputs-config.backend") == ["xgrammar"]
    assert cmd[-1] == "--gpu-memory-utilization=0.5" and "--api-key" not in cmd
    old = vllm_command(spec, model_path="/m", version="0.10.1.1", guided_backend="guidance")
    assert old[old.index("--guided-decoding-backend") + 1] == "guidance"
    assert "--structured-outputs-config.backend" not in old


def test_no_adapters_no_lora_flags_and_key_in_env_only(tmp_path):
    from lmladder.serving.vllm_engine import child_env, vllm_command

    cmd = vllm_command(_spec({}, base_name="base"), model_path="org/model")
    assert "--enable-lora" not in cmd and "--lora-modules" not in cmd
    assert cmd[cmd.index("--served-model-name") + 1:][:2] != ["base", "base"]
    assert child_env("s3cret")["VLLM_API_KEY"] == "s3cret" and "VLLM_API_KEY" not in child_env(None)


@pytest.mark.parametrize("cfg,msg", [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                     ({"peft_type": "IA3"}, "LoRA adapters only"), ({"r": 1024}, "largest")])
def test_adapters_vllm_cannot_serve_are_refused(tmp_path, cfg, msg):
    from lmladder.errors import LadderError
    from lmladder.serving.vllm_engine import vllm_command

    with pytest.raises(LadderError, match=msg):
        vllm_command(_spec({"x": _adapter(tmp_path, "x", **cfg)}), model_path="/m")


def test_without_vllm_one_line_errors(run_cli, toy_data, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    from lmladder.cli import main

    train, test = toy_data
    code, out, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "cot",
                             "--model", "vllm:smollm2-135m", "--out", str(tmp_path / "r"))
    assert code == 2 and "needs vLLM, which is not installed (pip install vllm" in err
    assert not (tmp_path / "r").exists()
    code, out, err = run_cli("run", "--train", str(train), "--test", str(test), "--rungs", "lora",
                             "--model", "vllm:smollm2-135m", "--out", str(tmp_path / "r2"))
    assert code == 2 and "trains weights" in err
    assert main(["serve", "smollm2-135m", "--engine", "vllm"]) == 2


# ---------------------------------------------------------------------- a stand-in vLLM (transformers)


class _Out:
    def __init__(self, text, ids):
        self.text, self.token_ids = text, ids


class FakeLLM:
    """vllm.LLM's generate() contract, computed with transformers (greedy or seeded sampling)."""

    calls: list = []

    def __init__(self, model, **kw):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model)
        FakeLLM.calls.append(("init", model, kw))

    def generate(self, prompts, sp, use_tqdm=True):
        import torch

        FakeLLM.calls.append(("generate", len(prompts), sp.__dict__))
        res = []
        for p in prompts:
            ids = torch.tensor([p["prompt_token_ids"]])
            outs = []
            for _ in range(sp.n):
                with torch.no_grad():
                    g = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=sp.max_tokens, eos_token_id=sp.stop_token_ids,
                                            pad_token_id=0)[0, ids.shape[1]:].tolist()
                cut = next((i for i, t in enumerate(g) if t in sp.stop_token_ids), None)
                g = g if cut is None else g[: cut + 1]
                outs.append(_Out(self.tok.decode(g, skip_special_tokens=True), g))
            res.append(types.SimpleNamespace(outputs=outs))
        return res


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.calls = []
    return mod


def test_model_vllm_cot_run_equals_local_run(run_cli, tiny_dir, tmp_path, fake_vllm):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", TEST_ROWS[:4])
    common = ["--train", str(train), "--test", str(test), "--rungs", "cot", "--set", "cot.max_new_tokens=12",
              "--set", "eval.bootstrap=100"]
    code, _, err = run_cli("run", *common, "--out", str(tmp_path / "local"))
    assert code == 0, err
    code, _, err = run_cli("run", *common, "--model", f"vllm:{tiny_dir}", "--out", str(tmp_path / "v"), model=False)
    assert code == 0, err

    def preds(d):
        return [(json.loads(l)["pred"], json.loads(l).get("raw")) for l in
                (d / "rungs/cot/predictions.jsonl").read_text().splitlines()]

    assert preds(tmp_path / "v") == preds(tmp_path / "local")
    gens = [c for c in FakeLLM.calls if c[0] == "generate"]
    assert gens and gens[0][1] == 4 and gens[0][2]["temperature"] == 0.0 and gens[0][2]["max_tokens"] == 12
    assert FakeLLM.calls[0][:2] == ("init", str(tiny_dir.resolve()))
    info = json.loads((tmp_path / "v/results.json").read_text())
    assert info["rungs"][0]["name"] == "cot"


def test_vllm_model_refuses_label_scoring_and_grammars(fake_vllm, tiny_dir):
    from lmladder.errors import LadderError
    from lmladder.inference.generate import generate
    from lmladder.models import load_causal_lm

    model, tok, ref = load_causal_lm(f"vllm:{tiny_dir}")
    assert ref.kind == "vllm" and model.config.max_position_embeddings == 4096
    with pytest.raises(LadderError, match="label scoring"):
        next(model.parameters())
    with pytest.raises(LadderError, match="constrained decoding"):
        generate(model, tok, [[1, 2, 3]], processors=lambda *a: [])
    texts, stats = generate(model, tok, [[5, 6, 7], [8, 9]], max_new_tokens=3, n=2, do_sample=True, seed=3)
    assert len(texts) == 2 and all(len(t) == 2 for t in texts) and stats.sequences == 4
    sp = [c for c in FakeLLM.calls if c[0] == "generate"][-1][2]
    assert sp["n"] == 2 and sp["seed"] == 3 and sp["temperature"] == 1.0
