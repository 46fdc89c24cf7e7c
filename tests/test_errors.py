"""Bad input: a one-line error naming file, line and field, exit code 2, no traceback,
and nothing written to the run folder (validation happens before any write)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import TEST_ROWS, TRAIN_ROWS, write_jsonl

PREFIX = "lmladder: error: "


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Run from an empty folder so a stray default runs/<name> would be noticed."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert list(cwd.iterdir()) == [], "the command wrote into the working directory"


@pytest.fixture
def files(tmp_path):
    """Valid train/test files and a not-yet-existing run folder."""
    return (
        write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS),
        write_jsonl(tmp_path / "test.jsonl", TEST_ROWS),
        tmp_path / "out",
    )


def _run_args(train, test, out, *extra) -> list[str]:
    args = ["run", "--train", str(train)]
    if test is not None:
        args += ["--test", str(test)]
    return args + ["--out", str(out), *extra]


def error_line(result, out_dir: Path | None) -> str:
    """Assert the common contract and return the message after the prefix."""
    code, stdout, stderr = result
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert code == 2, (code, stderr)
    line = stderr.strip()
    assert line, "no error message on stderr"
    assert "\n" not in line, f"stderr is not one line:\n{stderr}"
    assert line.startswith(PREFIX), line
    if out_dir is not None:
        assert not out_dir.exists(), f"{out_dir} was created: {sorted(out_dir.rglob('*'))}"
    return line[len(PREFIX) :]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _jsonl_lines(rows) -> list[str]:
    return [json.dumps(r) for r in rows]


# --------------------------------------------------------------------------- data files


def test_missing_train_file(run_cli, files, tmp_path):
    _, test, out = files
    missing = tmp_path / "nope" / "train.jsonl"
    msg = error_line(run_cli(*_run_args(missing, test, out)), out)
    assert str(missing) in msg
    assert "not found" in msg and "train" in msg


def test_missing_test_file(run_cli, files, tmp_path):
    train, _, out = files
    missing = tmp_path / "test-missing.jsonl"
    msg = error_line(run_cli(*_run_args(train, missing, out)), out)
    assert str(missing) in msg
    assert "not found" in msg and "test" in msg


def test_train_path_is_a_folder(run_cli, files, tmp_path):
    _, test, out = files
    folder = tmp_path / "afolder.jsonl"
    folder.mkdir()
    msg = error_line(run_cli(*_run_args(folder, test, out)), out)
    assert str(folder) in msg


def test_invalid_json_line(run_cli, files, tmp_path):
    _, test, out = files
    lines = _jsonl_lines(TRAIN_ROWS)
    lines[2] = '{"text": "truncated", "label": '
    train = _write_lines(tmp_path / "train.jsonl", lines)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:3:"), msg
    assert "JSON" in msg


def test_invalid_json_line_number_counts_blank_lines(run_cli, files, tmp_path):
    _, test, out = files
    lines = _jsonl_lines(TRAIN_ROWS)
    lines.insert(1, "")  # blank line 2 is skipped but still counted
    lines[4] = "{not json"  # physical line 5
    train = _write_lines(tmp_path / "train.jsonl", lines)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:5:"), msg


@pytest.mark.parametrize("bad", ["[1, 2]", '"just a string"', "42"])
def test_non_object_json_line(run_cli, files, tmp_path, bad):
    _, test, out = files
    lines = _jsonl_lines(TRAIN_ROWS)
    lines[2] = bad
    train = _write_lines(tmp_path / "train.jsonl", lines)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:3:"), msg
    assert "object" in msg


def test_missing_field(run_cli, files, tmp_path):
    _, test, out = files
    rows = [dict(r) for r in TRAIN_ROWS]
    del rows[1]["label"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:2: field 'label'"), msg
    assert "missing" in msg
    assert "text" in msg  # lists the fields that are present


def test_missing_field_custom_name(run_cli, files, tmp_path):
    _, test, out = files
    rows = [{"sentence": r["text"], "y": r["label"]} for r in TRAIN_ROWS]
    rows[5] = {"sentence": "no y here"}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    res = run_cli(*_run_args(train, None, out, "--input-field", "sentence", "--label-field", "y"))
    msg = error_line(res, out)
    assert msg.startswith(f"{train}:6: field 'y'"), msg


def test_missing_field_in_test_file(run_cli, files, tmp_path):
    train, _, out = files
    rows = [dict(r) for r in TEST_ROWS]
    del rows[2]["text"]
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{test}:3: field 'text'"), msg


@pytest.mark.parametrize("empty", ["", "  ", None])
def test_empty_label(run_cli, files, tmp_path, empty):
    _, test, out = files
    rows = [dict(r) for r in TRAIN_ROWS]
    rows[3]["label"] = empty
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:4: field 'label'"), msg
    assert "empty" in msg


@pytest.mark.parametrize("empty", ["", " \t "])
def test_empty_input_text(run_cli, files, tmp_path, empty):
    _, test, out = files
    rows = [dict(r) for r in TRAIN_ROWS]
    rows[6]["text"] = empty
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:7: field 'text'"), msg
    assert "empty" in msg


def test_non_text_field(run_cli, files, tmp_path):
    _, test, out = files
    rows = [dict(r) for r in TRAIN_ROWS]
    rows[1]["text"] = {"nested": "x"}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:2: field 'text'"), msg


def test_empty_train_file(run_cli, files, tmp_path):
    _, test, out = files
    train = tmp_path / "empty.jsonl"
    train.write_text("\n\n")
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert str(train) in msg


def test_test_label_unseen_in_train(run_cli, files, tmp_path):
    train, _, out = files
    rows = [dict(r) for r in TEST_ROWS]
    rows[2]["label"] = "neutral"
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{test}:3: field 'label'"), msg
    assert "'neutral'" in msg
    assert "neg" in msg and "pos" in msg  # the known label set


def test_test_label_unseen_outside_limit_test_sample(run_cli, files, tmp_path):
    """--limit-test samples rows to score; a bad row elsewhere in the file is still bad input."""
    train, _, out = files
    rows = [dict(r) for r in TEST_ROWS]
    rows[1]["label"] = "neutral"  # line 2; a sample of 1 row need not include it
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    res = run_cli(*_run_args(train, test, out, "--rungs", "zero-shot", "--limit-test", "1"))
    msg = error_line(res, out)
    assert msg.startswith(f"{test}:2: field 'label'"), msg
    assert "'neutral'" in msg


def test_label_not_in_given_label_set(run_cli, files, tmp_path):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--labels", "pos,negative")), out)
    assert msg.startswith(f"{train}:"), msg
    assert "field 'label'" in msg and "'neg'" in msg and "negative" in msg
    line = int(re.match(re.escape(str(train)) + r":(\d+):", msg).group(1))
    assert TRAIN_ROWS[line - 1]["label"] == "neg"


def test_single_label_in_train(run_cli, tmp_path):
    out = tmp_path / "out"
    rows = [{"text": f"t{i}", "label": "pos"} for i in range(10)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    msg = error_line(run_cli(*_run_args(train, None, out)), out)
    assert str(train) in msg and "'label'" in msg


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in fields})
    return buf.getvalue()


def test_csv_missing_column(run_cli, files, tmp_path):
    _, test, out = files
    train = tmp_path / "train.csv"
    train.write_text(_csv_text(TRAIN_ROWS, ["text"]))
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    # the column is missing from the header (line 1) and so from the first row (line 2)
    assert re.match(re.escape(str(train)) + r":[12]: field 'label'", msg), msg


def test_csv_short_row_line_number(run_cli, files, tmp_path):
    """A quoted field spanning two lines shifts the rows: the CSV line is reported."""
    _, test, out = files
    train = tmp_path / "train.csv"
    lines = _csv_text(TRAIN_ROWS, ["text", "label"]).splitlines()
    lines[1] = '"great movie,\nsecond line",pos'  # row 1 covers lines 2-3
    lines[3] = "only text here"  # physical line 5, no label cell
    train.write_text("\n".join(lines) + "\n")
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert msg.startswith(f"{train}:5: field 'label'"), msg


def test_unsupported_extension(run_cli, files, tmp_path):
    _, test, out = files
    train = tmp_path / "train.txt"
    train.write_text("great movie\tpos\n")
    msg = error_line(run_cli(*_run_args(train, test, out)), out)
    assert str(train) in msg and ".txt" in msg


# --------------------------------------------------------------------------- flags


def test_unknown_rung(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--rungs", "zero-shot,lorax")), out)
    assert "'lorax'" in msg
    assert all(r in msg for r in ("zero-shot", "few-shot", "lora"))
    assert "did you mean 'lora'" in msg


def test_rung_listed_twice(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--rungs", "zero-shot,zero-shot")), out)
    assert "zero-shot" in msg


def test_set_unknown_subkey(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--set", "few-shot.kk=3")), out)
    assert "--set few-shot.kk=3" in msg
    assert "'kk'" in msg
    assert "balanced" in msg and re.search(r"\bk\b", msg.split("known", 1)[1])


def test_set_unknown_top_level_key(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--set", "nosuch=1")), out)
    assert "--set nosuch=1" in msg and "'nosuch'" in msg
    assert "lora" in msg and "few-shot" in msg  # lists the known keys


def test_set_subkey_of_a_value(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--set", "few-shot.k.x=1")), out)
    assert "--set few-shot.k.x=1" in msg and "takes a value" in msg


def test_set_bad_value_type(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--set", "few-shot.k=abc")), out)
    assert "few-shot.k" in msg or "few_shot.k" in msg


def test_set_out_of_range(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--set", "lora.r=0")), out)
    assert "--set lora.r=0" in msg and "lora.r" in msg


def test_set_without_equals(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--set", "few-shot.k")), out)
    assert "--set few-shot.k" in msg and "key=value" in msg


def test_target_unknown_metric(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--target", "f1=0.8")), out)
    assert "'f1'" in msg and "accuracy" in msg and "macro_f1" in msg


def test_target_not_a_number(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--target", "accuracy=abc")), out)
    assert "--target accuracy=abc" in msg and "'abc'" in msg


def test_target_without_equals(run_cli, files):
    train, test, out = files
    msg = error_line(run_cli(*_run_args(train, test, out, "--target", "accuracy")), out)
    assert "--target accuracy" in msg and "METRIC=VALUE" in msg


def test_no_train_file(run_cli, tmp_path):
    out = tmp_path / "out"
    msg = error_line(run_cli("run", "--out", str(out)), out)
    assert "train" in msg


# --------------------------------------------------------------------------- config file


def test_config_unknown_key_line(run_cli, files, tmp_path):
    train, test, out = files
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"data:\n  train: {train}\nfew-shot:\n  kk: 3\n  k: 2\n"
    )
    msg = error_line(run_cli("run", str(cfg), "--out", str(out)), out)
    assert msg.startswith(f"{cfg}:4:"), msg
    assert "kk" in msg


def test_config_bad_value_line(run_cli, files, tmp_path):
    train, test, out = files
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"data:\n  train: {train}\n  test: {test}\nlora:\n  r: 4\n  lr: -1\n")
    msg = error_line(run_cli("run", str(cfg), "--out", str(out)), out)
    assert msg.startswith(f"{cfg}:6:"), msg
    assert "lora.lr" in msg


def test_config_data_error_is_relative_to_config(run_cli, tmp_path):
    """data paths in a config resolve against its folder; the error names the resolved file."""
    out = tmp_path / "out"
    d = tmp_path / "proj"
    d.mkdir()
    rows = [dict(r) for r in TRAIN_ROWS]
    rows[2]["label"] = ""
    write_jsonl(d / "train.jsonl", rows)
    cfg = d / "config.yaml"
    cfg.write_text("data:\n  train: train.jsonl\n")
    msg = error_line(run_cli("run", str(cfg), "--out", str(out)), out)
    assert msg.startswith(f"{d / 'train.jsonl'}:3: field 'label'"), msg


def test_config_invalid_yaml(run_cli, files, tmp_path):
    _, _, out = files
    cfg = tmp_path / "config.yaml"
    cfg.write_text("task:\n  kind: classification\nfew-shot:\n  k: [1, 2\nlora: {}\n")
    msg = error_line(run_cli("run", str(cfg), "--out", str(out)), out)
    assert re.match(re.escape(str(cfg)) + r":\d+: ", msg), msg
    assert "YAML" in msg


def test_config_not_found(run_cli, files, tmp_path):
    _, _, out = files
    cfg = tmp_path / "missing.yaml"
    msg = error_line(run_cli("run", str(cfg), "--out", str(out)), out)
    assert str(cfg) in msg and "not found" in msg


def test_config_default_out_not_created(run_cli, tmp_path):
    """Without --out the run folder defaults to runs/<name> in the CWD: still nothing written."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("few-shot:\n  kk: 3\n")
    msg = error_line(run_cli("run", str(cfg)), None)
    assert msg.startswith(f"{cfg}:2:"), msg
    assert not Path("runs").exists()


# --------------------------------------------------------------------------- model


def test_model_path_not_found(run_cli, files):
    train, test, out = files
    res = run_cli(*_run_args(train, test, out, "--rungs", "zero-shot", "--model", "/nonexistent/dir"))
    msg = error_line(res, out)
    assert "/nonexistent/dir" in msg


def test_model_folder_without_config(run_cli, files, tmp_path):
    train, test, out = files
    empty = tmp_path / "emptymodel"
    empty.mkdir()
    res = run_cli(*_run_args(train, test, out, "--rungs", "zero-shot", "--model", str(empty)))
    msg = error_line(res, out)
    assert str(empty) in msg and "config.json" in msg


def test_hub_id_offline_fails_fast(run_cli, files, monkeypatch):
    import lmladder.models

    monkeypatch.setattr(lmladder.models, "_hub_reachable", lambda *a, **k: False)
    train, test, out = files
    t0 = time.perf_counter()
    res = run_cli(
        *_run_args(train, test, out, "--rungs", "zero-shot", "--model", "nosuch-owner/nosuch-model-xyz")
    )
    elapsed = time.perf_counter() - t0
    msg = error_line(res, out)
    assert "nosuch-owner/nosuch-model-xyz" in msg
    assert "unreachable" in msg or "offline" in msg
    assert elapsed < 10, elapsed


# --------------------------------------------------------------------------- existing run folder


def _snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _bad_input(kind: str, tmp_path: Path, train: Path, test: Path) -> list[str]:
    if kind == "data":
        rows = [{**r, "label": "neutral"} for r in TEST_ROWS]  # whatever --limit-test samples
        return ["--test", str(write_jsonl(tmp_path / "bad-test.jsonl", rows))]
    if kind == "missing-file":
        return ["--test", str(tmp_path / "gone.jsonl")]
    if kind == "rung":
        return ["--rungs", "zero-shot,lorax"]
    if kind == "set":
        return ["--set", "few-shot.k=abc"]
    if kind == "model":
        return ["--model", "/nonexistent/dir"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["data", "missing-file", "rung", "set", "model"])
def test_bad_input_leaves_existing_folder_untouched(run_cli, files, tmp_path, kind):
    train, test, out = files
    out.mkdir()
    (out / "marker.txt").write_text("keep me\n")
    (out / "rungs" / "zero-shot").mkdir(parents=True)
    (out / "rungs" / "zero-shot" / "result.json").write_text('{"fingerprint": "x"}\n')
    before = _snapshot(out)
    args = ["run", "--train", str(train), "--test", str(test), "--out", str(out), "--rungs", "zero-shot"]
    args += _bad_input(kind, tmp_path, train, test)
    error_line(run_cli(*args), None)
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["marker.txt", "rungs"]


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory):
    """A real, successful one-rung run (zero-shot on 4 test rows)."""
    from lmladder.cli import main

    base = tmp_path_factory.mktemp("finished")
    train = write_jsonl(base / "train.jsonl", TRAIN_ROWS)
    test = write_jsonl(base / "test.jsonl", TEST_ROWS)
    out = base / "out"
    code = main(
        ["run", "--train", str(train), "--test", str(test), "--out", str(out), "--rungs", "zero-shot",
         "--limit-test", "4", "--model", str(tiny_dir), "-q"]
    )
    assert code == 0
    assert (out / "config.yaml").is_file() and (out / "rungs" / "zero-shot" / "result.json").is_file()
    return train, test, out


@pytest.mark.parametrize("kind", ["data", "missing-file", "rung", "set", "model"])
def test_bad_rerun_keeps_finished_run(run_cli, finished_run, tmp_path, kind):
    train, test, src = finished_run
    out = tmp_path / "out"
    shutil.copytree(src, out)  # copy2 keeps mtimes; each case gets its own copy
    before = _snapshot(out)
    assert "config.yaml" in before and "results.json" in before
    args = ["run", "--train", str(train), "--test", str(test), "--out", str(out),
            "--rungs", "zero-shot", "--limit-test", "4"]
    args += _bad_input(kind, tmp_path, train, test)
    error_line(run_cli(*args), None)
    assert _snapshot(out) == before


# --------------------------------------------------------------------------- report


def test_report_without_config(run_cli, tmp_path):
    d = tmp_path / "notarun"
    d.mkdir()
    (d / "something.txt").write_text("x")
    msg = error_line(run_cli("report", str(d)), None)
    assert str(d) in msg and "config.yaml" in msg
    assert sorted(p.name for p in d.iterdir()) == ["something.txt"]  # nothing written


def test_report_missing_folder(run_cli, tmp_path):
    d = tmp_path / "nowhere"
    msg = error_line(run_cli("report", str(d)), d)
    assert str(d) in msg
