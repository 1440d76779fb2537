"""progan: a progressive-growing face GAN with diversity learning.

Nothing heavy is imported here; submodules load torch when they are used.
"""

__version__ = "0.1.0"

# Exported lazily: `import progan` stays free of torch until one of these is used.
_LAZY = {"load_generator": "progan.generate", "FaceGenerator": "progan.generate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'progan' has no attribute {name!r}")
