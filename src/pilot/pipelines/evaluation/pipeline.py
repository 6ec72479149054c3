from kedro.pipeline import Node, Pipeline

from pilot.methods.registry import compared_methods

from .nodes import (
    build_report,
    describe_methods,
    describe_training_data,
    evaluate_method,
    fingerprint_results,
    gather_methods,
    gather_predictions,
    log_method_runs,
    log_trained_model,
    measure_method_latency,
    plot_results,
    plot_training,
)

MAX_INPUTS = 8   # no node reads more: a list longer than this is gathered in parts


def _gathered(gather, parts: list[str], output: str) -> list[Node]:
    """Nodes gathering the datasets ``parts`` into ``output``, in order, none with more than eight inputs."""
    if len(parts) <= MAX_INPUTS:
        return [Node(gather, inputs=parts, outputs=output, name=f"gather_{output}_node")]
    count = -(-len(parts) // MAX_INPUTS)   # as few parts as will do, as even as they can be
    size = -(-len(parts) // count)
    groups = [parts[start:start + size] for start in range(0, len(parts), size)]
    names = [f"part_{number}_of_{output}" for number in range(1, len(groups) + 1)]
    return [Node(gather, inputs=group, outputs=name, name=f"gather_{name}_node") for group, name in zip(groups, names)] \
        + _gathered(gather, names, output)


def create_pipeline(**kwargs) -> Pipeline:
    """One node builds each compared method (:mod:`pilot.methods.registry`) from its inputs and one
    answers the test split with it; latency, settings and the report take them all."""
    methods = compared_methods()
    per_method = []
    for name, method in methods.items():
        per_method += [
            Node(method, inputs=list(method.inputs) or None, outputs=f"method_{name}", name=f"method_{name}_node"),
            Node(evaluate_method, inputs=[f"method_{name}", "student_model", "tasks_test", "params:generation"],
                 outputs=f"predictions_{name}", name=f"evaluate_{name}_node"),
        ]
    return Pipeline(
        [
            *per_method,
            *_gathered(gather_methods, [f"method_{name}" for name in methods], "methods"),
            *_gathered(gather_predictions, [f"predictions_{name}" for name in methods], "predictions"),
            Node(fingerprint_results, inputs="predictions", outputs="results_fingerprint",
                 name="fingerprint_results_node"),
            Node(measure_method_latency,
                 inputs=["methods", "student_model", "tasks_test", "params:generation", "params:evaluation"],
                 outputs="latency_table", name="measure_latency_node"),
            Node(build_report, inputs=["latency_table", "predictions"],
                 outputs=["results_table", "results_markdown", "results_metrics"], name="build_report_node"),
            Node(plot_results, inputs="results_table", outputs=["accuracy_plot", "latency_plot"],
                 name="plot_results_node"),
            Node(plot_training, inputs=["stage1_history", "stage1_validation", "stage2_history", "stage2_validation"],
                 outputs="training_curves_plot", name="plot_training_node"),
            Node(describe_training_data,
                 inputs=["teacher_plans", "tasks_train", "params:seed"],
                 outputs="training_data", name="describe_training_data_node"),
            Node(describe_methods, inputs=["methods", "training_data"], outputs="method_settings",
                 name="describe_methods_node"),
            Node(log_method_runs, inputs=["results_table", "method_settings"], outputs="method_runs",
                 name="log_method_runs_node"),
            Node(log_trained_model,
                 inputs=["method_pilot_stage2", "student_model", "params:generation", "params:evaluation"],
                 outputs="trained_model", name="log_trained_model_node"),
        ],
        tags=["evaluation"],
    )
