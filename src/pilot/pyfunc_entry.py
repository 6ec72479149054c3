"""What MLflow loads a logged PILOT model from ("models from code"): no object is pickled.

:func:`pilot.serving.log_pilot_model` logs this file as the model's code; MLflow runs it at load
time and takes the model it sets. Only MLflow imports it.
"""

import mlflow

from pilot.serving import PilotModel

mlflow.models.set_model(PilotModel())
