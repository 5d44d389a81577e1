"""Scores of a task's outputs, one function per task kind, each a thin layer over a maintained
library (sacrebleu, rouge-score, scikit-learn) so the numbers are the ones papers report.

    from clusterlm.eval.scorers import score_choice, score_classify, score_generate, score_task
    score_generate(["The cat sat on the mat."], [["The cat sat on the mat.", "A cat was on the mat."]])
    score_classify(["positive", "negative"], ["positive", "positive"], labels=["negative", "positive"])
    score_choice([[(-3.2, 2, 7), (-4.0, 3, 12)]], gold=[1])  # per choice: (sum logprob, tokens, chars)
    score_task(task, outputs)                                # dispatch on task.kind

Scales: `generate` metrics are 0-100 (as sacrebleu and the SQuAD script report them; ROUGE is
rouge-score's F-measure x 100); `classify` and `choice` metrics are fractions 0-1 (as scikit-learn
and lm-evaluation-harness report them). Every result is a dict of JSON-serialisable values with the
stable keys listed in docs/tasks.md. Torch-free.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

from clusterlm.eval.tasks import INVALID, Task

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")  # rougeL: sentence-level LCS (not rougeLsum)

ChoiceScore = tuple[float, int, int]  # (sum of the choice's token logprobs, its tokens, its characters)


# ----------------------------------------------------------------------------------------------
# SQuAD exact match and token F1. Transcribed from the SQuAD v1.1 official evaluation script
# (evaluate-v1.1.py, Rajpurkar et al. 2016, https://rajpurkar.github.io/SQuAD-explorer/):
# normalize_answer, exact_match_score, f1_score, metric_max_over_ground_truths. As in v1.1, F1 is 0
# when prediction and reference share no token, even if both normalise to nothing.


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# generate


def _references(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a string or a non-empty list of strings, got {refs!r:.80}")
        out.append(refs)
    return out


def _check_lengths(what: str, a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {what} for {len(b)} examples: one each is needed")
    if not a:
        raise ValueError("nothing to score: 0 examples")


def score_generate(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """BLEU and chrF (sacrebleu, corpus-level, default settings: BLEU's 13a tokenizer on detokenized
    text, chrF with character order 6 and beta 2), ROUGE-1/2/L F-measure (rouge-score with the Porter
    stemmer; per example the best reference, then averaged), SQuAD exact match and token F1 (per
    example the best reference, then averaged). Examples may have different numbers of references."""
    from rouge_score import rouge_scorer  # here: with nltk it takes seconds to import, choice tasks need neither
    from sacrebleu.metrics import BLEU, CHRF

    refs = _references(references)
    _check_lengths("predictions", predictions, refs)
    # sacrebleu takes reference *streams* (stream j = every example's j-th reference); an example with
    # fewer references pads with None, which sacrebleu skips (variable references per segment).
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(max(map(len, refs)))]
    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(list(predictions), streams)
    chrf = chrf_metric.corpus_score(list(predictions), streams)
    # RougeScorer.score_multi keeps, per ROUGE type, the reference with the highest F-measure.
    rouge = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_rouge = {t: [] for t in ROUGE_TYPES}
    em, f1 = [], []
    for pred, rs in zip(predictions, refs):
        best = rouge.score_multi(rs, pred)
        for t in ROUGE_TYPES:
            per_rouge[t].append(best[t].fmeasure)
        em.append(max(exact_match_score(pred, r) for r in rs))
        f1.append(max(f1_score(pred, r) for r in rs))
    return {
        "n": len(refs),
        "bleu": float(bleu.score),
        "bleu_precisions": [float(p) for p in bleu.precisions],  # 1- to 4-gram precisions, 0-100
        "bleu_brevity_penalty": float(bleu.bp),
        "bleu_sys_len": int(bleu.sys_len),
        "bleu_ref_len": int(bleu.ref_len),
        "bleu_signature": str(bleu_metric.get_signature()),
        "chrf": float(chrf.score),
        "chrf_signature": str(chrf_metric.get_signature()),
        **{t: 100.0 * float(np.mean(v)) for t, v in per_rouge.items()},
        "exact_match": 100.0 * float(np.mean(em)),
        "f1": 100.0 * float(np.mean(f1)),
    }


# ----------------------------------------------------------------------------------------------
# classify


def score_classify(predictions: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/F1 and the confusion matrix (scikit-learn,
    zero_division=0). Predictions are compared after stripping surrounding whitespace; one outside the
    label set is wrong: it counts against accuracy and its gold class's recall, is counted in
    `n_invalid`, and gets an INVALID column in the confusion matrix (present only when n_invalid > 0).
    Confusion matrix rows are gold labels, columns predicted labels, both in label-set order."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    _check_lengths("predictions", predictions, gold)
    labels = list(labels)
    if INVALID in labels:
        raise ValueError(f"the label set may not contain {INVALID!r}: it marks predictions outside the set")
    unknown = sorted({g for g in gold if g not in labels})
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the label set {labels}")
    preds = [p if p in labels else INVALID for p in (str(p).strip() for p in predictions)]
    n_invalid = preds.count(INVALID)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, preds, labels=labels, average=None, zero_division=0)
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        gold, preds, labels=labels, average="macro", zero_division=0)
    cm_labels = labels + [INVALID] if n_invalid else labels
    with warnings.catch_warnings():  # a one-label set gives a 1x1 matrix, which sklearn takes for a forgotten
        # labels= ("use the 'labels' parameter"): passed here, so the advice would only mislead
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        matrix = confusion_matrix(gold, preds, labels=cm_labels)
    return {
        "n": len(preds),
        "n_invalid": n_invalid,
        "accuracy": float(accuracy_score(gold, preds)),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "per_class": {lab: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                            "support": int(support[i])} for i, lab in enumerate(labels)},
        "confusion_matrix": {"labels": cm_labels, "matrix": matrix.tolist()},
    }


# ----------------------------------------------------------------------------------------------
# choice


def choice_predictions(scores: Sequence[ChoiceScore]) -> tuple[int, int]:
    """(raw, length-normalised) predicted choice index of one example, as lm-evaluation-harness
    (v0.4, lm_eval/api/task.py, ConfigurableTask.process_results, output type multiple_choice):
    pred = argmax(lls), pred_norm = argmax(lls / completion_len) where completion_len is each
    choice's length in characters (`float(len(choice))`, the choice without the space that joins it
    to the context). np.argmax: the first index wins a tie."""
    if len(scores) < 2:
        raise ValueError(f"a choice example needs scores for at least 2 choices, got {len(scores)}")
    lls = np.array([float(s[0]) for s in scores])
    chars = np.array([float(s[2]) for s in scores])
    if (chars <= 0).any():
        raise ValueError(f"every choice needs a length in characters >= 1, got {chars.tolist()}")
    return int(np.argmax(lls)), int(np.argmax(lls / chars))


def score_choice(loglikelihoods: Sequence[Sequence[ChoiceScore]], gold: Sequence[int]) -> dict:
    """`acc` (argmax of each choice's summed log-likelihood) and `acc_norm` (argmax of the sum divided
    by the choice's length in characters), averaged over examples, as lm-evaluation-harness's
    multiple_choice tasks. `loglikelihoods[i][j]` = (sum logprob, tokens, characters) of choice j of
    example i; the token count is accepted for the caller's bookkeeping, not used (lm-eval's acc_norm
    normalises by characters)."""
    _check_lengths("score lists", loglikelihoods, gold)
    acc, acc_norm = [], []
    for i, (scores, g) in enumerate(zip(loglikelihoods, gold)):
        if not 0 <= g < len(scores):
            raise ValueError(f"example {i}: gold={g} is out of range for {len(scores)} choices")
        pred, pred_norm = choice_predictions(scores)
        acc.append(pred == g)
        acc_norm.append(pred_norm == g)
    return {"n": len(acc), "acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


# ----------------------------------------------------------------------------------------------


def score_task(task: Task, outputs: Sequence) -> dict:
    """Score a task's outputs, one per example in order: generated strings (generate), predicted
    labels (classify), or per-choice (sum logprob, tokens, characters) lists (choice)."""
    ex = task.examples
    if task.kind == "generate":
        return score_generate(outputs, [e.references for e in ex])
    if task.kind == "classify":
        return score_classify(outputs, [e.label for e in ex], task.labels)
    _check_lengths("score lists", outputs, ex)
    for i, (scores, e) in enumerate(zip(outputs, ex)):
        if len(scores) != len(e.choices):
            raise ValueError(f"example {i} (line {e.line}) has {len(e.choices)} choices but {len(scores)} scores")
    return score_choice(outputs, [e.gold for e in ex])
