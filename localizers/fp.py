"""FP: Fine-Pruning's activation criterion (METHODS.md §3.1; METHODS-REFERENCE.md §A1).

Idea (Liu et al., RAID'18): backdoor neurons are dormant on clean inputs, so the channels of the
last conv layer with the lowest mean clean activation are the suspicious ones.

Score of channel ``c`` of the penultimate neuron layer (``neuron_map.penultimate``, the last
conv→BN unit feeding the head), with the model in eval mode (BN uses its running statistics)::

    feature="head" (default):   A_c = mean_n f(x_n)_c           score_c = -A_c

where ``f(x)`` is the input of the classifier head: the pooled, flattened feature the classifier
reads. We follow BackdoorBench's Fine-Pruning (``defense/fp.py``: a forward hook on the model's
last child, the ``nn.Linear``, takes ``input[0]``, sums it over the clean subset and divides by
its size, then ``argsort`` ascending: the lowest mean is pruned first); the original
Fine-Pruning code (kangliucn, ``face/conv_output_prune.py`` and ``speech/conv_output_prune.py``)
likewise ranks the output of the max-pool that follows the ReLU of the pruned conv layer. In
bd4nn's VGGs the head reads the 2×2 → 1×1 max-pool of relu(BN(conv)) of the last conv layer;
in the ResNets it reads the average-pooled, post-ReLU output of the last block (the residual
stream, whose channel ``c`` is channel ``c`` of the last block's ``bn2`` and of its shortcut);
in PreAct-ResNet-18 (``bd4nn.preact``) the average-pooled residual sum of the last block, with no
BN or ReLU after it (BackdoorBench's model), whose channel ``c`` is channel ``c`` of the last
neuron layer ``layer4.1.conv2`` and of the block's input.
Lower activation = more suspicious, so the score is the *negated* mean and the harness's top-k
picks the most dormant channels.

``feature="neuron"``: ``A_c = mean_{n,h,w} relu(BN_c(conv(x_n)))[h, w]``, the neuron's own
post-ReLU activation before pooling and, in a ResNet, before the residual add (TrojanZoo's
``fine_pruning.py`` and BackdoorBox's ``Pruning.py`` average this pre-pool map over dims 0, 2,
3). It was bd4nn's default before issue 11: on a CIFAR-10 VGG-13 (width 1/4, BadNets) its
ranking had Spearman ρ 0.22–0.27 against BackdoorBench's, and pooling alone made the gap.

Only the ranking is a published default; the pruning / fine-tuning half of Fine-Pruning is a
repair (METHODS.md §4) and not part of this localizer. The clean subset size (BB
``config/defense/fp/config.yaml``: ratio 0.05) is the harness's 5% clean data. ``batch_size``
only sets memory use, never the result (up to float summation order; sums are accumulated in
float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bd4nn.capture import capture
from bd4nn.runtime import frozen
from localizers.base import Localizer, LocalizerError, register_localizer

__all__ = ["FP"]


@register_localizer
class FP(Localizer):
    name = "fp"
    scope = "penultimate"
    summary = "low mean clean activation of the last conv layer's channels, as the head reads them"

    @dataclass
    class Settings:
        feature: str = "head"  # BB defense/fp.py: the head's input; "neuron": pre-pool relu(BN) (module doc)
        batch_size: int = 256  # BB config/defense/fp/config.yaml batch 256; memory only

    def scores(self, model, neuron_map, clean, *, device=None, seed=0):
        s = self.settings
        bs = int(s.batch_size)
        if bs < 1:
            raise LocalizerError(f"fp: batch_size must be >= 1, got {bs}")
        if s.feature not in ("head", "neuron"):
            raise LocalizerError(f"fp: feature must be 'head' or 'neuron', not {s.feature!r}")
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        layer = neuron_map.penultimate
        size = neuron_map.sizes[layer]
        total = torch.zeros(size, device=dev, dtype=torch.float64)
        count = 0
        with frozen(model), torch.no_grad():
            if s.feature == "head":
                head = neuron_map.head()
                if head.in_features != size:
                    raise LocalizerError(
                        f"fp: the head reads {head.in_features} features but {layer} has {size} channels; "
                        "use feature='neuron' for this model")
                feats: list[torch.Tensor] = []
                handle = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0]))
                try:
                    for i in range(0, len(clean), bs):
                        feats.clear()
                        model(clean.float_batch(i, i + bs, dev))
                        f = feats[0].flatten(1)
                        total += f.sum(0, dtype=torch.float64)
                        count += f.shape[0]
                finally:
                    handle.remove()
            else:
                with capture(neuron_map, [layer]) as captured:
                    for i in range(0, len(clean), bs):
                        captured.clear()
                        model(clean.float_batch(i, i + bs, dev))
                        a = torch.relu(captured[layer])  # (B, C, H, W) post-ReLU neuron activation
                        total += a.sum((0, 2, 3), dtype=torch.float64)
                        count += a.shape[0] * a.shape[2] * a.shape[3]
        mean = total / count
        return {layer: (-mean).float()}
