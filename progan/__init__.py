"""progan: a progressive-growing face GAN with diversity learning.

Nothing heavy is imported here; submodules load torch when they are used.
"""

__version__ = "0.1.0"
