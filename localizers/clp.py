"""CLP: Channel Lipschitzness-based Pruning's score (METHODS.md §3.4; METHODS-REFERENCE.md §A4).

Data-free (Zheng et al., ECCV'22, official code ``rkteddy/channel-Lipschitzness-based-pruning``
``defense.py::CLP``; identical in BackdoorBench ``defense/clp.py::CLP_prune``). For every
neuron layer (conv followed by BN) and output channel ``k``:

* fold the BN into the kernel: ``W_k' = W_k · |γ_k / σ_k|`` with ``W_k`` the (C_in, kh, kw)
  kernel reshaped to the matrix (C_in, kh·kw) and ``σ_k = sqrt(running_var_k)`` — **without**
  BN's eps, as in the original code;
* ``UCLC_k`` = the largest singular value (spectral norm) of ``W_k'``.

All channels of a layer are computed in one batched ``torch.linalg.matrix_norm(ord=2)`` (the
same value as the original's ``torch.svd(w)[1].max()``), on ``device``. Higher UCLC = more
suspicious. The conv→BN pairing comes from ``NeuronMap`` (the BN that follows the conv in
registration order), so ResNet shortcut convs are included and pre-activation nets are not
mis-paired.

Settings:

* ``standardize`` (default False): the scores are the raw UCLC, the quantity the original ranks
  and thresholds, so the harness's threshold-free all-layer metrics (AUROC, AP) are computed on
  it. ``True`` returns ``(UCLC − μ) / s`` per layer (μ and ``s`` the layer's mean and unbiased
  std, ``torch.std``, as in the threshold rule), for display only: it is a positive affine map
  within a layer, so the per-layer top-k is the same either way, but across layers it is a
  different ranking (Spearman ρ 0.53 against the raw UCLC on a CIFAR-10 VGG-13, issue 11), and
  it was the default before issue 11. A layer whose UCLC are all equal (s = 0) or that has one
  channel gets standardized scores of 0, never NaN.
* ``u`` (default 3, CLP ``test.py -u 3.``; BB ``config/defense/clp/config.yaml`` ``u: 3``): the
  threshold of CLP's own pruning rule, channel ``k`` is suspicious if ``UCLC_k > μ + u·s``
  (``suspicious``). It does not change the scores.

Deviations (edge cases the original does not handle; neither happens on trained models):
a channel with ``running_var = 0`` would give ``γ/0`` (inf, or NaN with γ = 0) in the
original; we use ``sqrt(eps)`` of that BN there, i.e. what BN actually divides by. A BN
without affine parameters uses γ = 1; one without running statistics uses σ = 1 (raw kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from localizers.base import Localizer, outliers, register_localizer, standardize_per_layer

__all__ = ["CLP", "uclc", "standardize_per_layer"]


def uclc(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None, device: torch.device | str | None = None) -> torch.Tensor:
    """Upper bound of the channel Lipschitz constant of every output channel of ``conv``→``bn``.

    ``bn`` None (a pre-activation network's neuron is the conv output itself, ``bd4nn.preact``):
    nothing to fold, the bound is the spectral norm of the channel's filter [decision: CLP's
    code pairs each BN with the last conv before it in module order, which in a PreAct block
    folds ``bn1``, the normalization of a residual sum, into whichever conv came last, and
    leaves ``conv2`` and the shortcut conv unscored].

    Returns a float32 tensor of size ``conv.out_channels`` on ``device`` (default: the conv's).
    Reads the weights only (detached); nothing in the modules changes.
    """
    dev = torch.device(device) if device is not None else conv.weight.device
    w = conv.weight.detach().to(device=dev, dtype=torch.float32)
    c_out = w.shape[0]
    w = w.reshape(c_out, w.shape[1], -1)  # (C_out, C_in, kh*kw): one matrix per channel
    if bn is not None and bn.weight is not None:
        gamma = bn.weight.detach().to(device=dev, dtype=w.dtype)
    else:
        gamma = torch.ones(c_out, device=dev, dtype=w.dtype)
    if bn is not None and bn.running_var is not None:
        var = bn.running_var.detach().to(device=dev, dtype=w.dtype)
        sigma = var.sqrt()  # no eps: original code
        sigma = torch.where(sigma > 0, sigma, torch.full_like(sigma, float(bn.eps) ** 0.5))
    else:
        sigma = torch.ones(c_out, device=dev, dtype=w.dtype)
    folded = w * (gamma / sigma).abs().view(-1, 1, 1)
    return torch.linalg.matrix_norm(folded, ord=2).float()


@register_localizer
class CLP(Localizer):
    name = "clp"
    scope = "all"
    summary = "high channel Lipschitz upper bound (BN-folded spectral norm), data-free"

    @dataclass
    class Settings:
        standardize: bool = False  # True: per-layer (UCLC − μ)/s, for display; same per-layer top-k
        u: float = 3.0  # CLP test.py -u 3.; BB config/defense/clp/config.yaml u: 3

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        out = {}
        with torch.no_grad():
            for layer in self.layers(neuron_map):
                raw = uclc(neuron_map.conv(layer), neuron_map.bn(layer), dev)
                out[layer] = standardize_per_layer(raw) if self.settings.standardize else raw
        return out

    def suspicious(self, scores: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """CLP's own pruning rule: per layer, the channels with score ``> μ + u·s``.

        ``scores`` is the output of ``scores`` (raw or standardized: the rule is invariant
        under the per-layer standardization). μ and ``s`` are the layer's mean and unbiased
        std; a layer with ``s = 0`` (or one channel) has no suspicious channel. Returns a
        selection ``{layer: sorted channels}`` without empty layers.
        """
        return outliers(scores, float(self.settings.u))
