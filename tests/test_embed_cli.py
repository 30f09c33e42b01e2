"""``geobind embed``: Parquet output equal to direct embedding, float16, resuming after an
interruption, per-rank parts, bad and empty datasets, no overwrite, and --help everywhere."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from space_helpers import saved_space

from geobind import GeoBind
from geobind.cli import main
from geobind.data.manifest import read_dataset
from geobind.search import embed as embed_mod
from geobind.search import embed_dataset, read_embeddings


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory):
    return saved_space(tiny_data, tmp_path_factory.mktemp("embed"))


@pytest.fixture(scope="module")
def model(model_dir):
    return GeoBind.from_pretrained(model_dir)


def test_embed_cli_writes_ids_coordinates_and_unit_embeddings(
    model, model_dir, tiny_data, tmp_path, capsys
):
    out = tmp_path / "sat.parquet"
    rc = main(
        [
            "embed",
            "--model",
            str(model_dir),
            "--data",
            str(tiny_data["test"]),
            "--modality",
            "satellite",
            "--out",
            str(out),
            "--chunk-rows",
            "5",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "embedded 12 of 12 rows" in capsys.readouterr().out
    emb = read_embeddings(out)
    table = read_dataset(tiny_data["test"])
    assert (
        emb.ids == table.ids and np.allclose(emb.lat, table.lat) and np.allclose(emb.lon, table.lon)
    )
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (12, 32)
    direct = model.embed("satellite", table.columns["satellite"])
    np.testing.assert_allclose(emb.vectors, direct.numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(emb.vectors, axis=1), 1, atol=1e-5)
    assert emb.header["model"]["identity"] == model.identity("satellite")
    assert emb.modality == "satellite" and emb.dim == 32
    assert emb.captions == table.columns["text"]  # captions come along for the explorer
    assert emb.items == table.columns["satellite"]
    assert all(t[:2] == b"\xff\xd8" for t in emb.thumbnails)
    assert not (tmp_path / "sat.parquet.parts").exists()


def test_float16_and_text_modality(model, tiny_data, tmp_path):
    embed_dataset(model, tiny_data["test"], "text", tmp_path / "t.parquet", float16=True, log=None)
    emb = read_embeddings(tmp_path / "t.parquet")
    assert emb.vectors.dtype == np.float16 and emb.thumbnails is None
    direct = model.embed("text", read_dataset(tiny_data["test"]).columns["text"]).numpy()
    np.testing.assert_allclose(emb.vectors.astype(np.float32), direct, atol=2e-3)
    assert pq.read_schema(tmp_path / "t.parquet").field("embedding").type.value_type == "halffloat"


def test_the_dataset_is_recorded_by_its_absolute_path(model, tiny_data, tmp_path, monkeypatch):
    """So the explorer finds the places' recordings from any working folder."""
    monkeypatch.chdir(tiny_data["test"].parent)
    embed_dataset(model, tiny_data["test"].name, "text", tmp_path / "t.parquet", log=None)
    assert read_embeddings(tmp_path / "t.parquet").header["dataset"]["source"] == str(tiny_data["test"].resolve())


def test_texts_the_vocabulary_does_not_know_are_counted_and_named(model, tiny_data, tmp_path):
    import pandas as pd

    df = pd.read_csv(tiny_data["test"], dtype={"id": str}, keep_default_na=False)
    df.loc[[1, 4], "text"] = ["森林", "Москва"]
    df.to_csv(tmp_path / "m.csv", index=False)
    said = []
    summary = embed_dataset(model, tmp_path / "m.csv", "text", tmp_path / "t.parquet", log=said.append)
    assert summary["unknown_words"] == 2
    assert any(f"2 texts have no word the model's vocabulary knows (ids {df.id[1]}, {df.id[4]})" in s
               for s in said), said
    said.clear()
    assert "unknown_words" not in embed_dataset(model, tiny_data["test"], "text", tmp_path / "u.parquet",
                                                log=said.append)
    assert not any("vocabulary knows" in s for s in said), said


def test_resume_after_interruption_embeds_only_missing_chunks(
    model, tiny_data, tmp_path, monkeypatch
):
    out = tmp_path / "sat.parquet"
    real_write, real_chunks = embed_mod._write_part, embed_mod._embed_chunks
    written = []

    def flaky(table, path):
        written.append(path.name)
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third chunk is written
        real_write(table, path)

    monkeypatch.setattr(embed_mod, "_write_part", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(model, tiny_data["test"], "satellite", out, chunk_rows=3, log=None)
    parts = tmp_path / "sat.parquet.parts"
    assert sorted(p.name for p in parts.glob("chunk-*")) == [
        "chunk-0000000.parquet",
        "chunk-0000001.parquet",
    ]
    assert not out.exists() and not list(parts.glob("*.tmp"))
    asked = []

    def spy(encoder, data, modality, chunks, *args, **kw):
        asked.extend(chunks)
        return real_chunks(encoder, data, modality, chunks, *args, **kw)

    monkeypatch.setattr(embed_mod, "_write_part", real_write)
    monkeypatch.setattr(embed_mod, "_embed_chunks", spy)
    said = []
    embed_dataset(model, tiny_data["test"], "satellite", out, chunk_rows=3, log=said.append)
    assert asked == [(2, 6, 9), (3, 9, 12)]  # only the chunks that were not done
    assert "resuming: 2 of 4 chunks" in said[0]
    monkeypatch.setattr(embed_mod, "_embed_chunks", real_chunks)
    embed_dataset(
        model, tiny_data["test"], "satellite", tmp_path / "ref.parquet", chunk_rows=3, log=None
    )
    a, b = read_embeddings(out), read_embeddings(tmp_path / "ref.parquet")
    assert a.ids == b.ids and np.array_equal(a.vectors, b.vectors)


def test_a_part_interrupted_while_written_is_not_taken_as_done(model, tiny_data, tmp_path, monkeypatch):
    """Parts are written under a temporary name and renamed: a Ctrl-C after the Parquet writer
    has put some bytes on disk for chunk 2 leaves no chunk-2 part (which a resume would take as
    embedded), and the rerun embeds chunk 2 and gives the uninterrupted output."""
    out = tmp_path / "sat.parquet"
    real_write_table = pq.write_table

    def torn(table, where, *args, **kw):
        if "chunk-0000002" in str(where):
            with open(where, "wb") as f:
                f.write(b"PAR1 a partly written part")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing the third chunk
        return real_write_table(table, where, *args, **kw)

    monkeypatch.setattr(pq, "write_table", torn)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(model, tiny_data["test"], "satellite", out, chunk_rows=3, log=None)
    monkeypatch.setattr(pq, "write_table", real_write_table)
    parts = tmp_path / "sat.parquet.parts"
    assert sorted(p.name for p in parts.glob("chunk-*.parquet")) == [
        "chunk-0000000.parquet",
        "chunk-0000001.parquet",
    ]
    asked = []
    real_chunks = embed_mod._embed_chunks

    def spy(encoder, data, modality, chunks, *args, **kw):
        asked.extend(chunks)
        return real_chunks(encoder, data, modality, chunks, *args, **kw)

    monkeypatch.setattr(embed_mod, "_embed_chunks", spy)
    embed_dataset(model, tiny_data["test"], "satellite", out, chunk_rows=3, log=None)
    assert asked == [(2, 6, 9), (3, 9, 12)]
    monkeypatch.setattr(embed_mod, "_embed_chunks", real_chunks)
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "ref.parquet", chunk_rows=3, log=None)
    a, b = read_embeddings(out), read_embeddings(tmp_path / "ref.parquet")
    assert a.ids == b.ids and np.array_equal(a.vectors, b.vectors)


@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_one_loader_serves_every_chunk(model, tiny_data, tmp_path, monkeypatch, source):
    """The loader (and its workers) starts once for all chunks, so a GPU is not left idle while
    a new one fills at every chunk; each chunk's rows, vectors and bad rows land in its own
    part. Against one chunk embedded in the main process."""
    import torch.utils.data

    from geobind.data.pack import pack

    df = pd.read_csv(tiny_data["test"])
    df["satellite"] = [str(tiny_data["root"] / p) for p in df["satellite"]]
    df.loc[4, "satellite"] = str(tmp_path / "missing.png")  # chunk 0 of chunk_rows=5
    df.to_csv(tmp_path / "m.csv", index=False)
    data, bad = tmp_path / "m.csv", {"missing": 1}
    if source == "shards":  # packed without the tile: the sample has no satellite member
        bad = {"missing-satellite": 1}
        pack(data, tmp_path / "shards", shard_size=5, image_size=32, image_format="png", progress=False,
             log=None)
        data = tmp_path / "shards"
    ref = embed_dataset(model, data, "satellite", tmp_path / "ref.parquet", chunk_rows=1000, log=None)
    loaders = []
    real = torch.utils.data.DataLoader

    class Counted(real):
        def __init__(self, *a, **kw):
            loaders.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Counted)
    kept = []
    real_write = embed_mod._write_part
    monkeypatch.setattr(embed_mod, "_write_part", lambda t, p: (kept.append((p.name, t)), real_write(t, p)))
    got = embed_dataset(model, data, "satellite", tmp_path / "e.parquet", chunk_rows=5, batch_size=2,
                        num_workers=2, log=None)
    assert len(loaders) == 1
    n = len(df)
    assert sorted(name for name, _ in kept) == [f"chunk-{c:07d}.parquet" for c in range((n + 4) // 5)]
    for name, part in kept:  # every part holds exactly its own rows, and its own bad count
        c = int(name[6:13])
        assert part.column("id").to_pylist() == [i for i in df["id"][5 * c:5 * c + 5] if i != df["id"][4]]
        assert json.loads(part.schema.metadata[b"bad"]) == (bad if c == 0 else {})
    assert got["skipped"] == ref["skipped"] == bad
    a, b = read_embeddings(tmp_path / "e.parquet"), read_embeddings(tmp_path / "ref.parquet")
    assert a.ids == b.ids and a.thumbnails == b.thumbnails and len(a.ids) == n - 1
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)


def test_parts_of_another_model_are_not_reused(model, tiny_data, tmp_path):
    parts = tmp_path / "sat.parquet.parts"
    parts.mkdir()
    (parts / "header.json").write_text(json.dumps({"model": "something else"}))
    (parts / "chunk-0000000.parquet").write_text("stale")
    said = []
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "sat.parquet", log=said.append)
    assert "different model" in said[0]
    assert len(read_embeddings(tmp_path / "sat.parquet")) == 12


class _Stop(Exception):
    pass


def test_each_rank_embeds_its_share_and_rank0_merges(model, tiny_data, tmp_path, monkeypatch):
    """Ranks simulated one after another in this process: rank 0 prepares the parts folder and
    embeds chunks 0 and 2 (stopped at the barrier before merging), rank 1 embeds chunks 1 and 3
    and does not merge, rank 0 runs again, finds its chunks done and merges all four."""
    from geobind import distributed

    out, parts = tmp_path / "sat.parquet", tmp_path / "sat.parquet.parts"
    n_barriers = []

    def barrier():
        n_barriers.append(1)
        if len(n_barriers) == 2:
            raise _Stop

    monkeypatch.setattr(distributed, "barrier", barrier)
    kw = {"chunk_rows": 3, "world_size": 2, "log": None}
    with pytest.raises(_Stop):
        embed_dataset(model, tiny_data["test"], "satellite", out, rank=0, **kw)
    assert sorted(p.name for p in parts.glob("chunk-*")) == [
        "chunk-0000000.parquet",
        "chunk-0000002.parquet",
    ]
    assert embed_dataset(model, tiny_data["test"], "satellite", out, rank=1, **kw) == {}
    assert not out.exists()
    assert len(list(parts.glob("chunk-*"))) == 4
    summary = embed_dataset(model, tiny_data["test"], "satellite", out, rank=0, **kw)
    assert summary["rows"] == 12 and not parts.exists()
    table = read_dataset(tiny_data["test"])
    emb = read_embeddings(out)
    assert emb.ids == table.ids
    np.testing.assert_allclose(
        emb.vectors, model.embed("satellite", table.columns["satellite"]).numpy(), atol=1e-6
    )


def test_embed_under_torchrun(model_dir, tiny_data, tmp_path):
    """The real thing: two CPU processes (gloo) under torchrun, one output equal to one process."""
    import subprocess
    import sys

    out = tmp_path / "tr.parquet"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "geobind",
        "embed",
        "--model",
        str(model_dir),
        "--data",
        str(tiny_data["test"]),
        "--modality",
        "satellite",
        "--out",
        str(out),
        "--chunk-rows",
        "3",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("embedded 12 of 12 rows") == 1  # rank 0 merges and reports
    single = tmp_path / "one.parquet"
    assert (
        main(
            [
                "embed",
                "--model",
                str(model_dir),
                "--data",
                str(tiny_data["test"]),
                "--modality",
                "satellite",
                "--out",
                str(single),
                "--chunk-rows",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    a, b = read_embeddings(out), read_embeddings(single)
    assert a.ids == b.ids
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)


def test_bad_rows_are_skipped_and_counted(model, tiny_data, tmp_path):
    df = pd.read_csv(tiny_data["test"])
    df["satellite"] = [str(tiny_data["root"] / p) for p in df["satellite"]]
    df.loc[1, "satellite"] = str(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    df.loc[2, "satellite"] = str(tmp_path / "broken.png")
    df.loc[3, "lat"] = 123.0
    df.to_csv(tmp_path / "m.csv", index=False)
    s = embed_dataset(model, tmp_path / "m.csv", "satellite", tmp_path / "e.parquet", log=None)
    assert s["rows"] == 9
    assert s["skipped"] == {"missing": 1, "undecodable": 1, "bad-coordinates": 1}
    emb = read_embeddings(tmp_path / "e.parquet")
    assert emb.header["skipped"] == s["skipped"]
    assert df["id"][1] not in emb.ids and df["id"][0] in emb.ids


def test_empty_or_unusable_dataset_is_an_error(model, tiny_data, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("id,lat,lon,satellite\n")
    assert (
        main(
            [
                "embed",
                "--model",
                "x",
                "--data",
                str(tmp_path / "empty.csv"),
                "--modality",
                "satellite",
                "--out",
                str(tmp_path / "e.parquet"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "x does not exist" in err or "has no rows" in err
    with pytest.raises(ValueError, match="has no rows"):
        embed_dataset(model, tmp_path / "empty.csv", "satellite", tmp_path / "e.parquet", log=None)
    (tmp_path / "allbad.csv").write_text(
        "id,lat,lon,satellite\na,1.5,2.5,nope.png\nb,3.5,4.5,nope2.png\n"
    )
    with pytest.raises(ValueError, match=r"no usable rows .* every row was skipped \(missing: 2\)"):
        embed_dataset(model, tmp_path / "allbad.csv", "satellite", tmp_path / "e.parquet", log=None)
    assert not (tmp_path / "e.parquet").exists() and not (tmp_path / "e.parquet.parts").exists()
    with pytest.raises(ValueError, match="no 'audio' column"):
        embed_dataset(model, tiny_data["stage1"], "audio", tmp_path / "a.parquet", log=None)


def test_embed_never_overwrites_without_force(model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "e.parquet"
    out.write_text("precious")
    args = [
        "embed",
        "--model",
        str(model_dir),
        "--data",
        str(tiny_data["test"]),
        "--modality",
        "text",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "precious"
    assert main(args + ["--force"]) == 0
    assert len(read_embeddings(out)) == 12


def test_embeddings_of_another_model_are_refused_by_maps(model, tiny_data, tmp_path):
    from space_helpers import perturbed_copy

    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "e.parquet", log=None)
    with pytest.raises(ValueError, match="made with another model"):
        perturbed_copy(model).map(text="x", embeddings=tmp_path / "e.parquet")


@pytest.mark.parametrize(
    "argv", [["embed"], ["index"], ["index", "build"], ["index", "info"], ["search"], ["map"]]
)
def test_every_command_has_help_with_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, usage, said", [
    (["search", "--model", "m", "--index", "i", "-k", "3"], "usage: geobind search", "-k 3 (did you mean --k?)"),
    (["index", "build", "e.parquet", "--out", "o", "--nlsit", "3"], "usage: geobind index build",
     "--nlsit 3 (did you mean --nlist?)"),
    (["data", "split", "m.csv", "--out", "o", "--sed=3", "--tset", "0.2"], "usage: geobind data split",
     "(did you mean --seed for --sed=3, --test for --tset?)"),
    (["train", "a.yaml", "b.yaml"], "usage: geobind train", "unrecognized arguments: b.yaml"),
])
def test_an_unknown_argument_is_named_with_the_commands_usage_and_the_option_meant(argv, usage, said, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and said in err, err


def test_every_subcommand_says_what_it_does_in_wrapped_lines(capsys):
    """Each command's --help opens with a description (no line over 88 characters) and ends with
    examples."""
    import argparse

    from geobind.cli import _parser

    def commands(parser, path=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield (*path, name), sub
                    yield from commands(sub, (*path, name))

    found = dict(commands(_parser()))
    assert {("train",), ("eval",), ("embed",), ("index", "build"), ("search",), ("map",), ("serve",),
            ("data", "pack"), ("data", "split"), ("data", "check"), ("demo",)} <= set(found)
    for path, sub in found.items():
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            continue  # a group (data, index): its subcommands are checked
        assert sub.description, path
        assert all(len(line) <= 88 for line in sub.description.splitlines()), path
        assert "example" in (sub.epilog or ""), path


def test_identity_cache_follows_in_place_updates(model):
    import copy

    m = copy.deepcopy(model)
    before = m.identity("satellite")
    with torch.no_grad():
        next(m.encoder("satellite").parameters()).mul_(1.5)
    assert m.identity("satellite") != before


def test_embed_streamed_shards_equals_manifest(model, tiny_data, tmp_path):
    """WebDataset shards are streamed chunk by chunk (no random access) to the same output."""
    from geobind.data.pack import pack

    pack(
        tiny_data["test"],
        tmp_path / "shards",
        shard_size=5,
        image_size=32,
        image_format="png",
        progress=False,
        log=None,
    )
    embed_dataset(
        model, tmp_path / "shards", "satellite", tmp_path / "s.parquet", chunk_rows=4, log=None
    )
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "m.parquet", log=None)
    a, b = read_embeddings(tmp_path / "s.parquet"), read_embeddings(tmp_path / "m.parquet")
    assert a.ids == b.ids and a.captions == b.captions
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
    assert all(t[:2] == b"\xff\xd8" for t in a.thumbnails)


def test_loader_workers_give_the_same_output_with_thumbnails_made_in_them(model, tiny_data, tmp_path):
    """Decoding, preprocessing and thumbnails run in the loader workers: 2 workers write what
    the main process alone writes, for a manifest and for streamed shards, and each thumbnail
    is the reference ``thumbnail_bytes`` of the row's item."""
    from geobind.data.pack import pack

    pack(tiny_data["test"], tmp_path / "shards", shard_size=5, image_size=32, image_format="png",
         progress=False, log=None)
    for name, data in (("manifest", tiny_data["test"]), ("shards", tmp_path / "shards")):
        runs = {}
        for workers in (0, 2):
            out = tmp_path / f"{name}-{workers}.parquet"
            embed_dataset(model, data, "satellite", out, chunk_rows=7, num_workers=workers, log=None)
            runs[workers] = read_embeddings(out)
        a, b = runs[0], runs[2]
        assert a.ids == b.ids and a.captions == b.captions and a.thumbnails == b.thumbnails, name
        # Workers batch streamed rows differently (each streams its own share): float rounding only.
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6, err_msg=name)
    table = read_dataset(tiny_data["test"])
    got = read_embeddings(tmp_path / "manifest-2.parquet")
    row = {pid: i for i, pid in enumerate(table.ids)}
    for pid, thumb in zip(got.ids, got.thumbnails):
        assert thumb == embed_mod.thumbnail_bytes(table.item("satellite", row[pid]), 128)


def test_embed_cli_compile_workers_and_thumbnail_options(model, model_dir, tiny_data, tmp_path, capsys):
    """``--compile`` gives the eager vectors (float rounding) and leaves the model eager;
    ``--workers auto`` is none on a CPU; ``--no-thumbnails`` stores none; a bad count is refused."""
    common = ["embed", "--model", str(model_dir), "--data", str(tiny_data["test"]), "--modality", "satellite",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "eager.parquet")]) == 0
    assert main([*common, "--out", str(tmp_path / "compiled.parquet"), "--compile", "--workers", "auto",
                 "--no-thumbnails"]) == 0
    eager, compiled = read_embeddings(tmp_path / "eager.parquet"), read_embeddings(tmp_path / "compiled.parquet")
    assert eager.ids == compiled.ids
    np.testing.assert_allclose(compiled.vectors, eager.vectors, atol=1e-5)
    assert eager.thumbnails is not None and compiled.thumbnails is None
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "x.parquet"), "--workers", "many"])
    assert "expected auto or a number >= 0" in capsys.readouterr().err
    # The Python API hands the model back uncompiled.
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "api.parquet", compile=True, log=None)
    assert getattr(model.encoder("satellite"), "_compiled_call_impl", None) is None


def test_pad_batch_repeats_the_last_row():
    x = torch.arange(6.0).view(3, 2)
    padded = embed_mod.pad_batch({"pixels": x, "ids": torch.tensor([1, 2, 3])}, 5)
    assert padded["pixels"].tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert padded["ids"].tolist() == [1, 2, 3, 3, 3]
    assert embed_mod.pad_batch(x, 3) is x
    tiles = torch.zeros(2, 3, 4, 4, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert embed_mod.pad_batch(tiles, 3).stride() == torch.zeros(3, 3, 4, 4).contiguous(
        memory_format=torch.channels_last).stride()
    with pytest.raises(TypeError, match="cannot pad"):
        embed_mod.pad_batch([1, 2], 4)


def test_compiled_embedding_compiles_once_with_a_short_last_batch(model, tiny_data, tmp_path):
    """With ``compile`` the last, short batch is padded to the batch size (and its extra vectors
    dropped), so the encoder is not compiled again for it; vectors equal the eager ones."""
    rows = len(read_dataset(tiny_data["test"]))
    batch = 5 if rows % 5 else 7
    assert rows % batch
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "eager.parquet", batch_size=batch, log=None)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "compiled.parquet", batch_size=batch,
                      compile=True, log=None)
    torch._dynamo.reset()
    eager, compiled = read_embeddings(tmp_path / "eager.parquet"), read_embeddings(tmp_path / "compiled.parquet")
    assert eager.ids == compiled.ids and len(eager.ids) == rows
    np.testing.assert_allclose(compiled.vectors, eager.vectors, atol=1e-5)


def test_ctrl_c_ends_a_command_with_a_line_not_a_traceback(model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    import geobind.search.embed as embed_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_mod, "embed_dataset", interrupted)
    assert main(["embed", "--model", str(model_dir), "--data", str(tiny_data["test"]), "--modality", "text",
                 "--out", str(tmp_path / "e.parquet")]) == 130
    err = capsys.readouterr().err
    assert "geobind embed: interrupted; run the same command again to resume" in err and "Traceback" not in err


def test_sigterm_ends_a_command_as_ctrl_c_does_and_leaves_no_partial_output(model_dir, tiny_data, tmp_path,
                                                                            capsys, monkeypatch):
    """A scheduler's SIGTERM mid-write: the command says so and exits 143, what it was writing
    is removed (no hidden temporary left beside the output), and finished parts are kept."""
    import os
    import signal

    import pyarrow.parquet as pq

    real = embed_mod._write_part
    written = []

    def term_on_second(table, path):
        written.append(path)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        real(table, path)

    monkeypatch.setattr(embed_mod, "_write_part", term_on_second)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "e.parquet"
    common = ["embed", "--model", str(model_dir), "--data", str(tiny_data["test"]), "--modality", "satellite",
              "--chunk-rows", "4", "--no-progress"]
    assert main([*common, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert "geobind embed: terminated; run the same command again to resume" in err and "Traceback" not in err
    parts = tmp_path / "e.parquet.parts"
    assert [p.name for p in sorted(parts.glob("chunk-*"))] == ["chunk-0000000.parquet"]
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone again
    monkeypatch.setattr(embed_mod, "_write_part", real)
    assert main([*common, "--out", str(out)]) == 0  # and it resumes

    # An index being saved: its temporary folder goes too.
    monkeypatch.setattr(pq, "write_table", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["index", "build", str(out), "--out", str(tmp_path / "w.index")]) == 143
    assert "geobind index build: terminated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet"]


def test_batch_size_auto_is_small_on_a_cpu_and_large_on_a_gpu(model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    """``--batch-size auto`` (the default of embed and map): the CPU defaults on a CPU; on a GPU
    a batch that keeps the card busy, smaller for audio. A number is kept; 0 is refused."""
    import torch

    from geobind.cli_space import GPU_AUDIO_BATCH, GPU_BATCH, inference_batch_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert inference_batch_size("auto", cpu, "image", cpu=64) == 64
    assert inference_batch_size("auto", gpu, "image", cpu=64) == GPU_BATCH
    assert inference_batch_size("auto", gpu, "text", cpu=64) == GPU_BATCH
    assert inference_batch_size("auto", gpu, "audio", cpu=64) == GPU_AUDIO_BATCH < GPU_BATCH
    assert inference_batch_size(7, gpu, "image", cpu=64) == 7
    import geobind.search.embed as embed_mod

    seen = []  # the command imports embed_dataset when it runs

    monkeypatch.setattr(embed_mod, "embed_dataset", lambda *a, **kw: seen.append(kw["batch_size"]))
    common = ["embed", "--model", str(model_dir), "--data", str(tiny_data["test"]), "--modality", "satellite",
              "--no-progress", "--out", str(tmp_path / "x.parquet")]
    assert main(common) == 0 and main([*common, "--batch-size", "5"]) == 0
    assert seen == [64, 5]
    with pytest.raises(SystemExit):
        main([*common, "--batch-size", "0"])
    assert "whole number of 1 or more" in capsys.readouterr().err


def test_embed_refuses_to_write_over_the_dataset_it_reads(model_dir, tiny_data, tmp_path, capsys):
    import shutil

    data = tmp_path / "test.csv"
    shutil.copy(tiny_data["test"], data)
    before = data.read_bytes()
    assert main(["embed", "--model", str(model_dir), "--data", str(data), "--modality", "satellite",
                 "--out", str(data), "--force", "--no-progress"]) == 2
    assert "is the dataset being embedded (--data): name a new .parquet file" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_a_second_embed_into_the_same_out_is_refused_while_one_runs(model, tiny_data, tmp_path):
    from geobind.search.common import exclusive_lock

    parts = tmp_path / "t.parquet.parts"
    parts.mkdir()
    held, _ = exclusive_lock(parts / ".lock")  # as a running embed holds it
    try:
        with pytest.raises(FileExistsError, match=r"t.parquet is being written by another geobind embed \(pid \d+\)"):
            embed_dataset(model, tiny_data["test"], "text", tmp_path / "t.parquet", log=None)
    finally:
        held.close()
    embed_dataset(model, tiny_data["test"], "text", tmp_path / "t.parquet", log=None)
    assert (tmp_path / "t.parquet").is_file() and not parts.exists()
