import copy

import pytest
import yaml
from fixtures import tiny_config

from geobind.cli import main
from geobind.config import ConfigError, apply_overrides, load_config, parse_config


def test_parse_resolves_paths_and_defaults(tiny_data, tmp_path):
    cfg = parse_config(tiny_config(tiny_data, tmp_path / "run"))
    assert [s.name for s in cfg.stages] == ["satellite", "audio"]
    assert cfg.stages[0].optim.betas == (0.9, 0.98)
    assert cfg.stages[0].loss.temperature == 0.07
    assert cfg.stages[1].loss.symmetric is True


def test_relative_paths_are_relative_to_the_config_file(tiny_data, tmp_path):
    d = tiny_config(tiny_data, "run")
    d["stages"][0]["data"]["train"] = "data/stage1.csv"
    p = tmp_path / "cfg" / "run.yaml"
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(d))
    cfg = load_config(p)
    assert cfg.output_dir == str(tmp_path / "cfg" / "run")
    assert cfg.stages[0].data.train == str(tmp_path / "cfg" / "data" / "stage1.csv")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["stages"][0]["optim"].update(learning_rate=1), "unknown key(s) learning_rate"),
        (lambda d: d["stages"][0]["optim"].update(batchsize=8), "unknown key(s) batchsize (did you mean batch_size"),
        (lambda d: d["stages"][0]["optim"].update(epochs=float("inf")), "optim.epochs: expected int, got inf"),
        # transformers would keep a misspelt field as an attribute, and build the default model.
        (lambda d: d["anchor"].update(config={**d["anchor"]["config"], "vision_config": {
            **d["anchor"]["config"].get("vision_config", {}), "num_hiden_layers": 1}}),
         "anchor.config.vision_config: unknown CLIPVisionConfig field(s) num_hiden_layers (did you mean "
         "num_hidden_layers"),
        (lambda d: d["stages"][1]["encoder"]["config"].update(depth=[1, 1]),
         "audio encoder spec: config: unknown ClapAudioConfig field(s) depth (did you mean depths"),
        (lambda d: d["stages"][0]["encoder"].update(config={"hiden_size": 32}),
         "encoder clip_vision: config: unknown CLIPVisionConfig field(s) hiden_size (did you mean hidden_size"),
        (lambda d: d["stages"][0].update(data=None), "0].data: empty; give a mapping"),
        (lambda d: d["stages"][0].update(encoder=None), "0].encoder: empty; give a mapping"),
        (lambda d: d.update(epochs=3), "unknown key(s) epochs"),
        (lambda d: d["stages"][0].update(train="lidar"), "unknown modality 'lidar'"),
        (lambda d: d["stages"][0].update(bind_to="audio"), "not in the space yet"),
        (lambda d: d["stages"][1].update(bind_to="sentinel"), "unknown modality"),
        (lambda d: d["stages"][0]["encoder"].update(type="resnet"), "unknown encoder type 'resnet'"),
        (lambda d: d["stages"][0]["optim"].update(batch_size=1), "at least 2"),
        (lambda d: d["stages"][0]["optim"].update(max_steps="ten"), "expected int"),
        (lambda d: d.pop("anchor"), "exactly one of `anchor`"),
        (lambda d: d["stages"].append(copy.deepcopy(d["stages"][0])), "duplicate stage name"),
        (lambda d: d["stages"][0]["optim"].update(epochs=-1), "optim.epochs: at least 1"),
        (lambda d: d["stages"][0]["optim"].update(log_every=0), "optim.log_every: at least 1"),
        (lambda d: d["stages"][0]["optim"].update(max_steps=-5), "optim.max_steps: 0 or more"),
        (lambda d: d["stages"][0]["optim"].update(lr=0), "optim.lr: a positive number"),
        (lambda d: d["stages"][0]["optim"].update(lr=float("nan")), "optim.lr: a positive number"),
        (lambda d: d["stages"][0]["optim"].update(grad_clip=-1), "optim.grad_clip: 0 (off) or a positive"),
        (lambda d: d["stages"][0]["optim"].update(weight_decay=-0.1), "optim.weight_decay: 0 (off)"),
        (lambda d: d["stages"][0]["optim"].update(eps=0), "optim.eps: a small positive number"),
        (lambda d: d["stages"][0]["optim"].update(min_lr_ratio=5), "optim.min_lr_ratio: a fraction"),
        (lambda d: d["stages"][0]["optim"].update(betas=[0.9]), "optim.betas: two numbers in"),
        (lambda d: d["stages"][0]["optim"].update(betas=0.9), "optim.betas: two numbers, e.g."),
        (lambda d: d["stages"][0]["loss"].update(queue_size=-5) if "loss" in d["stages"][0]
         else d["stages"][0].update(loss={"queue_size": -5}), "loss.queue_size: 0 (no queue) or more"),
        (lambda d: d.update(device="tpu"), "config.device: use auto, cpu, cuda or cuda:N"),
        (lambda d: d.update(output_dir=None), "output_dir: expected str, got None"),
        # An encoder of a later stage is checked before the first trains.
        (lambda d: d["stages"][1]["encoder"].update(bogus=1), "(audio).encoder: audio encoder spec: unknown keys"),
        (lambda d: d["stages"][0]["encoder"].update(augment_on="gpu"), "(satellite).encoder: encoder clip_vision: augment_on"),
    ],
)
def test_bad_configs_fail_before_training(tiny_data, tmp_path, mutate, message):
    d = tiny_config(tiny_data, tmp_path / "run")
    mutate(d)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(d)
    assert not (tmp_path / "run").exists()


def test_overrides_by_index_and_by_stage_name(tiny_data, tmp_path):
    d = tiny_config(tiny_data, tmp_path / "run")
    d = apply_overrides(d, ["stages.0.optim.lr=0.5", "stages.audio.optim.batch_size=4", "seed=7",
                            "stages.satellite.loss.queue_size=16"])
    cfg = parse_config(d)
    assert cfg.stages[0].optim.lr == 0.5
    assert cfg.stages[1].optim.batch_size == 4
    assert cfg.stages[0].loss.queue_size == 16
    assert cfg.seed == 7
    with pytest.raises(ConfigError, match="no stage named 'lidar'"):
        apply_overrides(d, ["stages.lidar.optim.lr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(d, ["seed"])


def test_the_packaged_paper_config_is_valid():
    from importlib.resources import files

    text = files("geobind").joinpath("configs/paper.yaml").read_text()
    cfg = parse_config(yaml.safe_load(text), "/data")
    assert [(s.train, s.bind_to) for s in cfg.stages] == [("satellite", "ground"), ("audio", "satellite")]
    assert cfg.anchor["pretrained"] == "openai/clip-vit-base-patch32"  # a hub id, left as is
    assert cfg.stages[0].loss.queue_size == 9000 and not cfg.stages[0].loss.symmetric
    assert cfg.stages[0].data.train == "/data/data/sat2cap/train.csv"


def test_help_loads_neither_torch_nor_pandas():
    """``geobind --help`` and every subcommand's parser stay light (no torch, pandas, transformers)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from geobind.cli import main\n"
        "for argv in (['--help'], ['index', 'build', '--help'], ['map', '--help'], ['train', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_unreadable_yaml_and_impossible_overrides_name_the_problem(tiny_data, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("output_dir: run\nstages:\n  - name: s\n   bind_to: ground\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML") as e:
        load_config(bad)
    assert f'in "{bad}", line 4' in str(e.value) and "<unicode string>" not in str(e.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a YAML mapping"):
        load_config(listed)
    d = tiny_config(tiny_data, tmp_path / "run")
    with pytest.raises(ConfigError, match="output_dir is a str, not a section"):
        apply_overrides(d, ["output_dir.x=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides(d, ["seed=[1"])
    with pytest.raises(ConfigError, match="no stage named 'satelite'; the stages are satellite, audio"):
        apply_overrides(d, ["stages.satelite.optim.lr=1"])


def test_devices_are_checked_with_a_message_that_says_what_to_use():
    import torch

    from geobind.distributed import parse_device

    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        parse_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is usable here"):
            parse_device("cuda")


def test_an_existing_output_error_pickles_with_its_path(tmp_path):
    import pickle

    from geobind.search.common import OutputExistsError

    e = pickle.loads(pickle.dumps(OutputExistsError(tmp_path / "x.json")))
    assert e.path == tmp_path / "x.json" and str(e).count("exists") == 1
    assert e.cli_message() == f"{tmp_path / 'x.json'} exists; pass --force to overwrite it"


def test_plugins_named_in_the_environment_are_imported_by_every_command(tmp_path, monkeypatch, capsys):
    from geobind import modality
    from geobind.modality import get_modality

    # The probe modality is gone after the test: a registered modality is part of every shard
    # set's identity, which later tests' ranks (spawned without it) would compute otherwise.
    monkeypatch.setattr(modality, "_REGISTRY", dict(modality._REGISTRY))

    (tmp_path / "geobind_probe_plugin.py").write_text(
        "from geobind.modality import ModalitySpec, register_modality\n"
        "register_modality(ModalitySpec('probe_modality', 'path', ('probe.tif',)), exist_ok=True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="GEOBIND_PLUGINS"):
        get_modality("probe_modality")
    monkeypatch.setenv("GEOBIND_PLUGINS", "geobind_probe_plugin, ")
    assert main(["index", "info", str(tmp_path / "none.index")]) == 2  # the command itself fails
    assert get_modality("probe_modality").shard_keys == ("probe.tif",)
    monkeypatch.setenv("GEOBIND_PLUGINS", "no_such_plugin_module")
    assert main(["index", "info", str(tmp_path / "none.index")]) == 2
    assert "GEOBIND_PLUGINS names 'no_such_plugin_module', which cannot be imported" in capsys.readouterr().err


def test_shipped_configs_print_and_a_missing_config_is_explained(capsys):
    from geobind.cli import main

    assert main(["train", "--show-config", "paper"]) == 0
    text = capsys.readouterr().out
    paper = yaml.safe_load(text)
    assert [s["name"] for s in paper["stages"]] == ["satellite", "audio"]
    assert main(["train"]) == 2
    assert "--show-config paper > run.yaml" in capsys.readouterr().err


def test_an_org_name_model_path_beside_the_config_is_a_folder_not_a_hub_id(tmp_path):
    """``demo/anchor`` next to the config is that folder; ``openai/clip-vit-base-patch32``, which
    is no folder there, stays a Hub id; relative paths become absolute."""
    (tmp_path / "demo" / "anchor").mkdir(parents=True)
    stages = [{"name": "s", "train": "satellite", "bind_to": "ground",
               "encoder": {"type": "clip_vision", "init_from": "ground"}, "data": {"train": "x.csv"}}]
    for given, want in (("demo/anchor", str(tmp_path / "demo" / "anchor")),
                        ("./demo/../demo/anchor", str(tmp_path / "demo" / "anchor")),
                        ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32")):
        cfg = parse_config({"output_dir": "runs/x", "anchor": {"type": "clip", "pretrained": given},
                            "stages": stages}, tmp_path)
        assert cfg.anchor["pretrained"] == want, given
        assert cfg.output_dir == str(tmp_path / "runs" / "x")


def test_settings_that_would_train_wrong_are_refused(tiny_data, tmp_path):
    """Each refused before training, naming the field: an anchor whose two towers serve one
    modality (its text tower would read photo paths as captions), a temperature outside [0.01, 1],
    a stage name that is no folder name, a value of the wrong kind."""
    def cfg(**changes):
        d = tiny_config(tiny_data, tmp_path / "run")
        for key, value in changes.items():
            d = apply_overrides(d, [f"{key}={value}"])
        return d

    for key, value, said in (
        ("anchor_modalities", "{image: ground, text: ground}", "two different modalities; both are 'ground'"),
        ("anchor_modalities", "{text: text}", "a mapping of the CLIP anchor's two towers"),
        ("anchor_modalities", "[image]", "anchor_modalities: expected a mapping"),
        ("stages.satellite.loss.temperature", ".nan", "loss.temperature: from 0.01 to 1"),
        ("stages.satellite.loss.temperature", "5", "loss.temperature: from 0.01 to 1"),
        ("stages.satellite.name", "a/b", "name: letters, digits"),
        ("stages.satellite.optim.lr", "true", "optim.lr: expected float, got True"),
        ("stages.satellite.optim.num_workers", "true", "optim.num_workers: use auto or a number"),
        ("stages.satellite.encoder", "clip_vision", "encoder: expected a mapping"),
        ("anchor", "openai/clip-vit-base-patch32", "config.anchor: expected a mapping"),
        ("stages.audio.encoder", "{type: clip_vision}", "type clip_vision reads image, but 'audio' is audio data"),
        ("anchor", "{}", "config.anchor: give `pretrained`"),
        ("anchor.pretraind", "x", r"config.anchor: unknown key\(s\) \['pretraind'\]"),
    ):
        with pytest.raises(ConfigError, match=said):
            parse_config(cfg(**{key: value}))


def test_an_empty_optim_or_loss_section_takes_the_defaults(tiny_data, tmp_path):
    """Every key of a section commented out leaves it empty (None in YAML): its defaults."""
    d = tiny_config(tiny_data, tmp_path / "run")
    d["stages"][0]["optim"] = None
    d["stages"][0]["loss"] = None
    cfg = parse_config(d)
    assert cfg.stages[0].optim == type(cfg.stages[0].optim)()
    assert cfg.stages[0].loss == type(cfg.stages[0].loss)()


def test_set_without_an_equals_sign_says_key_equals_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "run.yaml"), "--set", "seed", "3"])
    assert e.value.code == 2
    assert "expected KEY=VALUE, e.g. stages.satellite.optim.lr=1e-4 (no spaces around =), got 'seed'" in (
        capsys.readouterr().err)


def test_an_encoder_type_no_stage_can_build_is_refused_when_parsed(tiny_data, tmp_path):
    d = tiny_config(tiny_data, tmp_path / "run", audio=False)
    d["stages"][0]["encoder"] = {"type": "clip_image"}
    with pytest.raises(ConfigError, match=r"stages\[0\].*type clip_image is not trained by a stage .*a stage trains "
                                          r"one of: .*clap_audio.*clip_vision"):
        parse_config(d)


def test_a_satellite_image_size_the_tower_cannot_take_names_the_key(tiny_data):
    from test_model import build_space

    from geobind.encoders import ClipVisionEncoder

    space = dict(build_space(tiny_data).encoders.items())
    size = space["ground"].clip.config.vision_config.image_size
    with pytest.raises(ValueError, match=f"image_size {size * 2} differs from the tower's {size}: leave image_size out"):
        ClipVisionEncoder.create("satellite", {"init_from": "ground", "image_size": size * 2}, 32, space)
    assert ClipVisionEncoder.create("satellite", {"init_from": "ground", "image_size": size}, 32, space)
