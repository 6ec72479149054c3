from kedro.pipeline import Node, Pipeline

from pilot.methods.registry import trained_baselines
from pilot.pipelines.protocol import protocol_node

from .nodes import compute_steering_vector, trainer, tune_caa_scale


def create_pipeline(**kwargs) -> Pipeline:
    """One node trains each trained baseline (:func:`pilot.methods.registry.trained_baselines`) on the
    shared protocol; CAA's vector and scale come from the latent cache and the validation split."""
    shared = ["student_model", "params:guidance", "params:baselines", "training_protocol"]
    return Pipeline(
        [
            protocol_node(),
            *[Node(trainer(method), inputs=[*shared, *method.train_inputs],
                   outputs=[method.artefact, f"{method.name}_history", f"{method.name}_metrics"],
                   name=f"train_{method.name}_node")
              for method in trained_baselines()],
            Node(compute_steering_vector, inputs="latent_cache", outputs="steering_vector",
                 name="compute_steering_vector_node"),
            Node(tune_caa_scale,
                 inputs=["steering_vector", "student_model", "tasks_val", "params:guidance", "params:baselines",
                         "params:generation"],
                 outputs=["caa_config", "caa_sweep"], name="tune_caa_scale_node"),
        ],
        tags=["baselines"],
    )
