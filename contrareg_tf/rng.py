"""Step-keyed random numbers: every random choice of a training step (which subjects form the pair, λ ~ U[0, 1],
augmentation, sampled locations) is a pure function of ``(seed, step, stream)``, so a resumed run draws exactly
what the uninterrupted run would have drawn. Lives outside ``training`` so that ``data`` (the pair sampler) can use
it without importing the trainers; ``training.loop.step_rng`` is the same function."""
import numpy as np


def step_rng(seed, step, stream):
    """NumPy generator for one (seed, step, stream): the same numbers whenever the step is (re-)run."""
    return np.random.default_rng([int(seed), int(step), int(stream)])
