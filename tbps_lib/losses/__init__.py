"""Losses: pure functions of embeddings and ids, one module per family, each citing its source."""
from tbps_lib.losses.cmpm import cmpc_loss, cmpm_loss, matching_distribution
from tbps_lib.losses.ranking import hardest_negative_ranking_loss, id_loss
from tbps_lib.losses.sew import adaptive_margin, masked_caption_loss, sew_id_loss, sew_matching_loss

__all__ = ["adaptive_margin", "cmpc_loss", "cmpm_loss", "hardest_negative_ranking_loss", "id_loss",
           "masked_caption_loss", "matching_distribution", "sew_id_loss", "sew_matching_loss"]
from tbps_lib.losses.laip import (attention_weights, biatt_loss, fusion_triplet_loss, itc_loss, itm_loss,
                                  mask_phrase_loss, phrase_guided_feature)

__all__ += ["attention_weights", "biatt_loss", "fusion_triplet_loss", "itc_loss", "itm_loss", "mask_phrase_loss",
            "phrase_guided_feature"]
