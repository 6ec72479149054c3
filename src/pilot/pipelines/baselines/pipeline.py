from kedro.pipeline import Node, Pipeline

from pilot.pipelines.protocol import protocol_node

from .nodes import (
    compute_steering_vector,
    train_lora_baseline,
    train_pause_tokens,
    train_reft_baseline,
    train_soft_thoughts,
    tune_caa_scale,
)


def create_pipeline(**kwargs) -> Pipeline:
    protocol = ["params:guidance", "params:baselines", "training_protocol"]
    return Pipeline(
        [
            protocol_node(),
            Node(train_lora_baseline, inputs=["student_model", "tuned_lora", *protocol],
                 outputs=["lora_adapter", "lora_history", "lora_metrics"], name="train_lora_node"),
            Node(train_reft_baseline, inputs=["student_model", *protocol],
                 outputs=["reft_interventions", "reft_history", "reft_metrics"], name="train_reft_node"),
            Node(train_pause_tokens, inputs=["student_model", *protocol],
                 outputs=["pause_tokens", "pause_tokens_history", "pause_tokens_metrics"], name="train_pause_tokens_node"),
            Node(train_soft_thoughts, inputs=["student_model", "teacher_model", *protocol],
                 outputs=["soft_thoughts", "soft_thoughts_history", "soft_thoughts_metrics"],
                 name="train_soft_thoughts_node"),
            Node(compute_steering_vector, inputs="latent_cache", outputs="steering_vector",
                 name="compute_steering_vector_node"),
            Node(tune_caa_scale,
                 inputs=["steering_vector", "student_model", "tasks_val", "params:guidance", "params:baselines",
                         "params:generation"],
                 outputs=["caa_config", "caa_sweep"], name="tune_caa_scale_node"),
        ],
        tags=["baselines"],
    )
