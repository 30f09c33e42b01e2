import subprocess
import sys

from transformers import AutoTokenizer

from geobind.encoders.tokenizer import train_tokenizer

TEXTS = [f"A quiet {w} near {c}, {k}." for w in ("pine forest", "desert", "harbour", "rice field")
         for c in ("Oslo", "Lima", "Pune") for k in ("Norway", "Peru", "India")]

SCRIPT = """
import json, sys
from geobind.encoders.tokenizer import train_tokenizer
texts = json.loads(sys.argv[1])
print(json.dumps(sorted(train_tokenizer(texts, vocab_size=60).get_vocab().items())))
"""


def test_same_captions_give_the_same_vocabulary_in_any_process():
    import json

    runs = [subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TEXTS)], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and len(json.loads(runs[0])) == 60


def test_round_trip_and_unseen_words(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=200, out_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    ids = loaded("a quiet desert near Pretoria")["input_ids"]
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    assert loaded.unk_token_id not in ids  # an unseen word falls back to character pieces
