"""torch.hub entry points: ``torch.hub.load('<repo or local dir>', 'ldae_vit_l', pretrained=False)``.

Every model of the zoo (``ldae_models.list_models()``) is an entry point: its registered timm function.
"""
dependencies = ['torch', 'timm', 'safetensors', 'huggingface_hub']

import ldae_models as _ldae_models  # noqa: E402  (importing registers the models)
from timm.models import model_entrypoint as _entrypoint  # noqa: E402

globals().update({_name: _entrypoint(_name) for _name in _ldae_models.list_models()})
