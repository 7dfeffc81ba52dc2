"""The encoder's models-from-code file: MLflow stores it with each encoder version and runs it to load the model
(see :mod:`hagan_clinic.serving`)."""

from mlflow.models import set_model

from hagan_clinic.serving import EncoderModel

set_model(EncoderModel())
