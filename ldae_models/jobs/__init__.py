"""The jobs of the zoo, each an objective on the training engine (``engine``): ``pretrain`` (l-DAE and the DDAE UNets),
``repfusion`` (distillation into a timm student), ``linprobe`` (MAE's linear probe); ``recipes`` holds the paper's
runs as data, ``memory`` the memory plan of a GPU step."""
