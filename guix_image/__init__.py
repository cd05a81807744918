"""guix-image: build container images from a Guix or Nix store, and look inside them."""

__version__ = "0.1.0"
