"""The embedded default world: a small, fully paired, four-modality dataset on real geography.

``build_world(out_dir, size="quick")`` writes satellite tiles (NASA Blue Marble), procedurally
drawn ground photos, captions and synthetic soundscapes for real places on Earth, split by held-out
geographic cells, in the project's manifest format. It needs the ``world`` extra
(``pip install 'geobind[world]'``) and never touches the network.
"""

from geobind.data.world.build import PRESETS, SPLIT_MODALITIES, build_world
from geobind.data.world.scenes import PROMPT_TEMPLATES, SCENE_NAMES, SCENES, Scene, scene_prompts

__all__ = [
    "PRESETS",
    "PROMPT_TEMPLATES",
    "SCENES",
    "SCENE_NAMES",
    "SPLIT_MODALITIES",
    "Scene",
    "build_world",
    "scene_prompts",
]
