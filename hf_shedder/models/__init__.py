"""Model families that Transformers does not ship, written for hf_shedder."""
