"""few-shot selection: similar (nearest train inputs by embedding) and many-shot k=max
(as many examples as fit the context window, with a warning and shots_used)."""

import logging
import math
import re

import numpy as np
import pytest

from lmladder import config as C
from lmladder.data import Dataset, Example
from lmladder.run.context import Context
from lmladder.rungs.few_shot import FewShot, fit_count, nearest, select_balanced
from lmladder.tasks import make_task


def fake_embed(texts):
    """'item N' -> the unit vector at N degrees (importable as test_few_shot_selection:fake_embed)."""
    out = []
    for t in texts:
        a = math.radians(float(re.search(r"item (\d+)", t).group(1)))
        out.append([math.cos(a), math.sin(a)])
    return np.array(out)


def _ex(i, n, split):
    return Example(id=f"{split}{i}", input=f"item {n}", label="pos" if n < 50 else "neg")


def _ctx(tmp_path, tiny_dir, train_angles, test_angles, **few):
    cfg = C.build({"model": str(tiny_dir), "task": {"labels": ["neg", "pos"]}, "few-shot": few})
    ds = Dataset([_ex(i, n, "tr") for i, n in enumerate(train_angles)],
                 [_ex(i, n, "te") for i, n in enumerate(test_angles)], {"labels": ["neg", "pos"]})
    task = make_task(cfg.task, ["neg", "pos"], cfg.eval, cfg.seed)
    return Context(cfg, ds, task, tmp_path)


def test_nearest_exact_order():
    train = fake_embed([f"item {a}" for a in (0, 10, 20, 30, 40, 90)])
    q = fake_embed(["item 23", "item 80", "item 5"])
    assert nearest(q, train, 3) == [[2, 3, 1], [5, 4, 3], [0, 1, 2]]  # ties (item 5: 0 vs 10) -> lower index
    assert nearest(q, train, 99)[0][:2] == [2, 3]


def test_similar_selection_gives_true_neighbours_per_example(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("LMLADDER_CACHE", str(tmp_path / "cache"))
    ctx = _ctx(tmp_path, tiny_dir, range(0, 100, 10), [23, 71],
               k=3, selection="similar", embedder="test_few_shot_selection:fake_embed")
    rung = FewShot(ctx, ctx.cfg.few_shot, tmp_path)
    rung.prepare()
    # nearest of 23: 20, 30, 10; of 71: 70, 80, 60 -- least similar first, nearest next to the query
    assert [[e.input for e in s] for s in rung.per_test] == [
        ["item 10", "item 30", "item 20"], ["item 60", "item 80", "item 70"]]
    msg = rung.messages[0]
    assert "# Examples\nInput: item 10\nLabel: pos\n\nInput: item 30\nLabel: pos\n\nInput: item 20\nLabel: pos\n\n" \
           "# Target question\nInput: item 23\nLabel:" in msg
    preds, info = rung.predict()
    assert len(preds) == 2 and info["selection"] == "similar" and info["shared_prefix"] is False
    assert info["shots_used"] == 3 and info["shots_requested"] == 3
    assert list((tmp_path / "cache" / "embeddings").glob("emb-*.npy"))  # embeddings cached on disk
    import json

    assert json.loads((tmp_path / "shots.json").read_text())[1] == {"id": "te1", "shots": ["tr6", "tr8", "tr7"]}


def test_random_selection_unchanged(tmp_path, tiny_dir):
    ctx = _ctx(tmp_path, tiny_dir, range(0, 100, 10), [23, 71], k=4)
    rung = FewShot(ctx, ctx.cfg.few_shot, tmp_path)
    rung.prepare()
    want = select_balanced(ctx.data.train, 4, 0, True)
    assert rung.shots == want and all(s == want for s in rung.per_test)
    assert rung.messages[1] == ctx.task.user_message(ctx.data.test[1], want)


def _tokens(ctx, ex, shots):
    fmt = ctx.fmt()
    return len(fmt.encode(fmt.prompt(ctx.task.user_message(ex, shots))))


def test_many_shot_fills_the_context_and_warns(tmp_path, tiny_dir, caplog):
    window = 900
    ctx = _ctx(tmp_path, tiny_dir, range(0, 80, 2), [3, 12345], k="max", context_window=window)
    rung = FewShot(ctx, ctx.cfg.few_shot, tmp_path)
    with caplog.at_level(logging.WARNING, logger="lmladder"):
        rung.prepare()
    m = rung.shots_used
    budget = window - ctx.cfg.eval.max_new_tokens
    longest = ctx.data.test[1]  # 'item 12345' is the longer test prompt
    # m is the most that fit: m shots fit the longest prompt, m + 1 do not
    assert 0 < m < 40
    assert _tokens(ctx, longest, select_balanced(ctx.data.train, m, 0)) <= budget
    assert _tokens(ctx, longest, select_balanced(ctx.data.train, m + 1, 0)) > budget
    assert all(len(s) == m for s in rung.per_test)
    assert f"only {m} of 40 train examples fit the {window}-token context window" in caplog.text
    preds, info = rung.predict()
    assert (info["shots_used"], info["shots_requested"], info["context_window"]) == (m, 40, window)
    assert info["shared_prefix"] is True


def test_many_shot_default_window_from_model_and_all_fit(tmp_path, tiny_dir, caplog):
    ctx = _ctx(tmp_path, tiny_dir, range(0, 20, 2), [3], k="max")  # tiny model: 4096 positions
    rung = FewShot(ctx, ctx.cfg.few_shot, tmp_path)
    with caplog.at_level(logging.WARNING, logger="lmladder"):
        rung.prepare()
    assert rung.shots_used == 10 and rung.window == 4096 and "fit the" not in caplog.text


def test_similar_many_shot_per_example_budget(tmp_path, tiny_dir):
    ctx = _ctx(tmp_path, tiny_dir, range(0, 80, 2), [3, 12345], k="max", selection="similar",
               embedder="test_few_shot_selection:fake_embed", context_window=700)
    rung = FewShot(ctx, ctx.cfg.few_shot, tmp_path)
    rung.prepare()
    budget = 700 - ctx.cfg.eval.max_new_tokens
    for ex, shots in zip(ctx.data.test, rung.per_test):
        assert 0 < len(shots) < 40 and _tokens(ctx, ex, shots) <= budget
    # nearest last: item 3 -> 2 (tie with 4: lower index); item 12345 = 105 degrees -> 78
    assert [s[-1].input for s in rung.per_test] == ["item 2", "item 78"]


def test_fit_count_corrects_a_wrong_estimate():
    # estimate says 10 fit, exact cost is 3 tokens a shot more than estimated
    order = lambda m: list(range(m))
    est = lambda s: 10 * len(s)
    exact = lambda s: 13 * len(s)
    assert fit_count(order, 50, est, exact, 100) == 7


@pytest.mark.integration
def test_real_minilm_similar_neighbours():
    """The embedded MiniLM (offline) puts paraphrases next to each other."""
    from lmladder.inference import embed

    fn = embed.get("all-minilm-l6-v2")
    train = fn(["the stock market fell sharply", "a wonderful, moving film", "heavy rain expected tomorrow"])
    q = fn(["this movie was fantastic", "shares dropped on wall street", "it will pour all day"])
    assert train.shape == (3, 384) and np.allclose(np.linalg.norm(train, axis=1), 1, atol=1e-5)
    assert nearest(q, train, 1) == [[1], [0], [2]]
