"""Adapter training by self-distillation: data (the target answers prompts; the teacher pass), loop
(one adapter's optimisation, resumable), evaluation (agreement and measured speed), card (model card
and shipping) and pipeline (train_adapter, the whole run). `kangaroo train` is its command line."""
from .card import model_card, ship_adapter  # noqa: F401
from .loop import rope_tables, train_layer  # noqa: F401
from .options import DEFAULT_EXIT_LAYERS, DEFAULT_THRESHOLDS, TrainOptions, parse_exit_layers  # noqa: F401
from .pipeline import train_adapter  # noqa: F401
