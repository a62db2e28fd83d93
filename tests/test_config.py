from pathlib import Path

import pytest
import yaml

from ms_diffusion.config import CONFIG_DIR, ConfigError, apply_overrides, config_from_dict, load_config
from ms_diffusion.experiment import build_diffusion


def test_shipped_configs_parse():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert {"fashion_mnist_fast.yaml", "fashion_mnist_tutorial.yaml", "image_folder.yaml", "cifar10.yaml"} <= set(names)
    for name in names:
        stem = Path(name).stem
        raw = yaml.safe_load((CONFIG_DIR / name).read_text())
        # a shipped config is named after its file, so `train.py --config X` writes to runs/X
        assert raw.get("name", stem) == stem, f"{name} sets name: {raw['name']!r}, not its file's stem"
        cfg = load_config(name)
        assert cfg.name == stem
        assert cfg.run_dir == Path("runs") / stem


def test_config_name_defaults_to_the_file_stem(tmp_path):
    minimal = "model: {type: unet, dim: 8}\ndiffusion: {type: gaussian, image_size: 8}\n"
    unnamed = tmp_path / "my_run.yaml"
    unnamed.write_text(minimal)
    assert load_config(str(unnamed)).name == "my_run"
    assert load_config(str(unnamed), ["name=other"]).name == "other"
    named = tmp_path / "file.yaml"
    named.write_text("name: explicit\n" + minimal)
    assert load_config(str(named)).name == "explicit"


def test_default_config_and_overrides():
    cfg = load_config(None, ["train.lr=3e-4", "model.dim_mults=[1, 2]", "train.clip_grad_norm=null", "seed=7"])
    assert cfg.name == "fashion_mnist_fast"
    assert cfg.train.lr == pytest.approx(3e-4)      # "3e-4" parses as a YAML string: coerced to float
    assert cfg.model["dim_mults"] == (1, 2)        # lists become tuples
    assert cfg.train.clip_grad_norm is None and cfg.seed == 7
    assert cfg.run_dir == Path("runs") / "fashion_mnist_fast"


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown key 'train.lrr' — did you mean 'lr'?"),
    ("model.dimm=8", "unknown key 'model.dimm' — did you mean 'dim'?"),
    ("diffusion.time_samplng=uniform", "did you mean 'time_sampling'?"),
    ("trian.lr=1", "unknown key 'trian' — did you mean 'train'?"),
    ("data.random_flp=true", "did you mean 'random_flip'?"),
    ("model.type=unett", "model.type: unknown type 'unett' — did you mean 'unet'?"),
    ("data.name=fashion_mnst", "did you mean 'fashion_mnist'?"),
    ("train.batch_size=1.5", "train.batch_size: expected an integer, got 1.5"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.progress=maybe", "expected true or false"),
    ("model.dim_mults=4", "model.dim_mults: expected a list"),
    ("train.optimizer=sgd", "optimizer must be one of"),
    ("train.num_steps=10", "warmup_steps (100) must be below num_steps (10)"),
    ("mode=eager", "mode: expected graph or pynative"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found; pass a path or one of the shipped configs"):
        load_config("no_such_config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=2"]) == {"a": {"b": 1, "c": {"d": 2}}}


def test_round_trip_and_build(tmp_path):
    cfg = load_config(None, ["model.dim=8", "model.dim_mults=[1, 2]"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()
    diffusion = build_diffusion(again)
    assert diffusion.image_size == (28, 28) and diffusion.model.channels == 1
    assert type(diffusion).__name__ == "FlowMatching" and diffusion.sampling_timesteps == 20


def test_yaml_is_safe_loaded(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(evil))
