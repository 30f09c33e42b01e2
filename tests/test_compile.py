"""torch.compile friendliness: the trainable encoders trace as one graph, and a compiled
training run matches the eager one."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import TINY_VISION, tiny_config
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from geobind.binding.trainer import train
from geobind.config import ConfigError, parse_config
from geobind.encoders.audio import ClapAudioEncoder, tiny_clap_audio_spec
from geobind.encoders.base import uncompile
from geobind.encoders.clip import ClipVisionEncoder
from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform


def _graph_breaks(module, *args):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*args)
    return explained.graph_count, [str(r.reason).splitlines()[0] for r in explained.break_reasons]


@pytest.mark.parametrize("batch", ["training uint8", "normalised float"])
def test_satellite_encoder_traces_as_one_graph(batch):
    cfg = CLIPVisionConfig(**TINY_VISION)
    encoder = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(cfg),
                                ImageTransform(32, SATELLITE_MEAN, SATELLITE_STD, "overhead")).train()
    x = ({"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)} if batch == "training uint8"
         else torch.randn(4, 3, 32, 32))
    graphs, breaks = _graph_breaks(encoder, x)
    assert (graphs, breaks) == (1, [])


def test_satellite_encoder_with_device_augmentation_traces_as_one_graph():
    cfg = CLIPVisionConfig(**TINY_VISION)
    transform = ImageTransform(32, SATELLITE_MEAN, SATELLITE_STD, "overhead", augment_on="device")
    encoder = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(cfg), transform).train()
    side = transform.load_size
    batch = {"pixels": torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8),
             "aug": torch.tensor([[0.1, 0.05, 0.9, 0.95, 1.0, 1.0, 1.1, 0.9]] * 4)}
    graphs, breaks = _graph_breaks(encoder, batch)
    assert (graphs, breaks) == (1, [])


def test_audio_encoder_traces_as_one_graph():
    """Mel front end + fused HTS-AT: no data-dependent shapes (CLAP's is_longer lookup is
    replaced by the global-only patch embedding)."""
    torch.manual_seed(0)
    encoder = ClapAudioEncoder.create("audio", tiny_clap_audio_spec(32), 32, {}).train()
    graphs, breaks = _graph_breaks(encoder, torch.randn(4, encoder.audio.clip_samples) * 0.1)
    assert (graphs, breaks) == (1, [])


@pytest.mark.parametrize("key", ["compile", "grad_checkpointing"])
def test_optim_switches_must_be_bools(tiny_data, tmp_path, key):
    d = tiny_config(tiny_data, tmp_path / "run", audio=False)
    d["stages"][0]["optim"][key] = "yes"
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        parse_config(d)


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data, tmp_path):
    """A short stage-1 run with ``optim.compile: true`` (inductor on CPU) follows the eager
    run's losses and saves the same parameter names."""

    def run(out, compile_):
        d = tiny_config(tiny_data, out, steps=3, audio=False)
        d["stages"][0]["optim"].update(compile=compile_, grad_clip=0.0)
        d["eval"] = None
        return train(parse_config(d), progress=False, log=None)

    torch._dynamo.reset()
    eager, compiled = run(tmp_path / "eager", False), run(tmp_path / "compiled", True)

    def losses(model_dir):
        rows = (model_dir.parent / "stages" / "01-satellite" / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("loss")
        return [float(r.split(",")[col]) for r in rows[1:]]

    assert len(losses(eager)) == 3
    torch.testing.assert_close(losses(compiled), losses(eager), rtol=1e-3, atol=1e-4)
    from safetensors.torch import load_file

    we = load_file(str(eager / "satellite" / "model.safetensors"))
    wc = load_file(str(compiled / "satellite" / "model.safetensors"))
    assert we.keys() == wc.keys()
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-3, atol=1e-4, msg=k)
    meta = json.loads((compiled / "geobind.json").read_text())
    assert meta["stages"][0]["steps"] == 3


@pytest.mark.parametrize("kind", ["satellite", "satellite-device-aug", "audio"])
def test_compiled_encoders_are_not_rebuilt_after_the_first_step(kind):
    """Three training forwards and backwards of a compiled encoder compile once: nothing the
    first call leaves behind (a cache filled on first use, say) invalidates the graph."""
    torch.manual_seed(0)
    if kind == "audio":
        encoder = ClapAudioEncoder.create("audio", tiny_clap_audio_spec(32), 32, {})
        batch = torch.randn(4, encoder.audio.clip_samples) * 0.1
    else:
        cfg = CLIPVisionConfig(**TINY_VISION)
        on = "device" if kind.endswith("device-aug") else "loader"
        transform = ImageTransform(32, SATELLITE_MEAN, SATELLITE_STD, "overhead", augment_on=on)
        encoder = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(cfg), transform)
        if on == "device":
            side = transform.load_size
            batch = {"pixels": torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8),
                     "aug": torch.tensor([[0.1, 0.05, 0.9, 0.95, 1.0, 1.0, 1.1, 0.9]] * 4)}
        else:
            batch = {"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)}  # as the loader gives
    encoder.train()
    torch._dynamo.reset()
    encoder.compile(backend="eager")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                encoder(batch).sum().backward()
    finally:
        uncompile(encoder)
        torch._dynamo.reset()


@pytest.mark.slow
def test_validation_does_not_compile_the_encoder_again(tiny_data, tmp_path):
    """A compiled stage validated every step builds one graph: validation (eval mode, no
    gradients, a smaller last batch) runs the encoder eagerly, and training keeps its graph."""
    d = tiny_config(tiny_data, tmp_path / "run", steps=3, audio=False)
    d["stages"][0]["optim"].update(compile=True, val_every=1)
    d["stages"][0]["data"]["val"] = d["stages"][0]["data"]["train"]
    d["eval"] = None
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        model_dir = train(parse_config(d), progress=False, log=None)
    rows = (model_dir.parent / "stages" / "01-satellite" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert any(h.startswith("val_") for h in header)
    assert sum(1 for r in rows[1:] if r.split(",")[header.index("loss")]) == 3


@pytest.mark.slow
def test_compiled_run_with_a_skipped_sample_builds_one_graph_and_matches_eager(tiny_data, tmp_path):
    """A batch left short by an undecodable tile is padded back to its full size for the
    compiled encoder (no second graph) and the padding is dropped before the loss: the
    compiled run follows the eager one, which trains on the short batch as it is."""
    from fixtures import one_epoch_with_a_broken_tile

    d = one_epoch_with_a_broken_tile(tiny_data, tmp_path)
    eager = train(parse_config({**d, "output_dir": str(tmp_path / "eager")}), progress=False, log=None)
    d["stages"][0]["optim"]["compile"] = True
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train(parse_config({**d, "output_dir": str(tmp_path / "compiled")}), progress=False, log=None)

    def run(model_dir):
        stage = model_dir.parent / "stages" / "01-satellite"
        rows = (stage / "metrics.csv").read_text().splitlines()
        col = rows[0].split(",").index("loss")
        return [float(r.split(",")[col]) for r in rows[1:]], json.loads((stage / "done.json").read_text())

    (le, de), (lc, dc) = run(eager), run(compiled)
    assert (de["samples"], de["bad_samples"]) == (dc["samples"], dc["bad_samples"]) == (31, {"undecodable": 1})
    assert len(le) == 4
    torch.testing.assert_close(lc, le, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["satellite", "audio"])
def test_encoders_with_grad_checkpointing_still_trace_as_one_graph(kind):
    torch.manual_seed(0)
    if kind == "audio":
        encoder = ClapAudioEncoder.create("audio", tiny_clap_audio_spec(32), 32, {})
        batch = torch.randn(4, encoder.audio.clip_samples) * 0.1
    else:
        encoder = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)),
                                    ImageTransform(32, SATELLITE_MEAN, SATELLITE_STD, "overhead"))
        batch = {"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)}
    encoder.train().set_grad_checkpointing(True)
    graphs, breaks = _graph_breaks(encoder, batch)
    assert (graphs, breaks) == (1, [])
