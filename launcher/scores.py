"""Text metrics of the batch evaluation: BLEU-4, ROUGE-1/2/L and exact match, Chinese-aware.

BLEU-4 is sacrebleu's corpus BLEU with its "zh" tokenizer (each CJK character a token, the rest
as the standard 13a tokenizer). ROUGE segments CJK text into words with jieba, as the
ChatGLM/AdGen evaluations do, and lower-cases the rest; rouge-score then counts n-grams.
"""

from __future__ import annotations

import re

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class WordTokenizer:
    """rouge-score's tokenizer interface: jieba words for CJK text, lower-cased words otherwise."""

    def tokenize(self, text: str) -> list[str]:
        if CJK.search(text):
            import jieba

            jieba.setLogLevel(60)  # its dictionary-loading chatter is not ours to print
            return [word.lower() for word in jieba.lcut(text) if word.strip() and not _punctuation(word)]
        return re.findall(r"\w+", text.lower())


def _punctuation(word: str) -> bool:
    return all(not ch.isalnum() for ch in word)


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 on a 0-100 scale."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L over examples, on a 0-100 scale."""
    from rouge_score import rouge_scorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), tokenizer=WordTokenizer())
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    count = max(len(predictions), 1)
    return {name: 100 * total / count for name, total in totals.items()}


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(predictions), 1)


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {
        "exact_match": exact_match(predictions, references),
        "bleu4": bleu4(predictions, references),
        **rouge(predictions, references),
    }
