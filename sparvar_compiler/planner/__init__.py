"""Stage 1 of the pipeline: models, schedules, GPUs, plans and static block layouts."""

from .config import PlanConfig, load_config_file
from .cs4a import CS4ATables, cs4a_tables, key_mapping
from .csla import csla_layout, csla_token_mask, plan_token_mask
from .gpus import GpuSpec, get_gpu, list_gpus
from .layout import BlockLayout
from .models import ModelSpec, get_model, list_models
from .plan import Mode, Plan, ScalePlan, make_plan, plan_schedule
from .schedules import Schedule
from .summary import format_summary, plan_summary

__all__ = [
    "BlockLayout", "CS4ATables", "GpuSpec", "Mode", "ModelSpec", "Plan", "PlanConfig", "ScalePlan", "Schedule",
    "cs4a_tables", "csla_layout", "csla_token_mask", "format_summary", "get_gpu", "get_model", "key_mapping",
    "list_gpus", "list_models", "load_config_file", "make_plan", "plan_schedule", "plan_summary",
    "plan_token_mask",
]
