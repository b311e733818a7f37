"""Analysis of trained runs: modality gap, embedding maps, attention maps, tables, figures."""
