from kedro.pipeline import Node, Pipeline

from pilot.pipelines.protocol import protocol_node

from .nodes import tune_lora_baseline


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            protocol_node(),
            Node(tune_lora_baseline,
                 inputs=["student_model", "params:guidance", "params:baselines", "params:tune", "training_protocol"],
                 outputs=["tuned_lora", "tune_lora_trials"], name="tune_lora_node"),
        ],
        tags=["tune"],
    )
