"""Small helpers shared by the BenTsao scripts."""
