"""Task scorers (clusterlm/eval/scorers.py) against the reference libraries called directly, and pinned.

    .venv/bin/python -m pytest -q tests/unit/test_scorers.py

Each metric is checked three ways: equal to sacrebleu / rouge-score / scikit-learn called directly on
the same outputs; equal to numbers pinned once on the fixtures (so a library upgrade or a change here
that moves a score fails loudly); and, where small enough, equal to a value worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn import metrics as skm

from clusterlm.eval.scorers import (INVALID, choice_predictions, exact_match_score, f1_score, normalize_answer,
                                    score_choice, score_classify, score_generate, score_task)
from clusterlm.eval.tasks import load_task

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


@pytest.fixture(scope="module")
def gen() -> dict:
    with open(FIXTURES / "generate_outputs.json", encoding="utf-8") as f:
        return json.load(f)


# Pinned on generate_outputs.json with sacrebleu 2.6.0, rouge-score 0.1.2 (computed once, then frozen).
PINNED_GENERATE = {
    "n": 6,
    "bleu": 41.09089991601486,
    "bleu_precisions": [80.55555555555556, 61.29032258064516, 42.30769230769231, 19.047619047619047],
    "bleu_brevity_penalty": 0.9200444146293233,
    # 13a tokens of the predictions: 8 + 6 + 8 + 4 + 0 + 10 = 36; closest reference lengths:
    # 7 + 6 ("Today it rains in Paris ." beats 7 for a 6-token hypothesis) + 9 + 3 + 4 + 10 = 39.
    "bleu_sys_len": 36,
    "bleu_ref_len": 39,
    "chrf": 71.76604118038465,
    "rouge1": 76.52421652421651,
    "rouge2": 65.66142191142191,
    "rougeL": 75.00906500906503,
    "exact_match": 100 / 6,  # only "paris, France." == "Paris, France" after SQuAD normalisation
    "f1": 71.5007215007215,
}


def test_generate_equals_the_libraries_called_directly(gen):
    """BLEU/chrF == sacrebleu.corpus_bleu/corpus_chrf (None-padded reference streams), ROUGE == mean over
    examples of the best-F reference from rouge_scorer.RougeScorer(use_stemmer=True), x 100."""
    preds, refs = gen["predictions"], gen["references"]
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(2)]
    got = score_generate(preds, refs)
    bleu = sacrebleu.corpus_bleu(preds, streams)
    assert got["bleu"] == pytest.approx(bleu.score, abs=1e-12)
    assert got["bleu_precisions"] == pytest.approx(bleu.precisions, abs=1e-12)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score, abs=1e-12)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for t in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, p)[t].fmeasure for r in rs) for p, rs in zip(preds, refs)]
        assert got[t] == pytest.approx(100 * np.mean(best), abs=1e-12)


def test_generate_pinned(gen):
    """A metric that silently changes (library upgrade, a changed default, an edit here) fails this."""
    got = score_generate(gen["predictions"], gen["references"])
    for key, want in PINNED_GENERATE.items():
        assert got[key] == pytest.approx(want, abs=1e-9), key
    assert got["bleu_signature"].startswith("nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert got["chrf_signature"].startswith("nrefs:var|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert set(got) == set(PINNED_GENERATE) | {"bleu_signature", "chrf_signature"}
    json.dumps(got)  # JSON-serialisable as it is


def test_generate_perfect_and_hand_computed():
    """Outputs equal to the references give BLEU = chrF = ROUGE = EM = F1 = 100. ROUGE by hand:
    'the cat sat' vs 'the cat sat on the mat': 3 of 3 unigrams match, 3 of 6 recalled -> F 2/3;
    2 of 2 bigrams match, 2 of 5 recalled -> F = 2*1*0.4/1.4 = 4/7; the LCS is 3 words -> 2/3."""
    refs = ["The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with one step."]
    perfect = score_generate(refs, refs)
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "f1"):
        assert perfect[key] == pytest.approx(100.0), key
    assert perfect["bleu_brevity_penalty"] == 1.0
    hand = score_generate(["the cat sat"], ["the cat sat on the mat"])
    assert hand["rouge1"] == pytest.approx(100 * 2 / 3)
    assert hand["rouge2"] == pytest.approx(100 * 4 / 7)
    assert hand["rougeL"] == pytest.approx(100 * 2 / 3)


def test_variable_references_equal_duplicated_references():
    """An example with fewer references (None-padded stream) scores as if its reference were repeated:
    a duplicate reference changes neither clipped n-gram counts nor the closest reference length."""
    preds = ["the cat is on the mat today", "he read the book in one long night"]
    ragged = [["the cat sat on the mat today", "a cat is on the mat today"], ["he read the book in one night"]]
    padded = [ragged[0], ragged[1] * 2]
    a, b = score_generate(preds, ragged), score_generate(preds, padded)
    assert a["bleu"] == pytest.approx(b["bleu"], abs=1e-12) and a["bleu"] > 0
    assert a["chrf"] == pytest.approx(b["chrf"], abs=1e-12)
    assert a["bleu_signature"].startswith("nrefs:var") and b["bleu_signature"].startswith("nrefs:2")


def test_squad_exact_match_and_f1():
    """SQuAD v1.1 normalisation (lowercase, no punctuation, no a/an/the, single spaces); by hand:
    'in Paris France' vs 'Paris': P = 1/3, R = 1 -> F1 = 0.5; the best reference counts."""
    assert normalize_answer("  The Eiffel   Tower!  ") == "eiffel tower"
    assert normalize_answer("An apple, a pear.") == "apple pear"
    assert exact_match_score("the Eiffel tower!", "Eiffel Tower") == 1.0
    assert f1_score("in Paris France", "Paris") == pytest.approx(0.5)
    assert f1_score("nothing", "Paris") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalise to nothing: 0 in v1.1 (v2.0 would say 1)
    got = score_generate(["in Paris France", "blue"], [["Paris", "Paris France"], "Blue."])
    assert got["exact_match"] == pytest.approx(50.0)  # 0 for the first, 1 for the second
    assert got["f1"] == pytest.approx(100 * (0.8 + 1.0) / 2)  # 'Paris France': P 2/3, R 1 -> 0.8


CLS_LABELS = ["negative", "neutral", "positive"]
CLS_GOLD = ["positive", "neutral", "neutral", "negative", "negative", "positive"]
CLS_PRED = ["positive", "negative", "neutral", "positive", "negative", "positive"]


def test_classify_equals_sklearn_and_hand():
    """accuracy/P/R/F1/confusion matrix == sklearn.metrics called directly; and by hand: rows are gold,
    columns predicted: negative [1 0 1], neutral [1 1 0], positive [0 0 2]; precision negative 1/2,
    neutral 1/1, positive 2/3; recall 1/2, 1/2, 1; accuracy 4/6."""
    got = score_classify(CLS_PRED, CLS_GOLD, CLS_LABELS)
    assert got["accuracy"] == skm.accuracy_score(CLS_GOLD, CLS_PRED) == pytest.approx(4 / 6)
    p, r, f, s = skm.precision_recall_fscore_support(CLS_GOLD, CLS_PRED, labels=CLS_LABELS, zero_division=0)
    mp, mr, mf, _ = skm.precision_recall_fscore_support(CLS_GOLD, CLS_PRED, labels=CLS_LABELS, average="macro",
                                                        zero_division=0)
    assert (got["macro_precision"], got["macro_recall"], got["macro_f1"]) == (mp, mr, mf)
    for i, lab in enumerate(CLS_LABELS):
        assert got["per_class"][lab] == {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
    matrix = [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert skm.confusion_matrix(CLS_GOLD, CLS_PRED, labels=CLS_LABELS).tolist() == matrix
    assert got["confusion_matrix"] == {"labels": CLS_LABELS, "matrix": matrix}
    # hand / pinned
    assert [got["per_class"][x]["precision"] for x in CLS_LABELS] == pytest.approx([1 / 2, 1, 2 / 3])
    assert [got["per_class"][x]["recall"] for x in CLS_LABELS] == pytest.approx([1 / 2, 1 / 2, 1])
    assert [got["per_class"][x]["f1"] for x in CLS_LABELS] == pytest.approx([1 / 2, 2 / 3, 4 / 5])
    assert got["macro_precision"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert got["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)
    assert got["n"] == 6 and got["n_invalid"] == 0
    json.dumps(got)


def test_classify_prediction_outside_the_label_set():
    """A prediction outside the label set is wrong, counted, and lands in the INVALID column; a class
    never predicted gets precision 0 (zero_division=0), not a warning or NaN."""
    got = score_classify([" positive\n", "maybe", "positive"], ["positive", "negative", "negative"],
                         ["negative", "positive"])
    assert got["n_invalid"] == 1 and got["accuracy"] == pytest.approx(1 / 3)
    assert got["confusion_matrix"] == {"labels": ["negative", "positive", INVALID],
                                       "matrix": [[0, 1, 1], [0, 1, 0], [0, 0, 0]]}
    assert got["per_class"]["negative"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert got["per_class"]["positive"]["precision"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not in the label set"):
        score_classify(["a"], ["c"], ["a", "b"])
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        score_classify(["a", "b"], ["a"], ["a", "b"])


def test_classify_one_label_set_without_sklearn_advice(recwarn):
    """A one-label set gives a 1x1 confusion matrix; sklearn's warning for it ("use the 'labels'
    parameter") is advice for a caller that forgot labels=, which this one passes: not shown."""
    got = score_classify(["pos", " pos"], ["pos", "pos"], ["pos"])
    assert (got["accuracy"], got["macro_f1"], got["confusion_matrix"]["matrix"]) == (1.0, 1.0, [[2]])
    assert not [w for w in recwarn if "single label" in str(w.message)]
    got = score_classify(["neg"], ["pos"], ["pos"])  # one label and an invalid prediction: 2x2
    assert got["confusion_matrix"] == {"labels": ["pos", INVALID], "matrix": [[0, 1], [0, 0]]}


def test_choice_acc_and_acc_norm_by_hand():
    """lm-evaluation-harness's acc (argmax of summed logprob) and acc_norm (argmax of sum / characters),
    worked by hand on three examples where they disagree:
      1. chars 20, 7, 8; lls -10, -6, -9  -> raw picks 1 (wrong); per char -0.5, -0.857, -1.125 -> 0 (right)
      2. chars 10, 6;    lls -5, -4       -> raw picks 1 (wrong); per char -0.5, -0.667 -> 0 (right)
      3. chars 3, 14;    lls -3, -4.2     -> raw picks 0 (right); per char -1.0, -0.3 -> 1 (wrong)
    acc = 1/3, acc_norm = 2/3."""
    lls = [[(-10.0, 4, 20), (-6.0, 2, 7), (-9.0, 2, 8)], [(-5.0, 3, 10), (-4.0, 1, 6)], [(-3.0, 1, 3), (-4.2, 3, 14)]]
    assert [choice_predictions(x) for x in lls] == [(1, 0), (1, 0), (0, 1)]
    assert score_choice(lls, [0, 0, 0]) == {"n": 3, "acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}
    assert choice_predictions([(-1.0, 1, 2), (-1.0, 1, 2)]) == (0, 0)  # a tie goes to the first (np.argmax)
    with pytest.raises(ValueError, match="out of range"):
        score_choice(lls, [0, 2, 0])


def test_score_task_dispatches_on_kind():
    """score_task over loaded fixture tasks == the per-kind scorer on the same outputs; the choice task
    uses each choice's len() in characters, as lm-eval's completion_len."""
    cloze = load_task(FIXTURES / "cloze.jsonl")
    lls = [[(-10.0 if i == 0 else -6.0, 2, len(c)) for i, c in enumerate(e.choices)] for e in cloze.examples]
    # ex 1: chars 20, 7, 8 -> raw picks 1, norm picks 0; ex 2: chars 10, 6 -> raw picks 1, norm 0 (gold 0, 0)
    assert score_task(cloze, lls) == {"n": 2, "acc": 0.0, "acc_norm": 1.0}
    with pytest.raises(ValueError, match="has 3 choices but 2 scores"):
        score_task(cloze, [lls[0][:2], lls[1]])
    senti = load_task(FIXTURES / "sentiment.jsonl")
    preds = ["positive", "neutral", "positive", "positive"]
    assert score_task(senti, preds) == score_classify(preds, [e.label for e in senti.examples], senti.labels)
    qa = load_task(FIXTURES / "qa.jsonl")
    outs = ["Paris", "Blue", "Rome."]
    got = score_task(qa, outs)
    assert got["exact_match"] == 100.0 and got == score_generate(outs, [e.references for e in qa.examples])


def test_choice_scoring_does_not_import_the_generate_and_classify_metric_libraries():
    """rouge-score (with nltk) and scikit-learn take seconds to import: a choice task, evaluated during
    training every `eval.every` steps, scores without them."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from clusterlm.eval.scorers import score_choice\n"
            "score_choice([[(-1.0, 2, 5), (-2.0, 2, 5)]], [0])\n"
            "print(sorted(m for m in ('rouge_score', 'nltk', 'sklearn') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
