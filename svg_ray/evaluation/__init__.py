"""Evaluation jobs: generation (FID, Inception Score), reconstruction (rFID, PSNR, SSIM, LPIPS)
and semantics (a linear probe on the latent's DINO part, residual part and both).

Features are computed where the images are produced (Ray Data actor pools) and only features
travel back to the driver, which folds them into float64 running statistics in chunk order, so a
result does not depend on how many workers produced it. ``pipelines/evaluate.py`` is the
command-line entry point (``svg-ray eval {generation,reconstruction,probe}``).
"""
