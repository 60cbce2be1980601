"""The rules of a measurement, torch-free: how an answer is read, which option a score picks,
accuracy per relation, consistency (swapped objects, mirrored image, circular over option
orders), What'sUp's pair/set accuracy, VSR's ROC-AUC, and the one-line reports.

eval_coco.py produces the answers (generated text, option log-probabilities) and hands them here;
compare_runs.py reads the reports. Nothing here needs a model.

Readings of a generated answer (each returns (prediction, status), status one of "ok",
"several" (named more than one option), "unparseable" (named none the reading accepts)):

- `strict` (ours): after at most two leading phrases of LEADING_PHRASES ("The answer is", "To the",
  "At the", "In the", "On the", "It is", "The", ...), the answer's first word is option X ("in
  front" reads as front), and no later word names another option; trailing words are allowed.
- `substring` (AdaptVis, github.com/shiqichen17/AdaptVis, model_zoo/llava15.py): right when the gold
  word appears anywhere in the lowercased answer (not as a whole word), except "on" when the answer
  mentions "front".
- `original` (linear-mech-vlms, COCO-Spatial): the first option, in the benchmark's own option
  order, found as a whole word, else an option the answer starts with.
"""
import math
import re
from collections import defaultdict

import benchmarks

# Phrases a model may put before the option word; the strict reading drops at most two of them
# from the front ("The answer is: to the left" -> "left"). One table, also in docs/evaluation.md.
LEADING_PHRASES = ("the answer is", "answer is", "answer", "it is", "it's", "they are", "to the", "at the", "in the",
                   "on the", "towards the", "the", "to", "at", "in", "on")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CASED_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
# lmms-eval's reading of a lettered answer (cv_bench, blink, embspatial utils): a letter at the
# start, bracketed or not ("B", "(B)", "B. left").
_HARNESS_LETTER = re.compile(r"[\(\s]*([A-Z])[\)\.\s]*")


def lettered(options):
    """Whether the options are multiple-choice letters (the hub's sets): read as written, so that
    "a" or "A chair" is not the letter A."""
    return bool(options) and all(len(o) == 1 and o.isupper() for o in options)


def _words(text, keep_case=False):
    return _CASED_WORD.findall(text) if keep_case else _WORD.findall(text.lower())


def read_original(text, options):
    """The original's reading (linear-mech-vlms): the first option, in `options`' order, found as a
    whole word, else an option the answer starts with. Callers pass the benchmark's own option
    order (never a rotated one), so the reading does not depend on how options were listed."""
    text = text.strip().lower()
    for option in options:
        if re.search(rf"\b{re.escape(option)}\b", text):
            return option, "ok"
    for option in options:
        if text.startswith(option):
            return option, "ok"
    return "", "unparseable"


def _first_option(words, options):
    """(option, rest) when `words` start with an option ("in front" counts as front), else None."""
    if words[:2] == ["in", "front"] and "front" in options:
        return "front", words[2:]
    if words and words[0] in options:
        return words[0], words[1:]
    return None


def _names_another(rest, option, options):
    rest = [w for w in rest if w != "of"]
    return any(w in options and w != option for w in rest)


def read_strict(text, options):
    """The answer states exactly one option: its first word, after up to two leading phrases of
    LEADING_PHRASES, is an option, and no later word names another one. The answer is read as it
    stands first ("On the table" is on in a set with on), then with leading phrases dropped ("On
    the left" is left). Letters (`lettered`) are read as written: "B", "(B)", "The answer is B"
    are B; "b" is not."""
    candidates = [_words(text, keep_case=lettered(options))]
    for _ in range(2):
        stripped = []
        for words in candidates[-1:]:
            for phrase in LEADING_PHRASES:
                p = phrase.split()
                if [w.lower() for w in words[:len(p)]] == p and len(words) > len(p):
                    stripped.append(words[len(p):])
                    break
        if not stripped:
            break
        candidates += stripped
    several = False
    for words in candidates:
        found = _first_option(words, options)
        if found is None:
            continue
        option, rest = found
        if not _names_another(rest, option, options):
            return option, "ok"
        several = True
    return "", "several" if several else "unparseable"


def read_substring(text, options, gold):
    """AdaptVis's rule: right when the gold word is a substring of the lowercased answer ("on" not
    when the answer says "front"); a wrong answer's prediction is the first option found the same
    way, else "" (unparseable). Letters (`lettered`): the harness's rule for them, lmms-eval's
    letter at the start of the answer."""
    if lettered(options):
        found = _HARNESS_LETTER.match(text)
        return (found[1], "ok") if found and found[1] in options else ("", "unparseable")
    low = text.lower()

    def found(option):
        return option in low and not (option == "on" and "front" in low)

    if found(gold):
        return gold, "ok"
    for option in options:
        if found(option):
            return option, "ok"
    return "", "unparseable"


READINGS = ("strict", "substring", "original")


def read(reading, text, options, gold):
    """(prediction, status) of `text` under the named reading."""
    if reading == "strict":
        return read_strict(text, options)
    if reading == "substring":
        return read_substring(text, options, gold)
    if reading == "original":
        return read_original(text, options)
    raise ValueError(f"reading must be one of {', '.join(READINGS)}, not {reading!r}")


def best_option(options, scores):
    """The option of highest score (the first of equal ones)."""
    return options[max(range(len(scores)), key=scores.__getitem__)]


def logsumexp(values):
    """log(sum(exp(v))) of a list of floats, stable (-inf for an empty list)."""
    values = [v for v in values if v != -math.inf]
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# ---------------------------------------------------------------------------------------------
# Accuracy and its checks
# ---------------------------------------------------------------------------------------------

def accuracy_report(samples, predictions):
    """Accuracy overall and per relation (a sample's `relation`, else its gold answer), with counts."""
    per = defaultdict(lambda: [0, 0])
    for s, p in zip(samples, predictions):
        relation = s.get("relation") or s["answer"]
        per[relation][0] += int(p == s["answer"])
        per[relation][1] += 1
    correct = sum(c for c, _ in per.values())
    n = sum(t for _, t in per.values())
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "n": n,
        "per_relation": {rel: {"accuracy": c / t, "correct": c, "n": t}
                         for rel, (c, t) in sorted(per.items())},
    }


def report_from_rows(samples, rows):
    """The report of eval_coco.evaluate from its samples and prediction rows (in the same order):
    accuracy overall and per relation, which rows were evaluated, and, where rows hold generated
    text, the strict and substring readings side by side. Rows gathered from several processes
    give the same report."""
    report = accuracy_report(samples, [r["prediction"] for r in rows])
    if samples and samples[0].get("selection"):
        report["selection"] = samples[0]["selection"]
    if rows and rows[0].get("generated") is not None:
        report["readings"] = readings_report(samples, [r["generated"] for r in rows])
    return report


def readings_report(questions, texts):
    """{reading: {"accuracy", "unparseable", "several"}} of generated `texts` (one per question)
    under the strict and substring readings, side by side."""
    out = {}
    for reading in ("strict", "substring"):
        got = [read(reading, t, q["options"], q["answer"]) for q, t in zip(questions, texts)]
        n = len(got) or float("nan")
        out[reading] = {"accuracy": sum(p == q["answer"] for (p, _), q in zip(got, questions)) / n,
                        "unparseable": sum(s == "unparseable" for _, s in got) / n,
                        "several": sum(s == "several" for _, s in got) / n}
    return out


def roc_auc(labels, margins):
    """ROC-AUC of `margins` against boolean `labels` (the probability that a random positive
    outranks a random negative, ties counted half); NaN when only one class is present."""
    pos = [m for m, y in zip(margins, labels) if y]
    neg = [m for m, y in zip(margins, labels) if not y]
    if not pos or not neg:
        return float("nan")
    ranked = sorted(margins)
    # average rank of each value (1-based), ties sharing the mean of their ranks
    rank_of, i = {}, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j] == ranked[i]:
            j += 1
        rank_of[ranked[i]] = (i + j + 1) / 2
        i = j
    pos_ranks = sum(rank_of[m] for m in pos)
    return (pos_ranks - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


vsr_auc = roc_auc  # VSR's ROC-AUC of log P(true) - log P(false)


def controlled_pair_set_accuracy(samples, correct):
    """What'sUp's pair and set accuracy of a controlled set: a pair (left/right, or on/under resp.
    front/behind, of one object pair) counts when both of its questions are right, a set when all
    four are; over the pairs and sets present."""
    by_key = defaultdict(dict)
    for s, ok in zip(samples, correct):
        by_key[s["pair_key"]][s["relation"]] = ok
    opposites = [("left", "right"), tuple(samples[0]["options"][2:4])] if samples else []
    pairs = [all(d[r] for r in pair) for d in by_key.values() for pair in opposites if all(r in d for r in pair)]
    sets = [all(d.values()) for d in by_key.values() if len(d) == 4]
    return {"pair_accuracy": sum(pairs) / len(pairs) if pairs else float("nan"), "pairs": len(pairs),
            "set_accuracy": sum(sets) / len(sets) if sets else float("nan"), "sets": len(sets)}


def twin_consistency(base_rows, twins, expected):
    """Consistency of a derived question with the one asked: `twins` {row: row of the twin},
    `expected(prediction, row)` what the twin's answer must be for the two answers to say the same
    thing (`row`: the question's row number)."""
    pairs = [(r, twins[r["row"]]) for r in base_rows if r["row"] in twins]
    if not pairs:
        return None
    n = len(pairs)
    return {"n_pairs": n,
            "accuracy_asked": sum(a["correct"] for a, _ in pairs) / n,
            "accuracy_twin": sum(b["correct"] for _, b in pairs) / n,
            "consistent": sum(bool(a["prediction"]) and b["prediction"] == expected(a["prediction"], a["row"])
                              for a, b in pairs) / n,
            "both_correct": sum(a["correct"] and b["correct"] for a, b in pairs) / n}


def circular_report(rows):
    """Accuracy under each rotation of the options (as asked), its spread, and circular accuracy:
    a question counts only when every rotation of it is answered right (MMBench's CircularEval).
    None with one rotation."""
    asked = [r for r in rows if r["order"] == "asked"]
    rotations = sorted({r["rotation"] for r in asked})
    if len(rotations) < 2:
        return None
    accuracies, every = {}, defaultdict(list)
    for k in rotations:
        got = [r["correct"] for r in asked if r["rotation"] == k]
        accuracies[k] = sum(got) / len(got)
    for r in asked:
        every[r["row"]].append(r["correct"])
    return {"accuracy_by_rotation": accuracies, "spread": max(accuracies.values()) - min(accuracies.values()),
            "circular_accuracy": sum(all(v) for v in every.values()) / len(every), "n_questions": len(every)}


def benchmark_report(questions, rows):
    """The report of eval_coco.evaluate_benchmark from the questions asked and their prediction
    rows (any order, matched by position): accuracy overall and per relation on the questions as
    asked, both readings' accuracy and unparseable share (generate mode), the swapped and mirrored
    twins' consistency, accuracy per option order with its spread and circular accuracy, What'sUp's
    pair and set accuracy (controlled sets), VSR's ROC-AUC, and how the rows were chosen."""
    base = [(q, r) for q, r in zip(questions, rows) if r["order"] == "asked" and r["rotation"] == 0]
    samples, base_rows = [q for q, _ in base], [r for _, r in base]
    report = accuracy_report(samples, [r["prediction"] for r in base_rows])
    name = samples[0]["benchmark"] if samples else None
    report["benchmark"] = name
    report["released_rows"] = benchmarks.BENCHMARKS[name].released_rows if name in benchmarks.BENCHMARKS else None
    if samples and "selection" in samples[0]:
        report["selection"] = samples[0]["selection"]
    if base_rows and base_rows[0].get("generated") is not None:
        report["readings"] = readings_report(samples, [r["generated"] for r in base_rows])
    if base_rows and "parse" in base_rows[0]:
        report["unparseable"] = sum(r["parse"] == "unparseable" for r in base_rows) / len(base_rows)
        report["several_options"] = sum(r["parse"] == "several" for r in base_rows) / len(base_rows)
    # A multiple-choice question's letters under a mirror: its twin's `mirror_map` (empty: the same letter)
    letter_maps = {q["row"]: q["mirror_map"] for q in questions if q["order"] == "mirrored" and "mirror_map" in q}
    for order, key, expected in (("swapped", "consistency", lambda p, row: benchmarks.OPPOSITE[p]),
                                 ("mirrored", "mirror_consistency",
                                  lambda p, row: letter_maps[row].get(p, p) if row in letter_maps
                                  else benchmarks.MIRRORED.get(p, p))):
        twins = {r["row"]: r for r in rows if r["order"] == order and r["rotation"] == 0}
        found = twin_consistency(base_rows, twins, expected)
        if found:
            report[key] = found
    circular = circular_report(rows)
    if circular:
        report["option_order"] = circular
    if samples and samples[0]["kind"] == "controlled":
        report |= controlled_pair_set_accuracy(samples, [r["correct"] for r in base_rows])
    if base_rows and "margin_true_false" in base_rows[0]:
        report["auc"] = roc_auc([s["answer"] == "true" for s in samples], [r["margin_true_false"] for r in base_rows])
    return report


# ---------------------------------------------------------------------------------------------
# Reports as text
# ---------------------------------------------------------------------------------------------

def selection_note(selection):
    """"N of M rows, sampled (seed S)", "all M rows", or "" without a record."""
    if not selection:
        return ""
    if selection.get("sampled"):
        return f"{selection['n']} of {selection['of']:,} rows, sampled (seed {selection['seed']})"
    return f"all {selection['of']:,} rows"


def format_report(report, name="COCO-Spatial"):
    parts = [f"{rel} {r['correct']}/{r['n']}" for rel, r in report["per_relation"].items()]
    line = f"{name}: accuracy {report['accuracy']:.4f} ({report['correct']}/{report['n']}); " + ", ".join(parts)
    if "agreement_with_generate" in report:
        line += (f"; score vs generate agreement {report['agreement_with_generate']:.4f}"
                 f" (generate accuracy {report['generate_accuracy']:.4f})")
    if report.get("selection"):
        line += f"; {selection_note(report['selection'])}"
    if "readings" in report:
        line += "; " + ", ".join(f"{name} reading {r['accuracy']:.4f} (unparseable {r['unparseable']:.3f})"
                                 for name, r in report["readings"].items())
    return line


def format_benchmark_report(report):
    """One line: format_report's, then the checks that ran."""
    line = format_report(report, report["benchmark"])
    extra = []
    if report.get("released_rows") and not report.get("selection") and report["n"] != report["released_rows"]:
        extra.append(f"{report['n']} of the {report['released_rows']:,} released rows")
    if "unparseable" in report:
        extra.append(f"unparseable {report['unparseable']:.3f}, several options {report['several_options']:.3f}")
    for key, label in (("consistency", "swapped objects"), ("mirror_consistency", "mirrored image")):
        if key in report:
            c = report[key]
            extra.append(f"{label}: accuracy {c['accuracy_asked']:.4f} as asked, {c['accuracy_twin']:.4f} "
                         f"{label.split()[0]}, consistent {c['consistent']:.4f} of {c['n_pairs']} pairs")
    if "option_order" in report:
        o = report["option_order"]
        extra.append("option order: accuracy " + "/".join(f"{a:.4f}" for a in o["accuracy_by_rotation"].values())
                     + f", spread {o['spread']:.4f}, circular {o['circular_accuracy']:.4f}")
    if "pair_accuracy" in report:
        extra.append(f"pair accuracy {report['pair_accuracy']:.4f}, set accuracy {report['set_accuracy']:.4f}")
    if "auc" in report:
        extra.append(f"ROC-AUC {report['auc']:.4f}")
    return line + "".join(f"; {e}" for e in extra)
