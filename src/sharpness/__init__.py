"""sharpness: train networks with SGD or SAM and measure the maximum Hessian eigenvalue (λmax)."""

__version__ = "0.1.0"
