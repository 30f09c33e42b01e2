"""Build a small word-piece tokenizer from captions, saved in ``transformers`` format.

Used where a pretrained CLIP tokenizer cannot be loaded (offline demo, tests). The result loads
with ``AutoTokenizer.from_pretrained(dir)`` like any other tokenizer.

The vocabulary is chosen here rather than by ``tokenizers``' trainer, whose tie-breaking follows
hash-map order and differs between processes: every character (as a word start and as a ``##``
continuation, so unseen words still tokenize) and then the most frequent words, ties broken
alphabetically. Same captions, same vocabulary, in any process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A lower-cased word-piece tokenizer over ``texts`` that wraps every text in bos/eos (as
    CLIP's does); at most ``vocab_size`` tokens, deterministic."""
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIAL.values()) + chars + ["##" + c for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=SPECIAL["unk"]))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    bos, eos = SPECIAL["bos"], SPECIAL["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        bos_token=bos,
        eos_token=eos,
        model_max_length=77,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
