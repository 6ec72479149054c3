from kedro.pipeline import Node, Pipeline

from .nodes import fit_tokenizer, measure_plan_gap, train_student, train_teacher


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(fit_tokenizer, inputs=["tasks_train", "params:base"], outputs="base_tokenizer",
                 name="fit_tokenizer_node"),
            Node(train_student, inputs=["tasks_train", "base_tokenizer", "params:base", "params:seed"],
                 outputs=["student_model", "student_training_history"], name="train_student_node"),
            Node(train_teacher, inputs=["tasks_train", "base_tokenizer", "params:base", "params:seed"],
                 outputs=["teacher_model", "teacher_training_history"], name="train_teacher_node"),
            Node(measure_plan_gap, inputs=["student_model", "tasks_test", "params:generation"],
                 outputs=["plan_gap_table", "plan_gap_metrics"], name="measure_plan_gap_node"),
        ],
        tags=["base"],
    )
