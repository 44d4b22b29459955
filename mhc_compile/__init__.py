"""mhc-compile: a torch.compile backend that rewrites residual streams into n-stream mHC."""
