"""The spine end to end on the tiny model: results, report, resume, report rebuild."""

import json

import pytest
import torch

from lmladder.report import recommend

TRAIN_ARGS = ["--set", "lora.max_steps=4", "--set", "lora.batch_size=4", "--set", "few-shot.k=4", "--set", "eval.bootstrap=200"]


def _run(run_cli, toy_data, out, *extra):
    train, test = toy_data
    return run_cli(
        "run", "--train", str(train), "--test", str(test), "--out", str(out),
        "--target", "accuracy=0.6", "-q", *TRAIN_ARGS, *extra,
    )


def test_three_rungs_end_to_end(run_cli, toy_data, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = _run(run_cli, toy_data, out)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rungs"]] == ["zero-shot", "few-shot", "lora"]
    assert res["metric"] == "accuracy" and res["target"] == 0.6
    for r in res["rungs"]:
        assert 0.0 <= r["ci"][0] <= r["score"] <= r["ci"][1] <= 1.0
        assert set(r["metrics"]) == {"accuracy", "macro_f1"}
        assert r["n_test"] == 8
        c = r["cost"]
        assert c["peak_rss_mb"] > 0 and c["eval_examples_per_second"] > 0
        preds = [json.loads(l) for l in (out / "rungs" / r["name"] / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 8
        assert {"id", "source", "input", "gold", "pred", "scores", "correct"} <= set(preds[0])
        assert sum(p["correct"] for p in preds) / 8 == pytest.approx(r["metrics"]["accuracy"]["value"])
    zs, fs, lo = res["rungs"]
    assert zs["cost"]["trainable_params"] == 0 and zs["cost"]["train_seconds"] == 0
    assert fs["cost"]["prompt_tokens_per_example"] > zs["cost"]["prompt_tokens_per_example"]
    assert lo["cost"]["trainable_params"] > 0 and lo["cost"]["train_seconds"] > 0
    assert lo["details"]["steps"] == 4
    assert (out / "rungs/lora/adapter/adapter_model.safetensors").is_file()
    assert len(json.loads((out / "rungs/few-shot/shots.json").read_text())) == 4
    # 8 test examples: nothing beats the majority baseline with confidence
    assert res["recommendation"]["rung"] in {None, "zero-shot", "few-shot", "lora"}
    assert res["baseline"]["name"] == "majority" and res["baseline"]["score"] == 0.5
    md = (out / "report.md").read_text()
    assert "| zero-shot |" in md and "Recommendation" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "Recommendation:" in stdout and "report.html" in stdout
    # no temp files left behind
    assert not [p for p in out.rglob("*.tmp")]


def test_rerun_skips_finished_rungs_and_reruns_changed_ones(run_cli, toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _run(run_cli, toy_data, out, "--rungs", "zero-shot,few-shot")[0] == 0
    stamps = {n: (out / f"rungs/{n}/result.json").read_text() for n in ("zero-shot", "few-shot")}

    # Same settings: nothing runs, so the model is never even loaded.
    import lmladder.models

    def boom(*a, **k):
        raise AssertionError("model loaded on a resume with nothing to do")

    monkeypatch.setattr(lmladder.models, "load_causal_lm", boom)
    assert _run(run_cli, toy_data, out, "--rungs", "zero-shot,few-shot")[0] == 0
    assert {n: (out / f"rungs/{n}/result.json").read_text() for n in stamps} == stamps
    monkeypatch.undo()

    # A changed few-shot setting reruns few-shot only.
    assert _run(run_cli, toy_data, out, "--rungs", "zero-shot,few-shot", "--set", "few-shot.k=2")[0] == 0
    assert (out / "rungs/zero-shot/result.json").read_text() == stamps["zero-shot"]
    assert (out / "rungs/few-shot/result.json").read_text() != stamps["few-shot"]
    assert len(json.loads((out / "rungs/few-shot/shots.json").read_text())) == 2


def test_adapter_on_disk_is_reused_with_same_result(run_cli, toy_data, tmp_path):
    out = tmp_path / "run"
    assert _run(run_cli, toy_data, out, "--rungs", "lora")[0] == 0
    first = (out / "rungs/lora/predictions.jsonl").read_text()
    (out / "rungs/lora/result.json").unlink()  # as if stopped after training
    assert _run(run_cli, toy_data, out, "--rungs", "lora")[0] == 0
    res = json.loads((out / "rungs/lora/result.json").read_text())
    assert res["details"].get("reused_adapter") is True
    assert (out / "rungs/lora/predictions.jsonl").read_text() == first


def test_eval_only_change_reevaluates_but_reuses_the_trained_adapter(run_cli, toy_data, tmp_path):
    """eval: settings change the rung's result fingerprint (it reruns), not its training
    fingerprint: the saved adapter is reused, not retrained."""
    out = tmp_path / "run"
    assert _run(run_cli, toy_data, out, "--rungs", "lora")[0] == 0
    first = json.loads((out / "rungs/lora/result.json").read_text())
    assert not first["details"].get("reused_adapter")
    assert _run(run_cli, toy_data, out, "--rungs", "lora", "--set", "eval.bootstrap=500")[0] == 0
    again = json.loads((out / "rungs/lora/result.json").read_text())
    assert again["fingerprint"] != first["fingerprint"]
    assert again["details"].get("reused_adapter") is True and again["score"] == first["score"]


def test_report_command_rebuilds(run_cli, toy_data, tmp_path):
    out = tmp_path / "run"
    assert _run(run_cli, toy_data, out, "--rungs", "zero-shot")[0] == 0
    before = json.loads((out / "results.json").read_text())
    for f in ("results.json", "report.md", "report.html", "plot.png"):
        (out / f).unlink()
    code, stdout, _ = run_cli("report", str(out))
    assert code == 0
    after = json.loads((out / "results.json").read_text())
    assert after["rungs"] == before["rungs"] and after["recommendation"] == before["recommendation"]
    assert (out / "report.html").is_file() and (out / "plot.png").is_file()


def test_lora_leaves_the_shared_base_model_untouched(tiny_dir, toy_data, tmp_path):
    from lmladder import config
    from lmladder.run import ladder
    from lmladder.rungs.lora import Lora
    from lmladder.tasks import make_task

    train, test = toy_data
    cfg = config.build({"data": {"train": str(train), "test": str(test)}, "model": str(tiny_dir),
                        "lora": {"max_steps": 2, "batch_size": 4}})
    ds = ladder.validate(cfg)
    ctx = ladder.Context(cfg, ds, make_task(cfg.task, ds.info["labels"], cfg.eval, 0), tmp_path)
    model, _ = ctx.base()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
    rung = Lora(ctx, cfg.lora, tmp_path / "lora")
    rung.prepare()
    rung.fit()
    with torch.no_grad():
        adapted = rung.model(input_ids=x).logits
    rung.close()
    base, _ = ctx.base()
    with torch.no_grad():
        after = base(input_ids=x).logits
    assert not torch.equal(adapted, before)  # training changed the adapted model...
    assert torch.equal(after, before)  # ...but not the base the other rungs share
    assert not any("lora_" in n for n, _ in base.named_parameters())


def _r(name, rank, score, ci=None, n=100):
    k = round(score * n)
    per = {"kind": "mean", "binary": True, "values": [1.0] * k + [0.0] * (n - k)}
    return {"name": name, "rank": rank, "score": score, "ci": ci or [score - 0.05, score + 0.05], "per_example": per}


def test_recommend_cheapest_meeting_target():
    rungs = [_r("lora", 2, 0.91), _r("zero-shot", 0, 0.70), _r("few-shot", 1, 0.86)]
    rec = recommend(rungs, "accuracy", 0.85)
    assert rec["rung"] == "few-shot" and rec["meets_target"] is True
    assert "cheaper rungs: zero-shot 0.700 falls short (paired difference -0.160" in rec["reason"]


def test_recommend_best_and_gap_when_none_meets():
    rec = recommend([_r("zero-shot", 0, 0.70), _r("lora", 2, 0.80)], "accuracy", 0.9)
    assert rec["rung"] == "lora" and rec["meets_target"] is False
    assert rec["gap"] == pytest.approx(0.1)
    assert "0.100 short" in rec["reason"]


def test_recommend_without_target_picks_best_and_ties_go_cheaper():
    rec = recommend([_r("lora", 2, 0.8), _r("zero-shot", 0, 0.8)], "accuracy", None)
    assert rec["rung"] == "zero-shot"
