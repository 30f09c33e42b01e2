import importlib.util
from pathlib import Path

from transformers import CLIPVisionConfig

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vit_flops_formula_matches_the_stated_figures():
    tt = _load("train_throughput")
    b32 = tt.vit_forward_flops(CLIPVisionConfig(patch_size=32, image_size=224, projection_dim=512))
    b16 = tt.vit_forward_flops(CLIPVisionConfig(patch_size=16, image_size=224, projection_dim=512))
    assert 8.5e9 < b32 < 9.1e9 and 34e9 < b16 < 36e9


def test_train_throughput_runs_on_cpu_with_tiny_models(tmp_path):
    import json

    tt = _load("train_throughput")
    out = tmp_path / "r.json"
    r = tt.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--stage2", "--out", str(out)])
    s1 = r["stage1"]["tiny"]
    assert s1["plain_sps"] > 0 and s1["geobind_sps"] > 0 and s1["infer_tiles_per_s"] > 0
    assert r["stage2"]["tiny"]["geobind_sps"] > 0
    assert json.loads(out.read_text())["device"] == "cpu"
