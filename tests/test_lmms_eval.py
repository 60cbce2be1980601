"""compare_runs --lmms_eval: paired tests per task on two lmms-eval --log_samples folders, written
here in lmms-eval's own layout (OUTPUT_PATH/MODEL/<date id>_samples_<task>.jsonl, one logged
sample a line: doc_id, doc, target, arguments, resps, filtered_resps, doc_hash, then the task's
metrics). The tier that runs lmms-eval itself is `make test-lmms` (tests_lmms/)."""
import json

import pytest

import compare_runs


def write_samples(folder, task, correct, metric="cv_bench_acc", date="20260101_120000", hashes=None):
    path = folder / "model__final" / f"{date}_samples_{task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, ok in enumerate(correct):
            value = {"id": i, "is_correct": ok} if metric.endswith("_acc") else (
                {"question_id": i, "score": float(ok)} if metric == "pope_accuracy" else {"submission": "B"})
            f.write(json.dumps({"doc_id": i, "doc": {"idx": i}, "target": "(A)", "arguments": [["q", {}]],
                                "resps": [["A"]], "filtered_resps": ["A"],
                                "doc_hash": (hashes or {}).get(i, f"h{i}"), "input": "q", metric: value}) + "\n")
    return path


@pytest.mark.fast
def test_paired_tests_per_task_from_logged_samples(tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    before = [True] * 6 + [False] * 4
    after = [True] * 4 + [False] * 2 + [True] * 4  # 2 lost, 4 gained
    write_samples(base, "cv_bench", before)
    write_samples(tuned, "cv_bench", after)
    write_samples(base, "pope", [True, False, True], metric="pope_accuracy")
    write_samples(tuned, "pope", [True, True, True], metric="pope_accuracy")
    write_samples(tuned, "pope", [False, False, False], metric="pope_accuracy", date="20250101_000000")  # older
    write_samples(base, "mmbench_en_dev", [True, True], metric="gpt_eval_score")  # judge-scored: no right/wrong
    write_samples(tuned, "mmbench_en_dev", [True, True], metric="gpt_eval_score")
    result = compare_runs.main(["--lmms_eval", str(base), str(tuned), "--labels", "baseline", "spatial"])
    printed = capsys.readouterr().out
    s = compare_runs.paired_stats(before, after)
    assert (s["b"], s["c"], s["n"]) == (2, 4, 10)
    assert result["rows"][0] == ["cv_bench", "spatial vs baseline", *compare_runs.stat_cells(s)]
    assert result["rows"][1][:5] == ["pope", "spatial vs baseline", 3, "0.667", "1.000"]  # the newest file
    assert result["left_out"] == ["mmbench_en_dev"]
    assert "not compared (1): mmbench_en_dev" in printed and "| cv_bench | spatial vs baseline | 10 |" in printed


@pytest.mark.fast
def test_different_questions_are_one_line(tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    write_samples(base, "blink_spatial_relation", [True, False, True])
    write_samples(tuned, "blink_spatial_relation", [True, False])
    with pytest.raises(SystemExit, match=r"blink_spatial_relation: 3 and 2 logged questions, not the same ones"):
        compare_runs.main(["--lmms_eval", str(base), str(tuned)])
    write_samples(tuned, "blink_spatial_relation", [True, False, True], hashes={1: "other"})
    with pytest.raises(SystemExit, match=r"question 1 differs between the two \(doc_hash\)"):
        compare_runs.main(["--lmms_eval", str(base), str(tuned)])
    with pytest.raises(SystemExit, match=r"no lmms-eval samples"):
        compare_runs.main(["--lmms_eval", str(base), str(tmp_path / "empty")])
