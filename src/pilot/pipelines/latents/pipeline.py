from kedro.pipeline import Node, Pipeline

from .nodes import build_latent_cache, summarize_cache


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(build_latent_cache,
                 inputs=["teacher_plans", "tasks_train", "student_model", "latent_cache_shards",
                         "params:guidance", "params:latents"],
                 outputs="latent_cache", name="build_latent_cache_node"),
            Node(summarize_cache, inputs="latent_cache", outputs="latent_cache_metrics",
                 name="summarize_latent_cache_node"),
        ],
        tags=["latents"],
    )
