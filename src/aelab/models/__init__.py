"""Plain nn.Modules (no Lightning): autoencoders and friends."""
