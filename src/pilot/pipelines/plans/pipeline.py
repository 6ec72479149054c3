from kedro.pipeline import Node, Pipeline

from .nodes import extract_plans


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(extract_plans,
                 inputs=["tasks_train", "tasks_val", "tasks_test", "teacher_model", "student_model",
                         "params:plans", "params:generation"],
                 outputs=["teacher_plans", "plan_report", "plan_metrics"], name="extract_plans_node"),
        ],
        tags=["plans"],
    )
