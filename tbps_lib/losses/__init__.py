"""Losses: pure functions of embeddings and ids, one module per family, each citing its source."""
from tbps_lib.losses.cmpm import cmpc_loss, cmpm_loss, matching_distribution
from tbps_lib.losses.part_level import cmr_loss, commonality
from tbps_lib.losses.ranking import hardest_negative_ranking_loss, id_loss
from tbps_lib.losses.sew import adaptive_margin, masked_caption_loss, sew_id_loss, sew_matching_loss

__all__ = ["adaptive_margin", "cmpc_loss", "cmpm_loss", "cmr_loss", "commonality", "hardest_negative_ranking_loss",
           "id_loss", "masked_caption_loss", "matching_distribution", "sew_id_loss", "sew_matching_loss"]
