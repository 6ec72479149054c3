from kedro.pipeline import Node, Pipeline

from pilot.pipelines.protocol import protocol_node

from .nodes import ablation_settings, run_ablation_study


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            protocol_node(),
            Node(ablation_settings,
                 inputs=["params:guidance", "params:latents", "params:stage2", "params:tune", "params:ablations"],
                 outputs="ablation_settings", name="ablation_settings_node"),
            Node(run_ablation_study,
                 inputs=["latent_cache", "teacher_plans", "tasks_test", "predictions", "student_model",
                         "ablation_settings", "training_protocol"],
                 outputs=["ablation_table", "ablations_markdown"], name="run_ablation_study_node"),
        ],
        tags=["ablations"],
    )
