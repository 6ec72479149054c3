from kedro.pipeline import Node, Pipeline

from .nodes import compute_steering_vector, train_lora_baseline, tune_caa_scale


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(train_lora_baseline,
                 inputs=["student_model", "tasks_train", "tasks_val", "tuned_lora", "params:guidance", "params:baselines",
                         "params:stage1", "params:generation", "params:seed"],
                 outputs=["lora_adapter", "lora_history", "lora_metrics"], name="train_lora_node"),
            Node(compute_steering_vector, inputs="latent_cache", outputs="steering_vector",
                 name="compute_steering_vector_node"),
            Node(tune_caa_scale,
                 inputs=["steering_vector", "student_model", "tasks_val", "params:guidance", "params:baselines",
                         "params:generation"],
                 outputs=["caa_config", "caa_sweep"], name="tune_caa_scale_node"),
        ],
        tags=["baselines"],
    )
