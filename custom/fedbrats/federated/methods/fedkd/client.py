"""FedKD at a site: supervised Dice plus DRL, RCL and knowledge distillation from the global model.

Our interpretation of "Feature Representation-Aware Knowledge Distillation for Incomplete Local Information
in Federated Learning" (MICCAI 2025): the paper names DRL and RCL; the federated protocol, the distillation
targets and the weights below are this project's design (see docs/fedkd.md).

Per batch, with ``f`` the fused content at 1/8 resolution and ``c_m`` each available sequence's content:

    L = w_dice * Dice(y, s) + w_bce * BCE(y, s)
      + w_drl  * DRL(c, style, mask)                                   (content agreement, content/style independence)
      + w_rcl  * InfoNCE_regions(pool(f, y), pool(c_m, y), P_global)   (region-aware contrast)
      + w_kd   * KL_T(sigmoid(s/T) || sigmoid(t/T)) * T^2              (teacher = frozen global model)
      + w_proto* (1 - cos(pool(f, y), P_global))                        (feature distillation to global prototypes)
      + w_self * KL_T(available-sequence logits || student-view logits) (sites with two or more sequences)

Two views of every batch (:func:`fedbrats.data.transforms.teacher_view`): the student's, shaped by sequence
dropout, which the supervised terms, DRL, RCL and the prototypes use, and the teacher's, every sequence the site
has. The global teacher always sees the teacher's view, so its knowledge of the sequences the student's view hides
flows into the student; self-distillation goes from the model's own teacher-view prediction to its student-view
prediction on the cases whose student view hides a sequence, and, in a batch where none does, to a random proper
subset of the site's sequences (an extra forward pass). The share of steps each term acted on is logged as
``acted_<term>`` with the loss terms.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch

from fedbrats.data.transforms import apply_modality_mask, hidden_cases, teacher_view
from fedbrats.federated.methods.base import ClientMethod, check_non_negative
from fedbrats.federated.methods.fedkd.distillation import prototype_kd_loss, self_distillation_loss
from fedbrats.federated.methods.fedkd.drl import DRLLoss
from fedbrats.federated.methods.fedkd.network import parameter_modality
from fedbrats.federated.methods.fedkd.rcl import RegionContrastiveLoss, region_prototypes
from fedbrats.federated.protocol import GLOBAL_PROTOTYPE_VALID_KEY, GLOBAL_PROTOTYPES_KEY
from fedbrats.losses.distillation import logit_kd_loss
from fedbrats.losses.segmentation import DiceBCELoss

#: The region sets of RCL and the prototypes (see ``rcl_regions``).
RCL_REGION_SETS: tuple[str, ...] = ("disjoint", "nested")


class FedKDMethod(ClientMethod):
    """The site side of FedKD. Every loss term has a weight; 0 switches it off (ablations).

    Args:
        dice_weight: supervised soft Dice.
        bce_weight: supervised voxel-wise binary cross-entropy.
        drl_weight: disentangled representation learning (DRL) as a whole.
        drl_consistency: DRL content agreement across a case's sequences.
        drl_independence: DRL content/style cross-correlation penalty.
        drl_style: DRL separation of different sequences' style vectors.
        drl_memory: pooled (content, style) samples of earlier batches over which the independence term's
            correlation is estimated (a batch alone has too few samples for a gradient at small sites); cleared
            when a global model arrives.
        rcl_weight: region-aware contrastive learning (RCL).
        rcl_temperature: InfoNCE temperature of RCL.
        rcl_regions: ``"disjoint"``: background, oedema (WT - TC), non-enhancing core (TC - ET) and ET, so that no
            region is another's negative while sharing its voxels; ``"nested"``: background, WT, TC, ET (the
            BraTS evaluation regions, each inside the one before). The region prototypes sent to the server use
            the same regions.
        kd_weight: logit distillation from the frozen global model (the teacher).
        kd_temperature: distillation temperature.
        proto_kd_weight: feature distillation of local region embeddings towards the global prototypes.
        self_distill_weight: at sites with two or more sequences, distillation from the model's output on every
            sequence the site has (the teacher's view) to its output on the student's view (sequences hidden).
        kd_start_round: first round with distillation (round 0's global model is untrained).
        min_prototype_cases: a region's prototype is sent only when at least this many cases contributed to it,
            so that no single patient's features leave the site.
        partial_updates: leave the encoders of sequences the site lacks out of its update: they are never
            trained there and the modality-aware aggregation ignores them, so sending them only costs bandwidth
            (each is about 21% of an update). Set False with a plain-FedAvg aggregation (an ablation).
    """

    name: ClassVar[str] = "fedkd"
    payload_keys: ClassVar[frozenset[str]] = frozenset({"prototypes", "prototype_counts", "prototype_cases"})
    uses_teacher_view: ClassVar[bool] = True

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        drl_weight: float = 0.1,
        drl_consistency: float = 1.0,
        drl_independence: float = 0.1,
        drl_style: float = 0.1,
        drl_memory: int = 64,
        rcl_weight: float = 0.1,
        rcl_temperature: float = 0.07,
        rcl_regions: str = "disjoint",
        kd_weight: float = 0.5,
        kd_temperature: float = 2.0,
        proto_kd_weight: float = 0.1,
        self_distill_weight: float = 0.5,
        kd_start_round: int = 1,
        min_prototype_cases: int = 2,
        partial_updates: bool = True,
    ) -> None:
        weights = {
            "dice_weight": dice_weight,
            "bce_weight": bce_weight,
            "drl_weight": drl_weight,
            "rcl_weight": rcl_weight,
            "kd_weight": kd_weight,
            "proto_kd_weight": proto_kd_weight,
            "self_distill_weight": self_distill_weight,
        }
        check_non_negative(weights)
        if rcl_regions not in RCL_REGION_SETS:
            raise ValueError(f"rcl_regions must be one of {RCL_REGION_SETS}, got {rcl_regions!r}")
        self.weights = weights
        self.disjoint_regions = rcl_regions == "disjoint"
        self.kd_temperature = kd_temperature
        self.kd_start_round = kd_start_round
        self.min_prototype_cases = min_prototype_cases
        self.partial_updates = partial_updates
        self.segmentation_loss = DiceBCELoss(dice_weight, bce_weight)
        self.drl = DRLLoss(drl_consistency, drl_independence, drl_style, memory_size=drl_memory)
        self.rcl = RegionContrastiveLoss(rcl_temperature)
        self.teacher: torch.nn.Module | None = None
        self.global_protos: torch.Tensor | None = None
        self.global_valid: torch.Tensor | None = None
        self.use_proto_kd = False  # until on_global_model brings prototypes (training_loss may come first)
        self._reset_prototype_sums()

    # ---- round hooks --------------------------------------------------------------------------------------
    def on_global_model(self, model: torch.nn.Module, global_meta: dict[str, Any], current_round: int) -> None:
        use_kd = current_round >= self.kd_start_round
        if use_kd and (self.weights["kd_weight"] > 0):
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        else:
            self.teacher = None
        protos = global_meta.get(GLOBAL_PROTOTYPES_KEY)
        if protos is not None and len(protos):
            self.global_protos = torch.as_tensor(np.asarray(protos, dtype=np.float32), device=self.device)
            valid = global_meta.get(GLOBAL_PROTOTYPE_VALID_KEY)
            self.global_valid = torch.as_tensor(
                np.asarray(valid if valid is not None else [True] * len(protos), dtype=bool), device=self.device
            )
        else:
            self.global_protos, self.global_valid = None, None
        self.use_proto_kd = use_kd and self.global_protos is not None
        self._reset_prototype_sums()
        self.drl.reset_memory()  # features of the previous local model say little about the new one

    def training_loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        image, label, mask = batch["image"], batch["label"], batch["modality_mask"]
        full_image, full_mask = teacher_view(batch)
        out = model(image, mask)
        w = self.weights
        terms: dict[str, torch.Tensor] = self.segmentation_loss.terms(out["logits"], label)
        if w["drl_weight"] > 0:
            terms["drl"] = self.drl(out["content"], out["style"], mask)
        protos, counts = region_prototypes(out["fused"], label, disjoint=self.disjoint_regions)
        self._accumulate_prototypes(protos.detach(), counts.detach(), batch.get("case_id"))
        if w["rcl_weight"] > 0:
            seq_protos, _ = region_prototypes(out["content"], label, disjoint=self.disjoint_regions)
            terms["rcl"] = self.rcl(
                protos, counts, seq_protos, mask, self.global_protos if self.use_proto_kd else None, self.global_valid
            )
        acted: dict[str, float] = {}
        if self.teacher is not None:
            with torch.no_grad():  # the global teacher sees every sequence the site has, the student maybe fewer
                teacher_logits = self.teacher(full_image, full_mask)["logits"]
            terms["kd"] = logit_kd_loss(out["logits"], teacher_logits, self.kd_temperature)
            acted["acted_kd"] = 1.0
        if self.use_proto_kd and w["proto_kd_weight"] > 0:
            terms["proto_kd"] = prototype_kd_loss(protos, counts, self.global_protos, self.global_valid)
        if w["self_distill_weight"] > 0 and len(self.modalities) > 1:
            self_distill = self._self_distillation(model, out["logits"], mask, full_image, full_mask)
            if self_distill is not None:
                terms["self_distill"] = self_distill
            acted["acted_self_distill"] = float(self_distill is not None)
        weight_of = {
            "dice": w["dice_weight"],
            "bce": w["bce_weight"],
            "drl": w["drl_weight"],
            "rcl": w["rcl_weight"],
            "kd": w["kd_weight"],
            "proto_kd": w["proto_kd_weight"],
            "self_distill": w["self_distill_weight"],
        }
        loss = sum(weight_of[k] * v for k, v in terms.items())
        return loss, {**{k: float(v.detach()) for k, v in terms.items()}, **acted}

    def _self_distillation(
        self,
        model: torch.nn.Module,
        student_logits: torch.Tensor,
        student_mask: torch.Tensor,
        full_image: torch.Tensor,
        full_mask: torch.Tensor,
    ) -> torch.Tensor | None:
        """Self-distillation from the teacher's view to a view with sequences hidden (None: no case qualifies).

        Where the student's view hides a sequence, the model's own prediction on the teacher's view (one forward
        pass without gradients) teaches the student's prediction on those cases. In a batch where no case is
        hidden anything, the student's prediction is the teacher's-view one, and a random proper subset of each
        case's sequences (a forward pass with gradients) is taught by it.
        """
        hidden = hidden_cases(student_mask, full_mask)
        if bool(hidden.any()):
            with torch.no_grad():
                full_logits = model(full_image, full_mask)["logits"]
            return self_distillation_loss(full_logits[hidden], student_logits[hidden], self.kd_temperature)
        several = (full_mask > 0).sum(dim=-1) > 1
        if not bool(several.any()):
            return None
        dropped_mask = _random_subset_mask(full_mask)
        dropped = model(apply_modality_mask(full_image, dropped_mask), dropped_mask)["logits"]
        return self_distillation_loss(student_logits[several], dropped[several], self.kd_temperature)

    def round_payload(self, model: torch.nn.Module, train_loader: Any) -> dict[str, Any]:
        """Region prototypes of this round: the mean fused content per region over the round's training
        batches (an average over many voxels and cases), with voxel and case counts. A region seen in fewer
        than ``min_prototype_cases`` cases is withheld (count 0)."""
        if self._proto_sum.numel() == 0:  # no training batch this round: nothing to report
            return {}
        counts = self._count_sum.clone()
        cases = torch.tensor([float(len(ids)) for ids in self._case_ids]) if self._case_ids else torch.zeros(0)
        withheld = cases < self.min_prototype_cases
        counts[withheld] = 0
        means = self._proto_sum / counts.clamp_min(1e-6).unsqueeze(-1)
        means[withheld] = 0
        return {
            "prototypes": means.cpu().numpy().astype(np.float32),
            "prototype_counts": counts.cpu().numpy().astype(np.float32),
            "prototype_cases": cases.cpu().numpy().astype(np.float32),
        }

    def sends_parameter(self, name: str) -> bool:
        """With ``partial_updates``, every weight except the encoders of sequences this site lacks."""
        return not self.partial_updates or parameter_modality(name) in (None, *self.modalities)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _reset_prototype_sums(self) -> None:
        self._proto_sum = torch.zeros(0)
        self._count_sum = torch.zeros(0)
        self._case_ids: list[set[str]] = []

    def _accumulate_prototypes(self, protos: torch.Tensor, counts: torch.Tensor, case_ids: Any) -> None:
        weighted = (protos * counts.unsqueeze(-1)).sum(0).cpu()  # (R, C)
        if self._proto_sum.numel() == 0:
            self._proto_sum = torch.zeros_like(weighted)
            self._count_sum = torch.zeros(weighted.shape[0])
            self._case_ids = [set() for _ in range(weighted.shape[0])]
        self._proto_sum += weighted
        self._count_sum += counts.sum(0).cpu()
        # Distinct cases, not visits: a case seen in every epoch still counts once towards the privacy floor.
        if case_ids is None or len(case_ids) != len(counts):
            # Without a patient's identity a case seen in every epoch would count as several: no floor then.
            raise ValueError("FedKD's prototypes need every training case's case_id (the loaders give each case one)")
        ids = list(case_ids)
        for b, case in enumerate(ids):
            for r in torch.nonzero(counts[b] > 1e-6).flatten().tolist():
                self._case_ids[r].add(str(case))


def _random_subset_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per case, a random non-empty proper subset of the present sequences (1 = kept)."""
    batch, n_mod = mask.shape
    keep = torch.rand(batch, n_mod, device=mask.device) < 0.5
    keep &= mask > 0
    for b in range(batch):
        present = torch.nonzero(mask[b] > 0).flatten()
        if keep[b].sum() == 0:
            keep[b, present[torch.randint(len(present), (1,))]] = True
        elif keep[b].sum() == len(present) and len(present) > 1:
            keep[b, present[torch.randint(len(present), (1,))]] = False
    return keep.float()


__all__ = ["FedKDMethod"]
