"""Task metrics, computed with sacreBLEU and rouge-score (no hub-fetched metric code)."""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer


def _bleu_chrf(preds: Sequence[str], refs: Sequence[str]) -> dict:
    bleu = sacrebleu.BLEU()
    chrf = sacrebleu.CHRF()
    bleu_score = bleu.corpus_score(list(preds), [list(refs)])
    chrf_score = chrf.corpus_score(list(preds), [list(refs)])
    return {"bleu": round(bleu_score.score, 2), "chrf": round(chrf_score.score, 2),
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def _rouge(preds: Sequence[str], refs: Sequence[str], kinds=("rouge1", "rouge2", "rougeL")) -> dict:
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for pred, ref in zip(preds, refs, strict=True):
        scores = scorer.score(ref, pred)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    n = max(len(preds), 1)
    return {kind: round(100 * total / n, 2) for kind, total in totals.items()}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Share of unique n-grams among all n-grams (Li et al., 2016), over whitespace tokens."""
    grams = [tuple(toks[i:i + n]) for toks in (t.split() for t in texts) for i in range(len(toks) - n + 1)]
    return round(100 * len(set(grams)) / len(grams), 2) if grams else 0.0


def translation_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict:
    return _bleu_chrf(preds, refs)


def summarization_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict:
    return _rouge(preds, refs)


def dialogue_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict:
    scores = {"bleu": _bleu_chrf(preds, refs)["bleu"], **_rouge(preds, refs, kinds=("rougeL",))}
    scores.update({
        "distinct1": distinct_n(preds, 1), "distinct2": distinct_n(preds, 2),
        "ref_distinct2": distinct_n(refs, 2),
        "mean_len": round(sum(len(p.split()) for p in preds) / max(len(preds), 1), 2),
        "ref_mean_len": round(sum(len(r.split()) for r in refs) / max(len(refs), 1), 2),
    })
    return scores
