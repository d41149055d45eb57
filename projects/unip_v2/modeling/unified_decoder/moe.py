"""Conditional MoE FFN with attribute-level routing (Uni-Perceiver-MoE, as used in
every FFN of Uni-Perceiver v2's unified decoder, Sec. 4.3 and 5.2).

Routing looks only at a segment's attribute vector, so every token of a segment, and
every sample whose segment has the same attributes, shares one decision. Experts are
therefore combined by merging their weights (W = sum_k g_k W_{e_k}, same for biases) per
distinct attribute row and running one dense FFN per group: dense FLOPs, no dispatch,
no capacity, no token dropping. fc1 and fc2 share the decision. As in Uni-Perceiver-MoE
the merge is per Linear, so the FFN computes W2_mix GELU(W1_mix x + b1_mix) + b2_mix,
which is *not* sum_k g_k FFN_{e_k}(x).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttributeGate", "ConditionalMoEFFN", "RoutingPlan", "group_tokens", "plan_routing"]


class RoutingPlan(NamedTuple):
    """Tokens grouped by their segment's distinct attribute row: segments with equal
    attributes share a decision, so they share one merged FFN. Every MoE layer of one
    decoder call uses the same plan: the decoder builds it once (plan_routing), not once per
    layer; each layer still gates the rows with its own parameters.

    unique_rows (U, A): the distinct attribute rows, in lexicographic order (as
    torch.unique(dim=0) sorts them; the gate's training noise is drawn in this order);
    order (N,): indices of the flattened (B*L) tokens sorted by group, stable;
    counts: tokens per group (U Python ints, summing to N).
    """
    unique_rows: torch.Tensor
    order: torch.Tensor
    counts: List[int]


def plan_routing(rows: Sequence[Sequence[float]], lengths: Sequence[int], batch: int,
                 device=None) -> RoutingPlan:
    """The routing plan of B sequences that share one segment layout, from host values: no
    tensor is read back from the device (no torch.unique, no .tolist()), so a decoder call
    on a GPU costs no synchronisation for its routing.

    Args:
        rows: the S segments' attribute rows (Python numbers, e.g. attributes.attribute_rows).
        lengths: the S segments' token counts; the sequence has L = sum(lengths) tokens,
            segment s at positions sum(lengths[:s]) ... in every one of the `batch` rows.
    """
    if len(rows) != len(lengths) or len(rows) == 0:
        raise ValueError(f"plan_routing: {len(rows)} attribute rows for {len(lengths)} "
                         f"segment lengths")
    keys = [tuple(float(v) for v in row) for row in rows]
    distinct = sorted(set(keys))
    group_of_segment = [distinct.index(k) for k in keys]
    counts = [0] * len(distinct)
    for group, n in zip(group_of_segment, lengths):
        counts[group] += batch * int(n)
    length = sum(int(n) for n in lengths)
    group = torch.repeat_interleave(torch.tensor(group_of_segment, device=device),
                                    torch.tensor(list(lengths), device=device),
                                    output_size=length)      # (L,); output_size: no sync
    order = torch.argsort(group.expand(batch, length).reshape(-1), stable=True)
    return RoutingPlan(torch.tensor(distinct, device=device), order, counts)


def group_tokens(segment_ids: torch.Tensor, attributes: torch.Tensor) -> RoutingPlan:
    """The plan of arbitrary segment_ids (B, L) integer and attributes (S, A), read from
    tensors (torch.unique and .tolist() wait for the device): what ConditionalMoEFFN uses
    when called without a plan. The decoder uses plan_routing."""
    unique_rows, row_of_segment = torch.unique(attributes, dim=0, return_inverse=True)
    group = row_of_segment[segment_ids.reshape(-1)]  # (B*L,)
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=unique_rows.shape[0]).tolist()
    return RoutingPlan(unique_rows, order, counts)


class AttributeGate(nn.Module):
    """Top-k gate on attribute vectors: Linear(attr -> width) + LayerNorm, then
    Linear(width -> E, no bias); training-only Gaussian noise of std 1/E on the logits;
    softmax over all E experts, keep the top k, renormalise the kept weights."""

    def __init__(self, attribute_dim: int, width: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.tag_transform = nn.Linear(attribute_dim, width)
        self.tag_norm = nn.LayerNorm(width)
        self.wg = nn.Linear(width, num_experts, bias=False)
        # Uni-Perceiver-MoE's "vmoe" noise policy: std NOISE_STD / E with NOISE_STD = 1.
        self.noise_std = 1.0 / num_experts
        nn.init.xavier_uniform_(self.tag_transform.weight)
        nn.init.zeros_(self.tag_transform.bias)
        nn.init.xavier_uniform_(self.wg.weight)

    def forward(self, attributes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """attributes (U, A) -> (expert indices (U, k) long, weights (U, k) summing to 1)."""
        # The gate runs outside autocast, in its parameters' dtype (fp32 unless the whole
        # model was cast), as Uni-Perceiver-MoE keeps wg in fp32: routing stays stable.
        with torch.autocast(device_type=attributes.device.type, enabled=False):
            hidden = self.tag_norm(self.tag_transform(attributes.to(self.wg.weight.dtype)))
            logits = self.wg(hidden)
            if self.training:
                # One draw per distinct attribute row and forward call.
                logits = logits + torch.randn_like(logits) * self.noise_std
            probs = logits.softmax(dim=-1)
            weights, indices = probs.topk(self.top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return indices, weights


class ConditionalMoEFFN(nn.Module):
    """FFN (fc1 -> GELU -> fc2) whose weights are a per-segment mixture of experts.

    Parameters: fc1_weight (E, ffn_dim, width), fc1_bias (E, ffn_dim),
    fc2_weight (E, width, ffn_dim), fc2_bias (E, width) and the gate. With
    ``enabled=False`` (Table 3 ablation) it is a plain dense FFN: nn.Linear fc1/fc2,
    initialised like one expert, and no gate.
    """

    def __init__(
        self,
        width: int,
        ffn_dim: int,
        num_experts: int = 8,
        top_k: int = 2,
        attribute_dim: int = 8,
        enabled: bool = True,
    ):
        super().__init__()
        self.width = width
        self.ffn_dim = ffn_dim
        self.attribute_dim = attribute_dim
        self.enabled = enabled
        if enabled:
            self.num_experts = num_experts
            self.fc1_weight = nn.Parameter(torch.empty(num_experts, ffn_dim, width))
            self.fc1_bias = nn.Parameter(torch.zeros(num_experts, ffn_dim))
            self.fc2_weight = nn.Parameter(torch.empty(num_experts, width, ffn_dim))
            self.fc2_bias = nn.Parameter(torch.zeros(num_experts, width))
            # xavier-uniform per expert (MAE-style init of Uni-Perceiver's Linears).
            for weight in (self.fc1_weight, self.fc2_weight):
                for expert in weight.data:
                    nn.init.xavier_uniform_(expert)
            self.gate = AttributeGate(attribute_dim, width, num_experts, top_k)
        else:
            self.num_experts = 1
            self.fc1 = nn.Linear(width, ffn_dim)
            self.fc2 = nn.Linear(ffn_dim, width)
            for layer in (self.fc1, self.fc2):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def extra_repr(self) -> str:
        return (f"width={self.width}, ffn_dim={self.ffn_dim}, enabled={self.enabled}, "
                f"num_experts={self.num_experts}")

    def merged_weights(self, indices: torch.Tensor, weights: torch.Tensor):
        """Per-group merged parameters from a routing (U, k) -> W1 (U, ffn, width),
        b1 (U, ffn), W2 (U, width, ffn), b2 (U, width)."""
        weights = weights.to(self.fc1_weight.dtype)
        w1 = torch.einsum("uk,ukfd->ufd", weights, self.fc1_weight[indices])
        b1 = torch.einsum("uk,ukf->uf", weights, self.fc1_bias[indices])
        w2 = torch.einsum("uk,ukdf->udf", weights, self.fc2_weight[indices])
        b2 = torch.einsum("uk,ukd->ud", weights, self.fc2_bias[indices])
        return w1, b1, w2, b2

    def forward(
        self, x: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
        attributes: Optional[torch.Tensor] = None, plan: Optional[RoutingPlan] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: token features (B, L, width).
            segment_ids: (B, L) integer; token (b, l) belongs to segment segment_ids[b, l].
            attributes: (S, attribute_dim) routing attributes of the S segments.
            plan: the routing plan of x's tokens (plan_routing), instead of segment_ids and
                attributes: nothing is then read back from the device.
            A dense FFN (enabled=False) needs neither (and checks them when given).
        Returns:
            (B, L, width).
        """
        if plan is not None:
            self._check_plan(x, plan)
        elif segment_ids is not None and attributes is not None:
            self._check_inputs(x, segment_ids, attributes)
        elif self.enabled:
            raise ValueError("ConditionalMoEFFN needs segment_ids and attributes, or a plan")
        else:
            self._check_x(x)
        if not self.enabled:
            return self.fc2(F.gelu(self.fc1(x)))

        if plan is None:
            plan = group_tokens(segment_ids, attributes)
        indices, weights = self.gate(plan.unique_rows)
        w1, b1, w2, b2 = self.merged_weights(indices, weights)

        flat = x.reshape(-1, self.width)
        # Tokens sorted by group once, one dense FFN per contiguous group, unsorted once.
        order, counts = plan.order, plan.counts
        chunks = flat[order].split(counts)
        outputs = [
            F.linear(F.gelu(F.linear(chunk, w1[u], b1[u])), w2[u], b2[u])
            for u, chunk in enumerate(chunks)
        ]
        out = torch.empty_like(flat).index_copy(0, order, torch.cat(outputs, dim=0))
        return out.reshape(x.shape)

    def _check_attributes(self, attributes: torch.Tensor) -> None:
        if attributes.dim() != 2 or attributes.shape[1] != self.attribute_dim:
            raise ValueError(
                f"attributes must have shape (S, {self.attribute_dim}), "
                f"got {tuple(attributes.shape)}")

    def _check_x(self, x) -> None:
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"x must have shape (B, L, {self.width}), got {tuple(x.shape)}")

    def _check_plan(self, x, plan: RoutingPlan) -> None:
        """Shapes only (host values): a plan is consistent by construction."""
        self._check_x(x)
        self._check_attributes(plan.unique_rows)
        if plan.order.shape != (x.shape[0] * x.shape[1],) or len(plan.counts) != len(
                plan.unique_rows) or sum(plan.counts) != plan.order.shape[0]:
            raise ValueError(
                f"the routing plan ({plan.order.shape[0]} tokens in {len(plan.counts)} groups "
                f"of {plan.counts}) does not fit x of shape {tuple(x.shape)}")

    def _check_inputs(self, x, segment_ids, attributes) -> None:
        self._check_x(x)
        if segment_ids.shape != x.shape[:2]:
            raise ValueError(
                f"segment_ids must have shape (B, L) = {tuple(x.shape[:2])}, "
                f"got {tuple(segment_ids.shape)}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
        self._check_attributes(attributes)
        if segment_ids.numel() and (
                int(segment_ids.min()) < 0 or int(segment_ids.max()) >= attributes.shape[0]):
            raise ValueError(
                f"segment_ids must lie in [0, S={attributes.shape[0]}) for attributes of "
                f"shape {tuple(attributes.shape)}")
