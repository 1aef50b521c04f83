"""Evaluation: character-level BLEU/ROUGE (`metrics`)."""
