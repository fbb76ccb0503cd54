"""k-diffusion interop: its samplers and external wrappers, and diffsolve transforms under them.

`import k_diffusion` pulls torchvision, clip, clean-fid and more through its `__init__`. Where that
import works it is used as is. Otherwise (the slim CPU install of docs/install.md) the two real
modules this project needs, `k_diffusion.sampling` and `k_diffusion.external`, are loaded from the
installed package with a minimal stand-in for `k_diffusion.utils` that provides `append_dims`, the
only helper those two modules use.
"""
import importlib
import importlib.util
import sys
import types
from pathlib import Path

from diffsolve.denoisers import append_dims as _append_dims
from diffsolve.transforms import compose

_MODULES = {}


def _stand_in_utils():
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        if target_dims < x.ndim:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return _append_dims(x, target_dims)
    utils.append_dims = append_dims
    return utils


def _load_slim():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1")
    root = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    saved = {name: sys.modules.get(name) for name in ("k_diffusion", "k_diffusion.utils")}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = package, _stand_in_utils()
    try:
        loaded = {}
        for name in ("sampling", "external"):
            mspec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mspec.name] = module
            mspec.loader.exec_module(module)
            loaded[name] = module
        return loaded
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.modules.pop("k_diffusion.sampling", None)
        sys.modules.pop("k_diffusion.external", None)


def load():
    """Return (sampling, external): k-diffusion's real modules, full package or slim load."""
    if not _MODULES:
        try:
            kd = importlib.import_module("k_diffusion")
            _MODULES.update(sampling=kd.sampling, external=kd.external)
        except Exception:  # noqa: BLE001 - the full package fails to import without torchvision & co.
            _MODULES.update(_load_slim())
    return _MODULES["sampling"], _MODULES["external"]


def with_transforms(model, transforms):
    """A denoiser with diffsolve's score-face transforms applied, to run under k-diffusion's samplers.

    k-diffusion's callbacks cannot change x, so split (exact-flow) faces cannot run there: use the
    kernel's explicit "score" face under k-diffusion, or diffsolve's solvers for the split face.
    """
    denoiser, flows = compose(model, transforms)
    if flows:
        raise ValueError("k-diffusion samplers cannot apply exact-flow (split) transforms; use face='score' "
                         "or a diffsolve solver")
    return denoiser


def compvis_denoiser(unet, scheduler, quantize=False):
    """A diffusers UNet + scheduler as k-diffusion's own `external.CompVisDenoiser` (`CompVisVDenoiser` for
    v-prediction), over a small CompVis-style object exposing `alphas_cumprod` and
    `apply_model(x, t, cond) = unet(x, t, encoder_hidden_states=cond).sample` (the pattern of diffusers'
    former k-diffusion pipeline). Call it as `model(x, sigma, cond=encoder_hidden_states)`.

    The sigma table is built from `scheduler.alphas_cumprod` in float64 (as diffsolve's `VPDenoiser`);
    timesteps reach the UNet in float32 unless x is float64 (as `UNetEps` through `VPDenoiser`).
    """
    import torch

    _, external = load()
    prediction_type = scheduler.config.prediction_type
    wrappers = {"epsilon": external.CompVisDenoiser, "v_prediction": external.CompVisVDenoiser}
    if prediction_type not in wrappers:
        raise ValueError(f"k-diffusion's CompVis wrappers take epsilon or v_prediction models, got "
                         f"prediction_type={prediction_type!r}")

    class _CompVisUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet
            self.register_buffer("alphas_cumprod",
                                 torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone(),
                                 persistent=False)

        def apply_model(self, x, t, cond):
            t = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            return self.unet(x, t, encoder_hidden_states=cond).sample

    inner = _CompVisUNet()
    return wrappers[prediction_type](inner, quantize=quantize, device=inner.alphas_cumprod.device)
