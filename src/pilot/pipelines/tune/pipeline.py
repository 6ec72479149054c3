from kedro.pipeline import Node, Pipeline

from .nodes import tune_loss_balance


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(tune_loss_balance,
                 inputs=["latent_cache", "teacher_plans", "tasks_train", "tasks_val", "student_model",
                         "params:guidance", "params:latents", "params:stage1", "params:stage2",
                         "params:generation", "params:tune"],
                 outputs=["tuned_loss_weights", "tune_trials", "tune_history_plot", "tune_importances_plot"],
                 name="tune_loss_balance_node"),
        ],
        tags=["tune"],
    )
