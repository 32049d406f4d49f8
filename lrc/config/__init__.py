"""From Hydra configs to typed run objects: option schemas from signatures, and the builders."""

from lrc.config import resolvers  # noqa: F401 - registers the resolvers conf/ uses
