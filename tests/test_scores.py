"""The metric conventions: chatglm's numbers are the ones ChatGLM's AdGen script and LLaMA-Factory
print for the same pairs, sacrebleu's are sacrebleu's corpus BLEU, and BLEU-4 that cannot count
(no reference of four tokens) reads n/a with the reason in the report."""

from __future__ import annotations

import jieba
import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from launcher.evaluate.report import metric_notes, table_rows
from launcher.evaluate.scores import bleu4, resolve_convention, rouge, text_scores
from launcher.rundir.evaldir import EvalResults

# AdGen-style pairs (advertising copy from product tags): punctuation, shared phrases, a rewrite.
PREDICTIONS = [
    "这件连衣裙采用雪纺面料，轻盈透气，穿着舒适。",
    "宽松的版型，遮肉显瘦，适合各种身材。",
    "简约的设计，百搭又时尚！",
    "牛仔裤的直筒版型修饰腿型，显得腿更长。",
    "这款衬衫是白色的。",
    "",
]
REFERENCES = [
    "这款连衣裙选用雪纺面料，轻盈透气，带来舒适的穿着体验。",
    "宽松的版型，很好地遮肉显瘦，适合各种身材的女性。",
    "设计简约大方，百搭时尚，轻松穿出个性。",
    "直筒的版型修饰腿型，让双腿看起来更加修长笔直。",
    "白色的衬衫清新干净，搭配牛仔裤很有学院风。",
    "蕾丝花边增添了几分甜美气息。",
]


def adgen_reference_numbers(predictions, references) -> dict[str, float]:
    """The numbers of ChatGLM's ptuning/main.py compute_metrics (and LLaMA-Factory's
    eval_bleu_rouge.py), written out here from their published procedure: jieba words joined by
    spaces into rouge_chinese, characters into nltk's sentence_bleu with method3, rounded to 4
    places per example, then averaged."""
    columns = {"rouge1": [], "rouge2": [], "rougeL": [], "bleu4": []}
    for pred, label in zip(predictions, references):
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        for ours, theirs in (("rouge1", "rouge-1"), ("rouge2", "rouge-2"), ("rougeL", "rouge-l")):
            columns[ours].append(round(result[theirs]["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        columns["bleu4"].append(round(bleu * 100, 4))
    return {name: sum(values) / len(values) for name, values in columns.items()}


def test_the_chatglm_convention_gives_the_adgen_scripts_numbers():
    expected = adgen_reference_numbers(PREDICTIONS, REFERENCES)
    ours = text_scores(PREDICTIONS, REFERENCES, "chatglm")
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=0.01), name
    assert 20 < ours["rouge1"] < 80 and 5 < ours["bleu4"] < 60  # pairs that neither match nor miss entirely
    assert ours["exact_match"] == 0.0


def test_the_two_conventions_differ_on_chinese_as_the_issue_measured():
    """Punctuation kept makes ROUGE higher under chatglm; sacrebleu's corpus BLEU is not a mean."""
    chatglm, corpus = text_scores(PREDICTIONS, REFERENCES, "chatglm"), text_scores(PREDICTIONS, REFERENCES, "sacrebleu")
    assert chatglm["rouge1"] > corpus["rouge1"] + 2
    assert corpus["bleu4"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES], tokenize="zh").score)
    assert abs(chatglm["bleu4"] - corpus["bleu4"]) > 0.5


def test_a_long_answer_scores_without_recursion_error():
    """rouge_chinese walks its longest common subsequence recursively: a 3,000-character answer
    passes Python's default recursion limit (1,000), which LLaMA-Factory users hit."""
    long = "这件衣服的版型很宽松，" * 180  # 1,080 jieba words
    assert text_scores([long], [long], "chatglm")["rougeL"] == pytest.approx(100.0, abs=1e-4)


def test_auto_picks_chatglm_for_chinese_references_and_sacrebleu_otherwise():
    assert resolve_convention("auto", REFERENCES)[0] == "chatglm"
    assert resolve_convention("auto", ["Paris", "blue", "这是中文"]) == ("sacrebleu", "auto: 2 of 3 references are not Chinese")
    assert resolve_convention("chatglm", ["Paris"]) == ("chatglm", "set in the recipe")


def test_one_word_answers_read_bleu_na_with_the_reason():
    """The quickstart's case: one-word answers have no 4-grams, so BLEU-4 is n/a (not a 0 that
    looks like a bug), and the report says why and what to read instead."""
    predictions, references = ["Paris", "blue", "four"], ["Paris", "blue", "five"]
    chinese = (["北京", "蓝色", "四"], ["北京", "蓝色", "五"])  # chatglm counts characters: "Paris" has five
    for convention, (guesses, answers) in (("sacrebleu", (predictions, references)), ("chatglm", chinese)):
        scores = text_scores(guesses, answers, convention)
        assert scores["bleu4"] is None and scores["rouge2"] is None and scores["exact_match"] == pytest.approx(2 / 3)
        assert scores["rouge1"] == pytest.approx(200 / 3, abs=1e-4)
    assert text_scores(predictions, references, "chatglm")["bleu4"] > 0  # characters: 4-grams in "Paris"
    assert text_scores(["Paris is"], ["Paris is"], "sacrebleu")["rouge2"] == pytest.approx(100.0)
    result = EvalResults(
        examples=3,
        data="held-out split",
        shards=1,
        metrics_convention={"name": "sacrebleu", "why": "auto: 3 of 3 references are not Chinese"},
        systems={"adapter": text_scores(predictions, references, "sacrebleu") | {"loss": 0.5}},
        speed={"adapter": {"generated_tokens": 6, "shard_seconds": 1.0, "backend": "hf"}},
    )
    header, row = table_rows(result)
    assert dict(zip(header, row))["bleu4"] == "n/a" and dict(zip(header, row))["exact_match"] == "0.6667"
    notes = " ".join(metric_notes(result))
    assert "metrics convention sacrebleu (auto: 3 of 3 references are not Chinese)" in notes
    assert "BLEU-4 n/a: no reference has 4 tokens" in notes and "ROUGE-2 n/a: no reference has 2 words" in notes
    assert "exact match: share of answers" in notes


def test_sacrebleu_convention_segments_chinese():
    # jieba words: prediction 这件/衣服/很/宽松, reference 这件/衣服/的/版型/很/宽松 -> P 4/4, R 4/6.
    assert rouge(["这件衣服很宽松"], ["这件衣服的版型很宽松"])["rouge1"] == pytest.approx(80.0)
    # Unspaced Chinese scores per character (one whole-sentence token would give 0).
    partial = bleu4(["这件衣服的版型很宽松啊"], ["这件衣服的版型很宽松"])
    assert 0 < partial < 100 and bleu4(["这件衣服的版型很宽松"], ["这件衣服的版型很宽松"]) == pytest.approx(100.0)
