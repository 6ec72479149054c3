from kedro.pipeline import Node, Pipeline

from .nodes import train_stage2


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(train_stage2,
                 inputs=["hypernet_stage1", "tasks_train", "tasks_val", "student_model", "params:stage2",
                         "params:generation", "params:seed"],
                 outputs=["hypernet_stage2", "stage2_history", "stage2_validation", "stage2_metrics"],
                 name="train_stage2_node"),
        ],
        tags=["stage2"],
    )
