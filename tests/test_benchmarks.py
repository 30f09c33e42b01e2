import importlib.util
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("over", [dict(patch_size=32, image_size=224, projection_dim=512),
                                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, patch_size=8, image_size=32, projection_dim=16)])
def test_vit_flops_formula_equals_torchs_flop_counter(over):
    """The stated formula against torch.utils.flop_counter on transformers' model (eager
    attention, so the attention products are counted too)."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    tt = _load("train_throughput")
    cfg = CLIPVisionConfig(**over, attn_implementation="eager")
    model = CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():
        counted = tt.counted_flops(lambda: model(pixel_values=torch.randn(1, 3, cfg.image_size, cfg.image_size)))
    assert counted == pytest.approx(tt.vit_forward_flops(cfg), rel=1e-6)


def test_audio_flops_are_counted_and_the_window_attention_is_put_back():
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection
    from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

    from geobind.encoders.audio import (
        AudioSettings,
        ClapAudioEncoder,
        _SdpaWindowAttention,
        tiny_clap_audio_config,
    )

    tt = _load("train_throughput")
    settings = AudioSettings(sample_rate=16000, clip_seconds=1.0, n_fft=512, hop_length=160, n_mels=16,
                             f_max=8000.0)
    enc = ClapAudioEncoder("audio", 32, ClapAudioModelWithProjection(ClapAudioConfig(**tiny_clap_audio_config(32))),
                           settings)
    flops = tt.audio_train_flops(enc, settings.clip_samples, enc.device)
    assert flops > 0
    attn = [m for m in enc.backbone.modules() if isinstance(m, ClapAudioSelfAttention)]
    assert attn and all(type(m) is _SdpaWindowAttention for m in attn)
    assert tt.cache_ceiling(3.0, 1.0) == pytest.approx(4 / 3)


def test_a_failed_plain_step_is_recorded_and_the_variants_still_run(monkeypatch):
    import torch

    tt = _load("train_throughput")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(tt, "_time_plain", out_of_memory)
    r = tt.main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--variants", "eager:1"])
    s1 = r["stage1"]["tiny"]
    assert s1["plain"]["error"] == "out of memory"
    assert s1["geobind"]["eager-b8"]["sps"] > 0 and s1["geobind"]["eager-b8"]["ratio"] is None
    assert "out of memory" in tt.table(r)


def test_train_throughput_runs_on_cpu_with_tiny_models(tmp_path):
    import json

    tt = _load("train_throughput")
    out = tmp_path / "r.json"
    r = tt.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--stage2", "--variants", "eager:1", "eager:2",
                 "eager:1:hf", "eager:1:ckpt", "eager:1:hf:ckpt", "--profile", "all", "--out", str(out)])
    s1 = r["stage1"]["tiny"]
    assert s1["plain"]["sps"] > 0
    assert set(s1["geobind"]) == {"eager-b8", "eager-b16", "eager-b8-hf", "eager-b8-ckpt", "eager-b8-hf-ckpt"}
    assert set(s1["infer"]) == set(s1["geobind"])
    for v in s1["geobind"].values():
        assert v["sps"] > 0 and v["ratio"] == v["sps"] / s1["plain"]["sps"]
    assert s1["best"]["sps"] == max(v["sps"] for v in s1["geobind"].values())
    # The goal's ratio is the fastest training variant's own forward over its step.
    best = s1["best_variant"]
    assert s1["infer_over_train"] == s1["infer"][best]["tiles_per_s"] / s1["geobind"][best]["sps"] > 0
    assert all(v["compiles_in_timed_steps"] == 0 for v in s1["geobind"].values())
    assert s1["cache_ceiling"] == pytest.approx(4 / 3)
    s2 = r["stage2"]["tiny"]
    assert s2["plain"]["sps"] > 0 and all(v["sps"] > 0 for v in s2["geobind"].values())
    # Counted audio FLOPs give stage 2 an MFU (CPU: no peak given, so none) and its cache ceiling.
    assert s2["cache_ceiling"] == pytest.approx(
        (s2["train_flop_per_sample"] + s2["teacher_fwd_flop_per_sample"]) / s2["train_flop_per_sample"])
    assert set(s2["geobind"]) == {"eager-b4", "eager-b8", "eager-b4-hf", "eager-b4-ckpt", "eager-b4-hf-ckpt"}
    assert json.loads(out.read_text())["device"] == "cpu"
    text = tt.table(r)
    assert "eager-b16" in text and "2 audio->sat" in text
    prof = s1["geobind"]["eager-b8"]["profile"]
    assert prof["busy_ms"] > 0 and prof["wall_ms"] > 0 and prof["top_ms"]
    assert abs(sum(prof["categories_ms"].values()) - prof["busy_ms"]) < 0.01 * prof["busy_ms"] + 0.01
    assert "ms per step" in text


def test_batch_overrides_set_the_plain_batches_and_reject_a_batch_without_negatives(capsys):
    tt = _load("train_throughput")
    r = tt.main(["--size", "tiny", "--batch", "6", "--audio-batch", "3", "--steps", "1", "--warmup", "0",
                 "--stage2", "--variants", "eager:2"])
    assert r["stage1"]["tiny"]["batch"] == 6 and set(r["stage1"]["tiny"]["geobind"]) == {"eager-b12"}
    assert r["stage2"]["tiny"]["batch"] == 3 and set(r["stage2"]["tiny"]["geobind"]) == {"eager-b6"}
    with pytest.raises(SystemExit):
        tt.main(["--size", "tiny", "--batch", "1"])
    assert "--batch must be at least 2" in capsys.readouterr().err


def test_every_variant_is_written_as_soon_as_it_is_measured(monkeypatch):
    """A part stopped at its time limit keeps the variants it measured: the JSON is rewritten
    after the plain step and after each variant, with ratios already filled in."""
    import copy

    tt = _load("train_throughput")
    writes = []
    monkeypatch.setattr(tt, "_write", lambda path, results: writes.append(copy.deepcopy(results)))
    tt.main(["--size", "tiny", "--steps", "1", "--warmup", "1", "--stage2", "--variants", "eager:1", "eager:2",
             "--out", "unused.json"])
    s1 = [sorted(w["stage1"].get("tiny", {}).get("geobind", {})) for w in writes]
    s2 = [sorted(w["stage2"].get("tiny", {}).get("geobind", {})) for w in writes]
    # Stage 1: each variant's training figure is written before its inference half runs.
    assert s1 == [[], ["eager-b8"], ["eager-b8"]] + [["eager-b16", "eager-b8"]] * 5
    assert s2 == [[]] * 5 + [[], ["eager-b4"], ["eager-b4", "eager-b8"]]
    assert writes[1]["stage1"]["tiny"]["geobind"]["eager-b8"]["ratio"] > 0
    assert writes[1]["stage1"]["tiny"]["best_variant"] == "eager-b8"


def test_cuda_profile_counts_gpu_kernels_only():
    """The CUDA branch of the profile (kernel events, not the CPU operators that launch them),
    on stand-in events: 3 steps of 30 ms wall."""
    from types import SimpleNamespace

    import torch

    tt = _load("train_throughput")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(name, us, kind=cuda):
        return SimpleNamespace(name=name, device_type=kind, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [evt("sm90_xmma_gemm_bf16", 9000.0), evt("sm90_xmma_gemm_bf16", 9000.0),
              evt("flash_fwd_kernel", 3000.0), evt("triton_poi_fused_add_0", 6000.0),
              evt("aten::mm", 50000.0, cpu)]
    totals = tt.time_by_name(SimpleNamespace(events=lambda: events), cuda=True)
    assert totals == {"sm90_xmma_gemm_bf16": 18000.0, "flash_fwd_kernel": 3000.0, "triton_poi_fused_add_0": 6000.0}
    prof = tt.summarise_profile(totals, wall=0.030, steps=3, cuda=True)
    assert prof["busy_ms"] == 9.0 and prof["wall_ms"] == 30.0 and prof["busy_fraction"] == 0.3
    assert prof["categories_ms"] == {"matmul": 6.0, "compiled (fused)": 2.0, "attention": 1.0}
    assert prof["top_ms"][0] == ["sm90_xmma_gemm_bf16", 6.0] and prof["what"] == "GPU kernel time"


def test_profile_categories():
    tt = _load("train_throughput")
    assert tt._category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert tt._category("aten::addmm") == "matmul"
    assert tt._category("pytorch_flash::flash_fwd_kernel") == "attention"
    assert tt._category("fmha_cutlassB_bf16_aligned_64x64_k64_sm80") == "attention"
    assert tt._category("triton_per_fused_add_native_layer_norm_0") == "compiled (fused)"
    assert tt._category("void at::native::(anonymous namespace)::multi_tensor_apply_kernel") == "optimizer"
    assert tt._category("Memcpy HtoD (Pageable -> Device)") == "copy"
    assert tt._category("ncclDevKernel_AllGather_RING_LL") == "communication"
    assert tt._category("aten::gelu") == "other"
    assert tt._category("aten::_log_softmax_backward_data") == "loss"
    # Names seen on an H100: cuDNN's implicit-GEMM convolution, inductor fusions with a cast.
    assert tt._category("void precomputed_convolve_sgemm<__nv_bfloat16, 128, 6, 7, 3, 3, 5, 1, false>") == "convolution"
    assert tt._category("void cudnn::cnn::wgrad_alg1_engine<__nv_bfloat16, float, 128, 6, 7>") == "convolution"
    assert tt._category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
    assert tt._category("triton_poi_fused__to_copy__unsafe_index_put__unsafe_view_add") == "compiled (fused)"
    assert tt._category("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN") == "matmul"


def test_variants_are_parsed_and_checked():
    import pytest

    tt = _load("train_throughput")
    got = tt.parse_variants(["eager:1", "compile:2", "eager:2:hf", "compile:8:ckpt", "eager:1:ckpt:hf"])
    assert got == [(False, 1, False, False), (True, 2, False, False), (False, 2, True, False),
                   (True, 8, False, True), (False, 1, True, True)]
    assert [tt.variant_name(v.compiled, 4 * v.scale, v.hf, v.ckpt) for v in got] == [
        "eager-b4", "compile-b8", "eager-b8-hf", "compile-b32-ckpt", "eager-b4-hf-ckpt"]
    for bad in ("fast:2", "eager:0", "eager:2:fast", "compile", "eager:1:ckpt:ckpt"):
        with pytest.raises(SystemExit, match="eager:N or compile:N"):
            tt.parse_variants([bad])


def test_out_of_memory_is_recorded_not_fatal():
    import torch

    tt = _load("train_throughput")

    def boom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert tt._guarded(boom)["error"] == "out of memory"

    def broken():
        raise RuntimeError("backend compiler failed\nlong trace")

    r = tt._guarded(broken)
    assert r["error"] == "RuntimeError" and r["detail"] == "backend compiler failed" and r["where"]


def test_a_failed_inference_half_keeps_the_variants_training_figure(monkeypatch):
    """The frozen inference compile is separate from the training step: its failure is recorded
    under ``infer`` and the training figure (what the goals rest on) stays."""
    import geobind.encoders.base as base

    def broken(module):
        raise RuntimeError("freezing failed")

    monkeypatch.setattr(base, "compile_for_inference", broken)
    tt = _load("train_throughput")
    r = tt.main(["--size", "tiny", "--steps", "1", "--warmup", "1", "--variants", "compile:1"])
    s1 = r["stage1"]["tiny"]
    assert s1["geobind"]["compile-b8"]["sps"] > 0 and s1["best_variant"] == "compile-b8"
    assert s1["infer"]["compile-b8"]["error"] == "RuntimeError"
    assert "infer_over_train" not in s1 or s1["infer_over_train"] is None


def test_gpu_suite_summary_reads_the_benchmark_json(tmp_path):
    import subprocess

    tt = _load("train_throughput")
    tt.main(["--size", "tiny", "--steps", "1", "--warmup", "1", "--variants", "eager:1", "eager:2", "--profile", "all",
             "--out", str(tmp_path / "train-tiny.json")])
    spec = importlib.util.spec_from_file_location("summary", ROOT / "benchmarks" / "gpu" / "summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    lines = summary.main([str(tmp_path)]).splitlines()
    assert len(lines) == 3 and "stage1 train-tiny" in lines[1] and "eager-b" in lines[1]
    assert lines[2].startswith("stage1 tiny eager-b") and "ms per step" in lines[2]
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu" / "fetch_wheels.sh")], check=True)


def test_gpu_suite_script_runs_end_to_end_in_smoke_mode(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, SMOKE="1", PARTS="checks train-b32 train-audio trainer embed", OUT=str(tmp_path / "out"),
               WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run_all.sh")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "out" / "train-b32.json").is_file()
    # Few files come back from a lent machine: logs in one file, scratch data elsewhere.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "checks.json", "embed.json", "gpu.txt", "parts.log", "train-audio.json", "train-b32.json", "trainer.json"]
    assert "== checks: exit 0" in run.stdout and "PASS window_attention" in run.stdout
    assert "== train-b32: exit 0" in run.stdout and "== train-audio: exit 0" in run.stdout
    assert "train-b16" not in run.stdout and "== trainer: exit 0" in run.stdout
    assert "== embed: exit 0" in run.stdout
    last = run.stdout.strip().splitlines()
    # The embed rows; each variant embedded every tile, each vector on its own row ("ok").
    embed = [line.split() for line in last[-3:]]
    assert [row[0] for row in embed] == ["loader-w0", "device-w0", "dev-thumbs-w0"]
    assert json.loads((tmp_path / "out" / "embed.json").read_text())["ok"]
    assert "geobind embed" in last[-4]
    last = last[:-4]
    assert "02-audio" in last[-1] and "01-satellite" in last[-2] and "trainer stage" in last[-3]
    assert "stage2 train-audio" in last[-4] and "stage1 train-b32" in last[-5]
    assert last[-7].startswith("checks: PASS vit, PASS window_attention, PASS mel_resize, PASS device_augment, PASS prefetch")


def test_gpu_checks_pass_and_catch_a_broken_fast_path(tmp_path, monkeypatch):
    """``gpu/checks.py`` on a CPU (tiny models): the fast paths pass against their references,
    and a wrong one (attention without the shifted-window mask) is reported as failed."""
    import json

    import torch

    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu" / "checks.py")
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    r = checks.main(["--device", "cpu", "--only", "vit", "window_attention", "mel_resize", "device_augment",
                     "prefetch", "attention_backends", "--out", str(tmp_path / "c.json")])
    assert r["ok"] and set(r["checks"]) == {"vit", "window_attention", "mel_resize", "device_augment", "prefetch",
                                            "attention_backends"}
    assert json.loads((tmp_path / "c.json").read_text())["checks"]["vit"]["fp32_out_rel"] < 1e-4
    # Every kernel that runs here is timed and checked against the math kernel.
    att = r["checks"]["attention_backends"]
    assert att["math_ms"] > 0 and att["flash_ms"] > 0 and att["min_cosine_vs_math"] > 0.999

    from geobind.encoders import audio

    real = audio._SdpaWindowAttention.forward

    def unmasked(self, hidden_states, attention_mask=None, *args, **kwargs):
        return real(self, hidden_states, None if attention_mask is None else torch.zeros_like(attention_mask))

    monkeypatch.setattr(audio._SdpaWindowAttention, "forward", unmasked)
    r = checks.main(["--device", "cpu", "--only", "window_attention"])
    assert not r["ok"] and r["checks"]["window_attention"]["fp32_out_rel"] > 1e-3

    # A mel resize with other weights (bilinear instead of bicubic) fails its check too.
    def bilinear(n_in, n_out, device, dtype):
        eye = torch.eye(n_in, device=device, dtype=torch.float32).view(1, 1, n_in, n_in)
        m = torch.nn.functional.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=True)
        return m.view(n_out, n_in).to(dtype)

    monkeypatch.setattr(audio, "_interpolation_matrix", bilinear)
    r = checks.main(["--device", "cpu", "--only", "mel_resize"])
    assert not r["ok"] and r["checks"]["mel_resize"]["fp32_out_rel"] > 1e-4


def test_gpu_checks_fail_on_nan(monkeypatch):
    """A kernel or gradient that is NaN fails its check (Python's min/max would skip a NaN)."""
    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu" / "checks.py")
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    assert checks._grads_rel([torch.ones(3), torch.full((3,), float("nan"))], [torch.ones(3)] * 2) != 0.0
    real, calls = F.scaled_dot_product_attention, [0]

    def nan_after_math(*args, **kwargs):  # the math reference first (12 calls), then NaN
        calls[0] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls[0] > 12 else out

    monkeypatch.setattr(F, "scaled_dot_product_attention", nan_after_math)
    r = checks.check_attention_backends(torch.device("cpu"), "tiny")
    assert "flash_ms" in r and not r["ok"]


def test_train_smoke_runs_the_real_trainer_on_generated_data(tmp_path):
    spec = importlib.util.spec_from_file_location("train_smoke", ROOT / "benchmarks" / "gpu" / "train_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    r = smoke.main(["--out", str(tmp_path / "s"), "--size", "tiny", "--places", "48", "--steps", "4"])
    assert set(r["stages"]) == {"01-satellite", "02-audio"}
    for s in r["stages"].values():
        assert s["samples_per_s"] > 0 and 0 <= s["data_wait"] <= 1 and s["final_loss"] > 0
    assert (tmp_path / "s" / "run" / "model" / "geobind.json").is_file()
    import json as _json

    meta = _json.loads((tmp_path / "s" / "run" / "model" / "geobind.json").read_text())
    assert meta["modalities"]["satellite"]["settings"]["augment_on"] == "device"


def test_host_syncs_counts_the_warnings_and_traces_the_first_sync(monkeypatch):
    """Off a GPU, with CUDA's sync debug mode stood in for: a step that syncs once is counted,
    and the step run again in the raising mode leaves the traceback that locates it."""
    import warnings
    from types import SimpleNamespace

    tt = _load("train_throughput")
    mode = ["default"]
    monkeypatch.setattr(tt.torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__(0, m))
    monkeypatch.setattr(tt.torch.cuda, "synchronize", lambda *a: None)

    def syncing_read():
        if mode[0] == "warn":
            warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        elif mode[0] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    def step():
        syncing_read()

    r = tt.host_syncs(step, SimpleNamespace(type="cuda"))
    assert r["host_syncs"] == 1 and len(r["host_sync_sites"]) == 1
    assert any("syncing_read" in line for line in r["host_sync_trace"]), r["host_sync_trace"]
    assert mode[0] == "default"
    assert tt.host_syncs(lambda: None, SimpleNamespace(type="cuda")) == {"host_syncs": 0, "host_sync_sites": []}
    assert tt.host_syncs(step, SimpleNamespace(type="cpu")) == {}


def test_the_plain_baseline_is_its_fastest_batch_and_compiled_variants_compile_afresh(monkeypatch):
    """With plain steps at two batches the faster is the baseline of every ratio; each compiled
    variant starts from an empty compile cache (a second batch would otherwise be compiled with
    dynamic shapes), and no graph is compiled during timed steps."""
    import torch

    tt = _load("train_throughput")
    resets = []
    real = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real())[1])
    r = tt.main(["--size", "tiny", "--steps", "2", "--warmup", "2", "--variants", "compile:1", "compile:2",
                 "--plain-scales", "1", "2"])
    s1 = r["stage1"]["tiny"]
    assert set(s1["plain_by_batch"]) == {"b8", "b16"}
    assert s1["plain"]["sps"] == max(v["sps"] for v in s1["plain_by_batch"].values())
    for v in s1["geobind"].values():
        assert v["ratio"] == v["sps"] / s1["plain"]["sps"] and v["compiles_in_timed_steps"] == 0
    # Two fresh caches per compiled variant: its training graph, then its frozen inference graph.
    assert len(resets) == 4
    assert all(v["compiles_in_timed_steps"] == 0 for v in s1["infer"].values())
