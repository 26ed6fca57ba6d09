"""G2Face model library: networks, priors, losses and checkpoints in pure PyTorch (never imports Ray)."""
