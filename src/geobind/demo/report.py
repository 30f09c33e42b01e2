"""The demo's evaluation: retrieval pairs, zero-shot scene classification, emergent vs direct
audio->text, zero-shot world maps, and the report files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from geobind.data.manifest import read_dataset
from geobind.evaluate import embed_all, format_pairs, pair_report, trained_pair_names
from geobind.metrics import zero_shot_accuracy
from geobind.model import GeoBind

ZERO_SHOT_MODALITIES = ("satellite", "ground", "audio")


def scene_prompts(world: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(scene names, one text prompt per scene)`` from ``world.json``."""
    names, prompts = [], []
    for s in world["scenes"]:
        name = s["name"] if isinstance(s, dict) else str(s)
        names.append(name)
        default = f"a photo of {name.replace('_', ' ')}"
        prompts.append(s.get("prompts", {}).get("text", default) if isinstance(s, dict) else default)
    return names, prompts


def _labels(table, names: list[str]) -> torch.Tensor:
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index.get(str(s), -1) for s in table.meta["scene"].tolist()])


def zero_shot(emb: dict, labels: torch.Tensor, prompt_emb: torch.Tensor, modalities=ZERO_SHOT_MODALITIES) -> dict:
    """Accuracy of nearest-prompt classification per modality, beside chance (uniform over the
    scenes) and the majority-class rate."""
    out = {}
    k = prompt_emb.shape[0]
    for m in modalities:
        if m not in emb:
            continue
        e, valid = emb[m]
        keep = valid & (labels >= 0)
        y = labels[keep]
        majority = float(torch.bincount(y, minlength=k).max()) / max(1, len(y))
        out[m] = {"accuracy": zero_shot_accuracy(e[keep], prompt_emb, y), "chance": 1.0 / k,
                  "majority": majority, "n": int(keep.sum())}
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def draw_maps(model: GeoBind, world_dir: Path, out_dir: Path, test, names: list[str], progress: bool,
              cell: float | None = None) -> list[dict]:
    """Similarity of every land grid place to 3 text queries and 1 audio query: PNG + GeoTIFF."""
    from geobind.maps_world import plot_world_map, write_points_geotiff

    grid = read_dataset(world_dir / "grid.csv")
    emb = embed_all(model, grid, modalities=["satellite"], batch_size=256, progress=progress)["satellite"][0]
    lat = torch.tensor(grid.lat)
    lon = torch.tensor(grid.lon)
    cell = cell or _grid_step(grid.lat)
    queries = [("text", q, model.embed("text", [q])) for q in _map_text_queries(names)]
    audio_row = _audio_example(test)
    files: dict[str, str] = {}
    if audio_row is not None:
        i, scene = audio_row
        clip = test.item("audio", i)
        q = f"sound recorded in: {scene}"
        queries.append(("audio", q, model.embed("audio", [clip])))
        # Which recording it is, so that the map can be remade (`geobind map --audio FILE`).
        files[q] = _relative(clip, out_dir.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = []
    for kind, q, qe in queries:
        scores = (emb @ qe.T).squeeze(1)
        slug = f"{kind}-{_slug(q)}"
        png, tif = out_dir / f"{slug}.png", out_dir / f"{slug}.tif"
        title = f'{kind} query: "{q}"' + (f" ({Path(files[q]).name})" if q in files else "")
        plot_world_map(lat.numpy(), lon.numpy(), scores.numpy(), png, title)
        write_points_geotiff(lat.numpy(), lon.numpy(), scores.numpy(), tif, cell_deg=cell,
                             tags={"query": title, "score": "cosine", "score_meaning": "cosine similarity to the query"},
                             description=f"cosine: {title}")
        maps.append({"kind": kind, "query": q, **({"file": files[q]} if q in files else {}),
                     "png": str(png.relative_to(out_dir.parent)),
                     "geotiff": str(tif.relative_to(out_dir.parent)), "min": float(scores.min()),
                     "max": float(scores.max())})
    return maps


def _relative(path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def chance_line(pairs: dict) -> str:
    """What a random ranking scores on ``pairs``' largest n, to read R@k and median rank against."""
    n = max(int(m["n"]) for m in pairs.values())
    return (f"Chance (a random ranking of the {n} test places): R@1 {1 / n:.3f}, R@5 {min(1.0, 5 / n):.3f}, "
            f"R@10 {min(1.0, 10 / n):.3f}, median rank {(n + 1) / 2:.1f}.")


def next_steps(out: Path, report: dict) -> list[tuple[str, str]]:
    """``(what, command)`` to try on the demo's outputs; paths quoted for the shell."""
    import csv
    import shlex

    out = Path(out)
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    model, index, world = out / "model", out / "places.index", out / "world"
    on = f"--model {q(model)} --index {q(index)}"
    steps = [("search by text", f'geobind search {on} --text "a dense tropical rainforest"')]
    # A held-out place's recording and photo: the one the audio map used, else the first with both.
    audio = next((m["file"] for m in report.get("maps", []) if m.get("file")), None)
    with open(world / "test.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("audio") and r.get("ground")]
    row = next((r for r in rows if audio and audio.endswith(r["audio"])), rows[0] if rows else None)
    if row is not None:
        steps += [("search by a sound", f"geobind search {on} --audio {q(world / row['audio'])}"),
                  ("search by a ground photo", f"geobind search {on} --image {q(world / row['ground'])}")]
    steps += [
        ("map a query over the places", f'geobind map --model {q(model)} --text "a hot sandy desert" '
                                        f"--embeddings {q(index)} --out desert.tif"),
        ("evaluate on the held-out places", f"geobind eval --model {q(model)} --data {q(world / 'test.csv')}"),
        ("explore in a browser (serve extra)", f"geobind serve {on}"),
    ]
    return steps


def _grid_step(lats) -> float:
    u = sorted(set(round(x, 4) for x in lats))
    return min(b - a for a, b in zip(u, u[1:])) if len(u) > 1 else 1.0


def _map_text_queries(names: list[str]) -> list[str]:
    wanted = [("desert", "a hot sandy desert"), ("ice", "snow and ice as far as the eye can see"),
              ("rainforest", "a dense tropical rainforest"), ("city", "a busy city centre")]
    qs = [q for key, q in wanted if any(key in n for n in names)]
    return (qs + [f"a photo of {n}" for n in names])[:3]


def _audio_example(test):
    scenes = test.meta["scene"].tolist()
    for pref in ("coast", "ocean", "city", "rainforest"):
        for i, s in enumerate(scenes):
            if pref in str(s) and test.columns.get("audio", [None])[i]:
                return i, str(s).replace("_", " ")
    return None


def evaluate_demo(out: Path, model_dir: Path, base_dir: Path, world: dict, *,
                  progress: bool = True) -> dict[str, Any]:
    """Everything the demo reports, on the held-out test places."""
    out = Path(out)
    model = GeoBind.from_pretrained(model_dir)
    test = read_dataset(out / "world" / "test.csv")
    emb = embed_all(model, test, batch_size=128, progress=progress)
    pairs = pair_report(emb)
    names, prompts = scene_prompts(world)
    labels = _labels(test, names)
    prompt_emb = model.embed("text", prompts)
    zs = zero_shot(emb, labels, prompt_emb)

    base = GeoBind.from_pretrained(base_dir)
    b_emb = embed_all(base, test, modalities=["audio", "text"], batch_size=128)
    b_pairs = pair_report(b_emb)
    b_zs = zero_shot(b_emb, labels, base.embed("text", prompts), modalities=("audio",))
    emergent = {
        "audio->text": {"geobind_emergent": pairs.get("audio->text"), "direct_baseline": b_pairs.get("audio->text")},
        "text->audio": {"geobind_emergent": pairs.get("text->audio"), "direct_baseline": b_pairs.get("text->audio")},
        "zero_shot_audio": {"geobind_emergent": zs["audio"]["accuracy"], "direct_baseline": b_zs["audio"]["accuracy"]},
    }
    d = b_zs["audio"]["accuracy"]
    emergent["zero_shot_audio"]["ratio"] = zs["audio"]["accuracy"] / d if d > 0 else None
    maps = draw_maps(model, out / "world", out / "maps", test, names, progress, world.get("grid_deg"))
    return {
        "data": str(test.source),
        "rows": len(test),
        "pairs": pairs,
        "trained_pairs": trained_pair_names(model),
        "zero_shot": zs,
        "emergent_vs_direct": emergent,
        "maps": maps,
        "scenes": names,
    }


def format_summary(report: dict) -> str:
    """The printed summary: the pair table, zero-shot accuracies and emergent vs direct."""
    trained = {frozenset(p.split("<->")) for p in report.get("trained_pairs", [])}
    lines = [format_pairs(report["pairs"], trained), "", "zero-shot scene classification (text prompts):"]
    for m, z in report["zero_shot"].items():
        lines.append(f"  {m:<10} accuracy {z['accuracy']:.3f}   chance {z['chance']:.3f}   majority {z['majority']:.3f}")
    e = report["emergent_vs_direct"]
    ge, db = e["audio->text"]["geobind_emergent"], e["audio->text"]["direct_baseline"]
    lines += ["", "emergent audio->text (never trained together) vs a direct audio-text baseline:",
              f"  retrieval R@10   emergent {ge['R@10']:.3f}   direct {db['R@10']:.3f}",
              f"  zero-shot audio  emergent {e['zero_shot_audio']['geobind_emergent']:.3f}   "
              f"direct {e['zero_shot_audio']['direct_baseline']:.3f}   ratio "
              + (f"{e['zero_shot_audio']['ratio']:.2f}" if e["zero_shot_audio"]["ratio"] is not None else "n/a") + " (emergent / direct; 1.0 = as good as training audio with text)"]
    if "seconds" in report:
        secs = report["seconds"]
        parts = (", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if isinstance(v, (int, float)))
                 if isinstance(secs, dict) else f"{secs:.0f} s")
        lines.append(f"\ntime: {parts}")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    """``report.md``: tables and the maps."""
    r = report
    md = ["# GeoBind demo report", "", f"> {r.get('anchor', {}).get('note', '')}", "",
          f"Held-out test places: {r['rows']} (geographic cells never seen in training).", "",
          "## Retrieval between every pair of modalities", "",
          "Each query (a test place in one modality) ranks all test places in the other modality by cosine "
          "similarity; its match is the same place. Rank 1 is best; R@k is the fraction of queries whose "
          "match is within the top k. *Emergent* pairs were never trained together.", "",
          chance_line(r["pairs"]), "",
          "| pair | R@1 | R@5 | R@10 | median rank | n | |", "|---|---|---|---|---|---|---|"]
    trained = {frozenset(p.split("<->")) for p in r.get("trained_pairs", [])}
    for name, m in r["pairs"].items():
        a, b = name.split("->")
        tag = "" if frozenset((a, b)) in trained else "emergent"
        md.append(f"| {name} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {m['median_rank']:.1f} | {m['n']} | {tag} |")
    md += ["", "## Zero-shot scene classification from text prompts", "",
           "| modality | accuracy | chance (1/scenes) | majority class |", "|---|---|---|---|"]
    for m, z in r["zero_shot"].items():
        md.append(f"| {m} | {z['accuracy']:.3f} | {z['chance']:.3f} | {z['majority']:.3f} |")
    e = r["emergent_vs_direct"]
    md += ["", "## Emergent audio->text vs a direct audio-text baseline", "",
           "| | GeoBind (emergent) | direct baseline |", "|---|---|---|"]
    for k in ("audio->text", "text->audio"):
        ge, db = e[k]["geobind_emergent"], e[k]["direct_baseline"]
        md.append(f"| {k} R@10 | {ge['R@10']:.3f} | {db['R@10']:.3f} |")
    md.append(f"| zero-shot audio accuracy | {e['zero_shot_audio']['geobind_emergent']:.3f} | "
              f"{e['zero_shot_audio']['direct_baseline']:.3f} |")
    if e["zero_shot_audio"].get("ratio") is not None:
        md += ["", f"Ratio emergent / direct (zero-shot audio): {e['zero_shot_audio']['ratio']:.2f} "
                   "(1.0: audio bound through satellite images works as well as audio trained with text)."]
    md += ["", "## Zero-shot world maps", "",
           "Cosine similarity (-1..1, higher = more like the query) between each land place's satellite "
           "tile and the query. Each map's colours run from its own lowest to its highest score: compare "
           "places within one map, not colours across maps.", ""]
    for m in r["maps"]:
        md += [f"### {m['kind']}: {m['query']}", "", f"![{m['query']}]({m['png']})", "",
               f"GeoTIFF (EPSG:4326): `{m['geotiff']}`; scores {m['min']:.3f} to {m['max']:.3f}"
               + (f"; the recording: `{m['file']}`" if m.get("file") else ""), ""]
    if r.get("next_steps"):
        md += ["## Try next", ""] + [f"- {what}: `{cmd}`" for what, cmd in r["next_steps"]] + [""]
    if "seconds" in r:
        md += ["## Time (seconds)", "", "| step | seconds |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in r["seconds"].items()]
    path.write_text("\n".join(md) + "\n")
