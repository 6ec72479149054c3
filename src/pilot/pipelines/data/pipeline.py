from kedro.pipeline import Node, Pipeline

from .nodes import generate_tasks, split_tasks


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(generate_tasks, inputs=["params:data", "params:seed"], outputs="tasks_all", name="generate_tasks_node"),
            Node(split_tasks, inputs="tasks_all",
                 outputs=["tasks_train", "tasks_val", "tasks_test", "task_counts"], name="split_tasks_node"),
        ],
        tags=["data"],
    )
