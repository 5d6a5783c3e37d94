"""wb grid: XYZ grids of checkpoints x prompts x seeds (and CFG, steps, sampler, prompt S/R).

axes (value syntax) -> plan (cells, cost, size guard) -> render (one pipeline, weights swapped,
cells batched) -> layout (grid.png), metrics (burn, CLIP), report (index.html); run ties them.
"""
