"""Model families, one file each: readable top to bottom."""
