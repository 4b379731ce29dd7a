"""What runs on a worker: the functions of a tile's, a part's or the single-task engine's
tasks (pure functions of their inputs, NumPy or CuPy alike), and the gradient sums and
steps every engine shares (:mod:`.updates`)."""
