"""Metrics of an optimised field against the truth (never the prior judging itself):

  - `iou`: 3-D IoU of the voxels the density makes opaque with the class's shape (geometry.shape_iou);
  - `view_error`: mean squared pixel error of renders from held-out cameras against the true renders
    from the same cameras (multi-view consistency);
  - `accuracy` and `fd`: the evaluation classifier's class accuracy on those renders, and the Fréchet
    distance of its features to real renders of the class;
  - `janus`: the fraction of back views (azimuth 180) that the azimuth classifier, trained on true
    renders, takes for a front view: a front painted on the back of the volume.
"""
import torch

from ..digits.evaluate import frechet_distance
from .data import to_model
from .geometry import shape_iou
from .model import azimuth_bin
from .render import render
from .world import CLASSES, field_of

__all__ = ["HELDOUT_AZIMUTHS", "field_metrics", "heldout_cameras", "real_features"]

HELDOUT_AZIMUTHS = tuple(float(a) for a in range(-180, 180, 30))  # 12 views, 30 degrees apart
HELDOUT_ELEVATION = 20.0


def heldout_cameras(distance=2.4):
    """The evaluation cameras: 12 azimuths at elevation 20 (not drawn by training's random cameras, whose
    elevation is continuous)."""
    n = len(HELDOUT_AZIMUTHS)
    return {"elevation": torch.full((n,), HELDOUT_ELEVATION), "azimuth": torch.tensor(HELDOUT_AZIMUTHS),
            "camera_distances": torch.full((n,), float(distance))}


@torch.no_grad()
def true_views(cls, cams, resolution=32):
    density, rgb = field_of(cls, resolution)
    return render(density, rgb, cams["elevation"], cams["azimuth"], cams["camera_distances"])


@torch.no_grad()
def real_features(classifier, data):
    """Per class: the classifier's features of its real training renders (the FD reference)."""
    return {c: classifier.features(data.train_images[data.train_labels == k]) for k, c in enumerate(CLASSES)}


@torch.no_grad()
def field_metrics(density, rgb, cls, classifier, reference_features):
    """Every metric of one optimised field (density [1, R, R, R], rgb [3, R, R, R]) of class `cls`."""
    cams = heldout_cameras()
    views = render(density, rgb, cams["elevation"], cams["azimuth"], cams["camera_distances"])
    truth = true_views(cls, cams, density.shape[-1])
    x = to_model(views)
    logits_cls, logits_az = classifier(x)
    k = CLASSES.index(cls)
    back = azimuth_bin(cams["azimuth"]) == 2
    janus = (logits_az.argmax(-1)[back] == 0).float().mean().item()
    return {"iou": shape_iou(density, cls), "view_error": ((views - truth) ** 2).mean().item(),
            "accuracy": (logits_cls.argmax(-1) == k).float().mean().item(),
            "fd": frechet_distance(classifier.features(x), reference_features[cls]),
            "janus": janus, "views": views}
