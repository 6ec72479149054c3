from kedro.pipeline import Node, Pipeline

from pilot.pipelines.protocol import protocol_node

from .nodes import run_ablation_study


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            protocol_node(),
            Node(run_ablation_study,
                 inputs=["latent_cache", "teacher_plans", "tasks_test", "predictions", "student_model",
                         "params:guidance", "params:latents", "params:stage2", "params:tune", "params:ablations",
                         "training_protocol"],
                 outputs=["ablation_table", "ablations_markdown"], name="run_ablation_study_node"),
        ],
        tags=["ablations"],
    )
