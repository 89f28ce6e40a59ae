"""The E2E NLG challenge's five metrics, computed as its official script does
(github.com/tuetschek/e2e-metrics, ``measure_scores.py``), so scores sit beside published tables.

* BLEU (4-gram, case-insensitive) and NIST (5-gram): corpus level, on mteval-v13a's basic
  tokenization, as the script's pure-Python mode computes them. Written here (small and exact);
  the script is not a package.
* METEOR 1.5, ROUGE-L and CIDEr: the ``pycocoevalcap`` package, i.e. the very jars and code the
  script runs, on the Stanford PTB tokenizer's lower-cased tokens with punctuation removed. The
  tokenizer and METEOR are Java programs: without ``java`` these three are *unavailable* (reported
  as ``None`` with the reason), never replaced by an approximation.

Scale as in the papers (Li & Liang's Table 1): BLEU, METEOR and ROUGE-L x100; NIST and CIDEr as is.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence

NAMES = ("bleu", "nist", "meteor", "rouge_l", "cider")
JAVA_METRICS = ("meteor", "rouge_l", "cider")  # need the PTB tokenizer (Java); METEOR is Java itself
BLEU_ORDER, NIST_ORDER = 4, 5
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # brevity penalty 0.5 at 2/3 of the reference length


# --------------------------------------------------------------------------- mteval-v13a tokenization
_SGML = {"&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">"}
_PUNCTUATION = re.compile(r"([{-~\[-` -&(-+:-@/])")  # every ASCII symbol but . , ' - stands alone


def mteval_tokens(text: str) -> list[str]:
    """mteval-v13a's language-independent + Western tokenization, lower-cased (BLEU/NIST ignore case)."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _SGML.items():
        text = text.replace(entity, char)
    text = _PUNCTUATION.sub(r" \1 ", f" {text} ")
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)  # period/comma split unless after a digit ...
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)  # ... or before one (keeps 3.5 and 1,000)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # a dash after a digit
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _clipped_hits(hypothesis: list[str], references: list[list[str]], n: int) -> Counter[tuple[str, ...]]:
    """Hypothesis n-grams, each counted at most as often as in the reference that has it most."""
    most = Counter()
    for reference in references:
        most |= _ngrams(reference, n)  # | keeps the max count
    return _ngrams(hypothesis, n) & most  # & keeps the min


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (x100): clipped n-gram precisions pooled over the corpus, geometric mean, and a
    brevity penalty against each segment's reference closest in length (shorter on ties)."""
    hits, totals, hypothesis_length, reference_length = [0] * BLEU_ORDER, [0] * BLEU_ORDER, 0, 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        hyp, ref_tokens = mteval_tokens(hypothesis), [mteval_tokens(r) for r in refs]
        for n in range(1, BLEU_ORDER + 1):
            hits[n - 1] += sum(_clipped_hits(hyp, ref_tokens, n).values())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
        hypothesis_length += len(hyp)
        reference_length += len(min(ref_tokens, key=lambda r: (abs(len(r) - len(hyp)), len(r))))
    # the script's floors keep log() defined when some order has no hit (BLEU is then ~0)
    log_precision = sum(math.log(max(h, 1e-15) / max(t, 1e-9)) for h, t in zip(hits, totals, strict=True))
    penalty = 1.0
    if hypothesis_length <= reference_length:
        penalty = math.exp(1 - reference_length / (hypothesis_length or 1e-5))
    return 100 * penalty * math.exp(log_precision / BLEU_ORDER)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus NIST-5: matched n-grams weighted by their information in the whole reference corpus,
    ``log2(count(w1..w{n-1}) / count(w1..wn))``, per order divided by the hypothesis n-gram count,
    summed over orders, times a length penalty against the mean reference length per segment."""
    segments = [
        (mteval_tokens(h), [mteval_tokens(r) for r in refs]) for h, refs in zip(hypotheses, references, strict=True)
    ]
    counts: Counter[tuple[str, ...]] = Counter()  # every reference n-gram, n = 0..5 (() = all words)
    for _, refs in segments:
        for reference in refs:
            counts[()] += len(reference)
            for n in range(1, NIST_ORDER + 1):
                counts.update(_ngrams(reference, n))

    def information(ngram: tuple[str, ...]) -> float:
        return math.log2(counts[ngram[:-1]] / counts[ngram]) if counts[ngram] else 0.0

    score = 0.0
    for n in range(1, NIST_ORDER + 1):
        total = sum(max(len(hyp) - n + 1, 0) for hyp, _ in segments)
        matched = sum(
            information(ngram) * hits for hyp, refs in segments for ngram, hits in _clipped_hits(hyp, refs, n).items()
        )
        score += matched / total if total else 0.0
    ratio = sum(len(hyp) for hyp, _ in segments) / sum(sum(map(len, refs)) / len(refs) for _, refs in segments)
    if ratio < 1:
        score *= math.exp(-NIST_BETA * math.log(ratio) ** 2) if ratio > 0 else 0.0
    return score


# --------------------------------------------------------------------------- the COCO (Java) metrics
def java_missing_reason() -> str | None:
    """Why METEOR/ROUGE-L/CIDEr cannot be computed here, or None if they can."""
    if shutil.which("java") is None:
        return "needs Java (the PTB tokenizer and METEOR 1.5 are jars): install a JRE, e.g. default-jre-headless"
    return None


def coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR, ROUGE-L and CIDEr exactly as the script gets them through pycocoevalcap."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    # one "image" per segment, as the script's MS-COCO conversion does
    refs = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(references)})
    hyps = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(refs, hyps)
    except (ValueError, OSError) as error:  # the jar died (e.g. no memory for its -Xmx2G): no score, or a broken pipe
        meteor.meteor_p.kill()
        problem = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-500:]
        raise OSError(f"METEOR 1.5 (java) failed: {problem or error}") from error
    finally:
        meteor.meteor_p.kill()  # its __del__ may not run soon; do not leave a JVM behind
    return {
        "meteor": 100 * float(meteor_score),
        "rouge_l": 100 * float(Rouge().compute_score(refs, hyps)[0]),
        "cider": float(Cider().compute_score(refs, hyps)[0]),
    }


def e2e_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, float | None], dict[str, str]]:
    """All five official scores (None where unavailable) and, per unavailable metric, the reason."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty or not hypotheses:
        raise ValueError(f"every hypothesis needs at least one reference (none for items {empty[:5]})")
    # the script reads one line per output: line breaks inside an output would shift every later one
    hypotheses = [" ".join(h.split()) for h in hypotheses]
    references = [[" ".join(r.split()) for r in refs] for refs in references]
    scores: dict[str, float | None] = {"bleu": bleu(hypotheses, references), "nist": nist(hypotheses, references)}
    reason = java_missing_reason()
    if reason:
        scores.update(dict.fromkeys(JAVA_METRICS))
        return scores, dict.fromkeys(JAVA_METRICS, reason)
    scores.update(coco_scores(hypotheses, references))
    return scores, {}
