"""Functions: a model plus an SLO (and optional tenant code), described by function.yaml."""

from swapserve.functions.spec import SPEC_FILE, FunctionSpec, ModelSource, SpecError, TensorDecl, check_name, load_spec

__all__ = ["SPEC_FILE", "FunctionSpec", "ModelSource", "SpecError", "TensorDecl", "check_name", "load_spec"]
