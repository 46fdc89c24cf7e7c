"""The distill rung on the tiny model: a scripted teacher whose labels contradict the gold
is what the student learns (not the gold); the teacher's labels are cached and not
redone on a rerun; a rung teacher (few-shot) labels exactly what that rung predicts on
the train inputs; bad teacher specs stop the run in validation with one line."""

import json
from pathlib import Path

import pytest

from conftest import TRAIN_ROWS, write_jsonl
from lmladder.data import Example
from lmladder.rungs.distill import answer_text
from lmladder import prompts

# the scripted teacher: the opposite of the gold label, no answer for two rows (dropped)
TEACHER = '''
from pathlib import Path

COUNT = Path(__file__).with_suffix(".count")


def opposite(examples):
    n = int(COUNT.read_text()) if COUNT.exists() else 0
    COUNT.write_text(str(n + 1))
    out = []
    for e in examples:
        if e.input.endswith(" 3"):
            out.append(None if e.label == "pos" else "no idea")  # dropped: none / unparseable
        else:
            out.append({"pos": "NEG", "neg": "POS"}[e.label])  # parsed to the label set
    return out
'''

OPPOSITE = {"pos": "neg", "neg": "pos"}
# the keyword repeated: a tiny random model learns to tell such inputs apart in a few steps
ROWS = [{"text": " ".join([w] * 8) + f" {i}", "label": lab}
        for i in range(12) for w, lab in (("great", "pos"), ("awful", "neg"))]


def _student(n_steps: int, lr: float = 1e-2) -> list[str]:
    return ["--set", f"distill.max_steps={n_steps}", "--set", "distill.batch_size=8", "--set", f"distill.lr={lr}",
            "--set", "distill.warmup_ratio=0", "--set", "distill.dev_fraction=0", "--set", "distill.dropout=0",
            "--set", "distill.forgetting_text=null", "--set", "eval.bootstrap=100",
            # the tiny model's frozen head cannot move its logits far: adapt it too
            "--set", "distill.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_student_learns_a_scripted_teacher_not_the_gold_and_the_labels_are_cached(run_cli, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    teacher = tmp_path / "teacher.py"
    teacher.write_text(TEACHER)
    out = tmp_path / "run"
    # the test set is the train inputs: the student must give the teacher's labels on them
    base = ["run", "--train", str(train), "--test", str(train), "--set", "data.allow_overlap=true",
            "--rungs", "distill", "--out", str(out), "-q",
            "--set", f"distill.teacher={teacher}:opposite", "--set", "task.instruction=Label"]
    code, _, err = run_cli(*base, *_student(40))
    assert code == 0, err
    assert teacher.with_suffix(".count").read_text() == "1"
    r = json.loads((out / "rungs/distill/result.json").read_text())
    t = r["details"]["teacher"]
    assert (t["name"], t["kind"], t["cached"]) == (f"{teacher}:opposite", "callable", False)
    assert (t["train_inputs"], t["labelled"], t["dropped"]) == (24, 22, 2)
    assert t["agreement_with_gold"] == 0.0
    assert r["details"]["train_examples"] == 22  # the dropped rows are not trained on
    cache = _rows(out / "rungs/distill/teacher.jsonl")
    assert cache[0]["fingerprint"] == t["fingerprint"] and len(cache) == 25
    by_input = {row["text"]: row["label"] for row in ROWS}
    for row, ex in zip(cache[1:], ROWS):
        if ex["text"].endswith(" 3"):
            assert row["answer"] is None
        else:
            assert row["answer"] == OPPOSITE[ex["label"]] and row["raw"] == OPPOSITE[ex["label"]].upper()
    # the student predicts the teacher's labels, not the gold, on every train input
    preds = _rows(out / "rungs/distill/predictions.jsonl")
    assert [p["pred"] for p in preds] == [OPPOSITE[by_input[p["input"]]] for p in preds]
    assert r["score"] == 0.0
    assert (out / "rungs/distill/adapter/adapter_model.safetensors").is_file()

    # another student setting retrains the student, but the teacher is not asked again
    code, _, err = run_cli(*base, *_student(2, lr=1e-3))
    assert code == 0, err
    assert teacher.with_suffix(".count").read_text() == "1"
    r2 = json.loads((out / "rungs/distill/result.json").read_text())
    assert r2["fingerprint"] != r["fingerprint"] and r2["details"]["steps"] == 2
    t2 = r2["details"]["teacher"]
    assert t2["cached"] is True and t2["fingerprint"] == t["fingerprint"] and t2["seconds"] == t["seconds"]
    assert (t2["labelled"], t2["dropped"]) == (22, 2)


def test_few_shot_teacher_end_to_end(run_cli, tmp_path):
    """teacher: few-shot; with the train file as the test set the few-shot rung's own
    predictions are exactly the teacher's labels."""
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(train), "--set", "data.allow_overlap=true",
                           "--rungs", "zero-shot,few-shot,distill",
                           "--out", str(out), "-q", "--set", "few-shot.k=4", "--set", "distill.teacher=few-shot",
                           *_student(2))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in res["rungs"]}
    assert list(by) == ["zero-shot", "few-shot", "distill"]
    t = by["distill"]["details"]["teacher"]
    assert (t["name"], t["kind"], t["labelled"], t["dropped"]) == ("few-shot", "rung", 24, 0)
    few = _rows(out / "rungs/few-shot/predictions.jsonl")
    cache = _rows(out / "rungs/distill/teacher.jsonl")[1:]
    assert [c["answer"] for c in cache] == [p["pred"] for p in few]
    assert t["agreement_with_gold"] == pytest.approx(by["few-shot"]["score"])
    assert t["prompt_tokens_per_example"] == pytest.approx(by["few-shot"]["cost"]["prompt_tokens_per_example"], abs=0.1)
    # the student is asked with the zero-shot prompt: the zero-shot rung's cost per call
    assert by["distill"]["cost"]["prompt_tokens_per_example"] == by["zero-shot"]["cost"]["prompt_tokens_per_example"]
    assert by["distill"]["cost"]["prompt_tokens_per_example"] < t["prompt_tokens_per_example"]
    assert (out / "rungs/distill/teacher/shots.json").is_file()
    assert by["distill"]["artifacts"] == {"adapter": "adapter", "teacher": "teacher.jsonl"}
    report = (out / "report.md").read_text()
    assert "## Distillation teachers" in report and "| distill | few-shot | 24 / 0 |" in report


def test_model_teacher_labels_zero_shot(run_cli, tiny_dir, tmp_path):
    """teacher: model:<spec> answers the zero-shot prompt: here the run's own model, so its
    labels are the zero-shot rung's predictions on the train inputs."""
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--test", str(train), "--set", "data.allow_overlap=true",
                           "--rungs", "zero-shot,distill",
                           "--out", str(out), "-q", "--set", f"distill.teacher=model:{tiny_dir}", *_student(1))
    assert code == 0, err
    t = json.loads((out / "rungs/distill/result.json").read_text())["details"]["teacher"]
    assert (t["kind"], t["labelled"], t["dropped"]) == ("model", 24, 0)
    zero = _rows(out / "rungs/zero-shot/predictions.jsonl")
    assert [c["answer"] for c in _rows(out / "rungs/distill/teacher.jsonl")[1:]] == [p["pred"] for p in zero]


@pytest.mark.parametrize("teacher,msg", [
    # a rung teacher is checked by the ladder (distill's uses(): run/ladder._check_uses)
    ("few-shoot", "distill.teacher: unknown rung 'few-shoot' (an inference rung: "),
    ("lora", "distill.teacher: 'lora' trains; name an inference rung"),
    ("distill", "distill.teacher: 'distill' trains; name an inference rung"),
    ("model:", "distill.teacher: 'model:' needs a model spec"),
    ("no_such_module_xyz:f", "distill.teacher: cannot import 'no_such_module_xyz'"),
    ("json:no_such_function", "distill.teacher: 'json' has no function 'no_such_function'"),
])
def test_bad_teacher_is_one_line_error(run_cli, tmp_path, teacher, msg):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    code, _, err = run_cli("run", "--train", str(train), "--rungs", "distill", "--out", str(tmp_path / "r"),
                           "--set", f"distill.teacher={teacher}")
    assert code == 2
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # stopped before anything was written
    if teacher == "few-shoot":
        assert "did you mean 'few-shot'?" in err


def test_answer_text_renders_each_kind():
    from lmladder.config import EvalConfig, TaskConfig
    from lmladder.tasks import make_task

    ev = EvalConfig(bootstrap=100)
    mc = make_task(TaskConfig(kind="multiple-choice"), [], ev, 0)
    ex = Example("1", "Which?", "0", choices=["red", "blue"], target=0)
    assert answer_text(mc, ex, {"choice": 1, "choice_norm": 1}) == "blue"
    assert answer_text(mc, ex, {"choice": 5}) is None
    xt = make_task(TaskConfig(kind="extraction", schema=["name"]), [], ev, 0)
    assert answer_text(xt, ex, [{"type": "name", "text": "Ann"}]) == '[{"type": "name", "text": "Ann"}]'
    math = make_task(TaskConfig(kind="math"), [], ev, 0)
    pred, _ = math.parse("The answer is 1,234.")
    assert answer_text(math, ex, pred) == "1234" == math.answer(Example("2", "q", "1234"))
    assert answer_text(math, ex, None) is None and answer_text(math, ex, "  ") is None


def test_kd_loss_exact_values():
    """alpha 0: the answer's cross-entropy (training/sft.token_loss); alpha 1 with the
    student's own distribution as the teacher (full top-k): KL 0; else the KL by hand."""
    import torch

    from lmladder.training.sft import IGNORE, token_loss
    from lmladder.rungs.distill import kd_loss

    torch.manual_seed(0)
    V = 7
    labels = torch.tensor([[IGNORE, IGNORE, 3, 5], [IGNORE, 2, 4, IGNORE]])
    logits = torch.randn(2, 4, V)
    keep = labels[:, 1:] != IGNORE
    flat = logits[:, :-1][keep]  # the 4 supervised positions, in row order
    own = torch.log_softmax(flat, -1).topk(V, -1)
    fields = {"kd_ids": own.indices, "kd_logps": own.values}
    out = {"logits": logits}
    ce = token_loss(out, labels)
    assert float(kd_loss(out, labels, fields, alpha=0.0, temperature=1.0)) == pytest.approx(float(ce), abs=1e-6)
    assert float(kd_loss(out, labels, fields, alpha=1.0, temperature=1.0)) == pytest.approx(0.0, abs=1e-6)
    # a teacher sure of token 0 everywhere (top-2: 0 with p=0.9, 1 with p=0.1), T = 2
    t_ids = torch.tensor([[0, 1]] * 4)
    t_logp = torch.log(torch.tensor([[0.9, 0.1]] * 4))
    s = torch.log_softmax(flat / 2, -1).gather(-1, t_ids)
    kl = float((t_logp.exp() * (t_logp - s)).sum())
    got = kd_loss(out, labels, {"kd_ids": t_ids, "kd_logps": t_logp}, alpha=0.25, temperature=2.0)
    assert float(got) == pytest.approx((0.75 * float(ce) * 4 + 0.25 * 4 * kl) / 4, rel=1e-5)


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory):
    """Another tiny model with the same tokenizer, its head scaled up: peaked, input-dependent
    token distributions for a student to match."""
    import torch

    from conftest import make_model, make_tokenizer

    d = tmp_path_factory.mktemp("sharp-teacher")
    tok = make_tokenizer()
    model = make_model(len(tok), seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _answer_kl(model, fmt, messages, answers, teacher, tfmt):
    """Sum over examples and answer tokens of KL(teacher || model), full vocabulary."""
    import torch

    from lmladder.training import sft

    total = 0.0
    for m, a in zip(messages, answers):
        logps = []
        for mdl, f in ((teacher, tfmt), (model, fmt)):
            feat = sft.build_feature(f, m, a, 10 ** 6, "", prompts.eos_token_ids(f.tokenizer, mdl))
            n = sum(1 for t in feat.labels if t != sft.IGNORE)
            with torch.no_grad():
                logits = mdl(input_ids=torch.tensor([feat.input_ids])).logits[0, -(n + 1):-1].float()
            logps.append(torch.log_softmax(logits, -1))
        t, s_ = logps
        total += float((t.exp() * (t - s_)).sum())
    return total


def test_logit_kd_moves_the_student_onto_the_teacher_distributions(run_cli, tiny_dir, sharp_teacher_dir, tmp_path):
    """kd: logits, kd_alpha 1 (KL only) with a model: teacher: the KL between the teacher's and
    the student's distributions at the answer tokens (the teacher's own answers) falls."""
    from peft import PeftModel

    from lmladder.config import DataConfig, EvalConfig, TaskConfig
    from lmladder.data import read_examples
    from lmladder.models import load_causal_lm
    from lmladder.prompts import ChatFormat
    from lmladder.tasks import make_task

    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--rungs", "distill", "--out", str(out), "-q",
                           "--set", f"distill.teacher=model:{sharp_teacher_dir}", "--set", "distill.kd=logits",
                           "--set", "distill.kd_alpha=1.0", "--set", "task.instruction=Label", *_student(30))
    assert code == 0, err
    d = json.loads((out / "rungs/distill/result.json").read_text())["details"]
    assert d["kd"]["mode"] == "logits" and d["kd"]["top_k"] == 20 and d["steps"] == 30
    kept = _rows(out / "rungs/distill/teacher.jsonl")[1:]  # the train split (the rest is test)
    assert len(kept) == d["teacher"]["labelled"] == d["train_examples"] == 19
    task = make_task(TaskConfig(instruction="Label"), ["neg", "pos"], EvalConfig(), 0)
    exs = {e.id: e for e in read_examples(train, DataConfig(), "train", "classification")}
    messages = [task.user_message(exs[r["id"]]) for r in kept]
    answers = [r["answer"] for r in kept]
    teacher, ttok, _ = load_causal_lm(str(sharp_teacher_dir))
    base, tok, _ = load_causal_lm(str(tiny_dir))
    fmt, tfmt = ChatFormat(tok, None), ChatFormat(ttok, None)
    before = _answer_kl(base, fmt, messages, answers, teacher, tfmt)
    student = PeftModel.from_pretrained(base, out / "rungs/distill/adapter")
    after = _answer_kl(student, fmt, messages, answers, teacher, tfmt)
    assert after < 0.3 * before, (before, after)


def test_logit_kd_from_a_few_shot_teacher_runs(run_cli, tmp_path):
    """Context distillation: the teacher is the run's own model reading the few-shot prompt
    (the student's adapter switched off while it scores)."""
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--train", str(train), "--rungs", "distill", "--out", str(out), "-q",
                           "--set", "few-shot.k=4", "--set", "distill.teacher=few-shot", "--set", "distill.kd=logits",
                           "--set", "distill.kd_top_k=5", *_student(3))
    assert code == 0, err
    d = json.loads((out / "rungs/distill/result.json").read_text())["details"]
    assert d["kd"] == {"mode": "logits", "alpha": 0.5, "temperature": 1.0, "top_k": 5,
                       "teacher_forward_seconds": d["kd"]["teacher_forward_seconds"]}
    assert d["steps"] == 3 and d["teacher"]["kind"] == "rung" and d["train_examples"] == d["teacher"]["labelled"]


def test_logit_kd_needs_a_distribution_teacher(run_cli, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    code, _, err = run_cli("run", "--train", str(train), "--rungs", "distill", "--out", str(tmp_path / "r"),
                           "--set", "distill.teacher=self-consistency", "--set", "distill.kd=logits")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "distill.kd: logits needs a teacher with one token distribution per answer token" in err
