"""Text metrics of the batch evaluation: exact match, BLEU-4 and ROUGE-1/2/L, under a named convention.

`chatglm`: the convention of ChatGLM's AdGen script (ptuning/main.py) and LLaMA-Factory's
eval_bleu_rouge.py, which the Chinese tutorials' users compare against: per example, BLEU-4 of the
characters (nltk's sentence_bleu, smoothing method3) and ROUGE-1/2/L F of jieba words with
punctuation kept (rouge_chinese), each averaged over the examples.

`sacrebleu`: corpus BLEU-4 with sacrebleu's "zh" tokenizer (each CJK character a token, the rest as
the standard 13a tokenizer), and rouge-score's mean F of ROUGE-1/2/L on words (jieba words for CJK
text), lower-cased, punctuation dropped.

`auto` picks chatglm when most references are Chinese, sacrebleu otherwise. Scores are on a 0-100
scale, exact match a share (0-1). BLEU-4 is None ("n/a") when no reference has four tokens (there is
no 4-gram to match, and a 0 would read as a failure), ROUGE-2 when none has two words.
"""

from __future__ import annotations

import re
import sys
import warnings

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
ROUGE_NAMES = ("rouge1", "rouge2", "rougeL")


def resolve_convention(setting: str, references: list[str]) -> tuple[str, str]:
    """(convention, why) for eval.metrics_convention = setting."""
    if setting != "auto":
        return setting, "set in the recipe"
    chinese = sum(bool(CJK.search(r)) for r in references)
    if 2 * chinese >= max(len(references), 1) and chinese:
        return "chatglm", f"auto: {chinese} of {len(references)} references are Chinese"
    return "sacrebleu", f"auto: {len(references) - chinese} of {len(references)} references are not Chinese"


def text_scores(predictions: list[str], references: list[str], convention: str) -> dict[str, float | None]:
    scores = chatglm_scores if convention == "chatglm" else sacrebleu_scores
    return {"exact_match": exact_match(predictions, references)} | scores(predictions, references)


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(predictions), 1)


def bleu_tokens(reference: str, convention: str) -> list[str]:
    """The tokens BLEU counts in a text under a convention (characters for chatglm)."""
    if convention == "chatglm":
        return list(reference)
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh()(reference).split()


def has_four_grams(references: list[str], convention: str) -> bool:
    return any(len(bleu_tokens(r, convention)) >= 4 for r in references)


def unmeasurable(references: list[str], convention: str, rouge_words) -> dict[str, None]:
    """The metrics no answer can score on these references: BLEU-4 without a reference of four
    tokens, ROUGE-2 without one of two words."""
    missing = {} if has_four_grams(references, convention) else {"bleu4": None}
    return missing | ({} if any(len(rouge_words(r)) >= 2 for r in references) else {"rouge2": None})


# ---------------------------------------------------------------- chatglm


def chatglm_scores(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    """Per-example BLEU-4 (characters, method3 smoothing) and ROUGE F (jieba words, punctuation
    kept), averaged over the examples, 0-100."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method3
    totals = dict.fromkeys(("bleu4",) + ROUGE_NAMES, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns of every zero n-gram count; the smoothing handles it
        for prediction, reference in zip(predictions, references):
            totals["bleu4"] += 100 * sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)
            for name, value in chinese_rouge(prediction, reference).items():
                totals[name] += 100 * value
    count = max(len(predictions), 1)
    means = {name: total / count for name, total in totals.items()}
    return means | unmeasurable(references, "chatglm", lambda r: [w for w in jieba_words(r) if w.strip()])


def chinese_rouge(prediction: str, reference: str) -> dict[str, float]:
    """rouge_chinese's ROUGE-1/2/L F of the jieba words (0 when either side has none)."""
    from rouge_chinese import Rouge

    hypothesis, target = " ".join(jieba_words(prediction)), " ".join(jieba_words(reference))
    if not hypothesis.split() or not target.split():
        return dict.fromkeys(ROUGE_NAMES, 0.0)
    depth = 4 * (len(hypothesis) + len(target)) + 1000  # its longest-common-subsequence walk recurses per token
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, depth))
    try:
        score = Rouge().get_scores(hypothesis, target)[0]
    finally:
        sys.setrecursionlimit(limit)
    return {"rouge1": score["rouge-1"]["f"], "rouge2": score["rouge-2"]["f"], "rougeL": score["rouge-l"]["f"]}


def jieba_words(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(60)  # its dictionary-loading chatter is not ours to print
    return jieba.lcut(text)


# ---------------------------------------------------------------- sacrebleu


class WordTokenizer:
    """rouge-score's tokenizer interface: jieba words for CJK text, lower-cased words otherwise."""

    def tokenize(self, text: str) -> list[str]:
        if CJK.search(text):
            return [word.lower() for word in jieba_words(text) if word.strip() and not _punctuation(word)]
        return re.findall(r"\w+", text.lower())


def _punctuation(word: str) -> bool:
    return all(not ch.isalnum() for ch in word)


def sacrebleu_scores(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    scores = {"bleu4": bleu4(predictions, references)} | rouge(predictions, references)
    return scores | unmeasurable(references, "sacrebleu", WordTokenizer().tokenize)


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 on a 0-100 scale."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L over examples, on a 0-100 scale."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_NAMES), tokenizer=WordTokenizer())
    totals = dict.fromkeys(ROUGE_NAMES, 0.0)
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    count = max(len(predictions), 1)
    return {name: 100 * total / count for name, total in totals.items()}
