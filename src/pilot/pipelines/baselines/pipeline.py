from kedro.pipeline import Node, Pipeline

from pilot.methods.registry import trained_baselines
from pilot.pipelines.protocol import protocol_node

from .nodes import trainer


def create_pipeline(**kwargs) -> Pipeline:
    """One node trains each trained baseline (:func:`pilot.methods.registry.trained_baselines`) on the
    shared protocol."""
    shared = ["student_model", "params:guidance", "params:baselines", "training_protocol"]
    return Pipeline(
        [
            protocol_node(),
            *[Node(trainer(method), inputs=[*shared, *method.train_inputs],
                   outputs=[method.artefact, f"{method.name}_history", f"{method.name}_metrics"],
                   name=f"train_{method.name}_node")
              for method in trained_baselines()],
        ],
        tags=["baselines"],
    )
