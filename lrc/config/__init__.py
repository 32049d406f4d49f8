"""From Hydra configs to typed run objects: option schemas from signatures, and the builders."""
