from kedro.pipeline import Node, Pipeline

from .nodes import train_stage1


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(train_stage1,
                 inputs=["latent_cache", "teacher_plans", "tasks_train", "tasks_val", "student_model",
                         "tuned_loss_weights", "params:guidance", "params:latents", "params:stage1",
                         "params:generation", "params:seed"],
                 outputs=["hypernet_stage1", "stage1_history", "stage1_validation", "stage1_metrics"],
                 name="train_stage1_node"),
        ],
        tags=["stage1"],
    )
