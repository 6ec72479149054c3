from kedro.pipeline import Node, Pipeline

from .nodes import (
    build_report,
    evaluate_caa,
    evaluate_lora,
    evaluate_pilot_stage1,
    evaluate_pilot_stage2,
    evaluate_plan_in_context,
    evaluate_zero_shot,
    log_method_runs,
    plot_results,
    plot_training,
)


def create_pipeline(**kwargs) -> Pipeline:
    test = ["tasks_test", "params:generation"]
    return Pipeline(
        [
            Node(evaluate_zero_shot, inputs=["student_model", *test], outputs="predictions_zero_shot",
                 name="evaluate_zero_shot_node"),
            Node(evaluate_plan_in_context, inputs=["student_model", "tasks_test", "teacher_plans", "params:generation"],
                 outputs="predictions_plan_in_context", name="evaluate_plan_in_context_node"),
            Node(evaluate_lora, inputs=["student_model", "lora_adapter", *test], outputs="predictions_lora",
                 name="evaluate_lora_node"),
            Node(evaluate_caa, inputs=["student_model", "steering_vector", "caa_config", "tasks_test",
                                       "params:guidance", "params:generation"],
                 outputs="predictions_caa", name="evaluate_caa_node"),
            Node(evaluate_pilot_stage1, inputs=["student_model", "hypernet_stage1", *test],
                 outputs="predictions_pilot_stage1", name="evaluate_pilot_stage1_node"),
            Node(evaluate_pilot_stage2, inputs=["student_model", "hypernet_stage2", *test],
                 outputs="predictions_pilot_stage2", name="evaluate_pilot_stage2_node"),
            Node(build_report,
                 inputs=["predictions_zero_shot", "predictions_plan_in_context", "predictions_lora", "predictions_caa",
                         "predictions_pilot_stage1", "predictions_pilot_stage2"],
                 outputs=["predictions", "results_table", "results_markdown", "results_metrics"],
                 name="build_report_node"),
            Node(plot_results, inputs="results_table", outputs=["accuracy_plot", "latency_plot"],
                 name="plot_results_node"),
            Node(plot_training, inputs=["stage1_history", "stage1_validation", "stage2_history", "stage2_validation"],
                 outputs="training_curves_plot", name="plot_training_node"),
            Node(log_method_runs, inputs="results_table", outputs="method_runs", name="log_method_runs_node"),
        ],
        tags=["evaluation"],
    )
