"""Dataset distillation: choose, make or condense the data a student learns from.

* :mod:`potstill.dd.select` -- per-example scores from one pass per model (IFD as a loss
  ratio and as a perplexity ratio, perplexity, teacher-student divergence, "teacher
  confident, student unsure"), and filters that keep or drop each example with a named reason;
* :mod:`potstill.dd.diversity` -- subset choice over embeddings (greedy k-center, k-means
  medoids, herding, DEITA's score-first filter) and a sentence embedder;
* :mod:`potstill.dd.dedup` -- exact and MinHash-LSH near-duplicate removal;
* :mod:`potstill.dd.influence` -- LESS-style gradient influence on a LoRA student.

Import the submodules directly (``from potstill.dd.select import apply_filters``).
"""
