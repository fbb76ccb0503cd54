"""threestudio's Perp-Neg for the guidance in integrations/threestudio.py, as a `diffsolve.guidance_extra.PerpNeg`
transform with threestudio's form (threestudio/models/guidance/stable_diffusion_guidance.py `compute_grad_sds`,
`use_perp_neg`; threestudio/utils/ops.py `perpendicular_component`), in eps space:

    e_pos = eps_text - eps_uncond,   e_i = eps_neg_i - eps_uncond,
    eps = eps_uncond + s (e_pos + sum_i w_i perp(e_i, e_pos)),   perp(x, y) = x - <x, y> / max(<y, y>, 1e-6) y,

with k negatives per view and per-view weights w [B, k] (negative numbers: the prompt processor's
`get_text_embeddings_perp_neg` returns them with the embeddings [text B, uncond B, negatives k B interleaved]).
diffsolve's `PerpNeg` takes one negative and a scalar weight; this subclass keeps its evaluation (one batched call
of (k + 2) B rows through `predict_under`) and generalises the combination.
"""
import torch

from diffsolve.guidance_extra import PerpNeg

__all__ = ["ThreestudioPerpNeg", "perp_neg_conditions"]


class ThreestudioPerpNeg(PerpNeg):
    def __init__(self, scale, uncond, negatives, weights, *, batched=True):
        if not negatives:
            raise ValueError("Perp-Neg needs at least one negative condition")
        super().__init__(scale, negatives[0], uncond, neg_scale=1.0, space="eps", batched=batched)
        self.overrides = [uncond, *negatives, {}]
        self.evaluations = len(self.overrides)
        self.weights = torch.as_tensor(weights)
        if self.weights.ndim != 2 or self.weights.shape[1] != len(negatives):
            raise ValueError(f"weights must be [B, {len(negatives)}], got shape {tuple(self.weights.shape)}")

    def combine(self, preds):
        u, negs, c = preds[0], preds[1:-1], preds[-1]
        pos = c - u
        dims = tuple(range(1, pos.ndim))
        pos2 = (pos * pos).sum(dims, keepdim=True).clamp(min=1e-6)
        acc = torch.zeros_like(pos)
        w = self.weights.to(device=pos.device, dtype=pos.dtype)
        for i, n in enumerate(negs):
            e = n - u
            perp = e - (e * pos).sum(dims, keepdim=True) / pos2 * pos
            acc = acc + w[:, i].reshape(-1, *([1] * (pos.ndim - 1))) * perp
        return u + self.scale * (pos + acc)


def perp_neg_conditions(prompt_utils, elevation, azimuth, camera_distances, view_dependent_prompting, batch):
    """(cond, uncond, [negative_i], weights [B, k]) from threestudio's `get_text_embeddings_perp_neg`."""
    emb, weights = prompt_utils.get_text_embeddings_perp_neg(elevation, azimuth, camera_distances,
                                                             view_dependent_prompting)
    k = weights.shape[-1]
    if emb.shape[0] != (2 + k) * batch:
        raise ValueError(f"perp-neg embeddings: expected {(2 + k) * batch} rows for {batch} views and {k} negatives, "
                         f"got {emb.shape[0]}")
    cond, uncond, neg = emb[:batch], emb[batch:2 * batch], emb[2 * batch:]
    return cond, uncond, [neg[i::k] for i in range(k)], weights
