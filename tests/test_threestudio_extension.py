"""The threestudio extension (extensions/threestudio-diffsolve) without threestudio installed: a stand-in `threestudio`
package mirrors what the extension touches - `threestudio.register` / `find` (threestudio/__init__.py: a name ->
class dict filled by a decorator), `BaseModule` (threestudio/utils/base.py: nn.Module + Updateable; __init__ parses
the config with parse_structured, sets device, calls configure(); do_update_step walks Updateable attributes and
calls update_step) and `parse_structured` (threestudio/utils/config.py: OmegaConf.structured(fields(**cfg))). The
extension registers on import, configures from each example YAML's guidance block (loaded with OmegaConf), and runs
on diffusers' tiny random components in place of the Stable Diffusion download."""
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

pytest.importorskip("diffusers")
omegaconf = pytest.importorskip("omegaconf")
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "extensions" / "threestudio-diffsolve"
YAMLS = sorted((EXT / "configs").glob("*.yaml"))


def stand_in_threestudio():
    ts = types.ModuleType("threestudio")
    ts.__modules__ = {}

    def register(name):
        def decorator(cls):
            ts.__modules__[name] = cls
            return cls
        return decorator

    ts.register, ts.find = register, lambda name: ts.__modules__[name]
    utils = types.ModuleType("threestudio.utils")
    config = types.ModuleType("threestudio.utils.config")
    config.parse_structured = lambda fields, cfg=None: OmegaConf.structured(fields(**({} if cfg is None else cfg)))
    base = types.ModuleType("threestudio.utils.base")

    class Updateable:
        def do_update_step(self, epoch, global_step, on_load_weights=False):
            for attr in self.__dir__():
                if attr.startswith("_"):
                    continue
                try:
                    module = getattr(self, attr)
                except Exception:
                    continue
                if isinstance(module, Updateable):
                    module.do_update_step(epoch, global_step, on_load_weights=on_load_weights)
            self.update_step(epoch, global_step, on_load_weights=on_load_weights)

        def update_step(self, epoch, global_step, on_load_weights=False):
            pass

    class BaseModule(torch.nn.Module, Updateable):
        @dataclass
        class Config:
            weights: Optional[str] = None

        def __init__(self, cfg=None, *args, **kwargs):
            super().__init__()
            self.cfg = config.parse_structured(self.Config, cfg)
            self.device = torch.device("cpu")
            self.configure(*args, **kwargs)

        def configure(self, *args, **kwargs):
            pass

    base.Updateable, base.BaseModule = Updateable, BaseModule
    ts.utils, utils.config, utils.base = utils, config, base
    return {"threestudio": ts, "threestudio.utils": utils, "threestudio.utils.config": config,
            "threestudio.utils.base": base}


@pytest.fixture()
def extension(monkeypatch):
    for name, mod in stand_in_threestudio().items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in [m for m in sys.modules if m.startswith("threestudio_diffsolve")]:
        monkeypatch.delitem(sys.modules, name)  # re-register against this stand-in
    spec = importlib.util.spec_from_file_location("threestudio_diffsolve", EXT / "__init__.py",
                                                  submodule_search_locations=[str(EXT)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "threestudio_diffsolve", module)
    spec.loader.exec_module(module)
    from diffsolve.integrations.diffusers import tiny_sd_components
    guidance_module = sys.modules["threestudio_diffsolve.guidance.diffsolve_guidance"]
    monkeypatch.setattr(guidance_module, "load_stable_diffusion", lambda *a, **k: tiny_sd_components())
    return sys.modules["threestudio"]


def guidance_block(path):
    conf = OmegaConf.load(path)
    return conf, OmegaConf.to_container(conf.system.guidance, resolve=True)


def test_example_configs_exist():
    assert {p.stem for p in YAMLS} == {"diffsolve-sds", "diffsolve-vsd", "diffsolve-sdi", "diffsolve-msd"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_loads_into_config_and_configures(extension, path):
    cls = extension.find("diffsolve-guidance")
    conf, block = guidance_block(path)
    assert conf.system.guidance_type == "diffsolve-guidance"
    block.update(half_precision_weights=False, image_size=32, latent_size=8)  # tiny CPU components
    if block["method"] == "msd":
        block["distiller_kwargs"] = {**block["distiller_kwargs"], "steps": 2, "center": "iterate"}
    if block["method"] == "sdi":
        block["distiller_kwargs"] = {**block["distiller_kwargs"], "n_inversion": 2}
    g = cls(block)
    assert g.cfg.method == path.stem.split("-")[1] and g.cfg.trainer_max_steps == conf.trainer.max_steps
    # every loss key the guidance returns has its lambda in the config's loss block
    g.do_update_step(0, 3)
    assert g.guidance.global_step == 3
    g_ = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 8, generator=g_), torch.randn(1, 77, 8, generator=g_)
    prompts = types.SimpleNamespace(use_perp_neg=False, get_text_embeddings=lambda e, a, c, v: torch.cat([cond, uncond]))
    rgb = torch.rand(1, 16, 16, 3, generator=g_).requires_grad_(True)
    out = g(rgb, prompts, torch.zeros(1), torch.zeros(1), torch.ones(1), c2w=torch.eye(4)[None])
    keys = {k for k in out if k.startswith("loss_")}
    assert keys and all(k.replace("loss_", "lambda_") in conf.system.loss for k in keys)
    loss = sum(v * conf.system.loss[k.replace("loss_", "lambda_")] for k, v in out.items() if k.startswith("loss_"))
    loss.backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all()


def test_unknown_config_key_is_refused(extension):
    with pytest.raises(Exception, match="nonexistent"):
        extension.find("diffsolve-guidance")({"nonexistent": 1})


def test_vsd_lora_parameters_are_module_parameters(extension):
    g = extension.find("diffsolve-guidance")({"method": "vsd", "half_precision_weights": False, "latent_size": 8})
    trainable = [n for n, p in g.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n or "camera_embedding" in n or "class_embedding" in n for n in trainable)
    assert any("camera_embedding" in n or "class_embedding" in n for n in trainable)
