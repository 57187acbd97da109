"""diffusers integration: find each text encoder of a pipeline and what reads its output, prune, save, load.

    plans = skrr.prune_pipeline(pipe, prompts, sparsity=0.4)            # search + swap every text encoder
    skrr.apply_to_pipeline(pipe, {"text_encoder_3": plan})               # or explicit plans
    pipe.save_pretrained(out)                                            # pruned encoders saved in skrr format
    pipe = DiffusionPipeline.from_pretrained(out)                        # after `import skrr_compile`
    skrr.load_into(dense_pipe, out)                                      # or: put pruned encoders into a pipeline

What each family feeds its denoiser, and so what each encoder's discrepancy covers: see `specs`.
"""

from skrr_compile.deploy.pipelines.encoder import (
    SUPPORTED_PIPELINES,
    NoTextEncoderError,
    PrunedTextEncoder,
    UnsupportedPipelineError,
)
from skrr_compile.deploy.pipelines.prune import (
    PipelinePlans,
    apply_to_pipeline,
    prune_pipeline,
    search_arguments,
    spec_scoring,
)
from skrr_compile.deploy.pipelines.specs import (
    EncoderOutput,
    EncoderSpec,
    PipelineSpec,
    PipelineTokenizer,
    describe_pipeline,
)
from skrr_compile.deploy.pipelines.storage import encoder_sizes, load_into, load_pipeline, save_pipeline

__all__ = [
    "PrunedTextEncoder",
    "EncoderOutput",
    "EncoderSpec",
    "PipelineSpec",
    "PipelinePlans",
    "PipelineTokenizer",
    "UnsupportedPipelineError",
    "NoTextEncoderError",
    "SUPPORTED_PIPELINES",
    "describe_pipeline",
    "search_arguments",
    "spec_scoring",
    "apply_to_pipeline",
    "prune_pipeline",
    "save_pipeline",
    "load_pipeline",
    "load_into",
    "encoder_sizes",
]
