from kedro.pipeline import Node, Pipeline

from pilot.pipelines.protocol import protocol_node

from .nodes import train_stage1


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            protocol_node(),
            Node(train_stage1,
                 inputs=["latent_cache", "teacher_plans", "student_model", "tuned_loss_weights", "params:guidance",
                         "params:latents", "training_protocol"],
                 outputs=["hypernet_stage1", "stage1_history", "stage1_validation", "stage1_metrics"],
                 name="train_stage1_node"),
        ],
        tags=["stage1"],
    )
