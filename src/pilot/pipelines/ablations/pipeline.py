from kedro.pipeline import Node, Pipeline

from .nodes import run_ablation_study


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(run_ablation_study,
                 inputs=["latent_cache", "teacher_plans", "tasks_train", "tasks_val", "tasks_test", "predictions",
                         "student_model", "params:guidance", "params:latents", "params:stage1", "params:stage2",
                         "params:generation", "params:tune", "params:ablations", "params:seed"],
                 outputs=["ablation_table", "ablations_markdown"], name="run_ablation_study_node"),
        ],
        tags=["ablations"],
    )
