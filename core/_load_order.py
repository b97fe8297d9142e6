"""Keep TensorFlow and PyTorch importable in one process.

torch 2.14's Linux wheels ship triton, which torchvision's detection ops import through
torch._dynamo. When TensorFlow is loaded first, importing triton afterwards crashes the
interpreter (segmentation fault in triton's native library, which clashes with the LLVM
TensorFlow already loaded). Loading triton before TensorFlow avoids it, so every detbench
process loads it first: ``runtime`` is imported before anything else in detbench.
"""

try:
    import triton  # noqa: F401  (imported for its load-order side effect only)
except ImportError:  # CPU wheels and other platforms have no triton: nothing to order
    pass
