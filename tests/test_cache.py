import time

import numpy as np
import torch
from PIL import Image
from test_model import build_space

from geobind.binding.cache import cached_embeddings, embed_table
from geobind.data.manifest import read_dataset


def test_cache_is_reused_and_invalidated(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    model = build_space(tiny_data)
    ground = model.encoder("ground")
    table = read_dataset(data / "stage1.csv")
    cache = tmp_path / "cache"

    e1, v1, info1 = cached_embeddings(ground, table, "ground", cache)
    assert not info1["hit"] and v1.all()
    ref, _, _ = embed_table(ground, table, "ground")
    assert torch.equal(e1, ref)
    e2, v2, info2 = cached_embeddings(ground, table, "ground", cache)
    assert info2["hit"] and info2["path"] == info1["path"] and torch.equal(e1, e2)

    # A changed image file gives a new key.
    time.sleep(0.01)
    p = table.columns["ground"][0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)
    e3, _, info3 = cached_embeddings(ground, read_dataset(data / "stage1.csv"), "ground", cache)
    assert not info3["hit"] and not torch.equal(e3[0], e1[0]) and torch.equal(e3[1:], e1[1:])

    # A changed anchor gives a new key.
    with torch.no_grad():
        ground.clip.visual_projection.weight.add_(0.01)
    _, _, info4 = cached_embeddings(ground, read_dataset(data / "stage1.csv"), "ground", cache)
    assert not info4["hit"] and info4["path"] != info3["path"]

    # A changed manifest gives a new key.
    df_text = (data / "stage1.csv").read_text().splitlines()
    (data / "stage1.csv").write_text("\n".join(df_text[:-1]) + "\n")
    _, _, info5 = cached_embeddings(ground, read_dataset(data / "stage1.csv"), "ground", cache)
    assert not info5["hit"]
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_bad_rows_are_marked_invalid_and_counted(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    table = read_dataset(data / "stage1.csv")
    (data / "ground" / "0001.png").write_bytes(b"")
    (data / "ground" / "0002.png").write_bytes(b"not a png at all")
    (data / "ground" / "0003.png").unlink()
    model = build_space(tiny_data)
    emb, valid, info = cached_embeddings(model.encoder("ground"), table, "ground", tmp_path / "c")
    assert valid.tolist()[:5] == [True, False, False, False, True]
    assert info["bad"] == {"empty": 1, "undecodable": 1, "missing": 1}
    assert torch.all(emb[1:4] == 0)
