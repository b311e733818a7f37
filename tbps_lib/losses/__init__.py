"""Losses: pure functions of embeddings and ids, one module per family, each citing its source."""
from tbps_lib.losses.cmpm import cmpc_loss, cmpm_loss, matching_distribution
from tbps_lib.losses.ranking import hardest_negative_ranking_loss, id_loss

__all__ = ["cmpc_loss", "cmpm_loss", "hardest_negative_ranking_loss", "id_loss", "matching_distribution"]
