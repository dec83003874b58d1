"""Architecture families: detection from state dicts, specs, and the layer-chain view used by fusion."""
