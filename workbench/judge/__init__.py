"""wb judge: blind side-by-side votes on a grid's cells, turned into a Bradley-Terry ranking."""
