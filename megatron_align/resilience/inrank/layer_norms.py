"""Per-layer gradient, parameter and update norms into the metrics record, every ``interval`` steps.

OLMo-core's monitor callback: a global grad norm says *that* something moved, per-layer norms say *where*
(an embedding whose updates grow, one layer whose gradient spikes; Adam update-norm spikes precede loss spikes).
Groups: ``embedding``, ``layer00`` ... (global transformer layer index, whatever the pipeline stage), ``final``
(final norm and output layer). Keys: ``norms/grad/<group>``, ``norms/param/<group>``, ``norms/update/<group>``.

How a norm over a sharded model is summed once: each rank adds the squares of the parameters it owns, leaving
out tensor-parallel duplicates and the tied output embedding (Megatron's own rule for the global grad norm,
``param_is_not_tensor_parallel_duplicate`` / ``param_is_not_shared``), and one all-reduce over the model-parallel
group (TP x PP) sums a vector of 3 x groups squares; data-parallel replicas hold the same values. That one
collective, on logged steps only, is the whole cost besides the norms themselves. Gradients are read after
forward/backward (DDP's ``main_grad``, reduced, before clipping); the update norm compares each parameter with a
copy taken then (a skipped step's update is 0).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_align.config.resilience import LayerNormsConfig
from megatron_align.training.callbacks import Callback

if TYPE_CHECKING:
    from megatron_align.training.trainer import Trainer

log = logging.getLogger(__name__)


def group_names(num_layers: int) -> list[str]:
    return ["embedding", *(f"layer{i:02d}" for i in range(num_layers)), "final"]


def parameter_groups(model_chunks, num_layers: int) -> list[tuple[int, torch.nn.Parameter]]:
    """(group index into :func:`group_names`, parameter) for every parameter this rank counts."""
    out = []
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        layer_of = {}
        for mod in module.modules():
            if isinstance(mod, TransformerLayer):
                for p in mod.parameters():
                    layer_of[id(p)] = mod.layer_number  # global and 1-based in Megatron-Core
        for name, p in module.named_parameters():
            if not (param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)):
                continue
            if id(p) in layer_of:
                group = layer_of[id(p)]
            else:
                group = 0 if name.startswith("embedding") else num_layers + 1
            out.append((group, p))
    return out


def _squares(tensors: list[torch.Tensor], groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of squares per group (float64)."""
    if not tensors:
        return torch.zeros(num_groups, dtype=torch.float64)
    norms = torch.stack(torch._foreach_norm([t.float() for t in tensors])).double()
    return torch.zeros(num_groups, dtype=torch.float64, device=norms.device).index_add_(0, groups.to(norms.device),
                                                                                         norms * norms)


class LayerNorms(Callback):
    priority = 32  # after the loss trajectory, before skip step and numerics decide about the step
    name = "layer_norms"

    def __init__(self, cfg: LayerNormsConfig) -> None:
        self.cfg = cfg
        self._params: list[torch.nn.Parameter] = []
        self._before: list[torch.Tensor] | None = None
        self._grad_sq: torch.Tensor | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        num_layers = trainer.config.model.num_layers
        self.names = group_names(num_layers)
        pairs = parameter_groups(trainer.model, num_layers)
        self._groups = torch.tensor([g for g, _ in pairs], dtype=torch.long)
        self._params = [p for _, p in pairs]
        ddp = getattr(trainer.model[0], "ddp_config", None)
        self._grads_ok = not getattr(ddp, "use_distributed_optimizer", False)
        if not self._grads_ok and trainer.rank == 0:
            log.warning("resilience.layer_norms: per-layer grad norms are not logged with the distributed optimizer "
                        "(its reduce-scatter leaves each rank only a shard of the reduced gradient)")

    def _due(self, step: int) -> bool:
        return bool(self.cfg.interval) and step % self.cfg.interval == 0

    def on_loss(self, trainer: Trainer, step: int, loss: float) -> None:
        """After backward (gradients reduced), before the update."""
        self._grad_sq, self._before = None, None
        if not self._due(step):
            return
        with torch.no_grad():
            if self._grads_ok:
                grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
                         for p in self._params]
                self._grad_sq = _squares([g if g is not None else torch.zeros(1) for g in grads], self._groups,
                                         len(self.names))
            if self.cfg.update_norms:
                self._before = [p.detach().clone() for p in self._params]

    def on_step_end(self, trainer: Trainer, step: int, record: dict) -> None:
        if not self._due(step):
            return
        num = len(self.names)
        with torch.no_grad():
            param_sq = _squares([p.detach() for p in self._params], self._groups, num)
            values = torch.zeros(3 * num, dtype=torch.float64, device=param_sq.device)
            values[num:2 * num] = param_sq
            if self._grad_sq is not None:
                values[:num] = self._grad_sq.to(values.device)
            if self._before is not None:
                deltas = [p.detach() - b for p, b in zip(self._params, self._before, strict=True)]
                values[2 * num:] = _squares(deltas, self._groups, num).to(values.device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(values, group=parallel_state.get_model_parallel_group())
            norms = values.sqrt().cpu().tolist()
        self._before = None
        for i, group in enumerate(self.names):
            if self._grads_ok:
                record[f"norms/grad/{group}"] = norms[i]
            record[f"norms/param/{group}"] = norms[num + i]
            if self.cfg.update_norms:
                record[f"norms/update/{group}"] = norms[2 * num + i]
