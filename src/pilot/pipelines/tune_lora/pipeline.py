from kedro.pipeline import Node, Pipeline

from .nodes import tune_lora_baseline


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(tune_lora_baseline,
                 inputs=["student_model", "tasks_train", "tasks_val", "params:guidance", "params:baselines",
                         "params:stage1", "params:generation", "params:tune", "params:seed"],
                 outputs=["tuned_lora", "tune_lora_trials"], name="tune_lora_node"),
        ],
        tags=["tune"],
    )
