"""Losses: pure functions of embeddings and ids, one module per family, each citing its source."""
from tbps_lib.losses.acsa import acam_similarity, acsa_loss
from tbps_lib.losses.cmpm import cmpc_loss, cmpm_loss, matching_distribution
from tbps_lib.losses.dssl import (attended_cosine, cosine_ranking_loss, euclidean_reconstruction_loss,
                                mutual_exclusion_loss, ranking_loss_from_scores)
from tbps_lib.losses.laip import (attention_weights, biatt_loss, fusion_triplet_loss, itc_loss, itm_loss,
                                  mask_phrase_loss, mlm_loss, phrase_guided_feature)
from tbps_lib.losses.part_level import cmr_loss, commonality
from tbps_lib.losses.ranking import hardest_negative_ranking_loss, id_loss
from tbps_lib.losses.sew import adaptive_margin, masked_caption_loss, sew_id_loss, sew_matching_loss

__all__ = ["acam_similarity", "acsa_loss", "adaptive_margin", "attended_cosine", "attention_weights", "biatt_loss",
           "cmpc_loss", "cmpm_loss", "cmr_loss", "commonality", "cosine_ranking_loss",
           "euclidean_reconstruction_loss", "fusion_triplet_loss", "hardest_negative_ranking_loss", "id_loss",
           "itc_loss", "itm_loss", "mask_phrase_loss", "masked_caption_loss", "matching_distribution", "mlm_loss",
           "mutual_exclusion_loss", "phrase_guided_feature", "ranking_loss_from_scores", "sew_id_loss",
           "sew_matching_loss"]
