from kedro.pipeline import Node, Pipeline

from pilot.pipelines.protocol import protocol_node

from .nodes import tune_loss_balance


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            protocol_node(),
            Node(tune_loss_balance,
                 inputs=["latent_cache", "teacher_plans", "student_model", "params:guidance", "params:latents",
                         "params:stage2", "params:tune", "training_protocol"],
                 outputs=["tuned_loss_weights", "tune_trials", "tune_history_plot", "tune_importances_plot"],
                 name="tune_loss_balance_node"),
        ],
        tags=["tune"],
    )
