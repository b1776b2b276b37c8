"""The run spec: one typed, validated config for a whole run. sections.py defines it; loading.py reads YAML
and key=value overrides into it. Everything is re-exported here, so callers import from tailorlm.config."""
from tailorlm.config.loading import line_of, load_config, parse_override
from tailorlm.config.sections import (DEFAULT_BETA, DEFAULT_CONFIG, DEFAULT_LR, PREFERENCE_LR_SCALE, DataSpec, DistSpec,
                                      EvalSpec, FreezeSpec, GRPOSpec, LabelValue, LimitSpec, LoraSpec, MethodSpec, MixSpec,
                                      ModelSpec, ObjectiveSpec, OutputSpec, Policy, PreflightSpec, RetentionSpec,
                                      RewardTerm, RunConfig, SelectSpec, SplitSpec, TaskSpec, TemplateSpec, TrackSpec, TrainSpec,
                                      UnfreezeSpec)

__all__ = ["DEFAULT_BETA", "DEFAULT_CONFIG", "DEFAULT_LR", "PREFERENCE_LR_SCALE", "DataSpec", "DistSpec", "EvalSpec",
           "FreezeSpec", "GRPOSpec", "LabelValue", "LimitSpec", "LoraSpec", "MethodSpec", "MixSpec", "ModelSpec", "ObjectiveSpec",
           "OutputSpec", "Policy", "PreflightSpec", "RetentionSpec", "RewardTerm", "RunConfig", "SelectSpec", "SplitSpec", "TaskSpec",
           "TemplateSpec", "TrackSpec", "TrainSpec", "UnfreezeSpec", "line_of", "load_config", "parse_override"]
