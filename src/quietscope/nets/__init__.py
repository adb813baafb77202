"""Networks: U-Net (2D/3D, N2V2 options), blind-spot net, ladder VAE; receptive-field measurement."""
