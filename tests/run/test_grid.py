"""A ladder over several models (``models:``): one run folder with a sub-run per model, one
verdict over every (model, rung) cell. On two tiny models, one with a chat template and one
without (a base model: plain prompts for every rung, training included): results per cell,
resume per cell, the verdict across cells with paired differences, not-applicable cells for
an openai: model, the report's models x rungs table and plot."""

from __future__ import annotations

import json

import pytest

from conftest import make_model, make_tokenizer

ARGS = ["--rungs", "zero-shot,lora", "--set", "eval.bootstrap=100", "--set", "lora.max_steps=3",
        "--set", "lora.batch_size=4", "--set", "lora.eval_steps=1", "--set", "lora.forgetting_text=null",
        "--set", "lora.lr=0.01", "--target", "accuracy=0.6"]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A tiny model whose tokenizer has no chat template (like Gemma-3-270M base)."""
    d = tmp_path_factory.mktemp("tiny-plain")
    tok = make_tokenizer(chat_template=None)
    make_model(len(tok), seed=1).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def grid_run(run_cli, toy_data, tiny_dir, plain_dir, tmp_path):
    train, test = toy_data
    out = tmp_path / "grid"

    def go(*extra):
        return run_cli("run", "--train", str(train), "--test", str(test), "--out", str(out), "-q",
                       "--models", f"{tiny_dir},{plain_dir}", *ARGS, *extra, model=False)

    return out, go


def test_two_models_one_verdict_over_every_cell(grid_run, tiny_dir, plain_dir, monkeypatch):
    from lmladder.training import sft

    trained = {}  # has a chat template -> the first training text each model's lora saw
    real = sft.build_feature

    def spy(fmt, message, answer, *a, **k):
        f = real(fmt, message, answer, *a, **k)
        trained.setdefault(fmt.has_template, (fmt.tokenizer.decode(f.input_ids), answer, fmt.prompt(message)))
        return f

    monkeypatch.setattr(sft, "build_feature", spy)
    out, go = grid_run
    code, stdout, err = go()
    assert code == 0, err
    # chat rendering for the model with a template, plain text for the one without, in training too
    chat_text, answer, chat_prompt = trained[True]
    assert "<|im_start|>user\n# General instructions" in chat_prompt and chat_text.endswith(answer + "<|im_end|>")
    plain_text, answer, plain_prompt = trained[False]
    assert "<|im_start|>user" not in plain_text and plain_prompt.startswith("# General instructions")
    assert plain_text.endswith(plain_prompt + " " + answer + "<|im_end|>")
    res = json.loads((out / "results.json").read_text())
    names = [tiny_dir.name, plain_dir.name]
    assert res["grid"] is True and set(res["models"]) == set(names)
    cells = {(r["model"], r["name"]) for r in res["rungs"]}
    assert cells == {(m, r) for m in names for r in ("zero-shot", "lora")}
    for r in res["rungs"]:  # each cell is its sub-run's current result, priced
        sub = json.loads((out / "models" / r["model"] / "rungs" / r["name"] / "result.json").read_text())
        assert sub["score"] == r["score"] and sub["fingerprint"] == r.get("fingerprint", sub["fingerprint"])
        assert r["cost"]["total_usd"] is not None and r["cell"] == f"{r['model']}/{r['name']}"
    # the model without a chat template used plain prompts, training included
    fmt = {(r["model"], r["name"]): r["prompt_format"] for r in res["rungs"]}
    assert fmt[(plain_dir.name, "lora")] == "plain (no chat template)"
    # prompt_format auto: no dev comparison for a model without a template, plain at once
    zs = next(r for r in res["rungs"] if r["cell"] == f"{plain_dir.name}/zero-shot")
    assert fmt[(plain_dir.name, "zero-shot")] == "plain"
    assert zs["details"]["prompt_format"] == {"setting": "auto", "chosen": "plain",
                                              "why": "the model has no chat template: plain"}
    assert set(next(r for r in res["rungs"] if r["cell"] == f"{tiny_dir.name}/zero-shot")
               ["details"]["prompt_format"]["dev_scores"]) == {"chat", "plain"}
    assert fmt[(tiny_dir.name, "lora")] == "chat"
    assert res["models"][plain_dir.name]["chat_template"] is False
    # one verdict: every cell is paired against the recommended (or best) cell
    rec = res["recommendation"]
    ref = rec.get("cell") or rec.get("best_cell")
    assert ref and "/" in ref
    for r in res["rungs"]:
        assert r["paired"] is None if r["cell"] == ref else r["paired"]["vs"] == ref
    assert set(rec) >= {"model", "rung", "reason"}
    if rec["rung"] is not None:
        assert rec["cell"] == f"{rec['model']}/{rec['rung']}"
    t = res["table"]
    assert t["models"] == names and t["rungs"] == ["zero-shot", "lora"]
    assert all("score" in t["cells"][m][r] for m in names for r in t["rungs"])
    md = (out / "report.md").read_text()
    assert "| model | zero-shot | lora |" in md and f"| {plain_dir.name} |" in md
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "models x rungs" in (out / "report.html").read_text()
    assert "Recommendation:" in stdout


def test_resume_per_cell(grid_run, plain_dir, monkeypatch):
    out, go = grid_run
    assert go()[0] == 0
    before = json.loads((out / "results.json").read_text())
    import lmladder.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded although every cell is finished")

    monkeypatch.setattr(lmladder.models, "load_causal_lm", boom)
    code, _, err = go()
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())
    assert [(r["cell"], r["score"]) for r in again["rungs"]] == [(r["cell"], r["score"]) for r in before["rungs"]]
    monkeypatch.undo()
    # one cell gone: only that cell runs again
    victim = out / "models" / plain_dir.name / "rungs" / "lora" / "result.json"
    victim.unlink()
    # (the majority baseline, no model, is rewritten at every start of a sub-run, as in any run)
    kept = {p: p.read_bytes() for p in out.glob("models/*/rungs/*/result.json") if p.parent.name != "majority"}
    code, _, err = go()
    assert code == 0, err
    assert victim.is_file()
    changed = [str(p.relative_to(out)) for p, b in kept.items() if p.read_bytes() != b]
    assert changed == [], changed  # the other cells were not rerun


def test_openai_models_cannot_train_their_cells_are_not_applicable(tmp_path):
    from lmladder import config
    from lmladder.run import grid

    cfg = config.build({"models": ["smollm2-135m", "openai:gpt-4o-mini"], "rungs": ["zero-shot", "few-shot", "lora"]})
    subs = grid.sub_runs(cfg, tmp_path)
    assert [s["name"] for s in subs] == ["smollm2-135m", "openai--gpt-4o-mini"]
    assert subs[0]["cfg"].rungs == ["zero-shot", "few-shot", "lora"] and subs[0]["not_applicable"] == {}
    assert subs[1]["cfg"].rungs == ["zero-shot", "few-shot"]
    assert subs[1]["not_applicable"] == {"lora": "trains weights; an openai: model is served elsewhere"}
    assert subs[1]["cfg"].model == "openai:gpt-4o-mini" and subs[1]["cfg"].models is None
    assert grid.model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen--Qwen2.5-0.5B-Instruct"
    assert grid.model_name("/models/my-model/") == "my-model" and grid.model_name("x/y.gguf") == "x--y"


def test_the_verdict_over_cells_on_scripted_results():
    """Two models x two rungs, scripted: model b's zero-shot meets the target and is the
    cheapest cell; a's lora meets it too but costs more; a's zero-shot falls short. Every
    cell is paired against b/zero-shot; the break-even names cells."""
    from lmladder import verdict

    def row(model, name, rank, correct, one_time_usd, per_call_usd):
        vals = [1.0] * correct + [0.0] * (40 - correct)
        lo, hi = (correct / 40 - 0.1, min(1.0, correct / 40 + 0.1))
        return {"name": name, "model": model, "cell": f"{model}/{name}", "rank": rank, "score": correct / 40,
                "ci": [lo, hi], "policy": True, "metric": "accuracy",
                "per_example": {"kind": "mean", "binary": True, "values": vals},
                "cost": {"one_time_usd": one_time_usd, "per_call_usd": per_call_usd, "calls": 1000,
                         "total_usd": one_time_usd + 1000 * per_call_usd, "per_call_s": 0.01, "one_time_s": 1.0}}

    rows = [row("a", "zero-shot", 0, 20, 0.0, 2e-5), row("b", "zero-shot", 0, 36, 0.0, 4e-5),
            row("a", "lora", 23, 37, 0.5, 2e-5)]
    rec = verdict.decide(rows, None, [], "accuracy", 0.85, "point", 40)
    assert rec["rung"] == "b/zero-shot" and rec["meets_target"] is True
    assert "b/zero-shot is the cheapest rung" in rec["reason"] and "a/zero-shot 0.500 falls short" in rec["reason"]
    assert [r["paired"] and r["paired"]["vs"] for r in rows] == ["b/zero-shot", None, "b/zero-shot"]
    assert rec["breakeven"] == [{"rung": "a/lora", "calls": 25000, "cheaper": "above"}]
