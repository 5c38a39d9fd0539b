"""Routing traces of a VLM: what every MoE layer (vision MLPs in depth order, then the connector)
chose for the patches of a labelled set of images, in the on-disk format of
`libmoe.moe.trace` (so `libmoe analyze` and every routing metric read it). A "token" is one
patch of the base grid: `tokens` and `position` hold the patch index, `label` the image's subtask.
With S2 the vision layers are recorded on the 1x pass (the crops of larger scales are other
patches); CLIP's CLS token is left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..moe.trace import Trace
from .model import LibMoEVLM


@torch.no_grad()
def record_vlm_trace(model: LibMoEVLM, pixels: Tensor, labels: Tensor, label_names: list[str],
                     step: int | None = None, batch_size: int = 32) -> Trace:
    """Run the image tower and connector over pixels [N, 3, S, S] and record every MoE layer."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layers to record (a dense VLM has no routing).")
    per_image = model.n_image_tokens
    store: list[dict[str, list[Tensor]]] = [{"idx": [], "w": [], "p": []} for _ in layers]
    seen: set[int] = set()

    def hook(i: int):
        def fn(module, args, output):
            if i in seen:  # S2: the 1x pass comes first; larger scales' crops are not recorded
                return
            seen.add(i)
            r = module.routing
            n = r.topk_idx.shape[0]
            keep = torch.ones(n, dtype=torch.bool)
            if model.is_clip and module.chain is not None:  # vision rows include CLS: drop it
                keep = (torch.arange(n) % (per_image + 1)) != 0
            store[i]["idx"].append(r.topk_idx.detach().cpu()[keep])
            store[i]["w"].append(r.topk_weight.detach().float().cpu()[keep])
            store[i]["p"].append(r.probs.detach().float().cpu()[keep])
        return fn

    hooks = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(0, len(pixels), batch_size):
            seen.clear()
            model.image_features(pixels[s : s + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = len(pixels)
    patch = torch.arange(per_image).repeat(n)
    first = layers[0].moe
    moe = model.spec.get("moe") or {}
    meta = {"step": step, "algorithm": moe.get("algorithm", first.algorithm), "n_experts": first.n_experts,
            "top_k": first.top_k, "layers": list(range(len(layers))), "label_kind": "subtask",
            "layer_names": [f"vision{i}" if m.chain is not None else "connector"
                            for i, m in enumerate(layers)]}
    return Trace(
        topk_idx=[torch.cat(s["idx"]) for s in store],
        topk_weight=[torch.cat(s["w"]) for s in store],
        probs=[torch.cat(s["p"]) for s in store],
        tokens=patch.clone(), position=patch.clone(),
        label=labels.long().repeat_interleave(per_image), labels=list(label_names), meta=meta,
    )
