"""Train a small word-piece tokenizer on captions, saved in ``transformers`` format.

Used where a pretrained CLIP tokenizer cannot be loaded (offline demo, tests). The result loads
with ``AutoTokenizer.from_pretrained(dir)`` like any other tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a lower-cased WordPiece tokenizer that wraps every text in bos/eos (as CLIP's does)."""
    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL.values()), min_frequency=1, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
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
